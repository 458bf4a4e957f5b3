-- Give back the results one hot consumer claimed, if it is gone: dead (its heartbeat key expired
-- and it is not ARGV[2]), or ARGV[2] itself when ARGV[3] is '1' (a restarted consumer reclaiming
-- its own). Both the landing list (BLMOVE's) and the claimed items go back to tts:results, at the
-- end that is read next, without a copy (LMOVE of the item's first element: the result as the
-- worker sent it). Moves at most ARGV[4] results per call. The caller read the consumer's claimed
-- set and names the items to give back (KEYS from 6 on, in token order); the set is checked again
-- here, atomically, so an item given back by another daemon meanwhile is skipped.
-- KEYS: 1 tts:hot:consumers, 2 tts:results, 3 tts:hot:alive:{id}, 4 tts:hot:landing:{id},
--       5 tts:hot:claimed:{id}, 5 + i: tts:hot:item:{token i}
-- ARGV: 1 consumer id, 2 own consumer id, 3 include own ('1'|'0'), 4 budget, 4 + i: token i
-- Returns the number of results moved back (-1: the consumer is alive, nothing to do).
local id, own, include_own, budget = ARGV[1], ARGV[2], ARGV[3] == '1', tonumber(ARGV[4])
local moved = 0

local function give_back_list(key)
  while moved < budget do
    local v = redis.call('LMOVE', key, KEYS[2], 'RIGHT', 'RIGHT')
    if not v then return end
    moved = moved + 1
  end
end

local dead = redis.call('EXISTS', KEYS[3]) == 0 and id ~= own
if not (dead or (include_own and id == own)) then return -1 end
give_back_list(KEYS[4])
local claimed = KEYS[5]
if redis.call('TYPE', claimed)['ok'] == 'list' then
  give_back_list(claimed)  -- written by an older version of the daemon
else
  for i = 6, #KEYS do
    if moved >= budget then break end
    local token, item = ARGV[i - 1], KEYS[i]
    if redis.call('SISMEMBER', claimed, token) == 1 then
      if redis.call('EXISTS', item) == 1 then
        redis.call('LTRIM', item, 0, 0)  -- keep the result, drop what claim.lua appended
        redis.call('LMOVE', item, KEYS[2], 'LEFT', 'RIGHT')
        moved = moved + 1
      end
      redis.call('SREM', claimed, token)
    end
  end
end
if dead and redis.call('EXISTS', claimed, KEYS[4]) == 0 then
  redis.call('SREM', KEYS[1], id)
end
return moved
