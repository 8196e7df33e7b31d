"""Faults: tasks run twice or concurrently, a worker dying mid-task, the broker down."""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from datetime import timedelta

import pytest
from django.core import mail
from django.db import DatabaseError, connection, transaction
from django.urls import reverse
from django.utils import timezone

from capacity_portal.celery import app
from products.models import Lot, Refresh, TeamProduct
from teams.models import ApiKey
from usage import alerts, periodic, tasks
from usage.actors import Actor
from usage.models import AlertState, Drift, Event, Kind, LedgerEntry, ReconciliationCheck
from usage.services import usage_consume

from .conftest import key
from .factories import make_grant

CLOSED_BROKER = "redis://127.0.0.1:6390/0"  # nothing listens there


def ledger_snapshot():
    return list(LedgerEntry.objects.order_by("id").values_list("kind", "delta", "lot_id", "grant_id", "occurred_at"))


def lots_snapshot():
    return list(Lot.objects.order_by("id").values_list("id", "remaining", "closed_at"))


def due_balance(world):
    """Two balances' worth of due work: an expired monthly period and a new one to create."""
    now = timezone.now()
    starts = now - timedelta(days=40)
    for product in (world["tokens"], world["pool"]):
        make_grant(world["team"], product, 100, refresh=Refresh.MONTHLY, starts_at=starts,
                   ends_at=starts + timedelta(days=365), now=starts + timedelta(hours=1))
    return TeamProduct.objects.get(team=world["team"], product=world["tokens"])


EXPECTED_KINDS = [Kind.GRANT, Kind.EXPIRE, Kind.REFRESH]


def kinds_of(tp):
    return list(LedgerEntry.objects.filter(team_id=tp.team_id, product_id=tp.product_id).order_by("id")
                .values_list("kind", flat=True))


# -- twice ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_every_task_twice_gives_the_same_ledger(world, django_capture_on_commit_callbacks):
    tp = due_balance(world)
    usage_consume(team=world["team"], product=world["tokens"], quantity=95, idempotency_key=key(),
                  actor=Actor.system())
    beat = [tasks.balances_refresh_due, tasks.rollups_verify_recent, tasks.ledger_reconcile,
            tasks.alerts_check_due, tasks.alerts_check_all, tasks.events_prune]
    with django_capture_on_commit_callbacks(execute=True):
        for task in beat:
            task.delay()
    ledger, lots, emails = ledger_snapshot(), lots_snapshot(), len(mail.outbox)
    assert kinds_of(tp) == [*EXPECTED_KINDS, Kind.CONSUME] and emails == 1
    states = list(AlertState.objects.values_list("key", "active", "times_fired"))
    with django_capture_on_commit_callbacks(execute=True):
        for task in beat:
            task.delay()
        tasks.balance_refresh.delay(tp.pk)
        tasks.alerts_check_team_product.delay(tp.pk)
    assert ledger_snapshot() == ledger and lots_snapshot() == lots
    assert len(mail.outbox) == emails
    assert list(AlertState.objects.values_list("key", "active", "times_fired")) == states
    assert not Drift.objects.exists()


# -- concurrently (PostgreSQL: real row locks) ----------------------------------------------


def run_in_threads(n, fn):
    barrier = threading.Barrier(n)
    errors = []

    def target():
        try:
            barrier.wait()
            fn()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=target) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.mark.django_db(transaction=True)
def test_concurrent_refresh_writes_each_row_once(require_postgres, world):
    tp = due_balance(world)
    assert run_in_threads(4, lambda: periodic.balance_refresh(team_product_id=tp.pk)) == []
    assert kinds_of(tp) == EXPECTED_KINDS
    assert [(lot.period_index, lot.remaining) for lot in Lot.objects.filter(product=tp.product)] == [(0, 0), (1, 100)]


@pytest.mark.django_db(transaction=True)
def test_concurrent_refresh_and_consume_keep_the_invariant(require_postgres, world):
    tp = due_balance(world)

    def consume():
        usage_consume(team=world["team"], product=world["tokens"], quantity=10, idempotency_key=key(),
                      actor=Actor.system())

    jobs = [lambda: periodic.balance_refresh(team_product_id=tp.pk), consume] * 3
    counter = iter(range(len(jobs)))
    lock = threading.Lock()

    def one():
        with lock:
            job = jobs[next(counter)]
        job()

    assert run_in_threads(len(jobs), one) == []
    assert sorted(kinds_of(tp)) == sorted([*EXPECTED_KINDS] + [Kind.CONSUME] * 3)
    run, ids = periodic.reconciliation_start()
    assert run_in_threads(3, lambda: [periodic.reconcile_balance(run_id=run.pk, team_product_id=i) for i in ids]) == []
    assert ReconciliationCheck.objects.filter(run=run).count() == len(ids)
    assert not Drift.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_concurrent_rollup_verify_and_prune(require_postgres, world):
    tp = due_balance(world)
    usage_consume(team=world["team"], product=world["tokens"], quantity=10, idempotency_key=key(),
                  actor=Actor.system())
    day = timezone.localdate(timezone.now(), world["team"].tzinfo)
    from usage.models import DailyRollup

    DailyRollup.objects.filter(team=world["team"], product=world["tokens"], day=day).update(consumed=1)
    assert run_in_threads(3, lambda: periodic.rollup_verify(team_product_id=tp.pk, first_day=day)) == []
    assert DailyRollup.objects.get(team=world["team"], product=world["tokens"], day=day).consumed == 10
    assert Drift.objects.filter(kind=Drift.Kind.ROLLUP).count() == 1
    old = [Event.objects.create(team=world["team"], key=f"old-{i}", fingerprint="x", operation="metered").pk
           for i in range(5)]
    Event.objects.filter(pk__in=old).update(created_at=timezone.now() - timedelta(days=400))
    kept = Event.objects.exclude(pk__in=old).count()
    assert run_in_threads(3, periodic.events_prune) == []
    assert Event.objects.count() == kept and not Event.objects.filter(pk__in=old).exists()


