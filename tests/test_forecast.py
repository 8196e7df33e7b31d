"""Forecast: "runs out in ~N days" at the last 30 days' net rate, from fixed histories."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from products.models import Refresh
from products.selectors import product_balance, team_balances
from usage.actors import Actor
from usage.forecast import forecast_window, runs_out_in_days
from usage.models import DailyRollup
from usage.services import usage_consume

from .conftest import key
from .factories import ProductFactory, make_grant

NOW = datetime(2026, 6, 10, 12, 0, tzinfo=UTC)
TODAY = date(2026, 6, 10)


@pytest.mark.parametrize(("available", "net", "horizon_days", "expected"), [
    (100, 300, 365, 10),    # 10 a day: 10 days
    (101, 300, 365, 11),    # ceil
    (1, 300, 365, 1),
    (100, 300, 10, None),   # runs out on the end day: not before it
    (100, 300, 11, 10),
    (100, 0, 365, None),    # no usage
    (100, -5, 365, None),   # more refunded than consumed
    (0, 300, 365, None),    # already out
    (1000, 1, 365, None),   # 30000 days: after the end
    (10**15, 1, 365, None),  # far beyond what a timedelta can hold: no overflow
    (10**15, 1, 2_000_000, None),
])
def test_runs_out_in_days(available, net, horizon_days, expected):
    assert runs_out_in_days(available=available, net_consumed=net, now=NOW,
                            horizon=NOW + timedelta(days=horizon_days)) == expected


def test_window_is_the_last_30_local_days():
    assert forecast_window(TODAY) == (date(2026, 5, 12), TODAY)


def history(team, product, per_day: dict[int, tuple[int, int]]):
    """Fixed history: {days ago: (consumed, refunded)} as daily rollups."""
    for ago, (consumed, refunded) in per_day.items():
        DailyRollup.objects.update_or_create(team=team, product=product, day=TODAY - timedelta(days=ago),
                                             defaults={"consumed": consumed, "refunded": refunded})


@pytest.mark.django_db
def test_steady_use_forecasts_from_the_last_30_days(world):
    team, tokens = world["team"], world["tokens"]
    make_grant(team, tokens, 1000, now=NOW, days=365)
    history(team, tokens, {ago: (10, 0) for ago in range(30)})  # 300 in the window
    history(team, tokens, {ago: (500, 0) for ago in range(30, 60)})  # older: ignored
    usage_consume(team=team, product=tokens, quantity=400, idempotency_key=key(), actor=Actor.system(), now=NOW,
                  occurred_at=NOW - timedelta(days=90))  # 600 left; the rollup for 90 days ago is outside
    b = product_balance(team, tokens, now=NOW)
    assert b.available == 600
    assert b.runs_out_in_days == 60  # 600 / (300/30)


@pytest.mark.django_db
def test_refunds_count_against_consumption(world):
    team, tokens = world["team"], world["tokens"]
    make_grant(team, tokens, 100, now=NOW)
    history(team, tokens, {0: (200, 50), 29: (100, 0)})  # net 250 over 30 days
    assert product_balance(team, tokens, now=NOW).runs_out_in_days == 12  # ceil(100*30/250)


@pytest.mark.django_db
def test_flat_or_zero_usage_shows_nothing(world):
    team, tokens = world["team"], world["tokens"]
    make_grant(team, tokens, 100, now=NOW)
    assert product_balance(team, tokens, now=NOW).runs_out_in_days is None
    history(team, tokens, {3: (40, 40)})
    assert product_balance(team, tokens, now=NOW).runs_out_in_days is None


@pytest.mark.django_db
def test_nothing_when_the_capacity_ends_first(world):
    team, tokens = world["team"], world["tokens"]
    make_grant(team, tokens, 100, starts_at=NOW - timedelta(days=30), ends_at=NOW + timedelta(days=5), now=NOW)
    history(team, tokens, {ago: (1, 0) for ago in range(30)})  # 100 days at 1 a day
    assert product_balance(team, tokens, now=NOW).runs_out_in_days is None


@pytest.mark.django_db
def test_monthly_refresh_is_the_horizon(world):
    team, tokens = world["team"], world["tokens"]
    # Period 2026-06-01..07-01: refreshes in 21 days; the grant ends in a year.
    make_grant(team, tokens, 300, refresh=Refresh.MONTHLY, starts_at=datetime(2026, 5, 1, tzinfo=UTC),
               ends_at=datetime(2027, 5, 1, tzinfo=UTC), now=NOW)
    history(team, tokens, {ago: (10, 0) for ago in range(30)})
    assert product_balance(team, tokens, now=NOW).runs_out_in_days is None  # 30 days > 21: refreshed first
    history(team, tokens, {ago: (10, 0) for ago in range(30, 40)})  # outside: no change
    DailyRollup.objects.filter(day=TODAY).update(consumed=310)  # net 600 in 30 days: 20 a day
    assert product_balance(team, tokens, now=NOW).runs_out_in_days == 15


@pytest.mark.django_db
def test_forecast_is_per_product_and_per_team(world):
    team, tokens = world["team"], world["tokens"]
    other_product = ProductFactory(code="render-hours")
    make_grant(team, tokens, 100, now=NOW)
    make_grant(team, other_product, 100, now=NOW)
    make_grant(world["other"], tokens, 100, now=NOW)
    history(team, tokens, {0: (300, 0)})
    history(world["other"], tokens, {0: (3000, 0)})
    by_code = {b.product.code: b.runs_out_in_days for b in team_balances(team, now=NOW)}
    assert by_code == {"cloud-tokens": 10, "render-hours": None}
    assert product_balance(world["other"], tokens, now=NOW).runs_out_in_days == 1
