-- Expire one user's holds whose job vanished: a hold still waiting for its job (state q) whose
-- job is no longer in tts:jobs and which is older than ttl_s; a hold waiting for billing (state b)
-- older than billing_ttl_s. A hold settled or released normally never gets here.
-- KEYS: 1 tts:holds:{user}, 2 tts:jobs
-- ARGV: 1 ttl_s, 2 billing_ttl_s
-- Returns {holds reaped, characters reaped, holds left, oldest hold's age in seconds (0: none)}
local ttl, billing_ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = tts_now()
local flat = redis.call('HGETALL', KEYS[1])
local reaped, chars, left, oldest = 0, 0, 0, 0
for i = 1, #flat, 2 do
  local field, value = flat[i], flat[i + 1]
  local usage_type, amount, since, state = string.match(value, '^([^|]+)|(%d+)|([%d.]+)|(%a)$')
  if usage_type then
    local age = now - tonumber(since)
    local expired
    if state == 'b' then
      expired = age > billing_ttl
    else
      expired = age > ttl and redis.call('HEXISTS', KEYS[2], field) == 0
    end
    if expired then
      tts_hold_release(KEYS[1], field)
      reaped = reaped + 1
      chars = chars + tonumber(amount)
    else
      left = left + 1
      if age > oldest then oldest = age end
    end
  end
end
return {reaped, chars, left, tostring(oldest)}
