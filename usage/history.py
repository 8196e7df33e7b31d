"""Usage history selectors: series, breakdowns and ranges, served from the daily rollups.

Everything here reads ``DailyRollup`` / ``DailyBreakdown`` only (the write path keeps
them exact in its own transaction), so a year of daily history is one or two
queries and never scans the ledger. Days are local days in the team's time zone.
"""

from __future__ import annotations

import calendar
from dataclasses import asdict, dataclass
from datetime import date, timedelta

from django.db import connection
from django.db.models import BigIntegerField, DateField, F, Sum, Value
from django.db.models.functions import Cast
from django.utils import timezone

from products.models import Product
from teams.models import Team

from .errors import InvalidRequest
from .models import DailyBreakdown, DailyRollup

GRANULARITIES = ("day", "week", "month")
BREAKDOWNS = ("service", "user")
RANGE_KEYS = ("month", "3m", "6m", "12m", "custom")
MAX_SPAN_YEARS = 3
# A series never has more than about three years of days (the custom range limit).
MAX_SERIES_DAYS = 3 * 366 + 31

AMOUNT_FIELDS = ("consumed", "refunded", "checked_out", "returned", "raw_usage")


class InvalidRange(InvalidRequest):
    """A range or granularity the history cannot serve (shown to the user, 422 in the API)."""


@dataclass
class Bucket:
    """One day, ISO week (``start`` is its Monday) or month (``start`` is the 1st).

    Amounts count only days inside the requested range (the first and last
    buckets may be partial). ``peak_checked_out`` is the highest checked-out level
    held during the bucket; a user-filtered series has no intraday levels per user,
    so there it is the user's highest end-of-day holding.
    """

    start: date
    consumed: int = 0
    refunded: int = 0
    checked_out: int = 0
    returned: int = 0
    raw_usage: int = 0
    peak_checked_out: int = 0
    # Exhaustible products, whole team: the balance available at the end of the bucket.
    available: int | None = None

    @property
    def net_consumed(self) -> int:
        return self.consumed - self.refunded

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class BreakdownRow:
    key: str
    consumed: int = 0
    refunded: int = 0
    checked_out: int = 0
    returned: int = 0
    raw_usage: int = 0

    @property
    def net_consumed(self) -> int:
        return self.consumed - self.refunded

    def as_dict(self) -> dict:
        return asdict(self)


# -- buckets -----------------------------------------------------------------------------


def bucket_start(day: date, granularity: str) -> date:
    if granularity == "day":
        return day
    if granularity == "week":
        return day - timedelta(days=day.weekday())  # ISO week: Monday
    if granularity == "month":
        return day.replace(day=1)
    raise InvalidRange(f"granularity must be one of {', '.join(GRANULARITIES)}.")


def next_bucket(start: date, granularity: str) -> date:
    if granularity == "day":
        return start + timedelta(days=1)
    if granularity == "week":
        return start + timedelta(days=7)
    return _add_months(start, 1)


def bucket_starts(start: date, end: date, granularity: str) -> list[date]:
    """Every bucket touching [start, end], in order."""
    if granularity == "day":
        return [start + timedelta(days=i) for i in range((end - start).days + 1)]
    current = bucket_start(start, granularity)
    out = []
    while current <= end:
        out.append(current)
        current = next_bucket(current, granularity)
    return out


def _add_months(day: date, months: int) -> date:
    index = day.year * 12 + day.month - 1 + months
    year, month = divmod(index, 12)
    month += 1
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def _check_span(start: date, end: date) -> None:
    if not isinstance(start, date) or not isinstance(end, date):
        raise InvalidRange("from and to must be dates (YYYY-MM-DD).")
    if start > end:
        raise InvalidRange("The start date must be on or before the end date.")
    if (end - start).days + 1 > MAX_SERIES_DAYS:
        raise InvalidRange(f"A range can span at most {MAX_SPAN_YEARS} years.")


# -- series ------------------------------------------------------------------------------


