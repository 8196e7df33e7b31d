"""Property: rollup-based history == a direct aggregation of the ledger, over random histories.

Random operations (consume, metered, checkout, return, job refund) run through the real
services with explicit ``occurred_at`` in the last 30 days, in a non-UTC team time zone,
in time order (as services report them). Then every series (day/week/month, whole team
and per user) and every breakdown (by service, by user) from ``usage.history`` must
equal what a plain aggregation of ``LedgerEntry`` rows (and of the metered ``Event``
requests for raw usage) gives, bucketed by local day in Python.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from datetime import datetime, timedelta

import pytest
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from products.models import CapacityType
from usage.history import bucket_start, usage_breakdown, usage_series
from usage.models import Event, Kind, LedgerEntry
from usage.services import job_refund, usage_checkout, usage_consume, usage_metered, usage_return

from .conftest import key
from .factories import ProductFactory, TeamFactory, make_grant

ZONES = ["America/New_York", "Europe/Berlin", "Asia/Kolkata", "Australia/Lord_Howe", "Pacific/Chatham"]
USERS = ["ann@example.com", "ben@example.com", ""]
SERVICES = ["rendering", "simulation", ""]
FIELDS = ("consumed", "refunded", "checked_out", "returned", "raw_usage")
_counter = itertools.count()

op = st.tuples(
    st.sampled_from(["consume", "metered", "checkout", "return", "refund"]),
    st.integers(min_value=0, max_value=30 * 24 * 3600 - 1),  # seconds before now
    st.integers(min_value=1, max_value=60),                   # quantity
    st.integers(min_value=0, max_value=2),                    # user / service index
    st.integers(min_value=0, max_value=1000),                 # which earlier checkout / job
)


def run_history(team, products, ops, now, actor):
    """Execute ops in time order; returns/refunds pick among what exists so far."""
    tokens, api, pool = products
    checkouts: list[list] = []  # [checkout_id, outstanding]
    jobs: list[str] = []
    for kind, back, qty, who, pick in sorted(ops, key=lambda o: -o[1]):
        at = now - timedelta(seconds=back)
        n = next(_counter)
        user, service = USERS[who], SERVICES[(who + pick) % 3]
        common = dict(team=team, idempotency_key=key(), actor=actor, occurred_at=at, now=at)
        if kind == "consume":
            job = f"job-{n}" if pick % 2 else ""
            usage_consume(**common, product=tokens, quantity=qty, user=user, service=service, job_id=job)
            if job:
                jobs.append(job)
        elif kind == "metered":
            job = f"mjob-{n}"
            usage_metered(**common, product=api, quantity=qty, user=user, service=service, job_id=job)
            jobs.append(job)
        elif kind == "checkout":
            usage_checkout(**common, product=pool, quantity=qty, checkout_id=f"c{n}", user=user, service=service)
            checkouts.append([f"c{n}", qty])
        elif kind == "return":
            open_ = [c for c in checkouts if c[1] > 0]
            if open_:
                c = open_[pick % len(open_)]
                give = min(qty, c[1])
                usage_return(**common, product=pool, quantity=give, checkout_id=c[0])
                c[1] -= give
        elif kind == "refund" and jobs:
            # A job may have charged nothing (metered carry): then there is nothing to refund.
            job = jobs[pick % len(jobs)]
            if LedgerEntry.objects.for_team(team).filter(job_id=job, kind=Kind.CONSUME).exists():
                job_refund(team=team, job_id=job, idempotency_key=key(), actor=actor, now=at)


def ledger_days(team, product, user=None):
    """Per local day: amounts from the ledger (+ metered raw usage from the events)."""
    tz = team.tzinfo
    days: dict = defaultdict(lambda: dict.fromkeys(FIELDS, 0))
    rows = LedgerEntry.objects.for_team(team).filter(product=product)
    if user is not None:
        rows = rows.filter(user=user)
    column = {Kind.CONSUME: "consumed", Kind.REFUND: "refunded", Kind.CHECKOUT: "checked_out",
              Kind.RETURN: "returned"}
    for e in rows:
        name = column.get(e.kind)
        if name:
            days[e.occurred_at.astimezone(tz).date()][name] += e.delta if name == "refunded" else e.amount
    for ev in Event.objects.for_team(team).filter(operation="metered", request__product=product.code):
        if user is not None and ev.request.get("user", "") != user:
            continue
        at = datetime.fromisoformat(ev.request["occurred_at"])
        days[at.astimezone(tz).date()]["raw_usage"] += ev.request["quantity"]
    return days


def ledger_levels(team, pool):
    """(local day -> peak checked-out level that day, level before the first day) from the ledger."""
    tz = team.tzinfo
    level, peaks, closing = 0, {}, {}
    rows = (LedgerEntry.objects.for_team(team).filter(product=pool, kind__in=[Kind.CHECKOUT, Kind.RETURN])
            .order_by("occurred_at", "id"))
    for e in rows:
        level += e.amount if e.kind == Kind.CHECKOUT else -e.amount
        day = e.occurred_at.astimezone(tz).date()
        peaks[day] = max(peaks.get(day, 0), level)
        closing[day] = level
    return peaks, closing


def expected_series(team, product, start, end, granularity, user=None):
    days = ledger_days(team, product, user)
    peaks, closing = ledger_levels(team, product) if product.is_returnable and user is None else ({}, {})
    track_balance = user is None and not product.is_returnable
    # Balance over time: every ledger movement of the product, summed up to each local day.
    tz = team.tzinfo
    movements: dict = {}
    if track_balance:
        for e in LedgerEntry.objects.for_team(team).filter(product=product):
            d = e.occurred_at.astimezone(tz).date()
            movements[d] = movements.get(d, 0) + e.delta
    out: dict = {}
    level = balance = 0
    day = start - timedelta(days=400)
    while day <= end:
        opening = level
        level = closing.get(day, level)
        balance += movements.get(day, 0)
        if day >= start:
            b = out.setdefault(bucket_start(day, granularity),
                               {**dict.fromkeys(FIELDS + ("peak_checked_out",), 0), "available": None})
            for name in FIELDS:
                b[name] += days[day][name] if day in days else 0
            if product.is_returnable and user is None:
                b["peak_checked_out"] = max(b["peak_checked_out"], opening, peaks.get(day, opening))
            if track_balance:
                b["available"] = balance
        day += timedelta(days=1)
    return out


def expected_breakdown(team, product, start, end, by):
    tz = team.tzinfo
    acc: dict = defaultdict(lambda: dict.fromkeys(FIELDS, 0))
    column = {Kind.CONSUME: "consumed", Kind.REFUND: "refunded", Kind.CHECKOUT: "checked_out",
              Kind.RETURN: "returned"}
    for e in LedgerEntry.objects.for_team(team).filter(product=product):
        name = column.get(e.kind)
        if name and start <= e.occurred_at.astimezone(tz).date() <= end:
            acc[getattr(e, by)][name] += e.delta if name == "refunded" else e.amount
    for ev in Event.objects.for_team(team).filter(operation="metered", request__product=product.code):
        at = datetime.fromisoformat(ev.request["occurred_at"]).astimezone(tz).date()
        if start <= at <= end:
            acc[ev.request.get(by, "")]["raw_usage"] += ev.request["quantity"]
    return {k: v for k, v in acc.items() if any(v.values())}


@pytest.fixture
def catalog(db):
    tokens = ProductFactory(code="h-tokens", unit="tokens")
    api = ProductFactory(code="h-api", unit="units", metered=True, charge_unit_size=7, raw_unit="minutes")
    pool = ProductFactory(code="h-pool", unit="assets", capacity_type=CapacityType.RETURNABLE)
    return tokens, api, pool


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=25), zone=st.sampled_from(ZONES),
       granularity=st.sampled_from(["day", "week", "month"]))
def test_rollups_equal_ledger_aggregation(catalog, api_actor, ops, zone, granularity):
    n = next(_counter)
    team = TeamFactory(slug=f"hyp-{n}", timezone=zone)
    now = timezone.now()
    for product in catalog:
        make_grant(team, product, 1_000_000, starts_at=now - timedelta(days=60), days=400, now=now)
    run_history(team, catalog, ops, now, api_actor)

    today = now.astimezone(team.tzinfo).date()
    start, end = today - timedelta(days=31), today
    for product in catalog:
        got = usage_series(team=team, product=product, start=start, end=end, granularity=granularity)
        want = expected_series(team, product, start, end, granularity)
        assert {b.start: b.as_dict() | {"start": None} for b in got} == {
            s: {**v, "start": None} for s, v in want.items()
        }, product.code
        for user in USERS:
            mine = usage_series(team=team, product=product, start=start, end=end, granularity=granularity,
                                user=user)
            want_mine = expected_series(team, product, start, end, granularity, user=user)
            for b in mine:
                assert {f: getattr(b, f) for f in FIELDS} == {f: want_mine[b.start][f] for f in FIELDS}
        for by in ("service", "user"):
            rows = usage_breakdown(team=team, product=product, start=start, end=end, by=by)
            got_rows = {r.key: {f: getattr(r, f) for f in FIELDS} for r in rows}
            assert got_rows == expected_breakdown(team, product, start, end, by), (product.code, by)
            consumed = [r.consumed for r in rows]
            assert consumed == sorted(consumed, reverse=True)
