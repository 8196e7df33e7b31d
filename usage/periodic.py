"""Periodic work: the service functions behind the Celery tasks (usage/tasks.py).

Balances are already correct at read time (DESIGN.md); these functions materialise
what time did (``refresh``/``expire`` rows), re-prove the ledger and its rollups,
and prune old idempotency records. Every unit of work is one transaction for one
balance, taken under :func:`usage.ledger.lock_team_product`, so running a unit twice,
concurrently, or again after a crash mid-way leaves the same ledger:

- refresh/expiry: ``close_lot`` claims a lot with ``UPDATE ... WHERE closed_at IS NULL``
  and ``create_lot`` relies on the unique (grant, period_start) constraint;
- rollups: recomputed from the ledger and written as absolute values;
- reconciliation: one ``ReconciliationCheck`` per (run, balance), unique;
- pruning: deletes only what is already past retention and unreferenced.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, ProgrammingError, connection, transaction
from django.db.models import Exists, Max, Min, OuterRef, Q, Sum
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

from products.models import Grant, Lot, Refresh, TeamProduct

from . import fastpath
from .actors import Actor
from .ledger import ensure_current_lots, expire_lots, lock_team_product
from .models import (
    DailyBreakdown,
    DailyRollup,
    Drift,
    Event,
    Kind,
    LedgerEntry,
    ReconciliationCheck,
    ReconciliationRun,
)

logger = logging.getLogger("usage.periodic")

PERIODIC_ACTOR = Actor.system("periodic")


def _team_product(tp_id: int) -> TeamProduct | None:
    """Reload a balance by id (tasks take ids); None if it no longer exists."""
    return TeamProduct.objects.select_related("team", "product").filter(pk=tp_id).first()


# -- monthly refresh and expiry ----------------------------------------------------------


def balances_due_for_refresh(*, now: datetime) -> list[int]:
    """Balances with an ended lot still open, or an active monthly grant (maybe a new period)."""
    open_ended = Lot.objects.filter(
        team_id=OuterRef("team_id"), product_id=OuterRef("product_id"), closed_at__isnull=True, expires_at__lte=now
    )
    monthly = Grant.objects.filter(
        team_id=OuterRef("team_id"), product_id=OuterRef("product_id"), refresh=Refresh.MONTHLY
    ).active_at(now)
    return list(
        TeamProduct.objects.filter(Q(Exists(open_ended)) | Q(Exists(monthly))).order_by("pk").values_list("pk", flat=True)
    )


@dataclass(frozen=True)
class RefreshResult:
    expired: int
    refreshed: int


def balance_refresh(*, team_product_id: int, now: datetime | None = None) -> RefreshResult:
    """Write the due ``expire`` rows and create the current period's lots (no rollover)."""
    now = now or timezone.now()
    tp = _team_product(team_product_id)
    if tp is None:
        return RefreshResult(0, 0)
    with transaction.atomic():
        locked = lock_team_product(tp.team, tp.product)
        expired = expire_lots(locked, now=now, actor=PERIODIC_ACTOR)
        lots = Lot.objects.filter(team_id=tp.team_id, product_id=tp.product_id)
        before = lots.count()
        ensure_current_lots(locked, tp.team, now=now, actor=PERIODIC_ACTOR)
        after = lots.count()
    result = RefreshResult(expired=len(expired), refreshed=after - before)
    if result.expired or result.refreshed:
        logger.info("balance %s (%s/%s): %d expired, %d refreshed", tp.pk, tp.team.slug, tp.product.code,
                    result.expired, result.refreshed)
    return result


# -- rollups ---------------------------------------------------------------------------

# Rollup field -> (ledger kind, field summed). Raw metered usage, peaks and closing
# levels are not derivable from ledger rows alone and are not rewritten here.
ROLLUP_FROM_LEDGER = {
    "consumed": (Kind.CONSUME, "amount"),
    "refunded": (Kind.REFUND, "delta"),  # what a refund restored (0 for an ended lot)
    "checked_out": (Kind.CHECKOUT, "amount"),
    "returned": (Kind.RETURN, "amount"),
}


