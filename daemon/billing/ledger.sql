-- The billing rules (docs/billing.md): every function the daemon's SQL defines, in one place.
--
-- Re-applied by every `tts-daemon migrate` (and at every daemon start), after the versioned
-- migrations in daemon/migrations/, which hold the schema only: this file is the current and only
-- definition of each function, so every statement here is CREATE OR REPLACE and the file can run
-- any number of times. Changing a function's arguments or result type needs a versioned migration
-- that drops the old one first (CREATE OR REPLACE cannot change them); a function removed from
-- here stays in existing databases until a migration drops it. Order matters: a LANGUAGE sql
-- body is checked when it is created, so what it calls comes before it.
--
-- The executable specification beside this file is the step-by-step Python model in
-- tests/test_billing.py: one event at a time, plan → rollover → purchased → debt; the tests bill
-- random users, balances, duplicates and groupings here and compare every breakdown and balance.

-- The current billing period: the calendar month, UTC.
CREATE OR REPLACE FUNCTION tts_period_start(at timestamptz DEFAULT now()) RETURNS date
LANGUAGE sql STABLE AS $$ SELECT date_trunc('month', at AT TIME ZONE 'UTC')::date $$;

-- The part of [lo, hi) that the half-open range [start, start + len) covers.
CREATE OR REPLACE FUNCTION tts_overlap(p_start bigint, p_len bigint, p_lo bigint, p_hi bigint)
RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT GREATEST(0, LEAST(p_start + p_len, p_hi) - GREATEST(p_start, p_lo))
$$;

-- amount = round(text_length × usage_multiplier), halves up: contracts.usage_amount, in SQL. Both
-- are IEEE double arithmetic (multiply, add 0.5, floor), so they agree on every input
-- (tests/test_billing.py, test_sql_amount_rounds_like_usage_amount, checks the edges).
CREATE OR REPLACE FUNCTION tts_usage_amount(p_text_length bigint, p_multiplier double precision)
RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT floor(p_text_length * p_multiplier + 0.5)::bigint
$$;

