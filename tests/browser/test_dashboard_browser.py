"""The dashboard in a real browser: sign in, switch team, red and green cards, usage details
link, live refresh while visible (and none while hidden), phone layout, keyboard focus."""

from __future__ import annotations

import re
import time

import pytest

from products.models import Refresh
from teams.models import Role
from usage.actors import Actor
from usage.services import usage_consume

from ..conftest import key
from ..factories import MembershipFactory, ProductFactory, make_grant

pytestmark = pytest.mark.browser

RED = "rgb(180, 35, 24)"    # --low
GREEN = "rgb(31, 122, 58)"  # --ok


def consume(team, product, quantity):
    usage_consume(team=team, product=product, quantity=quantity, idempotency_key=key(),
                  actor=Actor.system("browser-test"), service="rendering")


@pytest.fixture
def acme(world):
    """Acme: cloud tokens at 15% (red), asset pool full (green); Globex with one product."""
    team, tokens, pool = world["team"], world["tokens"], world["pool"]
    make_grant(team, tokens, 10_000)
    consume(team, tokens, 8_500)
    make_grant(team, pool, 150)
    make_grant(world["other"], tokens, 500)
    return world


def test_sign_in_switch_team_cards_and_details(page, page_log, login, live_server, acme, screenshot):
    from playwright.sync_api import expect

    base = live_server.url
    admin = acme["members"]["primary_admin"]
    MembershipFactory(team=acme["other"], user=admin, role=Role.SECONDARY_ADMIN)

    login(page, "primary_admin")
    # Admin of two teams, none opened yet: the team picker.
    expect(page).to_have_url(f"{base}/teams/")
    screenshot(page, "picker-desktop")
    page.locator('a[data-team="acme"]').click()
    expect(page).to_have_url(f"{base}/teams/acme/")

    tokens = page.locator('[data-product="cloud-tokens"]')
    pool = page.locator('[data-product="asset-pool"]')
    expect(tokens).to_have_attribute("data-status", "low")
    expect(tokens).to_have_attribute("data-available", "1500")
    expect(tokens).to_have_attribute("data-total", "10000")
    expect(tokens).to_contain_text("1,500 of 10,000 available")
    expect(tokens).to_contain_text("85.0% used")
    expect(tokens).to_contain_text("Low balance")  # not colour alone
    expect(pool).to_have_attribute("data-status", "ok")
    expect(pool).to_contain_text("150 of 150 available")
    expect(pool).to_contain_text("Returnable")
    border = "el => getComputedStyle(el).borderTopColor"
    assert tokens.evaluate(border) == RED
    assert pool.evaluate(border) == GREEN
    bar = tokens.get_by_role("progressbar")
    expect(bar).to_have_attribute("aria-valuenow", "1500")
    expect(bar).to_have_attribute("aria-valuemax", "10000")
    assert "repeating-linear-gradient" in tokens.locator(".bar-fill").evaluate(
        "el => getComputedStyle(el).backgroundImage")  # red bars are striped too
    screenshot(page, "dashboard-desktop")

    # Switch team with htmx: the URL changes, the page does not reload.
    page.evaluate("window.__sameDocument = true")
    page.get_by_text("Switch team").click()
    globex = page.locator('.team-switch a[data-team="globex"]')
    expect(globex).to_have_attribute("href", "/teams/globex/")  # works without JavaScript too
    globex.click()
    expect(page).to_have_url(f"{base}/teams/globex/")
    expect(page.get_by_role("heading", level=1)).to_have_text("Globex")
    expect(page).to_have_title(re.compile("^Globex"))
    expect(page.locator('[data-product="cloud-tokens"]')).to_have_attribute("data-total", "500")
    assert page.evaluate("window.__sameDocument") is True
    screenshot(page, "dashboard-switched")

    # Back button: htmx restores the previous team.
    page.go_back()
    expect(page).to_have_url(f"{base}/teams/acme/")
    expect(page.get_by_role("heading", level=1)).to_have_text("Acme")

    # Follow "View usage details".
    details = page.locator('[data-product="cloud-tokens"]').get_by_role("link", name=re.compile("View usage details"))
    expect(details).to_have_attribute("href", "/teams/acme/products/cloud-tokens/")
    with page.expect_response(lambda r: r.url == f"{base}/teams/acme/products/cloud-tokens/") as info:
        details.click()
    expect(page).to_have_url(f"{base}/teams/acme/products/cloud-tokens/")
    assert info.value.status == 200
    page.wait_for_load_state("networkidle")
    screenshot(page, "usage-details")
    errors = page_log.errors

    assert errors == []
    assert page_log.hosts == {"127.0.0.1"}


