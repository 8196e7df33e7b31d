"""capacity_portal.cache.RedisCache: Django's Redis backend with one client per pool and a
one-round-trip counter (the API's rate limit). Needs Redis."""

from __future__ import annotations

import threading
import uuid

import pytest

from capacity_portal import cache as capacity_cache
from capacity_portal.cache import RedisCache

pytestmark = pytest.mark.redis


@pytest.fixture
def rcache(require_redis):
    cache = RedisCache(require_redis, {"KEY_PREFIX": f"test-cache-{uuid.uuid4().hex}"})
    yield cache
    client = cache._cache.get_client(write=True)
    for name in client.scan_iter(f"{cache.key_prefix}:*"):
        client.delete(name)


def test_count_starts_at_one_and_expires_from_its_first_count(rcache):
    assert rcache.count("window", 120) == 1
    client = rcache._cache.get_client(write=True)
    stored = rcache.make_key("window")
    ttl = client.ttl(stored)
    assert 0 < ttl <= 120
    client.expire(stored, 30)  # later counts must not extend it again
    assert rcache.count("window", 120) == 2
    assert rcache.count("window", 120) == 3
    assert 0 < client.ttl(stored) <= 30
    assert rcache.get("window") == 3  # the same key Django's get/incr see


@pytest.mark.parametrize("timeout", [None, 0, -1, 1.5])
def test_count_refuses_a_counter_that_would_never_expire_or_vanish_at_once(rcache, timeout):
    with pytest.raises(ValueError):
        rcache.count("window", timeout)
    assert rcache.get("window") is None


def test_count_survives_a_server_that_forgot_its_scripts(rcache):
    # A restarted or flushed Redis no longer knows the script's digest: the count still
    # happens once, and the script is known again afterwards.
    client = rcache._cache.get_client(write=True)
    assert rcache.count("window", 60) == 1
    client.script_flush()
    assert rcache.count("window", 60) == 2
    assert client.script_exists(capacity_cache._COUNT_SHA) == [True]
    assert rcache.count("window", 60) == 3


def test_count_is_exact_under_concurrency(rcache):
    seen = []

    def hit():
        for _ in range(50):
            seen.append(rcache.count("busy", 60))

    threads = [threading.Thread(target=hit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == list(range(1, 401))  # every count exactly once: no lost update


def test_one_client_per_pool_and_django_semantics_unchanged(rcache):
    inner = rcache._cache
    assert inner.get_client(write=True) is inner.get_client(write=True)
    assert inner.get_client() is inner.get_client(write=True)  # one server: reads use the same pool
    with pytest.raises(ValueError):
        rcache.incr("missing")
    rcache.set("n", 5)
    assert rcache.incr("n") == 6
    assert rcache.add("n", 1) is False
    rcache.set_many({"a": {"x": 1}, "b": "text"})
    assert rcache.get_many(["a", "b", "c"]) == {"a": {"x": 1}, "b": "text"}
    rcache.delete("a")
    assert rcache.get("a") is None



def test_count_reconnects_when_the_server_dropped_its_connection(rcache):
    """The counter keeps its own connection; a server restart or an idle timeout closes
    it under us: the next count reconnects and counts exactly once."""
    assert rcache.count("window", 60) == 1
    connection = rcache._cache._counter.connection
    host, port = connection._sock.getsockname()[:2]
    admin = rcache._cache.get_client(write=True)
    assert admin.client_kill_filter(addr=f"{host}:{port}") == 1
    assert rcache.count("window", 60) == 2
    assert rcache.get("window") == 2


def test_count_uses_one_connection_per_thread(rcache):
    rcache.count("window", 60)
    mine = rcache._cache._counter.connection
    theirs = []
    thread = threading.Thread(target=lambda: (rcache.count("window", 60), theirs.append(rcache._cache._counter.connection)))
    thread.start()
    thread.join()
    assert theirs and theirs[0] is not mine
    rcache.count("window", 60)
    assert rcache._cache._counter.connection is mine and rcache.get("window") == 3
