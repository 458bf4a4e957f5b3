-- cursor_moved: drop this user's waiters on still-queued jobs of one document; a job nobody
-- waits for any more leaves the queue. Jobs a worker already holds are not touched.
-- ARGV: 1 user_id, 2 document_id, 3 count, then per block: block_idx, variant_hash, model
-- Returns the evicted block indexes.
local user, doc, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local evicted = {}
for i = 0, n - 1 do
  local idx, hash, model = ARGV[4 + i * 3], ARGV[5 + i * 3], ARGV[6 + i * 3]
  local inflight_key = 'tts:inflight:' .. hash
  local job_id = redis.call('GET', inflight_key)
  if job_id and redis.call('ZSCORE', 'tts:queue:' .. model, job_id) then
    local waiters = 'tts:waiters:' .. hash
    if redis.call('SREM', waiters, user .. '|' .. idx .. '|' .. doc) == 1 then
      evicted[#evicted + 1] = tonumber(idx)
      if redis.call('SCARD', waiters) == 0 then
        redis.call('ZREM', 'tts:queue:' .. model, job_id)
        redis.call('HDEL', 'tts:jobs', job_id)
        redis.call('HDEL', 'tts:retries', job_id)
        redis.call('DEL', inflight_key, waiters)
      end
    end
  end
end
return evicted
