-- Give back results claimed by hot consumers that are gone: a dead one (its heartbeat key
-- expired), or ARGV[1] itself when ARGV[2] is '1' (a restarted consumer reclaiming its own).
-- Moves at most ARGV[3] results per call. KEYS: 1 consumer set, 2 tts:results
-- Returns the number of results moved back.
local own, include_own, budget = ARGV[1], ARGV[2] == '1', tonumber(ARGV[3])
local moved = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local dead = redis.call('EXISTS', 'tts:hot:alive:' .. id) == 0 and id ~= own
  if dead or (include_own and id == own) then
    local claimed = 'tts:hot:claimed:' .. id
    while moved < budget do
      local v = redis.call('RPOP', claimed)
      if not v then break end
      redis.call('RPUSH', KEYS[2], v)
      moved = moved + 1
    end
    if dead and redis.call('LLEN', claimed) == 0 then
      redis.call('SREM', KEYS[1], id)
    end
  end
end
return moved
