-- Write an outcome into its step of a user's context; later steps and the running to-go values
-- drop by the realized reward and cost (RTG_{t+1} = RTG_t - r_t, CTG_{t+1} = CTG_t - c_t).
-- KEYS[1] context key; ARGV[1] decision id, [2] reward, [3] cost (currency units), [4] ttl ms
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local function num(x) return string.format('%.17g', x) end
local reward, cost = tonumber(ARGV[2]), tonumber(ARGV[3])
local lines = {}
for line in string.gmatch(raw, '[^\n]+') do lines[#lines + 1] = line end
local t, rtg, ctg = string.match(lines[1], '^(%d+)|([^|]+)|([^|]+)$')
if not t then return 0 end
lines[1] = t .. '|' .. num(tonumber(rtg) - reward) .. '|' .. num(tonumber(ctg) - cost)
local found = false
for i = 2, #lines do
  if found then
    local step = cjson.decode(lines[i])
    step[5], step[6] = step[5] - reward, step[6] - cost
    lines[i] = cjson.encode(step)
  elseif string.find(lines[i], '["' .. ARGV[1] .. '",', 1, true) == 1 then
    local step = cjson.decode(lines[i])
    step[3], step[4] = reward, cost
    lines[i] = cjson.encode(step)
    found = true
  end
end
redis.call('SET', KEYS[1], table.concat(lines, '\n'), 'PX', ARGV[4])
return 1
