"""The measurements. Each returns its result keys or raises :class:`Skip` with the reason.

Rates (``*_rps``) use wrk with the same settings for the floor and the measured endpoint
(16 connections, 2 threads, the same total time), the two loads alternating in rounds. Page latencies (``*_p50_ms``) are medians
of sequential GETs with the pages interleaved round-robin (same machine load for the
floor and the measured pages), logged in with a real session cookie. Query counts are taken in-process with Django's test client and
``CaptureQueriesContext`` against the same database (every query the request runs,
session and user included); the served app runs with DEBUG off and is not instrumented.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from . import wrk

BASE_DIR = Path(__file__).resolve().parent.parent
CONSUME_BODY = ('{"product": "%s", "kind": "consume", "quantity": 1, "idempotency_key": "%s-c%d-%d", '
                '"service": "rendering", "user": "u%d@bench.example"}')
NOT_AVAILABLE = "endpoint not available yet"


class Skip(Exception):  # noqa: N818 - reads as "skip (reason)"
    """A measurement that cannot run in this tree (e.g. its endpoint has not landed)."""


@dataclass
class Context:
    base_url: str
    meta: dict
    run_id: str
    workdir: Path
    scale: float
    duration_s: int = 10
    connections: int = 16
    latency_requests: int = 200  # rounds of the interleaved page loop
    latency_seconds: int = 15  # per page
    results: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    cookies: dict = field(default_factory=dict)

    def log(self, msg: str) -> None:
        print(f"[bench] {msg}", flush=True)


def resolves(path: str) -> bool:
    from django.urls import Resolver404, resolve

    try:
        resolve(urlsplit(path).path)
    except Resolver404:
        return False
    return True


def _script(ctx: Context, name: str, **kwargs) -> str:
    path = ctx.workdir / f"{name}.lua"
    path.write_text(wrk.lua_script(**kwargs))
    return str(path)


def _check(label: str, r: wrk.WrkResult) -> dict:
    if r.bad or r.ok == 0:
        raise RuntimeError(f"{label}: {r.bad} unexpected responses of {r.requests} (first: {r.sample})")
    return {"requests": r.requests, "ok": r.ok, "unexpected": r.bad, "socket_errors": r.socket_errors,
            "seconds": round(r.duration_s, 2), "p50_ms": r.p50_ms, "p90_ms": r.p90_ms, "p99_ms": r.p99_ms}


def login_cookie(username: str) -> dict:
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.test import Client

    client = Client()
    client.force_login(get_user_model().objects.get(username=username))
    return {settings.SESSION_COOKIE_NAME: client.cookies[settings.SESSION_COOKIE_NAME].value}


# -- the measurements ---------------------------------------------------------------------


RATE_MEASUREMENTS = ("floor_json", "consume")
RATE_ROUNDS = 5


def _rate_specs(ctx: Context, names: list[str]) -> tuple[dict, dict]:
    """label -> (path, wrk script arguments) of the selected throughput loads, and the skipped ones."""
    specs, skips = {}, {}
    if "floor_json" in names:
        if resolves("/healthz"):
            specs["floor_json"] = ("/healthz", {"method": "GET", "expect": 200})
        else:
            skips["floor_json"] = NOT_AVAILABLE + " (/healthz)"
    if "consume" in names:
        if resolves("/api/v1/usage"):
            specs["consume"] = ("/api/v1/usage", {
                "method": "POST", "expect": 201, "targets": ctx.meta["load_targets"], "body_format": CONSUME_BODY,
                "headers": {"Content-Type": "application/json"}})
        else:
            skips["consume"] = NOT_AVAILABLE + " (POST /api/v1/usage)"
    return specs, skips


def rates(ctx: Context, names: list[str]) -> tuple[dict, dict]:
    """Requests per second of the JSON floor (``/healthz``) and of consumes (``POST
    /api/v1/usage`` over many teams), with the same wrk settings (16 connections, 2
    threads, the same total time each).

    The two loads alternate in rounds (floor, consume, consume, floor, ...) so that
    both see the same machine: on a shared machine the speed moves by a factor of two
    from one minute to the next, and two loads measured a quarter of a minute apart
    compared that drift as much as the code. A load's rate is its accepted requests over
    its measured seconds, summed over the rounds. Each request of every round carries
    a new idempotency key (nothing is a replay). Returns (results, name -> skip reason).
    """
    specs, skips = _rate_specs(ctx, names)
    if not specs:
        return {}, skips
    for label, (path, kw) in specs.items():  # warm every worker (imports, connections, plans)
        warm = _script(ctx, f"{label}-warm", max_requests=200, run=f"{ctx.run_id}w", threads=2, path=path, **kw)
        wrk.run_wrk(ctx.base_url + path, warm, connections=ctx.connections, threads=2, duration_s=3)
    seconds = max(1, round(ctx.duration_s / RATE_ROUNDS))
    rounds: dict[str, list[dict]] = {label: [] for label in specs}
    order = list(specs)
    for i in range(RATE_ROUNDS):
        for label in order if i % 2 == 0 else order[::-1]:
            path, kw = specs[label]
            script = _script(ctx, f"{label}-{i}", max_requests=2_000_000, run=f"{ctx.run_id}r{i}", threads=2,
                             path=path, **kw)
            r = wrk.run_wrk(ctx.base_url + path, script, connections=ctx.connections, threads=2,
                            duration_s=seconds)
            rounds[label].append(_check(f"{label} round {i + 1}", r))
    results = {}
    for label, runs in rounds.items():
        ok, secs = sum(x["ok"] for x in runs), sum(x["seconds"] for x in runs)
        rps = ok / secs
        results[f"{label}_rps"] = round(rps, 1)
        ctx.details[label] = {"rounds": runs, "ok": ok, "seconds": round(secs, 2),
                              "rps_by_round": [round(x["ok"] / x["seconds"], 1) for x in runs]}
        ctx.log(f"{label}: {rps:,.0f} req/s ({ok:,} in {secs:.1f}s over {len(runs)} rounds of {seconds}s; "
                f"by round {', '.join(f'{x:,.0f}' for x in ctx.details[label]['rps_by_round'])})")
    if len(rounds) == 2:
        ctx.details["consume_over_floor_by_round"] = [
            round(c["ok"] / c["seconds"] / (f["ok"] / f["seconds"]), 3)
            for f, c in zip(rounds["floor_json"], rounds["consume"], strict=True)]
    return results, skips


BATCH_EVENTS = 1000


def batch(ctx: Context) -> dict:
    if not resolves("/api/v1/usage/batch"):
        raise Skip(NOT_AVAILABLE + " (POST /api/v1/usage/batch)")
    u = urlsplit(ctx.base_url)
    targets = ctx.meta["batch_targets"]

    def go(label: str, events: int, max_requests: int, max_seconds: int, concurrency: int) -> dict:
        spec = {"host": u.hostname, "port": u.port, "path": "/api/v1/usage/batch", "targets": targets,
                "events_per_request": events, "max_requests": max_requests, "max_seconds": max_seconds,
                "concurrency": concurrency, "run": f"{ctx.run_id}{label}"}
        return _loadgen(spec, timeout=max_seconds + 900)

    go("w", 20, 10, 30, 5)  # warm every worker (small bodies)
    # Two concurrent 1,000-event requests (one per core), new requests for up to 40 s;
    # throughput counts whole requests only (events accepted / wall time).
    r = go("", BATCH_EVENTS, 40, 40, 2)
    ctx.details["batch"] = {k: r[k] for k in ("requests", "ok_requests", "bad_requests", "events", "wall_s", "p50_s")}
    if r["bad_requests"] or not r["events"]:
        raise RuntimeError(f"batch: {r['bad_requests']} of {r['requests']} requests not fully accepted "
                           f"(first: {r['sample']})")
    rate = r["events"] / r["wall_s"]
    ctx.log(f"batch: {rate:,.0f} events/s ({r['events']:,} events in {r['requests']} requests of {BATCH_EVENTS},"
            f" {r['wall_s']:.1f}s, p50 {r['p50_s']:.2f}s per request)")
    ctx.details["batch_events"] = r["events"]
    return {"batch_events_per_s": round(rate, 1)}


def copy_rows(ctx: Context) -> dict:
    """COPY the batch's number of ledger-shaped rows into a scratch table with the ledger's indexes."""
    from django.db import connection, transaction

    n = ctx.details.get("batch_events") or 40_000
    lots = ctx.meta["copy_lots"]
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S+00")
    cols = ('team_id, product_id, lot_id, grant_id, kind, delta, amount, occurred_at, recorded_at, actor, '
            'actor_api_key_id, "user", service, job_id, note')
    rows = []
    for i in range(n):
        team_id, product_id, lot_id, grant_id, key_id, prefix = lots[i % len(lots)]
        rows.append(f"{team_id}\t{product_id}\t{lot_id}\t{grant_id}\tconsume\t-1\t1\t{now}\t{now}\t"
                    f"api_key:{prefix}\t{key_id}\tu{i % 5}@bench.example\trendering\t\t\n")
    chunks = ["".join(rows[i:i + 5000]) for i in range(0, n, 5000)]
    timings = []
    for _attempt in range(3):
        with connection.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS bench_copy_scratch")
            cur.execute("CREATE TABLE bench_copy_scratch (LIKE usage_ledgerentry INCLUDING ALL)")
        t = time.perf_counter()
        with transaction.atomic(), connection.cursor() as cur:
            with cur.cursor.copy(f"COPY bench_copy_scratch ({cols}) FROM STDIN") as copy:
                for chunk in chunks:
                    copy.write(chunk)
        timings.append(time.perf_counter() - t)
    with connection.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS bench_copy_scratch")
    elapsed = statistics.median(timings)
    ctx.details["copy"] = {"rows": n, "seconds": [round(x, 3) for x in timings]}
    ctx.log(f"copy: {n / elapsed:,.0f} rows/s ({n:,} rows, median of 3: {elapsed:.3f}s)")
    return {"copy_rows_per_s": round(n / elapsed, 1)}


PARTIAL_HEADERS = {"HX-Request": "true", "HX-Target": "cards"}
HISTORY_QUERY = "?view=usage&granularity=day&range=12m"
PAGE_MEASUREMENTS = ("floor_page", "dashboard", "history")


def count_queries(username: str, path: str, headers: dict | None = None) -> int:
    """Every query of one GET, in-process against the bench database (after one warm-up GET)."""
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client()
    client.force_login(get_user_model().objects.get(username=username))
    client.get(path, headers=headers or {})  # warm caches (e.g. content types) before counting
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(path, headers=headers or {})
    if response.status_code != 200:
        raise RuntimeError(f"GET {path} answered {response.status_code} in-process")
    return len(ctx.captured_queries)


def _page_paths(ctx: Context, names: list[str]) -> tuple[dict, dict]:
    """label -> (path, headers) of the pages to time, and name -> skip reason."""
    from django.urls import NoReverseMatch, reverse

    m = ctx.meta
    pages, skips = {}, {}
    if "floor_page" in names:
        try:
            pages["floor_page"] = (reverse("floor_page"), {})
        except NoReverseMatch:
            skips["floor_page"] = NOT_AVAILABLE + " (floor_page)"
    if "dashboard" in names:
        try:
            big = reverse("teams:dashboard", kwargs={"slug": m["big_team"]})
            pages["dashboard"] = (big, {})
            pages["dashboard_partial"] = (big, PARTIAL_HEADERS)
        except NoReverseMatch:
            skips["dashboard"] = NOT_AVAILABLE + " (teams:dashboard)"
    if "history" in names:
        try:
            path = reverse("usage:product_detail", kwargs={"slug": m["big_team"], "code": m["big_product"]})
            pages["history"] = (path + HISTORY_QUERY, {})
        except NoReverseMatch:
            skips["history"] = NOT_AVAILABLE + " (usage:product_detail)"
    return pages, skips


def pages(ctx: Context, names: list[str]) -> tuple[dict, dict]:
    """Median latencies of the floor page, the dashboard (page and partial) and the history page.

    Sequential GETs, the pages interleaved round-robin (one request of each per round) so
    that all of them see the same machine load; a concurrent warm-up first.
    Returns (results, name -> skip reason).
    """
    m = ctx.meta
    paths, skips = _page_paths(ctx, names)
    results: dict = {}
    if not paths:
        return results, skips
    if "dashboard" in paths:
        big, small = paths["dashboard"][0], _small_dashboard(m)
        q = {
            "dashboard_queries": count_queries(m["big_team_admin"], big),
            "dashboard_partial_queries": count_queries(m["big_team_admin"], big, PARTIAL_HEADERS),
            "dashboard_queries_5": count_queries(m["small_team_admin"], small),
            "dashboard_partial_queries_5": count_queries(m["small_team_admin"], small, PARTIAL_HEADERS),
        }
        ctx.log("dashboard queries: page {dashboard_queries} (5 products: {dashboard_queries_5}), partial "
                "{dashboard_partial_queries} (5 products: {dashboard_partial_queries_5})".format(**q))
        results.update(q)
    if "history" in paths:
        ctx.details["history_queries"] = count_queries(m["big_team_admin"], paths["history"][0])
        ctx.log(f"history queries: {ctx.details['history_queries']}")
    ctx.cookies = ctx.cookies or login_cookie(m["big_team_admin"])
    cookie = {"Cookie": "; ".join(f"{k}={v}" for k, v in ctx.cookies.items())}
    u = urlsplit(ctx.base_url)
    page_list = [{"label": label, "path": path, "headers": {**cookie, **headers}}
                 for label, (path, headers) in paths.items()]
    # Warm every worker (first requests import modules, e.g. plotly, and compile templates).
    warm = _loadgen({"mode": "warm", "host": u.hostname, "port": u.port, "rounds": 4, "concurrency": 5,
                     "max_seconds": 180, "pages": page_list}, timeout=400)
    if warm["bad"]:
        raise RuntimeError(f"pages warm-up: unexpected responses {warm['bad']}")
    spec = {"mode": "pages", "host": u.hostname, "port": u.port, "rounds": ctx.latency_requests,
            "max_seconds": ctx.latency_seconds * len(paths), "pages": page_list}
    r = _loadgen(spec, timeout=spec["max_seconds"] + 300)
    if r["bad"]:
        raise RuntimeError(f"pages: unexpected responses {r['bad']}")
    ctx.details["pages"] = r
    for label, stats in r["pages"].items():
        results[f"{label}_p50_ms"] = stats["p50_ms"]
        ctx.log(f"{label}: p50 {stats['p50_ms']:.1f} ms (p90 {stats['p90_ms']:.1f}, min {stats['min_ms']:.1f}, "
                f"{stats['n']} requests, interleaved)")
    return results, skips


def _small_dashboard(meta: dict) -> str:
    from django.urls import reverse

    return reverse("teams:dashboard", kwargs={"slug": meta["small_team"]})


def _loadgen(spec: dict, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.loadgen"], input=json.dumps(spec), text=True,
                          capture_output=True, cwd=BASE_DIR, timeout=timeout, check=False)
    if proc.returncode:
        raise RuntimeError(f"load generator failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


MEASURE = {
    "batch": batch,
    "copy": copy_rows,
}
# Measured together, one call for each group: the throughputs (floor and consume in
# alternating rounds), the page latencies (interleaved requests).
JOINT = {"rates": (RATE_MEASUREMENTS, rates), "pages": (PAGE_MEASUREMENTS, pages)}
