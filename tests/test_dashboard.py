"""The team dashboard: cards, roles, the htmx partial, home redirects and the team picker."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.humanize.templatetags.humanize import intcomma
from django.db import connection, reset_queries
from django.template.loader import render_to_string
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from products.models import Refresh
from products.selectors import team_balances
from teams.models import Membership, Role
from teams.views import render_cards
from usage.actors import Actor
from usage.services import usage_consume

from .conftest import key
from .factories import MembershipFactory, ProductFactory, TeamFactory, UserFactory, make_grant

HTMX = {"HTTP_HX_REQUEST": "true", "HTTP_HX_TARGET": "cards"}


def dashboard_url(team) -> str:
    return reverse("teams:dashboard", kwargs={"slug": team.slug})


def card_html(html: str, code: str) -> str:
    """The markup of one card, located by its data-product hook."""
    grid = html.split('<ul class="cards"', 1)[1].split("</section>", 1)[0]
    for chunk in grid.split('<li class="card ')[1:]:
        if f'data-product="{code}"' in chunk.split(">", 1)[0]:
            return '<li class="card ' + chunk
    raise AssertionError(f"no card for {code}")


def text(html: str) -> str:
    """Visible text with tags removed and whitespace collapsed."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).strip()


def attrs(card: str) -> dict[str, str]:
    head = card.split(">", 1)[0]
    return dict(re.findall(r'(data-[\w-]+)="([^"]*)"', head))


@pytest.fixture
def admin_client(client, world):
    client.force_login(world["members"]["primary_admin"])
    return client


# --- cards -------------------------------------------------------------------------------------


def test_card_shows_selector_numbers_with_separators(admin_client, world):
    team, tokens = world["team"], world["tokens"]
    make_grant(team, tokens, 60000, days=30)
    usage_consume(team=team, product=tokens, quantity=1234, idempotency_key=key(), actor=Actor.system("test"))

    response = admin_client.get(dashboard_url(team))

    assert response.status_code == 200
    card = card_html(response.content.decode(), "cloud-tokens")
    assert attrs(card) == {"data-product": "cloud-tokens", "data-available": "58766", "data-total": "60000",
                           "data-status": "ok"}
    visible = text(card)
    assert "58,766 of 60,000 available" in visible
    assert "2.1% used" in visible  # 1234 / 60000 = 2.0567 -> 2.1
    assert "Total capacity purchased: 60,000" in visible
    assert "Ends in 29 days" in visible
    assert "Exhaustible" in visible
    assert "Healthy" in visible and "Low balance" not in visible
    assert 'role="progressbar"' in card
    assert 'aria-valuenow="58766"' in card and 'aria-valuemax="60000"' in card and 'aria-valuemin="0"' in card
    assert "aria-valuetext=\"58,766 of 60,000 tokens available, 2.1% used\"" in card
    assert 'href="/teams/acme/products/cloud-tokens/"' in card
    assert "View usage details" in visible


@pytest.mark.parametrize(("available", "status", "label"), [
    (21, "ok", "Healthy"),         # 21% > 20%: green
    (20, "low", "Low balance"),    # exactly 20%: red (<=, exact compare)
    (1, "low", "Low balance"),
    (0, "empty", "Exhausted"),
])
def test_status_threshold_is_exact(admin_client, world, available, status, label):
    team, tokens = world["team"], world["tokens"]
    make_grant(team, tokens, 100)
    if available < 100:
        usage_consume(team=team, product=tokens, quantity=100 - available, idempotency_key=key(),
                      actor=Actor.system("test"))

    card = card_html(admin_client.get(dashboard_url(team)).content.decode(), "cloud-tokens")

    assert attrs(card)["data-status"] == status
    assert label in text(card)
    assert f"card--{status}" in card


def test_no_capacity_card_is_neutral(admin_client, world):
    team, tokens = world["team"], world["tokens"]
    now = timezone.now()
    # A grant that already ended: the product stays listed, with no capacity.
    make_grant(team, tokens, 500, starts_at=now - timedelta(days=40), ends_at=now - timedelta(days=10), now=now - timedelta(days=40))

    card = card_html(admin_client.get(dashboard_url(team)).content.decode(), "cloud-tokens")

    assert attrs(card) == {"data-product": "cloud-tokens", "data-available": "0", "data-total": "0",
                           "data-status": "empty"}
    assert "card--none" in card
    assert "No capacity" in text(card)
    assert "Expired" in text(card)
    assert 'role="progressbar"' not in card


