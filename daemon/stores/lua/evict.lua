-- A connection stops waiting for some of its blocks, atomically.
--   mode "queued" (cursor_moved): only blocks whose job is still queued (not pulled by a worker)
--     are evicted; a block a worker holds keeps its waiter and gets its terminal status.
--   mode "all" (the connection closed): every waiter of the connection goes.
-- A queued job nobody waits for any more leaves the queue; a job another waiter (another
-- connection, another user) still wants stays. Jobs a worker holds are never touched.
-- The jobs dropped are returned with their users, whose holds the caller then releases (the
-- job's creator may be another user than the connection's: their holds key is not known here).
-- KEYS: 1 tts:jobs, 2 tts:retries, then 3 per block: tts:inflight:{hash}, tts:waiters:{hash},
--       tts:queue:{model}
-- ARGV: 1 user_id, 2 conn_id, 3 mode, 4 count, then per block: document_id, block_idx
-- Returns {evicted, dropped}: the 1-based positions (in the block list) of the evicted blocks,
-- and job_id, user_id of each job dropped.
local user, conn, mode, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local evicted, dropped = {}, {}
for i = 0, n - 1 do
  local base = 5 + i * 2
  local doc, idx = ARGV[base], ARGV[base + 1]
  local inflight_key, waiters, queue = KEYS[3 + i * 3], KEYS[4 + i * 3], KEYS[5 + i * 3]
  local job_id = redis.call('GET', inflight_key)
  local queued = job_id and redis.call('ZSCORE', queue, job_id)
  if mode == 'all' or queued then
    if redis.call('SREM', waiters, tts_waiter(user, idx, conn, doc)) == 1 then
      evicted[#evicted + 1] = i + 1
      if queued and redis.call('SCARD', waiters) == 0 then
        local job = redis.call('HGET', KEYS[1], job_id)
        local ok, j = pcall(cjson.decode, job or '')
        if ok and type(j) == 'table' and j['user_id'] then
          dropped[#dropped + 1] = job_id
          dropped[#dropped + 1] = string.format('%d', j['user_id'])
        end
        redis.call('ZREM', queue, job_id)
        redis.call('HDEL', KEYS[1], job_id)
        redis.call('HDEL', KEYS[2], job_id)
        redis.call('DEL', inflight_key)
      end
    end
  end
end
return {evicted, dropped}
