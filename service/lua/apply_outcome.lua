-- Write an outcome into its step of a user's context; later steps and the running to-go values
-- drop by the realized reward and cost (RTG_{t+1} = RTG_t - r_t, CTG_{t+1} = CTG_t - c_t).
-- KEYS[1] context key; ARGV[1] decision id, [2] reward, [3] cost (currency units), [4] ttl ms
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local ctx = cjson.decode(raw)
local reward, cost = tonumber(ARGV[2]), tonumber(ARGV[3])
local found = false
for _, step in ipairs(ctx.s) do
  if found then
    step[5] = step[5] - reward
    step[6] = step[6] - cost
  end
  if step[1] == ARGV[1] then
    step[3] = reward
    step[4] = cost
    found = true
  end
end
ctx.g = ctx.g - reward
ctx.k = ctx.k - cost
redis.call('SET', KEYS[1], cjson.encode(ctx), 'PX', ARGV[4])
return 1
