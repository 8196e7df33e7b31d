"""Usage details page (admins) and My usage page (any member): access, tabs, htmx, errors."""

from __future__ import annotations

import html
import json
import re
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from products.selectors import product_balance
from usage.services import usage_checkout, usage_consume, usage_metered, usage_return

from .conftest import key
from .factories import ProductFactory, make_grant

ADMINS = ["primary_admin", "secondary_admin", "sso_admin"]


@pytest.fixture
def data(world, api_actor):
    team = world["team"]
    make_grant(team, world["tokens"], 1000)
    make_grant(team, world["pool"], 50)
    now = timezone.now()
    common = dict(team=team, actor=api_actor)
    usage_consume(**common, product=world["tokens"], quantity=30, idempotency_key=key(),
                  user="user@example.com", service="rendering", occurred_at=now - timedelta(hours=1))
    usage_consume(**common, product=world["tokens"], quantity=70, idempotency_key=key(),
                  user="primary_admin@example.com", service="analysis", occurred_at=now - timedelta(hours=2))
    usage_checkout(**common, product=world["pool"], quantity=4, checkout_id="c1", idempotency_key=key(),
                   user="user@example.com", service="simulation")
    usage_return(**common, product=world["pool"], quantity=1, checkout_id="c1", idempotency_key=key())
    return world


def detail_url(code="cloud-tokens", slug="acme", **params):
    url = reverse("usage:product_detail", kwargs={"slug": slug, "code": code})
    if params:
        url += "?" + "&".join(f"{k}={v}" for k, v in params.items())
    return url


def figure(response) -> dict | None:
    m = re.search(rb'<script type="application/json" data-plotly-figure="[^"]+">(.*?)</script>', response.content,
                  re.S)
    return json.loads(m.group(1)) if m else None


# -- access ------------------------------------------------------------------------------

TEAM_URLS = [
    ("usage:product_detail", {"code": "cloud-tokens"}),
    ("usage:product_export", {"code": "cloud-tokens"}),
]


@pytest.mark.parametrize(("name", "kwargs"), TEAM_URLS)
def test_anonymous_goes_to_login(data, client, name, kwargs):
    url = reverse(name, kwargs={"slug": "acme", **kwargs})
    r = client.get(url)
    assert r.status_code == 302 and r["Location"].startswith(reverse("login"))


@pytest.mark.parametrize(("name", "kwargs"), TEAM_URLS + [("usage:my_usage", {})])
def test_outsider_gets_404(data, client, name, kwargs):
    client.force_login(data["outsider"])
    assert client.get(reverse(name, kwargs={"slug": "acme", **kwargs})).status_code == 404
    # Also for a team that does not exist: same answer, nothing leaks.
    assert client.get(reverse(name, kwargs={"slug": "nope", **kwargs})).status_code == 404


@pytest.mark.parametrize(("name", "kwargs"), TEAM_URLS)
def test_plain_user_gets_403_on_details_and_export(data, client, name, kwargs):
    client.force_login(data["members"]["user"])
    assert client.get(reverse(name, kwargs={"slug": "acme", **kwargs})).status_code == 403
    r = client.get(reverse(name, kwargs={"slug": "acme", **kwargs}) + "?format=csv&view=user")
    assert r.status_code == 403


def test_plain_user_gets_403_on_htmx_partial(data, client):
    client.force_login(data["members"]["user"])
    assert client.get(detail_url(view="user"), HTTP_HX_REQUEST="true").status_code == 403


@pytest.mark.parametrize("role", ADMINS)
def test_admins_see_details(data, client, role):
    client.force_login(data["members"][role])
    r = client.get(detail_url())
    assert r.status_code == 200
    assert b'id="usage-panel"' in r.content


def test_my_usage_anonymous_goes_to_login(data, client):
    r = client.get(reverse("usage:my_usage", kwargs={"slug": "acme"}))
    assert r.status_code == 302 and r["Location"].startswith(reverse("login"))


@pytest.mark.parametrize("role", ADMINS + ["user"])
def test_every_member_sees_my_usage(data, client, role):
    client.force_login(data["members"][role])
    assert client.get(reverse("usage:my_usage", kwargs={"slug": "acme"})).status_code == 200


def test_product_the_team_never_held_is_404(data, client):
    ProductFactory(code="other-product")
    client.force_login(data["members"]["primary_admin"])
    assert client.get(detail_url("other-product")).status_code == 404
    assert client.get(detail_url("no-such-product")).status_code == 404


