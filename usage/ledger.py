"""Ledger primitives shared by the services: locking, lots, expiry, rollups.

Everything here runs inside the caller's transaction, after the caller has
locked the (team, product) row with :func:`lock_team_product`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from django.db import IntegrityError, transaction
from django.db.models import F, Q

from products.models import SOURCE_PRIORITY, Grant, Lot, Product, Refresh, TeamProduct
from products.periods import local_date, period_bounds, period_index_at
from teams.models import Team

from .actors import Actor
from .models import DailyBreakdown, DailyRollup, Event, Kind, LedgerEntry

# "No monthly boundary ahead": far enough to never be reached, valid in every database.
NEVER_DUE = datetime(9999, 1, 1, tzinfo=UTC)


def lock_team_product(team: Team, product: Product) -> TeamProduct:
    """Create if needed, then lock, the row that serialises writes to one balance."""
    assert transaction.get_connection().in_atomic_block, "lock_team_product needs a transaction"
    try:
        return TeamProduct.objects.select_for_update().get(team=team, product=product)
    except TeamProduct.DoesNotExist:
        pass
    try:
        with transaction.atomic():  # savepoint: a concurrent creator may win the race
            TeamProduct.objects.create(team=team, product=product)
    except IntegrityError:
        pass
    return TeamProduct.objects.select_for_update().get(team=team, product=product)


def expire_lots(tp: TeamProduct, *, now: datetime, actor: Actor) -> list[LedgerEntry]:
    """Write ``expire`` rows for lots of this balance that ended and still hold capacity."""
    stale = list(
        Lot.objects.filter(team_id=tp.team_id, product_id=tp.product_id, closed_at__isnull=True, expires_at__lte=now)
        .select_for_update()
        .order_by("id")
    )
    entries = []
    for lot in stale:
        entries.extend(close_lot(lot, kind=Kind.EXPIRE, at=lot.expires_at, now=now, actor=actor))
    return entries


def close_lot(lot: Lot, *, kind: str, at: datetime, now: datetime, actor: Actor, note: str = "",
              team: Team | None = None) -> list[LedgerEntry]:
    """Zero a lot's remaining with one ledger row (expiry or revocation). Idempotent."""
    # Claim: only the first closer sees closed_at IS NULL; a rerun changes nothing.
    claimed = Lot.objects.filter(pk=lot.pk, closed_at__isnull=True).update(closed_at=now, remaining=0)
    if not claimed:
        return []
    if lot.remaining == 0:
        return []
    entry = LedgerEntry.objects.create(
        team_id=lot.team_id, product_id=lot.product_id, lot=lot, grant_id=lot.grant_id,
        kind=kind, delta=-lot.remaining, amount=lot.remaining, occurred_at=at, note=note,
        **actor.entry_fields(),
    )
    rollup_add(team if team is not None else lot.team, lot.product_id, at=at, expired=lot.remaining)
    lot.remaining = 0
    lot.closed_at = now
    return [entry]


def ensure_current_lots(tp: TeamProduct, team: Team, *, now: datetime, actor: Actor) -> bool:
    """Create the lot of the current period for every active monthly grant (lazily).

    Period 0 lots are created with the grant; later periods appear here, or in the
    monthly refresh task, with a ``refresh`` row. The unique (grant, period_start)
    constraint makes a concurrent creation a no-op. ``tp.refresh_due_at`` caches
    the next period start of any monthly grant, so the hot path skips the grant
    query until a boundary passes (a new monthly grant clears the cache).
    Returns True when it created a lot.
    """
    checked, due = tp.refresh_checked_at, tp.refresh_due_at
    if checked is not None and due is not None and checked <= now < due:
        return False
    grants = list(
        Grant.objects.filter(team_id=tp.team_id, product_id=tp.product_id, refresh=Refresh.MONTHLY)
        .unrevoked()
        .filter(ends_at__gt=now)
    )
    tz = team.tzinfo
    wanted = {}
    next_due = NEVER_DUE
    for grant in grants:
        if grant.starts_at > now:  # starts later: its first lot exists, look again when it starts
            next_due = min(next_due, grant.starts_at)
            continue
        k = period_index_at(grant.starts_at, tz, now)
        start, end = period_bounds(grant.starts_at, grant.ends_at, tz, k)
        wanted[(grant.pk, start)] = (grant, k, start, end)
        if end < grant.ends_at:
            next_due = min(next_due, end)
    created = False
    if wanted:
        existing = set(
            Lot.objects.filter(grant_id__in=[w[0].pk for w in wanted.values()], period_start__in=[w[2] for w in wanted.values()])
            .values_list("grant_id", "period_start")
        )
        for key, (grant, k, start, end) in wanted.items():
            if key not in existing:
                kind = Kind.REFRESH if k else Kind.GRANT
                lot = create_lot(grant, k=k, start=start, end=end, kind=kind, actor=actor, team=team)
                created = created or lot is not None
    TeamProduct.objects.filter(pk=tp.pk).update(refresh_checked_at=now, refresh_due_at=next_due)
    tp.refresh_checked_at, tp.refresh_due_at = now, next_due
    return created


