"""Celery tasks: thin wrappers that take ids and call usage.periodic / usage.alerts.

Beat tasks (``*_due``, ``*_recent``, ``ledger_reconcile``, ``events_prune``) enumerate
ids and fan out one small task per balance with :func:`enqueue`, which sends on
``transaction.on_commit`` (nothing is queued for a rolled-back write) and never lets a
broker outage escape: it is logged, and the next beat run catches up, because every
task is idempotent. The schedule is ``CELERY_BEAT_SCHEDULE`` in settings.
"""

from __future__ import annotations

import logging
from datetime import date, timedelta

from celery import shared_task
from django.db import transaction
from django.utils import timezone
from kombu.exceptions import KombuError
from kombu.exceptions import OperationalError as KombuOperationalError

from . import alerts, periodic

logger = logging.getLogger("usage.tasks")

try:  # the redis client is installed with celery[redis]; keep this module importable without it
    from redis.exceptions import RedisError
except ImportError:  # pragma: no cover
    RedisError = KombuError

BROKER_ERRORS = (KombuOperationalError, KombuError, RedisError, ConnectionError, OSError)
RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}


def send_now(task, *args) -> bool:
    """Send a task now; a broker failure is logged and reported as False, never raised."""
    if task.app.conf.task_always_eager:
        # Embedded default: the task runs here and now. One failing unit is logged and
        # must not stop the others of a fan-out (nor fail the request that enqueued it).
        try:
            task.apply_async(args=args)
        except Exception:
            logger.exception("task %s%r failed; the next periodic run retries", task.name, args)
            return False
        return True
    try:
        task.apply_async(args=args, retry=True, retry_policy=RETRY_POLICY)
    except BROKER_ERRORS:
        logger.error("could not enqueue %s%r: broker unavailable; the next periodic run catches up",
                     task.name, args, exc_info=True)
        return False
    return True


def enqueue(task, *args) -> None:
    """Send ``task(*args)`` once the current transaction commits (at once outside one)."""
    transaction.on_commit(lambda: send_now(task, *args))


# -- monthly refresh and expiry (hourly) ------------------------------------------------


@shared_task(name="usage.balance_refresh")
def balance_refresh(team_product_id: int) -> dict:
    result = periodic.balance_refresh(team_product_id=team_product_id)
    return {"expired": result.expired, "refreshed": result.refreshed}


@shared_task(name="usage.balances_refresh_due")
def balances_refresh_due() -> int:
    ids = periodic.balances_due_for_refresh(now=timezone.now())
    for tp_id in ids:
        enqueue(balance_refresh, tp_id)
    return len(ids)


# -- rollups (hourly: today and yesterday, team time) -------------------------------------


@shared_task(name="usage.rollup_verify")
def rollup_verify(team_product_id: int, first_day: str, last_day: str | None = None) -> int:
    """The number of differences found (and rewritten from the ledger)."""
    return len(periodic.rollup_verify(team_product_id=team_product_id, first_day=date.fromisoformat(first_day),
                                      last_day=date.fromisoformat(last_day or first_day)))


@shared_task(name="usage.rollups_verify_recent")
def rollups_verify_recent(hours: int = 2) -> int:
    """Hourly with 2 hours of lookback; daily with 26 (catches up after a beat outage)."""
    units = periodic.rollups_recent_units(now=timezone.now(), lookback=timedelta(hours=hours))
    for tp_id, first_day, last_day in units:
        enqueue(rollup_verify, tp_id, first_day.isoformat(), last_day.isoformat())
    return len(units)


# -- reconciliation (daily) -------------------------------------------------------------


@shared_task(name="usage.reconcile_balance")
def reconcile_balance(run_id: int, team_product_id: int) -> int | None:
    check = periodic.reconcile_balance(run_id=run_id, team_product_id=team_product_id)
    return None if check is None else check.drift_count


@shared_task(name="usage.ledger_reconcile")
def ledger_reconcile() -> int:
    with transaction.atomic():
        run, ids = periodic.reconciliation_start()
        for tp_id in ids:
            enqueue(reconcile_balance, run.pk, tp_id)
    return run.pk


# -- alerts (every 5 minutes) -----------------------------------------------------------


@shared_task(name="usage.alerts_check_team_product")
def alerts_check_team_product(team_product_id: int) -> list[str]:
    return alerts.alerts_check_team_product(team_product_id=team_product_id)


@shared_task(name="usage.alerts_check_balance")
def alerts_check_balance(team_id: int, product_id: int) -> list[str]:
    tp_id = alerts.team_product_id(team_id=team_id, product_id=product_id)
    return [] if tp_id is None else alerts.alerts_check_team_product(team_product_id=tp_id)


def alerts_after_write(*, team_id: int, product_id: int) -> None:
    """For callers of the usage services (API, views): check this balance's alerts once the write commits.

    Optional: the 5-minute beat checks every balance anyway; this only makes the email prompt.
    """
    enqueue(alerts_check_balance, team_id, product_id)


@shared_task(name="usage.alerts_check_due")
def alerts_check_due() -> int:
    """Every 5 minutes: the balances written in the last 10 (runs overlap)."""
    ids = periodic.balances_touched_since(timezone.now() - timedelta(minutes=10))
    for tp_id in ids:
        enqueue(alerts_check_team_product, tp_id)
    return len(ids)


@shared_task(name="usage.alerts_check_all")
def alerts_check_all() -> int:
    """Daily: every balance (grants entering their last 30 days change nothing in the ledger)."""
    ids = alerts.balances_to_check()
    for tp_id in ids:
        enqueue(alerts_check_team_product, tp_id)
    return len(ids)


# -- idempotency records (daily) ----------------------------------------------------------


@shared_task(name="usage.events_prune")
def events_prune() -> int:
    return periodic.events_prune()


# -- API rate counts (hourly) -------------------------------------------------------------


@shared_task(name="usage.api_rates_prune")
def api_rates_prune() -> int:
    return periodic.api_rates_prune()
