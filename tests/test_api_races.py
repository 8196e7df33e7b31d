"""Races on PostgreSQL with real threads: no overdraft, one write per key, one refund per job.

Each scenario runs at the service level and through the API (django.test.Client per
thread). Every thread closes its own database connection at the end.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection, connections
from django.test import Client

from products.models import Lot
from products.selectors import product_balance
from teams.services import api_key_create
from usage.actors import Actor
from usage.errors import IdempotencyConflict, InsufficientBalance
from usage.models import Event, Kind, LedgerEntry
from usage.services import job_refund, usage_consume

from .conftest import key
from .factories import make_grant

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres]

THREADS = 32


def run_threads(fn, n: int) -> list:
    """Run fn(i) for i in range(n) on THREADS threads released together."""
    barrier = threading.Barrier(min(n, THREADS))

    def call(i):
        try:
            if i < THREADS:
                barrier.wait(timeout=30)
            return fn(i)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        return list(pool.map(call, range(n)))


def ledger_consistent() -> bool:
    for lot in Lot.objects.all():
        deltas = sum(LedgerEntry.objects.filter(lot=lot).values_list("delta", flat=True))
        if lot.quantity + deltas != lot.remaining or not 0 <= lot.remaining <= lot.quantity:
            return False
    return True


def post(raw_key: str, path: str, body: dict):
    response = Client().post("/api/v1" + path, json.dumps(body), content_type="application/json",
                             headers={"Authorization": f"Bearer {raw_key}"})
    return response.status_code, response.json(), response.get("Idempotent-Replayed")


@pytest.fixture
def setup(world, require_postgres, settings):
    settings.API_RATE_LIMIT_PER_MINUTE = 0
    team, tokens = world["team"], world["tokens"]
    make_grant(team, tokens, 150)
    _, raw = api_key_create(team=team, name="race")
    return team, tokens, raw


def test_service_200_consumes_against_150(setup):
    team, tokens, _ = setup
    actor = Actor.system("race")

    def consume(i):
        try:
            return usage_consume(team=team, product=tokens, quantity=1, idempotency_key=f"svc-{i}",
                                 actor=actor).status_code
        except InsufficientBalance:
            return 409

    statuses = run_threads(consume, 200)
    assert statuses.count(201) == 150 and statuses.count(409) == 50
    assert product_balance(team, tokens).available == 0
    assert LedgerEntry.objects.filter(kind=Kind.CONSUME).count() == 150
    assert ledger_consistent()


def test_api_200_consumes_against_150(setup):
    team, tokens, raw = setup

    def consume(i):
        status, body, _ = post(raw, "/usage", {"product": "cloud-tokens", "kind": "consume", "quantity": 1,
                                               "idempotency_key": f"api-{i}"})
        return status, body

    results = run_threads(consume, 200)
    statuses = [s for s, _ in results]
    assert statuses.count(201) == 150, statuses
    assert statuses.count(409) == 50
    assert {b["error"]["code"] for s, b in results if s == 409} == {"insufficient_balance"}
    assert sorted(b["available"] for s, b in results if s == 201) == list(range(150))
    assert product_balance(team, tokens).available == 0
    assert ledger_consistent()


def test_service_one_key_32_times_writes_once(setup):
    team, tokens, _ = setup
    actor = Actor.system("race")
    k = key()

    def consume(i):
        try:
            out = usage_consume(team=team, product=tokens, quantity=3, idempotency_key=k, actor=actor)
            return out.status_code, out.body, out.replayed
        except IdempotencyConflict:
            return 409, None, False

    results = run_threads(consume, THREADS)
    ok = [r for r in results if r[0] == 201]
    assert len(ok) + sum(1 for r in results if r[0] == 409) == THREADS
    assert len({json.dumps(body, sort_keys=True) for _, body, _ in ok}) == 1
    assert sum(1 for r in ok if not r[2]) == 1  # one writer, the rest replayed
    assert LedgerEntry.objects.filter(kind=Kind.CONSUME).count() == 1
    assert Event.objects.filter(key=k).count() == 1
    assert product_balance(team, tokens).available == 147


def test_api_one_key_32_times_writes_once(setup):
    team, tokens, raw = setup
    body = {"product": "cloud-tokens", "kind": "consume", "quantity": 3, "idempotency_key": key()}
    results = run_threads(lambda i: post(raw, "/usage", body), THREADS)
    statuses = [s for s, _, _ in results]
    assert 500 not in statuses
    assert set(statuses) <= {201, 409}
    bodies = {json.dumps(b, sort_keys=True) for s, b, _ in results if s == 201}
    assert len(bodies) == 1
    assert sum(1 for s, _, replayed in results if s == 201 and replayed != "true") == 1
    assert LedgerEntry.objects.filter(kind=Kind.CONSUME).count() == 1
    assert product_balance(team, tokens).available == 147


def test_32_concurrent_refunds_of_one_job_refund_once(setup):
    team, tokens, raw = setup
    actor = Actor.system("race")
    for n in (10, 20):
        usage_consume(team=team, product=tokens, quantity=n, idempotency_key=key(), actor=actor, job_id="job-r")
    results = run_threads(lambda i: post(raw, "/jobs/job-r/refund", {"idempotency_key": f"r-{i % 2}"}), THREADS)
    assert {s for s, _, _ in results} == {200}
    assert sum(b["refunded"] for s, b, replayed in results if replayed != "true") == 30
    assert LedgerEntry.objects.filter(kind=Kind.REFUND).count() == 2
    assert product_balance(team, tokens).available == 150
    assert ledger_consistent()

    # and at the service level, with a fresh job
    usage_consume(team=team, product=tokens, quantity=7, idempotency_key=key(), actor=actor, job_id="job-s")
    outs = run_threads(lambda i: job_refund(team=team, job_id="job-s", idempotency_key=f"s-{i}", actor=actor),
                       THREADS)
    assert sum(o.body["refunded"] for o in outs) == 7
    assert product_balance(team, tokens).available == 150
    assert ledger_consistent()


def test_concurrent_batches_and_singles_share_one_balance(setup):
    """Batches lock their balances in a fixed order; singles interleave; no overdraft, no 500."""
    team, tokens, raw = setup

    def work(i):
        if i % 4 == 0:
            events = [{"product": "cloud-tokens", "kind": "consume", "quantity": 1, "idempotency_key": f"b{i}-{j}"}
                      for j in range(10)]
            status, body, _ = post(raw, "/usage/batch", {"events": events})
            assert status == 200
            return [r["status"] for r in body["results"]]
        status, _, _ = post(raw, "/usage", {"product": "cloud-tokens", "kind": "consume", "quantity": 1,
                                            "idempotency_key": f"s{i}"})
        return [status]

    statuses = [s for group in run_threads(work, 64) for s in group]
    assert 500 not in statuses
    assert statuses.count(201) == 150
    assert product_balance(team, tokens).available == 0
    assert connection.vendor == "postgresql"
    assert ledger_consistent()



def test_fast_path_stamps_ledger_rows_after_waiting_for_the_lock(require_postgres):
    """recorded_at is stamped when the row is written (after any lock wait), as on the
    Python path: ids keep growing with recorded_at for the periodic 'recorded since' scans."""
    import time
    from datetime import timedelta

    from django.db import transaction
    from django.utils import timezone

    from products.models import TeamProduct

    from .factories import ProductFactory, TeamFactory

    team, product = TeamFactory(), ProductFactory()
    make_grant(team, product, 100)
    usage_consume(team=team, product=product, quantity=1, idempotency_key="warm", actor=Actor.system("t"))
    locked = threading.Event()

    def hold_lock():
        try:
            with transaction.atomic():
                TeamProduct.objects.select_for_update().get(team=team, product=product)
                locked.set()
                time.sleep(0.6)
        finally:
            connection.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    assert locked.wait(10)
    started = timezone.now()
    outcome = usage_consume(team=team, product=product, quantity=1, idempotency_key="waited",
                            actor=Actor.system("t"))
    holder.join(10)
    entry = LedgerEntry.objects.get(event_id=outcome.event_id)
    assert entry.recorded_at - started >= timedelta(seconds=0.4)


def test_a_key_being_marked_used_does_not_hold_up_its_other_requests(world, require_postgres):
    """The once-a-minute last_used_at write keeps the key's row locked until its request
    commits (a consume: until the write is done). Other requests of the same key skip
    that write instead of queueing behind it."""
    from datetime import timedelta

    from django.db import transaction
    from django.utils import timezone

    from teams.models import ApiKey

    make_grant(world["team"], world["tokens"], 100)
    raw = api_key_create(team=world["team"], name="busy")[1]
    stale = timezone.now() - timedelta(minutes=5)
    ApiKey.objects.filter(hashed_key=ApiKey.hash(raw)).update(last_used_at=stale)
    locked, release = threading.Event(), threading.Event()

    def hold_the_key_row():
        try:
            with transaction.atomic():
                ApiKey.objects.select_for_update(no_key=True).get(hashed_key=ApiKey.hash(raw))
                locked.set()
                release.wait(timeout=30)
        finally:
            connections.close_all()

    holder = threading.Thread(target=hold_the_key_row)
    holder.start()
    try:
        assert locked.wait(timeout=10)
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '3s'")  # waiting would fail the request (503), not hang
        status, body, _ = post(raw, "/usage", {"product": "cloud-tokens", "kind": "consume", "quantity": 1,
                                               "idempotency_key": key()})
        assert status == 201, body
        response = Client().get("/api/v1/balances", headers={"Authorization": f"Bearer {raw}"})
        assert response.status_code == 200, response.content
    finally:
        release.set()
        holder.join(timeout=30)
        with connection.cursor() as cursor:
            cursor.execute("RESET lock_timeout")
    assert ApiKey.objects.get(hashed_key=ApiKey.hash(raw)).last_used_at == stale  # skipped, not waited for
