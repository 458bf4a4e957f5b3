-- A worker's pull, one atomic step (docs/workers.md): pop the lowest-score job, record it as held,
-- tell its waiters it is processing, return its JSON (nil when the queue is empty).
-- KEYS: 1 tts:queue:{model}, 2 tts:processing:{model}, 3 tts:jobs
for _ = 1, 100 do
  local popped = redis.call('ZPOPMIN', KEYS[1])
  if #popped == 0 then return false end
  local job_id = popped[1]
  local job = redis.call('HGET', KEYS[3], job_id)
  if job then
    redis.call('ZADD', KEYS[2], tts_now(), job_id)
    local ok, j = pcall(cjson.decode, job)
    if ok and type(j) == 'table' and j['variant_hash'] then
      tts_notify(j['variant_hash'], {type = 'status', status = 'processing',
                                     model = j['model'], voice = j['voice']})
    end
    return job
  end
  -- A queue entry whose job is gone (evicted meanwhile): skip it.
end
return false
