-- 0001: users, tokens, plans, models, subscriptions, usage and the billing ledger (docs/billing.md).

CREATE TABLE plans (
    name                 text PRIMARY KEY,
    server_kokoro_chars  bigint,          -- allowance per period; NULL = unlimited
    premium_voice_chars  bigint
);

INSERT INTO plans (name, server_kokoro_chars, premium_voice_chars) VALUES
    ('free',      20000,   0),
    ('basic',     1000000, 0),
    ('plus',      NULL,    100000),
    ('unlimited', NULL,    NULL);

CREATE TABLE models (
    name              text PRIMARY KEY,
    usage_type        text NOT NULL CHECK (usage_type IN ('server_kokoro', 'premium_voice')),
    usage_multiplier  numeric(6, 3) NOT NULL CHECK (usage_multiplier >= 0),
    default_voice     text NOT NULL
);

CREATE TABLE voices (
    model  text NOT NULL REFERENCES models (name),
    name   text NOT NULL,
    PRIMARY KEY (model, name)
);

INSERT INTO models (name, usage_type, usage_multiplier, default_voice) VALUES
    ('kokoro',  'server_kokoro', 1.0, 'af_heart'),
    ('premium', 'premium_voice', 2.0, 'ava');

INSERT INTO voices (model, name) VALUES
    ('kokoro', 'af_heart'), ('kokoro', 'af_bella'), ('kokoro', 'af_nicole'),
    ('kokoro', 'am_adam'), ('kokoro', 'am_michael'), ('kokoro', 'bf_emma'), ('kokoro', 'bm_george'),
    ('premium', 'ava'), ('premium', 'andrew'), ('premium', 'emma'), ('premium', 'brian');

