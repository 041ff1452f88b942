-- Create/replace or patch a campaign's settings; the ledger (spent, reserved) is never touched, so live
-- reservations survive and the reservation script keeps checking against the new budget.
-- KEYS[1] campaign hash, KEYS[2] the campaign's settings as one JSON string (what a decision reads of its
--   campaign, with its users' contexts in one MGET), KEYS[3] the pacing key (pace.lua)
-- ARGV[1] '1' replace (create if missing) | '0' patch (nil if missing), ARGV[2] campaign id,
-- ARGV[3] JSON object: setting -> its text ('' = back to its default), ARGV[4] the optional settings'
--   names, comma-separated: a replace resets every one it does not give
-- A replace restarts pacing from the campaign's lambda; a new admin lambda becomes pacing's lambda.
-- Returns {the campaign hash (flat), the pacing key's value or false}.
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then
  if ARGV[1] ~= '1' then return false end
  redis.call('HSET', key, 'id', ARGV[2], 'budget', 0, 'spent', 0, 'reserved', 0, 'outstanding_predicted', 0,
    'coupons', '{}', 'model_version', '', 'decisions', 0, 'overrun', 0)
end
local given = cjson.decode(ARGV[3])
local names = {'budget', 'coupons'}
for name in string.gmatch(ARGV[4], '[^,]+') do
  names[#names + 1] = name
  if ARGV[1] == '1' then redis.call('HSET', key, name, '') end
end
for name, value in pairs(given) do redis.call('HSET', key, name, value) end
local paced = ARGV[1] ~= '1' and given['admin_lambda'] and given['admin_lambda'] ~= '' and redis.call('GET', KEYS[3])
if paced then
  -- a new lambda (an operator's, or the learning loop's recalibration) is where pacing goes on from, with
  -- the allowance and cost ratios it measured; the error carried from the old lambda is dropped
  local state = cjson.decode(paced)
  state.lambda = tonumber(given['admin_lambda'])
  redis.call('SET', KEYS[3], cjson.encode(state))
  redis.call('HSET', key, 'pace_carry', 0)
elseif ARGV[1] == '1' or given['admin_lambda'] ~= nil then
  redis.call('HSET', key, 'paced_at_ms', '', 'pace_plan', 0, 'pace_actual', 0, 'pace_carry', 0)
  redis.call('DEL', KEYS[3])
end
local values = redis.call('HMGET', key, unpack(names))
local settings = {}
for i, name in ipairs(names) do settings[name] = values[i] end
redis.call('SET', KEYS[2], cjson.encode(settings))
return {redis.call('HGETALL', key), redis.call('GET', KEYS[3])}
