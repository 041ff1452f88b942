-- Decide and reserve a whole batch atomically, items in priority order (budget invariant:
-- spent + reserved <= budget). A repeated request_id returns its first decision and reserves nothing.
-- KEYS[1] campaign hash, KEYS[2] pending-reservations zset (deadline ms), then the record keys and the
--   request keys the items name by index (all share the campaign's hash tag).
-- ARGV[1] now ms, [2] reservation expiry ms, [3] decision ttl ms, [4] model version, [5] lambda,
--   [6] JSON items [[decision id, user id, request id or "", [preferred actions], record key index,
--   field, pending member, request key index or 0], ...]; preferred actions are the offered ones by
--   descending score, cut after 0. A record goes into `field` of the hash at its key (the batch's record:
--   one HSET and one pending member for the whole batch) or, with field "", is its own string key.
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
local new_reserved, new_count = 0, 0
local out = {0}
local replays = {}
local deadline = string.format('%d', now + expiry)
local hashes, hash_keys = {}, {} -- record key index -> {field, record, ...}: one HSET per batch
local members, deadlines = {}, {} -- one pending entry per member (a batch, or a decision of its own)
for _, item in ipairs(items) do
  local decision_id, user, request_id, prefs = item[1], item[2], item[3], item[4]
  local record_key, field, member = item[5], item[6], item[7]
  local request_key = item[8] > 0 and KEYS[item[8]] or nil
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
    -- the decision record, one string: status, reserved cents, action, probability, decided at ms,
    -- version, lambda, reward, cost (both empty until settled), length of the request id, request id,
    -- user id (the free-text fields last)
    local record = 'R\t' .. cost_text .. '\t' .. action_text .. '\t1\t' .. ARGV[1] .. '\t' .. version .. '\t' .. lam
      .. '\t\t\t' .. #request_id .. '\t' .. request_id .. '\t' .. user
    if field ~= '' then
      local fields = hashes[record_key]
      if not fields then
        fields = {}
        hashes[record_key] = fields
        hash_keys[#hash_keys + 1] = record_key
      end
      fields[#fields + 1] = field
      fields[#fields + 1] = record
    else
      redis.call('SET', KEYS[record_key], record, 'PX', ARGV[3])
    end
    if cost > 0 and not members[member] then
      members[member] = true
      deadlines[#deadlines + 1] = deadline
      deadlines[#deadlines + 1] = member
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
-- unpack() is bounded by the Lua C stack (8000 values): large batches go in chunks
for _, index in ipairs(hash_keys) do
  local fields = hashes[index]
  for first = 1, #fields, 2000 do
    redis.call('HSET', KEYS[index], unpack(fields, first, math.min(first + 1999, #fields)))
  end
  redis.call('PEXPIRE', KEYS[index], ARGV[3])
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
