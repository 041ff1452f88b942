-- Release the reservations of batches whose deadline passed (status R -> X, reserved -= amount).
-- KEYS[1] campaign hash, KEYS[2] pending zset, KEYS[3..] the record hashes of the due batches
-- ARGV[1] now ms, ARGV[2..] the batch ids of KEYS[3..] (their members in the pending zset)
-- Returns the number released. Decision record: see reserve.lua (status first, then reserved cents).
local campaign, pending = KEYS[1], KEYS[2]
local now = tonumber(ARGV[1])
local released, amount = 0, 0
for i = 3, #KEYS do
  local batch, key = ARGV[i - 1], KEYS[i]
  local deadline = redis.call('ZSCORE', pending, batch)
  if deadline and tonumber(deadline) <= now then
    redis.call('ZREM', pending, batch)
    local records = redis.call('HGETALL', key)
    for j = 1, #records, 2 do
      local value = records[j + 1]
      local status, reserved = string.match(value, '^(%u)\t(%d+)\t')
      if status == 'R' then
        redis.call('HSET', key, records[j], 'X' .. string.sub(value, 2))
        amount = amount + tonumber(reserved)
        released = released + 1
      end
    end
  end
end
if amount > 0 and redis.call('EXISTS', campaign) == 1 then
  redis.call('HINCRBY', campaign, 'reserved', string.format('%d', -amount))
  -- an expired coupon was not redeemed: it counts as settled at no cost (pace.lua's ratio)
  redis.call('HINCRBY', campaign, 'settled_reserved', string.format('%d', amount))
end
return released
