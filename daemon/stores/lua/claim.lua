-- The hot consumer's non-blocking drain: move up to ARGV[1] results into its claimed list.
-- KEYS: 1 tts:results, 2 the consumer's claimed list
local out = {}
for _ = 1, tonumber(ARGV[1]) do
  local v = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not v then break end
  out[#out + 1] = v
end
return out