# -- a worker dies mid-task ---------------------------------------------------------------


@contextmanager
def crash_on_ledger_insert(nth: int):
    """Make the nth INSERT into the ledger fail, as if the worker died right there."""
    seen = {"n": 0}

    def wrapper(execute, sql, params, many, context):
        if sql.lstrip().upper().startswith('INSERT INTO "USAGE_LEDGERENTRY"'):
            seen["n"] += 1
            if seen["n"] == nth:
                raise DatabaseError("worker killed mid-task (simulated)")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(wrapper):
        yield seen


@pytest.mark.django_db(transaction=True)
def test_a_task_killed_mid_way_leaves_nothing_and_the_rerun_completes_it(world):
    tp = due_balance(world)
    ledger, lots = ledger_snapshot(), lots_snapshot()
    with crash_on_ledger_insert(2) as seen, pytest.raises(DatabaseError):
        # The expire row is written, then the refresh row's insert dies.
        periodic.balance_refresh(team_product_id=tp.pk)
    assert seen["n"] == 2
    assert ledger_snapshot() == ledger and lots_snapshot() == lots  # nothing half-written
    assert periodic.balance_refresh(team_product_id=tp.pk) == periodic.RefreshResult(1, 1)
    assert kinds_of(tp) == EXPECTED_KINDS


@pytest.mark.django_db(transaction=True)
def test_a_fan_out_survives_one_failing_unit(world, caplog):
    """Eager fan-out: one balance failing is logged; the others are still refreshed."""
    due_balance(world)
    with crash_on_ledger_insert(1), caplog.at_level(logging.ERROR, logger="usage.tasks"):
        assert tasks.balances_refresh_due.delay().get() == 2
    assert "failed; the next periodic run retries" in caplog.text
    assert LedgerEntry.objects.filter(kind=Kind.REFRESH).count() == 1  # the second balance went through
    tasks.balances_refresh_due.delay()
    assert LedgerEntry.objects.filter(kind=Kind.REFRESH).count() == 2


# -- the broker is down ------------------------------------------------------------------


@pytest.fixture
def broker_down():
    """Celery pointed at a closed Redis port, not eager: as in production with Redis stopped."""
    conf = app.conf
    saved = (conf.task_always_eager, conf.broker_url)
    conf.task_always_eager = False
    conf.broker_url = CLOSED_BROKER
    app._pool = None
    app.amqp._producer_pool = None
    try:
        yield
    finally:
        conf.task_always_eager, conf.broker_url = saved
        app._pool = None
        app.amqp._producer_pool = None


@pytest.mark.django_db
def test_enqueue_failure_is_logged_not_raised(world, broker_down, caplog):
    with caplog.at_level(logging.ERROR, logger="usage.tasks"):
        assert tasks.send_now(tasks.balance_refresh, 1) is False
    assert "could not enqueue usage.balance_refresh" in caplog.text


@pytest.mark.django_db
def test_a_service_call_succeeds_with_the_broker_down(world, broker_down, caplog,
                                                     django_capture_on_commit_callbacks):
    make_grant(world["team"], world["tokens"], 100)
    tp = TeamProduct.objects.get()
    with caplog.at_level(logging.ERROR, logger="usage.tasks"), django_capture_on_commit_callbacks(execute=True):
        with transaction.atomic():
            out = usage_consume(team=world["team"], product=world["tokens"], quantity=90, idempotency_key=key(),
                                actor=Actor.system())
            tasks.enqueue(tasks.alerts_check_team_product, tp.pk)
    assert out.status_code == 201 and out.body["available"] == 10
    assert LedgerEntry.objects.filter(kind=Kind.CONSUME).count() == 1
    assert "could not enqueue usage.alerts_check_team_product" in caplog.text
    # The periodic check catches up once the broker is back (here: called directly).
    assert alerts.alerts_check_team_product(team_product_id=tp.pk) == ["low"]


@pytest.mark.django_db
def test_pages_and_the_api_work_with_the_broker_down(world, broker_down, client,
                                                     django_capture_on_commit_callbacks):
    make_grant(world["team"], world["tokens"], 100)
    api_key = ApiKey(team=world["team"], name="ci")
    secret = api_key.set_new_secret()
    api_key.save()
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/api/v1/usage", {"product": "cloud-tokens", "kind": "consume", "quantity": 5,
                                                 "idempotency_key": key()},
                               content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert response.status_code == 201, response.content
    client.force_login(world["members"]["primary_admin"])
    with django_capture_on_commit_callbacks(execute=True):
        page = client.get(reverse("teams:dashboard", args=["acme"]))
    assert page.status_code == 200
    assert 'data-available="95"' in page.content.decode()
