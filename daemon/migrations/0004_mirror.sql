-- 0004: the entitlements mirror in Redis (docs/billing.md, "Holds and the entitlements mirror").
-- Postgres stays the ledger; Redis keeps a rebuildable copy of each user's entitlements, which
-- the request path reads instead of Postgres. Every writer of a user's ledger (billing, credit)
-- bumps ledger_version under the subscription row lock, so a copy written to Redis carries the
-- version it was read at and an older copy never overwrites a newer one.

ALTER TABLE subscriptions ADD COLUMN ledger_version bigint NOT NULL DEFAULT 0;

-- The mirror rows: allowances (-1 = unlimited), this period's usage, rollover, purchased, the end
-- of the period (epoch seconds: usage counts only until then) and the version. NULL users: all.
CREATE FUNCTION tts_entitlements(p_users bigint[] DEFAULT NULL)
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
CREATE FUNCTION tts_bill_batch_mirror(p_events text)
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
