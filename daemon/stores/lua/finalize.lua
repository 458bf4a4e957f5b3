-- The hot path's unit of work, for a group of claimed results in one call (one round trip). Each
-- result is finalized on its own terms: check that the claimed item is the result the caller
-- validated and that its job is still the one the daemon created (else the result is a
-- duplicate), store the audio, queue the billing event, notify every waiter, drop the job,
-- acknowledge the result. A script is atomic, so a crash before it leaves the results claimed
-- (recovered) and after it everything is done: there is no state in between.
--
-- The audio is stored without a copy: the claimed item (a list whose first element is the result
-- as the worker sent it, see claim.lua) is renamed to tts:audio:{variant_hash}, and a small JSON
-- document saying where the audio is in it, its content type and duration, is appended.
-- A refused result (op "reject": it names a job, but daemon/hot/validate.py refused it) moves,
-- whole and with its reason, to tts:results:dead, and its job fails: the waiters hear a
-- recoverable error and the job's keys go, so the block can be asked for again. A result that
-- names no job the daemon has (op "dead") is only dead-lettered.
-- KEYS: 1 claimed set, 2 tts:billing, 3 tts:jobs, 4 tts:retries, 5 tts:results:dead,
--       6 tts:persist (written only when ARGV 5 is "1"), then per result (from ARGV's key
--       index on): its item tts:hot:item:{token}, and for ops on a job:
--       tts:inflight:{h}, tts:waiters:{h}, tts:audio:{h}, tts:processing:{model},
--       tts:queue:{model} (h and model: the job's, from the job JSON)
-- ARGV: 1 ttl_s, 2 consumer id, 3 dead-letter cap (entries), 4 dead-letter raw cap (bytes),
--       5 persist ("1": stored audio gets no TTL yet — RENAME keeps the item's: none — and its
--       hash is appended to tts:persist for the persister, which applies the TTL once the durable
--       store has the audio, docs/tts-flow.md "The third path: persist"; else the TTL at once),
--       6 tts:notify: (Keys.NOTIFY_PREFIX, the waiters' channels: tts_notify), then 13 per
--       result: op (audio|skipped|error|reject|dead|discard), token, key index, job_id, job
--       JSON (as claim.lua read it; "" none), model, voice, audio metadata JSON, billing
--       event JSON ("" none is queued — tools/inline.py, the pre-split baseline, bills inside its
--       handler), message (the error a listener sees), dead-letter note JSON (reason, worker_id,
--       job_id), the result's metadata and where its audio is (claim.lua's, for the identity check)
-- Returns 2 per result: outcome, waiters notified. Outcome: finalized | duplicate | dead | gone
-- (the claimed result is no longer here: finalized already, or given back by recovery) |
-- "error: ..." (Redis refused a write; that result is still claimed).
local ttl, consumer = tonumber(ARGV[1]), ARGV[2]
local dead_cap, dead_raw_cap = tonumber(ARGV[3]), tonumber(ARGV[4])
local persist, channel_prefix = ARGV[5] == '1', ARGV[6]

local function dead_letter(item, note)
  local raw = redis.call('LINDEX', item, 0)
  if not raw then return 'gone' end
  local ok, entry = pcall(cjson.decode, note)
  if not ok or type(entry) ~= 'table' then entry = {reason = note} end
  entry['consumer'] = consumer
  entry['at'] = tts_now()
  entry['raw_bytes'] = #raw
  if #raw > dead_raw_cap then
    entry['raw'] = string.sub(raw, 1, dead_raw_cap)
    entry['truncated'] = true
  else
    entry['raw'] = raw
  end
  redis.call('LPUSH', KEYS[5], cjson.encode(entry))
  redis.call('LTRIM', KEYS[5], 0, dead_cap - 1)
  redis.call('DEL', item)
  return 'dead'
end

-- Is the claimed item the result the caller validated? (Its name could only be reused for another
-- result if tokens repeated; this makes sure no audio is ever attached to another job.)
local function same_result(raw, job_id, meta, loc)
  local s, e = string.match(loc, '^r:(%d+):(%d+)$')
  if s then
    return string.sub(raw, 1, tonumber(s) - 1) .. string.sub(raw, tonumber(e) + 1) == meta
  end
  local ok, r = pcall(cjson.decode, raw)
  if ok then return type(r) == 'table' and r['job_id'] == job_id end
  -- Undecodable: the job it names, found as claim.lua found it.
  local k = string.find(raw, '"job_id"', 1, true)
  return k ~= nil and string.match(raw, '^%s*:%s*"(%x+)"', k + 8) == job_id
end

-- The job's keys go: nothing of it is left to wait on.
local function drop_job(k, job_id)
  redis.call('DEL', KEYS[k + 1])
  redis.call('HDEL', KEYS[3], job_id)
  redis.call('ZREM', KEYS[k + 4], job_id)
  redis.call('ZREM', KEYS[k + 5], job_id)
  redis.call('HDEL', KEYS[4], job_id)
end

local function tell_waiters(k, hash, frame)
  local notified = tts_notify(KEYS[k + 2], channel_prefix, hash, frame)
  redis.call('DEL', KEYS[k + 2])
  return notified
end

-- THE place where a job fails for good (a worker's error, or its result refused): its waiters
-- hear a recoverable error, and the job is gone, so the same block can be asked for again and a
-- new job is made. Whatever must follow a failed job (e.g. releasing what was reserved for it)
-- belongs here.
local function fail_job(k, job_id, hash, frame, message)
  drop_job(k, job_id)
  frame['status'] = 'error'
  frame['error'] = message
  frame['recoverable'] = true
  return tell_waiters(k, hash, frame)
end

local function finalize(op, token, k, job_id, job_json, model, voice, audio_meta, billing,
                        message, note, meta, loc)
  local item = KEYS[k]
  if op == 'dead' then return dead_letter(item, note), 0 end
  local raw = redis.call('LINDEX', item, 0)
  if not raw then return 'gone', 0 end
  if op == 'discard' then
    redis.call('DEL', item)
    return 'duplicate', 0
  end
  if not same_result(raw, job_id, meta, loc) then return 'gone', 0, true end
  -- The job must still be the one the daemon created, and the one its variant waits for: a
  -- result for an unknown or finished job is never stored or billed.
  local current = job_json ~= '' and redis.call('HGET', KEYS[3], job_id)
  if current ~= job_json or redis.call('GET', KEYS[k + 1]) ~= job_id then
    if op == 'reject' then return dead_letter(item, note), 0 end
    redis.call('DEL', item)
    return 'duplicate', 0
  end
  local ok_job, job = pcall(cjson.decode, job_json)
  local hash = ok_job and type(job) == 'table' and job['variant_hash'] or ''
  local frame = {type = 'status', model = model, voice = voice}
  if op == 'reject' then
    dead_letter(item, note)
    return 'finalized', fail_job(k, job_id, hash, frame, message)
  end
  if op == 'error' then
    redis.call('DEL', item)
    return 'finalized', fail_job(k, job_id, hash, frame, message)
  end
  drop_job(k, job_id)
  if op == 'audio' then
    local audio_key = KEYS[k + 3]
    redis.call('RENAME', item, audio_key)
    redis.call('RPUSH', audio_key, audio_meta)
    if persist then
      redis.call('XADD', KEYS[6], '*', 'h', hash)
    else
      redis.call('EXPIRE', audio_key, ttl)
    end
    if billing ~= '' then
      redis.call('XADD', KEYS[2], '*', 'event', billing)
    end
    frame['status'] = 'cached'
    frame['audio_url'] = '/v1/audio/' .. hash
  else
    redis.call('DEL', item)
    frame['status'] = 'skipped'
  end
  return 'finalized', tell_waiters(k, hash, frame)
end

local out = {}
for i = 7, #ARGV, 13 do
  local token = ARGV[i + 1]
  local ok, outcome, notified, not_ours = pcall(finalize, ARGV[i], token, tonumber(ARGV[i + 2]),
                                      ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6],
                                      ARGV[i + 7], ARGV[i + 8], ARGV[i + 9], ARGV[i + 10],
                                      ARGV[i + 11], ARGV[i + 12])
  if ok then
    -- A result found to be another one ("gone" on an identity mismatch) is not ours to release.
    if not not_ours then redis.call('SREM', KEYS[1], token) end
    out[#out + 1] = outcome
    out[#out + 1] = notified
  else
    out[#out + 1] = 'error: ' .. tostring(outcome)
    out[#out + 1] = 0
  end
end
return out
