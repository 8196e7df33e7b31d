"""The bench database: refuse SQLite, (re)create the database, read and write the seed marker."""

from __future__ import annotations

import json
from urllib.parse import unquote, urlsplit

SQLITE_REFUSAL = (
    "bench: refusing to run on SQLite; set DATABASE_URL to a PostgreSQL database, e.g. "
    "DATABASE_URL=postgres://postgres@127.0.0.1:5432/capacity_portal_bench make bench"
)

MARKER_TABLE = "bench_seed"


def check_database_url(url: str | None) -> str | None:
    """None if ``url`` is a PostgreSQL URL, else the one-line refusal to print."""
    scheme = urlsplit(url or "").scheme.lower()
    if scheme in {"postgres", "postgresql", "pgsql"} and unquote(urlsplit(url).path.lstrip("/")):
        return None
    if not url or scheme == "sqlite":
        return SQLITE_REFUSAL
    return f"bench: DATABASE_URL {url!r} is not a PostgreSQL URL (postgres://user@host:port/name)"


def _admin_conninfo(url: str) -> tuple[dict, str]:
    """psycopg connection kwargs for the server's maintenance database, and the bench db name."""
    parts = urlsplit(url)
    name = unquote(parts.path.lstrip("/"))
    kwargs = {"dbname": "postgres", "host": parts.hostname or None, "port": parts.port or None,
              "user": unquote(parts.username) if parts.username else None,
              "password": unquote(parts.password) if parts.password else None}
    return {k: v for k, v in kwargs.items() if v is not None}, name


def recreate_database(url: str) -> None:
    """Drop the bench database (the ledger refuses TRUNCATE/DELETE: we start afresh) and create it."""
    import psycopg
    from psycopg import sql

    kwargs, name = _admin_conninfo(url)
    with psycopg.connect(**kwargs, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def database_exists(url: str) -> bool:
    import psycopg

    kwargs, name = _admin_conninfo(url)
    with psycopg.connect(**kwargs, autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is not None


def read_marker(connection) -> dict | None:
    """The seed marker row (version, scale, meta) or None when the database is not seeded."""
    with connection.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)", [MARKER_TABLE])
        if cur.fetchone()[0] is None:
            return None
        cur.execute(f"SELECT version, scale, meta FROM {MARKER_TABLE} ORDER BY seeded_at DESC LIMIT 1")
        row = cur.fetchone()
    if row is None:
        return None
    meta = row[2] if isinstance(row[2], dict) else json.loads(row[2])
    return {"version": row[0], "scale": row[1], "meta": meta}


def write_marker(connection, *, version: str, scale: float, meta: dict) -> None:
    with connection.cursor() as cur:
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {MARKER_TABLE} (version text NOT NULL, scale double precision NOT NULL, "
            "seeded_at timestamptz NOT NULL DEFAULT now(), meta jsonb NOT NULL)"
        )
        cur.execute(f"INSERT INTO {MARKER_TABLE} (version, scale, meta) VALUES (%s, %s, %s)",
                    [version, scale, json.dumps(meta)])


def marker_matches(marker: dict | None, *, version: str, scale: float) -> bool:
    return bool(marker) and marker["version"] == version and abs(float(marker["scale"]) - scale) < 1e-9


# Tables a run writes to (consumes, batches, keys' last use). A reused database carries
# the dead rows of earlier runs on exactly the rows the next run updates; vacuum them so
# that every run starts from the same steady state (as autovacuum keeps production).
WRITTEN_TABLES = ("teams_apikey", "products_teamproduct", "products_lot", "usage_event",
                  "usage_dailyrollup", "usage_dailybreakdown")


def vacuum_written_tables(connection) -> None:
    with connection.cursor() as cur:  # autocommit: VACUUM cannot run in a transaction
        cur.execute(f"VACUUM (ANALYZE) {', '.join(WRITTEN_TABLES)}")
