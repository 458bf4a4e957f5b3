-- Give back results claimed by hot consumers that are gone: a dead one (its heartbeat key
-- expired), or ARGV[1] itself when ARGV[2] is '1' (a restarted consumer reclaiming its own).
-- Both the landing list (BLMOVE's) and the claimed items go back to tts:results, at the end that
-- is read next, without a copy (LMOVE of the item's first element: the result as the worker sent
-- it). Moves at most ARGV[3] results per call. KEYS: 1 consumer set, 2 tts:results
-- Returns the number of results moved back.
local own, include_own, budget = ARGV[1], ARGV[2] == '1', tonumber(ARGV[3])
local moved = 0

local function give_back_list(key)
  while moved < budget do
    local v = redis.call('LMOVE', key, KEYS[2], 'RIGHT', 'RIGHT')
    if not v then return end
    moved = moved + 1
  end
end

for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local dead = redis.call('EXISTS', 'tts:hot:alive:' .. id) == 0 and id ~= own
  if dead or (include_own and id == own) then
    give_back_list('tts:hot:landing:' .. id)
    local claimed = 'tts:hot:claimed:' .. id
    if redis.call('TYPE', claimed)['ok'] == 'list' then
      give_back_list(claimed)  -- written by an older version of the daemon
    else
      local seqs = redis.call('SMEMBERS', claimed)
      table.sort(seqs, function(a, b) return tonumber(a) < tonumber(b) end)
      for _, seq in ipairs(seqs) do
        if moved >= budget then break end
        local item = 'tts:hot:item:' .. seq
        if redis.call('EXISTS', item) == 1 then
          redis.call('LTRIM', item, 0, 0)  -- keep the result, drop what claim.lua appended
          redis.call('LMOVE', item, KEYS[2], 'LEFT', 'RIGHT')
          moved = moved + 1
        end
        redis.call('SREM', claimed, seq)
      end
    end
    if dead and redis.call('EXISTS', claimed, 'tts:hot:landing:' .. id) == 0 then
      redis.call('SREM', KEYS[1], id)
    end
  end
end
return moved