def test_returnable_card_and_refresh_label(admin_client, world):
    team = world["team"]
    make_grant(team, world["pool"], 150)
    make_grant(team, world["tokens"], 2000, refresh=Refresh.MONTHLY, days=365)
    html = admin_client.get(dashboard_url(team)).content.decode()

    pool = text(card_html(html, "asset-pool"))
    assert "Returnable" in pool and "150 of 150 available" in pool
    tokens = text(card_html(html, "cloud-tokens"))
    assert re.search(r"Refreshes in \d+ days?", tokens)
    purchased = {b.product.code: b.purchased for b in team_balances(team)}["cloud-tokens"]
    assert purchased > 2000  # monthly: quantity x periods in the term
    assert f"Total capacity purchased: {intcomma(purchased)}" in tokens


def test_runs_out_forecast_shown_only_when_known(rf, admin_client, world):
    team, tokens = world["team"], world["tokens"]
    make_grant(team, tokens, 100)
    html = admin_client.get(dashboard_url(team)).content.decode()
    assert "Runs out in" not in html

    # The forecast is filled by periodic work elsewhere: render the partial with a known one.
    balance = team_balances(team)[0]
    balance.runs_out_in_days = 12
    context = {"team": team, "now": timezone.now(), "poll_seconds": 10,
               "cards": render_cards(team, [balance])}
    html = render_to_string("teams/dashboard.html#cards", context, request=rf.get("/"))
    assert "Runs out in ~12 days" in text(card_html(html, "cloud-tokens"))
    balance.runs_out_in_days = 1
    context["cards"] = render_cards(team, [balance])  # a changed forecast is a different card
    html = render_to_string("teams/dashboard.html#cards", context, request=rf.get("/"))
    assert "Runs out in ~1 day " in text(card_html(html, "cloud-tokens")) + " "


def test_cards_follow_the_selector_exactly(admin_client, world):
    """Whatever the selector says is what the cards say (no recomputation in the page)."""
    team = world["team"]
    make_grant(team, world["tokens"], 1000)
    make_grant(team, world["pool"], 7)
    html = admin_client.get(dashboard_url(team)).content.decode()
    for b in team_balances(team):
        a = attrs(card_html(html, b.product.code))
        assert (int(a["data-available"]), int(a["data-total"]), a["data-status"]) == (b.available, b.total, b.status)
        assert f"{b.used_pct}% used" in text(card_html(html, b.product.code))


def test_empty_team_has_a_friendly_message(admin_client, world):
    html = admin_client.get(dashboard_url(world["team"])).content.decode()
    assert "holds no capacity-based products yet" in html
    assert 'id="cards"' in html  # still polls, so the first grant appears by itself


def test_other_teams_products_never_shown(admin_client, world):
    make_grant(world["other"], world["tokens"], 999)
    html = admin_client.get(dashboard_url(world["team"])).content.decode()
    assert 'data-product="cloud-tokens"' not in html


# --- htmx partial --------------------------------------------------------------------------------


def test_poll_returns_only_the_cards_partial(admin_client, world):
    make_grant(world["team"], world["tokens"], 100)
    response = admin_client.get(dashboard_url(world["team"]), **HTMX)
    html = response.content.decode()
    assert response.status_code == 200
    assert html.lstrip().startswith('<section id="cards"')
    assert "<html" not in html and "Switch team" not in html
    assert 'data-product="cloud-tokens"' in html
    assert "HX-Request" in response["Vary"]


def test_full_page_varies_on_hx_request_and_polls_while_visible(admin_client, world):
    response = admin_client.get(dashboard_url(world["team"]))
    html = response.content.decode()
    assert "HX-Request" in response["Vary"]
    assert "every 10s [document.visibilityState === &#x27;visible&#x27;]" in html or \
        "every 10s [document.visibilityState === 'visible']" in html
    assert "visibilitychange" in html
    assert 'hx-swap="outerHTML"' in html
    assert "Last updated" in html


def test_team_switch_request_gets_the_full_page(admin_client, world):
    """A switch (HX-Target: page) gets the whole page so hx-select can take #page and the title."""
    response = admin_client.get(dashboard_url(world["team"]), HTTP_HX_REQUEST="true", HTTP_HX_TARGET="page")
    assert "<title>" in response.content.decode()
    assert 'id="page"' in response.content.decode()


