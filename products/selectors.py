"""Balance selector: every card's numbers for a team in a constant number of queries."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import NamedTuple

from django.db import connection
from django.db.models import F, FilteredRelation, Q, Sum
from django.utils import timezone

from capacity_portal.postgresql.rows import columns, from_row
from teams.models import Team
from usage.forecast import forecast_window, runs_out_in_days
from usage.models import DailyRollup

from .models import Grant, Product, Refresh, TeamProduct
from .periods import (
    local_date,
    local_days_until,
    period_bounds,
    period_count,
    period_index_at,
    period_start,
)


@dataclass
class Balance:
    product: Product
    available: int
    total: int
    purchased: int
    checked_out: int
    ends_at: datetime | None
    ends_in_days: int | None
    refreshes_at: datetime | None
    refreshes_in_days: int | None
    runs_out_in_days: int | None = None

    @property
    def used(self) -> int:
        return self.total - self.available

    @property
    def used_pct(self) -> Decimal:
        """Percentage used, one decimal, rounded half up (integer arithmetic: no float)."""
        if self.total == 0:
            return Decimal("0.0")
        tenths = (self.used * 1000 * 2 + self.total) // (2 * self.total)
        return (Decimal(tenths) / 10).quantize(Decimal("0.1"))

    @property
    def available_pct(self) -> Decimal:
        return Decimal("100.0") - self.used_pct if self.total else Decimal("0.0")

    @property
    def status(self) -> str:
        """ok: available/total > 20%; low: <= 20%; empty: nothing available (or no capacity)."""
        if self.total == 0 or self.available == 0:
            return "empty"
        # Exact rational compare: available/total > 1/5  <=>  5 * available > total.
        return "ok" if 5 * self.available > self.total else "low"

    @property
    def has_capacity(self) -> bool:
        return self.total > 0

    @property
    def ends_label(self) -> str:
        return days_label(self.ends_in_days, "Ends")

    @property
    def refreshes_label(self) -> str:
        if self.refreshes_in_days is None:
            return ""
        return days_label(self.refreshes_in_days, "Refreshes")


def days_label(days: int | None, verb: str) -> str:
    if days is None:
        return ""
    if days < 0:
        return "Expired"
    if days == 0:
        return f"{verb} today"
    if days == 1:
        return f"{verb} in 1 day"
    return f"{verb} in {days} days"


class _GrantRow(NamedTuple):
    pk: int
    product_id: int
    quantity: int
    refresh: str
    starts_at: datetime
    ends_at: datetime


def team_balances(team: Team, *, now: datetime | None = None, product: Product | None = None,
                  code: str | None = None) -> list[Balance]:
    """Balances of every product the team has ever been granted, at ``now``.

    A constant number of queries whatever the number of products (one statement on
    PostgreSQL, ``_read_sql``; three through the ORM elsewhere): the holdings, the grants
    with their lots in force, and the last 30 days' net consumption for the forecast.
    Correct at read time: a monthly
    period whose lot is not created yet counts as full (the lot appears on first use
    or with the refresh task), and lots past their end count for nothing.
    """
    now = now or timezone.now()
    tz = team.tzinfo
    first_day, last_day = forecast_window(local_date(now, tz))
    read = _read_sql if connection.vendor == "postgresql" else _read_orm
    holdings, grant_rows, net_consumed = read(team, now, first_day, last_day,
                                              product_id=product.pk if product is not None else None, code=code)
    # Plain rows, not model instances: building them was a third of a 50-product dashboard.
    grants: list[_GrantRow] = []
    lots: dict[tuple[int, datetime], int] = {}
    last_end: dict[int, datetime] = {}
    seen: set[int] = set()
    for *fields, lot_start, lot_remaining in grant_rows:
        grant = _GrantRow(*fields)
        if grant.product_id not in last_end or grant.ends_at > last_end[grant.product_id]:
            last_end[grant.product_id] = grant.ends_at
        if lot_start is not None:
            lots[(grant.pk, lot_start)] = lot_remaining
        if grant.ends_at > now and grant.pk not in seen:
            seen.add(grant.pk)
            grants.append(grant)

    by_product: dict[int, dict] = {
        h.product.pk: {"available": 0, "total": 0, "purchased": 0, "ends_at": None, "refreshes_at": None}
        for h in holdings
    }
    for grant in grants:
        acc = by_product.get(grant.product_id)
        if acc is None:
            continue
        monthly = grant.refresh == Refresh.MONTHLY
        acc["purchased"] += grant.quantity * (period_count(grant.starts_at, grant.ends_at, tz) if monthly else 1)
        if grant.starts_at > now:
            continue
        if monthly:
            k = period_index_at(grant.starts_at, tz, now)
            start, _ = period_bounds(grant.starts_at, grant.ends_at, tz, k)
            nxt = period_start(grant.starts_at, tz, k + 1)
            if nxt < grant.ends_at and (acc["refreshes_at"] is None or nxt < acc["refreshes_at"]):
                acc["refreshes_at"] = nxt
        else:
            start = grant.starts_at
        remaining = lots.get((grant.pk, start))
        acc["total"] += grant.quantity
        acc["available"] += remaining if remaining is not None else grant.quantity
        if acc["ends_at"] is None or grant.ends_at > acc["ends_at"]:
            acc["ends_at"] = grant.ends_at

    result = []
    for h in holdings:
        acc = by_product[h.product.pk]
        # With no active grant, show when the last one ended ("Expired").
        last = last_end.get(h.product.pk)
        ends_at = acc["ends_at"] or (last if last and last <= now else None)
        refreshes_at = acc["refreshes_at"]
        # Forecast horizon: the end of the capacity in force, or its next refresh if sooner.
        horizon = min((d for d in (acc["ends_at"], refreshes_at) if d is not None), default=None)
        result.append(Balance(
            product=h.product,
            available=acc["available"],
            total=acc["total"],
            purchased=acc["purchased"],
            checked_out=h.checked_out,
            ends_at=ends_at,
            ends_in_days=local_days_until(ends_at, now, tz) if ends_at else None,
            refreshes_at=refreshes_at,
            refreshes_in_days=local_days_until(refreshes_at, now, tz) if refreshes_at else None,
            runs_out_in_days=runs_out_in_days(available=acc["available"], net_consumed=net_consumed.get(h.product.pk, 0),
                                              now=now, horizon=horizon),
        ))
    return result


class _Holding(NamedTuple):
    product: Product
    checked_out: int


def _read_orm(team: Team, now: datetime, first_day, last_day, *, product_id: int | None, code: str | None):
    """(holdings, grant rows, net consumed per product) through the ORM (any database)."""
    holdings = (
        TeamProduct.objects.for_team(team).select_related("product")
        .defer("created_at", "refresh_checked_at", "refresh_due_at")  # the write path's, not shown
        .order_by("product__name", "product_id")
    )
    # Every unrevoked grant (the ended ones give "Expired" its date) with its lot in force
    # now, if any, in one LEFT JOIN: a monthly period whose lot is not created yet is full.
    grants = Grant.objects.for_team(team).unrevoked().annotate(
        open_lot=FilteredRelation("lots", condition=Q(
            lots__closed_at__isnull=True, lots__period_start__lte=now, lots__expires_at__gt=now))
    )
    usage = DailyRollup.objects.for_team(team).filter(day__gte=first_day, day__lte=last_day)
    if product_id is not None:
        holdings, grants, usage = (qs.filter(product_id=product_id) for qs in (holdings, grants, usage))
    if code is not None:  # one product by its code: no separate product lookup
        holdings, grants, usage = (qs.filter(product__code=code) for qs in (holdings, grants, usage))
    grant_rows = grants.values_list(*_GrantRow._fields, "open_lot__period_start", "open_lot__remaining")
    net = usage.values("product_id").annotate(net=Sum(F("consumed") - F("refunded"))).values_list("product_id", "net")
    return [_Holding(h.product, h.checked_out) for h in holdings], list(grant_rows), dict(net)


def _read_sql(team: Team, now: datetime, first_day, last_day, *, product_id: int | None, code: str | None):
    """The same reads as ``_read_orm`` in one fixed statement (PostgreSQL): building and
    compiling the three querysets cost more than running them (about 2.5 of 3.5 ms for
    one product). Each holding carries its grants (with the lot in force) as a JSON array
    and its net use in the forecast window. ``tests/test_balances_sql.py`` holds the two
    reads to the same rows."""
    if product_id is not None:
        where, net_where, extra = " AND tp.product_id = %s", " AND product_id = %s", [product_id]
    elif code is not None:
        where = " AND p.code = %s"
        net_where = " AND product_id = (SELECT id FROM products_product WHERE code = %s)"
        extra = [code]
    else:
        where, net_where, extra = "", "", []
    holdings, grant_rows, net = [], [], {}
    with connection.cursor() as cursor:
        cursor.execute(_SQL_BALANCES.format(where=where, net_where=net_where),
                       [now, now, team.pk, first_day, last_day, *extra, team.pk, *extra])
        for checked_out, grants, net_used, *product_values in cursor.fetchall():
            product = from_row(Product, _PRODUCT_FIELDS, product_values)
            holdings.append(_Holding(product, checked_out))
            if isinstance(grants, str):  # json arrives parsed; as text if a loader for it says so
                grants = json.loads(grants)
            for pk, quantity, refresh, starts_at, ends_at, lot_start, lot_remaining in grants or ():
                grant_rows.append((pk, product.pk, quantity, refresh, _timestamp(starts_at), _timestamp(ends_at),
                                   _timestamp(lot_start), lot_remaining))
            if net_used is not None:
                net[product.pk] = net_used
    return holdings, grant_rows, net


def _timestamp(value: str | None) -> datetime | None:
    """A timestamptz from PostgreSQL's JSON (ISO 8601 with its offset)."""
    return datetime.fromisoformat(value) if value is not None else None


