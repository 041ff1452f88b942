-- Compare-and-set of user contexts. The writer read each context, derived its new value (the context
-- format and its rules live in service/state/context.py alone) and stores it here unless the context
-- changed since: every write changes the header (an append moves the step index, an outcome the
-- running to-go values), so an unchanged header means an unchanged context.
-- KEYS[i] a context key; ARGV[1] ttl ms, ARGV[2] header size h in bytes, ARGV[3] the headers of the
--   KEYS' values as the writer read them, h bytes each, concatenated (h zero bytes for none: a header
--   never starts with a zero byte), ARGV[4] the values to store, concatenated, ARGV[5] their lengths,
--   comma-separated (one argument each, not one per key: the client handles each argument apart).
-- Each key is handled on its own, so any subset of keys may be sent together (one call per slot on a
-- Redis Cluster). Returns {i, current value ('' for none), ...} for each key left alone.
local ttl, h, headers, values = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local none = string.rep('\0', h)
local stale, i, offset = {}, 0, 1
for length in string.gmatch(ARGV[5], '%d+') do
  i = i + 1
  local key, value_end = KEYS[i], offset + tonumber(length)
  -- the header alone is compared (the value itself is read only when it changed: its reply costs more)
  local seen = redis.call('GETRANGE', key, 0, h - 1)
  if #seen < h then seen = seen .. string.sub(none, 1, h - #seen) end -- zero-padded as the writer pads it
  if seen == string.sub(headers, (i - 1) * h + 1, i * h) then
    redis.call('SET', key, string.sub(values, offset, value_end - 1), 'PX', ttl)
  else
    stale[#stale + 1] = i
    stale[#stale + 1] = redis.call('GET', key) or ''
  end
  offset = value_end
end
return stale
