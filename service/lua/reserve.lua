-- Decide and reserve a whole batch atomically, items in priority order (budget invariant:
-- spent + reserved <= budget). A repeated request_id returns its first decision and reserves nothing.
-- KEYS[1] campaign hash, KEYS[2] pending-reservations zset (member: batch id, score: release deadline ms),
--   KEYS[3] the batch's record hash (field i: the record of decision "d-<batch>-<i>"), KEYS[4..] the
--   request keys the items name by index (every key shares the campaign's hash tag).
-- ARGV[1] now ms ('': the store's clock, Redis TIME: every replica's deadlines and plans read one clock),
--   [2] reservation expiry ms, [3] decision ttl ms, [4] model version, [5] lambda,
--   [6] batch id, [8] prior: how many coupons of each action count as predicted right before any outcome
--   (expected mode), [13] plan lead: how far (a fraction of the budget) commitments may run ahead of a time plan,
--   [7] the items as JSON columns (flat arrays: cjson builds one Lua table per array):
--   orderings  the distinct preference lists: offered actions by descending score, cut after 0
--   ordering   per item, the 0-based index of its list in `orderings`
--   tails      per item, the end of its record: byte length of the request id, request id, user id
--   requests   [item, request key index, user id] for each item with a request id
--   expected   (optional) per item, the model's expected cost of each action for that user (cents, index =
--              action + 1; an empty list: none): what an expected reservation starts from, and in either
--              mode the prediction settlement compares the realised cost with
--   bundles    (optional: a catalog request) the bundle keys ("1+3", contract/catalog.py) that the lists
--              name by position (1-based; 0 no coupon); without it the lists name coupon actions
-- Returns {'missing'} for an unknown campaign, {'conflict', item} (1-based, nothing written) when an item's
--   request_id was used before, or earlier in the batch, by another user, else {remaining cents, then per
--   item: action, cost, flag (and for a catalog request its coupons: "coupon=cost" ','-separated),
--   then the earlier record of each item with flag 0, in item order}.
--   flag 0 = earlier decision returned again (record = "id\taction\tcost\tversion\tlambda\tuser"; a catalog
--   request's action is "action;coupons"), 1 = new, 2 = new and the preferred offer did not fit.
-- The coupon catalog (a campaign hash with `bundles`: {key: [action, coupon...]}, and `stock`: {coupon:
--   units}, with `used:<coupon>` the units held or redeemed): a candidate is a bundle, granted whole or not
--   at all: it fits when the sum of its coupons' reservations fits (strict: their costs, a percent coupon's
--   being its cap) and each coupon with a stock has a unit left; granting takes one unit of each. A
--   campaign without a catalog offers each coupon alone (a bundle of one). A request's keys name bundles
--   by their coupons, so a catalog changed since the request was ranked never grants another bundle: a
--   key the campaign no longer allows is skipped.
-- A decision record (service/state/store.py, parse_decision_record): status (R reserved, S settled,
--   X expired), reserved cents, the coupon's cost (cents), the variance of its realised cost, the predicted
--   cost (cents: the model's expected cost, else the coupon's cost), action, probability, decided at ms,
--   model version, lambda, reward and cost (empty until settled), byte length of the request id, request
--   id, user id; tab-separated. A catalog campaign's action field is the action, ':', then per coupon
--   "coupon,reserved,face,variance,predicted,took" (took: 1 when it took a unit of stock), ';'-separated,
--   and its reserved, face, variance and predicted fields are the bundle's sums.
-- Reservation modes (the campaign's reservation_mode):
--   strict    a coupon fits when its cost fits budget - spent - outstanding, outstanding being the face value
--             of every coupon without an outcome (`outstanding_face`: coupons reserved in expected mode
--             before a switch to strict count at their cost too), and reserves its cost.
--   expected  a coupon of action a reserves min(cost, ceil(r_a * e)), e its predicted cost for that user
--             (the caller floors it: service/engine.py, ScoreTerms.floored; at least a cent here whatever it
--             sends), and r_a the campaign's realised / predicted cost ratio of action a over settled coupons (with
--             `prior` coupons predicted right); it fits when spent + reserved + the Bernstein margin of the
--             outstanding coupons stays within the budget: margin = M L / 3 + sqrt((M L / 3)^2 + 2 V L),
--             L = ln(1 / overspend_risk), M the dearest coupon, V the sum of cost^2 p (1 - p) over
--             outstanding coupons, p = reserved / cost (no margin when V is 0), so that realised spend
--             exceeds the budget with probability at most overspend_risk, outcomes being independent and
--             the reservations their expected costs.
-- Time plans (starts_ms .. ends_ms): no coupon outside the horizon; inside it, spent plus what is committed
--   (strict: outstanding; expected: reserved) stays within budget * min(1, elapsed share + plan lead), so that
--   pacing starts with the first request and no burst can take the budget ahead of the plan.
-- Learning loop (docs/state.md, "The decision log"): KEYS[#KEYS] the campaign's log stream, ARGV[9] its
--   MAXLEN (approximate; 0: no log); the batch's new decisions go into it as one `decisions` entry
--   (contract/log_entry.py), ARGV[10] the items' features: little-endian float32 rows concatenated
--   in item order, ARGV[11] the exploration rate, ARGV[12] JSON {holdout: [item, ...], explore: [[item,
--   draw], ...]}: the items of holdout users, and the items that explore with their uniform draw in [0, 1)
--   (the caller draws, so that this script stays deterministic).
--   Behaviour policy: a holdout user gets no coupon (probability 1); an exploring item takes the
--   candidate floor(draw * k) + 1 of the k candidates: "no coupon", then the campaign's offers (coupons,
--   or a catalog's bundles) that fit, by action; any other item takes the greedy first fit above. The
--   logged probability of the action is what the policy gave it with these candidates: rate / k, plus
--   1 - rate for the greedy action.
local campaign, pending, records = KEYS[1], KEYS[2], KEYS[3]
local items = cjson.decode(ARGV[7])
do -- a request_id names one user's decision: another user reusing it gets nothing, and nothing is written
  local owners = {}
  for _, request in ipairs(items.requests) do
    local key, user = KEYS[request[2]], request[3]
    local earlier = owners[key] or redis.call('GET', key)
    local owner = earlier and (owners[key] or string.match(earlier, '^[^\t]*\t[^\t]*\t[^\t]*\t[^\t]*\t[^\t]*\t(.*)$'))
    if owner and owner ~= user then return {'conflict', request[1]} end
    owners[key] = user
  end
end
local ledger = redis.call('HMGET', campaign, 'budget', 'spent', 'reserved', 'coupons', 'reservation_mode',
  'overspend_risk', 'outstanding_var', 'outstanding_face', 'starts_ms', 'ends_ms', 'bundles', 'stock')
if not ledger[1] then return {'missing'} end
local now = tonumber(ARGV[1])
if ARGV[1] == '' then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
local now_text = string.format('%d', now)
local budget, spent, reserved = tonumber(ledger[1]), tonumber(ledger[2]), tonumber(ledger[3])
local version, lam, batch = ARGV[4], ARGV[5], ARGV[6]
local expected = ledger[5] == 'expected'
-- strict counts every coupon without an outcome at its face value (reservations made in expected mode
-- included); a campaign that never kept outstanding_face has only strict ones, at face value in reserved
local committed = expected and reserved or math.max(reserved, tonumber(ledger[8]) or 0)
local available = budget - spent - committed
if ledger[10] and ledger[10] ~= '' then
  local starts, ends = tonumber(ledger[9]) or now, tonumber(ledger[10])
  local share = 0 -- outside the horizon nothing more is committed
  if now >= starts and now < ends then share = math.min(1, (now - starts) / math.max(1, ends - starts) + tonumber(ARGV[13])) end
  available = math.min(available, math.floor(budget * share) - spent - committed)
end
local orderings, ordering, tails = items.orderings, items.ordering, items.tails
local expected_costs = items.expected or {}
local prices, ratios = {}, {}
local dearest, log_risk = 0, 0
if expected then log_risk = math.log(1 / tonumber(ledger[6] ~= '' and ledger[6] or 0.01)) end
for action, price in pairs(cjson.decode(ledger[4])) do
  local a = tonumber(action)
  prices[a], ratios[a] = price, 1
  dearest = math.max(dearest, price)
  if expected then
    local stats = redis.call('HMGET', campaign, 'issued:' .. action, 'realised:' .. action)
    local prior = tonumber(ARGV[8]) * price
    local predicted = (tonumber(stats[1]) or 0) + prior
    if predicted > 0 then ratios[a] = ((tonumber(stats[2]) or 0) + prior) / predicted end
  end
end
-- what coupon a reserves for the user of item i: reserved cents, variance of its realised cost, predicted
-- (the predicted cost is an integer within [1 cent, the coupon's cost] whatever the caller sent: NaN,
-- negative, zero or oversized predictions never become a reservation the ledger cannot settle or correct)
local function reservation(i, a)
  local price = prices[a]
  local predicted = tonumber(expected_costs[i] and expected_costs[i][a + 1]) or price
  if predicted ~= predicted then predicted = price end
  predicted = math.max(math.min(1, price), math.min(price, math.floor(predicted)))
  if not expected then return price, 0, predicted end
  local reserve = math.max(1, math.min(price, math.ceil(ratios[a] * predicted)))
  local p = price > 0 and reserve / price or 0
  return reserve, price * price * p * (1 - p), predicted
end
local variance, new_variance = tonumber(ledger[7]) or 0, 0
local new_reserved, new_count, new_predicted, new_face = 0, 0, 0, 0
local function fits(reserve, var)
  if not expected then return reserve <= available - new_face end
  local v = math.max(0, variance + new_variance + var)
  local margin = 0 -- no variance: every outstanding cost is known
  if v > 0 then
    local third = dearest * log_risk / 3
    margin = third + math.sqrt(third * third + 2 * v * log_risk)
  end
  return reserve + margin <= available - new_reserved
end
-- what a candidate of a preference list offers: {action, coupon, ...} (the decision's action, then the
-- bundle's coupons), or nil when the campaign does not offer it now
local catalog, left, taken = nil, {}, {} -- bundle key -> offer; coupon -> units left; coupon -> units taken
if ledger[11] and ledger[11] ~= '' then
  catalog = cjson.decode(ledger[11])
  if ledger[12] and ledger[12] ~= '' then
    for action, units in pairs(cjson.decode(ledger[12])) do
      left[tonumber(action)] = units - (tonumber(redis.call('HGET', campaign, 'used:' .. action)) or 0)
    end
  end
end
local sent_keys = items.bundles -- a catalog request ranks bundles: its lists hold positions in these keys
local singles = {} -- coupon -> the offer of that coupon alone
local function offered(key) -- key: a bundle key ("1+3"), or a coupon's action
  if catalog then
    local found = catalog[tostring(key)]
    if found then
      for k = 2, #found do
        if not prices[found[k]] then return nil end
      end
    end
    return found
  end
  local a = tonumber(key)
  if not (a and prices[a]) then return nil end
  local single = singles[a]
  if not single then
    single = {a, a}
    singles[a] = single
  end
  return single
end
local function offer(candidate) -- a candidate of a preference list
  if sent_keys then
    local key = sent_keys[candidate]
    return key and offered(key)
  end
  return offered(candidate)
end
-- what an offer reserves for the user of item i: reserved cents, variance, predicted, and its face value
local function offer_reservation(i, found)
  if #found == 2 then
    local a = found[2]
    local reserve, var, predicted = reservation(i, a)
    return reserve, var, predicted, prices[a]
  end
  local reserve, var, predicted, face = 0, 0, 0, 0
  for k = 2, #found do
    local r, v, p = reservation(i, found[k])
    reserve, var, predicted, face = reserve + r, var + v, predicted + p, face + prices[found[k]]
  end
  return reserve, var, predicted, face
end
local function in_stock(found)
  for k = 2, #found do
    local units = left[found[k]]
    if units and units < 1 then return false end
  end
  return true
end
local function grantable(i, found)
  if not in_stock(found) then return false end
  local reserve, var = offer_reservation(i, found)
  return fits(reserve, var)
end
local requests = {} -- item -> {item, request key index, user id}
for _, request in ipairs(items.requests) do requests[request[1]] = request end

-- exploration, holdout and the decision log
local log, log_max = KEYS[#KEYS], ARGV[9]
local features, rate = ARGV[10], tonumber(ARGV[11])
local row_bytes = #ordering > 0 and #features / #ordering or 0
local behaviour = cjson.decode(ARGV[12])
local held_out, draws = {}, {}
for _, item in ipairs(behaviour.holdout) do held_out[item] = true end
for _, pick in ipairs(behaviour.explore) do draws[pick[1]] = pick[2] end
local by_action -- every offer of the campaign, by action (exploration's candidates)
local function all_offers()
  if by_action then return by_action end
  by_action = {}
  if catalog then
    for key in pairs(catalog) do
      local found = offered(key)
      if found then by_action[#by_action + 1] = found end
    end
  else
    for a in pairs(prices) do by_action[#by_action + 1] = offered(a) end
  end
  table.sort(by_action, function(x, y) return x[1] < y[1] end)
  return by_action
end
local decimals = {[1] = '1'} -- x -> the shorter of %.15g and %.17g that reads back as x
local function decimal(x)
  local text = decimals[x]
  if text then return text end
  text = string.format('%.15g', x)
  if tonumber(text) ~= x then text = string.format('%.17g', x) end
  decimals[x] = text
  return text
end
-- the offer item i takes (false: no coupon), its probability under the behaviour policy, whether
-- exploration chose it
local function behave(i, greedy)
  if held_out[i] then return false, 1, false end
  if rate <= 0 then return greedy, 1, false end
  local candidates = {false}
  for _, found in ipairs(all_offers()) do
    if grantable(i, found) then candidates[#candidates + 1] = found end
  end
  local chosen, draw = greedy, draws[i]
  if draw then chosen = candidates[math.min(#candidates, math.floor(draw * #candidates) + 1)] end
  local probability = rate / #candidates
  if chosen == greedy then probability = probability + 1 - rate end
  return chosen, probability, draw ~= nil
end
-- a decision record's head: its reservation, then its probability, marked /h (holdout) or /x (explored).
-- A batch has a handful of distinct heads: each is built once (heads[chance][action][reserve][predicted]).
local heads = {}
local function level(t, k)
  local v = t[k]
  if not v then
    v = {}
    t[k] = v
  end
  return v
end
-- `action` is the record's action field: the action, and for a catalog campaign its coupons (reserve.lua's
-- header); `face` the offer's face value
local function record_head(action, face, reserve, var, predicted, probability, explored, holdout)
  local mark = holdout and '/h' or (explored and '/x' or '')
  local chance = (probability == 1 and mark == '') and '1' or decimal(probability) .. mark
  local by_predicted = level(level(level(heads, chance), action), reserve)
  local head = by_predicted[predicted]
  if head then return head end
  local tail = '\t' .. chance .. '\t' .. now_text .. '\t' .. version .. '\t' .. lam .. '\t\t\t'
  if face == 0 then
    head = 'R\t0\t0\t0\t0\t' .. action .. tail
  else
    head = 'R\t' .. string.format('%d', reserve) .. '\t' .. string.format('%d', face) .. '\t'
      .. string.format('%.17g', var) .. '\t' .. string.format('%d', predicted) .. '\t' .. action .. tail
  end
  by_predicted[predicted] = head
  return head
end
local new_held_out, new_explored = 0, 0
local out, replays, fields = {0}, {}, {}
local logging = log_max ~= '0'
-- the `decisions` entry's columns, one value per new decision (contract/log_entry.py)
local logged, log_users, log_user_bytes, log_actions, log_costs, log_chances, log_explored, log_holdout =
  {}, {}, {}, {}, {}, {}, {}, {}
local log_coupons, log_coupon_costs = {}, {} -- a catalog campaign's: each decision's coupons and their faces
local log_rows = {} -- the features of the logged items, when an item may be a replay (it names a request id)
local replayable = #items.requests > 0
local decision_prefix = 'd-' .. batch .. '-'
local cost_text = {[0] = '0'} -- action -> its cost in cents, as the log writes it
for a, price in pairs(prices) do cost_text[a] = string.format('%d', price) end
local fmt = string.format
-- a catalog campaign's decision: its record's action field (the action, then ':' and per coupon
-- "coupon,reserved,face,variance,predicted,took stock (1|0)", ';'-separated), the coupons and their faces
-- as the log writes them, and the answer's "coupon=face" list (','-separated)
local function parts_of(i, found)
  if not found then return '0:', '', '', '' end
  local record, coupons, faces, answer = {}, {}, {}, {}
  for k = 2, #found do
    local a = found[k]
    local r, v, p = reservation(i, a)
    local took = left[a] and '1' or '0'
    record[#record + 1] = a .. ',' .. fmt('%d', r) .. ',' .. cost_text[a] .. ',' .. fmt('%.17g', v) .. ','
      .. fmt('%d', p) .. ',' .. took
    coupons[#coupons + 1] = a
    faces[#faces + 1] = cost_text[a]
    answer[#answer + 1] = a .. '=' .. cost_text[a]
  end
  return found[1] .. ':' .. table.concat(record, ';'), table.concat(coupons, '+'), table.concat(faces, '+'),
    table.concat(answer, ',')
end
for i = 1, #ordering do
  local request = requests[i]
  local earlier = request and redis.call('GET', KEYS[request[2]])
  if earlier then
    out[#out + 1] = 0
    out[#out + 1] = 0
    out[#out + 1] = 0
    if sent_keys then out[#out + 1] = '' end
    replays[#replays + 1] = earlier
  else
    local prefs = orderings[ordering[i] + 1]
    local greedy, first = false, prefs[1]
    for _, candidate in ipairs(prefs) do
      if candidate == 0 then break end
      local found = offer(candidate)
      if found and grantable(i, found) then
        greedy = found
        if candidate == first then first = nil end
        break
      end
    end
    local flag = 1
    if first and first ~= 0 then flag = 2 end -- the preferred offer did not fit
    local chosen, probability, explored = behave(i, greedy)
    if held_out[i] then flag, new_held_out = 1, new_held_out + 1 end
    if explored then new_explored = new_explored + 1 end
    local action, cost, reserve, var, predicted = 0, 0, 0, 0, 0
    if chosen then
      action = chosen[1]
      reserve, var, predicted, cost = offer_reservation(i, chosen)
      for k = 2, #chosen do
        local a = chosen[k]
        if left[a] then
          left[a] = left[a] - 1
          taken[a] = (taken[a] or 0) + 1
        end
      end
    end
    new_reserved = new_reserved + reserve
    new_face = new_face + cost
    new_variance = new_variance + var
    new_predicted = new_predicted + predicted
    new_count = new_count + 1
    local action_field, coupons, faces, answer, cost_field = action, nil, nil, nil, cost_text[action]
    if catalog or sent_keys then
      action_field, coupons, faces, answer = parts_of(i, chosen)
      cost_field = fmt('%d', cost)
      if not catalog then action_field = action end -- a campaign without a catalog records as before
    end
    fields[#fields + 1] = i - 1
    fields[#fields + 1] = record_head(action_field, cost, reserve, var, predicted, probability, explored, held_out[i])
      .. tails[i]
    if logging then
      local n = #logged + 1
      local request_length, rest = string.match(tails[i], '^(%d+)\t()')
      local user = string.sub(tails[i], rest + tonumber(request_length) + 1)
      logged[n], log_users[n], log_user_bytes[n] = i - 1, user, #user
      log_actions[n], log_costs[n], log_chances[n] = action, cost_field, decimal(probability)
      log_explored[n], log_holdout[n] = explored and '1' or '0', held_out[i] and '1' or '0'
      if replayable then log_rows[n] = string.sub(features, (i - 1) * row_bytes + 1, i * row_bytes) end
      if catalog then log_coupons[n], log_coupon_costs[n] = coupons, faces end
    end
    if request then
      local answered = action
      if sent_keys then answered = action .. ';' .. answer end
      redis.call('SET', KEYS[request[2]], decision_prefix .. (i - 1) .. '\t' .. answered .. '\t'
        .. cost_field .. '\t' .. version .. '\t' .. lam .. '\t' .. request[3], 'PX', ARGV[3])
    end
    out[#out + 1] = action
    out[#out + 1] = cost
    out[#out + 1] = flag
    if sent_keys then out[#out + 1] = answer end
  end
end
if #logged > 0 then
  local entry = {'kind', 'decisions', 'batch', batch, 'at_ms', now_text, 'lambda', lam,
    'model_version', version, 'items', table.concat(logged, ','), 'user_ids', table.concat(log_users),
    'user_id_bytes', table.concat(log_user_bytes, ','), 'actions', table.concat(log_actions, ','),
    'costs', table.concat(log_costs, ','), 'probabilities', table.concat(log_chances, ','),
    'explored', table.concat(log_explored), 'holdout', table.concat(log_holdout),
    'features', replayable and table.concat(log_rows) or features}
  if catalog then
    entry[#entry + 1], entry[#entry + 2] = 'coupons', table.concat(log_coupons, ',')
    entry[#entry + 1], entry[#entry + 2] = 'coupon_costs', table.concat(log_coupon_costs, ',')
  end
  log_add(campaign, log, log_max, unpack(entry))
end
-- unpack() is bounded by the Lua C stack (8000 values): large batches go in chunks
for first = 1, #fields, 2000 do
  redis.call('HSET', records, unpack(fields, first, math.min(first + 1999, #fields)))
end
if #fields > 0 then redis.call('PEXPIRE', records, ARGV[3]) end
if new_reserved > 0 then
  redis.call('ZADD', pending, string.format('%d', now + tonumber(ARGV[2])), batch)
  redis.call('HINCRBY', campaign, 'reserved', string.format('%d', new_reserved))
end
if new_face > 0 then redis.call('HINCRBY', campaign, 'outstanding_face', string.format('%d', new_face)) end
if new_variance > 0 then redis.call('HINCRBYFLOAT', campaign, 'outstanding_var', new_variance) end
if new_predicted > 0 then
  redis.call('HINCRBY', campaign, 'outstanding_predicted', string.format('%d', new_predicted))
end
if new_count > 0 then
  redis.call('HINCRBY', campaign, 'decisions', new_count)
  redis.call('HSET', campaign, 'model_version', version)
end
if new_held_out > 0 then redis.call('HINCRBY', campaign, 'holdout_decisions', new_held_out) end
if new_explored > 0 then redis.call('HINCRBY', campaign, 'explored_decisions', new_explored) end
for a, units in pairs(taken) do redis.call('HINCRBY', campaign, 'used:' .. a, units) end
out[1] = budget - spent - reserved - new_reserved
for _, record in ipairs(replays) do out[#out + 1] = record end
return out
