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
    now = datetime.now(UTC)
    window = int(now.timestamp() // 60)
    hashes = [ApiKey.hash(key()) for _ in range(3)]
    for h, w in zip(hashes, (window, window - 1, window - 2), strict=True):
        count(h, w)
    assert periodic.api_rates_prune(now=now) >= 1  # (with ours, any other test's old windows)
    assert [bool(stored(h)) for h in hashes] == [True, True, False]
    assert periodic.api_rates_prune(now=now) == 0


def test_the_prune_task_deletes_old_windows(require_postgres):
    old = ApiKey.hash(key())
    count(old, 1000)
    assert tasks.api_rates_prune.delay().get() >= 1
    assert stored(old) == []


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
    again = consume()  # (already at the limit: counted and refused before anything else)
    assert again.status_code == 429 and not again.lane
    assert stored(ApiKey.hash(raw))[0][1] == 6
    assert LedgerEntry.objects.filter(kind=Kind.CONSUME).count() == 3
    bad = f"cp_nope{key()}"
    for _ in range(6):
        assert consume(token=bad).status_code == 401
    assert stored(ApiKey.hash(bad))[0][1] == 6


def _backend_waits_on_a_lock(pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid])
        row = cursor.fetchone()
    return bool(row) and row[0] == "Lock"


@pytest.mark.django_db(transaction=True)
def test_a_consume_waiting_for_its_balance_holds_no_lock_on_the_keys_counter(require_postgres, world, settings):
    """Counted last (usage.0010): while a consume waits for a balance another transaction
    holds, the key's counter row is free, so the key's other requests do not queue behind it."""
    from products.models import TeamProduct

    settings.API_RATE_LIMIT_PER_MINUTE = 100
    team = world["team"]
    make_grant(team, world["tokens"], 100)
    raw = api_key_create(team=team, name="rate")[1]
    key_hash = ApiKey.hash(raw)
    count(key_hash, int(time.time() // 60))  # the key has a counter row
    holder_ready, release = threading.Event(), threading.Event()
    consumer_pid = []

    def hold_the_balance():
        try:
            from django.db import transaction

            with transaction.atomic():
                TeamProduct.objects.select_for_update().get(team=team, product=world["tokens"])
                holder_ready.set()
                release.wait(timeout=30)
        finally:
            connections.close_all()

    def consume():
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                consumer_pid.append(cursor.fetchone()[0])
            body = {"product": "cloud-tokens", "kind": "consume", "quantity": 1, "idempotency_key": key()}
            return through_lane("POST", "/api/v1/usage", json.dumps(body), headers={"Authorization": f"Bearer {raw}"})
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=2) as pool:
        holder = pool.submit(hold_the_balance)
        assert holder_ready.wait(timeout=30)
        consumer = pool.submit(consume)
        try:
            for _ in range(300):
                if consumer_pid and _backend_waits_on_a_lock(consumer_pid[0]):
                    break
                time.sleep(0.02)
            else:
                pytest.fail("the consume never waited for the balance")
            with connection.cursor() as cursor:  # raises if the counter row were locked
                cursor.execute("SELECT n FROM usage_apirate WHERE key_hash = %s FOR UPDATE NOWAIT", [key_hash])
                assert cursor.fetchone() == (1,)
        finally:
            release.set()
        response = consumer.result(timeout=30)
        holder.result(timeout=30)
    assert response.status_code == 201 and response.lane
    assert stored(key_hash)[0][1] == 2


@pytest.mark.django_db(transaction=True)
def test_concurrent_consumes_never_pass_the_limit(require_postgres, world):
    """16 consumes of one key at once against a limit of 5: exactly 5 are written; the rest
    are refused, counted either before anything else or last and rolled back."""
    from usage import fastpath
    from usage.errors import UsageError

    team = world["team"]
    make_grant(team, world["tokens"], 1000)
    key_hash = ApiKey.hash(api_key_create(team=team, name="rate")[1])
    window = int(time.time() // 60)
    barrier = threading.Barrier(16)

    def one(i):
        rate = fastpath.RateCount(window=window, limit=5)
        data = usage_api.UsageIn.model_validate(
            {"product": "cloud-tokens", "kind": "consume", "quantity": 1, "idempotency_key": key()})
        try:
            barrier.wait(timeout=30)
            try:
                usage_api.consume_with_key(key_hash, data, rate=rate)
                return "ok", rate.count
            except fastpath.OverLimit:
                return "over", rate.count
            except UsageError as exc:
                return type(exc).__name__, rate.count
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(one, range(16)))
    assert sorted(r[0] for r in results).count("ok") == 5, results
    assert {r[0] for r in results} <= {"ok", "over"}, results
    assert LedgerEntry.objects.filter(kind=Kind.CONSUME).count() == 5
    counted_here = sum(1 for r in results if r[1] is not None)  # the others were rolled back
    assert stored(key_hash)[0][1] == counted_here