def create_lot(grant: Grant, *, k: int, start: datetime, end: datetime, kind: str, actor: Actor,
               event: Event | None = None, team: Team | None = None) -> Lot | None:
    """Create one period's lot and its creation row; None if it already exists."""
    try:
        with transaction.atomic():
            lot = Lot.objects.create(
                grant=grant, team_id=grant.team_id, product_id=grant.product_id, period_index=k,
                period_start=start, expires_at=end, priority=SOURCE_PRIORITY[grant.source],
                quantity=grant.quantity, remaining=grant.quantity,
            )
    except IntegrityError:
        return None
    LedgerEntry.objects.create(
        team_id=grant.team_id, product_id=grant.product_id, grant=grant, lot=None, kind=kind,
        delta=grant.quantity, amount=grant.quantity, occurred_at=start, event=event,
        note=f"period {k + 1}" if grant.refresh == Refresh.MONTHLY else "",
        **actor.entry_fields(),
    )
    rollup_add(team if team is not None else grant.team, grant.product_id, at=start, granted=grant.quantity)
    return lot


def active_lots_for_update(tp: TeamProduct, *, now: datetime) -> list[Lot]:
    """The lots that can pay now, locked, in consumption order."""
    return list(
        Lot.objects.filter(team_id=tp.team_id, product_id=tp.product_id)
        .active_at(now)
        .filter(closed_at__isnull=True)
        .select_for_update()
        .in_consumption_order()
    )


def prepare_balance(team: Team, product: Product, *, now: datetime, actor: Actor) -> tuple[TeamProduct, list[Lot]]:
    """Lock a balance, write due expiries and refreshes, return its payable lots.

    One locked read of the open lots serves both the expiry pass and the payment
    (the hot path: lock row, open lots, then the write itself).
    """
    tp = lock_team_product(team, product)
    open_lots = list(
        Lot.objects.filter(team_id=tp.team_id, product_id=tp.product_id, closed_at__isnull=True,
                           period_start__lte=now)
        .select_for_update()
        .in_consumption_order()
    )
    for lot in sorted((lot for lot in open_lots if lot.expires_at <= now), key=lambda lot: lot.pk):
        close_lot(lot, kind=Kind.EXPIRE, at=lot.expires_at, now=now, actor=actor, team=team)
    if ensure_current_lots(tp, team, now=now, actor=actor):
        return tp, active_lots_for_update(tp, now=now)
    return tp, [lot for lot in open_lots if lot.expires_at > now]


def plan_draw(lots: Iterable[Lot], quantity: int) -> list[tuple[Lot, int]]:
    """Split ``quantity`` over lots already in consumption order."""
    plan = []
    left = quantity
    for lot in lots:
        if left == 0:
            break
        take = min(lot.remaining, left)
        if take > 0:
            plan.append((lot, take))
            left -= take
    if left:
        raise ValueError("plan_draw called with more than is available")
    return plan


def apply_lot_delta(lot: Lot, delta: int) -> None:
    """Move a lot's remaining by ``delta``; the WHERE refuses to cross 0 or quantity."""
    if delta == 0:
        return
    if delta < 0:
        changed = Lot.objects.filter(pk=lot.pk, remaining__gte=-delta).update(remaining=F("remaining") + delta)
    else:
        changed = Lot.objects.filter(pk=lot.pk, remaining__lte=F("quantity") - delta).update(
            remaining=F("remaining") + delta
        )
    if changed != 1:
        raise RuntimeError(f"lot {lot.pk} could not move by {delta}: concurrent change without lock")
    lot.remaining += delta


