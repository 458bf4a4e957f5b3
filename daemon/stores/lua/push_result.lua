-- A worker's hand-back: push the result and drop the processing entry, atomically.
-- KEYS: 1 tts:results, 2 tts:processing:{model}; ARGV: 1 result JSON, 2 job_id
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
