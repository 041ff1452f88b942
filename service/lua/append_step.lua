-- Append a decision as the newest step of a user's context, keeping the last ARGV[2]'s capacity steps.
-- The context is text, so this script never parses JSON: a header "t|rtg|ctg" (next step index,
-- running return-to-go and cost-to-go) then one JSON array per step and line (see service.state.base).
-- KEYS[1] context key
-- ARGV[1] "decision id|action|features hex", ARGV[2] "capacity|ttl ms|initial rtg|initial ctg"
--   (packed: fewer arguments per call is what keeps a 1024-user pipeline cheap on the client)
local decision_id, action, features = string.match(ARGV[1], '^([^|]*)|([^|]*)|([^|]*)$')
local capacity, ttl, initial_rtg, initial_ctg = string.match(ARGV[2], '^([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
local raw = redis.call('GET', KEYS[1])
local header, body = '0|' .. initial_rtg .. '|' .. initial_ctg, ''
if raw then
  local newline = string.find(raw, '\n', 1, true)
  if newline then
    header, body = string.sub(raw, 1, newline - 1), string.sub(raw, newline + 1)
  else
    header = raw
  end
end
local t, rtg, ctg = string.match(header, '^(%d+)|([^|]+)|([^|]+)$')
if not t then -- unreadable (not written by this service): start the context afresh
  t, rtg, ctg, body = '0', initial_rtg, initial_ctg, ''
end
local lines = {}
for line in string.gmatch(body, '[^\n]+') do lines[#lines + 1] = line end
lines[#lines + 1] = '["' .. decision_id .. '",' .. action .. ',0,0,' .. rtg .. ',' .. ctg .. ',' .. t .. ',"'
  .. features .. '"]'
local first = math.max(1, #lines - tonumber(capacity) + 1)
local value = string.format('%d', tonumber(t) + 1) .. '|' .. rtg .. '|' .. ctg
if first <= #lines then value = value .. '\n' .. table.concat(lines, '\n', first, #lines) end
redis.call('SET', KEYS[1], value, 'PX', ttl)
return 1
