"""Playwright (sync API) against pytest-django's live server, on Debian's /usr/bin/chromium.

Every page records its console errors and the host of every request; requests to any
host but 127.0.0.1 are aborted (the app must work offline: no CDN, no fonts, no beacons).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

# Playwright's sync API runs an asyncio loop in this thread; Django's ORM would otherwise
# refuse the test's own queries ("You cannot call this from an async context").
os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
# Serve the live server on 127.0.0.1 (not "localhost", which may resolve to ::1).
os.environ.setdefault("DJANGO_LIVE_TEST_SERVER_ADDRESS", "127.0.0.1")

LOCAL_HOST = "127.0.0.1"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


def pytest_collection_modifyitems(items):
    here = str(Path(__file__).parent)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.browser)


@dataclass
class PageLog:
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    hosts: set[str] = field(default_factory=set)
    blocked: list[str] = field(default_factory=list)
    requests: list[tuple[str, str, dict]] = field(default_factory=list)  # (method, url, headers)

    @property
    def errors(self) -> list[str]:
        return self.console_errors + self.page_errors


@pytest.fixture(scope="module")
def browser(chromium_path):
    # Module scope, not session: while Playwright is started, this thread has a running
    # asyncio loop, which later (non-browser) tests must not inherit.
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page_log():
    return PageLog()


def _new_page(browser, log: PageLog, viewport: dict):
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.set_default_timeout(10_000)
    page.on("console", lambda msg: log.console_errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: log.page_errors.append(str(exc)))

    def route(route, request):
        host = urlsplit(request.url).hostname or ""
        log.hosts.add(host)
        log.requests.append((request.method, request.url, request.headers))
        if host == LOCAL_HOST:
            route.continue_()
        else:
            log.blocked.append(request.url)
            route.abort()

    page.route("**/*", route)
    return context, page


@pytest.fixture
def page(browser, page_log, live_server):
    context, page = _new_page(browser, page_log, DESKTOP)
    yield page
    context.close()
    # Whatever the test asserted, nothing may have tried to leave the machine.
    assert not page_log.blocked, f"requests to other hosts: {page_log.blocked}"


@pytest.fixture
def phone_page(browser, page_log, live_server):
    context, page = _new_page(browser, page_log, PHONE)
    yield page
    context.close()
    assert not page_log.blocked, f"requests to other hosts: {page_log.blocked}"


@pytest.fixture
def screenshot():
    SCREENSHOTS.mkdir(exist_ok=True)

    def take(page, name: str, *, full_page: bool = True) -> Path:
        path = SCREENSHOTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        return path

    return take


@pytest.fixture
def login(live_server):
    def sign_in(page, username: str, password: str = "password") -> None:
        page.goto(f"{live_server.url}/accounts/login/")
        page.get_by_label("Username").fill(username)
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_load_state()

    return sign_in
