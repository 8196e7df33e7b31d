"""PostgreSQL: ``usage_consume_api`` counts the request last, so that the key's counter row
is never locked while the statement waits for a balance.

In 0009 the count came first: its row stayed locked until the statement committed, and
the statement may wait for a balance's lock (a 1,000-event batch, a monthly refresh, a
reconciliation hold it for a while). Every other request of the key, on any endpoint,
then waited for the counter (seen: a GET of the key's balances took 2.5 s behind a
consume waiting 3 s for its balance, against 0.1 s with the Redis counter).

Now:
- a key already at its limit in this window (read without a lock, with the key) is counted
  and refused first (``rate_limited``, committed), without touching a balance;
- otherwise the consume runs (or answers its replay, conflict, ...), and only then is the
  request counted; the row is locked from there to the commit. Over the limit then (others
  counted meanwhile), the statement raises ``22X03`` and rolls back, the consume and the
  count with it: the caller counts the request on the path that refuses it;
- an unknown key is counted and answered ``unauthorized`` (committed), as before.
Every request still counts once; the answers are those of 0009.

Replaced, not edited, by later migrations (CREATE OR REPLACE).
"""

import importlib

from django.db import migrations

from capacity_portal.migration_ops import on_postgresql

PG_UP = r"""
CREATE OR REPLACE FUNCTION usage_consume_api(
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
    v_row record;
BEGIN
    -- The key, and whether it is at its limit already (its counter read without a lock).
    SELECT k.id, k.team_id, k.prefix, k.last_used_at, t.timezone,
           (p_rate_window IS NOT NULL AND p_rate_limit > 0 AND EXISTS (
               SELECT 1 FROM usage_apirate r
                WHERE r.key_hash = p_key_hash AND r.win >= p_rate_window AND r.n >= p_rate_limit)) AS at_limit
      INTO v_key
      FROM teams_apikey k JOIN teams_team t ON t.id = k.team_id
     WHERE k.hashed_key = p_key_hash AND k.revoked_at IS NULL;
    IF NOT FOUND OR v_key.at_limit THEN
        IF p_rate_window IS NOT NULL THEN
            v_count := usage_api_rate_count(p_key_hash, p_rate_window);
        END IF;
        RETURN QUERY SELECT CASE WHEN v_key.id IS NULL THEN 'unauthorized' ELSE 'rate_limited' END::text,
                            NULL::bigint, NULL::numeric, NULL::numeric, NULL::integer, NULL::jsonb, v_count;
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
    SELECT * INTO v_row FROM usage_consume_fast(
        v_key.team_id, p_product_code, p_quantity, p_key, p_fingerprint, p_request,
        v_key.id, NULL::bigint, 'api_key:' || v_key.prefix,
        p_user, p_user_lower, p_service, p_job_id,
        p_occurred_at, (p_occurred_at AT TIME ZONE v_key.timezone)::date, p_now, p_wall);
    IF p_rate_window IS NOT NULL THEN  -- (usage_api_rate_count's statement, here for its cached plan)
        INSERT INTO usage_apirate AS r (key_hash, win, n) VALUES (p_key_hash, p_rate_window, 1)
        ON CONFLICT (key_hash) DO UPDATE
           SET n = CASE WHEN r.win >= excluded.win THEN r.n + 1 ELSE 1 END,
               win = greatest(r.win, excluded.win)
        RETURNING n INTO v_count;
        IF p_rate_limit > 0 AND v_count > p_rate_limit THEN
            RAISE EXCEPTION 'usage_consume_api: over the rate limit (%)', v_count USING ERRCODE = '22X03';
        END IF;
    END IF;
    RETURN QUERY SELECT v_row.outcome, v_row.event_id, v_row.available, v_row.total, v_row.status_code,
                        v_row.response, v_count;
END;
$fn$;
"""


# Reversed: 0009's function again.
PG_RESTORE = "CREATE OR REPLACE FUNCTION usage_consume_api(" + importlib.import_module(
    "usage.migrations.0009_api_rate_in_database").PG_UP.split("CREATE FUNCTION usage_consume_api(", 1)[1]


class Migration(migrations.Migration):
    dependencies = [("usage", "0009_api_rate_in_database")]
    operations = [on_postgresql(PG_UP, PG_RESTORE)]