def totals(lots: Iterable[Lot]) -> tuple[int, int]:
    lots = list(lots)
    return sum(lot.remaining for lot in lots), sum(lot.quantity for lot in lots)


# -- rollups -------------------------------------------------------------------------

ROLLUP_FIELDS = ("consumed", "refunded", "checked_out", "returned", "raw_usage")
# Kept on the daily rollup only (no service/user breakdown): capacity added and removed.
CAPACITY_FIELDS = ("granted", "expired")


def rollup_add(team: Team, product_id: int, *, at: datetime, service: str = "", user: str = "",
               level: int | None = None, **amounts: int) -> None:
    """Add amounts to the day's rollup and breakdown rows (same transaction as the write)."""
    amounts = {k: v for k, v in amounts.items() if v}
    unknown = set(amounts) - set(ROLLUP_FIELDS) - set(CAPACITY_FIELDS)
    if unknown:
        raise ValueError(f"unknown rollup fields {sorted(unknown)}")
    if not amounts and level is None:
        return
    day = local_date(at, team.tzinfo)
    _upsert(DailyRollup, {"team_id": team.pk, "product_id": product_id, "day": day}, amounts, level=level)
    usage = {k: v for k, v in amounts.items() if k in ROLLUP_FIELDS}
    if usage:
        _upsert(
            DailyBreakdown,
            {"team_id": team.pk, "product_id": product_id, "day": day, "service": service or "", "user": user or ""},
            usage,
        )


def _upsert(model, key: dict, amounts: dict, *, level: int | None = None) -> None:
    """``INSERT ... ON CONFLICT (key) DO UPDATE SET x = x + excluded.x``: one statement.

    Field names come from ROLLUP_FIELDS and the key dicts above, never from input.
    """
    connection = transaction.get_connection()
    qn = connection.ops.quote_name
    table = qn(model._meta.db_table)
    fields = ROLLUP_FIELDS + (CAPACITY_FIELDS if model is DailyRollup else ())
    values = {**key, **{name: amounts.get(name, 0) for name in fields}}
    sets = [f"{qn(name)} = {table}.{qn(name)} + excluded.{qn(name)}" for name in fields if name in amounts]
    if level is not None:
        values["peak_checked_out"] = level
        values["closing_checked_out"] = level
        greatest = "GREATEST" if connection.vendor == "postgresql" else "MAX"
        sets.append(f'{qn("peak_checked_out")} = {greatest}({table}.{qn("peak_checked_out")}, excluded.{qn("peak_checked_out")})')
        sets.append(f'{qn("closing_checked_out")} = excluded.{qn("closing_checked_out")}')
    elif model is DailyRollup:
        values["peak_checked_out"] = values["closing_checked_out"] = 0
    columns = ", ".join(qn(c) for c in values)
    placeholders = ", ".join(["%s"] * len(values))
    conflict = ", ".join(qn(c) for c in key)
    sql = (f"INSERT INTO {table} ({columns}) VALUES ({placeholders}) "
           f"ON CONFLICT ({conflict}) DO UPDATE SET {', '.join(sets)}")
    params = [connection.ops.adapt_datefield_value(v) if k == "day" else v for k, v in values.items()]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def members_for(team: Team, identifiers: set[str]) -> dict[str, int]:
    """Usage identifier -> id of the team member it names (email, case-insensitive, or
    username; the lowest id wins), for any number of identifiers in one query."""
    identifiers = {i for i in identifiers if i}
    if not identifiers:
        return {}
    from django.contrib.auth import get_user_model
    from django.db.models.functions import Lower

    users = list(
        get_user_model().objects.filter(memberships__team=team)
        .annotate(email_lower=Lower("email"))
        .filter(Q(email_lower__in={i.lower() for i in identifiers}) | Q(username__in=identifiers))
        .order_by("pk")
        .values_list("pk", "email_lower", "username")
    )
    found: dict[str, int] = {}
    for identifier in identifiers:
        for pk, email, username in users:
            if email == identifier.lower() or username == identifier:
                found[identifier] = pk
                break
    return found


def member_id_for(team: Team, identifier: str) -> int | None:
    return members_for(team, {identifier}).get(identifier)
