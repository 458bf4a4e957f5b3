-- Shared by the scripts below (prepended to each at load time).
-- Waiter members are "user|block_idx|conn_id|document_id": one per WebSocket connection waiting
-- for a block (conn_id is alphanumeric; document_id goes last as it may hold '|'). Each waiter gets
-- the frame on its user's channel, with conn and variant_hash for the gateway's routing (the
-- gateway strips them before the frame reaches the client).
local function tts_waiter(user, idx, conn, doc)
  return user .. '|' .. idx .. '|' .. conn .. '|' .. doc
end

local function tts_notify(hash, frame)
  local members = redis.call('SMEMBERS', 'tts:waiters:' .. hash)
  frame['variant_hash'] = hash
  for _, m in ipairs(members) do
    local user, idx, conn, doc = string.match(m, '^(%d+)|(%d+)|(%w+)|(.*)$')
    if user then
      frame['document_id'] = doc
      frame['block_idx'] = tonumber(idx)
      frame['conn'] = conn
      redis.call('PUBLISH', 'tts:notify:' .. user, cjson.encode(frame))
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
