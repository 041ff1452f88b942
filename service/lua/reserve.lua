-- Decide and reserve a whole batch atomically, items in priority order (budget invariant:
-- spent + reserved <= budget). A repeated request_id returns its first decision and reserves nothing.
-- KEYS[1] campaign hash, KEYS[2] pending-reservations zset (deadline ms), then the record keys and the
--   request keys the items name by index (all share the campaign's hash tag).
-- ARGV[1] now ms, [2] reservation expiry ms, [3] decision ttl ms, [4] model version, [5] lambda,
--   [6] the items as JSON columns (flat arrays: cjson builds one Lua table per array, not one per item):
--   orderings  the distinct preference lists: offered actions by descending score, cut after 0
--   ordering   per item, the 1-based index of its list in `orderings`
--   tails      per item, the end of its record: byte length of the request id, request id, user id
--              (tab-separated; the caller writes them, the script only prefixes what it decides)
--   fields     per item, its field in the hash at its record key, or "" for a string key of its own
--   groups     [first, last, record key index, pending member]: items first..last (1-based, in order)
--              share a record key and a pending member (a batch: one HSET and one pending entry)
--   requests   [item, request key index, decision id, user id] for each item with a request id
-- Returns {'missing'} for an unknown campaign, else {remaining cents, then per item: action, cost, flag,
--   then the earlier record of each item with flag 0, in item order}: integers, so the caller parses
--   nothing for a new decision (it knows the ids, version and lambda it sent).
--   flag 0 = earlier decision returned again (record = "id\taction\tcost\tversion\tlambda\tuser"),
--   1 = new, 2 = new and the preferred coupon did not fit.
local campaign, pending = KEYS[1], KEYS[2]
local ledger = redis.call('HMGET', campaign, 'budget', 'spent', 'reserved', 'coupons')
if not ledger[1] then return {'missing'} end
local available = tonumber(ledger[1]) - tonumber(ledger[2]) - tonumber(ledger[3])
local version, lam = ARGV[4], ARGV[5]
-- a record is status, reserved cents, action, probability, decided at ms, version, lambda, reward and
-- cost (both empty until settled), then the item's tail: its head depends only on the action taken
local common = '\t1\t' .. ARGV[1] .. '\t' .. version .. '\t' .. lam .. '\t\t\t'
local prices, heads = {}, {[0] = 'R\t0\t0' .. common}
for action, price in pairs(cjson.decode(ledger[4])) do
  local a = tonumber(action)
  prices[a] = price
  heads[a] = 'R\t' .. string.format('%d', price) .. '\t' .. action .. common
end
local items = cjson.decode(ARGV[6])
local orderings, ordering, tails, fields = items.orderings, items.ordering, items.tails, items.fields
local requests = {} -- item -> {request key index, decision id, user id}
for _, request in ipairs(items.requests) do requests[request[1]] = request end
local new_reserved, new_count = 0, 0
local out = {0}
local replays = {}
local deadlines = {} -- one pending entry per member (a batch, or a decision of its own)
local deadline = string.format('%d', tonumber(ARGV[1]) + tonumber(ARGV[2]))
for _, group in ipairs(items.groups) do
  local record_key, member = KEYS[group[3]], group[4]
  local hash_fields, reserved_here = {}, false
  for i = group[1], group[2] do
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
      local record = heads[action] .. tails[i]
      if fields[i] ~= '' then
        hash_fields[#hash_fields + 1] = fields[i]
        hash_fields[#hash_fields + 1] = record
      else
        redis.call('SET', record_key, record, 'PX', ARGV[3])
      end
      reserved_here = reserved_here or cost > 0
      if request then
        redis.call('SET', KEYS[request[2]], request[3] .. '\t' .. action .. '\t' .. string.format('%d', cost)
          .. '\t' .. version .. '\t' .. lam .. '\t' .. request[4], 'PX', ARGV[3])
      end
      out[#out + 1] = action
      out[#out + 1] = cost
      out[#out + 1] = flag
    end
  end
  -- unpack() is bounded by the Lua C stack (8000 values): large batches go in chunks
  for first = 1, #hash_fields, 2000 do
    redis.call('HSET', record_key, unpack(hash_fields, first, math.min(first + 1999, #hash_fields)))
  end
  if #hash_fields > 0 then redis.call('PEXPIRE', record_key, ARGV[3]) end
  if reserved_here then
    deadlines[#deadlines + 1] = deadline
    deadlines[#deadlines + 1] = member
  end
end
for first = 1, #deadlines, 2000 do
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
