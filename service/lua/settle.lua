-- Settle a batch of outcomes atomically: the realized cost replaces the reservation
-- (reserved -= reserved amount, spent += cost). All or nothing: a cost above its reservation refuses all.
-- KEYS[1] campaign hash, KEYS[2..] the record hashes of the batches the outcomes name
-- ARGV per outcome: cost cents, reward (text), index of its record hash in KEYS, its field there
-- Returns {'missing'} unknown campaign | {'too_high', index, reserved} | {remaining, code, user, ...}
--   with code 'A' accepted, 'D' duplicate, 'U' unknown (or expired record).
-- Decision record: see reserve.lua.
local campaign = KEYS[1]
local RECORD = '^(%u)\t(%d+)\t([^\t]*\t[^\t]*\t[^\t]*\t[^\t]*\t[^\t]*)\t[^\t]*\t[^\t]*\t(%d+)\t()'
local function int(x) return string.format('%d', x) end

if redis.call('EXISTS', campaign) == 0 then return {'missing'} end
local n = #ARGV / 4
local function record(i)
  local value = redis.call('HGET', KEYS[tonumber(ARGV[4 * i - 1])], ARGV[4 * i])
  if not value then return nil end
  local status, reserved, middle, request_length, tail = string.match(value, RECORD)
  return status, reserved, middle, request_length, tail, value
end
for i = 1, n do
  local status, reserved = record(i)
  if status and status ~= 'S' and tonumber(ARGV[4 * i - 3]) > tonumber(reserved) then
    return {'too_high', i - 1, reserved}
  end
end
local out = {0}
for i = 1, n do
  -- read again: the batch may name a decision twice
  local status, reserved, middle, request_length, tail, value = record(i)
  local cost = tonumber(ARGV[4 * i - 3])
  if not status then
    out[#out + 1] = 'U'
    out[#out + 1] = ''
  elseif status == 'S' then
    out[#out + 1] = 'D'
    out[#out + 1] = ''
  else
    if status == 'R' then
      redis.call('HINCRBY', campaign, 'reserved', int(-tonumber(reserved)))
      redis.call('HINCRBY', campaign, 'settled_reserved', reserved)
      redis.call('HINCRBY', campaign, 'spent', int(cost))
    else -- 'X': the reservation expired and was released (and counted as settled at no cost by the
      -- sweep); charge only what still fits the budget
      local ledger = redis.call('HMGET', campaign, 'budget', 'spent', 'reserved')
      local fits = math.max(0, math.min(cost, tonumber(ledger[1]) - tonumber(ledger[2]) - tonumber(ledger[3])))
      redis.call('HINCRBY', campaign, 'spent', int(fits))
      redis.call('HINCRBY', campaign, 'overrun', int(cost - fits))
    end
    local rest = string.sub(value, tail)
    redis.call('HSET', KEYS[tonumber(ARGV[4 * i - 1])], ARGV[4 * i],
      table.concat({'S', reserved, middle, ARGV[4 * i - 2], ARGV[4 * i - 3], request_length, rest}, '\t'))
    out[#out + 1] = 'A'
    out[#out + 1] = string.sub(rest, tonumber(request_length) + 2)
  end
end
local ledger = redis.call('HMGET', campaign, 'budget', 'spent', 'reserved')
out[1] = tonumber(ledger[1]) - tonumber(ledger[2]) - tonumber(ledger[3])
return out
