-- Write outcomes into their steps of the users' contexts; each step after it and the running to-go
-- values drop by the realized reward and cost (RTG_{t+1} = RTG_t - r_t, CTG_{t+1} = CTG_t - c_t).
-- Binary context format: see append_steps.lua and service/state/context.py (record: decision 32s,
-- action i4, reward f4, cost f4, rtg f4, ctg f4, t i4, features).
-- KEYS[i] the context key of outcome i (a user may appear more than once: outcomes apply in order);
-- ARGV[1] ttl ms, then per outcome: 32-byte decision id, reward, cost (currency units, text).
-- A missing or unreadable context is left alone. Any subset of keys may be sent together.
local ttl = ARGV[1]
local HEADER, HEADER_SIZE, REWARD_AT, TOGO_AT = '<BHI4dd', 23, 36, 44
local applied = 0
for i, key in ipairs(KEYS) do
  local wanted, reward, cost = ARGV[3 * i - 1], tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
  local raw = redis.call('GET', key)
  local version, size, t, rtg, ctg
  if raw and #raw >= HEADER_SIZE then
    version, size, t, rtg, ctg = struct.unpack(HEADER, raw)
  end
  if raw and version == 1 and size > TOGO_AT and (#raw - HEADER_SIZE) % size == 0 then
    local parts = {struct.pack(HEADER, 1, size, t, rtg - reward, ctg - cost)}
    local found = false
    for offset = HEADER_SIZE, #raw - 1, size do -- offset: 0-based start of a record
      local record = string.sub(raw, offset + 1, offset + size)
      if found then
        local step_rtg, step_ctg = struct.unpack('<ff', record, TOGO_AT + 1)
        record = string.sub(record, 1, TOGO_AT) .. struct.pack('<ff', step_rtg - reward, step_ctg - cost)
          .. string.sub(record, TOGO_AT + 9)
      elseif string.sub(record, 1, 32) == wanted then
        record = string.sub(record, 1, REWARD_AT) .. struct.pack('<ff', reward, cost)
          .. string.sub(record, REWARD_AT + 9)
        found = true
      end
      parts[#parts + 1] = record
    end
    redis.call('SET', key, table.concat(parts), 'PX', ttl)
    applied = applied + 1
  end
end
return applied
