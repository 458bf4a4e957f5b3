-- Release holds of one user whose jobs ended without a bill (error, skipped, evicted), or mark
-- those whose audio is done as waiting for billing (state b, since now). Mode "duplicate" (a
-- result the hot path found to be a duplicate) releases a hold only while it still waits for its
-- job (state q): that job's in-flight key moved on, it will never be billed.
-- KEYS: 1 tts:holds:{user}
-- ARGV: 1 mode (release | billing | duplicate), then job ids
-- Returns the number of holds changed.
local mode, changed = ARGV[1], 0
for i = 2, #ARGV do
  if mode == 'release' then
    if tts_hold_release(KEYS[1], ARGV[i]) >= 0 then changed = changed + 1 end
  elseif mode == 'duplicate' then
    local h = redis.call('HGET', KEYS[1], ARGV[i])
    if h and string.sub(h, -2) == '|q' then
      tts_hold_release(KEYS[1], ARGV[i])
      changed = changed + 1
    end
  else
    local h = redis.call('HGET', KEYS[1], ARGV[i])
    if h then
      local usage_type, amount = string.match(h, '^([^|]+)|(%d+)|')
      redis.call('HSET', KEYS[1], ARGV[i], usage_type .. '|' .. amount .. '|'
                 .. string.format('%.3f', tts_now()) .. '|b')
      changed = changed + 1
    end
  end
end
return changed
