"""The one-round-trip consume (PostgreSQL function ``usage_consume_fast``) against the
Python path it stands in for.

Two identical teams get the same random history, one with the fast path and one
without; every answer and, at the end, every lot, ledger row, rollup, breakdown and
stored response must be the same. The other tests pin what the fast path must do by
itself: take one round trip when nothing is due, hand over to the Python path when a
lot has to expire or a monthly period to open, and write nothing when it refuses.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from products.models import Lot, Product, Refresh, Source
from products.services import grant_create
from teams.models import Role, Team
from usage.actors import Actor
from usage.errors import UsageError
from usage.models import DailyBreakdown, DailyRollup, Event, LedgerEntry
from usage.services import fingerprint, usage_consume, usage_consume_with_key

from .factories import MembershipFactory, UserFactory

T0 = datetime(2026, 3, 28, 22, 0, tzinfo=UTC)  # a DST change and a month end ahead
ACTOR = Actor.system("fast-path-test")

pytestmark = pytest.mark.usefixtures("require_postgres")


def _world(suffix: str, tz: str, grants: list[tuple], products: dict[str, Product]) -> Team:
    team = Team.objects.create(name=f"FP {suffix}", slug=f"fp-{suffix}", timezone=tz)
    for username, email in (("ann", "Ann@Example.com"), ("bob", "bob@example.com")):
        user = UserFactory(username=f"{username}-{suffix}", email=email.replace("@", f"+{suffix}@"))
        MembershipFactory(team=team, user=user, role=Role.USER)
    for code, quantity, source, monthly, start_h, days in grants:
        grant_create(team=team, product=products[code], quantity=quantity, source=source,
                     refresh=Refresh.MONTHLY if monthly else Refresh.NEVER,
                     starts_at=T0 + timedelta(hours=start_h), ends_at=T0 + timedelta(hours=start_h, days=days),
                     now=T0)
    return team


def _answer(call):
    try:
        outcome = call()
    except UsageError as exc:
        return ("error", exc.code, exc.message, exc.details)
    body = {k: v for k, v in outcome.body.items() if k != "id"}
    return ("ok", outcome.status_code, outcome.replayed, body)


def _state(team: Team) -> dict:
    lots = list(Lot.objects.filter(team=team).order_by("id"))
    lot_index = {lot.pk: i for i, lot in enumerate(lots)}
    users = {}
    for m in team.memberships.select_related("user"):
        users[m.user_id] = m.user.username.rsplit("-", 1)[0]
    return {
        "lots": [(lot.product_id, lot.period_start, lot.expires_at, lot.quantity, lot.remaining,
                  lot.closed_at is not None) for lot in lots],
        "ledger": [(e.product_id, lot_index.get(e.lot_id), e.kind, e.delta, e.amount, e.occurred_at, e.actor,
                    e.user, users.get(e.member_id), e.service, e.job_id, e.event.key if e.event_id else None)
                   for e in LedgerEntry.objects.filter(team=team).select_related("event").order_by("id")],
        "rollups": sorted(DailyRollup.objects.filter(team=team).values_list(
            "product_id", "day", "consumed", "refunded", "checked_out", "returned", "raw_usage", "granted",
            "expired", "peak_checked_out", "closing_checked_out")),
        "breakdowns": sorted(DailyBreakdown.objects.filter(team=team).values_list(
            "product_id", "day", "service", "user", "consumed", "refunded", "checked_out", "returned",
            "raw_usage")),
        # (The fingerprint hashes the request: compared through the request itself.)
        "events": [(e.key, e.fingerprint == fingerprint({"operation": e.operation, **e.request}), e.operation,
                    e.request, e.status_code,
                    {k: v for k, v in e.response.items() if k != "id"})
                   for e in Event.objects.filter(team=team).order_by("id")],
    }


# Mostly grants that never refresh (the fast path's home ground), overlapping, with every
# source; sometimes a monthly one (its boundaries hand over to the Python path).
grant_st = st.tuples(
    st.sampled_from(["fp-tokens", "fp-credits"]), st.integers(1, 60), st.sampled_from(list(Source.values)),
    st.sampled_from([False, False, False, True]), st.integers(-10 * 24, 24), st.integers(1, 60),
)
step_st = st.one_of(
    st.tuples(st.just("consume"), st.sampled_from(["fp-tokens", "fp-credits"]), st.integers(1, 40),
              st.sampled_from(["", "ann", "ANN", "bob", "stranger@example.com"]),
              st.sampled_from(["", "render"]), st.sampled_from(["", "job-1"]), st.integers(0, 6)),
    st.tuples(st.just("advance"), st.integers(1, 24 * 4)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(tz=st.sampled_from(["UTC", "Europe/Paris", "America/Los_Angeles", "Asia/Kolkata"]),
       grants=st.lists(grant_st, min_size=2, max_size=6), steps=st.lists(step_st, min_size=5, max_size=30))
def test_fast_path_and_python_path_write_the_same(db, tz, grants, steps):
    with transaction.atomic():
        products = {code: Product.objects.get_or_create(code=code, defaults={"name": code})[0]
                    for code in ("fp-tokens", "fp-credits")}
        teams = {"fast": _world("f", tz, grants, products), "slow": _world("s", tz, grants, products)}
        now = T0
        for n, step in enumerate(steps):
            if step[0] == "advance":
                now += timedelta(hours=step[1])
                continue
            _, code, quantity, who, service, job, key_no = step
            answers = {}
            for name, team in teams.items():
                suffix = name[0]
                common = dict(
                    team=team, product=products[code], quantity=quantity, actor=ACTOR, service=service, job_id=job,
                    idempotency_key=f"k{key_no}" if key_no else f"step{n}", now=now,
                    user=f"{who}+{suffix}@example.com" if who in ("ann", "ANN", "bob") else who,
                )
                with override_settings(USAGE_SQL_FAST_PATH=(name == "fast")):
                    answers[name] = _answer(lambda common=common: usage_consume(**common))
            assert answers["fast"] == answers["slow"], step
        fast_state, slow_state = _state(teams["fast"]), _state(teams["slow"])
        # Identifiers that name each team's own user differ only by the +f/+s suffix.
        for part in ("ledger", "breakdowns", "events"):
            fast_state[part] = [_unsuffix(row, "f") for row in fast_state[part]]
            slow_state[part] = [_unsuffix(row, "s") for row in slow_state[part]]
        assert fast_state == slow_state
        transaction.set_rollback(True)


def _unsuffix(row, suffix: str):
    def clean(v):
        if isinstance(v, str):
            return v.replace(f"+{suffix}@", "@")
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v
    return tuple(clean(v) for v in row)


# -- what the fast path does by itself ------------------------------------------------------


@pytest.fixture
def tokens(world):
    team, product = world["team"], world["tokens"]
    grant_create(team=team, product=product, quantity=100, source=Source.PURCHASE, refresh=Refresh.NEVER,
                 starts_at=T0 - timedelta(days=1), ends_at=T0 + timedelta(days=30), now=T0 - timedelta(days=1))
    # One write through the Python path fills the balance's "nothing due until" cache.
    usage_consume(team=team, product=product, quantity=1, idempotency_key="warm", actor=ACTOR, now=T0)
    return world


def test_one_round_trip_when_nothing_is_due(tokens):
    team, product = tokens["team"], tokens["tokens"]
    with CaptureQueriesContext(connection) as queries:
        outcome = usage_consume(team=team, product=product, quantity=5, idempotency_key="a", actor=ACTOR,
                                user="member", service="svc", now=T0 + timedelta(minutes=1))
    sql = [q["sql"] for q in queries.captured_queries if "SAVEPOINT" not in q["sql"]]
    assert len(sql) == 1 and "usage_consume_fast" in sql[0], sql
    assert outcome.status_code == 201 and outcome.body["available"] == 94


def _api_consume(client, team, *, key: str):
    """POST /api/v1/usage (2 cloud tokens) with a new key of the team; the response and
    the statements it ran."""
    from teams.services import api_key_create

    raw = api_key_create(team=team, name="t")[1]
    body = {"product": "cloud-tokens", "kind": "consume", "quantity": 2, "idempotency_key": key}
    with CaptureQueriesContext(connection) as queries:
        response = client.post("/api/v1/usage", body, content_type="application/json",
                               headers={"Authorization": f"Bearer {raw}"})
    return response, queries


def test_api_consume_is_one_statement(world, client):
    """The rate count, the key (with last_used_at), the product and the write: one
    statement through the consume lane; through Django's cycle the API's auth counts the
    request first. No other query, no transaction statements."""
    from django.utils import timezone

    from teams.models import ApiKey

    from .lane import through_lane

    now = timezone.now()
    grant_create(team=world["team"], product=world["tokens"], quantity=100, source=Source.PURCHASE,
                 refresh=Refresh.NEVER, starts_at=now - timedelta(days=1), ends_at=now + timedelta(days=30), now=now)
    usage_consume(team=world["team"], product=world["tokens"], quantity=1, idempotency_key="warm", actor=ACTOR)
    response, queries = _api_consume(client, world["team"], key="api-1")
    assert response.status_code == 201, response.content
    sql = [q["sql"] for q in queries.captured_queries if "SAVEPOINT" not in q["sql"]]
    assert len(sql) == 2, sql
    assert "usage_api_rate_count" in sql[0] and "usage_consume_api" in sql[1]

    from teams.services import api_key_create

    raw = api_key_create(team=world["team"], name="lane")[1]
    body = {"product": "cloud-tokens", "kind": "consume", "quantity": 2, "idempotency_key": "api-2"}
    with CaptureQueriesContext(connection) as queries:
        response = through_lane("POST", "/api/v1/usage", json.dumps(body), headers={"Authorization": f"Bearer {raw}"})
    assert response.status_code == 201 and response.lane, response.content
    sql = [q["sql"] for q in queries.captured_queries if "SAVEPOINT" not in q["sql"]]
    assert len(sql) == 1, sql
    assert "usage_consume_api" in sql[0]
    with connection.cursor() as cursor:  # ... and that statement counted the request against the key's limit
        cursor.execute("SELECT n FROM usage_apirate WHERE key_hash = %s", [ApiKey.hash(raw)])
        assert cursor.fetchall() == [(1,)]


def test_expired_lot_hands_over_to_the_python_path(tokens):
    team, product = tokens["team"], tokens["tokens"]
    grant_create(team=team, product=product, quantity=10, source=Source.PROMOTION, refresh=Refresh.NEVER,
                 starts_at=T0 - timedelta(days=1), ends_at=T0 + timedelta(hours=1), now=T0)
    later = T0 + timedelta(hours=2)  # the promotion lot has ended; no task has closed it yet
    outcome = usage_consume(team=team, product=product, quantity=3, idempotency_key="b", actor=ACTOR, now=later)
    assert outcome.body["available"] == 96
    expired = LedgerEntry.objects.get(team=team, kind="expire")
    assert expired.delta == -10
    with CaptureQueriesContext(connection) as queries:  # closed now: back on the fast path
        usage_consume(team=team, product=product, quantity=1, idempotency_key="c", actor=ACTOR, now=later)
    assert len([q for q in queries.captured_queries if "SAVEPOINT" not in q["sql"]]) == 1


def test_monthly_period_hands_over_to_the_python_path(world):
    team, product = world["team"], world["tokens"]
    grant_create(team=team, product=product, quantity=50, source=Source.SUBSCRIPTION_GIFT, refresh=Refresh.MONTHLY,
                 starts_at=T0 - timedelta(days=40), ends_at=T0 + timedelta(days=300), now=T0 - timedelta(days=40))
    outcome = usage_consume(team=team, product=product, quantity=5, idempotency_key="m", actor=ACTOR, now=T0)
    assert outcome.body["available"] == 45  # this month's lot, opened by the Python path
    assert LedgerEntry.objects.filter(team=team, kind="refresh").count() == 1


def test_refusal_writes_nothing_and_keeps_the_callers_transaction(tokens):
    team, product = tokens["team"], tokens["tokens"]
    before = (LedgerEntry.objects.count(), Event.objects.count(), list(DailyRollup.objects.values_list("consumed")))
    with transaction.atomic():
        with pytest.raises(UsageError) as exc:
            usage_consume(team=team, product=product, quantity=1000, idempotency_key="big", actor=ACTOR,
                          now=T0 + timedelta(minutes=1))
        assert exc.value.code == "insufficient_balance"
        assert exc.value.message == "Not enough tokens of cloud-tokens: 1000 requested, 99 available."
        assert exc.value.details == {"available": 99}
        assert Lot.objects.filter(team=team).count() == 1  # the transaction is still usable
    after = (LedgerEntry.objects.count(), Event.objects.count(), list(DailyRollup.objects.values_list("consumed")))
    assert after == before


def _with_key(raw: str, code: str, key: str, **kw):
    from teams.models import ApiKey

    return usage_consume_with_key(key_hash=ApiKey.hash(raw), key_stale=T0 - timedelta(minutes=1), product_code=code,
                                  quantity=kw.pop("quantity", 1), idempotency_key=key, now=kw.pop("now", T0), **kw)


def test_with_key_answers_for_products_the_team_does_not_hold(tokens):
    from teams.services import api_key_create
    from usage.errors import InvalidRequest, NotFound

    team = tokens["team"]
    raw = api_key_create(team=team, name="t")[1]
    with pytest.raises(NotFound):
        _with_key(raw, "no-such-product", "x")
    grant_create(team=team, product=tokens["pool"], quantity=5, source=Source.PURCHASE, refresh=Refresh.NEVER,
                 starts_at=T0 - timedelta(days=1), ends_at=T0 + timedelta(days=3), now=T0)
    with pytest.raises(InvalidRequest, match="returnable"):
        _with_key(raw, "asset-pool", "y")
    assert not Event.objects.filter(key__in=["x", "y"]).exists()


def test_with_key_refuses_unknown_and_revoked_keys_writing_nothing(tokens):
    from django.utils import timezone

    from teams.models import ApiKey
    from teams.services import api_key_create
    from usage import fastpath

    raw = api_key_create(team=tokens["team"], name="t")[1]
    before = (LedgerEntry.objects.count(), Event.objects.count())
    with pytest.raises(fastpath.KeyRejected):
        _with_key(raw + "x", "cloud-tokens", "k1", now=T0 + timedelta(minutes=1))
    ApiKey.objects.filter(hashed_key=ApiKey.hash(raw)).update(revoked_at=timezone.now())
    with pytest.raises(fastpath.KeyRejected):
        _with_key(raw, "cloud-tokens", "k2", now=T0 + timedelta(minutes=1))
    assert (LedgerEntry.objects.count(), Event.objects.count()) == before
    assert ApiKey.objects.get(hashed_key=ApiKey.hash(raw)).last_used_at is None


@pytest.mark.parametrize("tz", ["UTC", "Pacific/Auckland", "America/Los_Angeles", "Asia/Kathmandu"])
def test_with_key_writes_what_the_key_as_actor_writes(world, tz):
    """The key's statement finds the team, the actor and the team's local day itself: the
    same rows as ``usage_consume`` called with that team and ``Actor.for_api_key``,
    around local midnight."""
    from teams.models import ApiKey
    from teams.services import api_key_create

    products = {"cloud-tokens": world["tokens"]}
    grants = [("cloud-tokens", 1000, Source.PURCHASE, False, -48, 60)]
    teams = [_world(f"k{i}", tz, grants, products) for i in (1, 2)]
    raws = [api_key_create(team=t, name="k")[1] for t in teams]
    for team in teams:  # fill each balance's "nothing due until" cache
        usage_consume(team=team, product=world["tokens"], quantity=1, idempotency_key="warm", actor=ACTOR, now=T0)
    api_key = ApiKey.objects.select_related("team").get(hashed_key=ApiKey.hash(raws[1]))
    at_utc_midnight = T0.replace(hour=0)
    moments = [at_utc_midnight + timedelta(hours=h, minutes=m) for h in range(0, 24, 3) for m in (0, 59)]
    for n, at in enumerate(moments):
        common = dict(quantity=1 + n % 3, service="svc", job_id=f"j{n}", occurred_at=at, now=T0 + timedelta(hours=3))
        who = "ann+{}@example.com" if n % 2 else ""
        expected = _answer(lambda n=n, who=who, common=common: usage_consume(
            team=teams[1], product=world["tokens"], idempotency_key=f"e{n}", actor=Actor.for_api_key(api_key),
            user=who.format("k2"), **common))
        got = _answer(lambda n=n, who=who, common=common: _with_key(raws[0], "cloud-tokens", f"e{n}",
                                                                    user=who.format("k1"), **common))
        assert _unsuffix(got, "k1") == _unsuffix(expected, "k2")
    states = [_state(t) for t in teams]
    for state, suffix in zip(states, ("k1", "k2"), strict=True):
        for part in ("ledger", "breakdowns", "events"):
            state[part] = [_unsuffix(row, suffix) for row in state[part]]
    prefixes = [ApiKey.objects.get(hashed_key=ApiKey.hash(r)).prefix for r in raws]
    assert repr(states[0]).count(prefixes[0]) == repr(states[1]).count(prefixes[1]) == len(moments)
    assert repr(states[0]).replace(prefixes[0], "P") == repr(states[1]).replace(prefixes[1], "P")
    assert len({r[1] for r in states[0]["rollups"]}) >= 2  # the moments span local days
    key_ids = set(LedgerEntry.objects.filter(team=teams[0], kind="consume").exclude(actor=ACTOR.label)
                  .values_list("actor_api_key_id", flat=True))
    assert key_ids == {ApiKey.objects.get(hashed_key=ApiKey.hash(raws[0])).pk}


def test_refusal_is_a_data_error_not_a_broken_connection(tokens):
    """Django pings the database after a request that had a connection error; an overdraft
    is ordinary traffic and must not count as one."""
    team, product = tokens["team"], tokens["tokens"]
    connection.errors_occurred = False
    with pytest.raises(UsageError):
        usage_consume(team=team, product=product, quantity=10_000, idempotency_key="over", actor=ACTOR,
                      now=T0 + timedelta(minutes=1))
    assert connection.errors_occurred is False


def test_missing_function_falls_back_to_the_python_path(tokens):
    """Code deployed before its migration ran still records usage (DDL rolls back with the test)."""
    team, product = tokens["team"], tokens["tokens"]
    with connection.cursor() as cursor:
        cursor.execute("ALTER FUNCTION usage_consume_fast RENAME TO usage_consume_fast_hidden")
    outcome = usage_consume(team=team, product=product, quantity=2, idempotency_key="nofn", actor=ACTOR,
                            now=T0 + timedelta(minutes=1))
    assert outcome.status_code == 201 and outcome.body["available"] == 97


def test_api_hands_over_once(world, client):
    """A balance with a monthly period to open: one try of the function, then the Python path."""
    from django.utils import timezone

    now = timezone.now()
    grant_create(team=world["team"], product=world["tokens"], quantity=30, source=Source.SUBSCRIPTION_GIFT,
                 refresh=Refresh.MONTHLY, starts_at=now - timedelta(days=40), ends_at=now + timedelta(days=300),
                 now=now - timedelta(days=40))
    response, queries = _api_consume(client, world["team"], key="handover")
    assert response.status_code == 201, response.content
    assert response.json()["available"] == 28
    sql = [q["sql"] for q in queries.captured_queries]
    assert sum("usage_consume_api" in q for q in sql) == 1
    assert not any("usage_consume_fast" in q for q in sql)
    assert any("teams_apikey" in q and "last_used_at" in q for q in sql)  # the key, looked up for the Python path


@pytest.mark.parametrize(("tz", "fast", "local_day"), [
    ("Europe/Paris", True, 2), ("CET", False, 2), ("EST5EDT", False, 1), ("UTC", True, 1),
])
def test_with_key_writes_the_team_local_day_in_summer_time(world, tz, fast, local_day):
    """PostgreSQL reads some zone names (CET, EET, MET, WET) as fixed-offset abbreviations
    where zoneinfo has summer time; a zone name without a slash (UTC aside) hands over to
    the Python path, which takes the day from zoneinfo."""
    from products.periods import local_date
    from teams.models import ApiKey
    from teams.services import api_key_create

    summer = datetime(2026, 7, 1, 22, 40, tzinfo=UTC)
    team = Team.objects.create(name=f"TZ {tz}", slug=f"tz-{tz.lower().replace('/', '-')}", timezone=tz)
    grant_create(team=team, product=world["tokens"], quantity=100, source=Source.PURCHASE, refresh=Refresh.NEVER,
                 starts_at=summer - timedelta(days=2), ends_at=summer + timedelta(days=30), now=summer)
    usage_consume(team=team, product=world["tokens"], quantity=1, idempotency_key="warm", actor=ACTOR, now=summer)
    raw = api_key_create(team=team, name="tz")[1]
    outcome = _with_key(raw, "cloud-tokens", "summer", now=summer + timedelta(minutes=1), quantity=2)
    if not fast:
        assert outcome is None and not Event.objects.filter(team=team, key="summer").exists()
        api_key = ApiKey.objects.select_related("team").get(hashed_key=ApiKey.hash(raw))
        usage_consume(team=team, product=world["tokens"], quantity=2, idempotency_key="summer",
                      actor=Actor.for_api_key(api_key), now=summer + timedelta(minutes=1))  # what the API does next
    else:
        assert outcome.status_code == 201
    day = local_date(summer + timedelta(minutes=1), team.tzinfo)
    assert day == datetime(2026, 7, local_day).date()  # (CET: PostgreSQL's fixed +1 would say July 1)
    assert DailyRollup.objects.get(team=team, product=world["tokens"], day=day).consumed == 3
