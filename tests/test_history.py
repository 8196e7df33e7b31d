"""usage.history: series, breakdowns and ranges served from the daily rollups."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from django.db import connection

from usage import history
from usage.history import (
    InvalidRange,
    bucket_starts,
    resolve_range,
    usage_breakdown,
    usage_series,
)
from usage.services import job_refund, usage_checkout, usage_consume, usage_metered, usage_return

from .conftest import key
from .factories import ProductFactory, make_grant

NY = ZoneInfo("America/New_York")
UTC = ZoneInfo("UTC")


def local(y, m, d, hh=12, mm=0, tz=NY):
    return datetime(y, m, d, hh, mm, tzinfo=tz)


@pytest.fixture
def ny(world):
    team = world["team"]
    team.timezone = "America/New_York"
    team.save()
    team.__dict__.pop("tzinfo", None)
    start = local(2025, 1, 1, 0, 0)
    make_grant(team, world["tokens"], 1_000_000, starts_at=start, ends_at=local(2028, 1, 1, 0, 0))
    make_grant(team, world["pool"], 1_000, starts_at=start, ends_at=local(2028, 1, 1, 0, 0))
    return world


def consume(world, qty, at, *, user="", service="", job_id="", product=None):
    return usage_consume(team=world["team"], product=product or world["tokens"], quantity=qty,
                         idempotency_key=key(), actor=world["actor"], user=user, service=service,
                         job_id=job_id, occurred_at=at)


@pytest.fixture
def w(ny, api_actor):
    ny["actor"] = api_actor
    return ny


def by_start(buckets):
    return {b.start: b for b in buckets}


def test_daily_series_is_zero_filled_and_inclusive(w):
    consume(w, 5, local(2026, 6, 2))
    consume(w, 7, local(2026, 6, 4))
    series = usage_series(team=w["team"], product=w["tokens"], start=date(2026, 6, 1), end=date(2026, 6, 5),
                          granularity="day")
    assert [b.start for b in series] == [date(2026, 6, d) for d in range(1, 6)]
    assert [b.consumed for b in series] == [0, 5, 0, 7, 0]


def test_dst_spring_forward_local_2330_lands_on_the_local_day(w):
    # 2026-03-08 02:00 EST -> 03:00 EDT. Local 23:30 is 04:30Z before and 03:30Z after.
    consume(w, 1, local(2026, 3, 7, 23, 30))
    consume(w, 10, local(2026, 3, 8, 23, 30))
    consume(w, 100, local(2026, 3, 9, 0, 30))
    assert local(2026, 3, 7, 23, 30).astimezone(UTC).date() == date(2026, 3, 8)
    days = by_start(usage_series(team=w["team"], product=w["tokens"], start=date(2026, 3, 6),
                                 end=date(2026, 3, 10), granularity="day"))
    assert days[date(2026, 3, 7)].consumed == 1
    assert days[date(2026, 3, 8)].consumed == 10
    assert days[date(2026, 3, 9)].consumed == 100


def test_dst_fall_back_local_2330_lands_on_the_local_day(w):
    # 2026-11-01 02:00 EDT -> 01:00 EST: the local day has 25 hours.
    consume(w, 2, local(2026, 10, 31, 23, 30))
    consume(w, 20, local(2026, 11, 1, 23, 30))
    consume(w, 200, local(2026, 11, 1, 1, 30).replace(fold=1))  # the second 01:30 (EST)
    assert local(2026, 11, 1, 23, 30).astimezone(UTC).date() == date(2026, 11, 2)
    days = by_start(usage_series(team=w["team"], product=w["tokens"], start=date(2026, 10, 31),
                                 end=date(2026, 11, 2), granularity="day"))
    assert days[date(2026, 10, 31)].consumed == 2
    assert days[date(2026, 11, 1)].consumed == 220
    assert days[date(2026, 11, 2)].consumed == 0


def test_iso_week_spanning_new_year(w, settings):
    w["team"].timezone = "UTC"
    w["team"].save()
    w["team"].__dict__.pop("tzinfo", None)
    consume(w, 3, local(2026, 12, 28, tz=UTC))
    consume(w, 4, local(2027, 1, 3, 23, 59, tz=UTC))
    consume(w, 50, local(2027, 1, 4, tz=UTC))
    assert date(2026, 12, 28).isocalendar()[:2] == (2026, 53)
    assert date(2027, 1, 3).isocalendar()[:2] == (2026, 53)
    weeks = usage_series(team=w["team"], product=w["tokens"], start=date(2026, 12, 21), end=date(2027, 1, 10),
                         granularity="week")
    assert [b.start for b in weeks] == [date(2026, 12, 21), date(2026, 12, 28), date(2027, 1, 4)]
    assert [b.consumed for b in weeks] == [0, 7, 50]


def test_monthly_buckets_and_partial_edges(w):
    consume(w, 1, local(2026, 1, 31))
    consume(w, 2, local(2026, 2, 1))
    consume(w, 4, local(2026, 2, 28))
    consume(w, 8, local(2026, 3, 15))
    months = usage_series(team=w["team"], product=w["tokens"], start=date(2026, 1, 31), end=date(2026, 3, 10),
                          granularity="month")
    assert [(b.start, b.consumed) for b in months] == [
        (date(2026, 1, 1), 1), (date(2026, 2, 1), 6), (date(2026, 3, 1), 0),
    ]


def test_refunds_and_metered_raw_usage(w):
    metered = ProductFactory(code="render-api", metered=True, charge_unit_size=20, raw_unit="minutes")
    make_grant(w["team"], metered, 1000, starts_at=local(2025, 1, 1), ends_at=local(2028, 1, 1))
    consume(w, 9, local(2026, 5, 5), job_id="j1")
    job_refund(team=w["team"], job_id="j1", idempotency_key=key(), actor=w["actor"],
               now=local(2026, 5, 6, 9))
    usage_metered(team=w["team"], product=metered, quantity=50, idempotency_key=key(), actor=w["actor"],
                  occurred_at=local(2026, 5, 5))
    days = by_start(usage_series(team=w["team"], product=w["tokens"], start=date(2026, 5, 5),
                                 end=date(2026, 5, 6), granularity="day"))
    assert (days[date(2026, 5, 5)].consumed, days[date(2026, 5, 6)].refunded) == (9, 9)
    api = usage_series(team=w["team"], product=metered, start=date(2026, 5, 5), end=date(2026, 5, 5),
                       granularity="day")
    assert (api[0].raw_usage, api[0].consumed) == (50, 2)


def test_returnable_peak_carries_forward_and_includes_opening_level(w):
    pool = w["pool"]
    common = dict(team=w["team"], product=pool, actor=w["actor"])
    usage_checkout(**common, quantity=5, checkout_id="a", idempotency_key=key(), occurred_at=local(2026, 4, 1, 9))
    usage_checkout(**common, quantity=3, checkout_id="b", idempotency_key=key(), occurred_at=local(2026, 4, 1, 10))
    usage_return(**common, quantity=3, checkout_id="b", idempotency_key=key(), occurred_at=local(2026, 4, 1, 11))
    # Nothing on Apr 2-3: 5 stays out. Apr 4 returns everything at 08:00.
    usage_return(**common, quantity=5, checkout_id="a", idempotency_key=key(), occurred_at=local(2026, 4, 4, 8))
    days = usage_series(team=w["team"], product=pool, start=date(2026, 4, 1), end=date(2026, 4, 5),
                        granularity="day")
    assert [b.peak_checked_out for b in days] == [8, 5, 5, 5, 0]
    assert [b.returned for b in days] == [3, 0, 0, 5, 0]
    # A range starting after the checkouts carries the level in from before it.
    later = usage_series(team=w["team"], product=pool, start=date(2026, 4, 2), end=date(2026, 4, 3),
                         granularity="day")
    assert [b.peak_checked_out for b in later] == [5, 5]
    week = usage_series(team=w["team"], product=pool, start=date(2026, 3, 30), end=date(2026, 4, 5),
                        granularity="week")
    assert [(b.checked_out, b.returned, b.peak_checked_out) for b in week] == [(8, 8, 8)]


def test_user_filter_and_breakdowns(w):
    consume(w, 5, local(2026, 7, 1), user="a@example.com", service="rendering")
    consume(w, 7, local(2026, 7, 2), user="b@example.com", service="rendering")
    consume(w, 11, local(2026, 7, 2), user="a@example.com", service="analysis")
    consume(w, 1, local(2026, 7, 3))
    args = dict(team=w["team"], product=w["tokens"], start=date(2026, 7, 1), end=date(2026, 7, 31))
    mine = usage_series(**args, granularity="day", user="a@example.com")
    assert sum(b.consumed for b in mine) == 16
    assert [(r.key, r.consumed) for r in usage_breakdown(**args, by="service")] == [
        ("rendering", 12), ("analysis", 11), ("", 1),
    ]
    assert [(r.key, r.consumed) for r in usage_breakdown(**args, by="user")] == [
        ("a@example.com", 16), ("b@example.com", 7), ("", 1),
    ]
    assert [(r.key, r.consumed) for r in usage_breakdown(**args, by="service", user="b@example.com")] == [
        ("rendering", 7),
    ]


def test_other_teams_rollups_never_show(w):
    other = w["other"]
    make_grant(other, w["tokens"], 100, starts_at=local(2025, 1, 1), ends_at=local(2028, 1, 1))
    usage_consume(team=other, product=w["tokens"], quantity=9, idempotency_key=key(), actor=w["actor"],
                  occurred_at=local(2026, 8, 1))
    series = usage_series(team=w["team"], product=w["tokens"], start=date(2026, 8, 1), end=date(2026, 8, 1),
                          granularity="day")
    assert series[0].consumed == 0
    assert usage_breakdown(team=w["team"], product=w["tokens"], start=date(2026, 8, 1), end=date(2026, 8, 1),
                           by="user") == []


def test_one_year_daily_series_is_one_query(w, django_assert_num_queries):
    consume(w, 40, local(2025, 11, 15))  # before the range: part of the balance carried in
    for i in range(0, 365, 7):
        consume(w, 1, local(2025, 12, 1) + timedelta(days=i))
    with django_assert_num_queries(1):  # the range's rollups and the balance carried in (UNION ALL)
        series = usage_series(team=w["team"], product=w["tokens"], start=date(2025, 12, 1),
                              end=date(2026, 11, 30), granularity="day")
    assert len(series) == 365 and sum(b.consumed for b in series) == 53
    # The balance line: granted 1,000,000 on 2025-01-01, 40 used before the range, 1 on its first day...
    assert series[0].available == 1_000_000 - 40 - 1
    # ... and each day's closing balance falls by what that day used.
    assert all(a.available - b.available == b.net_consumed for a, b in zip(series, series[1:], strict=False))
    assert series[-1].available == 1_000_000 - 40 - 53
    assert all(type(v) is int for b in series for v in (b.consumed, b.refunded, b.available))
    # A range with nothing before it carries nothing in (no NULL-day row at all).
    first = usage_series(team=w["team"], product=w["tokens"], start=date(2024, 12, 30), end=date(2025, 1, 2),
                         granularity="day")
    assert [b.available for b in first] == [0, 0, 1_000_000, 1_000_000]
    # Returnable: plus the level carried in (in the same statement on PostgreSQL).
    with django_assert_num_queries(1 if connection.vendor == "postgresql" else 2):
        usage_series(team=w["team"], product=w["pool"], start=date(2025, 12, 1), end=date(2026, 11, 30),
                     granularity="day")
    with django_assert_num_queries(1):
        usage_breakdown(team=w["team"], product=w["tokens"], start=date(2025, 12, 1), end=date(2026, 11, 30),
                        by="service")


@pytest.mark.parametrize("granularity", ["hour", "", "DAY"])
def test_bad_granularity_is_a_clear_error(w, granularity):
    with pytest.raises(InvalidRange):
        usage_series(team=w["team"], product=w["tokens"], start=date(2026, 1, 1), end=date(2026, 1, 2),
                     granularity=granularity)


def test_bad_series_spans(w):
    with pytest.raises(InvalidRange):
        usage_series(team=w["team"], product=w["tokens"], start=date(2026, 1, 2), end=date(2026, 1, 1),
                     granularity="day")
    with pytest.raises(InvalidRange):
        usage_series(team=w["team"], product=w["tokens"], start=date(2020, 1, 1), end=date(2026, 1, 1),
                     granularity="day")
    with pytest.raises(InvalidRange):
        usage_breakdown(team=w["team"], product=w["tokens"], start=date(2026, 1, 1), end=date(2026, 1, 1),
                        by="team")


TODAY = date(2026, 11, 24)


@pytest.mark.parametrize(("range_key", "start"), [
    ("month", date(2026, 11, 1)), ("3m", date(2026, 9, 1)), ("6m", date(2026, 6, 1)),
    ("12m", date(2025, 12, 1)),
])
def test_named_ranges(w, range_key, start):
    got_start, got_end, label = resolve_range(team=w["team"], range_key=range_key, start=None, end=None,
                                              today=TODAY)
    assert (got_start, got_end) == (start, TODAY)
    assert label


def test_custom_range(w):
    assert resolve_range(team=w["team"], range_key="custom", start=date(2026, 1, 1), end=date(2026, 2, 1),
                         today=TODAY)[:2] == (date(2026, 1, 1), date(2026, 2, 1))
    assert resolve_range(team=w["team"], range_key="custom", start=date(2023, 11, 24), end=TODAY,
                         today=TODAY)[:2] == (date(2023, 11, 24), TODAY)


@pytest.mark.parametrize(("start", "end", "message"), [
    (date(2026, 2, 1), date(2026, 1, 1), "on or before"),
    (date(2026, 11, 1), date(2026, 11, 25), "after today"),
    (date(2023, 11, 23), TODAY, "3 years"),
    (None, TODAY, "needs both"),
])
def test_custom_range_errors(w, start, end, message):
    with pytest.raises(InvalidRange, match=message):
        resolve_range(team=w["team"], range_key="custom", start=start, end=end, today=TODAY)


def test_unknown_range_key(w):
    with pytest.raises(InvalidRange):
        resolve_range(team=w["team"], range_key="forever", start=None, end=None, today=TODAY)


def test_today_is_the_teams_local_date(w, monkeypatch):
    from django.utils import timezone

    # 03:00Z on Nov 24 is still Nov 23 in New York.
    monkeypatch.setattr(timezone, "now", lambda: datetime(2026, 11, 24, 3, 0, tzinfo=UTC))
    start, end, _ = resolve_range(team=w["team"], range_key="month", start=None, end=None)
    assert (start, end) == (date(2026, 11, 1), date(2026, 11, 23))


def test_bucket_starts_weeks_are_mondays():
    starts = bucket_starts(date(2026, 12, 31), date(2027, 1, 12), "week")
    assert starts == [date(2026, 12, 28), date(2027, 1, 4), date(2027, 1, 11)]
    assert all(s.weekday() == 0 for s in starts)


def test_postgresql_fixed_sql_reads_the_same_rows_as_the_orm(w, require_postgres):
    """usage_series reads a whole team's rollups with fixed SQL on PostgreSQL; the ORM
    read stays the reference (SQLite). Same rows and the same value carried in."""
    pool = w["pool"]
    common = dict(team=w["team"], product=pool, actor=w["actor"])
    consume(w, 40, local(2025, 11, 15))
    consume(w, 3, local(2026, 2, 28, 23, 30), job_id="j1")
    job_refund(team=w["team"], job_id="j1", idempotency_key=key(), actor=w["actor"])
    for i in range(0, 120, 9):
        consume(w, i + 1, local(2026, 1, 1) + timedelta(days=i))
    usage_checkout(**common, quantity=5, checkout_id="a", idempotency_key=key(), occurred_at=local(2026, 1, 5, 9))
    usage_return(**common, quantity=2, checkout_id="a", idempotency_key=key(), occurred_at=local(2026, 2, 5, 9))
    ranges = [(date(2024, 1, 1), date(2024, 12, 31)), (date(2024, 12, 1), date(2025, 2, 1)),
              (date(2026, 1, 10), date(2026, 3, 31)), (date(2025, 12, 1), date(2026, 11, 30)),
              (date(2026, 6, 1), date(2026, 6, 1))]
    for product in (w["tokens"], pool):
        for start, end in ranges:
            kwargs = dict(track_balance=not product.is_returnable, track_level=product.is_returnable)
            sql = history._team_rows_sql(w["team"], product, start, end, **kwargs)
            orm = history._team_rows_orm(w["team"], product, start, end, **kwargs)
            assert (sorted(sql[0]), sql[1:]) == (sorted(orm[0]), orm[1:]), (product.code, start, end)
    # Not vacuous: the year's range has rows and carries both kinds of value in.
    rows, _, balance = history._team_rows_sql(w["team"], w["tokens"], date(2026, 1, 10), date(2026, 3, 31),
                                              track_balance=True, track_level=False)
    assert len(rows) > 5 and balance == 1_000_000 - 40 - 1  # the grant, Nov 15th and Jan 1st
    _, level, _ = history._team_rows_sql(w["team"], pool, date(2026, 3, 1), date(2026, 3, 31),
                                         track_balance=False, track_level=True)
    assert level == 3


def test_a_users_daily_level_never_shows_below_zero(w):
    """A return reported as earlier than its checkout leaves one person's running level
    below zero for a while; the daily view shows 0 then, as the weekly view does."""
    pool = w["pool"]
    common = dict(team=w["team"], product=pool, actor=w["actor"])
    usage_checkout(**common, quantity=4, checkout_id="late", user="a@example.com", idempotency_key=key(),
                   occurred_at=local(2026, 5, 3, 9))
    usage_return(**common, quantity=4, checkout_id="late", idempotency_key=key(), occurred_at=local(2026, 5, 1, 9))
    args = dict(team=w["team"], product=pool, start=date(2026, 5, 1), end=date(2026, 5, 4), user="a@example.com")
    days = usage_series(**args, granularity="day")
    assert [b.peak_checked_out for b in days] == [0, 0, 0, 0]
    assert [b.peak_checked_out for b in usage_series(**args, granularity="week")] == [0, 0]
