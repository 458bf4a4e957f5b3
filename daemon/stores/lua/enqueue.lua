-- The gateway's synthesize: rate limit, then per block: cached, join an in-flight job, or create
-- one if the user's budget allows. Atomic, so two requests for one variant always share one job.
-- KEYS: 1 rate counter, 2 tts:jobs, 3 tts:queue:{model}, 4 tts:processing:{model}
-- ARGV: 1 user_id, 2 document_id, 3 now, 4 rate limit, 5 budget (-1: unlimited), 6 block count,
--       then per block: block_idx, variant_hash, job_id, cost, job_json
-- Returns {"rate_limited", used} or {"ok", status...} with status one of
--   cached | queued | processing | limit
local user, doc, now = ARGV[1], ARGV[2], ARGV[3]
local limit, budget, n = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used + n > limit then
  return {'rate_limited', used}
end
redis.call('INCRBY', KEYS[1], n)
redis.call('EXPIRE', KEYS[1], 120)
local out = {'ok'}
for i = 0, n - 1 do
  local base = 7 + i * 5
  local idx, hash, job_id = ARGV[base], ARGV[base + 1], ARGV[base + 2]
  local cost, job_json = tonumber(ARGV[base + 3]), ARGV[base + 4]
  local status
  if redis.call('EXISTS', 'tts:audio:' .. hash) == 1 then
    status = 'cached'
  else
    local waiter = user .. '|' .. idx .. '|' .. doc
    local inflight_key = 'tts:inflight:' .. hash
    local existing = redis.call('GET', inflight_key)
    if existing then
      redis.call('SADD', 'tts:waiters:' .. hash, waiter)
      if redis.call('ZSCORE', KEYS[4], existing) then status = 'processing' else status = 'queued' end
    elseif budget >= 0 and cost > budget then
      status = 'limit'
    else
      if budget >= 0 then budget = budget - cost end
      redis.call('SET', inflight_key, job_id)
      redis.call('HSET', KEYS[2], job_id, job_json)
      redis.call('ZADD', KEYS[3], now, job_id)
      redis.call('SADD', 'tts:waiters:' .. hash, waiter)
      status = 'queued'
    end
  end
  out[#out + 1] = status
end
return out
