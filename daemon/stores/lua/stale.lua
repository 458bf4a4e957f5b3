-- The visibility scanner's look (read-only): the jobs of one model that should go back to the
-- queue. A job whose worker renews a lease (tts:leases:{model}, score = the lease's expiry) is
-- stale once the lease lapsed, however long it has run; a job without a lease (a worker that does
-- not renew) once it has been held longer than ARGV[1] seconds, as before leases. requeue.lua
-- checks each again, atomically, before it acts.
-- KEYS: 1 tts:processing:{model}, 2 tts:leases:{model}, 3 tts:jobs
-- ARGV: 1 visibility timeout (s), 2 at most this many of each kind
-- Returns job id, job JSON ("" when gone), for each stale job.
local now = tts_now()
local limit = tonumber(ARGV[2])
local out, seen = {}, {}
local function add(job_id)
  if seen[job_id] then return end
  seen[job_id] = true
  out[#out + 1] = job_id
  out[#out + 1] = redis.call('HGET', KEYS[3], job_id) or ''
end
for _, job_id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)) do
  add(job_id)
end
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]),
                       'LIMIT', 0, limit)
for _, job_id in ipairs(old) do
  if not redis.call('ZSCORE', KEYS[2], job_id) then add(job_id) end
end
return out
