"""PostgreSQL: the API's per-key rate count in the database, and in the consume's statement.

The count was a Redis round trip before every API request. Measured under load (paired
runs, ``make bench``), that round trip to another process cost a consume 8-13% of its
throughput, far more than the counting itself. On PostgreSQL the count is now kept in the
database the request talks to anyway:

- ``usage_apirate``: one row per key hash (the SHA-256 of the bearer token, known before
  any lookup, so unknown keys are counted too), its one-minute window and its count in that
  window. UNLOGGED: no WAL for a counter that may be lost in a crash (a crash resets the
  minute's counts, as a Redis restart did). Old rows are purged by ``usage.api_rates_prune``.
- ``usage_api_rate_count(hash, window)``: add one to the key's count in ``window`` and
  return it (PL/pgSQL, not SQL: a SQL function's INSERT is planned again on every call). A window older than the stored one (a server whose clock is behind) counts
  into the stored one, so no clock can restart a key's minute.
- ``usage_consume_api`` (replaced, one more argument pair and one more column): with a
  window it counts the request first, in the same statement; over ``p_rate_limit`` its
  outcome is ``rate_limited`` and nothing else is done. The count is committed with any
  outcome the function returns, and rolled back with the statement when it raises (a
  refusal, a hand-over): the caller then counts the request on the path that answers it,
  so every request counts once. ``rate_count`` is the count (NULL when not counted).

The row's lock lasts until the statement commits: a key's concurrent requests count one
after another, each waiting for the one before to commit (a consume, about a millisecond).
Within a key's limit (``API_RATE_LIMIT_PER_MINUTE``, 6,000 by default: 100 a second) that
queue stays short; and a key's consumes of one balance queued on the balance's lock anyway.

``last_used_at`` is written only when stale, as before, but the key's row is no longer
updated (to nothing) on every call: the stale test uses the value just read.

Replaced, not edited, by later migrations (CREATE OR REPLACE).
"""

import importlib

from django.db import migrations

from capacity_portal.migration_ops import on_postgresql

PG_UP = r"""
CREATE UNLOGGED TABLE usage_apirate (
    key_hash text PRIMARY KEY,
    win bigint NOT NULL,
    n integer NOT NULL
);

CREATE FUNCTION usage_api_rate_count(p_key_hash text, p_window bigint) RETURNS integer
LANGUAGE plpgsql AS $fn$
DECLARE
    v_count integer;
BEGIN
    INSERT INTO usage_apirate AS r (key_hash, win, n) VALUES (p_key_hash, p_window, 1)
    ON CONFLICT (key_hash) DO UPDATE
       SET n = CASE WHEN r.win >= excluded.win THEN r.n + 1 ELSE 1 END,
           win = greatest(r.win, excluded.win)
    RETURNING n INTO v_count;
    RETURN v_count;
END;
$fn$;

DROP FUNCTION usage_consume_api(text, timestamptz, text, bigint, text, text, jsonb, text, text, text, text,
                                timestamptz, timestamptz, timestamptz);

CREATE FUNCTION usage_consume_api(
    p_key_hash text, p_stale timestamptz,
    p_product_code text, p_quantity bigint, p_key text, p_fingerprint text, p_request jsonb,
    p_user text, p_user_lower text, p_service text, p_job_id text,
    p_occurred_at timestamptz, p_now timestamptz, p_wall timestamptz,
    p_rate_window bigint, p_rate_limit integer
) RETURNS TABLE (outcome text, event_id bigint, available numeric, total numeric,
                 status_code integer, response jsonb, rate_count integer)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_key record;
    v_count integer;
BEGIN
    IF p_rate_window IS NOT NULL THEN  -- (usage_api_rate_count's statement, here for its cached plan)
        INSERT INTO usage_apirate AS r (key_hash, win, n) VALUES (p_key_hash, p_rate_window, 1)
        ON CONFLICT (key_hash) DO UPDATE
           SET n = CASE WHEN r.win >= excluded.win THEN r.n + 1 ELSE 1 END,
               win = greatest(r.win, excluded.win)
        RETURNING n INTO v_count;
        IF p_rate_limit > 0 AND v_count > p_rate_limit THEN
            RETURN QUERY SELECT 'rate_limited'::text, NULL::bigint, NULL::numeric, NULL::numeric, NULL::integer,
                                NULL::jsonb, v_count;
            RETURN;
        END IF;
    END IF;
    SELECT k.id, k.team_id, k.prefix, k.last_used_at, t.timezone INTO v_key
      FROM teams_apikey k JOIN teams_team t ON t.id = k.team_id
     WHERE k.hashed_key = p_key_hash AND k.revoked_at IS NULL;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unauthorized'::text, NULL::bigint, NULL::numeric, NULL::numeric, NULL::integer,
                            NULL::jsonb, v_count;
        RETURN;
    END IF;
    IF strpos(v_key.timezone, '/') = 0 AND v_key.timezone <> 'UTC' THEN
        RAISE EXCEPTION 'usage_consume_api: time zone % may be read as an abbreviation', v_key.timezone
            USING ERRCODE = '22X01';
    END IF;
    IF v_key.last_used_at IS NULL OR v_key.last_used_at <= p_stale THEN
        UPDATE teams_apikey SET last_used_at = p_now
         WHERE id = (SELECT k.id FROM teams_apikey k
                      WHERE k.id = v_key.id AND (k.last_used_at IS NULL OR k.last_used_at <= p_stale)
                        FOR NO KEY UPDATE SKIP LOCKED);
    END IF;
    RETURN QUERY SELECT f.*, v_count FROM usage_consume_fast(
        v_key.team_id, p_product_code, p_quantity, p_key, p_fingerprint, p_request,
        v_key.id, NULL::bigint, 'api_key:' || v_key.prefix,
        p_user, p_user_lower, p_service, p_job_id,
        p_occurred_at, (p_occurred_at AT TIME ZONE v_key.timezone)::date, p_now, p_wall) f;
END;
$fn$;
"""

PG_DOWN = """
DROP FUNCTION IF EXISTS usage_consume_api(text, timestamptz, text, bigint, text, text, jsonb, text, text, text,
                                          text, timestamptz, timestamptz, timestamptz, bigint, integer);
DROP FUNCTION IF EXISTS usage_api_rate_count(text, bigint);
DROP TABLE IF EXISTS usage_apirate;
"""


# Reversed: this migration's objects go, and 0007's function comes back.
PG_RESTORE = PG_DOWN + importlib.import_module("usage.migrations.0007_consume_api_function").PG_UP


class Migration(migrations.Migration):
    dependencies = [("usage", "0008_fk_indexes_covered")]
    operations = [on_postgresql(PG_UP, PG_RESTORE)]
