-- Settle a batch of outcomes atomically: the realized cost replaces the reservation
-- (reserved -= reserved amount, spent += cost). All or nothing: a cost above its reservation refuses all.
-- KEYS[1] campaign hash, KEYS[2] pending zset, KEYS[3..] decision keys (one per outcome)
-- ARGV per outcome: cost cents, reward (text)
-- Returns {'missing'} unknown campaign | {'too_high', index, reserved} | {remaining, code, user, ...}
--   with code 'A' accepted, 'D' duplicate, 'U' unknown (or expired record).
-- Decision record (reserve.lua): status, reserved, action, probability, at, version, lambda, reward, cost,
--   length of the request id, request id, user id; tab-separated.
local campaign, pending = KEYS[1], KEYS[2]
local RECORD = '^(%u)\t(%d+)\t([^\t]*\t[^\t]*\t[^\t]*\t[^\t]*\t[^\t]*)\t[^\t]*\t[^\t]*\t(%d+)\t()'
local function int(x) return string.format('%d', x) end

-- status, reserved cents, user id, and the record string (nil for a hash: records written by releases
-- before the one-string record are hashes with fields s, r, u; read and settled as such until they expire)
local function read(key)
  local value = redis.pcall('GET', key)
  if type(value) == 'table' and value.err then
    local fields = redis.call('HMGET', key, 's', 'r', 'u')
    return fields[1], fields[2], fields[3], nil
  end
  if not value then return nil end
  local status, reserved, _, request_length, tail = string.match(value, RECORD)
  if not status then return nil end
  return status, reserved, string.sub(value, tail + tonumber(request_length) + 1), value
end

local function mark_settled(key, value, reward, cost)
  if value == nil then
    redis.call('HSET', key, 's', 'S', 'rw', reward, 'c', cost)
    return
  end
  local _, reserved, middle, request_length, tail = string.match(value, RECORD)
  redis.call('SET', key, table.concat({'S', reserved, middle, reward, cost, request_length, string.sub(value, tail)},
    '\t'), 'KEEPTTL')
end

if redis.call('EXISTS', campaign) == 0 then return {'missing'} end
local n = #KEYS - 2
for i = 1, n do
  local status, reserved = read(KEYS[2 + i])
  if status and status ~= 'S' and tonumber(ARGV[2 * i - 1]) > tonumber(reserved) then
    return {'too_high', i - 1, reserved}
  end
end
local out = {0}
for i = 1, n do
  local key = KEYS[2 + i]
  local status, reserved, user, value = read(key) -- read again: the batch may name a decision twice
  local cost = tonumber(ARGV[2 * i - 1])
  if not status then
    out[#out + 1] = 'U'
    out[#out + 1] = ''
  elseif status == 'S' then
    out[#out + 1] = 'D'
    out[#out + 1] = ''
  else
    if status == 'R' then
      redis.call('HINCRBY', campaign, 'reserved', int(-tonumber(reserved)))
      redis.call('HINCRBY', campaign, 'spent', int(cost))
      redis.call('ZREM', pending, string.match(key, '[^:]+$'))
    else -- 'X': the reservation expired and was released; charge only what still fits the budget
      local ledger = redis.call('HMGET', campaign, 'budget', 'spent', 'reserved')
      local fits = math.max(0, math.min(cost, tonumber(ledger[1]) - tonumber(ledger[2]) - tonumber(ledger[3])))
      redis.call('HINCRBY', campaign, 'spent', int(fits))
      redis.call('HINCRBY', campaign, 'overrun', int(cost - fits))
    end
    mark_settled(key, value, ARGV[2 * i], ARGV[2 * i - 1])
    out[#out + 1] = 'A'
    out[#out + 1] = user
  end
end
local ledger = redis.call('HMGET', campaign, 'budget', 'spent', 'reserved')
out[1] = tonumber(ledger[1]) - tonumber(ledger[2]) - tonumber(ledger[3])
return out
