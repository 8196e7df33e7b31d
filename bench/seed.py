"""Seed the bench database: 1,000 teams, 10 million ledger rows (scaled by ``--scale``).

Small tables go through the ORM; the ledger goes in with ``COPY`` (psycopg 3), then
everything derived from it is computed *in SQL from the ledger*, so the data keeps the
domain invariants:

* every (team, product) with a grant has its ``TeamProduct`` row, one ``never`` grant,
  its lot and its ``grant`` ledger row;
* each lot's ``remaining == quantity + sum(deltas of its entries)`` (set by an UPDATE from
  the ledger, then checked);
* ``DailyBreakdown`` rows are ``INSERT ... SELECT ... GROUP BY`` over the consume rows by
  the local day in the team's time zone, and ``DailyRollup`` rows the sum of those
  (checked against the ledger total).

Every seeded consume row has its ``Event`` (the request that caused it), as in production:
the retention job only deletes events that no ledger row refers to, so a consume's event
is kept as long as its ledger row. Without them the measured requests would start on an
empty event table, which is not the steady state: a backend then plans the foreign-key
check on it as a scan of a tiny table and keeps that plan while the table grows (a
1,000-event batch's COMMIT took 2 s instead of 0.1 s).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

SEED_VERSION = "2026-11-24.3"

SERVICES = ("rendering", "simulation", "analysis", "optimization", "model_creation")
TIMEZONES = ("UTC", "America/New_York", "Europe/Berlin", "Asia/Tokyo", "Australia/Sydney")
AMOUNTS = tuple(1 + (7 * j) % 10 for j in range(10))  # a permutation of 1..10
N_PRODUCTS = 50
SMALL_TEAM_PRODUCTS = 5
PER_TEAM_PRODUCTS = 3


@dataclass(frozen=True)
class Plan:
    scale: float
    teams: int
    ledger_rows: int
    big_events: int


def make_plan(scale: float) -> Plan:
    """1,000 teams, 10M ledger rows and a 1M-event product at scale 1 (floors for tiny scales)."""
    return Plan(
        scale=scale,
        teams=max(3, round(1000 * scale)),
        ledger_rows=max(20_000, round(10_000_000 * scale)),
        big_events=max(5_000, round(1_000_000 * scale)),
    )


def holdings_for(plan: Plan) -> list[tuple[int, int]]:
    """(team index, product index) pairs with a grant: team 0 holds all 50, team 1 five, others three."""
    pairs = [(0, p) for p in range(N_PRODUCTS)] + [(1, p) for p in range(SMALL_TEAM_PRODUCTS)]
    for t in range(2, plan.teams):
        pairs += [(t, (t * PER_TEAM_PRODUCTS + j) % N_PRODUCTS) for j in range(PER_TEAM_PRODUCTS)]
    return pairs


def rows_per_holding(plan: Plan, holdings: list[tuple[int, int]]) -> list[int]:
    """Consume rows per holding: the big product gets ``big_events``, the rest share the remainder.

    Together with one ``grant`` row per holding the ledger has exactly ``plan.ledger_rows`` rows.
    """
    rest = plan.ledger_rows - len(holdings) - plan.big_events
    others = len(holdings) - 1
    if rest < others:
        raise ValueError("scale too small for the holdings")
    base, extra = divmod(rest, others)
    counts = [plan.big_events]
    for i in range(others):
        counts.append(base + (1 if i < extra else 0))
    return counts


def amount_sum(n: int) -> int:
    """Sum of the amounts of the first ``n`` consume rows of a holding."""
    full, part = divmod(n, len(AMOUNTS))
    return full * sum(AMOUNTS) + sum(AMOUNTS[:part])


def is_low(team_index: int, product_index: int) -> bool:
    """A few balances are seeded red (<= 20% left); the load never spends from them."""
    if team_index == 0:
        return product_index >= 45
    return team_index >= 2 and team_index % 10 == 0 and product_index == (team_index * PER_TEAM_PRODUCTS + 2) % 50


def grant_quantity(consumed: int, low: bool) -> int:
    headroom = consumed // 6 + 1 if low else max(consumed, 200_000)
    return consumed + headroom


def consume_fields(h: int, i: int, slug: str) -> tuple[str, str, str]:
    """(user, service, job_id) of consume row ``i`` of holding ``h`` (its ledger row and its event)."""
    return f"user{(i // 50) % 4}@{slug}.example", SERVICES[(i // 20) % 5], f"job-{h}-{i}" if i % 10 == 0 else ""


def team_slug(t: int) -> str:
    return {0: "bench-big", 1: "bench-small"}.get(t, f"bench-{t:04d}")


def product_code(p: int) -> str:
    return f"bench-p{p:02d}"


def log(msg: str) -> None:
    print(f"[seed] {msg}", flush=True)


class _Stamp:
    """Fast 'YYYY-MM-DD HH:MM:SS+00' for epoch seconds (days cached, times of day from a table)."""

    def __init__(self):
        self.days: dict[int, str] = {}
        # The 86,400 times of day formatted once (~6 MB): formatting them row by row took
        # longer than the rest of an event's line.
        self.times = [f"{h:02d}:{m:02d}:{s:02d}+00" for h in range(24) for m in range(60) for s in range(60)]

    def __call__(self, ts: int) -> str:
        day, sec = divmod(ts, 86400)
        prefix = self.days.get(day)
        if prefix is None:
            prefix = self.days[day] = datetime.fromtimestamp(day * 86400, UTC).strftime("%Y-%m-%d ")
        return prefix + self.times[sec]


class _Copy:
    """Lines into an open ``COPY ... FROM STDIN``, written in chunks, with progress lines."""

    def __init__(self, copy, label: str, total: int, every: int):
        self.copy, self.label, self.total, self.every = copy, label, total, every
        self.buf: list[str] = []
        self.written, self.next_report, self.started = 0, every, time.monotonic()

    def add(self, line: str) -> None:
        self.buf.append(line)
        if len(self.buf) >= 20_000:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.copy.write("".join(self.buf))
            self.written += len(self.buf)
            self.buf = []
        if self.written >= self.next_report:
            rate = self.written / (time.monotonic() - self.started)
            log(f"{self.label} {self.written:,}/{self.total:,} rows ({rate:,.0f} rows/s, "
                f"~{(self.total - self.written) / rate:.0f}s left)")
            self.next_report += self.every

    def done(self) -> None:
        self.flush()
        log(f"{self.label} done: {self.written:,} rows in {time.monotonic() - self.started:.1f}s")


# What json.dumps writes between quotes unchanged (no quote, backslash, control or non-ASCII
# character): the event templates below put such strings in as they are.
_PLAIN = re.compile(r"[A-Za-z0-9@._-]*")


def _check_plain(*strings: str) -> None:
    for s in strings:
        if not _PLAIN.fullmatch(s):
            raise ValueError(f"seed: {s!r} is not plain ASCII, the event templates would not escape it")


def event_lines(h: int, n: int, *, slug: str, code: str, quantity: int, team_id: int, key_id: int,
                first_id: int, start: int, span: int, stamp: _Stamp) -> Iterator[str]:
    """COPY lines of the ``n`` events of holding ``h``: what the API would have stored for them.

    Each is byte for byte what ``_payload``, ``fingerprint`` and ``json.dumps`` give
    (test_event_lines_match_the_api_texts holds them to it), written from templates instead:
    with those calls per row the 10M-event COPY ran at 21k rows/s, half of the first seed's
    time. Row ``i``'s request depends on ``i`` through its amount (period 10), user (200)
    and service (100) only, unless it has a job id (every 10th row): the other rows take
    their request and its fingerprint from a table of 200.
    """
    _check_plain(slug, code, *SERVICES)  # (users are made of the slug, job ids of numbers)
    # Per residue r = i % 200: for a row without a job id, its "fingerprint, operation,
    # request, status" columns whole; for one with, the request up to the job id and the
    # fingerprinted text after it (json.dumps(..., sort_keys=True): job_id comes first).
    fixed: list[str | None] = []
    around_job: list[tuple[str, str] | None] = []
    for r in range(200):
        user, service, job = consume_fields(h, r, slug)
        a = AMOUNTS[r % 10]
        request = (f'{{"product": "{code}", "quantity": {a}, "occurred_at": null, "user": "{user}", '
                   f'"service": "{service}", "job_id": "')
        signed = (f'", "occurred_at": null, "operation": "consume", "product": "{code}", "quantity": {a}, '
                  f'"service": "{service}", "user": "{user}"}}')
        if job:
            fixed.append(None)
            around_job.append((request, signed))
        else:
            fp = hashlib.sha256(f'{{"job_id": "{signed}'.encode()).hexdigest()
            fixed.append(f'{fp}\tconsume\t{request}"}}\t201\t')
            around_job.append(None)
    # The response after "available", per amount; then the API key and the time stamp.
    tails = [f', "total": {quantity}, "kind": "consume", "quantity": {a}, "charged": {a}}}\t{key_id}\t'
             for a in AMOUNTS]
    available = quantity
    for i in range(n):
        available -= AMOUNTS[i % 10]
        cols = fixed[i % 200]
        if cols is None:  # (the job id as consume_fields writes it)
            request, signed = around_job[i % 200]
            job = f"job-{h}-{i}"
            fp = hashlib.sha256(f'{{"job_id": "{job}{signed}'.encode()).hexdigest()
            cols = f'{fp}\tconsume\t{request}{job}"}}\t201\t'
        eid = first_id + i
        yield (f'{eid}\t{team_id}\tseed-{h}-{i}\t{cols}{{"id": {eid}, "product": "{code}", "available": '
               f'{available}{tails[i % 10]}{stamp(start + (i * span) // n)}\n')


def settle(log) -> None:
    """Write the seed out before anything is measured: a checkpoint, then the kernel's dirty pages.

    A fresh seed leaves gigabytes in PostgreSQL's buffers and the page cache. Measured at once,
    every commit's WAL flush queues behind that write-back (a 1,000-event batch took 0.8-2 s
    instead of 0.17 s in the minutes after a seed): that measures the seeder, not the app.
    """
    from django.db import DatabaseError, connection

    t = time.monotonic()
    try:
        with connection.cursor() as cur:
            cur.execute("CHECKPOINT")
    except DatabaseError as exc:  # not a superuser nor in pg_checkpoint: measure anyway
        log(f"checkpoint skipped ({str(exc).strip()})")
    os.sync()  # (a local server's files; nothing for a remote one)
    log(f"checkpoint and sync: {time.monotonic() - t:.1f}s")


def seed(plan: Plan) -> dict:
    """Seed an empty, migrated database; returns the marker's meta."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password
    from django.db import connection, transaction

    from products.models import SOURCE_PRIORITY, Grant, Lot, Product, Refresh, Source, TeamProduct
    from teams.models import ApiKey, Membership, Role, Team
    from usage.ledger import NEVER_DUE

    started = time.monotonic()
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    grant_start = now - timedelta(days=400)
    grant_end = now + timedelta(days=400)
    usage_start = int((now - timedelta(days=365)).timestamp())
    usage_end = int((now - timedelta(hours=1)).timestamp())
    holdings = holdings_for(plan)
    counts = rows_per_holding(plan, holdings)
    log(f"plan: {plan.teams:,} teams, {len(holdings):,} holdings, {plan.ledger_rows:,} ledger rows "
        f"({plan.big_events:,} on {team_slug(0)}/{product_code(0)}), scale {plan.scale}")

    User = get_user_model()
    with transaction.atomic():
        products = Product.objects.bulk_create([
            Product(code=product_code(p), name=f"Bench product {p:02d}", unit="tokens") for p in range(N_PRODUCTS)
        ])
        teams = Team.objects.bulk_create([
            Team(name=f"Bench team {t:04d}" if t > 1 else ("Bench big" if t == 0 else "Bench small"),
                 slug=team_slug(t), timezone="America/New_York" if t == 0 else TIMEZONES[t % len(TIMEZONES)])
            for t in range(plan.teams)
        ])
        password = make_password("bench-pass")
        users = User.objects.bulk_create([
            User(username=f"bench-admin-{t:04d}", email=f"admin{t}@bench.example", password=password)
            for t in range(plan.teams)
        ])
        Membership.objects.bulk_create([
            Membership(user=u, team=tm, role=Role.PRIMARY_ADMIN) for u, tm in zip(users, teams, strict=True)
        ])
        keys, raw_keys = [], []
        for tm in teams:
            k = ApiKey(team=tm, name="bench")
            raw_keys.append(k.set_new_secret())
            keys.append(k)
        ApiKey.objects.bulk_create(keys)
        # Only "never" grants: as grant_create says for such a balance, no monthly period is
        # ever due (the consume's one-round-trip path applies from the first write).
        TeamProduct.objects.bulk_create([
            TeamProduct(team=teams[t], product=products[p], refresh_checked_at=grant_start, refresh_due_at=NEVER_DUE)
            for t, p in holdings
        ])
        quantities = [grant_quantity(amount_sum(n), is_low(t, p)) for (t, p), n in zip(holdings, counts, strict=True)]
        grants = Grant.objects.bulk_create([
            Grant(team=teams[t], product=products[p], quantity=q, source=Source.PURCHASE, starts_at=grant_start,
                  ends_at=grant_end, refresh=Refresh.NEVER, note="bench seed")
            for (t, p), q in zip(holdings, quantities, strict=True)
        ])
        lots = Lot.objects.bulk_create([
            Lot(grant=g, team_id=g.team_id, product_id=g.product_id, period_index=0, period_start=grant_start,
                expires_at=grant_end, priority=SOURCE_PRIORITY[Source.PURCHASE], quantity=g.quantity,
                remaining=g.quantity)
            for g in grants
        ])
    log(f"catalog, teams, users, keys, grants and lots: {time.monotonic() - started:.1f}s")

    with connection.cursor() as cur:
        cur.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename IN ('usage_ledgerentry', "
                    "'usage_event') AND indexdef NOT LIKE 'CREATE UNIQUE%%'")
        plain_indexes = cur.fetchall()

    # Event ids are numbered holding by holding: row i of holding h has event event_base[h] + i.
    event_base, next_id = [], 1
    for n in counts:
        event_base.append(next_id)
        next_id += n
    n_events = next_id - 1
    span = usage_end - usage_start

    stamp = _Stamp()
    cols = ('team_id, product_id, lot_id, grant_id, kind, delta, amount, occurred_at, recorded_at, actor, '
            'actor_api_key_id, "user", service, job_id, note, event_id')
    grant_at = stamp(int(grant_start.timestamp()))
    with transaction.atomic(), connection.cursor() as cur:
        # The bulk load checks foreign keys by construction, not row by row (RI triggers off
        # for this transaction); plain indexes are rebuilt after the load.
        cur.execute("SET LOCAL session_replication_role = replica")
        for name, _ in plain_indexes:
            cur.execute(f'DROP INDEX "{name}"')
        # (COPY's text format as is: every string here is plain ASCII, no tab, newline or
        # backslash, so the JSON texts need no further escaping.)
        event_cols = ("id, team_id, key, fingerprint, operation, request, status_code, response, api_key_id, "
                      "created_at")
        with cur.cursor.copy(f"COPY usage_event ({event_cols}) FROM STDIN") as copy:
            out = _Copy(copy, "events COPY", n_events, every=1_000_000)
            for h, ((t, p), n) in enumerate(zip(holdings, counts, strict=True)):
                for line in event_lines(h, n, slug=team_slug(t), code=product_code(p), quantity=quantities[h],
                                        team_id=teams[t].pk, key_id=keys[t].pk, first_id=event_base[h],
                                        start=usage_start, span=span, stamp=stamp):
                    out.add(line)
            out.done()
        cur.execute("SELECT setval(pg_get_serial_sequence('usage_event', 'id'), %s)", [max(n_events, 1)])
        with cur.cursor.copy(f"COPY usage_ledgerentry ({cols}) FROM STDIN") as copy:
            out = _Copy(copy, "ledger COPY", plan.ledger_rows, every=500_000)
            for g in grants:
                out.add(f"{g.team_id}\t{g.product_id}\t\\N\t{g.pk}\tgrant\t{g.quantity}\t{g.quantity}\t{grant_at}\t"
                        f"{grant_at}\tsystem\t\\N\t\t\t\tbench seed\t\\N\n")
            for h, ((t, _p), n) in enumerate(zip(holdings, counts, strict=True)):
                lot = lots[h]
                head = f"{lot.team_id}\t{lot.product_id}\t{lot.pk}\t{lot.grant_id}\tconsume\t"
                actor = f"api_key:{keys[t].prefix}\t{keys[t].pk}\t"
                slug = team_slug(t)
                base = event_base[h]
                for i in range(n):
                    a = AMOUNTS[i % 10]
                    ts = stamp(usage_start + (i * span) // n)
                    user, service, job = consume_fields(h, i, slug)
                    out.add(f"{head}-{a}\t{a}\t{ts}\t{ts}\t{actor}{user}\t{service}\t{job}\t\t{base + i}\n")
            out.done()

    def step(label: str, sql: str) -> int:
        t = time.monotonic()
        with connection.cursor() as cur:
            cur.execute(sql)
            n = cur.rowcount
        log(f"{label}: {time.monotonic() - t:.1f}s")
        return n

    with connection.cursor() as cur:
        cur.execute("SET maintenance_work_mem = '512MB'")
        cur.execute("SET work_mem = '256MB'")
    for name, ddl in plain_indexes:
        step(f"index {name}", ddl)
    step("lots: remaining = quantity + sum(deltas)",
         "UPDATE products_lot lo SET remaining = lo.quantity + x.s FROM ("
         " SELECT lot_id, sum(delta) AS s FROM usage_ledgerentry WHERE lot_id IS NOT NULL GROUP BY lot_id"
         ") x WHERE x.lot_id = lo.id")
    with connection.cursor() as cur:  # rebuilt after the bulk inserts, as for the ledger
        cur.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename IN ('usage_dailyrollup', "
                    "'usage_dailybreakdown') AND indexdef NOT LIKE 'CREATE UNIQUE%%'")
        rollup_indexes = cur.fetchall()
        for name, _ in rollup_indexes:
            cur.execute(f'DROP INDEX "{name}"')
    n_breakdown = step("daily breakdowns from the ledger (team time zone)",
         'INSERT INTO usage_dailybreakdown (team_id, product_id, day, service, "user", consumed, refunded, '
         "checked_out, returned, raw_usage) "
         "SELECT l.team_id, l.product_id, (l.occurred_at AT TIME ZONE t.timezone)::date, l.service, l.\"user\", "
         "sum(l.amount), 0, 0, 0, 0 FROM usage_ledgerentry l JOIN teams_team t ON t.id = l.team_id "
         "WHERE l.kind = 'consume' GROUP BY 1, 2, 3, 4, 5")
    n_rollup = step("daily rollups from the breakdowns",
         "INSERT INTO usage_dailyrollup (team_id, product_id, day, consumed, refunded, checked_out, returned, "
         "raw_usage, peak_checked_out, closing_checked_out) "
         "SELECT team_id, product_id, day, sum(consumed), 0, 0, 0, 0, 0, 0 FROM usage_dailybreakdown "
         "GROUP BY 1, 2, 3")

    for name, ddl in rollup_indexes:
        step(f"index {name}", ddl)

    t = time.monotonic()
    with connection.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM products_lot lo LEFT JOIN ("
            " SELECT lot_id, sum(delta) AS s FROM usage_ledgerentry WHERE lot_id IS NOT NULL GROUP BY lot_id"
            ") x ON x.lot_id = lo.id WHERE lo.quantity + coalesce(x.s, 0) <> lo.remaining OR lo.remaining < 0")
        drift = cur.fetchone()[0]
        cur.execute("SELECT (SELECT coalesce(sum(amount), 0) FROM usage_ledgerentry WHERE kind = 'consume'), "
                    "(SELECT coalesce(sum(consumed), 0) FROM usage_dailyrollup), "
                    "(SELECT count(*) FROM usage_ledgerentry)")
        ledger_sum, rollup_sum, ledger_count = cur.fetchone()
        # (The load ran with its foreign-key triggers off: check the event links here.)
        cur.execute("SELECT (SELECT count(*) FROM usage_event), count(DISTINCT l.event_id), "
                    "count(*) FILTER (WHERE l.event_id IS NOT NULL AND (e.id IS NULL OR e.team_id <> l.team_id "
                    "OR e.created_at <> l.recorded_at OR e.api_key_id IS DISTINCT FROM l.actor_api_key_id "
                    "OR l.kind <> 'consume')), "
                    "count(*) FILTER (WHERE l.event_id IS NULL AND l.kind = 'consume') "
                    "FROM usage_ledgerentry l LEFT JOIN usage_event e ON e.id = l.event_id")
        event_count, linked, bad_links, unlinked = cur.fetchone()
    if drift or ledger_sum != rollup_sum or ledger_count != plan.ledger_rows:
        sys.exit(f"bench: seeded data is inconsistent (lot drift {drift}, ledger {ledger_sum} vs rollups "
                 f"{rollup_sum}, {ledger_count} rows)")
    if event_count != n_events or linked != n_events or bad_links or unlinked:
        sys.exit(f"bench: seeded events are inconsistent ({event_count} events, {linked} linked, "
                 f"{bad_links} broken links, {unlinked} consumes without one, {n_events} planned)")
    log(f"verified: every lot's remaining matches its ledger, rollups match the ledger, each of the "
        f"{n_events:,} consumes has its own event ({time.monotonic() - t:.1f}s)")
    step("vacuum analyze", "VACUUM (ANALYZE)")
    settle(log)

    load_targets = []  # [raw key, product code] for consumes: healthy balances of teams 2+
    batch_targets: dict[int, list] = {}
    for (t, p) in holdings:
        if t >= 2 and not is_low(t, p):
            load_targets.append([raw_keys[t], product_code(p)])
            batch_targets.setdefault(t, [raw_keys[t], []])[1].append(product_code(p))
    copy_lots = [[lot.team_id, lot.product_id, lot.pk, lot.grant_id, keys[t].pk, keys[t].prefix]
                 for (t, _p), lot in zip(holdings, lots, strict=True) if t >= 2][:200]
    meta = {
        "seeded_at": now.isoformat(),
        "seed_seconds": round(time.monotonic() - started, 1),
        "teams": plan.teams,
        "holdings": len(holdings),
        "ledger_rows": plan.ledger_rows,
        "events": n_events,
        "big_events": plan.big_events,
        "rollup_rows": n_rollup,
        "breakdown_rows": n_breakdown,
        "big_team": team_slug(0),
        "big_team_admin": "bench-admin-0000",
        "small_team": team_slug(1),
        "small_team_admin": "bench-admin-0001",
        "big_product": product_code(0),
        "load_targets": load_targets,
        "batch_targets": list(batch_targets.values()),
        "copy_lots": copy_lots,
    }
    log(f"seeded in {meta['seed_seconds']:.0f}s")
    return meta
