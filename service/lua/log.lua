-- Prepended by the store to the scripts that write the decision log (reserve.lua, settle.lua): the one
-- definition of how an entry is added (contract/log_entry.py is its format). Its keys are the calling
-- script's KEYS, so the Cluster hash-tag rule is the caller's.
-- log_add(campaign, log, log_max, field, value, ...): one entry in the campaign's log stream `log`
-- (docs/state.md, "The decision log"), trimmed to about its bound `log_max`. The entries it trims that the exporter's group `export` has not read (every one while
-- there is no group) count in the campaign's log_lost; the group's cursor then moves past them, so that
-- its lag (XINFO GROUPS) stays the number of unread entries the stream holds, which the next call reads.
local log_len, log_ahead, log_cursor -- length, entries at its head the group read, its last-delivered id
local function log_add(campaign, log, log_max, ...)
  local function info(reply, name)
    for j = 1, #reply - 1, 2 do if reply[j] == name then return reply[j + 1] end end
  end
  log_len = log_len or redis.call('XLEN', log)
  local full = log_len >= tonumber(log_max)
  if full and not log_ahead then
    log_ahead, log_cursor = 0, false -- no group, or Redis does not know its lag: every trimmed entry counts
    for _, group in ipairs(redis.call('XINFO', 'GROUPS', log)) do
      if info(group, 'name') == 'export' then
        log_cursor = info(group, 'last-delivered-id')
        if info(group, 'lag') then log_ahead = math.max(0, log_len - info(group, 'lag')) end
      end
    end
  end
  redis.call('XADD', log, 'MAXLEN', '~', log_max, '*', ...)
  if not full then
    log_len = log_len + 1
    return
  end
  local length = redis.call('XLEN', log)
  local trimmed = log_len + 1 - length
  local lost = math.max(0, trimmed - log_ahead)
  log_len, log_ahead = length, math.max(0, log_ahead - trimmed)
  if lost == 0 then return end
  redis.call('HINCRBY', campaign, 'log_lost', lost)
  if not log_cursor then return end
  -- the trimmed entries are gone: the cursor goes just before the first entry left
  local stream = redis.call('XINFO', 'STREAM', log)
  local ms, seq = string.match(info(stream, 'first-entry')[1], '^(%d+)-(%d+)$')
  local cursor = seq ~= '0' and ms .. '-' .. string.format('%d', tonumber(seq) - 1)
    or string.format('%d', tonumber(ms) - 1) .. '-18446744073709551615'
  local read_ms, read_seq = string.match(log_cursor, '^(%d+)-(%d+)$')
  if tonumber(read_ms) < tonumber(ms) or (read_ms == ms and tonumber(read_seq) < tonumber(seq)) then
    redis.call('XGROUP', 'SETID', log, 'export', cursor, 'ENTRIESREAD', info(stream, 'entries-added') - length)
    log_cursor = cursor
  end
end