FIELDS = tuple(ROLLUP_FROM_LEDGER)
ZERO = dict.fromkeys(FIELDS, 0)


def _local_day_bounds(day: date, tz) -> tuple[datetime, datetime]:
    start = datetime(day.year, day.month, day.day, tzinfo=tz)
    nxt = day + timedelta(days=1)
    return start, datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz)


def rollups_from_ledger(tp: TeamProduct, first_day: date, last_day: date) -> tuple[dict, dict]:
    """Rollups recomputed from the ledger for local days first..last, in one grouped query.

    Returns ``({day: amounts}, {(day, service, user): amounts})``, zero groups left out.
    """
    tz = tp.team.tzinfo
    start, _ = _local_day_bounds(first_day, tz)
    _, end = _local_day_bounds(last_day, tz)
    rows = (
        LedgerEntry.objects.filter(team_id=tp.team_id, product_id=tp.product_id, occurred_at__gte=start,
                                   occurred_at__lt=end, kind__in=[kind for kind, _ in ROLLUP_FROM_LEDGER.values()])
        .annotate(local_day=TruncDate("occurred_at", tzinfo=tz))
        .values("local_day", "service", "user")
        .annotate(**{name: Coalesce(Sum(field, filter=Q(kind=kind)), 0)
                     for name, (kind, field) in ROLLUP_FROM_LEDGER.items()})
        .order_by()
    )
    days: dict[date, dict] = {}
    breakdowns: dict[tuple[date, str, str], dict] = {}
    for row in rows:
        amounts = {name: int(row[name]) for name in FIELDS}
        if not any(amounts.values()):
            continue
        breakdowns[(row["local_day"], row["service"], row["user"])] = amounts
        acc = days.setdefault(row["local_day"], dict(ZERO))
        for name in FIELDS:
            acc[name] += amounts[name]
    return days, breakdowns


def rollup_from_ledger(tp: TeamProduct, day: date) -> dict[str, int]:
    """One local day's rollup amounts, recomputed from the ledger."""
    return rollups_from_ledger(tp, day, day)[0].get(day, dict(ZERO))


def rollup_verify(*, team_product_id: int, first_day: date, last_day: date | None = None,
                  now: datetime | None = None) -> list[dict]:
    """Recompute a balance's daily rollups and breakdowns from the ledger; rewrite what differs.

    Each difference is logged as an error and recorded as a fixed ``Drift``. Returns them
    as ``{"day", "scope", "expected", "actual"}``; empty when everything agrees.
    """
    now = now or timezone.now()
    last_day = last_day or first_day
    tp = _team_product(team_product_id)
    if tp is None:
        return []
    key = {"team_id": tp.team_id, "product_id": tp.product_id}
    found = []
    with transaction.atomic():
        # Writers update rollups under this lock: the ledger and the rollups are compared at rest.
        lock_team_product(tp.team, tp.product)
        want_days, want_breakdowns = rollups_from_ledger(tp, first_day, last_day)
        in_range = {"day__gte": first_day, "day__lte": last_day}

        have_days = {r.day: r for r in DailyRollup.objects.select_for_update().filter(**key, **in_range)}
        for day in sorted(set(want_days) | set(have_days)):
            want, row = want_days.get(day, ZERO), have_days.get(day)
            got = {name: getattr(row, name) for name in FIELDS} if row else ZERO
            if got == want:
                continue
            if row is None:
                DailyRollup.objects.create(**key, day=day, **want)
            else:
                DailyRollup.objects.filter(pk=row.pk).update(**want)
            found.append({"day": day, "scope": "day", "expected": want, "actual": got})

        have_breakdowns = {(b.day, b.service, b.user): b
                           for b in DailyBreakdown.objects.select_for_update().filter(**key, **in_range)}
        for day, service, user in sorted(set(want_breakdowns) | set(have_breakdowns)):
            want, row = want_breakdowns.get((day, service, user), ZERO), have_breakdowns.get((day, service, user))
            got = {name: getattr(row, name) for name in FIELDS} if row else ZERO
            if got == want:
                continue
            if row is None:
                DailyBreakdown.objects.create(**key, day=day, service=service, user=user, **want)
            else:
                DailyBreakdown.objects.filter(pk=row.pk).update(**want)
            found.append({"day": day, "scope": f"service={service!r} user={user!r}", "expected": want,
                          "actual": got})

        Drift.objects.bulk_create([
            Drift(kind=Drift.Kind.ROLLUP, team_id=tp.team_id, product_id=tp.product_id, day=d["day"], found_at=now,
                  fixed=True, expected={"scope": d["scope"], **d["expected"]},
                  actual={"scope": d["scope"], **d["actual"]})
            for d in found
        ])
    for d in found:
        logger.error("rollup drift for %s/%s on %s (%s): rollup %s, ledger %s (rewritten from the ledger)",
                     tp.team.slug, tp.product.code, d["day"], d["scope"], d["actual"], d["expected"])
    return found


