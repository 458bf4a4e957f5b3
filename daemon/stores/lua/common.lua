-- Shared by the scripts below (prepended to each at load time).
-- Waiter members are "user|block_idx|conn_id|document_id": one per WebSocket connection waiting
-- for a block (conn_id is alphanumeric; document_id goes last as it may hold '|'). Each waiter gets
-- the frame on its user's channel, with conn and variant_hash for the gateway's routing (the
-- gateway strips them before the frame reaches the client).
local function tts_waiter(user, idx, conn, doc)
  return user .. '|' .. idx .. '|' .. conn .. '|' .. doc
end

-- Tell every waiter of a variant: waiters_key is its tts:waiters:{hash} (in the caller's KEYS);
-- a waiter's frame goes to its user's channel, channel_prefix .. user (Keys.NOTIFY_PREFIX, in the
-- caller's ARGV). The users are known only from the members read here, so the channel names are
-- the one name a script completes itself; channels are not keys (PUBLISH reaches a whole Redis
-- Cluster from any slot).
local function tts_notify(waiters_key, channel_prefix, hash, frame)
  local members = redis.call('SMEMBERS', waiters_key)
  frame['variant_hash'] = hash
  for _, m in ipairs(members) do
    local user, idx, conn, doc = string.match(m, '^(%d+)|(%d+)|(%w+)|(.*)$')
    if user then
      frame['document_id'] = doc
      frame['block_idx'] = tonumber(idx)
      frame['conn'] = conn
      redis.call('PUBLISH', channel_prefix .. user, cjson.encode(frame))
    end
  end
  return #members
end

local function tts_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- Characters, not bytes: count the bytes that do not continue a UTF-8 sequence.
local function tts_utf8_len(s)
  local _, n = string.gsub(s, '[^\128-\191]', '')
  return n
end

-- Holds (docs/billing.md, "Holds and the entitlements mirror"). A user's holds are one hash,
-- passed in KEYS by the caller: job id -> "usage_type|amount|since|state" (state q: the job is
-- queued or running; b: its audio is done and its billing event queued), "sum:<usage_type>" the
-- characters held per usage type, and "n" the number of holds (the hash goes when it is 0).
local function tts_hold_place(holds, job_id, usage_type, amount, now)
  redis.call('HSET', holds, job_id,
             usage_type .. '|' .. amount .. '|' .. string.format('%.3f', now) .. '|q')
  redis.call('HINCRBY', holds, 'sum:' .. usage_type, amount)
  redis.call('HINCRBY', holds, 'n', 1)
end

-- Release one hold: its job was billed (settled), or ended without a bill (error, skipped,
-- evicted, dead-lettered). Returns the characters released, -1 if there was no such hold (a
-- second release of the same job changes nothing). Any script that ends a job for good may call
-- it with the holds key of the job's user (in its KEYS).
local function tts_hold_release(holds, job_id)
  local h = redis.call('HGET', holds, job_id)
  if not h then return -1 end
  redis.call('HDEL', holds, job_id)
  local usage_type, amount = string.match(h, '^([^|]+)|(%d+)|')
  amount = tonumber(amount) or 0
  if usage_type then
    redis.call('HINCRBY', holds, 'sum:' .. usage_type, -amount)
  end
  if redis.call('HINCRBY', holds, 'n', -1) <= 0 then
    redis.call('DEL', holds)
  end
  return amount
end

-- What a user may still hold of usage_type, from the mirror hash ent (KEYS) at time now:
-- -1 unlimited, nil when the mirror is missing. The waterfall of docs/billing.md: kokoro is the
-- plan's allowance left this period; premium the plan's left, plus rollover while positive, plus
-- purchased (never debt). This period's usage counts only until the period ends.
local function tts_budget(ent, usage_type, now)
  local f = redis.call('HMGET', ent, 'kokoro_allow', 'kokoro_used', 'premium_allow',
                       'premium_used', 'rollover', 'purchased', 'period_end')
  if not f[1] then return nil end
  local in_period = now < tonumber(f[7])
  if usage_type == 'server_kokoro' then
    local allow = tonumber(f[1])
    if allow < 0 then return -1 end
    return math.max(allow - (in_period and tonumber(f[2]) or 0), 0)
  end
  local allow = tonumber(f[3])
  if allow < 0 then return -1 end
  return math.max(allow - (in_period and tonumber(f[4]) or 0), 0)
         + math.max(tonumber(f[5]), 0) + tonumber(f[6])
end

-- Fair scheduling (docs/workers.md, "Scheduling"). Per model three keys, always passed in KEYS:
--   KF  sorted set, every score 0, ordered by member "user|R|P|job_id": one user's queued jobs
--       are one contiguous range; R ranks the user's documents (newest reading position first),
--       P orders a document's blocks from its cursor on ("0" + idx at or after it, then "1" + idx);
--   KU  sorted set user → virtual start time (start-time fair queuing, weighted by characters);
--   KS  hash: vt (virtual time of the last pull), e (rank counter), w:USER (weight), f:USER (an
--       idle user's finish time), d:USER|DOC ("R|cursor" while that document has queued jobs),
--       l:USER (the R of the user's most recently asked-for document).
local TTS_FAIR_MAXR = 281474976710655 -- 2^48 - 1: R = MAXR - rank, so the newest sorts first
local TTS_FAIR_FIRST = '000000000000' -- R of a requeued job: ahead of all its user's others

local function tts_fair_pos(idx, cursor)
  if idx >= cursor then return string.format('0%08x', idx) end
  return string.format('1%08x', idx)
end

local function tts_fair_member(user, r, pos, job_id)
  return user .. '|' .. r .. '|' .. pos .. '|' .. job_id
end

-- A user with jobs again starts at the current virtual time (no credit for having been idle),
-- or later if its last job is not yet "paid for".
local function tts_fair_activate(ku, ks, user)
  if redis.call('ZSCORE', ku, user) then return end
  local vt = tonumber(redis.call('HGET', ks, 'vt')) or 0
  local f = tonumber(redis.call('HGET', ks, 'f:' .. user)) or 0
  redis.call('HDEL', ks, 'f:' .. user)
  redis.call('ZADD', ku, math.max(vt, f), user)
end

-- The reading position of (user, doc) moved to `cursor`: the document's queued jobs move ahead
-- of the user's other documents, ordered from the cursor on. Returns the document's new R.
local function tts_fair_cursor(kf, ks, user, doc, cursor)
  local field = 'd:' .. user .. '|' .. doc
  local state = redis.call('HGET', ks, field)
  local r = string.format('%012x', TTS_FAIR_MAXR - redis.call('HINCRBY', ks, 'e', 1))
  if state then
    local old = string.match(state, '^(%x+)|')
    if old then
      local prefix = user .. '|' .. old .. '|'
      for _, m in ipairs(redis.call('ZRANGEBYLEX', kf, '[' .. prefix, '(' .. user .. '|' .. old .. '}')) do
        local hex, job_id = string.match(m, '^%d+|%x+|[01](%x+)|(.+)$')
        redis.call('ZREM', kf, m)
        if hex then
          redis.call('ZADD', kf, 0, tts_fair_member(user, r, tts_fair_pos(tonumber(hex, 16), cursor), job_id))
        end
      end
    end
  end
  redis.call('HSET', ks, field, r .. '|' .. cursor, 'l:' .. user, r)
  return r
end

-- Where a queued job's member is now (for eviction): its document's current rank and cursor, or
-- the requeued rank. Both candidates are removed; removing a missing member is a no-op.
local function tts_fair_forget(kf, ks, job)
  local ok, j = pcall(cjson.decode, job)
  if not ok or type(j) ~= 'table' or j['user_id'] == nil or j['job_id'] == nil then return end
  local user, idx = tostring(j['user_id']), tonumber(j['block_idx']) or 0
  redis.call('ZREM', kf, tts_fair_member(user, TTS_FAIR_FIRST, tts_fair_pos(idx, 0), j['job_id']))
  local state = redis.call('HGET', ks, 'd:' .. user .. '|' .. tostring(j['document_id']))
  if state then
    local r, cursor = string.match(state, '^(%x+)|(%d+)$')
    if r then
      redis.call('ZREM', kf, tts_fair_member(user, r, tts_fair_pos(idx, tonumber(cursor)), j['job_id']))
    end
  end
end
