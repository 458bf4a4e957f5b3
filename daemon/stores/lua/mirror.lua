-- Write one user's entitlements to the mirror, unless Redis already has a newer copy, and settle
-- the holds of the jobs just billed (by event id = job id, so a redelivered event settles
-- nothing twice). Written by `user add`, `credit`, the rebuild from Postgres and, after each
-- commit, the billing consumer (docs/billing.md, "Holds and the entitlements mirror").
-- KEYS: 1 tts:ent:{user}, 2 tts:holds:{user}
-- ARGV: 1 ledger version ("" to settle only), 2 kokoro_allow, 3 kokoro_used, 4 premium_allow,
--       5 premium_used, 6 rollover, 7 purchased, 8 period_end, then the event ids to settle
-- Returns {written (0|1), holds settled}
local written = 0
if ARGV[1] ~= '' then
  local cur = redis.call('HGET', KEYS[1], 'version')
  if not cur or tonumber(cur) <= tonumber(ARGV[1]) then
    redis.call('HSET', KEYS[1], 'version', ARGV[1], 'kokoro_allow', ARGV[2],
               'kokoro_used', ARGV[3], 'premium_allow', ARGV[4], 'premium_used', ARGV[5],
               'rollover', ARGV[6], 'purchased', ARGV[7], 'period_end', ARGV[8])
    written = 1
  end
end
local settled = 0
for i = 9, #ARGV do
  if tts_hold_release(KEYS[2], ARGV[i]) >= 0 then settled = settled + 1 end
end
return {written, settled}
