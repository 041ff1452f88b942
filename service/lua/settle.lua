-- Settle a batch of outcomes atomically: the realized cost replaces the reservation
-- (reserved -= reserved amount, spent += cost). All or nothing: a cost above the coupon's cost refuses all
-- (in strict mode a coupon reserves its cost, so a settled cost never exceeds its reservation).
-- KEYS[1] campaign hash, KEYS[2..] the record hashes of the batches the outcomes name
-- ARGV per outcome: cost cents, reward cents, index of its record hash in KEYS, its field there
-- Returns {'missing'} unknown campaign | {'too_high', index, coupon cost} | {remaining, code, user, ...}
--   with code 'A' accepted, 'D' duplicate, 'U' unknown (or expired record).
-- Decision record: see reserve.lua. Each settled coupon adds its predicted cost to issued:<action> and its
-- realised cost to realised:<action> (the ratio that corrects the model's predictions), and takes its
-- predicted cost out of outstanding_predicted (what pacing counts as outstanding spend).
-- Learning loop: KEYS[#KEYS] the campaign's log stream; the last two ARGV: now ms ('': the store's clock,
--   Redis TIME), the log's MAXLEN (approximate; 0: no log). Each accepted outcome adds one `outcome` entry to the log (docs/state.md) and
--   counts in its group, holdout (a record whose probability is marked /h) or treated: <group>_settled,
--   <group>_reward (cents), <group>_cost (cents).
local campaign = KEYS[1]
local RECORD = '^(%u)\t(%d+)\t(%d+)\t([^\t]*)\t(%d+)\t(%d+)\t([^\t]*\t[^\t]*\t[^\t]*\t[^\t]*)\t[^\t]*\t[^\t]*\t(%d+)\t()'
local function int(x) return string.format('%d', x) end

if redis.call('EXISTS', campaign) == 0 then return {'missing'} end
local n = (#ARGV - 2) / 4
local now, log_max, log = ARGV[#ARGV - 1], ARGV[#ARGV], KEYS[#KEYS]
if now == '' then
  local time = redis.call('TIME')
  now = string.format('%d', tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000))
end
local function record(i)
  local value = redis.call('HGET', KEYS[tonumber(ARGV[4 * i - 1])], ARGV[4 * i])
  if not value then return nil end
  local status, reserved, face, variance, predicted, action, middle, request_length, tail = string.match(value, RECORD)
  return status, reserved, face, variance, predicted, action, middle, request_length, tail, value
end
for i = 1, n do
  local status, _, face = record(i)
  if status and status ~= 'S' and tonumber(ARGV[4 * i - 3]) > tonumber(face) then
    return {'too_high', i - 1, face}
  end
end
local out = {0}
for i = 1, n do
  -- read again: the batch may name a decision twice
  local status, reserved, face, variance, predicted, action, middle, request_length, tail, value = record(i)
  local cost = tonumber(ARGV[4 * i - 3])
  if not status then
    out[#out + 1] = 'U'
    out[#out + 1] = ''
  elseif status == 'S' then
    out[#out + 1] = 'D'
    out[#out + 1] = ''
  else
    if status == 'R' then
      redis.call('HINCRBY', campaign, 'reserved', int(-tonumber(reserved)))
      if tonumber(variance) > 0 then redis.call('HINCRBYFLOAT', campaign, 'outstanding_var', -tonumber(variance)) end
      redis.call('HINCRBY', campaign, 'spent', int(cost))
      if action ~= '0' then
        redis.call('HINCRBY', campaign, 'outstanding_predicted', int(-tonumber(predicted)))
        redis.call('HINCRBY', campaign, 'outstanding_face', int(-tonumber(face)))
        redis.call('HINCRBY', campaign, 'issued:' .. action, predicted)
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
    end
    if action ~= '0' then redis.call('HINCRBY', campaign, 'realised:' .. action, int(cost)) end
    local rest = string.sub(value, tail)
    redis.call('HSET', KEYS[tonumber(ARGV[4 * i - 1])], ARGV[4 * i], table.concat({'S', reserved, face, variance,
      predicted, action, middle, ARGV[4 * i - 2], ARGV[4 * i - 3], request_length, rest}, '\t'))
    local user = string.sub(rest, tonumber(request_length) + 2)
    out[#out + 1] = 'A'
    out[#out + 1] = user
    -- the group's counters and the outcome log
    local probability, decided_at = string.match(middle, '^([^\t]*)\t([^\t]*)')
    local group = string.sub(probability, -2) == '/h' and 'holdout_' or 'treated_'
    local reward = ARGV[4 * i - 2]
    redis.call('HINCRBY', campaign, group .. 'settled', 1)
    redis.call('HINCRBY', campaign, group .. 'reward', reward)
    redis.call('HINCRBY', campaign, group .. 'cost', int(cost))
    if log_max ~= '0' then
      local key = KEYS[tonumber(ARGV[4 * i - 1])]
      log_add(campaign, log, log_max, 'kind', 'outcome',
        'decision_id', 'd-' .. string.match(key, ':b:(%x+)$') .. '-' .. ARGV[4 * i], 'user_id', user,
        'action', action, 'reward', reward, 'cost', int(cost), 'at_ms', now, 'decided_at_ms', decided_at)
    end
  end
end
local ledger = redis.call('HMGET', campaign, 'budget', 'spent', 'reserved')
out[1] = tonumber(ledger[1]) - tonumber(ledger[2]) - tonumber(ledger[3])
return out
