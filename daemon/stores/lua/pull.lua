-- A worker's pull, one atomic step (docs/workers.md): take the next job by fair scheduling, record
-- it as held, tell its waiters it is processing, return its JSON (nil when the queue is empty).
-- The user with the smallest virtual start time goes next (start-time fair queuing: each pull
-- advances that user by the job's characters / the user's weight); within a user, the newest
-- reading position first. O(log n) in queued jobs and waiting users.
-- KEYS: 1 tts:queue:{model}, 2 tts:processing:{model}, 3 tts:jobs, 4 tts:fair:{model},
--       5 tts:fair:users:{model}, 6 tts:fair:state:{model} (Keys.pull_keys)
-- ARGV: 1 tts:waiters: (Keys.WAITERS_PREFIX), 2 tts:notify: (Keys.NOTIFY_PREFIX) (Keys.pull_args)
-- The one key this script completes itself: the waiters set of the job it picks, ARGV[1] ..
-- variant_hash. Which job goes next is decided here, atomically, so no caller can name that key
-- beforehand. A caller without ARGV (a worker that predates them) still pulls; the job's
-- listeners then miss the "processing" status (not its outcome).
for _ = 1, 100 do
  local job_id, user, vstart, member
  local top = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
  if #top == 0 then
    -- Nothing in the fair index: jobs queued without it (an older daemon's) go in enqueue order.
    local popped = redis.call('ZPOPMIN', KEYS[1])
    if #popped == 0 then return false end
    job_id = popped[1]
  else
    user, vstart = top[1], tonumber(top[2])
    local head = redis.call('ZRANGEBYLEX', KEYS[4], '[' .. user .. '|', '(' .. user .. '}',
                            'LIMIT', 0, 1)
    if #head == 0 then
      redis.call('ZREM', KEYS[5], user)
      redis.call('HSET', KEYS[6], 'f:' .. user, vstart)
    else
      member = head[1]
      redis.call('ZREM', KEYS[4], member)
      job_id = string.match(member, '([^|]+)$')
      -- A member whose job left the queue (finished by a slow first worker) is skipped.
      if redis.call('ZREM', KEYS[1], job_id) == 0 then job_id = nil end
    end
  end
  local job = job_id and redis.call('HGET', KEYS[3], job_id)
  if job then
    local ok, j = pcall(cjson.decode, job)
    if not ok or type(j) ~= 'table' then j = {} end
    if user then
      local text = j['text']
      local cost = math.max(1, type(text) == 'string' and tts_utf8_len(text) or 1)
      local w = tonumber(redis.call('HGET', KEYS[6], 'w:' .. user)) or 1
      local finish = vstart + cost / w
      redis.call('HSET', KEYS[6], 'vt', vstart)
      local more = redis.call('ZRANGEBYLEX', KEYS[4], '[' .. user .. '|', '(' .. user .. '}',
                              'LIMIT', 0, 1)
      if #more == 0 then
        redis.call('ZREM', KEYS[5], user)
        redis.call('HSET', KEYS[6], 'f:' .. user, finish)
      else
        redis.call('ZADD', KEYS[5], finish, user)
      end
      -- The document's last queued job: forget its reading position.
      local r = string.match(member, '^%d+|(%x+)|')
      local field = 'd:' .. user .. '|' .. tostring(j['document_id'])
      local state = redis.call('HGET', KEYS[6], field)
      if state and string.match(state, '^(%x+)|') == r then
        local left = redis.call('ZRANGEBYLEX', KEYS[4], '[' .. user .. '|' .. r .. '|',
                                '(' .. user .. '|' .. r .. '}', 'LIMIT', 0, 1)
        if #left == 0 then redis.call('HDEL', KEYS[6], field) end
      end
    end
    redis.call('ZADD', KEYS[2], tts_now(), job_id)
    if j['variant_hash'] and ARGV[2] then
      tts_notify(ARGV[1] .. j['variant_hash'], ARGV[2], j['variant_hash'],
                 {type = 'status', status = 'processing', model = j['model'], voice = j['voice']})
    end
    return job
  end
  -- A queue entry whose job is gone (evicted meanwhile): skip it.
end
return false
