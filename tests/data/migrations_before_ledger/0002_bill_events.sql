-- 0002: the billing rules, set-based. tts_bill_events bills any number of events (of any users) in
-- a few statements instead of several per event; tts_record_usage becomes a one-event call of it,
-- so every writer — the batched consumer, record_usage, any other — shares ONE implementation of
-- the rules (docs/billing.md). Measured reason: tools/bench_billing.py (docs/billing.md).

-- The part of [lo, hi) that the half-open range [start, start + len) covers.
CREATE FUNCTION tts_overlap(p_start bigint, p_len bigint, p_lo bigint, p_hi bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT GREATEST(0, LEAST(p_start + p_len, p_hi) - GREATEST(p_start, p_lo))
$$;

-- Bill events, in arrival order (array order). Call it inside a transaction (a single statement
-- is one). For each input position, returns the breakdown recorded in usage_log.details, or NULL
-- when that event_id was billed before — or earlier in the same call: a duplicate changes nothing.
--
-- 1. duplicates first: an event_id already in usage_log (or repeated in this call) changes
--    nothing else; a call of nothing but duplicates stops here, without taking any lock;
-- 2. the subscription rows of the users with new events, locked FOR UPDATE in user-id order (the
--    order every writer uses, so billing cannot deadlock with itself or with payment writers),
--    and the duplicates looked up again under the locks: a concurrent biller of the same event
--    held the same lock, so its rows are committed and visible now;
-- 3. the usage_log rows, with the breakdown in details, and the balances, in one statement:
--    server_kokoro is added to the period counter; premium_voice is added to the period counter
--    and taken from the plan's allowance left this period, then rollover (while positive), then
--    purchased (down to 0), the rest as rollover debt (negative rollover). The insert keeps
--    ON CONFLICT (event_id) DO NOTHING as a net: a row it did not insert means a writer that
--    bypassed the lock, and the whole transaction fails (serialization_failure) to be retried.
--
-- Step 3 is the one-event-at-a-time waterfall computed for many events at once: the premium
-- amounts of a user's new events, laid end to end in arrival order, fill the buckets plan →
-- rollover → purchased → debt in that order; each event takes the part of each bucket that its
-- stretch of the running total covers (tts_overlap). This is exactly what applying the events one
-- by one gives (tests/test_billing.py checks it against a step-by-step model).
CREATE FUNCTION tts_bill_events(
    p_users bigint[], p_types text[], p_amounts bigint[], p_event_ids text[], p_details text[]
) RETURNS TABLE (event_ord bigint, event_details jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    v_period   date := tts_period_start();
    v_n        integer := COALESCE(cardinality(p_event_ids), 0);
    v_bad      text;
    v_new      bigint[];
    v_users    bigint[];
    v_locked   bigint[];
    v_out_ord  bigint[];
    v_out_det  jsonb[];
    v_count    bigint;
BEGIN
    IF COALESCE(cardinality(p_users), 0) <> v_n OR COALESCE(cardinality(p_types), 0) <> v_n
       OR COALESCE(cardinality(p_amounts), 0) <> v_n
       OR COALESCE(cardinality(p_details), 0) <> v_n THEN
        RAISE EXCEPTION 'tts_bill_events: arrays of different lengths'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT t INTO v_bad FROM unnest(p_types) AS t
     WHERE t IS DISTINCT FROM 'server_kokoro' AND t IS DISTINCT FROM 'premium_voice' LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'unknown usage type %', v_bad USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- 1. duplicates change nothing.
    SELECT array_agg(x.o ORDER BY x.o) INTO v_new
      FROM (SELECT DISTINCT ON (e) e, o FROM unnest(p_event_ids) WITH ORDINALITY AS x(e, o)
             ORDER BY e, o) AS x
     WHERE NOT EXISTS (SELECT 1 FROM usage_log l WHERE l.event_id = x.e);

    IF v_new IS NOT NULL THEN
        -- 2. the subscription rows, locked in user-id order; then the duplicates again.
        SELECT array_agg(DISTINCT x.u ORDER BY x.u) INTO v_users
          FROM unnest(p_users) WITH ORDINALITY AS x(u, o) JOIN unnest(v_new) AS n(o) USING (o);
        SELECT array_agg(user_id) INTO v_locked FROM (
            SELECT user_id FROM subscriptions WHERE user_id = ANY (v_users)
             ORDER BY user_id FOR UPDATE
        ) AS l;
        IF COALESCE(cardinality(v_locked), 0) <> cardinality(v_users) THEN
            RAISE EXCEPTION 'user % has no subscription',
                (SELECT min(u) FROM unnest(v_users) AS u WHERE u <> ALL (COALESCE(v_locked, '{}')))
                USING ERRCODE = 'no_data_found';
        END IF;
        SELECT array_agg(x.o ORDER BY x.o) INTO v_new
          FROM unnest(p_event_ids) WITH ORDINALITY AS x(e, o) JOIN unnest(v_new) AS n(o) USING (o)
         WHERE NOT EXISTS (SELECT 1 FROM usage_log l WHERE l.event_id = x.e);
    END IF;

    IF v_new IS NOT NULL THEN
        -- 3. the log rows and the balances. Every part of this statement reads the balances as
        -- they were before it (one snapshot, taken after the locks above were granted).
        WITH ev AS (
            SELECT x.o, x.u, x.t, x.a, x.e, x.d
              FROM unnest(p_users, p_types, p_amounts, p_event_ids, p_details)
                   WITH ORDINALITY AS x(u, t, a, e, d, o)
              JOIN unnest(v_new) AS n(o) USING (o)
        ), bal AS (
            SELECT s.user_id AS u,
                   CASE WHEN pl.premium_voice_chars IS NULL THEN NULL
                        ELSE GREATEST(pl.premium_voice_chars
                                      - COALESCE(up.premium_voice_characters, 0), 0)
                   END AS plan_left,
                   GREATEST(s.rollover_voice_chars, 0) AS roll,
                   s.purchased_voice_chars AS bought
              FROM subscriptions s
              JOIN plans pl ON pl.name = s.plan
              LEFT JOIN usage_periods up
                     ON up.user_id = s.user_id AND up.period_start = v_period
             WHERE s.user_id = ANY (v_users)
        ), run AS (
            SELECT ev.*, bal.plan_left, bal.roll, bal.bought,
                   COALESCE(sum(ev.a) FILTER (WHERE ev.t = 'premium_voice')
                            OVER (PARTITION BY ev.u ORDER BY ev.o
                                  ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)::bigint
                       AS before
              FROM ev JOIN bal USING (u)
        ), split AS (
            SELECT o, u, t, a, e, d,
                   CASE WHEN t = 'server_kokoro' OR plan_left IS NULL THEN a
                        ELSE tts_overlap(before, a, 0, plan_left) END AS from_plan,
                   CASE WHEN t = 'server_kokoro' OR plan_left IS NULL THEN 0
                        ELSE tts_overlap(before, a, plan_left, plan_left + roll) END AS from_roll,
                   CASE WHEN t = 'server_kokoro' OR plan_left IS NULL THEN 0
                        ELSE tts_overlap(before, a, plan_left + roll, plan_left + roll + bought)
                   END AS from_bought
              FROM run
        ), parts AS (
            SELECT split.*, a - from_plan - from_roll - from_bought AS debt FROM split
        ), ins AS (
            INSERT INTO usage_log (event_id, user_id, usage_type, amount, details)
            SELECT e, u, t, a, COALESCE(d::jsonb, '{}') || CASE
                       WHEN t = 'server_kokoro' THEN
                           jsonb_build_object('period_start', v_period, 'from_plan', a)
                       ELSE jsonb_build_object(
                           'period_start', v_period, 'from_plan', from_plan,
                           'from_rollover', from_roll, 'from_purchased', from_bought,
                           'rollover_debt', debt)
                   END
              FROM parts ORDER BY o
            ON CONFLICT (event_id) DO NOTHING
            RETURNING event_id, details
        ), upd_periods AS (
            INSERT INTO usage_periods AS up
                   (user_id, period_start, server_kokoro_characters, premium_voice_characters)
            SELECT u, v_period,
                   COALESCE(sum(a) FILTER (WHERE t = 'server_kokoro'), 0),
                   COALESCE(sum(a) FILTER (WHERE t = 'premium_voice'), 0)
              FROM parts GROUP BY u
            ON CONFLICT (user_id, period_start) DO UPDATE
               SET server_kokoro_characters =
                       up.server_kokoro_characters + EXCLUDED.server_kokoro_characters,
                   premium_voice_characters =
                       up.premium_voice_characters + EXCLUDED.premium_voice_characters
        ), upd_subs AS (
            UPDATE subscriptions s
               SET rollover_voice_chars = s.rollover_voice_chars - g.roll - g.debt,
                   purchased_voice_chars = s.purchased_voice_chars - g.bought,
                   updated_at = now()
              FROM (SELECT u, sum(from_roll) AS roll, sum(from_bought) AS bought,
                           sum(debt) AS debt
                      FROM parts GROUP BY u
                    HAVING sum(from_roll + from_bought + debt) > 0) AS g
             WHERE s.user_id = g.u
        )
        SELECT array_agg(p.o), array_agg(ins.details), count(*)
          INTO v_out_ord, v_out_det, v_count
          FROM ins JOIN parts p ON p.e = ins.event_id;
        IF v_count <> cardinality(v_new) THEN
            RAISE EXCEPTION 'an event was billed concurrently without the subscription lock'
                USING ERRCODE = 'serialization_failure';
        END IF;
    END IF;

    RETURN QUERY
    SELECT x.o, r.d
      FROM generate_series(1::bigint, v_n::bigint) AS x(o)
      LEFT JOIN unnest(v_out_ord, v_out_det) AS r(o, d) ON r.o = x.o
     ORDER BY x.o;
END
$$;

-- record_usage for one event: the same rules, the same code.
CREATE OR REPLACE FUNCTION tts_record_usage(
    p_user bigint, p_type text, p_amount bigint, p_event_id text, p_details jsonb DEFAULT '{}'
) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT event_details
      FROM tts_bill_events(ARRAY[p_user], ARRAY[p_type], ARRAY[p_amount], ARRAY[p_event_id],
                           ARRAY[COALESCE(p_details, '{}')::text])
$$;