def test_other_teams_product_data_never_shows(data, client, api_actor):
    other = data["other"]
    make_grant(other, data["tokens"], 600)
    usage_consume(team=other, product=data["tokens"], quantity=487, idempotency_key=key(), actor=api_actor,
                  service="secret-service", user="spy@globex.example")
    client.force_login(data["members"]["primary_admin"])
    for view in ("usage", "service", "user"):
        body = client.get(detail_url(view=view)).content
        assert b"secret-service" not in body and b"spy@globex" not in body and b"487" not in body


# -- the page ----------------------------------------------------------------------------


def test_header_shows_the_balance_selector_numbers(data, client):
    client.force_login(data["members"]["primary_admin"])
    r = client.get(detail_url())
    balance = product_balance(data["team"], data["tokens"])
    assert (balance.available, balance.total) == (900, 1000)
    assert b'data-available="900"' in r.content and b'data-total="1000"' in r.content
    assert b'data-status="ok"' in r.content
    assert b"900</strong> of 1,000 tokens available" in r.content
    assert f"{balance.used_pct}%".encode() in r.content


def test_exhaustible_has_three_granularity_tabs_returnable_one(data, client):
    client.force_login(data["members"]["primary_admin"])
    tokens = client.get(detail_url()).content.decode()
    assert all(f"granularity={g}" in tokens for g in ("day", "week", "month"))
    pool = client.get(detail_url("asset-pool")).content.decode()
    assert 'aria-label="Granularity"' in pool
    assert "granularity=week" not in pool and "granularity=month" not in pool
    # A weekly view of a returnable product is refused with a message, not a 500.
    r = client.get(detail_url("asset-pool", granularity="week"))
    assert r.status_code == 400 and b"daily view only" in r.content


def test_usage_chart_exhaustible(data, client):
    client.force_login(data["members"]["primary_admin"])
    fig = figure(client.get(detail_url(range="month")))
    names = [t["name"] for t in fig["data"]]
    assert names == ["Consumed (tokens)", "Refunded (tokens)", "Balance available (tokens)"]
    assert sum(fig["data"][0]["y"]) == 100
    assert fig["layout"]["yaxis"]["title"]["text"] == "Units (tokens)"
    assert "team time" in fig["layout"]["xaxis"]["title"]["text"]


def test_usage_chart_returnable(data, client):
    client.force_login(data["members"]["primary_admin"])
    fig = figure(client.get(detail_url("asset-pool", range="month")))
    assert [t["name"] for t in fig["data"]] == ["Peak checked out (assets)", "Returned (assets)"]
    assert max(fig["data"][0]["y"]) == 4
    assert sum(fig["data"][1]["y"]) == 1


def test_metered_chart_shows_raw_usage_and_charged_units(data, client, api_actor):
    api = ProductFactory(code="render-api", unit="units", metered=True, charge_unit_size=20,
                         raw_unit="processing minutes")
    make_grant(data["team"], api, 100)
    usage_metered(team=data["team"], product=api, quantity=50, idempotency_key=key(), actor=api_actor,
                  service="render")
    client.force_login(data["members"]["primary_admin"])
    r = client.get(detail_url("render-api", range="month"))
    fig = figure(r)
    names = [t["name"] for t in fig["data"]]
    assert names[0] == "Consumed (units)" and names[-1] == "Raw usage (processing minutes)"
    assert sum(fig["data"][0]["y"]) == 2 and sum(fig["data"][-1]["y"]) == 50
    assert fig["layout"]["yaxis2"]["title"]["text"] == "Raw usage (processing minutes)"
    assert fig["layout"]["yaxis"]["title"]["text"] == "Charged units (units)"


@pytest.mark.parametrize(("view", "first", "second"), [
    ("service", "analysis", "rendering"),
    ("user", "primary_admin@example.com", "user@example.com"),
])
def test_breakdown_tabs_table_and_bar_chart(data, client, view, first, second):
    client.force_login(data["members"]["primary_admin"])
    r = client.get(detail_url(view=view))
    table = r.content.decode().split("<table>", 1)[1]
    assert table.index(first) < table.index(second)  # most consumed first in the table
    fig = figure(r)
    assert fig["data"][0]["type"] == "bar" and fig["data"][0]["orientation"] == "h"
    assert fig["data"][0]["y"] == [second, first]  # plotly draws bottom-up: largest on top
    assert fig["data"][0]["x"] == [30, 70]


