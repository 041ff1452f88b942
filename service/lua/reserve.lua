-- Decide and reserve a whole batch atomically, items in priority order (budget invariant:
-- spent + reserved <= budget). A repeated request_id returns its first decision and reserves nothing.
-- KEYS[1] campaign hash, KEYS[2] pending-reservations zset (member: batch id, score: release deadline ms),
--   KEYS[3] the batch's record hash (field i: the record of decision "d-<batch>-<i>"), KEYS[4..] the
--   request keys the items name by index (every key shares the campaign's hash tag).
-- ARGV[1] now ms, [2] reservation expiry ms, [3] decision ttl ms, [4] model version, [5] lambda,
--   [6] batch id, [8] prior: how many coupons of each action count as redeemed before any outcome
--   (expected mode), [7] the items as JSON columns (flat arrays: cjson builds one Lua table per array):
--   orderings  the distinct preference lists: offered actions by descending score, cut after 0
--   ordering   per item, the 1-based index of its list in `orderings`
--   tails      per item, the end of its record: byte length of the request id, request id, user id
--   requests   [item, request key index, user id] for each item with a request id
-- Returns {'missing'} for an unknown campaign, {'conflict', item} (1-based, nothing written) when an item's
--   request_id was used before, or earlier in the batch, by another user, else {remaining cents, then per item: action, cost, flag,
--   then the earlier record of each item with flag 0, in item order}.
--   flag 0 = earlier decision returned again (record = "id\taction\tcost\tversion\tlambda\tuser"),
--   1 = new, 2 = new and the preferred coupon did not fit.
-- A decision record (service/state/store.py, parse_decision_record): status (R reserved, S settled,
--   X expired), reserved cents, the coupon's cost (cents), the variance of its realised cost, action,
--   probability, decided at ms, model version, lambda, reward and cost (empty until settled), byte length
--   of the request id, request id, user id; tab-separated.
-- Reservation modes (the campaign's reservation_mode):
--   strict    a coupon fits when its cost fits budget - spent - reserved, and reserves its cost.
--   expected  a coupon of action a reserves its expected cost ceil(r_a * cost), r_a the campaign's
--             realised / issued cost ratio of action a over settled coupons (with `prior` coupons at
--             ratio 1); it fits when spent + reserved + the Bernstein margin of the outstanding coupons
--             stays within the budget: margin = M L / 3 + sqrt((M L / 3)^2 + 2 V L), L = ln(1 /
--             overspend_risk), M the dearest coupon, V the sum of cost^2 r (1 - r) over outstanding
--             coupons (no margin when V is 0), so that realised spend exceeds the budget with probability at
--             most overspend_risk, outcomes being independent and the ratios right.
local campaign, pending, records = KEYS[1], KEYS[2], KEYS[3]
do -- a request_id names one user's decision: another user reusing it gets nothing, and nothing is written
  local owners = {}
  for _, request in ipairs(cjson.decode(ARGV[7]).requests) do
    local key, user = KEYS[request[2]], request[3]
    local earlier = owners[key] or redis.call('GET', key)
    local owner = earlier and (owners[key] or string.match(earlier, '^[^\t]*\t[^\t]*\t[^\t]*\t[^\t]*\t[^\t]*\t(.*)$'))
    if owner and owner ~= user then return {'conflict', request[1]} end
    owners[key] = user
  end
end
local ledger = redis.call('HMGET', campaign, 'budget', 'spent', 'reserved', 'coupons', 'reservation_mode',
  'overspend_risk', 'outstanding_var')
if not ledger[1] then return {'missing'} end
local available = tonumber(ledger[1]) - tonumber(ledger[2]) - tonumber(ledger[3])
local version, lam, batch = ARGV[4], ARGV[5], ARGV[6]
local expected = ledger[5] == 'expected'
local common = '\t1\t' .. ARGV[1] .. '\t' .. version .. '\t' .. lam .. '\t\t\t'
local prices, reserves, variances, heads = {}, {}, {}, {[0] = 'R\t0\t0\t0\t0' .. common}
local dearest, log_risk = 0, 0
if expected then log_risk = math.log(1 / tonumber(ledger[6] ~= '' and ledger[6] or 0.01)) end
for action, price in pairs(cjson.decode(ledger[4])) do
  local a = tonumber(action)
  prices[a], reserves[a], variances[a] = price, price, 0
  dearest = math.max(dearest, price)
  if expected then
    local stats = redis.call('HMGET', campaign, 'issued:' .. action, 'realised:' .. action)
    local prior = tonumber(ARGV[8]) * price
    local issued = (tonumber(stats[1]) or 0) + prior
    local ratio = issued > 0 and math.min(1, ((tonumber(stats[2]) or 0) + prior) / issued) or 1
    reserves[a] = math.ceil(ratio * price)
    variances[a] = price * price * ratio * (1 - ratio)
  end
  heads[a] = 'R\t' .. string.format('%d', reserves[a]) .. '\t' .. string.format('%d', price) .. '\t'
    .. string.format('%.17g', variances[a]) .. '\t' .. action .. common
end
local variance, new_variance = tonumber(ledger[7]) or 0, 0
local new_reserved, new_count = 0, 0
local function fits(a)
  if not expected then return prices[a] <= available - new_reserved end
  local v = math.max(0, variance + new_variance + variances[a])
  local margin = 0 -- no variance: every outstanding cost is known
  if v > 0 then
    local third = dearest * log_risk / 3
    margin = third + math.sqrt(third * third + 2 * v * log_risk)
  end
  return reserves[a] + margin <= available - new_reserved
end
local items = cjson.decode(ARGV[7])
local orderings, ordering, tails = items.orderings, items.ordering, items.tails
local requests = {} -- item -> {item, request key index, user id}
for _, request in ipairs(items.requests) do requests[request[1]] = request end
local out, replays, fields = {0}, {}, {}
for i = 1, #ordering do
  local request = requests[i]
  local earlier = request and redis.call('GET', KEYS[request[2]])
  if earlier then
    out[#out + 1] = 0
    out[#out + 1] = 0
    out[#out + 1] = 0
    replays[#replays + 1] = earlier
  else
    local prefs = orderings[ordering[i]]
    local action, cost = 0, 0
    for _, candidate in ipairs(prefs) do
      if candidate == 0 then break end
      if prices[candidate] and fits(candidate) then
        action, cost = candidate, prices[candidate]
        break
      end
    end
    local flag = 1
    if prefs[1] and prefs[1] ~= 0 and action ~= prefs[1] then flag = 2 end
    if action ~= 0 then
      new_reserved = new_reserved + reserves[action]
      new_variance = new_variance + variances[action]
    end
    new_count = new_count + 1
    fields[#fields + 1] = i - 1
    fields[#fields + 1] = heads[action] .. tails[i]
    if request then
      redis.call('SET', KEYS[request[2]], 'd-' .. batch .. '-' .. (i - 1) .. '\t' .. action .. '\t'
        .. string.format('%d', cost) .. '\t' .. version .. '\t' .. lam .. '\t' .. request[3], 'PX', ARGV[3])
    end
    out[#out + 1] = action
    out[#out + 1] = cost
    out[#out + 1] = flag
  end
end
-- unpack() is bounded by the Lua C stack (8000 values): large batches go in chunks
for first = 1, #fields, 2000 do
  redis.call('HSET', records, unpack(fields, first, math.min(first + 1999, #fields)))
end
if #fields > 0 then redis.call('PEXPIRE', records, ARGV[3]) end
if new_reserved > 0 then
  redis.call('ZADD', pending, string.format('%d', tonumber(ARGV[1]) + tonumber(ARGV[2])), batch)
  redis.call('HINCRBY', campaign, 'reserved', string.format('%d', new_reserved))
end
if new_variance > 0 then redis.call('HINCRBYFLOAT', campaign, 'outstanding_var', new_variance) end
if new_count > 0 then
  redis.call('HINCRBY', campaign, 'decisions', new_count)
  redis.call('HSET', campaign, 'model_version', version)
end
out[1] = available - new_reserved
for _, record in ipairs(replays) do out[#out + 1] = record end
return out