def usage_series(*, team: Team, product: Product, start: date, end: date, granularity: str,
                 user: str | None = None) -> list[Bucket]:
    """Usage per bucket over [start, end] (inclusive local dates), every bucket zero-filled.

    Reads the range's rollup rows and the level carried in from before the range
    (checked out for a returnable product; the balance available for an exhaustible
    one, from the capacity granted and expired and the net use per day): one query for
    the whole team on PostgreSQL, up to two per user or elsewhere.
    """
    _check_span(start, end)
    bucket_start(start, granularity)  # validates the granularity
    track_level = product.is_returnable
    track_balance = user is None and not product.is_returnable
    balance = 0
    # Rows are tuples (see _team_rows_orm); no model instances or dicts on a year-long page.
    if user is None:
        read = _team_rows_sql if connection.vendor == "postgresql" else _team_rows_orm
        rows, opening, balance = read(team, product, start, end, track_balance=track_balance,
                                      track_level=track_level)
    else:
        # One person's rows, whatever case the service wrote their email in (the ledger links
        # a member the same way).
        sums = (
            DailyBreakdown.objects.for_team(team)
            .filter(product=product, user__iexact=user, day__range=(start, end))
            .values("day")
            .annotate(**{name: Sum(name) for name in AMOUNT_FIELDS})
            .order_by("day")
            .values_list("day", *AMOUNT_FIELDS)
        )
        opening = 0
        if track_level:
            before = (
                DailyBreakdown.objects.for_team(team)
                .filter(product=product, user__iexact=user, day__lt=start)
                .aggregate(out=Sum("checked_out"), back=Sum("returned"))
            )
            opening = (before["out"] or 0) - (before["back"] or 0)
        level = opening
        rows = []
        for row in sums:  # the user's holding at the end of each day
            level += (row[3] or 0) - (row[4] or 0)
            rows.append((*row, level, level, 0))

    by_day = {row[0]: row for row in rows}
    closing = opening
    one_day = timedelta(days=1)
    result = []
    if granularity == "day":  # one bucket per day: no inner walk (a year-long page's case)
        day = start
        while day <= end:
            row = by_day.get(day)
            if row is None:  # nothing happened: yesterday's level held all day
                result.append(Bucket(day, 0, 0, 0, 0, 0, max(closing, 0) if track_level else 0,
                                     balance if track_balance else None))
            else:
                _, c, r, o, b, u, row_peak, row_closing, capacity = row
                c, r = c or 0, r or 0
                peak = (row_peak or 0) if user is not None else max(row_peak or 0, closing)
                closing = row_closing or 0
                if track_balance:
                    balance += (capacity or 0) - c + r
                result.append(Bucket(day, c, r, o or 0, b or 0, u or 0, max(peak, 0) if track_level else 0,
                                     balance if track_balance else None))
            day += one_day
        return result
    # Weeks and months: a Python walk over at most ~1100 days, bucket by bucket (no query
    # per day; the sums kept in locals).
    for first in bucket_starts(start, end, granularity):
        consumed = refunded = checked_out = returned = raw_usage = 0
        peak_max = 0
        day = first if first > start else start
        last = next_bucket(first, granularity) - one_day
        if last > end:
            last = end
        while day <= last:
            row = by_day.get(day)
            if row is None:
                peak = closing  # nothing happened: yesterday's level held all day
            else:
                _, c, r, o, b, u, row_peak, row_closing, capacity = row
                consumed += c or 0
                refunded += r or 0
                checked_out += o or 0
                returned += b or 0
                raw_usage += u or 0
                # The whole team's day opened at yesterday's closing level, which the
                # rollup's peak (the highest level after a write) does not include.
                peak = (row_peak or 0) if user is not None else max(row_peak or 0, closing)
                closing = row_closing or 0
                if track_balance:
                    balance += (capacity or 0) - (c or 0) + (r or 0)
            if peak > peak_max:
                peak_max = peak
            day += one_day
        result.append(Bucket(
            start=first, consumed=consumed, refunded=refunded, checked_out=checked_out, returned=returned,
            raw_usage=raw_usage, peak_checked_out=peak_max if track_level else 0,
            available=balance if track_balance else None,
        ))
    return result


def _team_rows_orm(team: Team, product: Product, start: date, end: date, *, track_balance: bool,
                   track_level: bool) -> tuple[list[tuple], int, int]:
    """(the range's rollup rows, the level carried in, the balance carried in) through the ORM.

    Rows are tuples: (day, consumed, refunded, checked_out, returned, raw_usage, peak,
    closing, granted - expired); no model instances or dicts on a year-long page.
    """
    rows_qs = (
        DailyRollup.objects.for_team(team)
        .filter(product=product, day__range=(start, end))
        .values_list("day", *AMOUNT_FIELDS, "peak_checked_out", "closing_checked_out", F("granted") - F("expired"))
    )
    opening = balance = 0
    if track_balance:
        # The balance carried in from before the range rides along in the same query:
        # one extra row whose day is NULL (UNION ALL; none if nothing came before).
        before = (
            DailyRollup.objects.for_team(team)
            .filter(product=product, day__lt=start)
            .values("product_id")
            # (bigint like the columns it shares: PostgreSQL's SUM is numeric otherwise)
            .annotate(net=Cast(Sum(F("granted") - F("consumed") + F("refunded") - F("expired")),
                               BigIntegerField()))
            .values_list(Value(None, output_field=DateField()), "net", *[Value(0)] * 7)
        )
        rows = []
        for row in rows_qs.union(before, all=True):
            if row[0] is None:
                balance = row[1] or 0
            else:
                rows.append(row)
    else:
        rows = list(rows_qs)
    if track_level:
        opening = (
            DailyRollup.objects.for_team(team)
            .filter(product=product, day__lt=start)
            .order_by("-day")
            .values_list("closing_checked_out", flat=True)
            .first()
        ) or 0
    return rows, opening, balance


