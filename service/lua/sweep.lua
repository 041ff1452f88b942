-- Release reservations whose deadline passed (status R -> X, reserved -= amount).
-- KEYS[1] campaign hash, KEYS[2] pending zset, KEYS[3..] the keys of the due members
-- ARGV[1] now ms, ARGV[2..] the pending members of KEYS[3..]: "b-<batch>" (20 hex digits) for a batch's hash of records
--   (field -> record; its settled records are skipped), else a decision id whose record is its own key
-- Returns the number released. Decision record: see reserve.lua (status first, then reserved cents); a
-- hash record (fields s, r) of an earlier release is still released until it expires.
local campaign, pending = KEYS[1], KEYS[2]
local now = tonumber(ARGV[1])
local released, amount = 0, 0

local function release(status, reserved)
  if status == 'R' then
    amount = amount + tonumber(reserved)
    released = released + 1
  end
end

for i = 3, #KEYS do
  local member, key = ARGV[i - 1], KEYS[i]
  local deadline = redis.call('ZSCORE', pending, member)
  if deadline and tonumber(deadline) <= now then
    redis.call('ZREM', pending, member)
    if #member == 22 and string.match(member, '^b%-%x+$') then -- "b-" and 20 hex digits
      local records = redis.call('HGETALL', key)
      for j = 1, #records, 2 do
        local value = records[j + 1]
        local status, reserved = string.match(value, '^(%u)\t(%d+)\t')
        if status == 'R' then redis.call('HSET', key, records[j], 'X' .. string.sub(value, 2)) end
        release(status, reserved)
      end
    else
      local value = redis.pcall('GET', key)
      if type(value) == 'table' and value.err then -- a hash record of an earlier release (fields s, r)
        local fields = redis.call('HMGET', key, 's', 'r')
        if fields[1] == 'R' then redis.call('HSET', key, 's', 'X') end
        release(fields[1], fields[2])
      elseif value then
        local status, reserved = string.match(value, '^(%u)\t(%d+)\t')
        if status == 'R' then redis.call('SET', key, 'X' .. string.sub(value, 2), 'KEEPTTL') end
        release(status, reserved)
      end
    end
  end
end
if amount > 0 and redis.call('EXISTS', campaign) == 1 then
  redis.call('HINCRBY', campaign, 'reserved', string.format('%d', -amount))
end
return released
