-- The hot consumer's claim: take up to ARGV[1] results — first what BLMOVE dropped in the landing
-- list, then from tts:results — and read each one here, in Redis, so that the audio (~80 KB of
-- base64 per five-second block) never travels to the daemon and back.
--
-- Each result moves, without a copy (LMOVE), into a key of its own, tts:hot:item:{token}, a list
-- whose first element is the result as the worker sent it; its token joins the consumer's claimed
-- set. The caller names the items (KEYS) and their tokens (ARGV): tokens are unique to the
-- consumer's run (docs/tts-flow.md), so a Redis that lost its last second cannot hand one name to
-- two results; a name already in use is skipped. finalize.lua later renames the item to
-- tts:audio:{variant_hash}: the audio is stored without being copied either. The caller gets a
-- small metadata document per result — the result JSON with audio_base64 = "" — and the JSON of
-- the job it names, as the daemon wrote it at enqueue ("" when there is none): the caller
-- validates the result against it (daemon/hot/validate.py).
--
-- Reading: the fast path finds the top-level "audio_base64" string and splices it out (two memchr
-- scans and a small JSON decode), so the audio is located, not parsed. A result it cannot splice
-- safely (escapes in the audio, odd layout) is decoded whole, and its audio string is appended to
-- the item list. The base64 itself is checked at both ends (ARGV[2] characters each) and wholly
-- when shorter than ARGV[3]; the audio endpoint decodes strictly and catches the rest.
-- KEYS: 1 tts:results, 2 the consumer's landing list, 3 its claimed set, 4 tts:jobs,
--       4 + i: the i-th item name offered (tts:hot:item:{token i}), i = 1..n
-- ARGV: 1 n, 2 sample, 3 full-check length, 3 + i: token i
-- Returns one string per result (one reply element each: the daemon parses replies in Python):
--   "token|audio length|where|problem length|job length\n" .. problem .. job .. metadata JSON
-- audio length -1: no audio string; where: "r:s:e" (in the raw result) or "i:2" (the item's 2nd
-- element) or "" (where is "r:s:e" for a spliced result even when its base64 is bad: finalize.lua
-- checks the item's identity with it); problem: "" or why the result cannot be read (the metadata is still there when
-- the result is JSON: a bad result still names its job, so the job can be failed).
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

-- The fast path: positions (s, e) of the audio text inside raw, the metadata JSON and its
-- decoded table; or nil.
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
  return s, q - 1, meta, t
end

local function take(item)
  local raw = redis.call('LINDEX', item, 0)
  local meta, audio_len, loc, problem, job_id = '', -1, '', nil, nil
  local s, e, m, t = splice(raw)
  if s then
    audio_len = e - s + 1
    if audio_len > full then
      problem = b64_problem(audio_len, string.sub(raw, s, s + sample - 1),
                            string.sub(raw, e - sample + 1, e))
    else
      problem = b64_problem(audio_len, string.sub(raw, s, e))
    end
    meta, loc, job_id = m, 'r:' .. s .. ':' .. e, t['job_id']
  else
    local ok, r = pcall(cjson.decode, raw)
    if not ok then
      problem = 'result: not JSON: ' .. tostring(r)
    elseif type(r) ~= 'table' then
      problem = 'result: not a JSON object'
    else
      job_id = r['job_id']
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
  if not problem then problem = '' end
  if problem ~= '' and type(job_id) ~= 'string' then
    -- Undecodable, but it may still name its job: find it, so that the job can fail (and be
    -- asked for again) rather than wait forever.
    local k = string.find(raw, '"job_id"', 1, true)
    if k then job_id = string.match(raw, '^%s*:%s*"(%x+)"', k + 8) end
  end
  local job = false
  if type(job_id) == 'string' and job_id ~= '' then job = redis.call('HGET', KEYS[4], job_id) end
  return meta, audio_len, loc, problem, job or ''
end

local slot = 0
for _ = 1, n do
  -- The next item name not in use (one still held — by whatever run — is never reused).
  local item, token
  repeat
    slot = slot + 1
    if slot > n then break end
    item, token = KEYS[4 + slot], ARGV[3 + slot]
  until redis.call('EXISTS', item) == 0
  if slot > n then break end
  local moved = redis.call('LMOVE', KEYS[2], item, 'RIGHT', 'LEFT')
  if not moved then moved = redis.call('LMOVE', KEYS[1], item, 'RIGHT', 'LEFT') end
  if not moved then break end
  redis.call('SADD', KEYS[3], token)
  local meta, audio_len, loc, problem, job = take(item)
  out[#out + 1] = token .. '|' .. audio_len .. '|' .. loc .. '|' .. #problem .. '|' .. #job ..
                  '\n' .. problem .. job .. meta
end
return out
