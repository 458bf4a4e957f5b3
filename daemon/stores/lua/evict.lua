-- A connection stops waiting for some of its blocks, atomically.
--   mode "queued" (cursor_moved): only blocks whose job is still queued (not pulled by a worker)
--     are evicted; a block a worker holds keeps its waiter and gets its terminal status.
--   mode "all" (the connection closed): every waiter of the connection goes.
-- A queued job nobody waits for any more leaves the queue; a job another waiter (another
-- connection, another user) still wants stays. Jobs a worker holds are never touched.
-- KEYS: per block, tts:fair:{model} and tts:fair:state:{model} (2 keys a block)
-- ARGV: 1 user_id, 2 conn_id, 3 mode, 4 count, then per block: document_id, block_idx,
--       variant_hash, model; then the new reading position of the blocks' document (cursor_moved)
--       or -1
-- Returns the 1-based positions (in the block list) of the evicted blocks.
local user, conn, mode, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local evicted = {}
for i = 0, n - 1 do
  local base = 5 + i * 4
  local doc, idx, hash, model = ARGV[base], ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  local inflight_key = 'tts:inflight:' .. hash
  local waiters = 'tts:waiters:' .. hash
  local queue = 'tts:queue:' .. model
  local job_id = redis.call('GET', inflight_key)
  local queued = job_id and redis.call('ZSCORE', queue, job_id)
  if mode == 'all' or queued then
    if redis.call('SREM', waiters, tts_waiter(user, idx, conn, doc)) == 1 then
      evicted[#evicted + 1] = i + 1
      if queued and redis.call('SCARD', waiters) == 0 then
        redis.call('ZREM', queue, job_id)
        local job = redis.call('HGET', 'tts:jobs', job_id)
        if job then tts_fair_forget(KEYS[i * 2 + 1], KEYS[i * 2 + 2], job) end
        redis.call('HDEL', 'tts:jobs', job_id)
        redis.call('HDEL', 'tts:retries', job_id)
        redis.call('DEL', inflight_key)
      end
    end
  end
end
-- cursor_moved: the document's jobs still queued (another connection's) are ordered from there.
local cursor = tonumber(ARGV[5 + n * 4]) or -1
if cursor >= 0 then
  local seen = {}
  for i = 0, n - 1 do
    local ks, doc = KEYS[i * 2 + 2], ARGV[5 + i * 4]
    if not seen[ks] then
      seen[ks] = true
      if redis.call('HEXISTS', ks, 'd:' .. user .. '|' .. doc) == 1 then
        tts_fair_cursor(KEYS[i * 2 + 1], ks, user, doc, cursor)
      end
    end
  end
end
return evicted
