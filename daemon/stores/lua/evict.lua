-- A connection stops waiting for some of its blocks, atomically.
--   mode "queued" (cursor_moved): only blocks whose job is still queued (not pulled by a worker)
--     are evicted; a block a worker holds keeps its waiter and gets its terminal status.
--   mode "all" (the connection closed): every waiter of the connection goes.
-- A queued job nobody waits for any more leaves the queue; a job another waiter (another
-- connection, another user) still wants stays. Jobs a worker holds are never touched.
-- The jobs dropped are returned with their users, whose holds the caller then releases (the
-- job's creator may be another user than the connection's: their holds key is not known here).
-- KEYS: 1 tts:jobs, 2 tts:retries, then 5 per block: tts:inflight:{hash}, tts:waiters:{hash},
--       tts:queue:{model}, tts:fair:{model}, tts:fair:state:{model}
-- ARGV: 1 user_id, 2 conn_id, 3 mode, 4 count, then per block: document_id, block_idx; then the
--       new reading position of the blocks' document (cursor_moved) or -1
-- Returns {evicted, dropped}: the 1-based positions (in the block list) of the evicted blocks,
-- and job_id, user_id of each job dropped.
local user, conn, mode, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local evicted, dropped = {}, {}
for i = 0, n - 1 do
  local base = 5 + i * 2
  local doc, idx = ARGV[base], ARGV[base + 1]
  local k = 3 + i * 5
  local inflight_key, waiters, queue = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  local job_id = redis.call('GET', inflight_key)
  local queued = job_id and redis.call('ZSCORE', queue, job_id)
  if mode == 'all' or queued then
    if redis.call('SREM', waiters, tts_waiter(user, idx, conn, doc)) == 1 then
      evicted[#evicted + 1] = i + 1
      if queued and redis.call('SCARD', waiters) == 0 then
        redis.call('ZREM', queue, job_id)
        local job = redis.call('HGET', KEYS[1], job_id)
        if job then
          tts_fair_forget(KEYS[k + 3], KEYS[k + 4], job)
          local ok, j = pcall(cjson.decode, job)
          if ok and type(j) == 'table' and j['user_id'] then
            dropped[#dropped + 1] = job_id
            dropped[#dropped + 1] = string.format('%d', j['user_id'])
          end
        end
        redis.call('HDEL', KEYS[1], job_id)
        redis.call('HDEL', KEYS[2], job_id)
        redis.call('DEL', inflight_key)
      end
    end
  end
end
-- cursor_moved: the document's jobs still queued (another connection's) are ordered from there.
local cursor = tonumber(ARGV[5 + n * 2]) or -1
if cursor >= 0 then
  local seen = {}
  for i = 0, n - 1 do
    local k = 3 + i * 5
    local ks, doc = KEYS[k + 4], ARGV[5 + i * 2]
    if not seen[ks] then
      seen[ks] = true
      if redis.call('HEXISTS', ks, 'd:' .. user .. '|' .. doc) == 1 then
        tts_fair_cursor(KEYS[k + 3], ks, user, doc, cursor)
      end
    end
  end
end
return {evicted, dropped}
