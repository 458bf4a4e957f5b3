-- A worker's hand-back: push the result and drop the processing entry (and the job's lease, when
-- the worker passes its lease key: workers that predate leases pass two keys), atomically.
-- A result that does not even contain its job's id (a worker's bug) leaves the job held: the
-- daemon cannot tie that result to the job, so the job must stay where the scanner finds it
-- (its lease lapses, or the visibility timeout passes) rather than wait forever.
-- KEYS: 1 tts:results, 2 tts:processing:{model}, 3 (optional) tts:leases:{model}
-- ARGV: 1 result JSON, 2 job_id
redis.call('LPUSH', KEYS[1], ARGV[1])
if ARGV[2] == '' or not string.find(ARGV[1], ARGV[2], 1, true) then return 0 end
redis.call('ZREM', KEYS[2], ARGV[2])
if KEYS[3] then redis.call('ZREM', KEYS[3], ARGV[2]) end
return 1
