-- Append a decision as the newest step of a user's context, keeping the last ARGV[4] steps.
-- The context is text, so this script never parses JSON: a header "t|rtg|ctg" (next step index,
-- running return-to-go and cost-to-go) then one JSON array per step and line (see service.state.base).
-- KEYS[1] context key
-- ARGV[1] decision id, [2] action, [3] features (hex), [4] capacity, [5] ttl ms,
--   [6] initial return-to-go, [7] initial cost-to-go (JSON numbers)
local raw = redis.call('GET', KEYS[1])
local header, body = '0|' .. ARGV[6] .. '|' .. ARGV[7], ''
if raw then
  local newline = string.find(raw, '\n', 1, true)
  if newline then
    header, body = string.sub(raw, 1, newline - 1), string.sub(raw, newline + 1)
  else
    header = raw
  end
end
local t, rtg, ctg = string.match(header, '^([^|]*)|([^|]*)|([^|]*)$')
local lines = {}
for line in string.gmatch(body, '[^\n]+') do lines[#lines + 1] = line end
lines[#lines + 1] = '["' .. ARGV[1] .. '",' .. ARGV[2] .. ',0,0,' .. rtg .. ',' .. ctg .. ',' .. t .. ',"'
  .. ARGV[3] .. '"]'
local first = math.max(1, #lines - tonumber(ARGV[4]) + 1)
local value = string.format('%d', tonumber(t) + 1) .. '|' .. rtg .. '|' .. ctg
if first <= #lines then value = value .. '\n' .. table.concat(lines, '\n', first, #lines) end
redis.call('SET', KEYS[1], value, 'PX', ARGV[5])
return 1
