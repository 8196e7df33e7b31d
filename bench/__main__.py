"""``python -m bench`` (``make bench``): seed, serve, load, compare; writes bench/results.json.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/capacity_portal_bench make bench
    .venv/bin/python -m bench --scale 0.01 --only floor_page,dashboard
    .venv/bin/python -m bench --reseed          # drop and seed the bench database again
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from . import goals as goals_mod
from .database import check_database_url

BENCH_DIR = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0,
                   help="data size: 1.0 = 1,000 teams and 10M ledger rows (default); 0.01 for development")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(goals_mod.MEASUREMENTS)}")
    p.add_argument("--reseed", action="store_true", help="drop and recreate the bench database, then seed it")
    p.add_argument("--duration", type=int, default=10, help="seconds of each throughput load (default 10)")
    p.add_argument("--connections", type=int, default=16, help="connections of the throughput loads (default 16)")
    p.add_argument("--output", default=str(BENCH_DIR / "results.json"), help="results file")
    args = p.parse_args(argv)
    if not 0 < args.scale <= 1.0:
        p.error("--scale must be in (0, 1]")
    try:
        args.measurements = goals_mod.parse_only(args.only)
    except ValueError as exc:
        p.error(str(exc))
    return args


def configure_environment() -> dict:
    """Production-like settings for the bench process and the gunicorn it starts."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "capacity_portal.settings")
    os.environ["DJANGO_DEBUG"] = "0"
    os.environ.setdefault("SECRET_KEY", "bench-" + secrets.token_urlsafe(32))
    os.environ["ALLOWED_HOSTS"] = "127.0.0.1,localhost,testserver"
    # The per-key limit still runs (a cache increment per request); it just never trips in the bench.
    os.environ["API_RATE_LIMIT_PER_MINUTE"] = "100000000"
    os.environ.pop("PYTEST_VERSION", None)
    return dict(os.environ)


def ensure_seeded(url: str, scale: float, reseed: bool) -> dict:
    import django
    from django.core.management import call_command
    from django.db import connection, connections

    from . import database, seed

    if not database.database_exists(url):
        database.recreate_database(url)
    django.setup()
    marker = None if reseed else database.read_marker(connection)
    if database.marker_matches(marker, version=seed.SEED_VERSION, scale=scale):
        print(f"[seed] reusing the seeded database (seed {marker['version']}, scale {scale}, seeded "
              f"{marker['meta']['seeded_at']}); --reseed to start afresh", flush=True)
        call_command("migrate", "--noinput", verbosity=0)  # migrations that landed since the seed
        t = time.monotonic()
        database.vacuum_written_tables(connection)
        print(f"[seed] vacuumed the tables earlier runs wrote to ({time.monotonic() - t:.1f}s)", flush=True)
        seed.settle(lambda msg: print(f"[seed] {msg}", flush=True))
        return marker["meta"]
    why = "--reseed" if reseed else ("no seed marker" if marker is None else "seed version or scale changed")
    print(f"[seed] dropping and creating the bench database ({why})", flush=True)
    connections.close_all()
    database.recreate_database(url)
    t = time.monotonic()
    call_command("migrate", "--noinput", verbosity=0)
    print(f"[seed] migrated in {time.monotonic() - t:.1f}s", flush=True)
    meta = seed.seed(seed.make_plan(scale))
    database.write_marker(connection, version=seed.SEED_VERSION, scale=scale, meta=meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = os.environ.get("DATABASE_URL", "")
    refusal = check_database_url(url)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    started = time.monotonic()
    started_at = datetime.now(UTC)
    env = configure_environment()
    meta = ensure_seeded(url, args.scale, args.reseed)
    seed_s = time.monotonic() - started

    from . import measure
    from .server import Server, worker_count

    run_id = "r" + secrets.token_hex(4)
    results: dict = {}
    skipped: dict[str, str] = {}
    errors: dict[str, str] = {}
    selected = set(args.measurements)
    for name, keys in goals_mod.MEASUREMENTS.items():
        if name not in selected:
            for k in keys:
                skipped[k] = "not selected (--only)"

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        server = Server(env, log_path=BENCH_DIR / "gunicorn.log")
        print(f"[bench] gunicorn: {server.workers} sync workers on 127.0.0.1:{server.port} (DEBUG off)", flush=True)
        with server:
            ctx = measure.Context(base_url=server.base_url, meta=meta, run_id=run_id, workdir=Path(tmp),
                                  scale=args.scale, duration_s=args.duration, connections=args.connections)
            joint = {group: [n for n in args.measurements if n in members]
                     for group, (members, _) in measure.JOINT.items()}
            for name in args.measurements:
                keys = goals_mod.MEASUREMENTS[name]
                group = next((g for g, (members, _) in measure.JOINT.items() if name in members), None)
                if group is not None:
                    if name != joint[group][0]:
                        continue  # measured with the first of its group
                    keys = [k for n in joint[group] for k in goals_mod.MEASUREMENTS[n]]
                try:
                    if group is not None:
                        out, joint_skips = measure.JOINT[group][1](ctx, joint[group])
                        for skipped_name, reason in joint_skips.items():
                            print(f"[bench] {skipped_name}: skipped: {reason}", flush=True)
                            for k in goals_mod.MEASUREMENTS[skipped_name]:
                                skipped[k] = reason
                    else:
                        out = measure.MEASURE[name](ctx)
                except measure.Skip as exc:
                    print(f"[bench] {name}: skipped: {exc}", flush=True)
                    for k in keys:
                        skipped[k] = str(exc)
                    continue
                except Exception as exc:  # noqa: BLE001 - report, go on with the others
                    traceback.print_exc()
                    print(f"[bench] {name}: FAILED: {exc}", flush=True)
                    errors[name] = str(exc)
                    for k in keys:
                        skipped[k] = f"failed: {exc}"[:200]
                    continue
                results.update(out)
                ctx.results.update(out)

    goals = goals_mod.compute_goals(results)
    elapsed = time.monotonic() - started
    report = {
        **results,
        "goals": [g.as_dict() for g in goals],
        "skipped": skipped,
        "errors": errors,
        "details": ctx.details,
        "meta": {
            "run_id": run_id, "started_at": started_at.isoformat(), "elapsed_s": round(elapsed, 1),
            "seed_or_reuse_s": round(seed_s, 1), "scale": args.scale, "cores": os.cpu_count(),
            "gunicorn_workers": worker_count(), "duration_s": args.duration, "connections": args.connections,
            "load_average": os.getloadavg(), "seeded": {k: v for k, v in meta.items()
                                                        if k not in ("load_targets", "batch_targets", "copy_lots")},
            "note": "ratios are measured side by side in one run; absolute numbers vary with machine load",
        },
    }
    Path(args.output).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print()
    print(goals_mod.render_table(results, skipped, goals))
    print(f"\nwhole run {elapsed:.0f}s (seed or reuse {seed_s:.0f}s); results in {args.output}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
