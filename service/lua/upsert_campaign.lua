-- Create/replace or patch a campaign's configuration; the ledger (spent, reserved) is never touched,
-- so live reservations survive and the reservation script keeps checking against the new budget.
-- KEYS[1] campaign hash, KEYS[2] the campaign's decision config: one string "budget\tlambda\tusers\tcoupons
--   JSON", what a decision reads of its campaign (with its users' contexts in one MGET)
-- ARGV[1] '1' replace (create if missing) | '0' patch (nil if missing)
-- ARGV[2] budget cents | ''    ARGV[3] coupons JSON {"action": cents} | ''
-- ARGV[4] lambda | '' keep | '-' clear    ARGV[5] expected users | '' keep | '-' clear
-- ARGV[6] campaign id
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then
  if ARGV[1] ~= '1' then return false end
  redis.call('HSET', key, 'id', ARGV[6], 'budget', 0, 'spent', 0, 'reserved', 0, 'coupons', '{}',
    'lambda', '', 'users', '', 'model_version', '', 'decisions', 0, 'overrun', 0)
end
if ARGV[1] == '1' then redis.call('HSET', key, 'lambda', '', 'users', '') end
if ARGV[2] ~= '' then redis.call('HSET', key, 'budget', ARGV[2]) end
if ARGV[3] ~= '' then redis.call('HSET', key, 'coupons', ARGV[3]) end
if ARGV[4] == '-' then redis.call('HSET', key, 'lambda', '') elseif ARGV[4] ~= '' then
  redis.call('HSET', key, 'lambda', ARGV[4]) end
if ARGV[5] == '-' then redis.call('HSET', key, 'users', '') elseif ARGV[5] ~= '' then
  redis.call('HSET', key, 'users', ARGV[5]) end
local config = redis.call('HMGET', key, 'budget', 'lambda', 'users', 'coupons')
redis.call('SET', KEYS[2], table.concat(config, '\t'))
return redis.call('HGETALL', key)