_PRODUCT_FIELDS = Product._meta.concrete_fields
_SQL_BALANCES = (
    "SELECT tp.checked_out,"
    # Every unrevoked grant with its lot in force now, if any (see _read_orm).
    " (SELECT json_agg(json_build_array(g.id, g.quantity, g.refresh, g.starts_at, g.ends_at,"
    "                                   l.period_start, l.remaining))"
    "    FROM products_grant g LEFT JOIN products_lot l ON l.grant_id = g.id AND l.closed_at IS NULL"
    "     AND l.period_start <= %s AND l.expires_at > %s"
    "   WHERE g.team_id = tp.team_id AND g.product_id = tp.product_id AND g.revoked_at IS NULL),"
    " n.net, "
    + columns(_PRODUCT_FIELDS, "p")
    + " FROM products_teamproduct tp JOIN products_product p ON p.id = tp.product_id"
    # The forecast window's net use, the team's products in one pass of the rollups (a
    # subquery per product scanned the whole team's window each time).
    " LEFT JOIN (SELECT product_id, sum(consumed - refunded)::bigint AS net FROM usage_dailyrollup"
    "             WHERE team_id = %s AND day >= %s AND day <= %s{net_where} GROUP BY product_id) n"
    "   ON n.product_id = tp.product_id"
    " WHERE tp.team_id = %s{where} ORDER BY p.name, tp.product_id"
)


def product_balance(team: Team, product: Product, *, now: datetime | None = None) -> Balance | None:
    balances = team_balances(team, now=now, product=product)
    return balances[0] if balances else None


def held_product_balance(team: Team, code: str, *, now: datetime | None = None) -> Balance | None:
    """The balance of the product ``code`` if the team holds it (has ever been granted it)."""
    balances = team_balances(team, now=now, code=code)
    return balances[0] if balances else None
