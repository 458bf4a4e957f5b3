-- The visibility scanner: jobs held longer than ARGV[1] seconds go back to the queue (at their
-- original enqueue time); on their ARGV[2]-th timeout they go to the DLQ instead, with an error
-- result so their clients hear. At most ARGV[3] jobs per call.
-- KEYS: 1 tts:processing:{model}, 2 tts:queue:{model}, 3 tts:jobs, 4 tts:retries,
--       5 tts:dlq:{model}, 6 tts:results, 7 tts:fair:{model}, 8 tts:fair:users:{model},
--       9 tts:fair:state:{model}
-- A requeued job goes ahead of its user's other jobs (fair scheduling still decides between users).
-- Returns {requeued, dead_lettered}
local now = tts_now()
local max_retries = tonumber(ARGV[2])
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]),
                         'LIMIT', 0, tonumber(ARGV[3]))
local requeued, dead = 0, 0
for _, job_id in ipairs(stale) do
  redis.call('ZREM', KEYS[1], job_id)
  local job = redis.call('HGET', KEYS[3], job_id)
  if job then
    local tries = redis.call('HINCRBY', KEYS[4], job_id, 1)
    local ok, j = pcall(cjson.decode, job)
    if not ok or type(j) ~= 'table' then j = {} end
    if tries >= max_retries then
      redis.call('LPUSH', KEYS[5], job)
      redis.call('HDEL', KEYS[3], job_id)
      redis.call('HDEL', KEYS[4], job_id)
      local text = j['text']
      if type(text) ~= 'string' then text = '' end
      redis.call('LPUSH', KEYS[6], cjson.encode({
        job_id = job_id, variant_hash = j['variant_hash'] or '', model = j['model'] or '',
        voice = j['voice'] or '', user_id = j['user_id'] or 0, document_id = j['document_id'] or '',
        block_idx = j['block_idx'] or 0, text_length = tts_utf8_len(text),
        usage_multiplier = j['usage_multiplier'] or 0, worker_id = 'visibility-scanner',
        queue_wait_ms = 0, processing_time_ms = 0,
        error = 'synthesis failed: job timed out ' .. tries .. ' times'}))
      dead = dead + 1
    else
      redis.call('ZADD', KEYS[2], tonumber(j['enqueued_at']) or now, job_id)
      if j['user_id'] ~= nil then
        local user = tostring(j['user_id'])
        local pos = tts_fair_pos(tonumber(j['block_idx']) or 0, 0)
        redis.call('ZADD', KEYS[7], 0, tts_fair_member(user, TTS_FAIR_FIRST, pos, job_id))
        tts_fair_activate(KEYS[8], KEYS[9], user)
      end
      if j['variant_hash'] then
        tts_notify(j['variant_hash'], {type = 'status', status = 'queued',
                                       model = j['model'], voice = j['voice']})
      end
      requeued = requeued + 1
    end
  end
end
return {requeued, dead}
