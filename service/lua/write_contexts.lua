-- Compare-and-set of user contexts. The writer read each context, derived its new value (the context
-- format and its rules live in service/state/context.py alone) and stores it here unless the context
-- changed since: every write changes the header (an append moves the step index, an outcome the
-- running to-go values), so an unchanged header means an unchanged context.
-- KEYS[i] a context key; ARGV[1] ttl ms, ARGV[2] header size in bytes, ARGV[2 + i] the header of
--   KEYS[i]'s value as the writer read it ('' for none), ARGV[2 + n + i] the value to store.
-- Each key is handled on its own, so any subset of keys may be sent together (one call per slot on a
-- Redis Cluster). Returns {i, current value ('' for none), ...} for each key left alone.
local ttl, header_size, n = ARGV[1], tonumber(ARGV[2]), #KEYS
local stale = {}
for i, key in ipairs(KEYS) do
  local current = redis.call('GET', key)
  if (current and string.sub(current, 1, header_size) or '') == ARGV[2 + i] then
    redis.call('SET', key, ARGV[2 + n + i], 'PX', ttl)
  else
    stale[#stale + 1] = i
    stale[#stale + 1] = current or ''
  end
end
return stale
