-- The store's clock (ms), read on the node of KEYS[1]: the clock reserve.lua's deadlines and sweep.lua's
-- releases read.
local time = redis.call('TIME')
return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
