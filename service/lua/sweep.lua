-- Release reservations whose deadline passed (status R -> X, reserved -= amount).
-- KEYS[1] campaign hash, KEYS[2] pending zset, KEYS[3..] decision keys
-- ARGV[1] now ms, ARGV[2..] the decision ids of KEYS[3..]
-- Returns the number released.
local campaign, pending = KEYS[1], KEYS[2]
local now = tonumber(ARGV[1])
local released, amount = 0, 0
for i = 3, #KEYS do
  local decision_id = ARGV[i - 1]
  local deadline = redis.call('ZSCORE', pending, decision_id)
  if deadline and tonumber(deadline) <= now then
    redis.call('ZREM', pending, decision_id)
    local rec = redis.call('HMGET', KEYS[i], 's', 'r')
    if rec[1] == 'R' then
      redis.call('HSET', KEYS[i], 's', 'X')
      amount = amount + tonumber(rec[2])
      released = released + 1
    end
  end
end
if amount > 0 and redis.call('EXISTS', campaign) == 1 then
  redis.call('HINCRBY', campaign, 'reserved', string.format('%d', -amount))
end
return released