def test_live_refresh_only_while_visible(page, page_log, login, live_server, world, screenshot):
    from playwright.sync_api import expect

    team, tokens = world["team"], world["tokens"]
    make_grant(team, tokens, 1_000)
    # Let the test hide the tab: visibilityState is read through a switch it controls.
    page.add_init_script("""
        window.__visibility = 'visible';
        Object.defineProperty(Document.prototype, 'visibilityState', {configurable: true, get() { return window.__visibility; }});
        Object.defineProperty(Document.prototype, 'hidden', {configurable: true, get() { return window.__visibility !== 'visible'; }});
    """)
    login(page, "sso_admin")  # a single admin team: straight to its dashboard
    expect(page).to_have_url(f"{live_server.url}/teams/acme/")
    card = page.locator('[data-product="cloud-tokens"]')
    expect(card).to_have_attribute("data-available", "1000")

    def polls() -> int:
        return sum(1 for method, url, headers in page_log.requests
                   if url.endswith("/teams/acme/") and headers.get("hx-request") == "true")

    # Hidden tab: no polling at all, even past the 10 s interval.
    page.evaluate("window.__visibility = 'hidden'; document.dispatchEvent(new Event('visibilitychange'))")
    before = polls()
    consume(team, tokens, 100)
    page.wait_for_timeout(11_500)
    assert polls() == before
    expect(card).to_have_attribute("data-available", "1000")

    # Visible again: refreshed at once, without a reload.
    page.evaluate("window.__sameDocument = true")
    page.evaluate("window.__visibility = 'visible'; document.dispatchEvent(new Event('visibilitychange'))")
    expect(page.locator('[data-product="cloud-tokens"]')).to_have_attribute("data-available", "900", timeout=3_000)

    # And the regular poll picks up a new consumption within ~10 s.
    consume(team, tokens, 50)
    started = time.monotonic()
    expect(page.locator('[data-product="cloud-tokens"]')).to_have_attribute("data-available", "850", timeout=12_000)
    elapsed = time.monotonic() - started
    assert elapsed < 12
    assert page.evaluate("window.__sameDocument") is True
    expect(page.locator('[data-product="cloud-tokens"]')).to_contain_text("850 of 1,000 available")
    screenshot(page, "dashboard-live-refreshed")
    assert page_log.errors == []
    assert page_log.hosts == {"127.0.0.1"}
    print(f"live refresh: card updated {elapsed:.1f} s after the consumption")
    # Closing the page fires visibilitychange; with the switch still on "visible" that is a
    # refresh request racing the test database's teardown (SQLite: "table is locked").
    page.evaluate("window.__visibility = 'hidden'")
    page.wait_for_load_state("networkidle")


def test_phone_layout_is_one_column(phone_page, page_log, login, live_server, world, screenshot):
    from playwright.sync_api import expect

    team = world["team"]
    make_grant(team, world["tokens"], 60_000, refresh=Refresh.MONTHLY)
    make_grant(team, world["pool"], 150)
    make_grant(team, ProductFactory(code="render-api", name="Rendering API", unit="units"), 600)
    login(phone_page, "secondary_admin")
    expect(phone_page).to_have_url(f"{live_server.url}/teams/acme/")
    cards = phone_page.locator("[data-product]")
    expect(cards).to_have_count(3)
    boxes = [cards.nth(i).bounding_box() for i in range(3)]
    assert len({round(b["x"]) for b in boxes}) == 1, boxes  # stacked: one column
    assert boxes[0]["y"] < boxes[1]["y"] < boxes[2]["y"]
    assert phone_page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    screenshot(phone_page, "dashboard-phone")
    assert page_log.errors == []


def test_keyboard_focus_is_visible(page, login, live_server, acme, screenshot):
    login(page, "primary_admin")
    page.goto(f"{live_server.url}/teams/acme/")
    for _ in range(20):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "details-asset-pool":
            break
    else:
        pytest.fail("Tab never reached the first card's 'View usage details' link")
    outline = page.evaluate("(() => { const s = getComputedStyle(document.activeElement);"
                            " return [s.outlineStyle, s.outlineWidth]; })()")
    assert outline == ["solid", "3px"]
    screenshot(page, "keyboard-focus", full_page=False)


def test_sign_in_page_rejects_bad_password(page, page_log, live_server, world, screenshot):
    from playwright.sync_api import expect

    page.goto(f"{live_server.url}/teams/acme/")
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/teams/acme/"))
    page.get_by_label("Username").fill("primary_admin")
    page.get_by_label("Password").fill("wrong")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_be_visible()
    screenshot(page, "login-error")
    page.get_by_label("Password").fill("password")
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{live_server.url}/teams/acme/")  # back to where they were going
    assert page_log.errors == []


def test_poll_after_sign_out_opens_the_sign_in_page(page, login, live_server, world):
    from playwright.sync_api import expect

    make_grant(world["team"], world["tokens"], 100)
    login(page, "sso_admin")
    expect(page.locator('[data-product="cloud-tokens"]')).to_have_count(1)
    page.context.clear_cookies()  # the session ends (signed out in another tab, expired)
    page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")  # poll now
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/teams/acme/$"))
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    assert page.locator('#cards .auth').count() == 0  # not swapped into the card grid


def test_poll_after_losing_membership_shows_not_found(page, login, live_server, world):
    from playwright.sync_api import expect

    from teams.models import Membership

    make_grant(world["team"], world["tokens"], 100)
    login(page, "sso_admin")
    expect(page.locator('[data-product="cloud-tokens"]')).to_have_count(1)
    Membership.objects.filter(user=world["members"]["sso_admin"]).delete()
    with page.expect_response(lambda r: r.url.endswith("/teams/acme/") and r.request.resource_type == "document") as info:
        page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    assert info.value.status == 404
    expect(page.locator("[data-product]")).to_have_count(0)  # no stale balances left on screen
