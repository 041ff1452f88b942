-- Settle a batch of outcomes atomically: the realized cost replaces the reservation
-- (reserved -= reserved amount, spent += cost). All or nothing: a cost above its reservation refuses all.
-- KEYS[1] campaign hash, KEYS[2] pending zset, KEYS[3..] decision keys (one per outcome)
-- ARGV per outcome: cost cents, reward (text)
-- Returns {'missing'} unknown campaign | {'too_high', index, reserved} | {remaining, code, user, ...}
--   with code 'A' accepted, 'D' duplicate, 'U' unknown (or expired record).
local campaign, pending = KEYS[1], KEYS[2]
local function int(x) return string.format('%d', x) end
if redis.call('EXISTS', campaign) == 0 then return {'missing'} end
local n = #KEYS - 2
for i = 1, n do
  local rec = redis.call('HMGET', KEYS[2 + i], 's', 'r')
  if rec[1] and rec[1] ~= 'S' and tonumber(ARGV[2 * i - 1]) > tonumber(rec[2]) then
    return {'too_high', i - 1, rec[2]}
  end
end
local out = {0}
for i = 1, n do
  local key = KEYS[2 + i]
  local rec = redis.call('HMGET', key, 's', 'r', 'u')
  local cost = tonumber(ARGV[2 * i - 1])
  if not rec[1] then
    out[#out + 1] = 'U'
    out[#out + 1] = ''
  elseif rec[1] == 'S' then
    out[#out + 1] = 'D'
    out[#out + 1] = ''
  else
    if rec[1] == 'R' then
      redis.call('HINCRBY', campaign, 'reserved', int(-tonumber(rec[2])))
      redis.call('HINCRBY', campaign, 'spent', int(cost))
      redis.call('ZREM', pending, string.match(key, '[^:]+$'))
    else -- 'X': the reservation expired and was released; charge only what still fits the budget
      local ledger = redis.call('HMGET', campaign, 'budget', 'spent', 'reserved')
      local fits = math.max(0, math.min(cost, tonumber(ledger[1]) - tonumber(ledger[2]) - tonumber(ledger[3])))
      redis.call('HINCRBY', campaign, 'spent', int(fits))
      redis.call('HINCRBY', campaign, 'overrun', int(cost - fits))
    end
    redis.call('HSET', key, 's', 'S', 'rw', ARGV[2 * i], 'c', ARGV[2 * i - 1])
    out[#out + 1] = 'A'
    out[#out + 1] = rec[3]
  end
end
local ledger = redis.call('HMGET', campaign, 'budget', 'spent', 'reserved')
out[1] = tonumber(ledger[1]) - tonumber(ledger[2]) - tonumber(ledger[3])
return out
