-- Append each decision as the newest step of its user's context, keeping the last ARGV[1] steps.
-- The value is binary (service/state/context.py): a header struct '<BHIdd' (format version, step record
-- size, next step index t, running rtg, running ctg), then fixed-size step records; this script only
-- unpacks the header and concatenates, so its cost does not grow with the feature size.
-- KEYS[i] a context key; ARGV[1] capacity (steps kept), ARGV[2] ttl ms, ARGV[3] the header of a new
--   context; ARGV[4] the steps for KEYS[1..n] concatenated, each 32-byte decision id + i4 action + f4
--   features, all the same size (one argument, not one per key: the client packs each argument apart).
--   ARGV[4 + i] the first 23 bytes (the header) of KEYS[i]'s value as the caller read it ("" for none),
--   ARGV[4 + n + i] the value the caller derived from that read with the step appended. It is stored
--   first (SET ... GET: one call, which also returns what it replaced) and stays when the replaced
--   header is the one the caller read (every writer changes it: an append moves t, an outcome the running
--   to-go values); otherwise the step is appended here to the replaced value, and that is stored instead
--   (all inside this script, so no reader sees the interim value). SET ... GET needs Redis 6.2.
-- Each key is handled on its own, so any subset of keys may be sent together (one call per Redis
-- Cluster slot there; the service sends a request's users in one call to a standalone Redis).
local capacity, ttl, initial, steps = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local n = #KEYS
local step_size = #steps / n
local HEADER, HEADER_SIZE, PREFIX_SIZE, RUNNING_SIZE = '<BHI4dd', 23, 36, 20
for i, key in ipairs(KEYS) do
  local raw = redis.call('SET', key, ARGV[4 + n + i], 'PX', ttl, 'GET')
  if (raw and string.sub(raw, 1, HEADER_SIZE) or '') ~= ARGV[4 + i] then
    local step = string.sub(steps, (i - 1) * step_size + 1, i * step_size)
    local size = #step + RUNNING_SIZE
    local version, stored_size, t, rtg, ctg
    if raw and #raw >= HEADER_SIZE then
      version, stored_size, t, rtg, ctg = struct.unpack(HEADER, raw)
    end
    if not raw or version ~= 1 or stored_size ~= size or (#raw - HEADER_SIZE) % size ~= 0 then
      raw = initial -- absent, unreadable or written for another feature size: start afresh
      version, stored_size, t, rtg, ctg = struct.unpack(HEADER, raw)
    end
    local record = string.sub(step, 1, PREFIX_SIZE) .. struct.pack('<ffffi4', 0, 0, rtg, ctg, t)
      .. string.sub(step, PREFIX_SIZE + 1)
    local body = string.sub(raw, HEADER_SIZE + 1) .. record
    if capacity <= 0 then
      body = ''
    elseif #body > capacity * size then
      body = string.sub(body, #body - capacity * size + 1)
    end
    redis.call('SET', key, struct.pack(HEADER, 1, size, t + 1, rtg, ctg) .. body, 'PX', ttl)
  end
end
return #KEYS
