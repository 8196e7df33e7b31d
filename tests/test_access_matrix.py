"""Who may open which team page: every team URL x every kind of visitor.

DATA-DRIVEN. To cover a new team page, append one row to ``TEAM_URLS``:

    (url_name, kwargs_builder, allowed_roles)            # or
    (url_name, kwargs_builder, allowed_roles, query)     # query string dict, e.g. {"range": "3m"}

``kwargs_builder(world)`` gets the ``world`` fixture (tests/conftest.py: team "acme" with a
user per role, outsider, products cloud-tokens and asset-pool, each granted to acme here)
and returns the URL kwargs. ``allowed_roles`` are the membership roles that get 200.

Expected for every row, for a plain request and for an htmx request (partials included):
anonymous -> redirect to login; outsider (admin of another team) -> 404; an allowed role
-> 200; any other member -> 403. ``test_every_team_url_is_in_the_matrix`` fails when a URL
under ``/teams/<slug>/`` exists without a row here.
"""

from __future__ import annotations

from urllib.parse import urlencode

import pytest
from django.urls import URLPattern, URLResolver, get_resolver, reverse

from teams.models import Role

from .factories import make_grant

ADMINS = frozenset({"primary_admin", "secondary_admin", "sso_admin"})
MEMBERS = ADMINS | {"user"}


def team_kwargs(world) -> dict:
    return {"slug": world["team"].slug}


def product_kwargs(code: str):
    def build(world) -> dict:
        return {"slug": world["team"].slug, "code": code}
    return build


TEAM_URLS: list[tuple] = [
    ("teams:dashboard", team_kwargs, ADMINS),
    ("usage:product_detail", product_kwargs("cloud-tokens"), ADMINS),
    ("usage:product_detail", product_kwargs("asset-pool"), ADMINS),
    ("usage:product_export", product_kwargs("cloud-tokens"), ADMINS),
    ("usage:my_usage", team_kwargs, MEMBERS),
]

VISITORS = ["anonymous", "outsider", "user", "primary_admin", "secondary_admin", "sso_admin"]
HTMX_HEADERS = {"HTTP_HX_REQUEST": "true", "HTTP_HX_TARGET": "cards"}


def _row_id(row) -> str:
    return row[0]


@pytest.fixture
def granted_world(world):
    make_grant(world["team"], world["tokens"], 1000)
    make_grant(world["team"], world["pool"], 50)
    return world


def _expected(visitor: str, allowed) -> int:
    if visitor == "anonymous":
        return 302
    if visitor == "outsider":
        return 404
    return 200 if visitor in allowed else 403


@pytest.mark.parametrize("htmx", [False, True], ids=["page", "htmx"])
@pytest.mark.parametrize("visitor", VISITORS)
@pytest.mark.parametrize("row", TEAM_URLS, ids=_row_id)
def test_access(client, granted_world, row, visitor, htmx):
    url_name, build, allowed, *rest = row
    url = reverse(url_name, kwargs=build(granted_world))
    if rest and rest[0]:
        url += "?" + urlencode(rest[0])
    if visitor == "outsider":
        client.force_login(granted_world["outsider"])
    elif visitor != "anonymous":
        client.force_login(granted_world["members"][visitor])

    response = client.get(url, **(HTMX_HEADERS if htmx else {}))

    expected = _expected(visitor, allowed)
    assert response.status_code == expected, f"{visitor} on {url}: {response.status_code}, expected {expected}"
    if expected == 302:
        assert response["Location"].startswith(reverse("login") + "?next=")
    if expected == 404:
        # Nothing about the team leaks into the error page.
        assert granted_world["team"].name.encode() not in response.content


@pytest.mark.parametrize("row", TEAM_URLS, ids=_row_id)
def test_unknown_team_is_404_like_a_foreign_one(client, granted_world, row):
    url_name, build, *_ = row
    kwargs = {**build(granted_world), "slug": "no-such-team"}
    client.force_login(granted_world["members"]["primary_admin"])
    assert client.get(reverse(url_name, kwargs=kwargs)).status_code == 404


def _team_routes(patterns, prefix="", namespace=""):
    for p in patterns:
        if isinstance(p, URLResolver):
            ns = f"{namespace}{p.namespace}:" if p.namespace else namespace
            yield from _team_routes(p.url_patterns, prefix + str(p.pattern), ns)
        elif isinstance(p, URLPattern):
            route = prefix + str(p.pattern)
            if route.startswith("teams/<") and p.name:
                yield f"{namespace}{p.name}", route


def test_every_team_url_is_in_the_matrix():
    listed = {row[0] for row in TEAM_URLS}
    missing = sorted(f"{name} ({route})" for name, route in _team_routes(get_resolver().url_patterns)
                     if name not in listed)
    assert not missing, f"add these team URLs to TEAM_URLS in tests/test_access_matrix.py: {missing}"


@pytest.mark.parametrize("who", [*(r.value for r in Role), "outsider"])
def test_membership_lookup_matches_the_orm(granted_world, require_postgres, who):
    """get_team_for_user reads the membership with fixed SQL on PostgreSQL: the same
    membership and team (JSON field included) as the ORM, and nothing for outsiders."""
    from teams import access
    from teams.models import Membership

    team = granted_world["team"]
    team.alert_thresholds = [50, 20]
    team.save()
    user = granted_world["outsider"] if who == "outsider" else granted_world["members"][who]
    got = access._membership(team.slug, user.pk)
    want = Membership.objects.select_related("team").filter(team__slug=team.slug, user=user).first()
    if want is None:
        assert got is None
        return
    fields = [f.attname for f in Membership._meta.concrete_fields]
    assert [getattr(got, f) for f in fields] == [getattr(want, f) for f in fields]
    team_fields = [f.attname for f in type(team)._meta.concrete_fields]
    assert [getattr(got.team, f) for f in team_fields] == [getattr(want.team, f) for f in team_fields]
    assert got.team.alert_thresholds == [50, 20]
    assert access._membership("no-such-team", user.pk) is None
