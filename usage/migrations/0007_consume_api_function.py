"""PostgreSQL: ``usage_consume_api``, the API's consume with its key lookup in one round trip.

``POST /api/v1/usage`` used to look the bearer key up (and write its once-a-minute
``last_used_at``) in one statement, then call ``usage_consume_fast`` in a second. This
function does both: it finds the unrevoked key by its SHA-256 with the key's team and
time zone, writes ``last_used_at`` when it is older than ``p_stale``, and hands the
consume to ``usage_consume_fast`` (unchanged) as the key's actor, on the team's local
day of ``p_occurred_at``. An unknown or revoked key is the outcome ``unauthorized``
and writes nothing.

The day: PostgreSQL reads a zone name as an abbreviation first, and some names that
zoneinfo knows as zones with summer time are abbreviations of fixed offsets there (CET,
EET, MET, WET). Abbreviations never contain a slash, so a team whose zone has none
(other than UTC) hands over (``22X01``) and the Python path computes its day with
zoneinfo.

``last_used_at`` is written only if no other request is writing it (SKIP LOCKED): the
row lock lasts until the consume commits, and requests of the same key must not queue
behind it.

A hand-over (``22X01``) or an overdraft (``22X02``) raised by ``usage_consume_fast``
rolls the whole statement back, the ``last_used_at`` write included; the caller then
looks the key up as every other endpoint does (which writes it).

Replaced, not edited, by later migrations (CREATE OR REPLACE).
"""

from django.db import migrations

from capacity_portal.migration_ops import on_postgresql

PG_UP = r"""
CREATE OR REPLACE FUNCTION usage_consume_api(
    p_key_hash text, p_stale timestamptz,
    p_product_code text, p_quantity bigint, p_key text, p_fingerprint text, p_request jsonb,
    p_user text, p_user_lower text, p_service text, p_job_id text,
    p_occurred_at timestamptz, p_now timestamptz, p_wall timestamptz
) RETURNS TABLE (outcome text, event_id bigint, available numeric, total numeric,
                 status_code integer, response jsonb)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_key record;
BEGIN
    SELECT k.id, k.team_id, k.prefix, t.timezone INTO v_key
      FROM teams_apikey k JOIN teams_team t ON t.id = k.team_id
     WHERE k.hashed_key = p_key_hash AND k.revoked_at IS NULL;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unauthorized'::text, NULL::bigint, NULL::numeric, NULL::numeric, NULL::integer,
                            NULL::jsonb;
        RETURN;
    END IF;
    IF strpos(v_key.timezone, '/') = 0 AND v_key.timezone <> 'UTC' THEN
        RAISE EXCEPTION 'usage_consume_api: time zone % may be read as an abbreviation', v_key.timezone
            USING ERRCODE = '22X01';
    END IF;
    UPDATE teams_apikey SET last_used_at = p_now
     WHERE id = (SELECT k.id FROM teams_apikey k
                  WHERE k.id = v_key.id AND (k.last_used_at IS NULL OR k.last_used_at <= p_stale)
                    FOR NO KEY UPDATE SKIP LOCKED);
    RETURN QUERY SELECT * FROM usage_consume_fast(
        v_key.team_id, p_product_code, p_quantity, p_key, p_fingerprint, p_request,
        v_key.id, NULL::bigint, 'api_key:' || v_key.prefix,
        p_user, p_user_lower, p_service, p_job_id,
        p_occurred_at, (p_occurred_at AT TIME ZONE v_key.timezone)::date, p_now, p_wall);
END;
$fn$;
"""
PG_DOWN = ("DROP FUNCTION IF EXISTS usage_consume_api(text, timestamptz, text, bigint, text, text, jsonb, text, text,"
           " text, text, timestamptz, timestamptz, timestamptz);")


class Migration(migrations.Migration):
    dependencies = [("usage", "0006_consume_function")]
    operations = [on_postgresql(PG_UP, PG_DOWN)]
