-- The hot path's whole unit of work for one result, atomic: claim (the in-flight key must still
-- name this job, else it is a duplicate), store the audio, queue the billing event, notify every
-- waiter, drop the job, and acknowledge the result. A crash before this script leaves the result
-- in the claimed list (recovered); after it, everything is done: there is no state in between.
-- KEYS: 1 claimed list, 2 tts:billing, 3 tts:jobs, 4 tts:processing:{model}, 5 tts:queue:{model},
--       6 tts:retries
-- ARGV: 1 raw result (to acknowledge), 2 job_id, 3 variant_hash, 4 kind (audio|skipped|error),
--       5 audio bytes, 6 content_type, 7 duration_ms, 8 ttl_s, 9 billing event JSON,
--       10 error message, 11 model, 12 voice
-- An empty ARGV[9] queues no billing event: only tools/inline.py (the pre-split baseline, which
-- bills inside the handler) passes one; the daemon never does.
local job_id, hash, kind = ARGV[2], ARGV[3], ARGV[4]
local inflight_key = 'tts:inflight:' .. hash
if redis.call('GET', inflight_key) ~= job_id then
  redis.call('LREM', KEYS[1], 1, ARGV[1])
  return {'duplicate', 0}
end
redis.call('DEL', inflight_key)
redis.call('HDEL', KEYS[3], job_id)
redis.call('ZREM', KEYS[4], job_id)
redis.call('ZREM', KEYS[5], job_id)
redis.call('HDEL', KEYS[6], job_id)
local frame = {type = 'status', model = ARGV[11], voice = ARGV[12]}
if kind == 'audio' then
  local audio_key = 'tts:audio:' .. hash
  redis.call('HSET', audio_key, 'data', ARGV[5], 'content_type', ARGV[6], 'duration_ms', ARGV[7])
  redis.call('EXPIRE', audio_key, tonumber(ARGV[8]))
  if ARGV[9] ~= '' then
    redis.call('XADD', KEYS[2], '*', 'event', ARGV[9])
  end
  frame['status'] = 'cached'
  frame['audio_url'] = '/v1/audio/' .. hash
elseif kind == 'skipped' then
  frame['status'] = 'skipped'
else
  frame['status'] = 'error'
  frame['error'] = ARGV[10]
  frame['recoverable'] = true
end
local n = tts_notify(hash, frame)
redis.call('DEL', 'tts:waiters:' .. hash)
redis.call('LREM', KEYS[1], 1, ARGV[1])
return {'finalized', n}
