from __future__ import annotations

import os
import shutil
import time
import uuid

import pytest
from django.db import connection

from products.models import CapacityType
from teams.models import Role
from usage.actors import Actor

from .factories import MembershipFactory, ProductFactory, TeamFactory, UserFactory

# In CI every test that needs PostgreSQL, Redis or the browser must run: a skip fails.
REQUIRE_ALL = os.environ.get("REQUIRE_SERVICES") == "1"


def _skip_or_fail(reason: str) -> None:
    if REQUIRE_ALL:
        pytest.fail(f"REQUIRE_SERVICES=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture
def require_postgres(db):
    if connection.vendor != "postgresql":
        _skip_or_fail("needs PostgreSQL: set DATABASE_URL=postgres://...")


@pytest.fixture
def require_redis():
    url = os.environ.get("REDIS_URL")
    if not url:
        _skip_or_fail("needs Redis: set REDIS_URL=redis://...")
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001
        _skip_or_fail(f"Redis at {url} is not reachable: {exc}")
    return url


CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="session")
def chromium_path():
    if not (os.path.exists(CHROMIUM) and shutil.which(CHROMIUM)):
        _skip_or_fail(f"needs Debian's chromium at {CHROMIUM} (apt-get install -y chromium)")
    return CHROMIUM


def key() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def api_actor():
    return Actor.system("test")


@pytest.fixture
def world(db):
    """A small fixed world: a team with every role, an outsider, and a second team."""
    team = TeamFactory(name="Acme", slug="acme")
    other = TeamFactory(name="Globex", slug="globex")
    members = {}
    for role in Role:
        m = MembershipFactory(team=team, role=role, user=UserFactory(username=role.value))
        members[role.value] = m.user
    outsider = UserFactory(username="outsider")
    MembershipFactory(team=other, role=Role.PRIMARY_ADMIN, user=outsider)
    tokens = ProductFactory(code="cloud-tokens", name="Cloud tokens", unit="tokens")
    pool = ProductFactory(code="asset-pool", name="Asset pool", unit="assets",
                          capacity_type=CapacityType.RETURNABLE)
    return {"team": team, "other": other, "members": members, "outsider": outsider, "tokens": tokens,
            "pool": pool}


@pytest.fixture
def one_window():
    """Start with at least 10 s left in the rate limit's one-minute window: a test that
    counts requests must not see its count reset by a new minute halfway."""
    left = 60 - time.time() % 60
    if left < 10:
        time.sleep(left + 0.05)


@pytest.fixture
def own_cache(settings, one_window):
    """A private in-memory cache, so rate-limit windows start empty (and no shared cache,
    e.g. Redis under CI, is ever flushed by a test)."""
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                                   "LOCATION": f"api-test-{key()}"}}
