-- Put audio from the durable store back into the Redis cache (the read path's store hit), unless
-- the cache has it already. The key holds the audio bytes as they are and a JSON note (loc "b:1":
-- raw bytes in element 1, see RedisStore.get_audio), with the cache's TTL.
-- KEYS: 1 tts:audio:{hash}
-- ARGV: 1 ttl_s, 2 audio bytes, 3 note JSON
-- Returns 1 if promoted, 0 if the cache had it.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
