"""Balance selector: every card's numbers for a team in a constant number of queries."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import NamedTuple

from django.db.models import F, FilteredRelation, Q, Sum
from django.utils import timezone

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

    Three queries whatever the number of products: the holdings, the grants with their
    lots in force (one join), and the last 30 days' net consumption for the forecast. Correct at read time: a monthly
    period whose lot is not created yet counts as full (the lot appears on first use
    or with the refresh task), and lots past their end count for nothing.
    """
    now = now or timezone.now()
    tz = team.tzinfo
    holdings = (
        TeamProduct.objects.for_team(team).select_related("product")
        .defer("created_at", "refresh_checked_at", "refresh_due_at")  # the write path's, not shown
        .order_by("product__name", "product_id")
    )
    # Every unrevoked grant (the ended ones give "Expired" its date) with its lot in force
    # now, if any, in one LEFT JOIN: a monthly period whose lot is not created yet is full.
    grants_qs = Grant.objects.for_team(team).unrevoked().annotate(
        open_lot=FilteredRelation("lots", condition=Q(
            lots__closed_at__isnull=True, lots__period_start__lte=now, lots__expires_at__gt=now))
    )
    first_day, last_day = forecast_window(local_date(now, tz))
    usage_qs = DailyRollup.objects.for_team(team).filter(day__gte=first_day, day__lte=last_day)
    if product is not None:
        holdings = holdings.filter(product=product)
        grants_qs = grants_qs.filter(product=product)
        usage_qs = usage_qs.filter(product=product)
    if code is not None:  # one product by its code: no separate product lookup
        holdings = holdings.filter(product__code=code)
        grants_qs = grants_qs.filter(product__code=code)
        usage_qs = usage_qs.filter(product__code=code)
    holdings = list(holdings)
    # Plain rows, not model instances: building them was a third of a 50-product dashboard.
    grants: list[_GrantRow] = []
    lots: dict[tuple[int, datetime], int] = {}
    last_end: dict[int, datetime] = {}
    seen: set[int] = set()
    for *fields, lot_start, lot_remaining in grants_qs.values_list(
        *_GrantRow._fields, "open_lot__period_start", "open_lot__remaining"
    ):
        grant = _GrantRow(*fields)
        if grant.product_id not in last_end or grant.ends_at > last_end[grant.product_id]:
            last_end[grant.product_id] = grant.ends_at
        if lot_start is not None:
            lots[(grant.pk, lot_start)] = lot_remaining
        if grant.ends_at > now and grant.pk not in seen:
            seen.add(grant.pk)
            grants.append(grant)
    net_consumed = dict(
        usage_qs.values("product_id").annotate(net=Sum(F("consumed") - F("refunded"))).values_list("product_id", "net")
    )

    by_product: dict[int, dict] = {
        h.product_id: {"available": 0, "total": 0, "purchased": 0, "ends_at": None, "refreshes_at": None}
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
        acc = by_product[h.product_id]
        # With no active grant, show when the last one ended ("Expired").
        last = last_end.get(h.product_id)
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
            runs_out_in_days=runs_out_in_days(available=acc["available"], net_consumed=net_consumed.get(h.product_id, 0),
                                              now=now, horizon=horizon),
        ))
    return result


def product_balance(team: Team, product: Product, *, now: datetime | None = None) -> Balance | None:
    balances = team_balances(team, now=now, product=product)
    return balances[0] if balances else None


def held_product_balance(team: Team, code: str, *, now: datetime | None = None) -> Balance | None:
    """The balance of the product ``code`` if the team holds it (has ever been granted it)."""
    balances = team_balances(team, now=now, code=code)
    return balances[0] if balances else None
