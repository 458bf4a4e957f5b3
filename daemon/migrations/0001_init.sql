-- 0001: users, tokens, plans, models, subscriptions, usage and the billing ledger's tables
-- (docs/billing.md). Schema only: the functions are in daemon/billing/ledger.sql.

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
