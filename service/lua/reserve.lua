-- Decide and reserve a whole batch atomically, items in priority order (budget invariant:
-- spent + reserved <= budget). A repeated request_id returns its first decision and reserves nothing.
-- KEYS[1] campaign hash, KEYS[2] pending-reservations zset (deadline ms), then per item its decision
--   key and, when it has a request_id, its request key (all share the campaign's hash tag).
-- ARGV[1] now ms, [2] reservation expiry ms, [3] decision ttl ms, [4] model version, [5] lambda,
--   [6] JSON items [[decision id, user id, request id or "", [preferred actions]], ...]; preferred actions
--   are the offered ones by descending score, cut after 0.
-- Returns {'missing'} for an unknown campaign, else {remaining cents, then per item: action, cost, flag,
--   then the earlier record of each item with flag 0, in item order}: integers, so the caller parses
--   nothing for a new decision (it knows the ids, version and lambda it sent).
--   flag 0 = earlier decision returned again (record = "id\taction\tcost\tversion\tlambda\tuser"),
--   1 = new, 2 = new and the preferred coupon did not fit.
local campaign, pending = KEYS[1], KEYS[2]
local ledger = redis.call('HMGET', campaign, 'budget', 'spent', 'reserved', 'coupons')
if not ledger[1] then return {'missing'} end
local available = tonumber(ledger[1]) - tonumber(ledger[2]) - tonumber(ledger[3])
local coupons = cjson.decode(ledger[4])
local now, expiry = tonumber(ARGV[1]), tonumber(ARGV[2])
local version, lam = ARGV[4], ARGV[5]
local items = cjson.decode(ARGV[6])
local k = 3
local new_reserved, new_count = 0, 0
local out = {0}
local replays = {}
local deadline = string.format('%d', now + expiry)
local deadlines = {} -- score, member, ...: one ZADD for the batch
for _, item in ipairs(items) do
  local decision_id, user, request_id, prefs = item[1], item[2], item[3], item[4]
  local decision_key = KEYS[k]
  k = k + 1
  local request_key = nil
  if request_id ~= '' then
    request_key = KEYS[k]
    k = k + 1
  end
  local earlier = request_key and redis.call('GET', request_key)
  if earlier then
    out[#out + 1] = 0
    out[#out + 1] = 0
    out[#out + 1] = 0
    replays[#replays + 1] = earlier
  else
    local action, cost = 0, 0
    for _, candidate in ipairs(prefs) do
      if candidate == 0 then break end
      local price = coupons[string.format('%d', candidate)]
      if price and price <= available - new_reserved then
        action, cost = candidate, price
        break
      end
    end
    local flag = 1
    if #prefs > 0 and prefs[1] ~= 0 and action ~= prefs[1] then flag = 2 end
    local action_text, cost_text = string.format('%d', action), string.format('%d', cost)
    new_reserved = new_reserved + cost
    new_count = new_count + 1
    -- the decision record, one string (a hash and its expiry were twice the work):
    -- status, reserved cents, action, probability, decided at ms, version, lambda, reward, cost (both empty
    -- until settled), length of the request id, request id, user id (the free-text fields last)
    redis.call('SET', decision_key, 'R\t' .. cost_text .. '\t' .. action_text .. '\t1\t' .. ARGV[1] .. '\t'
      .. version .. '\t' .. lam .. '\t\t\t' .. #request_id .. '\t' .. request_id .. '\t' .. user, 'PX', ARGV[3])
    if cost > 0 then
      deadlines[#deadlines + 1] = deadline
      deadlines[#deadlines + 1] = decision_id
    end
    if request_key then
      redis.call('SET', request_key, decision_id .. '\t' .. action_text .. '\t' .. cost_text .. '\t' .. version
        .. '\t' .. lam .. '\t' .. user, 'PX', ARGV[3])
    end
    out[#out + 1] = action
    out[#out + 1] = cost
    out[#out + 1] = flag
  end
end
for first = 1, #deadlines, 2000 do -- unpack() is bounded by the Lua C stack (8000 values)
  redis.call('ZADD', pending, unpack(deadlines, first, math.min(first + 1999, #deadlines)))
end
if new_reserved > 0 then redis.call('HINCRBY', campaign, 'reserved', string.format('%d', new_reserved)) end
if new_count > 0 then
  redis.call('HINCRBY', campaign, 'decisions', new_count)
  redis.call('HSET', campaign, 'model_version', version)
end
out[1] = available - new_reserved
for _, record in ipairs(replays) do out[#out + 1] = record end
return out