def recorded_since(since: datetime):
    """Ledger rows recorded at or after ``since``, found without a recorded_at index."""
    # Ids grow with recorded_at: walking the primary key backwards from the newest row to
    # the first one recorded before ``since`` reads only the recent rows.
    boundary = LedgerEntry.objects.filter(recorded_at__lt=since).order_by("-pk").values_list("pk", flat=True).first()
    return LedgerEntry.objects.filter(pk__gt=boundary or 0, recorded_at__gte=since)


def balances_touched_since(since: datetime) -> list[int]:
    """Balances with ledger rows recorded since ``since`` (writes, refreshes, expiries, grants)."""
    pairs = set(recorded_since(since).values_list("team_id", "product_id").distinct())
    if not pairs:
        return []
    return sorted(
        tp.pk for tp in TeamProduct.objects.filter(team_id__in={t for t, _ in pairs}).only("pk", "team_id", "product_id")
        if (tp.team_id, tp.product_id) in pairs
    )


def rollups_recent_units(*, now: datetime, lookback: timedelta = timedelta(hours=2)) -> list[tuple[int, date, date]]:
    """(balance, first local day, last local day) touched by ledger rows recorded in the last ``lookback``.

    Keyed on ``recorded_at``, so back-dated usage (``occurred_at`` up to weeks ago) gets
    its own days verified too. The hourly beat looks back two hours: runs overlap.
    """
    touched = (
        recorded_since(now - lookback).filter(kind__in=[kind for kind, _ in ROLLUP_FROM_LEDGER.values()])
        .values("team_id", "product_id")
        .annotate(first=Min("occurred_at"), last=Max("occurred_at"))
        .order_by("team_id", "product_id")
    )
    ranges = {(row["team_id"], row["product_id"]): (row["first"], row["last"]) for row in touched}
    if not ranges:
        return []
    units = []
    balances = TeamProduct.objects.filter(team_id__in={t for t, _ in ranges}).select_related("team").order_by("pk")
    for tp in balances:
        span = ranges.get((tp.team_id, tp.product_id))
        if span is not None:
            tz = tp.team.tzinfo
            units.append((tp.pk, span[0].astimezone(tz).date(), span[1].astimezone(tz).date()))
    return units


# -- reconciliation ------------------------------------------------------------------


def reconciliation_start(*, now: datetime | None = None) -> tuple[ReconciliationRun, list[int]]:
    """A new run over every balance; returns it and the balance ids to check."""
    now = now or timezone.now()
    ids = list(TeamProduct.objects.order_by("pk").values_list("pk", flat=True))
    run = ReconciliationRun.objects.create(started_at=now, balances_expected=len(ids))
    return run, ids


