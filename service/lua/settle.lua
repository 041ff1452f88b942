-- Settle a batch of outcomes atomically: the realized cost replaces the reservation
-- (reserved -= reserved amount, spent += cost). All or nothing: a cost above its reservation refuses all.
-- KEYS[1] campaign hash, KEYS[2] pending zset, KEYS[3..] the key of each outcome's decision record
-- ARGV per outcome: cost cents, reward (text), field: the record's field in its batch's hash, or "" for
--   a record of its own (a string key, or a hash of an earlier release)
-- Returns {'missing'} unknown campaign | {'too_high', index, reserved} | {remaining, code, user, ...}
--   with code 'A' accepted, 'D' duplicate, 'U' unknown (or expired record).
-- Decision record (reserve.lua): status, reserved, action, probability, at, version, lambda, reward, cost,
--   length of the request id, request id, user id; tab-separated.
local campaign, pending = KEYS[1], KEYS[2]
local RECORD = '^(%u)\t(%d+)\t([^\t]*\t[^\t]*\t[^\t]*\t[^\t]*\t[^\t]*)\t[^\t]*\t[^\t]*\t(%d+)\t()'
local function int(x) return string.format('%d', x) end

-- status, reserved cents, user id, and the record string (nil for a hash: records written by releases
-- before the one-string record are hashes with fields s, r, u; read and settled as such until they expire)
local function read(key, field)
  local value
  if field ~= '' then
    value = redis.call('HGET', key, field)
  else
    value = redis.pcall('GET', key)
    if type(value) == 'table' and value.err then
      local fields = redis.call('HMGET', key, 's', 'r', 'u')
      return fields[1], fields[2], fields[3], nil
    end
  end
  if not value then return nil end
  local status, reserved, _, request_length, tail = string.match(value, RECORD)
  if not status then return nil end
  return status, reserved, string.sub(value, tail + tonumber(request_length) + 1), value
end

local function mark_settled(key, field, value, reward, cost)
  if value == nil then
    redis.call('HSET', key, 's', 'S', 'rw', reward, 'c', cost)
    return
  end
  local _, reserved, middle, request_length, tail = string.match(value, RECORD)
  local settled = table.concat({'S', reserved, middle, reward, cost, request_length, string.sub(value, tail)}, '\t')
  if field ~= '' then
    redis.call('HSET', key, field, settled) -- the batch's hash keeps its expiry
  else
    redis.call('SET', key, settled, 'KEEPTTL')
  end
end

if redis.call('EXISTS', campaign) == 0 then return {'missing'} end
local n = #KEYS - 2
for i = 1, n do
  local status, reserved = read(KEYS[2 + i], ARGV[3 * i])
  if status and status ~= 'S' and tonumber(ARGV[3 * i - 2]) > tonumber(reserved) then
    return {'too_high', i - 1, reserved}
  end
end
local out = {0}
for i = 1, n do
  local key, field = KEYS[2 + i], ARGV[3 * i]
  local status, reserved, user, value = read(key, field) -- read again: the batch may name a decision twice
  local cost = tonumber(ARGV[3 * i - 2])
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
      if field == '' then redis.call('ZREM', pending, string.match(key, '[^:]+$')) end -- a batch's stays
    else -- 'X': the reservation expired and was released; charge only what still fits the budget
      local ledger = redis.call('HMGET', campaign, 'budget', 'spent', 'reserved')
      local fits = math.max(0, math.min(cost, tonumber(ledger[1]) - tonumber(ledger[2]) - tonumber(ledger[3])))
      redis.call('HINCRBY', campaign, 'spent', int(fits))
      redis.call('HINCRBY', campaign, 'overrun', int(cost - fits))
    end
    mark_settled(key, field, value, ARGV[3 * i - 1], ARGV[3 * i - 2])
    out[#out + 1] = 'A'
    out[#out + 1] = user
  end
end
local ledger = redis.call('HMGET', campaign, 'budget', 'spent', 'reserved')
out[1] = tonumber(ledger[1]) - tonumber(ledger[2]) - tonumber(ledger[3])
return out