-- Bill events, in arrival order (array order): the one implementation of the rules, which every
-- writer calls. Call it inside a transaction (a single statement is one). For each input
-- position, returns the breakdown recorded in usage_log.details, or NULL when that event_id was
-- billed before — or earlier in the same call: a duplicate changes nothing. A usage type that no
-- model in the models table bills is an error (invalid_parameter_value), as are arrays of
-- different lengths.
--
-- 1. the subscription rows of the call's users are locked FOR UPDATE in user-id order (the order
--    every writer uses, so billing cannot deadlock with itself or with payment writers), then the
--    duplicates looked up once, under the locks: a concurrent biller of the same event held the
--    same lock, so its rows are committed and visible now. A user without a subscription is an
--    error (no_data_found) only when it has new events;
-- 2. the usage_log rows, with the breakdown in details, and the balances, in one statement:
--    server_kokoro is added to the period counter; premium_voice is added to the period counter
--    and taken from the plan's allowance left this period, then rollover (while positive), then
--    purchased (down to 0), the rest as rollover debt (negative rollover). The breakdown is
--    computed once, inserted, and returned from the same rows. The insert keeps
--    ON CONFLICT (event_id) DO NOTHING as a net: a row it did not insert means a writer that
--    bypassed the lock, and the transaction fails (serialization_failure) to be retried.
--
-- Step 2 is the one-event-at-a-time waterfall computed for many events at once: the premium
-- amounts of a user's new events, laid end to end in arrival order, fill the buckets plan →
-- rollover → purchased → debt in that order; each event takes the part of each bucket that its
-- stretch of the running total covers (tts_overlap). This is exactly what applying the events one
-- by one gives (tests/test_billing.py checks it against the step-by-step model).
CREATE OR REPLACE FUNCTION tts_bill_events(
    p_users bigint[], p_types text[], p_amounts bigint[], p_event_ids text[], p_details text[]
) RETURNS TABLE (event_ord bigint, event_details jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    v_period   date := tts_period_start();
    v_n        integer := COALESCE(cardinality(p_event_ids), 0);
    v_bad      text;
    v_new      bigint[];
    v_locked   bigint[];
    v_missing  bigint;
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
    -- the usage types there are: the ones the models table bills.
    SELECT t INTO v_bad FROM unnest(p_types) AS t
     WHERE NOT EXISTS (SELECT 1 FROM models m WHERE m.usage_type = t) LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'unknown usage type %', v_bad USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_n = 0 THEN
        RETURN;
    END IF;

    -- 1. the subscription rows, locked in user-id order; then the duplicates, once.
    SELECT array_agg(user_id) INTO v_locked FROM (
        SELECT user_id FROM subscriptions WHERE user_id = ANY (p_users)
         ORDER BY user_id FOR UPDATE
    ) AS l;
    SELECT array_agg(x.o ORDER BY x.o) INTO v_new
      FROM (SELECT DISTINCT ON (e) e, o FROM unnest(p_event_ids) WITH ORDINALITY AS x(e, o)
             ORDER BY e, o) AS x
     WHERE NOT EXISTS (SELECT 1 FROM usage_log l WHERE l.event_id = x.e);

    IF v_new IS NOT NULL THEN
        SELECT min(x.u) INTO v_missing
          FROM unnest(p_users) WITH ORDINALITY AS x(u, o) JOIN unnest(v_new) AS n(o) USING (o)
         WHERE x.u <> ALL (COALESCE(v_locked, '{}'));
        IF v_missing IS NOT NULL THEN
            RAISE EXCEPTION 'user % has no subscription', v_missing
                USING ERRCODE = 'no_data_found';
        END IF;

        -- 2. the log rows and the balances. Every part of this statement reads the balances as
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
             WHERE s.user_id = ANY (v_locked)
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
            SELECT o, u, t, a, e, from_roll, from_bought,
                   a - from_plan - from_roll - from_bought AS debt,
                   COALESCE(d::jsonb, '{}') || CASE
                       WHEN t = 'server_kokoro' THEN
                           jsonb_build_object('period_start', v_period, 'from_plan', a)
                       ELSE jsonb_build_object(
                           'period_start', v_period, 'from_plan', from_plan,
                           'from_rollover', from_roll, 'from_purchased', from_bought,
                           'rollover_debt', a - from_plan - from_roll - from_bought)
                   END AS details
              FROM split
        ), ins AS (
            INSERT INTO usage_log (event_id, user_id, usage_type, amount, details)
            SELECT e, u, t, a, details FROM parts ORDER BY o
            ON CONFLICT (event_id) DO NOTHING
            RETURNING 1
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
        SELECT (SELECT count(*) FROM ins), array_agg(o ORDER BY o), array_agg(details ORDER BY o)
          INTO v_count, v_out_ord, v_out_det
          FROM parts;
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

-- record_usage (docs/billing.md) for one event: the same rules, the same code. Returns the
-- breakdown recorded in usage_log.details, or NULL when event_id was billed before.
CREATE OR REPLACE FUNCTION tts_record_usage(
    p_user bigint, p_type text, p_amount bigint, p_event_id text, p_details jsonb DEFAULT '{}'
) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT event_details
      FROM tts_bill_events(ARRAY[p_user], ARRAY[p_type], ARRAY[p_amount], ARRAY[p_event_id],
                           ARRAY[COALESCE(p_details, '{}')::text])
$$;

-- The billing consumer's transaction, as one call: p_events is the JSON array of the events
-- exactly as the billing stream holds them (in arrival order), parsed here — the consumer sends the
-- raw text and builds nothing per event. One statement, so one transaction unless the caller
-- holds one:
--   * every event through tts_bill_events (the rules above); amount = tts_usage_amount, the usage
--     type from models; the usage_log details are the event's model, voice, variant_hash,
--     text_length, usage_multiplier, document_id and block_idx (the breakdown is added to them);
--   * user_voice_stats for the events that were not duplicates, summed per user, model, voice and
--     month (UTC, of finalized_at);
--   * block_variants: each variant's metadata (the latest event's duration), upserted in hash
--     order — after the subscription locks, like every writer, so two billing transactions
--     cannot deadlock on variants.
-- Returns the positions (1-based) of the duplicates and the characters billed now.
-- The caller has validated the events (contracts.billing_event_fields); a field missing or of the
-- wrong type here is an error (data_exception class), not a guess.
CREATE OR REPLACE FUNCTION tts_bill_batch(p_events text)
RETURNS TABLE (dup_ords bigint[], billed_chars bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_users    bigint[];
    v_types    text[];
    v_amounts  bigint[];
    v_ids      text[];
    v_details  text[];
    v_models   text[];
    v_voices   text[];
    v_hashes   text[];
    v_lengths  bigint[];
    v_durs     bigint[];
    v_months   date[];
    v_dups     bigint[];
BEGIN
    SELECT array_agg(x.user_id ORDER BY e.o),
           array_agg((SELECT m.usage_type FROM models m WHERE m.name = x.model) ORDER BY e.o),
           array_agg(tts_usage_amount(x.text_length, x.usage_multiplier) ORDER BY e.o),
           array_agg(x.event_id ORDER BY e.o),
           array_agg(jsonb_build_object(
               'model', e.j->'model', 'voice', e.j->'voice', 'variant_hash', e.j->'variant_hash',
               'text_length', e.j->'text_length', 'usage_multiplier', e.j->'usage_multiplier',
               'document_id', e.j->'document_id', 'block_idx', e.j->'block_idx')::text
               ORDER BY e.o),
           array_agg(x.model ORDER BY e.o), array_agg(x.voice ORDER BY e.o),
           array_agg(x.variant_hash ORDER BY e.o), array_agg(x.text_length ORDER BY e.o),
           array_agg(trunc(x.duration_ms)::bigint ORDER BY e.o),
           array_agg((date_trunc('month', to_timestamp(x.finalized_at) AT TIME ZONE 'UTC'))::date
                     ORDER BY e.o)
      INTO v_users, v_types, v_amounts, v_ids, v_details,
           v_models, v_voices, v_hashes, v_lengths, v_durs, v_months
      FROM jsonb_array_elements(p_events::jsonb) WITH ORDINALITY AS e(j, o)
     CROSS JOIN LATERAL jsonb_to_record(e.j)
           AS x(event_id text, user_id bigint, model text, voice text, variant_hash text,
                text_length bigint, usage_multiplier double precision,
                duration_ms double precision, finalized_at double precision);

    SELECT array_agg(r.event_ord ORDER BY r.event_ord) FILTER (WHERE r.event_details IS NULL)
      INTO v_dups
      FROM tts_bill_events(v_users, v_types, v_amounts, v_ids, v_details) AS r;

    -- (stats and variants are written after tts_bill_events has locked the subscription rows)
    WITH ev AS (
        SELECT *
          FROM unnest(v_users, v_models, v_voices, v_hashes, v_lengths, v_durs, v_months)
               WITH ORDINALITY AS x(u, m, v, h, c, d, mo, o)
    ), stats AS (
        INSERT INTO user_voice_stats AS s
               (user_id, model, voice, month, total_characters, total_duration_ms, synth_count)
        SELECT u, m, v, mo, sum(c), sum(d), count(*)
          FROM ev
         WHERE o <> ALL (COALESCE(v_dups, '{}'))
         GROUP BY u, m, v, mo
        ON CONFLICT (user_id, model, voice, month) DO UPDATE
           SET total_characters = s.total_characters + EXCLUDED.total_characters,
               total_duration_ms = s.total_duration_ms + EXCLUDED.total_duration_ms,
               synth_count = s.synth_count + EXCLUDED.synth_count
    )
    INSERT INTO block_variants AS b (hash, model, voice, text_length, duration_ms)
    SELECT h, m, v, c, d FROM (
        SELECT DISTINCT ON (h) h, m, v, c, d FROM ev ORDER BY h, o DESC
    ) AS latest
     ORDER BY h
    ON CONFLICT (hash) DO UPDATE
       SET duration_ms = EXCLUDED.duration_ms, updated_at = now()
     WHERE b.duration_ms IS DISTINCT FROM EXCLUDED.duration_ms;

    RETURN QUERY
    SELECT v_dups,
           COALESCE(sum(c) FILTER (WHERE o <> ALL (COALESCE(v_dups, '{}'))), 0)::bigint
      FROM unnest(v_lengths) WITH ORDINALITY AS x(c, o);
END
$$;

-- The entitlements mirror in Redis (docs/billing.md, "Holds and the entitlements mirror").
-- The mirror rows: allowances (-1 = unlimited), this period's usage, rollover, purchased, the end
-- of the period (epoch seconds: usage counts only until then) and the version. NULL users: all.
CREATE OR REPLACE FUNCTION tts_entitlements(p_users bigint[] DEFAULT NULL)
RETURNS TABLE (user_id bigint, kokoro_allow bigint, premium_allow bigint, kokoro_used bigint,
               premium_used bigint, rollover bigint, purchased bigint, period_end bigint,
               version bigint)
LANGUAGE sql STABLE AS $$
    SELECT s.user_id,
           COALESCE(p.server_kokoro_chars, -1), COALESCE(p.premium_voice_chars, -1),
           COALESCE(u.server_kokoro_characters, 0), COALESCE(u.premium_voice_characters, 0),
           s.rollover_voice_chars, s.purchased_voice_chars,
           extract(epoch FROM ((tts_period_start() + interval '1 month')::timestamp
                               AT TIME ZONE 'UTC'))::bigint,
           s.ledger_version
      FROM subscriptions s
      JOIN plans p ON p.name = s.plan
      LEFT JOIN usage_periods u ON u.user_id = s.user_id AND u.period_start = tts_period_start()
     WHERE p_users IS NULL OR s.user_id = ANY (p_users)
     ORDER BY s.user_id
$$;

-- The billing consumer's transaction (one statement): tts_bill_batch, then each billed user's
-- version bumped (the rows are already locked by it) and their entitlements returned as a JSON
-- array of tts_entitlements rows, for the consumer to write to Redis with the holds it settles.
CREATE OR REPLACE FUNCTION tts_bill_batch_mirror(p_events text)
RETURNS TABLE (dup_ords bigint[], billed_chars bigint, entitlements jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    v_dups   bigint[];
    v_chars  bigint;
    v_users  bigint[];
BEGIN
    SELECT b.dup_ords, b.billed_chars INTO v_dups, v_chars FROM tts_bill_batch(p_events) AS b;
    SELECT array_agg(DISTINCT (e->>'user_id')::bigint) INTO v_users
      FROM jsonb_array_elements(p_events::jsonb) AS e;
    UPDATE subscriptions SET ledger_version = ledger_version + 1 WHERE user_id = ANY (v_users);
    RETURN QUERY
    SELECT v_dups, v_chars,
           COALESCE((SELECT jsonb_agg(to_jsonb(t)) FROM tts_entitlements(v_users) AS t),
                    '[]'::jsonb);
END
$$;
