-- Settle a batch of outcomes atomically: the realized cost replaces the reservation
-- (reserved -= reserved amount, spent += cost). All or nothing: a cost above the coupon's cost refuses all
-- (in strict mode a coupon reserves its cost, so a settled cost never exceeds its reservation).
-- KEYS[1] campaign hash, KEYS[2..] the record hashes of the batches the outcomes name
-- ARGV per outcome: cost cents, reward cents, index of its record hash in KEYS, its field there, and the
--   realised cost of each of its coupons, "coupon=cents" ','-separated ('': not given)
-- Returns {'missing'} unknown campaign | {'too_high', index, coupon cost, coupon} | {'not_component', index,
--   coupon} | {'ambiguous', index, coupons} | {remaining, code, user, ...} with code 'A' accepted,
--   'D' duplicate, 'U' unknown (or expired record).
-- Bundles (a catalog campaign's records list their coupons: reserve.lua): each coupon settles on its own,
--   at the cost the outcome gives it (a coupon it does not name: 0, unused), never above its face value; an
--   outcome that gives no coupon costs settles a one-coupon decision with its cost, and a bundle of several
--   only at cost 0 ('ambiguous' otherwise: which coupon cost what is the caller's to say). A coupon that took
--   a unit of stock returns it when it settles unused (cost 0); one redeemed after its reservation expired
--   (the sweep returned its unit) takes its unit again.
-- Decision record: see reserve.lua. Each settled coupon adds its predicted cost to issued:<action> and its
-- realised cost to realised:<action> (the ratio that corrects the model's predictions), and takes its
-- predicted cost out of outstanding_predicted (what pacing counts as outstanding spend).
-- Learning loop: KEYS[#KEYS] the campaign's log stream; the last two ARGV: now ms ('': the store's clock,
--   Redis TIME), the log's MAXLEN (approximate; 0: no log). Each accepted outcome adds one `outcome` entry to the log (docs/state.md) and
--   counts in its group, holdout (a record whose probability is marked /h) or treated: <group>_settled,
--   <group>_reward (cents), <group>_cost (cents).
local campaign = KEYS[1]
local RECORD = '^(%u)\t(%d+)\t(%d+)\t([^\t]*)\t(%d+)\t(%d+)([^\t]*)\t([^\t]*\t[^\t]*\t[^\t]*\t[^\t]*)\t[^\t]*\t[^\t]*\t(%d+)\t()'
local PART = '(%d+),(%d+),(%d+),([^,]*),(%d+),(%d)'
local function int(x) return string.format('%d', x) end

if redis.call('EXISTS', campaign) == 0 then return {'missing'} end
local n = (#ARGV - 2) / 5
local now, log_max, log = ARGV[#ARGV - 1], ARGV[#ARGV], KEYS[#KEYS]
if now == '' then
  local time = redis.call('TIME')
  now = string.format('%d', tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000))
end
local function record(i)
  local value = redis.call('HGET', KEYS[tonumber(ARGV[5 * i - 2])], ARGV[5 * i - 1])
  if not value then return nil end
  local status, reserved, face, variance, predicted, action, parts, middle, request_length, tail = string.match(value, RECORD)
  return status, reserved, face, variance, predicted, action, parts, middle, request_length, tail, value
end
-- the decision's coupons: {coupon, reserved, face, predicted, took stock}; a record without parts (a campaign
-- without a catalog) holds its action alone
local function coupons_of(action, reserved, face, predicted, parts)
  local list = {}
  if parts == '' then
    if action ~= '0' then list[1] = {action, reserved, face, predicted, '0'} end
    return list
  end
  for a, r, f, _, p, took in string.gmatch(parts, PART) do list[#list + 1] = {a, r, f, p, took} end
  return list
end
-- each coupon's realised cost, or an error reply
local function split(i, cost, list)
  local given, costs = ARGV[5 * i], {}
  for k = 1, #list do costs[k] = 0 end
  if given == '' then
    if #list == 0 then
      if cost > 0 then return nil, {'too_high', i - 1, 0, ''} end
    elseif #list == 1 then
      costs[1] = cost
    elseif cost > 0 then
      return nil, {'ambiguous', i - 1, #list}
    end
  else
    for a, c in string.gmatch(given, '(%d+)=(%d+)') do
      local k = nil
      for j = 1, #list do if list[j][1] == a then k = j end end
      if not k then return nil, {'not_component', i - 1, a} end
      costs[k] = tonumber(c)
    end
  end
  for k = 1, #list do
    if costs[k] > tonumber(list[k][3]) then return nil, {'too_high', i - 1, list[k][3], list[k][1]} end
  end
  return costs
end
for i = 1, n do
  local status, reserved, face, _, predicted, action, parts = record(i)
  if status and status ~= 'S' then
    local _, refused = split(i, tonumber(ARGV[5 * i - 4]), coupons_of(action, reserved, face, predicted, parts))
    if refused then return refused end
  end
end
local out = {0}
for i = 1, n do
  -- read again: the batch may name a decision twice
  local status, reserved, face, variance, predicted, action, parts, middle, request_length, tail, value = record(i)
  local cost = tonumber(ARGV[5 * i - 4])
  if not status then
    out[#out + 1] = 'U'
    out[#out + 1] = ''
  elseif status == 'S' then
    out[#out + 1] = 'D'
    out[#out + 1] = ''
  else
    local list = coupons_of(action, reserved, face, predicted, parts)
    local costs = split(i, cost, list)
    if status == 'R' then
      redis.call('HINCRBY', campaign, 'reserved', int(-tonumber(reserved)))
      if tonumber(variance) > 0 then redis.call('HINCRBYFLOAT', campaign, 'outstanding_var', -tonumber(variance)) end
      redis.call('HINCRBY', campaign, 'spent', int(cost))
      if #list > 0 then
        redis.call('HINCRBY', campaign, 'outstanding_predicted', int(-tonumber(predicted)))
        redis.call('HINCRBY', campaign, 'outstanding_face', int(-tonumber(face)))
      end
      for k, coupon in ipairs(list) do
        redis.call('HINCRBY', campaign, 'issued:' .. coupon[1], coupon[4])
        if coupon[5] == '1' and costs[k] == 0 then redis.call('HINCRBY', campaign, 'used:' .. coupon[1], -1) end
      end
    else -- 'X': the reservation expired and was released (and counted as issued at no cost by the
      -- sweep); charge only what still fits the budget (in strict mode: beside every outstanding coupon at
      -- its face value), the rest is overrun
      local ledger = redis.call('HMGET', campaign, 'budget', 'spent', 'reserved', 'reservation_mode',
        'outstanding_face')
      local committed = tonumber(ledger[3])
      if ledger[4] ~= 'expected' then committed = math.max(committed, tonumber(ledger[5]) or 0) end
      local fits = math.max(0, math.min(cost, tonumber(ledger[1]) - tonumber(ledger[2]) - committed))
      redis.call('HINCRBY', campaign, 'spent', int(fits))
      redis.call('HINCRBY', campaign, 'overrun', int(cost - fits))
      for k, coupon in ipairs(list) do
        if coupon[5] == '1' and costs[k] > 0 then redis.call('HINCRBY', campaign, 'used:' .. coupon[1], 1) end
      end
    end
    for k, coupon in ipairs(list) do redis.call('HINCRBY', campaign, 'realised:' .. coupon[1], int(costs[k])) end
    local rest = string.sub(value, tail)
    redis.call('HSET', KEYS[tonumber(ARGV[5 * i - 2])], ARGV[5 * i - 1], table.concat({'S', reserved, face, variance,
      predicted, action .. parts, middle, ARGV[5 * i - 3], ARGV[5 * i - 4], request_length, rest}, '\t'))
    local user = string.sub(rest, tonumber(request_length) + 2)
    out[#out + 1] = 'A'
    out[#out + 1] = user
    -- the group's counters and the outcome log
    local probability, decided_at = string.match(middle, '^([^\t]*)\t([^\t]*)')
    local group = string.sub(probability, -2) == '/h' and 'holdout_' or 'treated_'
    local reward = ARGV[5 * i - 3]
    redis.call('HINCRBY', campaign, group .. 'settled', 1)
    redis.call('HINCRBY', campaign, group .. 'reward', reward)
    redis.call('HINCRBY', campaign, group .. 'cost', int(cost))
    if log_max ~= '0' then
      local key = KEYS[tonumber(ARGV[5 * i - 2])]
      local decision_id = 'd-' .. string.match(key, ':b:(%x+)$') .. '-' .. ARGV[5 * i - 1]
      if parts == '' then
        log_add(campaign, log, log_max, 'kind', 'outcome', 'decision_id', decision_id, 'user_id', user,
          'action', action, 'reward', reward, 'cost', int(cost), 'at_ms', now, 'decided_at_ms', decided_at)
      else -- a catalog campaign's: each coupon's realised cost too
        local coupons, costs_text = {}, {}
        for k, coupon in ipairs(list) do
          coupons[k] = coupon[1]
          costs_text[k] = int(costs[k])
        end
        log_add(campaign, log, log_max, 'kind', 'outcome', 'decision_id', decision_id, 'user_id', user,
          'action', action, 'reward', reward, 'cost', int(cost), 'at_ms', now, 'decided_at_ms', decided_at,
          'coupons', table.concat(coupons, ','), 'coupon_costs', table.concat(costs_text, ','))
      end
    end
  end
end
local ledger = redis.call('HMGET', campaign, 'budget', 'spent', 'reserved')
out[1] = tonumber(ledger[1]) - tonumber(ledger[2]) - tonumber(ledger[3])
return out
