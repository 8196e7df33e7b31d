"""A real Celery worker on the CI Redis runs the beat fan-out and a refresh end to end."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from celery.contrib.testing.worker import start_worker
from celery.worker import state as worker_state
from django.utils import timezone

from capacity_portal.celery import app
from products.models import Lot, Refresh, TeamProduct
from usage import tasks
from usage.models import Kind, LedgerEntry

from .factories import make_grant


@pytest.fixture
def broker(require_redis):
    """Celery on the real Redis (REDIS_URL), not eager, for this test only."""
    conf = app.conf
    saved = (conf.task_always_eager, conf.broker_url)
    conf.task_always_eager = False
    conf.broker_url = require_redis
    app._pool = None
    app.amqp._producer_pool = None
    try:
        yield require_redis
    finally:
        conf.task_always_eager, conf.broker_url = saved
        app._pool = None
        app.amqp._producer_pool = None


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def processed(name: str) -> int:
    return worker_state.total_count.get(name, 0)


@pytest.mark.django_db(transaction=True)
def test_worker_runs_the_refresh_end_to_end(broker, world):
    now = timezone.now()
    starts = now - timedelta(days=40)
    grant = make_grant(world["team"], world["tokens"], 100, refresh=Refresh.MONTHLY, starts_at=starts,
                       ends_at=starts + timedelta(days=365), now=starts + timedelta(hours=1))
    tp = TeamProduct.objects.get(team=world["team"], product=world["tokens"])

    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=30):
        before = processed("usage.balance_refresh")
        # The beat task runs on the worker and fans out through Redis to balance_refresh.
        assert tasks.send_now(tasks.balances_refresh_due)
        assert wait_for(lambda: processed("usage.balance_refresh") > before), "refresh never ran on the worker"
        assert wait_for(lambda: LedgerEntry.objects.filter(grant=grant, kind=Kind.REFRESH).exists())

        # Delivered twice (acks_late redelivery, a second beat): the ledger does not change.
        ledger = list(LedgerEntry.objects.order_by("id").values_list("kind", "delta", "lot_id"))
        done = processed("usage.balance_refresh")
        assert tasks.send_now(tasks.balance_refresh, tp.pk)
        assert wait_for(lambda: processed("usage.balance_refresh") > done)

    assert list(LedgerEntry.objects.order_by("id").values_list("kind", "delta", "lot_id")) == ledger
    assert list(LedgerEntry.objects.filter(grant=grant).order_by("id").values_list("kind", "delta")) == [
        (Kind.GRANT, 100), (Kind.EXPIRE, -100), (Kind.REFRESH, 100)]
    assert list(Lot.objects.filter(grant=grant).order_by("period_index").values_list("period_index", "remaining")) == [
        (0, 0), (1, 100)]
