-- The visibility scanner: the stale jobs stale.lua found go back to the queue (at their original
-- enqueue time); on their ARGV[2]-th time they go to the DLQ instead, with an error result for
-- the hot path, which fails the job (finalize.lua) so that its clients hear. Each job is checked
-- again here, atomically: one whose lease was renewed meanwhile, or that finished, is left alone.
-- A requeued job goes ahead of its user's other jobs (fair scheduling still decides between users).
-- KEYS: 1 tts:processing:{model}, 2 tts:queue:{model}, 3 tts:jobs, 4 tts:retries,
--       5 tts:dlq:{model}, 6 tts:results, 7 tts:leases:{model}, 8 tts:fair:{model},
--       9 tts:fair:users:{model}, 10 tts:fair:state:{model}, 10 + n: tts:waiters:{h} of job n
-- ARGV: 1 visibility timeout (s), 2 max retries, 3 DLQ cap (entries), 4 tts:notify:
--       (Keys.NOTIFY_PREFIX, the waiters' channels: tts_notify), 4 + n: job id n
-- Returns {requeued, dead_lettered}
local now = tts_now()
local vt, max_retries, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local channel_prefix = ARGV[4]
local requeued, dead = 0, 0
for i = 5, #ARGV do
  local job_id, waiters = ARGV[i], KEYS[6 + i]
  local held = redis.call('ZSCORE', KEYS[1], job_id)
  local lease = redis.call('ZSCORE', KEYS[7], job_id)
  local stale
  if lease then stale = tonumber(lease) <= now else stale = held and tonumber(held) <= now - vt end
  if not held then
    if lease and stale then redis.call('ZREM', KEYS[7], job_id) end  -- finished: lease garbage
  elseif stale then
    redis.call('ZREM', KEYS[1], job_id)
    redis.call('ZREM', KEYS[7], job_id)
    local job = redis.call('HGET', KEYS[3], job_id)
    if job then
      local tries = redis.call('HINCRBY', KEYS[4], job_id, 1)
      local ok, j = pcall(cjson.decode, job)
      if not ok or type(j) ~= 'table' then j = {} end
      if tries >= max_retries then
        redis.call('LPUSH', KEYS[5], job)
        redis.call('LTRIM', KEYS[5], 0, cap - 1)
        redis.call('HDEL', KEYS[4], job_id)
        -- The job stays in tts:jobs until the hot path finalizes this error result: it fails the
        -- job there, in the one place jobs fail.
        local text = j['text']
        if type(text) ~= 'string' then text = '' end
        redis.call('LPUSH', KEYS[6], cjson.encode({
          job_id = job_id, variant_hash = j['variant_hash'] or '', model = j['model'] or '',
          voice = j['voice'] or '', user_id = j['user_id'] or 0,
          document_id = j['document_id'] or '', block_idx = j['block_idx'] or 0,
          text_length = tts_utf8_len(text), usage_multiplier = j['usage_multiplier'] or 0,
          worker_id = 'visibility-scanner', queue_wait_ms = 0, processing_time_ms = 0,
          error = 'synthesis failed: job timed out ' .. tries .. ' times'}))
        dead = dead + 1
      else
        redis.call('ZADD', KEYS[2], tonumber(j['enqueued_at']) or now, job_id)
        if j['user_id'] ~= nil then
          local user = tostring(j['user_id'])
          local pos = tts_fair_pos(tonumber(j['block_idx']) or 0, 0)
          redis.call('ZADD', KEYS[8], 0, tts_fair_member(user, TTS_FAIR_FIRST, pos, job_id))
          tts_fair_activate(KEYS[9], KEYS[10], user)
        end
        if j['variant_hash'] then
          tts_notify(waiters, channel_prefix, j['variant_hash'],
                     {type = 'status', status = 'queued', model = j['model'], voice = j['voice']})
        end
        requeued = requeued + 1
      end
    end
  end
end
return {requeued, dead}
