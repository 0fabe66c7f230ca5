-- Read features of one entity at time as_of, in one call.
-- KEYS = feature hashes; ARGV: as_of, then per key: kind, tile_ms, n_tiles (0 = lifetime)
-- Returns two entries per key: the value (a number as text, JSON text for 'l', or nil when empty) and
-- the time the key was last updated (epoch ms as text, or nil).
local as_of = tonumber(ARGV[1])
local out = {}
local function num(x) return string.format('%.17g', x) end
for k = 1, #KEYS do
  local base = 2 + (k - 1) * 3
  local kind, g, n = ARGV[base], tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  local lo, hi = -1e18, 1e18
  if n > 0 then hi = math.floor(as_of / g); lo = hi - n + 1 end
  local all = redis.call('HGETALL', KEYS[k])
  local acc, acc2, best_t, best_v, seen, distinct = 0, 0, nil, nil, false, 0
  local values, hll, updated = {}, {}, false
  for j = 1, #all, 2 do
    local f, v = all[j], all[j + 1]
    if f == '_u' then updated = v end
    local p, ts = string.match(f, '^(%a?)(%-?%d+)')
    local t = tonumber(ts)
    if t and t >= lo and t <= hi then
      if kind == 'c' or kind == 's' then
        acc = acc + tonumber(v); seen = true
      elseif kind == 'm' or kind == 'r' then
        if p == 's' or p == 'n' then acc = acc + tonumber(v) else acc2 = acc2 + tonumber(v) end
      elseif kind == 'n' then
        local x = tonumber(v)
        if not seen or x < acc then acc = x end
        seen = true
      elseif kind == 'x' then
        local x = tonumber(v)
        if not seen or x > acc then acc = x end
        seen = true
      elseif kind == 'l' then
        if p == 't' and (best_t == nil or tonumber(v) > best_t) then best_t = tonumber(v); best_v = ts end
      elseif kind == 'h' then
        hll[#hll + 1] = KEYS[k] .. ':h:' .. ts
      elseif kind == 'd' then
        local val = string.sub(f, string.len(ts) + 2)
        if not values[val] then values[val] = true; distinct = distinct + 1 end
      end
    end
  end
  local r
  if kind == 'c' or kind == 's' then r = num(acc)
  elseif kind == 'd' then r = num(distinct)
  elseif kind == 'h' then
    if #hll > 0 then r = num(redis.call('PFCOUNT', unpack(hll))) else r = '0' end
  elseif kind == 'm' or kind == 'r' then
    if acc2 == 0 then r = false else r = num(acc / acc2) end
  elseif kind == 'n' or kind == 'x' then
    if seen then r = num(acc) else r = false end
  elseif kind == 'l' then
    if best_t == nil then r = false else r = redis.call('HGET', KEYS[k], 'v' .. best_v) end
  end
  out[2 * k - 1] = r
  out[2 * k] = updated
end
return out