def lots_with_sums(tp: TeamProduct):
    return (
        Lot.objects.filter(team_id=tp.team_id, product_id=tp.product_id)
        .annotate(delta_sum=Coalesce(Sum("entries__delta"), 0))
        .order_by("pk")
    )


def reconcile_balance(*, run_id: int, team_product_id: int, now: datetime | None = None) -> ReconciliationCheck | None:
    """Check ``quantity + sum(deltas) == remaining`` for every lot of one balance, once per run."""
    now = now or timezone.now()
    tp = _team_product(team_product_id)
    if tp is None:
        return None
    with transaction.atomic():
        lock_team_product(tp.team, tp.product)  # no write of this balance is half-way while we add up
        try:
            with transaction.atomic():
                # Claim: the unique (run, balance) makes a second or concurrent check a no-op.
                check = ReconciliationCheck.objects.create(run_id=run_id, team_product=tp, checked_at=now)
        except IntegrityError:
            return None
        drifts = []
        lots = list(lots_with_sums(tp))
        for lot in lots:
            expected = lot.quantity + lot.delta_sum
            if expected != lot.remaining or not 0 <= lot.remaining <= lot.quantity:
                drifts.append(Drift(
                    kind=Drift.Kind.LOT, run_id=run_id, team_id=tp.team_id, product_id=tp.product_id, lot=lot,
                    expected={"remaining": expected, "quantity": lot.quantity, "sum_deltas": lot.delta_sum},
                    actual={"remaining": lot.remaining}, found_at=now,
                ))
        Drift.objects.bulk_create(drifts)
        check.lots_checked, check.drift_count = len(lots), len(drifts)
        check.save(update_fields=["lots_checked", "drift_count"])
    for d in drifts:
        logger.error("LEDGER DRIFT: lot %s of %s/%s: quantity %s + sum(deltas) %s = %s but remaining is %s",
                     d.lot_id, tp.team.slug, tp.product.code, d.expected["quantity"], d.expected["sum_deltas"],
                     d.expected["remaining"], d.actual["remaining"])
    return check


# -- idempotency records ----------------------------------------------------------------


def events_prune(*, now: datetime | None = None, batch: int = 1000) -> int:
    """Delete idempotency records older than the retention that no ledger row references.

    Events that caused ledger rows are kept: the ledger is append-only and points at
    them (PROTECT) as the request that caused each row. Pruned keys may be reused.
    """
    now = now or timezone.now()
    cutoff = now - timedelta(days=settings.IDEMPOTENCY_RETENTION_DAYS)
    stale = Event.objects.filter(created_at__lt=cutoff).filter(~Exists(LedgerEntry.objects.filter(event=OuterRef("pk"))))
    deleted = 0
    while True:
        ids = list(stale.order_by("pk").values_list("pk", flat=True)[:batch])
        if not ids:
            break
        with transaction.atomic():
            # Re-check inside the delete: a row referenced meanwhile is left alone.
            n, _ = stale.filter(pk__in=ids).delete()
        deleted += n
        if n == 0 or len(ids) < batch:
            break
    if deleted:
        logger.info("pruned %d idempotency records older than %s", deleted, cutoff)
    return deleted


# -- API rate counts (hourly) -------------------------------------------------------------


def api_rates_prune(*, now: datetime | None = None) -> int:
    """Delete the per-key rate counts (PostgreSQL, migration ``usage.0009``) of windows
    before the last minute: a key's row comes back with its next request. Unknown keys
    are counted too, so without this the table would keep every token ever tried."""
    if connection.vendor != "postgresql":
        return 0
    window = int((now or timezone.now()).timestamp() // 60)
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("DELETE FROM usage_apirate WHERE win < %s", [window - 1])
            deleted = cursor.rowcount
    except ProgrammingError as exc:
        if getattr(exc.__cause__, "sqlstate", None) == fastpath.UNDEFINED_TABLE:  # deployed before its migration ran
            return 0
        raise
    if deleted:
        logger.info("api_rates_prune: deleted %s rate counts", deleted)
    return deleted
