"""usage_record_many gives each event exactly what one call each would give it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.db import transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from products.models import Lot, Product, Source, TeamProduct
from teams.models import Team
from usage.actors import Actor
from usage.batch import UsageRequest, usage_record, usage_record_many
from usage.errors import UsageError
from usage.models import DailyBreakdown, DailyRollup, Event, LedgerEntry

from .factories import MembershipFactory, UserFactory, make_grant

NOW = datetime(2026, 6, 10, 12, 0, tzinfo=UTC)

events = st.lists(
    st.fixed_dictionaries({
        "kind": st.sampled_from(["consume", "metered"]),
        "product": st.sampled_from(["tok", "api"]),
        "quantity": st.integers(1, 70),
        "key": st.sampled_from([f"k{i}" for i in range(12)]),
        "user": st.sampled_from(["", "ana@example.com", "ANA@example.com", "bob", "zed@example.com"]),
        "service": st.sampled_from(["", "rendering", "analysis"]),
        "hours_ago": st.integers(0, 60),
    }),
    min_size=1, max_size=25,
)


def build_team(slug: str) -> tuple[Team, dict]:
    team = Team.objects.create(name=slug, slug=slug, timezone="America/New_York")
    MembershipFactory(team=team, user=UserFactory(username="ana", email="ana@example.com"))
    MembershipFactory(team=team, user=UserFactory(username="bob", email="bob@example.com"))
    tok = Product.objects.get_or_create(code="tok", defaults={"name": "Tok"})[0]
    api = Product.objects.get_or_create(code="api", defaults={"name": "Api", "metered": True,
                                                              "charge_unit_size": 20})[0]
    make_grant(team, tok, 150, source=Source.FREE_TIER, days=30, now=NOW)
    make_grant(team, tok, 100, days=90, now=NOW)
    make_grant(team, api, 40, now=NOW)
    return team, {"tok": tok, "api": api}


def requests_for(products, evs) -> list[UsageRequest]:
    return [UsageRequest(kind=e["kind"], product=products[e["product"]], quantity=e["quantity"],
                         idempotency_key=e["key"], user=e["user"], service=e["service"],
                         occurred_at=NOW - timedelta(hours=e["hours_ago"])) for e in evs]


def shape(result):
    if isinstance(result, UsageError):
        return ("error", result.code)
    body = {k: v for k, v in result.body.items() if k != "id"}
    return (result.status_code, result.replayed, tuple(sorted(body.items())))


def state(team):
    lots = sorted((lot.grant.quantity, lot.grant.source, lot.remaining) for lot in Lot.objects.filter(team=team))
    ledger = sorted((e.kind, e.delta, e.grant.source, e.user, e.member.username if e.member else None, e.service)
                    for e in LedgerEntry.objects.filter(team=team).select_related("grant", "member"))
    rollups = sorted((r.product.code, r.day, r.consumed, r.raw_usage, r.granted)
                     for r in DailyRollup.objects.filter(team=team).select_related("product"))
    breakdown = sorted((r.product.code, r.day, r.service, r.user, r.consumed, r.raw_usage)
                       for r in DailyBreakdown.objects.filter(team=team).select_related("product"))
    carry = sorted((tp.product.code, tp.metered_carry) for tp in TeamProduct.objects.filter(team=team))
    keys = sorted(Event.objects.filter(team=team).values_list("key", "fingerprint", "status_code"))
    return lots, ledger, rollups, breakdown, carry, keys


@pytest.mark.django_db
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(evs=events)
def test_batch_equals_one_call_each(evs):
    actor = Actor.system("test")
    with transaction.atomic():
        one_team, one_products = build_team("one")
        batch_team, batch_products = build_team("batch")
        one = []
        for request in requests_for(one_products, evs):
            try:
                one.append(usage_record(team=one_team, request=request, actor=actor, now=NOW))
            except UsageError as exc:
                one.append(exc)
        many = usage_record_many(team=batch_team, requests=requests_for(batch_products, evs), actor=actor, now=NOW)
        assert [shape(r) for r in many] == [shape(r) for r in one]
        assert state(batch_team) == state(one_team)
        transaction.set_rollback(True)


@pytest.mark.django_db
def test_batch_replays_events_recorded_earlier(world):
    team, tokens = world["team"], world["tokens"]
    make_grant(team, tokens, 100, now=NOW)
    actor = Actor.system("test")
    first = usage_record(team=team, request=UsageRequest("consume", tokens, 5, "once"), actor=actor, now=NOW)
    again, conflict, new = usage_record_many(team=team, actor=actor, now=NOW, requests=[
        UsageRequest("consume", tokens, 5, "once"),
        UsageRequest("consume", tokens, 6, "once"),
        UsageRequest("consume", tokens, 7, "new"),
    ])
    assert again.replayed and again.body == first.body
    assert isinstance(conflict, UsageError) and conflict.code == "idempotency_conflict"
    assert new.status_code == 201 and new.body["available"] == 88
    assert LedgerEntry.objects.filter(kind="consume").count() == 2


@pytest.mark.django_db
def test_batch_query_count_does_not_grow_with_events(world):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    team, tokens = world["team"], world["tokens"]
    make_grant(team, tokens, 10_000, now=NOW)
    actor = Actor.system("test")

    def run(n: int, prefix: str) -> int:
        reqs = [UsageRequest("consume", tokens, 1, f"{prefix}{i}", user=f"u{i % 7}@example.com",
                             service="rendering") for i in range(n)]
        with CaptureQueriesContext(connection) as ctx:
            results = usage_record_many(team=team, requests=reqs, actor=actor, now=NOW)
        assert all(r.status_code == 201 for r in results)
        return len(ctx.captured_queries)

    run(5, "warm")  # the first write of the day checks monthly boundaries once
    small, large = run(20, "a"), run(500, "b")
    assert Lot.objects.get(grant__team=team).remaining == 10_000 - 525
    if connection.vendor == "postgresql":
        assert large == small <= 20  # multi-row statements: the count does not depend on the batch size
    else:
        assert large <= small + 20  # SQLite caps variables per statement, so inserts come in chunks
