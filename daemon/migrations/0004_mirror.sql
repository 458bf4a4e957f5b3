-- 0004: the ledger version of the entitlements mirror in Redis (docs/billing.md, "Holds and the entitlements mirror").
-- Postgres stays the ledger; Redis keeps a rebuildable copy of each user's entitlements, which
-- the request path reads instead of Postgres. Every writer of a user's ledger (billing, credit)
-- bumps ledger_version under the subscription row lock, so a copy written to Redis carries the
-- version it was read at and an older copy never overwrites a newer one.

ALTER TABLE subscriptions ADD COLUMN ledger_version bigint NOT NULL DEFAULT 0;
-- (tts_entitlements and tts_bill_batch_mirror: daemon/billing/ledger.sql)
