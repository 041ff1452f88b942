-- Release the reservations of batches whose deadline passed (status R -> X, reserved -= amount): a coupon
-- without an outcome by then was not redeemed, so it counts as issued at no cost (settle.lua), and a coupon
-- that took a unit of stock returns it.
-- KEYS[1] campaign hash, KEYS[2] pending zset, KEYS[3..] the record hashes of the due batches
-- ARGV[1] now ms ('': the store's clock, Redis TIME, which reserve.lua's deadlines also read),
--   ARGV[2..] the batch ids of KEYS[3..] (their members in the pending zset)
-- Returns the number released. Decision record: see reserve.lua.
local campaign, pending = KEYS[1], KEYS[2]
local now = tonumber(ARGV[1])
if ARGV[1] == '' then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
local released, amount, variance, face = 0, 0, 0, 0
local issued = {} -- action -> predicted cost of its released coupons
local returned = {} -- coupon -> units of stock its released coupons return
local RECORD = '^(%u)\t(%d+)\t(%d+)\t([^\t]*)\t(%d+)\t(%d+)([^\t]*)\t'
local PART = '(%d+),%d+,%d+,[^,]*,(%d+),(%d)'
for i = 3, #KEYS do
  local batch, key = ARGV[i - 1], KEYS[i]
  local deadline = redis.call('ZSCORE', pending, batch)
  if deadline and tonumber(deadline) <= now then
    redis.call('ZREM', pending, batch)
    local records = redis.call('HGETALL', key)
    for j = 1, #records, 2 do
      local value = records[j + 1]
      local status, reserved, cost, var, predicted, action, parts = string.match(value, RECORD)
      if status == 'R' then
        redis.call('HSET', key, records[j], 'X' .. string.sub(value, 2))
        amount = amount + tonumber(reserved)
        variance = variance + tonumber(var)
        if parts ~= '' then -- a catalog campaign's record: per coupon
          for coupon, coupon_predicted, took in string.gmatch(parts, PART) do
            issued[coupon] = (issued[coupon] or 0) + tonumber(coupon_predicted)
            if took == '1' then returned[coupon] = (returned[coupon] or 0) + 1 end
          end
          face = face + tonumber(cost)
        elseif action ~= '0' then
          issued[action] = (issued[action] or 0) + tonumber(predicted)
          face = face + tonumber(cost)
        end
        released = released + 1
      end
    end
  end
end
if released > 0 and redis.call('EXISTS', campaign) == 1 then
  redis.call('HINCRBY', campaign, 'reserved', string.format('%d', -amount))
  if variance > 0 then redis.call('HINCRBYFLOAT', campaign, 'outstanding_var', -variance) end
  if face > 0 then redis.call('HINCRBY', campaign, 'outstanding_face', string.format('%d', -face)) end
  for action, predicted in pairs(issued) do
    redis.call('HINCRBY', campaign, 'issued:' .. action, string.format('%d', predicted))
    redis.call('HINCRBY', campaign, 'outstanding_predicted', string.format('%d', -predicted))
  end
  for coupon, units in pairs(returned) do redis.call('HINCRBY', campaign, 'used:' .. coupon, -units) end
end
return released
