"""The API's per-key rate count on PostgreSQL (migration usage.0009): exact under real
threads, one count per request whichever path answers it, no clock that restarts a key's
minute, and the hourly prune. (tests/test_api.py holds the limit's answers: 429, 401 first,
Retry-After, 0 = unlimited.)"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
from django.db import connection, connections

from teams.models import ApiKey
from teams.services import api_key_create
from usage import api as usage_api
from usage import periodic, tasks
from usage.models import Kind, LedgerEntry

from .conftest import key
from .factories import make_grant
from .lane import through_lane

pytestmark = pytest.mark.postgres


def count(key_hash: str, window: int) -> int:
    return usage_api._count_in_database(key_hash, window)


def stored(key_hash: str) -> list[tuple[int, int]]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT win, n FROM usage_apirate WHERE key_hash = %s", [key_hash])
        return cursor.fetchall()


@pytest.mark.django_db(transaction=True)
def test_counts_are_exact_under_concurrent_requests(require_postgres):
    """16 threads on their own connections, 25 counts each, released together: every count
    from 1 to 400 is handed out exactly once (the row's lock orders them)."""
    key_hash, window = ApiKey.hash(key()), int(time.time() // 60)
    barrier = threading.Barrier(16)

    def worker(_):
        try:
            barrier.wait(timeout=30)
            return [count(key_hash, window) for _ in range(25)]
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=16) as pool:
        counts = [n for chunk in pool.map(worker, range(16)) for n in chunk]
    assert sorted(counts) == list(range(1, 401))
    assert stored(key_hash) == [(window, 400)]


def test_a_new_window_starts_at_one_and_an_older_one_counts_into_the_newer(require_postgres):
    key_hash = ApiKey.hash(key())
    assert [count(key_hash, 1000) for _ in range(3)] == [1, 2, 3]
    assert count(key_hash, 1001) == 1  # the next minute
    # A server whose clock is behind still counts into the key's current minute, never restarts it.
    assert count(key_hash, 1000) == 2
    assert stored(key_hash) == [(1001, 2)]


def test_the_prune_keeps_the_last_minute_only(require_postgres):
    now = datetime(2026, 11, 30, 12, 0, 30, tzinfo=UTC)
    window = int(now.timestamp() // 60)
    hashes = [ApiKey.hash(key()) for _ in range(3)]
    for h, w in zip(hashes, (window, window - 1, window - 2), strict=True):
        count(h, w)
    assert periodic.api_rates_prune(now=now) == 1
    assert [bool(stored(h)) for h in hashes] == [True, True, False]
    assert periodic.api_rates_prune(now=now) == 0
    assert tasks.api_rates_prune.delay().get() >= 0  # the scheduled task runs it


@pytest.mark.django_db(transaction=True)
def test_lane_consumes_count_once_each_whatever_answers_them(require_postgres, world, settings, one_window):
    """Through the consume lane: a consume counts in its own statement; a refusal (rolled
    back there) is counted by Django; a request over the limit is refused 429 and counted
    once; a bad key over the limit is still 401."""
    settings.API_RATE_LIMIT_PER_MINUTE = 4
    team = world["team"]
    make_grant(team, world["tokens"], 100)
    raw = api_key_create(team=team, name="rate")[1]

    def consume(quantity=1, token=raw):
        body = {"product": "cloud-tokens", "kind": "consume", "quantity": quantity, "idempotency_key": key()}
        return through_lane("POST", "/api/v1/usage", json.dumps(body), headers={"Authorization": f"Bearer {token}"})

    first = consume()
    assert first.status_code == 201 and first.lane
    refused = consume(quantity=10**6)
    assert refused.status_code == 409 and not refused.lane
    assert [r.status_code for r in (consume(), consume())] == [201, 201]
    over = consume()
    assert over.status_code == 429 and not over.lane and over.json()["error"]["code"] == "rate_limited"
    assert stored(ApiKey.hash(raw))[0][1] == 5  # four answered, one refused: five counts
    assert LedgerEntry.objects.filter(kind=Kind.CONSUME).count() == 3
    for _ in range(6):
        assert consume(token="cp_nope").status_code == 401
    assert stored(ApiKey.hash("cp_nope"))[0][1] == 6