def test_htmx_request_gets_only_the_chart_partial(data, client):
    client.force_login(data["members"]["primary_admin"])
    r = client.get(detail_url(view="service"), HTTP_HX_REQUEST="true")
    body = r.content.decode()
    assert r.status_code == 200
    assert body.lstrip().startswith('<section id="usage-panel"')
    assert "<html" not in body and "data-available" not in body
    assert "HX-Request" in r["Vary"]


def test_links_work_without_javascript(data, client):
    client.force_login(data["members"]["primary_admin"])
    body = client.get(detail_url()).content.decode()
    # Every htmx link has a plain href, the custom range is a plain GET form.
    for m in re.finditer(r'<a href="([^"]+)" hx-get="([^"]+)"', body):
        assert m.group(1) == m.group(2)
    assert '<form class="custom-range" method="get"' in body
    assert 'hx-push-url="true"' in body


def test_plotly_is_served_locally(data, client):
    client.force_login(data["members"]["primary_admin"])
    body = client.get(detail_url()).content.decode()
    scripts = re.findall(r'<script[^>]+src="([^"]+)"', body)
    assert "/static/vendor/plotly/plotly.min.js" in scripts
    assert all(s.startswith("/") for s in scripts), scripts


def test_empty_range_shows_empty_state_not_a_chart(data, client):
    client.force_login(data["members"]["primary_admin"])
    r = client.get(detail_url(range="custom", **{"from": "2026-01-01", "to": "2026-01-31"}))
    assert r.status_code == 200
    assert b"No usage in this range." in r.content
    assert figure(r) is None


@pytest.mark.parametrize("query", [
    "range=custom&from=2026-02-30&to=2026-03-01",
    "range=custom&from=2026-03-01&to=2026-02-01",
    "range=custom&from=2026-03-01&to=2999-01-01",
    "range=custom&from=2019-01-01&to=2026-01-01",
    "range=custom&from=&to=",
    "range=custom&from=%00&to=x",
    "range=forever",
    "granularity=hour",
    "view=admins",
    "view=" + "x" * 5000,
])
def test_bad_input_is_a_clear_400_never_a_500(data, client, query):
    client.force_login(data["members"]["primary_admin"])
    r = client.get(detail_url() + "?" + query)
    assert r.status_code == 400
    assert b'class="form-error" role="alert"' in r.content
    htmx = client.get(detail_url() + "?" + query, HTTP_HX_REQUEST="true")
    assert htmx.status_code == 200 and b'role="alert"' in htmx.content  # htmx swaps 2xx only
    export = client.get(reverse("usage:product_export", kwargs={"slug": "acme", "code": "cloud-tokens"})
                        + "?" + query)
    assert export.status_code == 400


# -- My usage ----------------------------------------------------------------------------


def test_my_usage_shows_only_the_signed_in_users_usage(data, client):
    client.force_login(data["members"]["user"])
    r = client.get(reverse("usage:my_usage", kwargs={"slug": "acme"}) + "?range=month")
    body = r.content.decode()
    assert "user@example.com" in body
    assert "primary_admin@example.com" not in body and "analysis" not in body
    figures = [json.loads(m) for m in re.findall(
        r'<script type="application/json" data-plotly-figure="[^"]+">(.*?)</script>', body, re.S)]
    by_name = {f["data"][0]["name"]: f for f in figures}
    assert sum(by_name["Consumed (tokens)"]["data"][0]["y"]) == 30  # not the admin's 70
    pool = by_name["Held at day end (assets)"]
    assert max(pool["data"][0]["y"]) == 3  # 4 out, 1 back


def test_my_usage_matches_the_email_in_any_case(data, client, api_actor):
    """A service that writes the member's email in capitals still reports their usage."""
    usage_consume(team=data["team"], product=data["tokens"], quantity=5, idempotency_key=key(),
                  actor=api_actor, user="USER@Example.COM", service="rendering")
    client.force_login(data["members"]["user"])
    r = client.get(reverse("usage:my_usage", kwargs={"slug": "acme"}) + "?range=month")
    figures = [json.loads(m) for m in re.findall(
        r'<script type="application/json" data-plotly-figure="[^"]+">(.*?)</script>', r.content.decode(), re.S)]
    by_name = {f["data"][0]["name"]: f for f in figures}
    assert sum(by_name["Consumed (tokens)"]["data"][0]["y"]) == 35  # 30 + 5, still not the admin's 70
    client.force_login(data["members"]["primary_admin"])
    r = client.get(reverse("usage:my_usage", kwargs={"slug": "acme"}) + "?range=month&granularity=month")
    assert b"USER@Example.COM" not in r.content and b">75<" not in r.content