def _team_rows_sql(team: Team, product: Product, start: date, end: date, *, track_balance: bool,
                   track_level: bool) -> tuple[list[tuple], int, int]:
    """``_team_rows_orm`` as one fixed statement (PostgreSQL): compiling the union cost
    more than running it. ``tests/test_history.py`` holds the two to the same rows."""
    sql = _SQL_ROWS
    params = [team.pk, product.pk, start, end]
    if track_balance or track_level:  # the value carried in: one row whose day is NULL
        sql += " UNION ALL " + (_SQL_BALANCE_BEFORE if track_balance else _SQL_LEVEL_BEFORE)
        params += [team.pk, product.pk, start]
    rows = []
    carried = 0
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        for row in cursor.fetchall():
            if row[0] is None:
                carried = row[1] or 0
            else:
                rows.append(row)
    return rows, (carried if track_level else 0), (carried if track_balance else 0)


_SQL_ROWS = (
    "SELECT day, consumed, refunded, checked_out, returned, raw_usage, peak_checked_out, closing_checked_out,"
    " granted - expired FROM usage_dailyrollup WHERE team_id = %s AND product_id = %s AND day BETWEEN %s AND %s"
)
_SQL_BALANCE_BEFORE = (
    "SELECT NULL, sum(granted - consumed + refunded - expired)::bigint, 0, 0, 0, 0, 0, 0, 0"
    " FROM usage_dailyrollup WHERE team_id = %s AND product_id = %s AND day < %s HAVING count(*) > 0"
)
_SQL_LEVEL_BEFORE = (
    "(SELECT NULL, closing_checked_out, 0, 0, 0, 0, 0, 0, 0"
    " FROM usage_dailyrollup WHERE team_id = %s AND product_id = %s AND day < %s ORDER BY day DESC LIMIT 1)"
)


# -- breakdowns --------------------------------------------------------------------------


def usage_breakdown(*, team: Team, product: Product, start: date, end: date, by: str,
                    user: str | None = None) -> list[BreakdownRow]:
    """Totals per service or per user over [start, end], most consumed first (one query)."""
    _check_span(start, end)
    if by not in BREAKDOWNS:
        raise InvalidRange(f"by must be one of {', '.join(BREAKDOWNS)}.")
    qs = DailyBreakdown.objects.for_team(team).filter(product=product, day__range=(start, end))
    if user is not None:
        qs = qs.filter(user__iexact=user)
    rows = (
        qs.values(by)
        .annotate(**{name: Sum(name) for name in AMOUNT_FIELDS})
        .order_by("-consumed", "-checked_out", "-raw_usage", by)
    )
    return [BreakdownRow(key=row[by], **{name: row[name] or 0 for name in AMOUNT_FIELDS}) for row in rows]


# -- ranges ------------------------------------------------------------------------------

RANGE_LABELS = {
    "month": "This month",
    "3m": "Last 3 months",
    "6m": "Last 6 months",
    "12m": "Last 12 months",
    "custom": "Custom range",
}


def team_today(team: Team) -> date:
    return timezone.now().astimezone(team.tzinfo).date()


def resolve_range(*, team: Team, range_key: str, start: date | None, end: date | None,
                  today: date | None = None) -> tuple[date, date, str]:
    """(start, end, label) of a named range, in the team's local dates.

    "month" is this calendar month so far; "3m"/"6m"/"12m" are the last N calendar
    months including this one (from the 1st, N-1 months back, to today); "custom"
    takes from/to, which must be ordered, not after today and at most 3 years apart.
    Raises :class:`InvalidRange` with a message for the user.
    """
    today = today or team_today(team)
    if range_key == "custom":
        if start is None or end is None:
            raise InvalidRange("A custom range needs both a from and a to date.")
        if start > end:
            raise InvalidRange("The from date must be on or before the to date.")
        if end > today:
            raise InvalidRange(f"The to date cannot be after today ({today.isoformat()}).")
        if start < _years_back(end, MAX_SPAN_YEARS):
            raise InvalidRange(f"A custom range can span at most {MAX_SPAN_YEARS} years.")
        return start, end, f"{start.isoformat()} to {end.isoformat()}"
    if range_key == "month":
        first = today.replace(day=1)
    elif range_key in ("3m", "6m", "12m"):
        months = int(range_key[:-1])
        first = _add_months(today.replace(day=1), -(months - 1))
    else:
        raise InvalidRange(f"range must be one of {', '.join(RANGE_KEYS)}.")
    return first, today, f"{RANGE_LABELS[range_key]} ({first.isoformat()} to {today.isoformat()})"


def _years_back(day: date, years: int) -> date:
    try:
        return day.replace(year=day.year - years)
    except ValueError:  # Feb 29 -> Feb 28
        return day.replace(year=day.year - years, day=28)
