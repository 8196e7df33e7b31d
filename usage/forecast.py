"""Forecast: "runs out in ~N days" at the last 30 days' net consumption rate.

Pure arithmetic on integers (no float): the selector (products.selectors.team_balances)
feeds it one aggregate query of DailyRollup for all products of a team.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta

WINDOW_DAYS = 30


def forecast_window(today: date) -> tuple[date, date]:
    """The last 30 local days, today included: (first day, last day)."""
    return today - timedelta(days=WINDOW_DAYS - 1), today


def runs_out_in_days(*, available: int, net_consumed: int, now: datetime, horizon: datetime | None,
                     window_days: int = WINDOW_DAYS) -> int | None:
    """ceil(available / daily rate), if the balance would run out before ``horizon``.

    ``net_consumed`` is consumption minus refunds over the window; the daily rate is
    ``net_consumed / window_days``. None when usage is flat or zero, when nothing is
    left, or when the run-out day is not before the horizon (the end of the capacity,
    or the next monthly refresh, whichever is first).
    """
    if net_consumed <= 0 or available <= 0:
        return None
    days = -(-available * window_days // net_consumed)  # ceil without float
    # Compared in seconds: now + timedelta(days=days) would overflow for a huge balance.
    if horizon is not None and days * 86400 >= (horizon - now).total_seconds():
        return None
    return days
