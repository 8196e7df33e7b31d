"""The balance selector's fixed SQL (PostgreSQL) reads exactly what its ORM reads do.

``products.selectors._read_sql`` replaces three querysets with one statement on PostgreSQL; the ORM version
stays the reference (and serves SQLite). Both run here on the same data, at several
moments, for every way the selector is called, and must give the same rows and the
same balances.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from products import selectors
from products.models import CapacityType, Product, Refresh, Source
from products.selectors import team_balances
from products.services import grant_revoke
from usage.actors import Actor
from usage.models import DailyRollup
from usage.services import usage_checkout, usage_consume

from .conftest import key
from .factories import ProductFactory, TeamFactory, make_grant

NOW = datetime(2026, 3, 10, 15, 0, tzinfo=UTC)
MOMENTS = [NOW, NOW + timedelta(days=25), NOW - timedelta(days=40), NOW + timedelta(days=800)]


@pytest.fixture
def world(require_postgres):
    team = TeamFactory(timezone="America/New_York")
    other = TeamFactory()
    tokens = ProductFactory(code="tokens", name="Tokens")
    units = ProductFactory(code="units", name="API units")
    seats = ProductFactory(code="seats", name="Seats", unit="seats", capacity_type=CapacityType.RETURNABLE)
    never = ProductFactory(code="never", name="Never granted")
    ProductFactory(code="zz-other", name="Other team only")

    make_grant(team, tokens, 1000, now=NOW, days=365)
    make_grant(team, tokens, 50, now=NOW, source=Source.PROMOTION, days=10)
    make_grant(team, tokens, 70, now=NOW, starts_at=NOW - timedelta(days=100), days=30)  # ended
    make_grant(team, tokens, 90, now=NOW, starts_at=NOW + timedelta(days=5), days=30)  # future
    revoked = make_grant(team, tokens, 500, now=NOW, days=100)
    grant_revoke(grant=revoked, now=NOW + timedelta(minutes=1))
    # Monthly: a period in force and periods whose lot is not created yet.
    make_grant(team, units, 300, now=NOW, refresh=Refresh.MONTHLY, starts_at=NOW - timedelta(days=3), days=200)
    make_grant(team, seats, 5, now=NOW, days=365)
    credits = ProductFactory(code="credits", name="Credits")
    make_grant(team, credits, 100, now=NOW, starts_at=NOW, days=30)  # its lot starts exactly at NOW
    make_grant(other, tokens, 777, now=NOW, days=365)
    make_grant(other, ProductFactory(code="zz-other"), 5, now=NOW, days=365)

    actor = Actor.system()
    usage_consume(team=team, product=tokens, quantity=120, idempotency_key=key(), actor=actor, now=NOW)
    usage_consume(team=team, product=units, quantity=40, idempotency_key=key(), actor=actor, now=NOW)
    usage_checkout(team=team, product=seats, quantity=2, checkout_id="c1", idempotency_key=key(), actor=actor,
                   now=NOW)
    usage_consume(team=other, product=tokens, quantity=7, idempotency_key=key(), actor=actor, now=NOW)
    usage_consume(team=team, product=credits, quantity=5, idempotency_key=key(), actor=actor, now=NOW)
    # Rollups inside and outside the forecast windows of the moments above.
    for ago in (1, 20, 29, 30, 45, 400):  # 29 days ago: the first day of NOW's 30-day window
        DailyRollup.objects.update_or_create(team=team, product=tokens, day=(NOW - timedelta(days=ago)).date(),
                                             defaults={"consumed": 10 * ago, "refunded": ago})
    return {"team": team, "tokens": tokens, "units": units, "seats": seats, "never": never, "credits": credits}


def _rows(read, team, now, **kwargs):
    first, last = selectors.forecast_window(selectors.local_date(now, team.tzinfo))
    holdings, grants, net = read(team, now, first, last, **kwargs)
    return (
        [(h.product.pk, [getattr(h.product, f.attname) for f in Product._meta.concrete_fields], h.checked_out)
         for h in holdings],
        sorted(tuple(g) for g in grants),
        {pid: int(v) for pid, v in net.items()},
    )


def _variants(w):
    return [
        {"product_id": None, "code": None},
        {"product_id": w["tokens"].pk, "code": None},
        {"product_id": w["seats"].pk, "code": None},
        {"product_id": w["never"].pk, "code": None},
        {"product_id": None, "code": "units"},
        {"product_id": None, "code": "zz-other"},  # held by the other team only
        {"product_id": None, "code": "no-such-code"},
    ]


@pytest.mark.parametrize("now", MOMENTS)
def test_sql_reads_the_same_rows_as_the_orm(world, now):
    team = world["team"]
    for kwargs in _variants(world):
        assert _rows(selectors._read_sql, team, now, **kwargs) == _rows(selectors._read_orm, team, now, **kwargs), kwargs


def test_the_reads_are_not_trivially_empty(world):
    holdings, grants, net = _rows(selectors._read_sql, world["team"], NOW, product_id=None, code=None)
    assert [pid for pid, _, _ in holdings] == [world[c].pk for c in ("units", "credits", "seats", "tokens")]
    assert len(grants) == 7  # tokens 4 (not the revoked one), 1 each for the others; none of the other team
    assert net == {world["tokens"].pk: 10 + 200 + 290 - 1 - 20 - 29 + 120, world["units"].pk: 40,
                   world["seats"].pk: 0, world["credits"].pk: 5}
    assert (NOW, 95) in {(g[6], g[7]) for g in grants}  # the lot whose period starts at NOW is in force


@pytest.mark.parametrize("now", MOMENTS)
def test_balances_are_the_same_through_either_read(world, now, monkeypatch):
    team = world["team"]
    calls = [{}, {"product": world["tokens"]}, {"code": "units"}, {"code": "seats"}]
    via_sql = [team_balances(team, now=now, **kwargs) for kwargs in calls]
    monkeypatch.setattr(selectors, "_read_sql", selectors._read_orm)
    via_orm = [team_balances(team, now=now, **kwargs) for kwargs in calls]
    assert via_sql == via_orm
    assert [b.product.code for b in via_sql[0]] == ["units", "credits", "seats", "tokens"]


def test_postgresql_uses_the_sql_read(world, django_assert_num_queries, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the ORM read ran on PostgreSQL")

    monkeypatch.setattr(selectors, "_read_orm", refuse)
    with django_assert_num_queries(1):
        balances = team_balances(world["team"], now=NOW)
    assert {b.product.code: b.available for b in balances} == {"tokens": 1050 - 120, "units": 260, "seats": 3,
                                                               "credits": 95}