CREATE TABLE users (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 128),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Only a SHA-256 of each token is stored; the token itself is shown once, at creation.
CREATE TABLE api_tokens (
    token_hash  bytea PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_tokens_user ON api_tokens (user_id);

CREATE TABLE subscriptions (
    user_id                bigint PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    plan                   text NOT NULL REFERENCES plans (name),
    rollover_voice_chars   bigint NOT NULL DEFAULT 0,   -- negative: rollover debt
    purchased_voice_chars  bigint NOT NULL DEFAULT 0 CHECK (purchased_voice_chars >= 0),
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE usage_periods (
    user_id                   bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    period_start              date NOT NULL,
    server_kokoro_characters  bigint NOT NULL DEFAULT 0,
    premium_voice_characters  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, period_start)
);

CREATE TABLE usage_log (
    id          bigserial PRIMARY KEY,
    event_id    text NOT NULL UNIQUE,
    user_id     bigint NOT NULL REFERENCES users (id),
    usage_type  text NOT NULL,
    amount      bigint NOT NULL CHECK (amount >= 0),
    details     jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_log_user_created ON usage_log (user_id, created_at);

CREATE TABLE block_variants (
    hash         text PRIMARY KEY,
    model        text NOT NULL,
    voice        text NOT NULL,
    text_length  integer NOT NULL,
    duration_ms  integer,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE user_voice_stats (
    user_id            bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    model              text NOT NULL,
    voice              text NOT NULL,
    month              date NOT NULL,
    total_characters   bigint NOT NULL DEFAULT 0,
    total_duration_ms  bigint NOT NULL DEFAULT 0,
    synth_count        bigint NOT NULL DEFAULT 0,
    UNIQUE (user_id, model, voice, month)
);

-- Purchases of premium-voice characters (`tts-daemon credit`), for the audit trail.
CREATE TABLE credits (
    id           bigserial PRIMARY KEY,
    user_id      bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    voice_chars  bigint NOT NULL CHECK (voice_chars > 0),
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- The current billing period: the calendar month, UTC.
CREATE FUNCTION tts_period_start(at timestamptz DEFAULT now()) RETURNS date
LANGUAGE sql STABLE AS $$ SELECT date_trunc('month', at AT TIME ZONE 'UTC')::date $$;

-- record_usage (docs/billing.md), the one implementation of the billing rules. Call it inside a
-- transaction. Returns the breakdown recorded in usage_log.details, or NULL when event_id was
-- billed before (a duplicate: nothing else changes).
CREATE FUNCTION tts_record_usage(
    p_user bigint, p_type text, p_amount bigint, p_event_id text, p_details jsonb DEFAULT '{}'
) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_log_id    bigint;
    v_period    date := tts_period_start();
    v_sub       subscriptions%ROWTYPE;
    v_allow     bigint;
    v_used      bigint;
    v_plan      bigint := 0;
    v_rollover  bigint := 0;
    v_purchased bigint := 0;
    v_debt      bigint := 0;
    v_rest      bigint;
    v_details   jsonb;
BEGIN
    -- 1. the log row first: a duplicate event stops here.
    INSERT INTO usage_log (event_id, user_id, usage_type, amount, details)
    VALUES (p_event_id, p_user, p_type, p_amount, COALESCE(p_details, '{}'))
    ON CONFLICT (event_id) DO NOTHING
    RETURNING id INTO v_log_id;
    IF v_log_id IS NULL THEN
        RETURN NULL;
    END IF;

    -- 2. the subscription row, locked against concurrent payment writers.
    SELECT * INTO v_sub FROM subscriptions WHERE user_id = p_user FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'user % has no subscription', p_user USING ERRCODE = 'no_data_found';
    END IF;

    INSERT INTO usage_periods (user_id, period_start) VALUES (p_user, v_period)
    ON CONFLICT DO NOTHING;

    -- 3. the counters.
    IF p_type = 'server_kokoro' THEN
        UPDATE usage_periods
           SET server_kokoro_characters = server_kokoro_characters + p_amount
         WHERE user_id = p_user AND period_start = v_period;
        v_details := COALESCE(p_details, '{}')
            || jsonb_build_object('period_start', v_period, 'from_plan', p_amount);
    ELSIF p_type = 'premium_voice' THEN
        SELECT premium_voice_chars INTO v_allow FROM plans WHERE name = v_sub.plan;
        UPDATE usage_periods
           SET premium_voice_characters = premium_voice_characters + p_amount
         WHERE user_id = p_user AND period_start = v_period
        RETURNING premium_voice_characters - p_amount INTO v_used;
        -- the waterfall: plan allowance → rollover (while positive) → purchased → rollover debt
        IF v_allow IS NULL THEN
            v_plan := p_amount;
        ELSE
            v_plan := LEAST(p_amount, GREATEST(v_allow - v_used, 0));
        END IF;
        v_rest := p_amount - v_plan;
        v_rollover := LEAST(v_rest, GREATEST(v_sub.rollover_voice_chars, 0));
        v_rest := v_rest - v_rollover;
        v_purchased := LEAST(v_rest, v_sub.purchased_voice_chars);
        v_rest := v_rest - v_purchased;
        v_debt := v_rest;
        IF v_rollover + v_purchased + v_debt > 0 THEN
            UPDATE subscriptions
               SET rollover_voice_chars = rollover_voice_chars - v_rollover - v_debt,
                   purchased_voice_chars = purchased_voice_chars - v_purchased,
                   updated_at = now()
             WHERE user_id = p_user;
        END IF;
        v_details := COALESCE(p_details, '{}') || jsonb_build_object(
            'period_start', v_period, 'from_plan', v_plan, 'from_rollover', v_rollover,
            'from_purchased', v_purchased, 'rollover_debt', v_debt);
    ELSE
        RAISE EXCEPTION 'unknown usage type %', p_type USING ERRCODE = 'invalid_parameter_value';
    END IF;

    UPDATE usage_log SET details = v_details WHERE id = v_log_id;
    RETURN v_details;
END
$$;
