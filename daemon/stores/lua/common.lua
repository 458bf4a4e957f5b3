-- Shared by the scripts below (prepended to each at load time).
-- Waiter members are "user|block_idx|document_id"; document_id goes last as it may hold '|'.
local function tts_notify(hash, frame)
  local members = redis.call('SMEMBERS', 'tts:waiters:' .. hash)
  for _, m in ipairs(members) do
    local user, idx, doc = string.match(m, '^(%d+)|(%d+)|(.*)$')
    if user then
      frame['document_id'] = doc
      frame['block_idx'] = tonumber(idx)
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
