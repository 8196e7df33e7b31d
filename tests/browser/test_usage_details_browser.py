"""Usage details and My usage in chromium: Plotly charts render from local plotly.js,
tabs swap with htmx and push the URL, no console errors, nothing leaves 127.0.0.1."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from usage.actors import Actor
from usage.services import job_refund, usage_checkout, usage_consume, usage_metered, usage_return

from ..conftest import key
from ..factories import ProductFactory, make_grant

LOCAL = "127.0.0.1"


@pytest.fixture
def history(world):
    team = world["team"]
    team.timezone = "America/New_York"
    team.save()
    team.__dict__.pop("tzinfo", None)
    actor = Actor.system("browser-test")
    now = timezone.now()
    start = now - timedelta(days=120)
    make_grant(team, world["tokens"], 50_000, starts_at=start, days=400, now=now)
    make_grant(team, world["pool"], 60, starts_at=start, days=400, now=now)
    api = ProductFactory(code="render-api", name="Rendering API", unit="units", metered=True, charge_unit_size=20,
                         raw_unit="processing minutes")
    make_grant(team, api, 5_000, starts_at=start, days=400, now=now)
    services = ["rendering", "simulation", "analysis", "optimization"]
    users = ["user@example.com", "primary_admin@example.com", "sso_admin@example.com"]
    for i in range(0, 100, 2):
        at = now - timedelta(days=i, hours=3)
        common = dict(team=team, actor=actor, occurred_at=at, now=at)
        usage_consume(**common, product=world["tokens"], quantity=40 + (i * 37) % 120, idempotency_key=key(),
                      user=users[i % 3], service=services[(i // 2) % 4], job_id=f"job-{i}")
        usage_metered(**common, product=api, quantity=15 + (i * 13) % 90, idempotency_key=key(),
                      user=users[(i + 1) % 3], service="render-api")
        if i % 10 == 0:
            job_refund(team=team, job_id=f"job-{i}", idempotency_key=key(), actor=actor, now=at + timedelta(hours=1))
    for n, i in enumerate(range(60, 0, -3)):
        at = now - timedelta(days=i, hours=5)
        usage_checkout(team=team, product=world["pool"], quantity=1 + n % 4, checkout_id=f"c{n}",
                       idempotency_key=key(), actor=actor, user=users[n % 3], service=services[n % 4],
                       occurred_at=at, now=at)
        if n % 3:
            back = at + timedelta(days=1)
            usage_return(team=team, product=world["pool"], quantity=1, checkout_id=f"c{n}", idempotency_key=key(),
                         actor=actor, occurred_at=back, now=back)
    world["api"] = api
    return world


def chart_ready(page, selector="#usage-chart"):
    page.wait_for_selector(f"{selector} .main-svg", state="attached")
    page.wait_for_function(
        "sel => { const el = document.querySelector(sel); return el && el.classList.contains('js-plotly-plot')"
        " && el.querySelectorAll('.trace').length > 0; }",
        arg=selector,
    )


def assert_clean(page_log):
    assert page_log.errors == [], page_log.errors
    assert page_log.hosts <= {LOCAL}, page_log.hosts
    assert not page_log.blocked


def test_details_page_renders_plotly_and_swaps_tabs_with_htmx(history, page, page_log, login, live_server,
                                                             screenshot):
    login(page, "primary_admin")
    page.goto(f"{live_server.url}/teams/acme/products/cloud-tokens/")
    chart_ready(page)
    assert page.locator("#usage-chart .plotly").count() >= 1
    assert page.locator("#usage-chart .trace.bars").count() >= 1
    # plotly.js came from our own static files.
    urls = [u for _, u, _ in page_log.requests]
    assert any(u.endswith("/static/vendor/plotly/plotly.min.js") for u in urls)
    header = page.locator(".usage-summary")
    assert header.get_attribute("data-product") == "cloud-tokens"
    screenshot(page, "usage-details-tokens-daily")

    # Hover shows a tooltip with units.
    box = page.locator("#usage-chart .nsewdrag").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.6)
    page.wait_for_function(
        "() => (document.querySelector('#usage-chart .hoverlayer') || {}).textContent.includes('tokens')"
    )

    # Weekly tab: an htmx swap (no full load), URL pushed, chart redrawn.
    loads = []
    page.on("load", lambda _: loads.append(1))
    page.get_by_role("link", name="Weekly").click()
    page.wait_for_selector('#usage-panel[data-granularity="week"]')
    chart_ready(page)
    assert "granularity=week" in page.url
    assert loads == []
    screenshot(page, "usage-details-tokens-weekly")

    page.get_by_role("link", name="Last 12 months").click()
    page.wait_for_url("**range=12m**")
    chart_ready(page)
    page.get_by_role("link", name="Monthly").click()
    page.wait_for_url("**granularity=month**")
    chart_ready(page)

    page.get_by_role("link", name="By service").click()
    page.wait_for_selector('#usage-panel[data-view="service"]')
    chart_ready(page)
    assert "view=service" in page.url
    assert page.locator("#usage-panel table tbody tr").count() == 4
    screenshot(page, "usage-details-tokens-by-service")

    page.get_by_role("link", name="By user").click()
    page.wait_for_selector('#usage-panel[data-view="user"]')
    chart_ready(page)
    assert page.locator("#usage-panel tbody").inner_text().count("@example.com") == 3

    # Back button restores the previous view.
    page.go_back()
    page.wait_for_selector('#usage-panel[data-view="service"]')
    chart_ready(page)  # drawn again from its JSON, interactive
    assert page.locator("#usage-chart .main-svg").count() >= 1
    assert loads == []
    assert_clean(page_log)


def test_returnable_metered_and_empty_range(history, page, page_log, login, live_server, screenshot):
    login(page, "primary_admin")
    page.goto(f"{live_server.url}/teams/acme/products/asset-pool/")
    chart_ready(page)
    assert page.get_by_role("link", name="Weekly").count() == 0
    screenshot(page, "usage-details-pool")

    page.goto(f"{live_server.url}/teams/acme/products/render-api/?range=month")
    chart_ready(page)
    legend = page.locator("#usage-chart .legend").text_content()
    assert "Raw usage (processing minutes)" in legend and "Consumed (units)" in legend
    screenshot(page, "usage-details-render-api")

    # Custom range with nothing in it: an empty state, no chart, no error.
    page.fill('input[name="from"]', "2020-01-01")
    page.fill('input[name="to"]', "2020-01-31")
    page.get_by_role("button", name="Apply").click()
    page.wait_for_selector(".chart-empty")
    assert "range=custom" in page.url
    assert page.locator("#usage-chart").count() == 0
    screenshot(page, "usage-details-empty")

    # A bad custom range: a clear message in the panel.
    page.fill('input[name="from"]', "2026-03-01")
    page.fill('input[name="to"]', "2026-02-01")
    page.get_by_role("button", name="Apply").click()
    page.wait_for_selector("#usage-panel .form-error")
    assert "on or before" in page.locator("#usage-panel .form-error").inner_text()
    assert_clean(page_log)


def test_phone_layout_fits_the_screen(history, phone_page, page_log, login, live_server, screenshot):
    login(phone_page, "primary_admin")
    phone_page.goto(f"{live_server.url}/teams/acme/products/cloud-tokens/")
    chart_ready(phone_page)
    width = phone_page.evaluate("document.documentElement.scrollWidth")
    assert width <= phone_page.viewport_size["width"]
    chart_width = phone_page.locator("#usage-chart .main-svg").first.bounding_box()["width"]
    assert chart_width <= phone_page.viewport_size["width"]
    screenshot(phone_page, "usage-details-phone")
    assert_clean(page_log)


def test_my_usage_for_a_plain_user(history, page, page_log, login, live_server, screenshot):
    login(page, "user")
    page.goto(f"{live_server.url}/teams/acme/my-usage/")
    chart_ready(page, "#my-chart-cloud-tokens")
    text = page.locator("main").inner_text()
    assert "primary_admin@example.com" not in text and "sso_admin@example.com" not in text
    screenshot(page, "my-usage-user")
    # The admin-only details page is refused.
    response = page.goto(f"{live_server.url}/teams/acme/products/cloud-tokens/")
    assert response.status == 403
    page_log.console_errors.clear()  # chromium logs the 403 document load itself
    assert_clean(page_log)


def test_tabs_work_without_javascript(history, browser, live_server, login):
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    hosts = set()
    page.on("request", lambda r: hosts.add(r.url.split("/")[2].split(":")[0]))
    try:
        login(page, "primary_admin")
        page.goto(f"{live_server.url}/teams/acme/products/cloud-tokens/")
        page.get_by_role("link", name="Weekly").click()
        page.wait_for_load_state()
        assert "granularity=week" in page.url
        assert page.locator('#usage-panel[data-granularity="week"]').count() == 1
        assert "-W" in page.locator("#usage-panel table").inner_text()
        page.get_by_role("link", name="By user").click()
        page.wait_for_load_state()
        assert page.locator('#usage-panel[data-view="user"]').count() == 1
        page.fill('input[name="from"]', "2026-01-01")
        page.fill('input[name="to"]', "2026-01-31")
        page.get_by_role("button", name="Apply").click()
        page.wait_for_load_state()
        assert "range=custom" in page.url and "from=2026-01-01" in page.url
    finally:
        context.close()
    assert hosts <= {LOCAL}
