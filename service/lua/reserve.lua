-- Decide and reserve a whole batch atomically, items in priority order (budget invariant:
-- spent + reserved <= budget). A repeated request_id returns its first decision and reserves nothing.
-- KEYS[1] campaign hash, KEYS[2] pending-reservations zset (member: batch id, score: release deadline ms),
--   KEYS[3] the batch's record hash (field i: the record of decision "d-<batch>-<i>"), KEYS[4..] the
--   request keys the items name by index (every key shares the campaign's hash tag).
-- ARGV[1] now ms, [2] reservation expiry ms, [3] decision ttl ms, [4] model version, [5] lambda,
--   [6] batch id, [7] the items as JSON columns (flat arrays: cjson builds one Lua table per array):
--   orderings  the distinct preference lists: offered actions by descending score, cut after 0
--   ordering   per item, the 1-based index of its list in `orderings`
--   tails      per item, the end of its record: byte length of the request id, request id, user id
--   requests   [item, request key index, user id] for each item with a request id
-- Returns {'missing'} for an unknown campaign, else {remaining cents, then per item: action, cost, flag,
--   then the earlier record of each item with flag 0, in item order}.
--   flag 0 = earlier decision returned again (record = "id\taction\tcost\tversion\tlambda\tuser"),
--   1 = new, 2 = new and the preferred coupon did not fit.
-- A decision record (service/state/store.py, parse_decision_record): status (R reserved, S settled,
--   X expired), reserved cents, action, probability, decided at ms, model version, lambda, reward and
--   cost (empty until settled), byte length of the request id, request id, user id; tab-separated.
local campaign, pending, records = KEYS[1], KEYS[2], KEYS[3]
local ledger = redis.call('HMGET', campaign, 'budget', 'spent', 'reserved', 'coupons')
if not ledger[1] then return {'missing'} end
local available = tonumber(ledger[1]) - tonumber(ledger[2]) - tonumber(ledger[3])
local version, lam, batch = ARGV[4], ARGV[5], ARGV[6]
local common = '\t1\t' .. ARGV[1] .. '\t' .. version .. '\t' .. lam .. '\t\t\t'
local prices, heads = {}, {[0] = 'R\t0\t0' .. common}
for action, price in pairs(cjson.decode(ledger[4])) do
  local a = tonumber(action)
  prices[a] = price
  heads[a] = 'R\t' .. string.format('%d', price) .. '\t' .. action .. common
end
local items = cjson.decode(ARGV[7])
local orderings, ordering, tails = items.orderings, items.ordering, items.tails
local requests = {} -- item -> {item, request key index, user id}
for _, request in ipairs(items.requests) do requests[request[1]] = request end
local new_reserved, new_count = 0, 0
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
      local price = prices[candidate]
      if price and price <= available - new_reserved then
        action, cost = candidate, price
        break
      end
    end
    local flag = 1
    if prefs[1] and prefs[1] ~= 0 and action ~= prefs[1] then flag = 2 end
    new_reserved = new_reserved + cost
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
if new_count > 0 then
  redis.call('HINCRBY', campaign, 'decisions', new_count)
  redis.call('HSET', campaign, 'model_version', version)
end
out[1] = available - new_reserved
for _, record in ipairs(replays) do out[#out + 1] = record end
return out
