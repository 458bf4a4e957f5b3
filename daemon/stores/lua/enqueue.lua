-- The gateway's synthesize, atomic: the user's rate limit, then per block: answer from the cache,
-- join an in-flight job for the same variant (from any user, any daemon), or create a job if a
-- hold for its characters fits the user's entitlements (mirror) less what they already hold.
-- Atomic, so two requests for one variant always share one job, and concurrent requests of one
-- user (any connection, any daemon) never hold more than the allowance together.
-- KEYS: 1 the user's rate bucket (tts:rate:{user}), 2 tts:jobs, 3 tts:queue:{model},
--       4 tts:processing:{model}, 5 the user's mirror (tts:ent:{user}), 6 their holds
--       (tts:holds:{user}), then 3 per block: tts:audio:{hash}, tts:inflight:{hash},
--       tts:waiters:{hash}
-- ARGV: 1 user_id, 2 conn_id, 3 document_id, 4 now (queue score), 5 rate limit (blocks a minute),
--       6 usage type, 7 block count, then per block: block_idx, variant_hash, job_id, cost,
--       job_json
-- Returns {"rate_limited", retry_after_ms} (-1: the request alone exceeds the limit),
--         {"no_mirror"} (the user's entitlements are not in Redis: nothing was done), or
--         {"ok", status...} with status one of cached | queued | processing | limit
local user, conn, doc, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local limit, usage_type, n = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])

if n > limit then
  return {'rate_limited', '-1'}
end
local t = tts_now()
local budget = tts_budget(KEYS[5], usage_type, t)
if budget == nil then
  return {'no_mirror'}
end
if budget >= 0 then
  budget = budget - (tonumber(redis.call('HGET', KEYS[6], 'sum:' .. usage_type)) or 0)
end

-- Token bucket: holds at most `limit` blocks, refills at `limit` a minute (Redis's clock, so every
-- daemon sharing this Redis agrees). A request takes all its blocks or none.
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(bucket[1]) or limit
local last = tonumber(bucket[2]) or t
tokens = math.min(limit, tokens + math.max(0, t - last) * limit / 60)
if tokens < n then
  return {'rate_limited', tostring(math.ceil((n - tokens) * 60000 / limit))}
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - n), 'ts', tostring(t))
redis.call('EXPIRE', KEYS[1], 120)

local out = {'ok'}
for i = 0, n - 1 do
  local base = 8 + i * 5
  local idx, job_id = ARGV[base], ARGV[base + 2]
  local cost, job_json = tonumber(ARGV[base + 3]), ARGV[base + 4]
  local audio_key, inflight_key, waiters_key = KEYS[7 + i * 3], KEYS[8 + i * 3], KEYS[9 + i * 3]
  local status
  if redis.call('EXISTS', audio_key) == 1 then
    status = 'cached'
  else
    local waiter = tts_waiter(user, idx, conn, doc)
    local existing = redis.call('GET', inflight_key)
    -- An in-flight key whose job is gone (dead-lettered, or lost with Redis data) would leave its
    -- waiters waiting forever: start a new job instead. Its result is the one finalized (the old
    -- job's error result, if any, no longer matches the in-flight key: a duplicate).
    if existing and redis.call('HEXISTS', KEYS[2], existing) == 0 then
      existing = nil
    end
    if existing then
      -- A join costs nothing: no hold (the job's creator holds it).
      redis.call('SADD', waiters_key, waiter)
      if redis.call('ZSCORE', KEYS[4], existing) then status = 'processing' else status = 'queued' end
    elseif budget >= 0 and cost > budget then
      status = 'limit'
    else
      if budget >= 0 then budget = budget - cost end
      tts_hold_place(KEYS[6], job_id, usage_type, cost, t)
      redis.call('SET', inflight_key, job_id)
      redis.call('HSET', KEYS[2], job_id, job_json)
      -- Blocks of one request get increasing scores, so workers take them in reading order.
      redis.call('ZADD', KEYS[3], now + i * 0.00001, job_id)
      redis.call('SADD', waiters_key, waiter)
      status = 'queued'
    end
  end
  out[#out + 1] = status
end
return out
