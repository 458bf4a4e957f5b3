-- The gateway's synthesize, atomic: the user's rate limit, then per block: answer from the cache,
-- join an in-flight job for the same variant (from any user, any daemon), or create a job if a
-- hold for its characters fits the user's entitlements (mirror) less what they already hold.
-- Atomic, so two requests for one variant always share one job, and concurrent requests of one
-- user (any connection, any daemon) never hold more than the allowance together (docs/billing.md).
-- KEYS: 1 the user's rate bucket (tts:rate:{user}), 2 tts:jobs, 3 tts:queue:{model},
--       4 tts:processing:{model}, 5 tts:fair:{model}, 6 tts:fair:users:{model},
--       7 tts:fair:state:{model}, 8 the user's mirror (tts:ent:{user}), 9 their holds
--       (tts:holds:{user}), then 3 per block: tts:audio:{hash}, tts:inflight:{hash},
--       tts:waiters:{hash}
-- ARGV: 1 user_id, 2 conn_id, 3 document_id, 4 now (queue score), 5 rate limit (blocks a minute),
--       6 usage type, 7 block count,
--       then per block: block_idx, variant_hash, job_id, cost, job_json,
--       then the user's scheduling weight
-- Fair scheduling (common.lua): each new job joins its user's part of the schedule, ordered by
-- document (the most recently asked-for first) and then from the document's reading position on.
-- Returns {"rate_limited", retry_after_ms} (-1: the request alone exceeds the limit),
--         {"no_mirror"} (the user's entitlements are not in Redis: nothing was done), or
--         {"ok", status...} with status one of cached | queued | processing | limit
local user, conn, doc, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local limit, usage_type, n = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])

-- Token bucket: holds at most `limit` blocks, refills at `limit` a minute (Redis's clock, so every
-- daemon sharing this Redis agrees). A request takes all its blocks or none.
if n > limit then
  return {'rate_limited', '-1'}
end
local t = tts_now()
local budget = tts_budget(KEYS[8], usage_type, t)
if budget == nil then
  return {'no_mirror'}
end
if budget >= 0 then
  budget = budget - (tonumber(redis.call('HGET', KEYS[9], 'sum:' .. usage_type)) or 0)
end
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(bucket[1]) or limit
local last = tonumber(bucket[2]) or t
tokens = math.min(limit, tokens + math.max(0, t - last) * limit / 60)
if tokens < n then
  return {'rate_limited', tostring(math.ceil((n - tokens) * 60000 / limit))}
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - n), 'ts', tostring(t))
redis.call('EXPIRE', KEYS[1], 120)

local weight = tonumber(ARGV[8 + n * 5]) or 1
-- The document's reading position: where its first synthesize started (later requests asking
-- ahead keep it; cursor_moved moves it, evict.lua). A document asked for again while another of
-- the user's documents was asked for since moves ahead of it (tts_fair_cursor).
local fair_r, cursor
local doc_state = n > 0 and redis.call('HGET', KEYS[7], 'd:' .. user .. '|' .. doc)
if doc_state then
  local r, c = string.match(doc_state, '^(%x+)|(%d+)$')
  cursor = tonumber(c)
  if r and r == redis.call('HGET', KEYS[7], 'l:' .. user) then
    fair_r = r
  else
    fair_r = tts_fair_cursor(KEYS[5], KEYS[7], user, doc, cursor or 0)
  end
else
  for i = 0, n - 1 do
    local idx = tonumber(ARGV[8 + i * 5])
    if cursor == nil or idx < cursor then cursor = idx end
  end
end

local out = {'ok'}
for i = 0, n - 1 do
  local base = 8 + i * 5
  local idx, job_id = ARGV[base], ARGV[base + 2]
  local cost, job_json = tonumber(ARGV[base + 3]), ARGV[base + 4]
  local audio_key, inflight_key, waiters_key = KEYS[10 + i * 3], KEYS[11 + i * 3], KEYS[12 + i * 3]
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
      tts_hold_place(KEYS[9], job_id, usage_type, cost, t)
      redis.call('SET', inflight_key, job_id)
      redis.call('HSET', KEYS[2], job_id, job_json)
      -- The queue keeps enqueue times (depth, oldest age); the fair index decides the order.
      redis.call('ZADD', KEYS[3], now + i * 0.00001, job_id)
      if not fair_r then fair_r = tts_fair_cursor(KEYS[5], KEYS[7], user, doc, cursor) end
      redis.call('ZADD', KEYS[5], 0, tts_fair_member(user, fair_r, tts_fair_pos(tonumber(idx), cursor), job_id))
      redis.call('HSET', KEYS[7], 'w:' .. user, weight)
      tts_fair_activate(KEYS[6], KEYS[7], user)
      redis.call('SADD', waiters_key, waiter)
      status = 'queued'
    end
  end
  out[#out + 1] = status
end
return out
