"""Monthly periods of a grant, anchored on its start day in the team's time zone.

Period k of a grant starting at local 2026-01-31 09:00 starts on the anchor day of
the k-th following month, clamped to the month's length (Feb 28, Mar 31, ...),
at the same wall-clock time. Pure functions: no database.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo


def _add_months(local: datetime, months: int, anchor_day: int) -> datetime:
    month_index = local.month - 1 + months
    year = local.year + month_index // 12
    month = month_index % 12 + 1
    day = min(anchor_day, calendar.monthrange(year, month)[1])
    return local.replace(year=year, month=month, day=day)


def period_start(starts_at: datetime, tz: ZoneInfo, k: int) -> datetime:
    """Start (aware, UTC-comparable) of the k-th monthly period of a grant."""
    local = starts_at.astimezone(tz)
    shifted = _add_months(local.replace(tzinfo=None), k, local.day)
    # fold=0: an ambiguous wall time (DST fall-back) resolves to its first occurrence.
    return shifted.replace(tzinfo=tz)


def period_index_at(starts_at: datetime, tz: ZoneInfo, at: datetime) -> int:
    """Index k of the monthly period containing ``at`` (-1 before the grant starts)."""
    if at < starts_at:
        return -1
    local_start = starts_at.astimezone(tz)
    local_at = at.astimezone(tz)
    k = (local_at.year - local_start.year) * 12 + (local_at.month - local_start.month)
    k = max(k, 0)
    while k > 0 and period_start(starts_at, tz, k) > at:
        k -= 1
    while period_start(starts_at, tz, k + 1) <= at:
        k += 1
    return k


def period_bounds(starts_at: datetime, ends_at: datetime, tz: ZoneInfo, k: int) -> tuple[datetime, datetime]:
    """(start, expiry) of period k; the last period is cut at the grant's end."""
    start = starts_at if k == 0 else period_start(starts_at, tz, k)
    return start, min(period_start(starts_at, tz, k + 1), ends_at)


def period_count(starts_at: datetime, ends_at: datetime, tz: ZoneInfo) -> int:
    """Number of monthly periods in a grant's term."""
    if ends_at <= starts_at:
        return 0
    # The period containing the instant just before the end is the last one.
    return period_index_at(starts_at, tz, ends_at - timedelta(microseconds=1)) + 1


def iter_periods(starts_at: datetime, ends_at: datetime, tz: ZoneInfo) -> Iterator[tuple[int, datetime, datetime]]:
    for k in range(period_count(starts_at, ends_at, tz)):
        start, end = period_bounds(starts_at, ends_at, tz, k)
        yield k, start, end


def local_days_until(target: datetime, now: datetime, tz: ZoneInfo) -> int:
    """Calendar days from ``now`` to ``target`` in the team's time zone."""
    return (target.astimezone(tz).date() - now.astimezone(tz).date()).days


def local_date(at: datetime, tz: ZoneInfo) -> date:
    return at.astimezone(tz).date()
