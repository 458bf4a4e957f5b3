-- Shared by the scripts below (prepended to each at load time).
-- Waiter members are "user|block_idx|conn_id|document_id": one per WebSocket connection waiting
-- for a block (conn_id is alphanumeric; document_id goes last as it may hold '|'). Each waiter gets
-- the frame on its user's channel, with conn and variant_hash for the gateway's routing (the
-- gateway strips them before the frame reaches the client).
local function tts_waiter(user, idx, conn, doc)
  return user .. '|' .. idx .. '|' .. conn .. '|' .. doc
end

-- waiters_key: tts:waiters:{hash}, passed in KEYS by the scripts that do so (tts_notify builds it,
-- for the scripts that do not yet).
local function tts_notify_to(waiters_key, hash, frame)
  local members = redis.call('SMEMBERS', waiters_key)
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

local function tts_notify(hash, frame)
  return tts_notify_to('tts:waiters:' .. hash, hash, frame)
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
