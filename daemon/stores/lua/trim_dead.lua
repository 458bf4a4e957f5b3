-- Bound one dead-letter list (docs/configuration.md, dead_letters.*): at most ARGV[2] entries,
-- none older than ARGV[1] (unix seconds). Entries are LPUSHed, so the oldest are at the tail; an
-- entry's age is its "at" (results, billing) or its "enqueued_at" (jobs). At most ARGV[3]
-- entries are dropped by age per call.
-- KEYS: 1 the dead-letter list. Returns the list's length afterwards.
local cutoff, cap, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('LTRIM', KEYS[1], 0, cap - 1)
for _ = 1, budget do
  local last = redis.call('LINDEX', KEYS[1], -1)
  if not last then break end
  local ok, e = pcall(cjson.decode, last)
  local at = ok and type(e) == 'table' and tonumber(e['at'] or e['enqueued_at'])
  if not at or at >= cutoff then break end
  redis.call('RPOP', KEYS[1])
end
return redis.call('LLEN', KEYS[1])
