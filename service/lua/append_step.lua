-- Append a decision as the newest step of a user's context, keeping the last ARGV[4] steps.
-- KEYS[1] context key
-- ARGV[1] decision id, [2] action, [3] features (hex, opaque here), [4] capacity, [5] ttl ms,
--   [6] initial return-to-go, [7] initial cost-to-go
local raw = redis.call('GET', KEYS[1])
local ctx
if raw then ctx = cjson.decode(raw) else
  ctx = {t = 0, g = tonumber(ARGV[6]), k = tonumber(ARGV[7]), s = {}}
end
local steps = ctx.s
steps[#steps + 1] = {ARGV[1], tonumber(ARGV[2]), 0, 0, ctx.g, ctx.k, ctx.t, ARGV[3]}
local capacity = tonumber(ARGV[4])
while #steps > capacity do table.remove(steps, 1) end
ctx.t = ctx.t + 1
redis.call('SET', KEYS[1], cjson.encode(ctx), 'PX', ARGV[5])
return 1
