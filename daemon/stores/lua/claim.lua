-- The hot consumer's claim: take up to ARGV[1] results — first what BLMOVE dropped in the landing
-- list, then from tts:results — and read each one here, in Redis, so that the audio (~80 KB of
-- base64 per five-second block) never travels to the daemon and back.
--
-- Each result moves, without a copy (LMOVE), into a key of its own, tts:hot:item:{seq}, a list
-- whose first element is the result as the worker sent it; its seq joins the consumer's claimed
-- set. finalize.lua later renames that key to tts:audio:{variant_hash}: the audio is stored
-- without being copied either. The caller gets a small metadata document per result: the result
-- JSON with audio_base64 = "".
--
-- Reading: the fast path finds the top-level "audio_base64" string and splices it out (two memchr
-- scans and a small JSON decode), so the audio is located, not parsed. A result it cannot splice
-- safely (escapes in the audio, odd layout) is decoded whole, and its audio string is appended to
-- the item list. The base64 itself is checked at both ends (ARGV[2] characters each) and wholly
-- when shorter than ARGV[3]; the audio endpoint decodes strictly and catches the rest.
-- KEYS: 1 tts:results, 2 the consumer's landing list, 3 its claimed set, 4 tts:hot:seq
-- ARGV: 1 n, 2 sample, 3 full-check length
-- Returns one string per result (one reply element each: the daemon parses replies in Python):
--   "seq|audio length|where|problem length\n" .. problem .. metadata JSON
-- audio length -1: no audio string; where: "r:s:e" (in the raw result) or "i:2" (the item's 2nd
-- element) or ""; problem: "" or why the result cannot be read (then there is no metadata).
local n, sample, full = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local KEY = '"audio_base64"'
local out = {}

local function b64_problem(len, first, last)
  if len % 4 ~= 0 then return 'audio_base64: length is not a multiple of 4' end
  local ok
  if last == nil then
    ok = string.find(first, '^[A-Za-z0-9+/]*=?=?$')
  else
    ok = string.find(first, '^[A-Za-z0-9+/]*$') and string.find(last, '^[A-Za-z0-9+/]*=?=?$')
  end
  if not ok then return 'audio_base64: not base64' end
  return nil
end

-- The fast path: positions (s, e) of the audio text inside raw, and the metadata JSON; or nil.
local function splice(raw)
  local k = string.find(raw, KEY, 1, true)
  if not k then return nil end
  local _, open = string.find(raw, '^%s*:%s*"', k + #KEY)
  if not open then return nil end
  local s = open + 1
  local q = string.find(raw, '"', s, true)
  if not q then return nil end
  local bs = string.find(raw, '\\', s, true)
  if bs and bs < q then return nil end  -- escapes inside: only a full decode reads it right
  local prefix = string.sub(raw, 1, s - 1)
  local meta = prefix .. string.sub(raw, q)
  -- The key must be the top-level one that a decoder keeps: the prefix closed right after it is
  -- a whole object, and the spliced document decodes with that field empty.
  local ok_top = pcall(cjson.decode, prefix .. '"}')
  if not ok_top then return nil end
  local ok, t = pcall(cjson.decode, meta)
  if not ok or type(t) ~= 'table' or t['audio_base64'] ~= '' then return nil end
  return s, q - 1, meta
end

local function take(item)
  local raw = redis.call('LINDEX', item, 0)
  local meta, audio_len, loc, problem = '', -1, '', nil
  local s, e, m = splice(raw)
  if s then
    audio_len = e - s + 1
    if audio_len > full then
      problem = b64_problem(audio_len, string.sub(raw, s, s + sample - 1),
                            string.sub(raw, e - sample + 1, e))
    else
      problem = b64_problem(audio_len, string.sub(raw, s, e))
    end
    meta, loc = m, 'r:' .. s .. ':' .. e
  else
    local ok, r = pcall(cjson.decode, raw)
    if not ok then
      problem = 'result: not JSON: ' .. tostring(r)
    elseif type(r) ~= 'table' then
      problem = 'result: not a JSON object'
    else
      local audio = r['audio_base64']
      if type(audio) == 'string' then
        audio_len = #audio
        if audio_len > full then
          problem = b64_problem(audio_len, string.sub(audio, 1, sample),
                                string.sub(audio, audio_len - sample + 1))
        else
          problem = b64_problem(audio_len, audio)
        end
        r['audio_base64'] = ''
        if not problem then
          redis.call('RPUSH', item, audio)
          loc = 'i:2'
        end
      end
      local encoded, m2 = pcall(cjson.encode, r)
      if encoded then meta = m2 else problem = 'result: cannot be re-encoded: ' .. tostring(m2) end
    end
  end
  if problem then
    meta, loc = '', ''
  else
    problem = ''
  end
  return meta, audio_len, loc, problem
end

local taken = 0
while taken < n do
  local seq = redis.call('INCR', KEYS[4])
  local item = 'tts:hot:item:' .. seq
  while redis.call('EXISTS', item) == 1 do  -- the counter was lost but not the item: skip it
    seq = redis.call('INCR', KEYS[4])
    item = 'tts:hot:item:' .. seq
  end
  local moved = redis.call('LMOVE', KEYS[2], item, 'RIGHT', 'LEFT')
  if not moved then moved = redis.call('LMOVE', KEYS[1], item, 'RIGHT', 'LEFT') end
  if not moved then break end
  redis.call('SADD', KEYS[3], seq)
  local meta, audio_len, loc, problem = take(item)
  out[#out + 1] = seq .. '|' .. audio_len .. '|' .. loc .. '|' .. #problem .. '\n' .. problem .. meta
  taken = taken + 1
end
return out
