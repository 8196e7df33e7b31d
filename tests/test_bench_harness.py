"""The benchmark harness's pieces (issue 7), fast and without a big database.

Goals and result keys are pure functions; the seed plan's arithmetic is checked
without a database; `python -m bench` refuses SQLite; the floor views are trivial;
wrk's Lua script and the page load generator run against the live test server; and
on PostgreSQL the seeder runs at its smallest size and keeps the domain invariants.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path

import pytest
from django.db import connection
from django.db.models import Sum
from django.test.utils import CaptureQueriesContext

from bench import goals, seed, wrk
from bench.database import SQLITE_REFUSAL, check_database_url, marker_matches
from usage.services import _payload, fingerprint

from .factories import UserFactory

BASE_DIR = Path(__file__).resolve().parent.parent

PASSING = {
    "floor_json_rps": 1000.0, "consume_rps": 400.0, "batch_events_per_s": 5000.0, "copy_rows_per_s": 40000.0,
    "floor_page_p50_ms": 5.0, "dashboard_p50_ms": 12.0, "dashboard_partial_p50_ms": 8.0,
    "dashboard_queries": 8, "dashboard_partial_queries": 6, "dashboard_queries_5": 8,
    "dashboard_partial_queries_5": 6, "history_p50_ms": 14.0,
}


def by_name(results: dict) -> dict:
    return {g.name: g for g in goals.compute_goals(results)}


def test_goals_pass_with_their_ratios():
    g = by_name(PASSING)
    assert all(x.passed for x in g.values())
    assert g["consume"].ratio == pytest.approx(0.4)
    assert g["batch"].ratio == pytest.approx(0.125)
    assert g["dashboard_time"].ratio == pytest.approx(12 / 5)  # the slower of page and partial
    assert g["history"].ratio == pytest.approx(14 / 5)


@pytest.mark.parametrize(("key", "value", "goal"), [
    ("consume_rps", 299.0, "consume"),  # 0.299 < 0.30
    ("batch_events_per_s", 3999.0, "batch"),
    ("dashboard_partial_p50_ms", 20.5, "dashboard_time"),  # the partial counts too
    ("history_p50_ms", 15.5, "history"),
    ("dashboard_queries", 11, "dashboard_queries"),  # more than 10
    ("dashboard_queries_5", 7, "dashboard_queries"),  # 5 and 50 products differ
])
def test_each_goal_misses_just_past_its_limit(key, value, goal):
    g = by_name({**PASSING, key: value})
    assert g[goal].passed is False
    assert all(x.passed for name, x in g.items() if name != goal)


def test_goals_at_exactly_the_limit_pass():
    g = by_name({**PASSING, "consume_rps": 300.0, "dashboard_p50_ms": 20.0, "history_p50_ms": 15.0})
    assert g["consume"].passed and g["dashboard_time"].passed and g["history"].passed


def test_missing_measurements_are_not_judged():
    g = by_name({"floor_json_rps": 1000.0, "floor_page_p50_ms": 5.0})
    assert {name: x.passed for name, x in g.items()} == dict.fromkeys(g, None)
    table = goals.render_table({"floor_json_rps": 1000.0}, {"consume_rps": "endpoint not available yet"},
                               goals.compute_goals({"floor_json_rps": 1000.0}))
    assert "endpoint not available yet" in table
    assert "n/a" in table


def test_table_lists_every_result_key_and_verdicts():
    table = goals.render_table(PASSING, {}, goals.compute_goals(PASSING))
    for key in goals.RESULT_KEYS:
        assert key in table
    assert table.count("PASS") == 5
    assert set(goals.RESULT_KEYS) == {k for keys in goals.MEASUREMENTS.values() for k in keys}


def test_only_filter():
    assert goals.parse_only(None) == list(goals.MEASUREMENTS)
    assert goals.parse_only("history, dashboard") == ["dashboard", "history"]  # run order, not typed order
    with pytest.raises(ValueError, match="unknown measurement"):
        goals.parse_only("dashbord")


@pytest.mark.parametrize("url", ["", "sqlite:///db.sqlite3", "sqlite:////tmp/x.db"])
def test_database_url_check_refuses_sqlite(url):
    assert check_database_url(url) == SQLITE_REFUSAL


def test_database_url_check_accepts_postgres():
    assert check_database_url("postgres://postgres@127.0.0.1:5432/capacity_portal_bench") is None
    assert "not a PostgreSQL URL" in check_database_url("mysql://x@y/z")


@pytest.mark.parametrize("url", ["", "sqlite:///db.sqlite3"])
def test_python_m_bench_refuses_sqlite_with_one_line(url):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PYTEST_VERSION")}
    if url:
        env["DATABASE_URL"] = url
    proc = subprocess.run([sys.executable, "-m", "bench", "--scale", "0.01"], cwd=BASE_DIR, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [SQLITE_REFUSAL]
    assert proc.stdout == ""


def test_marker_matches_version_and_scale():
    marker = {"version": seed.SEED_VERSION, "scale": 0.01, "meta": {}}
    assert marker_matches(marker, version=seed.SEED_VERSION, scale=0.01)
    assert not marker_matches(marker, version=seed.SEED_VERSION, scale=1.0)
    assert not marker_matches(marker, version="old", scale=0.01)
    assert not marker_matches(None, version=seed.SEED_VERSION, scale=0.01)


@pytest.mark.parametrize("scale", [1.0, 0.1, 0.01, 0.001])
def test_seed_plan_sizes(scale):
    plan = seed.make_plan(scale)
    holdings = seed.holdings_for(plan)
    counts = seed.rows_per_holding(plan, holdings)
    assert len(holdings) + sum(counts) == plan.ledger_rows  # grant rows + consume rows
    assert counts[0] == plan.big_events and holdings[0] == (0, 0)
    assert sorted(p for t, p in holdings if t == 0) == list(range(50))
    assert len([1 for t, _ in holdings if t == 1]) == 5
    assert len(set(holdings)) == len(holdings)  # one grant per team and product
    if scale == 1.0:
        assert (plan.teams, plan.ledger_rows, plan.big_events) == (1000, 10_000_000, 1_000_000)


def test_amounts_and_grant_quantities():
    for n in (0, 1, 9, 10, 11, 2952, 1_000_000):
        assert seed.amount_sum(n) == sum(seed.AMOUNTS[i % 10] for i in range(n))
    for consumed in (55, 16_000, 5_500_000):
        healthy = seed.grant_quantity(consumed, low=False)
        low = seed.grant_quantity(consumed, low=True)
        assert 5 * (healthy - consumed) > healthy  # green: > 20% left
        assert 5 * (low - consumed) <= low  # red: <= 20% left
        assert low - consumed >= 1


def test_stamp_formats_utc_seconds():
    stamp = seed._Stamp()
    assert stamp(0) == "1970-01-01 00:00:00+00"
    assert stamp(1_795_483_749) == "2026-11-24 01:29:09+00"
    for ts in range(1_795_400_000, 1_795_400_000 + 2 * 86400, 997):
        assert stamp(ts) == datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S+00")


def reference_event_line(h, i, n, *, slug, code, quantity, team_id, key_id, first_id, start, span):
    """Event ``i`` of holding ``h`` the slow way: the API's payload, fingerprint and JSON texts."""
    a = seed.AMOUNTS[i % 10]
    user, service, job = seed.consume_fields(h, i, slug)
    payload = _payload(code, a, None, user=user, service=service, job_id=job)
    fp = fingerprint({"operation": "consume", **payload})
    eid = first_id + i
    response = {"id": eid, "product": code, "available": quantity - seed.amount_sum(i + 1),
                "total": quantity, "kind": "consume", "quantity": a, "charged": a}
    created = datetime.fromtimestamp(start + (i * span) // n, UTC).strftime("%Y-%m-%d %H:%M:%S+00")
    return (f"{eid}\t{team_id}\tseed-{h}-{i}\t{fp}\tconsume\t{json.dumps(payload)}\t201\t"
            f"{json.dumps(response)}\t{key_id}\t{created}\n")


@pytest.mark.parametrize(("h", "slug", "code", "n", "sample"), [
    (0, "bench-big", "bench-p00", 1_000_000, 1000),  # the big holding: its first rows
    (57, "bench-0002", "bench-p06", 450, 450),  # all of a small one (each residue of 200 twice)
])
def test_event_lines_match_the_api_texts(h, slug, code, n, sample):
    """The seed writes its events from templates: byte for byte what _payload, fingerprint and
    json.dumps give, so a seeded event is what the API stores (a retry of its request replays)."""
    kw = {"slug": slug, "code": code, "quantity": seed.grant_quantity(seed.amount_sum(n), low=False),
          "team_id": 7, "key_id": 11, "first_id": 123_456, "start": 1_764_000_000, "span": 365 * 86400}
    lines = list(islice(seed.event_lines(h, n, stamp=seed._Stamp(), **kw), sample))
    assert lines == [reference_event_line(h, i, n, **kw) for i in range(sample)]
    assert '"job_id": "job-' in lines[0] and '"job_id": ""' in lines[1]  # rows with a job id and without
    with pytest.raises(ValueError, match="not plain ASCII"):  # a quote would need json.dumps's escaping
        next(seed.event_lines(h, n, stamp=seed._Stamp(), **{**kw, "slug": 'bench-"x"'}))


# -- the floor views ----------------------------------------------------------------------

@pytest.mark.django_db
def test_healthz_is_trivial_json(client, django_assert_num_queries):
    with django_assert_num_queries(0):
        response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.django_db
def test_floor_page_needs_login_and_only_loads_session_and_user(client):
    assert client.get("/bench/floor/").status_code == 302
    client.force_login(UserFactory(username="floor"))
    with CaptureQueriesContext(connection) as ctx:
        response = client.get("/bench/floor/")
    assert response.status_code == 200
    assert b"Benchmark floor" in response.content and b"floor" in response.content
    assert len(ctx.captured_queries) == 2  # the session and the user


# -- load generators against the live test server -----------------------------------------

@pytest.mark.skipif(not shutil.which(wrk.WRK), reason="wrk is not installed (apt-get install -y wrk)")
def test_wrk_script_counts_expected_statuses(live_server, tmp_path):
    script = tmp_path / "floor.lua"
    script.write_text(wrk.lua_script(method="GET", path="/healthz", expect=200, max_requests=40, threads=1))
    r = wrk.run_wrk(live_server.url + "/healthz", str(script), connections=1, threads=1, duration_s=5)
    assert r.ok >= 40 and r.bad == 0 and r.p50_ms > 0
    script.write_text(wrk.lua_script(method="GET", path="/healthz", expect=201, max_requests=5, threads=1))
    r = wrk.run_wrk(live_server.url + "/healthz", str(script), connections=1, threads=1, duration_s=5)
    assert r.ok == 0 and r.bad >= 5 and r.sample.startswith("200 ")


@pytest.mark.skipif(not shutil.which(wrk.WRK), reason="wrk is not installed (apt-get install -y wrk)")
def test_rates_alternate_floor_and_consume_rounds_with_new_keys(require_postgres, live_server, tmp_path, world):
    """floor_json_rps and consume_rps come from alternating rounds of the same length; every
    consume of every round (and of the warm-up) is new: none is an idempotent replay.
    (PostgreSQL, as the bench: SQLite's in-memory test database locks under 2 writers.)"""
    from bench import measure
    from teams.services import api_key_create
    from usage.models import Event, LedgerEntry

    from .factories import make_grant

    make_grant(world["team"], world["tokens"], 10**9)
    raw = api_key_create(team=world["team"], name="bench")[1]
    ctx = measure.Context(base_url=live_server.url, meta={"load_targets": [[raw, "cloud-tokens"]]}, run_id="rt",
                          workdir=tmp_path, scale=0.01, duration_s=measure.RATE_ROUNDS, connections=2)
    results, skips = measure.rates(ctx, ["floor_json", "consume"])
    assert skips == {} and set(results) == {"floor_json_rps", "consume_rps"}
    floor, consume = ctx.details["floor_json"], ctx.details["consume"]
    for d in (floor, consume):
        assert len(d["rounds"]) == measure.RATE_ROUNDS and all(r["unexpected"] == 0 for r in d["rounds"])
        assert d["ok"] == sum(r["ok"] for r in d["rounds"]) > 0
    assert results["consume_rps"] == pytest.approx(consume["ok"] / consume["seconds"], abs=0.06)  # (rounded to 0.1)
    assert len(ctx.details["consume_over_floor_by_round"]) == measure.RATE_ROUNDS
    consumes = LedgerEntry.objects.filter(team=world["team"], kind="consume").count()
    assert consumes == Event.objects.filter(team=world["team"]).count() >= consume["ok"]  # no replays


def test_page_loadgen_interleaves_and_reports_medians(live_server):
    host, port = live_server.thread.host, live_server.thread.port
    spec = {"mode": "pages", "host": host, "port": port, "rounds": 5, "max_seconds": 30,
            "pages": [{"label": "a", "path": "/healthz", "headers": {}},
                      {"label": "b", "path": "/no-such-page/", "headers": {}}]}
    proc = subprocess.run([sys.executable, "-m", "bench.loadgen"], input=json.dumps(spec), cwd=BASE_DIR,
                          capture_output=True, text=True, timeout=60, check=True)
    out = json.loads(proc.stdout)
    assert out["rounds"] == 5
    assert out["pages"]["a"]["n"] == 5 and out["pages"]["a"]["p50_ms"] > 0
    assert out["bad"] == {"b": "404"}
    warm = subprocess.run([sys.executable, "-m", "bench.loadgen"], cwd=BASE_DIR, capture_output=True, text=True,
                          input=json.dumps({**spec, "mode": "warm", "rounds": 2, "concurrency": 3}),
                          timeout=60, check=True)
    assert json.loads(warm.stdout) == {"bad": {"b": "404"}}


# -- the seeder on PostgreSQL (smallest size) ---------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_seed_keeps_the_domain_invariants(require_postgres, capsys):
    from products.models import Grant, Lot, TeamProduct
    from usage.models import DailyBreakdown, DailyRollup, LedgerEntry

    plan = seed.Plan(scale=0.0, teams=4, ledger_rows=6000, big_events=2000)
    meta = seed.seed(plan)
    assert "[seed] verified" in capsys.readouterr().out
    assert LedgerEntry.objects.count() == 6000
    assert LedgerEntry.objects.filter(team__slug="bench-big", product__code="bench-p00", kind="consume").count() \
        == 2000
    holdings = seed.holdings_for(plan)
    assert TeamProduct.objects.count() == Grant.objects.count() == Lot.objects.count() == len(holdings)
    for lot in Lot.objects.all():
        moved = LedgerEntry.objects.filter(lot=lot).aggregate(s=Sum("delta"))["s"] or 0
        assert lot.quantity + moved == lot.remaining >= 0
    consumed = LedgerEntry.objects.filter(kind="consume").aggregate(s=Sum("amount"))["s"]
    assert DailyRollup.objects.aggregate(s=Sum("consumed"))["s"] == consumed
    assert DailyBreakdown.objects.aggregate(s=Sum("consumed"))["s"] == consumed
    # Days are local days in the team's time zone (bench-big is in America/New_York).
    entry = LedgerEntry.objects.filter(team__slug="bench-big", kind="consume").order_by("occurred_at").first()
    local_day = entry.occurred_at.astimezone(entry.team.tzinfo).date()
    assert DailyRollup.objects.filter(team=entry.team, product=entry.product, day=local_day).exists()
    assert meta["big_team"] == "bench-big" and meta["load_targets"] and meta["batch_targets"]
    # Every consume has its own event (the request that caused it), as in production.
    from usage.models import Event

    assert not LedgerEntry.objects.filter(kind="consume", event__isnull=True).exists()
    assert not LedgerEntry.objects.filter(kind="grant", event__isnull=False).exists()
    assert Event.objects.count() == meta["events"] == LedgerEntry.objects.filter(event__isnull=False).count() \
        == LedgerEntry.objects.order_by().values("event").distinct().count() - 1  # (the grant rows' None)
    linked = LedgerEntry.objects.filter(event__isnull=False).select_related("event").order_by("-id").first()
    assert linked.event.team_id == linked.team_id and linked.event.status_code == 201
    assert linked.event.response["quantity"] == linked.amount and linked.event.created_at == linked.recorded_at
    # Like grant_create, the seed marks its "never" balances as never due: a consume on a
    # seeded balance is the single fast-path statement from the first one on.
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from usage.actors import Actor
    from usage.services import usage_consume

    tp = TeamProduct.objects.select_related("team", "product").filter(team__slug="bench-big").first()
    with CaptureQueriesContext(connection) as queries:
        outcome = usage_consume(team=tp.team, product=tp.product, quantity=1, idempotency_key="seeded-1",
                                actor=Actor.system("test"))
    assert outcome.status_code == 201
    # A seeded event is what the API would have stored: retrying its request replays it.
    user, service, job = seed.consume_fields(0, 3, "bench-big")
    retry = usage_consume(team=tp.team, product=tp.product, quantity=seed.AMOUNTS[3], idempotency_key="seed-0-3",
                          actor=Actor.system("test"), user=user, service=service, job_id=job)
    assert retry.replayed and retry.status_code == 201
    assert retry.body == Event.objects.get(team=tp.team, key="seed-0-3").response
    assert [q["sql"] for q in queries.captured_queries if "SAVEPOINT" not in q["sql"]][0].startswith(
        "SELECT * FROM usage_consume_fast")
    assert len([q for q in queries.captured_queries if "SAVEPOINT" not in q["sql"]]) == 1