def test_my_usage_for_an_admin_is_their_own_too(data, client):
    client.force_login(data["members"]["primary_admin"])
    r = client.get(reverse("usage:my_usage", kwargs={"slug": "acme"}) + "?range=month&granularity=month")
    body = r.content.decode()
    assert "rendering" not in body and "user@example.com" not in body
    assert "70" in body


def test_my_usage_with_no_usage_shows_empty_messages(data, client):
    client.force_login(data["members"]["sso_admin"])
    r = client.get(reverse("usage:my_usage", kwargs={"slug": "acme"}))
    assert r.status_code == 200
    assert b"You used no tokens of Cloud tokens in this range." in r.content
    assert b"data-plotly-figure" not in r.content


def test_my_usage_bad_range_is_400(data, client):
    client.force_login(data["members"]["user"])
    r = client.get(reverse("usage:my_usage", kwargs={"slug": "acme"}) + "?range=custom&from=x")
    assert r.status_code == 400 and b'role="alert"' in r.content


def test_my_usage_htmx_partial(data, client):
    client.force_login(data["members"]["user"])
    r = client.get(reverse("usage:my_usage", kwargs={"slug": "acme"}) + "?range=6m", HTTP_HX_REQUEST="true")
    assert r.content.decode().lstrip().startswith('<section id="my-usage-panel"')


def test_details_page_query_count_is_constant(data, client, django_assert_max_num_queries):
    client.force_login(data["members"]["primary_admin"])
    client.get(detail_url())
    with django_assert_max_num_queries(12):
        r = client.get(detail_url(range="12m"))
    assert r.status_code == 200


def test_service_names_cannot_break_out_of_the_chart_json(data, client, api_actor):
    usage_consume(team=data["team"], product=data["tokens"], quantity=5, idempotency_key=key(), actor=api_actor,
                  service="</script><script>alert(1)</script>", user="<b>x</b>@example.com")
    client.force_login(data["members"]["primary_admin"])
    for view, name in (("service", "</script><script>alert(1)</script>"), ("user", "<b>x</b>@example.com")):
        r = client.get(detail_url(view=view))
        assert b"<script>alert(1)" not in r.content and b"<b>x</b>" not in r.content
        # Escaped in the page, and for Plotly too (it reads <b>/<a> in labels as markup).
        assert html.escape(name, quote=False) in figure(r)["data"][0]["y"]
        assert html.escape(name) in r.content.decode().split("<tbody>")[1]


def test_details_header_shows_the_forecast(client, world):
    from usage.actors import Actor
    from usage.services import usage_consume

    from .conftest import key

    team, tokens = world["team"], world["tokens"]
    make_grant(team, tokens, 100, days=365)
    usage_consume(team=team, product=tokens, quantity=60, idempotency_key=key(), actor=Actor.system("t"))
    client.force_login(world["members"]["primary_admin"])
    page = client.get(reverse("usage:product_detail", kwargs={"slug": team.slug, "code": tokens.code}))
    # 60 used in the last 30 days: 2 a day, 40 left -> about 20 days, well before the end.
    assert "Runs out in ~20 days" in page.content.decode()


def test_table_body_formats_whole_numbers_and_escapes_everything_else():
    from usage.charts import Table
    from usage.views import rows_html

    table = Table(["service", "consumed", "net_consumed"], ["Service", "Consumed", "Net"], [
        ["rendering", 1234567, -5],
        ["<script>x</script>", 7, 0],
        ["(none)", "<b>", 1.5],  # not whole numbers: built cell by cell, escaped
        ["short", 3],  # a ragged row is not padded or cut
        ["empty", None, 2],
    ])
    assert rows_html(table).split("\n") == [
        '<tr><th scope="row">rendering</th><td>1,234,567</td><td>-5</td></tr>',
        '<tr><th scope="row">&lt;script&gt;x&lt;/script&gt;</th><td>7</td><td>0</td></tr>',
        '<tr><th scope="row">(none)</th><td>&lt;b&gt;</td><td>1.5</td></tr>',
        '<tr><th scope="row">short</th><td>3</td></tr>',
        '<tr><th scope="row">empty</th><td>None</td><td>2</td></tr>',
    ]
    assert rows_html(Table(["day"], ["Day"], [])) == ""
