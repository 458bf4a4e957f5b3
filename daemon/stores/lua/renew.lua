-- A worker's renewal (docs/workers.md, "Leases"): extend the lease on each job it holds, and
-- announce itself in the worker registry. A job no longer held (requeued after its lease lapsed,
-- or finished) gets no lease; its id is returned so that the worker knows.
-- KEYS: 1 tts:workers, then per model: tts:processing:{model}, tts:leases:{model}
-- ARGV: 1 worker id, 2 registry entry (JSON object), 3 lease (s),
--       then per job: its model's index (1-based, in KEYS' pairs), job id
-- Returns the ids of jobs not held.
local now = tts_now()
local lease_s = tonumber(ARGV[3])
local lost = {}
for i = 4, #ARGV, 2 do
  local m, job_id = tonumber(ARGV[i]), ARGV[i + 1]
  local processing, leases = KEYS[2 * m], KEYS[2 * m + 1]
  if redis.call('ZSCORE', processing, job_id) then
    redis.call('ZADD', leases, now + lease_s, job_id)
  else
    lost[#lost + 1] = job_id
  end
end
local ok, entry = pcall(cjson.decode, ARGV[2])
if not ok or type(entry) ~= 'table' then entry = {} end
entry['worker_id'] = ARGV[1]
entry['lease_s'] = lease_s
entry['last_renewal'] = now
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(entry))
return lost
