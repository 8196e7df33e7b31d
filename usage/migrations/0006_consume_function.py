"""PostgreSQL: ``usage_consume_fast``, the common consume in one round trip.

The function does what ``usage.services.usage_consume`` does when nothing is due on
the balance (no lot to expire, no monthly period to open): claim the idempotency key,
lock the balance, read its open lots in consumption order, refuse an overdraft, draw,
write the ledger rows, the rollups and the stored response. When something is due it
raises ``22X01`` and the caller runs the Python path; an overdraft raises ``22X02``
(class 22, data exception: a refusal is ordinary traffic, and Django does not treat
data errors as a broken connection).
Either error rolls back the whole statement, the claim included, so nothing is written.
Every test of the consume service runs through it on PostgreSQL, and
``tests/test_consume_fast_path.py`` compares it with the Python path.

Kept in step with the Python path: change both together (the comparison test fails
otherwise). Replaced, not edited, by later migrations (CREATE OR REPLACE).
"""

from django.db import migrations

from capacity_portal.migration_ops import on_postgresql

PG_UP = r"""
CREATE OR REPLACE FUNCTION usage_consume_fast(
    p_team_id bigint, p_product_code text, p_quantity bigint,
    p_key text, p_fingerprint text, p_request jsonb,
    p_api_key_id bigint, p_actor_user_id bigint, p_actor text,
    p_user text, p_user_lower text, p_service text, p_job_id text,
    p_occurred_at timestamptz, p_day date, p_now timestamptz, p_wall timestamptz
) RETURNS TABLE (outcome text, event_id bigint, available numeric, total numeric,
                 status_code integer, response jsonb)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_product_id bigint;
    v_capacity text;
    v_event_id bigint;
    v_existing record;
    v_tp record;
    v_lot record;
    v_ids bigint[] := '{}';
    v_grants bigint[] := '{}';
    v_remaining bigint[] := '{}';
    v_available numeric := 0;
    v_total numeric := 0;
    v_left bigint := p_quantity;
    v_take bigint;
    v_member_id bigint;
    v_response jsonb;
    v_recorded_at timestamptz;
BEGIN
    -- The product, only if the team holds it (has a balance row).
    SELECT p.id, p.capacity_type INTO v_product_id, v_capacity
      FROM products_product p
      JOIN products_teamproduct tp ON tp.product_id = p.id AND tp.team_id = p_team_id
     WHERE p.code = p_product_code;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_held'::text, NULL::bigint, NULL::numeric, NULL::numeric, NULL::integer, NULL::jsonb;
        RETURN;
    END IF;
    IF v_capacity <> 'exhaustible' THEN
        RETURN QUERY SELECT 'returnable'::text, NULL::bigint, NULL::numeric, NULL::numeric, NULL::integer, NULL::jsonb;
        RETURN;
    END IF;

    -- (1) Claim the key. A concurrent request with the same key waits here on the unique
    -- index until the other commits (then we replay it) or rolls back (then we run).
    INSERT INTO usage_event (team_id, key, fingerprint, operation, request, status_code, response,
                             api_key_id, actor_user_id, created_at)
    VALUES (p_team_id, p_key, p_fingerprint, 'consume', p_request, 0, '{}'::jsonb,
            p_api_key_id, p_actor_user_id, p_wall)
    ON CONFLICT (team_id, key) DO NOTHING
    RETURNING id INTO v_event_id;
    IF v_event_id IS NULL THEN
        SELECT e.id, e.fingerprint, e.status_code, e.response INTO v_existing
          FROM usage_event e WHERE e.team_id = p_team_id AND e.key = p_key;
        IF v_existing.fingerprint <> p_fingerprint THEN
            RETURN QUERY SELECT 'conflict'::text, v_existing.id, NULL::numeric, NULL::numeric, NULL::integer, NULL::jsonb;
        ELSE
            RETURN QUERY SELECT 'replay'::text, v_existing.id, NULL::numeric, NULL::numeric,
                                v_existing.status_code::integer, v_existing.response;
        END IF;
        RETURN;
    END IF;

    -- (2) Lock the balance. A monthly period to open: the Python path does it.
    SELECT tp.refresh_checked_at, tp.refresh_due_at INTO v_tp
      FROM products_teamproduct tp
     WHERE tp.team_id = p_team_id AND tp.product_id = v_product_id
       FOR UPDATE;
    IF v_tp.refresh_checked_at IS NULL OR v_tp.refresh_due_at IS NULL
       OR NOT (v_tp.refresh_checked_at <= p_now AND p_now < v_tp.refresh_due_at) THEN
        RAISE EXCEPTION 'usage_consume_fast: a monthly period may be due' USING ERRCODE = '22X01';
    END IF;

    -- (3) The open lots, locked, in consumption order. A lot to expire: the Python path.
    FOR v_lot IN
        SELECT l.id, l.grant_id, l.remaining, l.quantity, l.expires_at
          FROM products_lot l
         WHERE l.team_id = p_team_id AND l.product_id = v_product_id
           AND l.closed_at IS NULL AND l.period_start <= p_now
         ORDER BY l.priority, l.expires_at, l.remaining, l.created_at, l.id
           FOR UPDATE
    LOOP
        IF v_lot.expires_at <= p_now THEN
            RAISE EXCEPTION 'usage_consume_fast: lot % has expired', v_lot.id USING ERRCODE = '22X01';
        END IF;
        v_ids := v_ids || v_lot.id;
        v_grants := v_grants || v_lot.grant_id;
        v_remaining := v_remaining || v_lot.remaining;
        v_available := v_available + v_lot.remaining;
        v_total := v_total + v_lot.quantity;
    END LOOP;
    IF v_available < p_quantity THEN
        RAISE EXCEPTION '%', v_available USING ERRCODE = '22X02';
    END IF;

    -- (4) Draw in order, one ledger row per lot touched. recorded_at is the app's clock
    -- plus the time this statement has waited (on the key, the lock): like the Python
    -- path, it is stamped when the row is written, so ids keep growing with it.
    v_recorded_at := p_wall + (clock_timestamp() - statement_timestamp());
    IF p_user <> '' THEN
        SELECT u.id INTO v_member_id
          FROM auth_user u JOIN teams_membership m ON m.user_id = u.id AND m.team_id = p_team_id
         WHERE lower(u.email) = p_user_lower OR u.username = p_user
         ORDER BY u.id LIMIT 1;
    END IF;
    FOR i IN 1 .. coalesce(array_length(v_ids, 1), 0) LOOP
        EXIT WHEN v_left = 0;
        v_take := least(v_remaining[i], v_left);
        CONTINUE WHEN v_take <= 0;
        UPDATE products_lot SET remaining = remaining - v_take WHERE id = v_ids[i] AND remaining >= v_take;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'lot % could not move by %: concurrent change without lock', v_ids[i], -v_take;
        END IF;
        INSERT INTO usage_ledgerentry (team_id, product_id, lot_id, grant_id, kind, delta, amount, occurred_at,
                                       recorded_at, actor, actor_user_id, actor_api_key_id, "user", member_id,
                                       service, job_id, event_id, checkout_id, reverses_id, note)
        VALUES (p_team_id, v_product_id, v_ids[i], v_grants[i], 'consume', -v_take, v_take, p_occurred_at,
                v_recorded_at, p_actor, p_actor_user_id, p_api_key_id, p_user, v_member_id,
                p_service, p_job_id, v_event_id, NULL, NULL, '');
        v_left := v_left - v_take;
    END LOOP;

    -- (5) The day's rollups, kept in the same transaction.
    INSERT INTO usage_dailyrollup (team_id, product_id, day, consumed, refunded, checked_out, returned, raw_usage,
                                   granted, expired, peak_checked_out, closing_checked_out)
    VALUES (p_team_id, v_product_id, p_day, p_quantity, 0, 0, 0, 0, 0, 0, 0, 0)
    ON CONFLICT (team_id, product_id, day)
    DO UPDATE SET consumed = usage_dailyrollup.consumed + excluded.consumed;
    INSERT INTO usage_dailybreakdown (team_id, product_id, day, service, "user", consumed, refunded, checked_out,
                                      returned, raw_usage)
    VALUES (p_team_id, v_product_id, p_day, p_service, p_user, p_quantity, 0, 0, 0, 0)
    ON CONFLICT (team_id, product_id, day, service, "user")
    DO UPDATE SET consumed = usage_dailybreakdown.consumed + excluded.consumed;

    -- (6) The response, stored for replays.
    v_response := jsonb_build_object(
        'id', v_event_id, 'product', p_product_code, 'available', v_available - p_quantity, 'total', v_total,
        'kind', 'consume', 'quantity', p_quantity, 'charged', p_quantity);
    UPDATE usage_event SET status_code = 201, response = v_response WHERE id = v_event_id;
    RETURN QUERY SELECT 'ok'::text, v_event_id, v_available - p_quantity, v_total, 201, v_response;
END;
$fn$;
"""
PG_DOWN = "DROP FUNCTION IF EXISTS usage_consume_fast(bigint, text, bigint, text, text, jsonb, bigint, bigint, text, text, text, text, text, timestamptz, date, timestamptz, timestamptz);"


class Migration(migrations.Migration):
    dependencies = [("usage", "0005_rollup_team_day_index")]
    operations = [on_postgresql(PG_UP, PG_DOWN)]