@pytest.mark.parametrize("headers", [{}, HTMX])
def test_outsider_gets_404_on_page_and_partial(client, world, headers):
    client.force_login(world["outsider"])
    assert client.get(dashboard_url(world["team"]), **headers).status_code == 404
    assert client.get("/teams/no-such-team/", **headers).status_code == 404


@pytest.mark.parametrize("headers", [{}, HTMX])
def test_plain_user_gets_403(client, world, headers):
    client.force_login(world["members"]["user"])
    assert client.get(dashboard_url(world["team"]), **headers).status_code == 403


def test_anonymous_goes_to_login(client, world):
    response = client.get(dashboard_url(world["team"]))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login") + "?next=/teams/acme/")


def test_post_is_refused(admin_client, world):
    assert admin_client.post(dashboard_url(world["team"])).status_code == 405


# --- query count -----------------------------------------------------------------------------------


def _team_with_products(n: int):
    team = TeamFactory()
    admin = UserFactory()
    MembershipFactory(team=team, user=admin, role=Role.PRIMARY_ADMIN)
    for i in range(n):
        product = ProductFactory(code=f"p{n}-{i}")
        make_grant(team, product, 100 + i)
        make_grant(team, product, 50, refresh=Refresh.MONTHLY)
    return team, admin


@pytest.mark.parametrize("headers", [{}, HTMX], ids=["page", "partial"])
def test_query_count_is_constant(client, db, django_assert_num_queries, headers):
    small, small_admin = _team_with_products(5)
    big, big_admin = _team_with_products(50)

    client.force_login(small_admin)
    client.get(dashboard_url(small), **headers)  # warm up (session, last_seen)
    reset_queries()  # the setup filled the 9,000-entry query log; capture counts from its length
    with CaptureQueriesContext(connection) as small_run:
        response = client.get(dashboard_url(small), **headers)
    small_count = len(small_run)  # read now: captured_queries is a view of the live log
    assert response.status_code == 200
    assert response.content.decode().count('data-product="') == 5

    client.force_login(big_admin)
    client.get(dashboard_url(big), **headers)
    reset_queries()
    with django_assert_num_queries(small_count):
        response = client.get(dashboard_url(big), **headers)
    assert response.content.decode().count('data-product="') == 50
    # session + user + membership + the selector's few (+ last_seen and the team list on the page)
    assert small_count <= (8 if headers else 10)


# --- last seen, home and picker ------------------------------------------------------------------


def test_opening_dashboard_records_last_seen_but_polling_does_not(admin_client, world):
    membership = Membership.objects.get(user=world["members"]["primary_admin"], team=world["team"])
    assert membership.last_seen_at is None
    admin_client.get(dashboard_url(world["team"]), **HTMX)
    membership.refresh_from_db()
    assert membership.last_seen_at is None
    admin_client.get(dashboard_url(world["team"]))
    membership.refresh_from_db()
    assert membership.last_seen_at is not None


def test_home_sends_admin_to_last_seen_team(client, world):
    user = world["members"]["secondary_admin"]
    MembershipFactory(team=world["other"], user=user, role=Role.SSO_ADMIN)
    client.force_login(user)
    # Two teams, none opened yet: the picker.
    assert client.get("/")["Location"] == reverse("teams:picker")
    client.get(dashboard_url(world["other"]))
    assert client.get("/")["Location"] == dashboard_url(world["other"])
    client.get(dashboard_url(world["team"]))
    assert client.get("/")["Location"] == dashboard_url(world["team"])


def test_home_with_a_single_admin_team_goes_straight_there(client, world):
    client.force_login(world["members"]["sso_admin"])
    assert client.get("/")["Location"] == dashboard_url(world["team"])


def test_home_sends_plain_user_to_my_usage(client, world):
    client.force_login(world["members"]["user"])
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"] == reverse("usage:my_usage", kwargs={"slug": "acme"})


def test_home_without_teams_shows_the_picker_message(client, db):
    client.force_login(UserFactory())
    response = client.get("/", follow=True)
    assert response.redirect_chain[-1][0] == reverse("teams:picker")
    assert "not a member of any team" in response.content.decode()


def test_home_anonymous_goes_to_login(client, db):
    response = client.get("/")
    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))


