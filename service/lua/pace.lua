-- One step of online pacing, once per interval, or sooner once a share of the plan's decisions
-- (expected_decisions) or of the budget has gone since the last step, however many replicas call it (the
-- script is atomic: of replicas asking together, the first steps and the rest find nothing due). It keeps,
-- in the campaign's pacing key (JSON), what decisions read with the settings:
--   lambda     dual descent toward the spend plan: lambda <- clip(lambda + step * (excess spend since the
--              last step, as a fraction of the budget), 0, lambda max), each change bounded by max step.
--              The part of a step the bound held back is carried into the next (pace_carry, a fraction of
--              the budget), so a large error is corrected over several steps instead of lost; at 0 or
--              lambda max, what pushes beyond the bound is dropped.
--   allowance  what each further decision may spend (cents) so that the spend meets the budget at the
--              plan's end: budget left over the decisions the plan still expects (the traffic plan's
--              remainder, or the decision rate so far times the time left); null before a rate is known.
--   ratios     per action, realised / predicted cost over settled coupons (`prior_coupons` of each action
--              counted as predicted right): how far the model's expected costs are off.
-- Spend is realised spend plus the expected cost of outstanding reservations: their predicted costs (the
-- model's expected costs; a coupon's cost when the model has none) times the campaign's realised /
-- predicted ratio over settled coupons (a prior of `prior` cents at ratio 1 until outcomes arrive). The
-- plan is even over the traffic (decisions / expected_decisions) when the campaign gives one, else over its
-- horizon (starts_ms .. ends_ms).
-- KEYS[1] campaign hash, KEYS[2] the pacing key (JSON, read by decisions with the settings)
-- ARGV[1] now ms ('': the store's clock, Redis TIME), [2] interval ms, [3] the lambda pacing starts from, [4] step, [5] max step,
--   [6] lambda max, [7] prior (cents), [8] prior coupons per action, [9] the share of the plan's decisions or
--   of the budget after which a step is due before its interval (0: the interval alone)
-- Returns {the pacing JSON, plan cents, spend cents, stepped (1 | 0)}, or {} for an unknown campaign.
local c = redis.call('HMGET', KEYS[1], 'budget', 'spent', 'reserved', 'outstanding_predicted', 'decisions',
  'starts_ms', 'ends_ms', 'expected_decisions', 'paced_at_ms', 'pace_plan', 'pace_actual', 'reservation_mode',
  'pace_carry', 'coupons', 'pace_decisions')
if not c[1] then return {} end
local now, interval = tonumber(ARGV[1]), tonumber(ARGV[2])
if ARGV[1] == '' then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
local budget, spent, outstanding = tonumber(c[1]), tonumber(c[2]), tonumber(c[4]) or 0
local decisions = tonumber(c[5])
local fraction, left = 0, nil -- share of the plan gone; decisions the plan still expects
if c[8] ~= '' then
  fraction = decisions / tonumber(c[8])
  left = tonumber(c[8]) - decisions
elseif c[7] ~= '' then
  local starts, ends = tonumber(c[6]), tonumber(c[7])
  fraction = (now - starts) / math.max(1, ends - starts)
  if decisions > 0 and now > starts then left = decisions / (now - starts) * (ends - now) end
end
fraction = math.max(0, math.min(1, fraction))
local ratios, realised_all, predicted_all = {}, 0, 0
local prior_coupons = tonumber(ARGV[8])
for action, price in pairs(cjson.decode(c[14])) do
  local stats = redis.call('HMGET', KEYS[1], 'issued:' .. action, 'realised:' .. action)
  local issued, realised = tonumber(stats[1]) or 0, tonumber(stats[2]) or 0
  local predicted = issued + prior_coupons * price
  ratios[action] = predicted > 0 and (realised + prior_coupons * price) / predicted or 1
  realised_all, predicted_all = realised_all + realised, predicted_all + issued
end
local prior = tonumber(ARGV[7])
local ratio = predicted_all + prior > 0 and (realised_all + prior) / (predicted_all + prior) or 1
local plan = math.floor(fraction * budget)
local actual = math.floor(spent + outstanding * ratio)
local state = cjson.decode(redis.call('GET', KEYS[2]) or '{}')
local lam = state.lambda or tonumber(ARGV[3])
local share = tonumber(ARGV[9])
local due = c[9] == '' or now - tonumber(c[9]) >= interval
if not due and share > 0 then
  local traffic = c[8] ~= '' and decisions - (tonumber(c[15]) or 0) >= share * tonumber(c[8])
  due = traffic or actual - tonumber(c[11]) >= share * budget
end
if not due then
  return {redis.call('GET', KEYS[2]) or '', plan, actual, 0}
end
local carry = 0
if c[9] ~= '' and budget > 0 then
  local step, max_step, lambda_max = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  local excess = (tonumber(c[13]) or 0) + ((actual - tonumber(c[11])) - (plan - tonumber(c[10]))) / budget
  local change = math.max(-max_step, math.min(max_step, step * excess))
  lam = math.max(0, math.min(lambda_max, lam + change))
  if step > 0 then carry = excess - change / step end
  if (lam <= 0 and carry < 0) or (lam >= lambda_max and carry > 0) then carry = 0 end -- no wind-up at a bound
end
local allowance = cjson.null
if left ~= nil then
  -- never spread over fewer than 1% of the plan's decisions: the budget left is not spent on a last few
  local floor = c[8] ~= '' and tonumber(c[8]) / 100 or math.max(1, decisions / 100)
  allowance = math.max(0, budget - actual) / math.max(left, floor, 1)
end
local encoded = cjson.encode({lambda = lam, allowance = allowance, ratios = ratios})
redis.call('HSET', KEYS[1], 'paced_at_ms', string.format('%d', now), 'pace_plan', plan, 'pace_actual', actual,
  'pace_carry', string.format('%.17g', carry), 'pace_decisions', decisions)
redis.call('SET', KEYS[2], encoded)
return {encoded, plan, actual, 1}
