"""The ledger core, rule by rule, with DESIGN.md's numbers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from django.db import IntegrityError, connection, transaction

from products.models import Lot, Refresh, Source
from products.selectors import product_balance, team_balances
from products.services import grant_revoke
from usage.errors import (
    CheckoutExceeded,
    IdempotencyConflict,
    InsufficientBalance,
    InvalidRequest,
    NotFound,
)
from usage.models import Event, Kind, LedgerEntry
from usage.services import job_refund, usage_checkout, usage_consume, usage_metered, usage_return

from .conftest import key
from .factories import ProductFactory, TeamFactory, make_grant

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 6, 10, 12, 0, tzinfo=UTC)


def consume(team, product, quantity, actor, **kw):
    return usage_consume(team=team, product=product, quantity=quantity, idempotency_key=kw.pop("k", key()),
                         actor=actor, now=kw.pop("now", NOW), **kw)


def lot_invariant_holds() -> bool:
    for lot in Lot.objects.all():
        deltas = sum(LedgerEntry.objects.filter(lot=lot).values_list("delta", flat=True))
        if lot.quantity + deltas != lot.remaining or lot.remaining < 0:
            return False
    return True


def test_140_of_150_available(world, api_actor):
    team, tokens = world["team"], world["tokens"]
    make_grant(team, tokens, 150, now=NOW)
    out = consume(team, tokens, 10, api_actor)
    assert out.status_code == 201
    assert (out.body["available"], out.body["total"]) == (140, 150)
    b = product_balance(team, tokens, now=NOW)
    assert (b.available, b.total, b.used) == (140, 150, 10)
    assert b.used_pct == Decimal("6.7")
    assert b.status == "ok"
    assert lot_invariant_holds()


@pytest.mark.parametrize(("available", "status"), [(31, "ok"), (30, "low"), (1, "low"), (0, "empty")])
def test_status_threshold_is_exact(world, api_actor, available, status):
    team, tokens = world["team"], world["tokens"]
    make_grant(team, tokens, 150, now=NOW)
    if available < 150:
        consume(team, tokens, 150 - available, api_actor)
    b = product_balance(team, tokens, now=NOW)
    assert (b.available, b.total, b.status) == (available, 150, status)


def test_used_pct_rounds_half_up(world, api_actor):
    team, tokens = world["team"], world["tokens"]
    make_grant(team, tokens, 2000, now=NOW)
    consume(team, tokens, 1, api_actor)  # 0.05% -> 0.1
    assert product_balance(team, tokens, now=NOW).used_pct == Decimal("0.1")


def test_no_capacity_is_a_neutral_card(world, api_actor):
    team, tokens = world["team"], world["tokens"]
    make_grant(team, tokens, 10, starts_at=NOW - timedelta(days=40), ends_at=NOW - timedelta(days=5), now=NOW)
    b = product_balance(team, tokens, now=NOW)
    assert (b.total, b.available, b.status, b.ends_label) == (0, 0, "empty", "Expired")


def test_overdraw_is_rejected_and_nothing_written(world, api_actor):
    team, tokens = world["team"], world["tokens"]
    make_grant(team, tokens, 150, now=NOW)
    consume(team, tokens, 100, api_actor)
    before = (LedgerEntry.objects.count(), Event.objects.count(), list(Lot.objects.values_list("remaining", flat=True)))
    with pytest.raises(InsufficientBalance):
        consume(team, tokens, 51, api_actor)
    after = (LedgerEntry.objects.count(), Event.objects.count(), list(Lot.objects.values_list("remaining", flat=True)))
    assert before == after
    assert product_balance(team, tokens, now=NOW).available == 50


def test_free_tier_is_spent_before_purchase(world, api_actor):
    team, tokens = world["team"], world["tokens"]
    purchase = make_grant(team, tokens, 100, source=Source.PURCHASE, days=30, now=NOW)
    free = make_grant(team, tokens, 20, source=Source.FREE_TIER, days=300, now=NOW)
    out = consume(team, tokens, 30, api_actor)
    rows = LedgerEntry.objects.filter(event_id=out.event_id).order_by("id")
    assert [(r.grant_id, r.delta) for r in rows] == [(free.pk, -20), (purchase.pk, -10)]


def test_earliest_expiry_first_then_smallest_remaining(world, api_actor):
    team, tokens = world["team"], world["tokens"]
    late = make_grant(team, tokens, 50, days=90, now=NOW)
    early = make_grant(team, tokens, 50, days=30, now=NOW)
    out = consume(team, tokens, 60, api_actor)
    rows = list(LedgerEntry.objects.filter(event_id=out.event_id).order_by("id"))
    assert [(r.grant_id, r.delta) for r in rows] == [(early.pk, -50), (late.pk, -10)]
    # Same expiry: the smaller remaining pays first.
    team2 = TeamFactory()
    ends = NOW + timedelta(days=10)
    big = make_grant(team2, tokens, 80, ends_at=ends, now=NOW)
    small = make_grant(team2, tokens, 30, ends_at=ends, now=NOW)
    out = consume(team2, tokens, 5, api_actor)
    (row,) = LedgerEntry.objects.filter(event_id=out.event_id)
    assert row.grant_id == small.pk and big.pk != small.pk


def test_refund_goes_back_to_the_same_lots_once(world, api_actor):
    team, tokens = world["team"], world["tokens"]
    free = make_grant(team, tokens, 20, source=Source.FREE_TIER, now=NOW)
    purchase = make_grant(team, tokens, 100, now=NOW)
    consume(team, tokens, 5, api_actor, job_id="other-job")
    consume(team, tokens, 30, api_actor, job_id="job-1")  # 15 free + 15 purchase
    assert product_balance(team, tokens, now=NOW).available == 85
    out = job_refund(team=team, job_id="job-1", idempotency_key=key(), actor=api_actor, now=NOW)
    assert out.body["refunded"] == 30
    lots = {lot.grant_id: lot.remaining for lot in Lot.objects.all()}
    assert lots == {free.pk: 15, purchase.pk: 100}
    again = job_refund(team=team, job_id="job-1", idempotency_key=key(), actor=api_actor, now=NOW)
    assert again.body["refunded"] == 0
    assert product_balance(team, tokens, now=NOW).available == 115
    assert LedgerEntry.objects.filter(kind=Kind.REFUND).count() == 2
    assert lot_invariant_holds()


def test_refund_to_an_expired_lot_is_a_recorded_noop(world, api_actor):
    team, tokens = world["team"], world["tokens"]
    make_grant(team, tokens, 50, ends_at=NOW + timedelta(hours=1), now=NOW)
    consume(team, tokens, 10, api_actor, job_id="job-x")
    later = NOW + timedelta(hours=2)
    out = job_refund(team=team, job_id="job-x", idempotency_key=key(), actor=api_actor, now=later)
    assert (out.body["refunded"], out.body["restored"]) == (10, 0)
    row = LedgerEntry.objects.get(kind=Kind.REFUND)
    assert (row.delta, row.amount) == (0, 10)
    assert lot_invariant_holds()


def test_refund_of_unknown_job_is_not_found(world, api_actor):
    with pytest.raises(NotFound):
        job_refund(team=world["team"], job_id="nope", idempotency_key=key(), actor=api_actor, now=NOW)


def test_monthly_no_rollover_at_the_team_local_boundary(api_actor):
    ny = ZoneInfo("America/New_York")
    team = TeamFactory(timezone="America/New_York")
    tokens = ProductFactory(code="monthly-tokens")
    starts = datetime(2026, 1, 15, 0, 0, tzinfo=ny)
    make_grant(team, tokens, 100, refresh=Refresh.MONTHLY, starts_at=starts,
               ends_at=datetime(2027, 1, 15, tzinfo=ny), now=starts)
    before_boundary = datetime(2026, 2, 14, 23, 30, tzinfo=ny)  # 04:30 UTC on the 15th
    consume(team, tokens, 60, api_actor, now=before_boundary)
    assert product_balance(team, tokens, now=before_boundary).available == 40
    after_boundary = datetime(2026, 2, 15, 0, 30, tzinfo=ny)
    b = product_balance(team, tokens, now=after_boundary)
    assert (b.available, b.total) == (100, 100)  # nothing rolls over, even before the lot exists
    out = consume(team, tokens, 1, api_actor, now=after_boundary)
    assert (out.body["available"], out.body["total"]) == (99, 100)
    assert LedgerEntry.objects.filter(kind=Kind.EXPIRE).get().delta == -40
    assert LedgerEntry.objects.filter(kind=Kind.REFRESH).get().delta == 100
    assert b.refreshes_label == "Refreshes in 28 days"  # 2026-03-15
    assert b.purchased == 1200
    assert lot_invariant_holds()


def test_metered_units_carry_over(api_actor):
    team = TeamFactory()
    api = ProductFactory(code="render-api", metered=True, charge_unit_size=20, unit="units")
    make_grant(team, api, 100, now=NOW)
    first = usage_metered(team=team, product=api, quantity=10, idempotency_key=key(), actor=api_actor, now=NOW)
    assert (first.body["charged"], first.body["carried"], first.body["available"]) == (0, 10, 100)
    second = usage_metered(team=team, product=api, quantity=10, idempotency_key=key(), actor=api_actor, now=NOW)
    assert (second.body["charged"], second.body["carried"], second.body["available"]) == (1, 0, 99)
    third = usage_metered(team=team, product=api, quantity=45, idempotency_key=key(), actor=api_actor, now=NOW)
    assert (third.body["charged"], third.body["carried"]) == (2, 5)


def test_metered_on_plain_product_is_invalid(world, api_actor):
    with pytest.raises(InvalidRequest):
        usage_metered(team=world["team"], product=world["tokens"], quantity=1, idempotency_key=key(),
                      actor=api_actor, now=NOW)


def test_checkout_and_return(world, api_actor):
    team, pool = world["team"], world["pool"]
    make_grant(team, pool, 10, now=NOW)
    out = usage_checkout(team=team, product=pool, quantity=4, checkout_id="c1", idempotency_key=key(),
                         actor=api_actor, now=NOW)
    assert out.body["available"] == 6
    with pytest.raises(CheckoutExceeded):
        usage_return(team=team, product=pool, quantity=5, checkout_id="c1", idempotency_key=key(),
                     actor=api_actor, now=NOW)
    back = usage_return(team=team, product=pool, quantity=3, checkout_id="c1", idempotency_key=key(),
                        actor=api_actor, now=NOW)
    assert (back.body["available"], back.body["outstanding"]) == (9, 1)
    with pytest.raises(CheckoutExceeded):
        usage_return(team=team, product=pool, quantity=2, checkout_id="c1", idempotency_key=key(),
                     actor=api_actor, now=NOW)
    with pytest.raises(NotFound):
        usage_return(team=team, product=pool, quantity=1, checkout_id="nope", idempotency_key=key(),
                     actor=api_actor, now=NOW)
    with pytest.raises(InvalidRequest):
        consume(team, pool, 1, api_actor)
    assert lot_invariant_holds()


def test_return_after_lot_expired_restores_nothing(world, api_actor):
    team, pool = world["team"], world["pool"]
    make_grant(team, pool, 10, ends_at=NOW + timedelta(days=1), now=NOW)
    usage_checkout(team=team, product=pool, quantity=4, checkout_id="c1", idempotency_key=key(),
                   actor=api_actor, now=NOW)
    later = NOW + timedelta(days=2)
    out = usage_return(team=team, product=pool, quantity=4, checkout_id="c1", idempotency_key=key(),
                       actor=api_actor, now=later)
    assert (out.body["available"], out.body["outstanding"]) == (0, 0)
    row = LedgerEntry.objects.get(kind=Kind.RETURN)
    assert (row.delta, row.amount) == (0, 4)
    assert lot_invariant_holds()


def test_idempotent_replay_and_conflict(world, api_actor):
    team, tokens = world["team"], world["tokens"]
    make_grant(team, tokens, 150, now=NOW)
    first = consume(team, tokens, 10, api_actor, k="same")
    replay = consume(team, tokens, 10, api_actor, k="same")
    assert replay.replayed and (replay.status_code, replay.body) == (first.status_code, first.body)
    assert LedgerEntry.objects.filter(kind=Kind.CONSUME).count() == 1
    with pytest.raises(IdempotencyConflict):
        consume(team, tokens, 11, api_actor, k="same")
    # Keys are per team: another team may use the same key.
    other = world["other"]
    make_grant(other, tokens, 5, now=NOW)
    assert not consume(other, tokens, 1, api_actor, k="same").replayed


def test_rejected_request_keeps_the_key_free(world, api_actor):
    team, tokens = world["team"], world["tokens"]
    make_grant(team, tokens, 5, now=NOW)
    with pytest.raises(InsufficientBalance):
        consume(team, tokens, 10, api_actor, k="retry-me")
    make_grant(team, tokens, 20, now=NOW)
    assert consume(team, tokens, 10, api_actor, k="retry-me").status_code == 201


def test_revoke_zeroes_open_lots_once(world, api_actor):
    team, tokens = world["team"], world["tokens"]
    grant = make_grant(team, tokens, 100, now=NOW)
    consume(team, tokens, 30, api_actor)
    grant_revoke(grant=grant, now=NOW)
    grant_revoke(grant=grant, now=NOW)
    assert LedgerEntry.objects.filter(kind=Kind.REVOKE).get().delta == -70
    assert product_balance(team, tokens, now=NOW).total == 0
    assert lot_invariant_holds()


def test_balances_list_granted_products_only(world):
    team = world["team"]
    make_grant(team, world["tokens"], 10, now=NOW)
    assert [b.product.code for b in team_balances(team, now=NOW)] == ["cloud-tokens"]


def test_balances_query_count_is_constant(world, django_assert_num_queries):
    team = world["team"]
    for i in range(3):
        make_grant(team, ProductFactory(code=f"few-{i}"), 10, now=NOW)
    queries = 1 if connection.vendor == "postgresql" else 3  # one fixed statement on PostgreSQL
    with django_assert_num_queries(queries):
        assert len(team_balances(team, now=NOW)) == 3
    for i in range(20):
        make_grant(team, ProductFactory(code=f"many-{i}"), 10, refresh=Refresh.MONTHLY, now=NOW)
    with django_assert_num_queries(queries):
        assert len(team_balances(team, now=NOW)) == 23


@pytest.mark.parametrize(("delta", "label"), [(timedelta(days=30), "Ends in 30 days"),
                                              (timedelta(days=1), "Ends in 1 day"),
                                              (timedelta(hours=3), "Ends today")])
def test_ends_labels(world, delta, label):
    team = world["team"]
    make_grant(team, world["tokens"], 10, ends_at=NOW + delta, now=NOW)
    assert product_balance(team, world["tokens"], now=NOW).ends_label == label


def test_lot_remaining_constraint(world):
    team = world["team"]
    make_grant(team, world["tokens"], 10, now=NOW)
    lot = Lot.objects.get()
    with pytest.raises(IntegrityError), transaction.atomic():
        Lot.objects.filter(pk=lot.pk).update(remaining=11)
    with pytest.raises(IntegrityError), transaction.atomic():
        Lot.objects.filter(pk=lot.pk).update(remaining=-1)


def test_one_primary_admin_per_team(world):
    from teams.models import Membership, Role

    from .factories import UserFactory

    with pytest.raises(IntegrityError), transaction.atomic():
        Membership.objects.create(team=world["team"], user=UserFactory(), role=Role.PRIMARY_ADMIN)


def test_monthly_grant_starting_later_refreshes_after_it_starts(world, api_actor):
    team, tokens = world["team"], world["tokens"]
    make_grant(team, tokens, 10, now=NOW)  # an ordinary grant, so writes happen before the monthly one starts
    starts = NOW + timedelta(days=5)
    make_grant(team, tokens, 100, refresh=Refresh.MONTHLY, starts_at=starts, ends_at=starts + timedelta(days=200),
               now=NOW)
    consume(team, tokens, 1, api_actor)  # before the monthly grant starts: caches the next boundary
    in_first = starts + timedelta(days=3)
    assert consume(team, tokens, 50, api_actor, now=in_first).body["available"] == 59
    in_second = starts + timedelta(days=40)  # first period ended: a fresh lot of 100, nothing rolls over
    out = consume(team, tokens, 1, api_actor, now=in_second)
    assert (out.body["available"], out.body["total"]) == (9 + 99, 10 + 100)
    assert lot_invariant_holds()
