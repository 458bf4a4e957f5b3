-- The hot path's unit of work, for a group of claimed results in one call (one round trip). Each
-- result is finalized on its own terms: claim the job (the in-flight key must still name it, else
-- the result is a duplicate), store the audio, queue the billing event, notify every waiter, drop
-- the job, acknowledge the result. A script is atomic, so a crash before it leaves the results
-- claimed (recovered) and after it everything is done: there is no state in between.
--
-- The audio is stored without a copy: the claimed item (a list whose first element is the result
-- as the worker sent it, see claim.lua) is renamed to tts:audio:{variant_hash}, and a small JSON
-- document saying where the audio is in it, its content type and duration, is appended.
-- An unreadable result (op "dead") moves, whole and with its reason, to tts:results:dead.
-- KEYS: 1 claimed set, 2 tts:billing, 3 tts:jobs, 4 tts:retries, 5 tts:results:dead,
--       6 (optional) tts:persist: when given, stored audio gets no TTL yet (RENAME keeps the
--       item's: none) and its hash is
--       appended to this stream for the persister, which applies the TTL once the durable store
--       has the audio (docs/tts-flow.md, "The third path: persist"); without it, the TTL at once
-- ARGV: 1 ttl_s, 2 consumer id, then 9 per result: op (audio|skipped|error|dead), seq, job_id,
--       variant_hash, model, voice, audio metadata JSON, billing event JSON (empty: none is
--       queued — tools/inline.py, the pre-split baseline, bills inside its handler), error
--       message (the reason, for "dead")
-- Returns 2 per result: outcome, waiters notified. Outcome: finalized | duplicate | dead | gone
-- (the claimed result is no longer here: finalized already, or given back by recovery) |
-- "error: ..." (Redis refused a write; that result is still claimed).
local ttl, consumer = tonumber(ARGV[1]), ARGV[2]

local function dead_letter(seq, item, reason)
  local raw = redis.call('LINDEX', item, 0)
  if not raw then return 'gone' end
  redis.call('LPUSH', KEYS[5], cjson.encode({
    reason = reason, consumer = consumer, at = tts_now(), raw = raw}))
  redis.call('DEL', item)
  return 'dead'
end

local function finalize(op, seq, job_id, hash, model, voice, audio_meta, billing, err)
  local item = 'tts:hot:item:' .. seq
  if redis.call('EXISTS', item) == 0 then return 'gone', 0 end
  if op == 'dead' then return dead_letter(seq, item, err), 0 end
  local inflight_key = 'tts:inflight:' .. hash
  if redis.call('GET', inflight_key) ~= job_id then
    redis.call('DEL', item)
    return 'duplicate', 0
  end
  redis.call('DEL', inflight_key)
  redis.call('HDEL', KEYS[3], job_id)
  redis.call('ZREM', 'tts:processing:' .. model, job_id)
  redis.call('ZREM', 'tts:queue:' .. model, job_id)
  redis.call('HDEL', KEYS[4], job_id)
  local frame = {type = 'status', model = model, voice = voice}
  if op == 'audio' then
    local audio_key = 'tts:audio:' .. hash
    redis.call('RENAME', item, audio_key)
    redis.call('RPUSH', audio_key, audio_meta)
    if KEYS[6] then
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
    if op == 'skipped' then
      frame['status'] = 'skipped'
    else
      frame['status'] = 'error'
      frame['error'] = err
      frame['recoverable'] = true
    end
  end
  local notified = tts_notify(hash, frame)
  redis.call('DEL', 'tts:waiters:' .. hash)
  return 'finalized', notified
end

local out = {}
for i = 3, #ARGV, 9 do
  local seq = ARGV[i + 1]
  local ok, outcome, notified = pcall(finalize, ARGV[i], seq, ARGV[i + 2], ARGV[i + 3],
                                      ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7],
                                      ARGV[i + 8])
  if ok then
    if outcome ~= 'error' then redis.call('SREM', KEYS[1], seq) end
    out[#out + 1] = outcome
    out[#out + 1] = notified
  else
    out[#out + 1] = 'error: ' .. tostring(outcome)
    out[#out + 1] = 0
  end
end
return out