def test_picker_lists_only_own_teams(client, world):
    user = world["members"]["primary_admin"]
    MembershipFactory(team=world["other"], user=user, role=Role.USER)
    third = TeamFactory(name="Hidden Corp")
    client.force_login(user)
    html = client.get(reverse("teams:picker")).content.decode()
    assert 'data-team="acme"' in html and 'data-team="globex"' in html
    assert third.name not in html
    assert f'href="{dashboard_url(world["team"])}"' in html
    assert f'href="{dashboard_url(world["other"])}"' not in html  # a plain user there: no dashboard link


def test_team_selector_lists_only_admin_teams(admin_client, world):
    user = world["members"]["primary_admin"]
    admin_of = TeamFactory(name="Initech", slug="initech")
    MembershipFactory(team=admin_of, user=user, role=Role.SECONDARY_ADMIN)
    MembershipFactory(team=world["other"], user=user, role=Role.USER)
    html = admin_client.get(dashboard_url(world["team"])).content.decode()
    switch = html.split('class="team-switch"', 1)[1].split("</details>", 1)[0]
    assert 'data-team="acme"' in switch and 'data-team="initech"' in switch
    assert 'data-team="globex"' not in switch
    link = re.search(r'<a href="/teams/initech/"[^>]*>', switch).group(0)
    assert 'hx-get="/teams/initech/"' in link and 'hx-push-url="true"' in link


# --- login page -----------------------------------------------------------------------------------


def test_login_page_and_sign_in(client, db):
    UserFactory(username="alice")
    page = client.get(reverse("login"))
    assert page.status_code == 200 and "Sign in" in page.content.decode()
    bad = client.post(reverse("login"), {"username": "alice", "password": "nope"})
    assert bad.status_code == 200 and 'role="alert"' in bad.content.decode()
    good = client.post(reverse("login"), {"username": "alice", "password": "password"})
    assert good.status_code == 302 and good["Location"] == reverse("home")


def test_logout_is_a_post(admin_client):
    page = admin_client.get(reverse("teams:picker")).content.decode()
    assert f'method="post" action="{reverse("logout")}"' in page
    assert admin_client.post(reverse("logout"))["Location"] == reverse("login")


def test_cached_cards_never_show_old_numbers(client, world):
    """Cards are cached by what they show: a poll after a consumption shows the new balance."""
    team, tokens = world["team"], world["tokens"]
    make_grant(team, tokens, 1000)
    make_grant(team, world["pool"], 10)
    client.force_login(world["members"]["primary_admin"])
    poll = {"HTTP_HX_REQUEST": "true", "HTTP_HX_TARGET": "cards"}
    first = client.get(dashboard_url(team), **poll).content.decode()
    assert 'data-available="1000"' in card_html(first, "cloud-tokens")
    usage_consume(team=team, product=tokens, quantity=250, idempotency_key=key(), actor=Actor.system("t"))
    second = client.get(dashboard_url(team), **poll).content.decode()
    assert 'data-available="750"' in card_html(second, "cloud-tokens")
    assert "750 of 1,000 available" in " ".join(card_html(second, "cloud-tokens").split()).replace(
        "<strong>", "").replace("</strong>", "")
    assert card_html(second, "asset-pool") == card_html(first, "asset-pool")  # unchanged card, same HTML


def test_home_returns_to_the_team_opened_last_even_seconds_apart(client, world):
    user = world["members"]["primary_admin"]
    MembershipFactory(team=world["other"], user=user, role=Role.SECONDARY_ADMIN)
    client.force_login(user)
    for team in (world["team"], world["other"], world["team"]):
        assert client.get(dashboard_url(team)).status_code == 200
        assert client.get(reverse("home"))["Location"] == dashboard_url(team)
    # Reloading the same dashboard writes nothing new within a few minutes.
    seen = Membership.objects.get(user=user, team=world["team"]).last_seen_at
    client.get(dashboard_url(world["team"]))
    assert Membership.objects.get(user=user, team=world["team"]).last_seen_at == seen


@pytest.mark.parametrize("value, shown", [(0, "0"), (999, "999"), (1000, "1,000"), (-1234567, "-1,234,567"),
                                          (10**15, "1,000,000,000,000,000"), ("1234", "1,234"), (None, "None")])
def test_thousands_filter_matches_intcomma(value, shown):
    from django.contrib.humanize.templatetags.humanize import intcomma

    from products.templatetags.capacity import thousands

    assert thousands(value) == shown == str(intcomma(value))
