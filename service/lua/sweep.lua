-- Release reservations whose deadline passed (status R -> X, reserved -= amount).
-- KEYS[1] campaign hash, KEYS[2] pending zset, KEYS[3..] decision keys
-- ARGV[1] now ms, ARGV[2..] the decision ids of KEYS[3..]
-- Returns the number released. Decision record: see reserve.lua (status first, then reserved cents); a
-- hash record (fields s, r) of an earlier release is still released until it expires.
local campaign, pending = KEYS[1], KEYS[2]
local now = tonumber(ARGV[1])
local released, amount = 0, 0
for i = 3, #KEYS do
  local decision_id = ARGV[i - 1]
  local deadline = redis.call('ZSCORE', pending, decision_id)
  if deadline and tonumber(deadline) <= now then
    redis.call('ZREM', pending, decision_id)
    local value = redis.pcall('GET', KEYS[i])
    local status, reserved
    if type(value) == 'table' and value.err then -- a hash record of an earlier release (fields s, r)
      local fields = redis.call('HMGET', KEYS[i], 's', 'r')
      status, reserved = fields[1], fields[2]
      if status == 'R' then redis.call('HSET', KEYS[i], 's', 'X') end
    elseif value then
      status, reserved = string.match(value, '^(%u)\t(%d+)\t')
      if status == 'R' then redis.call('SET', KEYS[i], 'X' .. string.sub(value, 2), 'KEEPTTL') end
    end
    if status == 'R' then
      amount = amount + tonumber(reserved)
      released = released + 1
    end
  end
end
if amount > 0 and redis.call('EXISTS', campaign) == 1 then
  redis.call('HINCRBY', campaign, 'reserved', string.format('%d', -amount))
end
return released
