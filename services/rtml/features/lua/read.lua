-- Read features of several entities at time as_of, in one call.
-- KEYS = entity key bases (their hash tags route the call: on a cluster the client sends one call per slot);
-- the feature hashes of an entity are its base .. ':f:' .. name.
-- ARGV[1] = as_of; ARGV[2] = JSON [spec, ...], spec = [[name, kind, tile_ms, n_tiles (0 = lifetime)], ...]
-- (each cached by the client); ARGV[3] = JSON [spec number (1-based) of each key]; ARGV[4] (optional) = '0'
-- to leave out when each entity last changed (serving does not need it).
-- Returns one array per key: one value per feature of its spec (a number as text, JSON text for 'l', or nil
-- when empty), then (unless ARGV[4] is '0') the time the entity last changed (epoch ms as text, or nil).
-- Field names (see apply.lua): a bare tile number, or one letter then the tile (s/c mean, n/d ratio, t/v last),
-- or 'tile|value' (exact distinct); '_p' is apply.lua's bookkeeping.
local as_of = tonumber(ARGV[1])
local specs = cjson.decode(ARGV[2])
local which = cjson.decode(ARGV[3])
local with_updated = ARGV[4] ~= '0'
local byte, sub, find, tonum = string.byte, string.sub, string.find, tonumber
local function num(x) return string.format('%.17g', x) end

local function read_entity(base, spec)
  local out = {}
  for k, f in ipairs(spec) do
    local key = base .. ':f:' .. f[1]
    local kind, g, n = f[2], f[3], f[4]
    local lo, hi = -1e18, 1e18
    if n > 0 then hi = math.floor(as_of / g); lo = hi - n + 1 end
    local all = redis.call('HGETALL', key)
    local acc, acc2, seen, count = 0, 0, false, 0
    local best_t, best_v = nil, nil
    local values, hll = {}, {}
    for j = 1, #all, 2 do
      local fld = all[j]
      local b = byte(fld, 1)
      if b ~= 95 then  -- '_p' (bookkeeping of apply.lua) is not a tile
        if kind == 'c' or kind == 's' or kind == 'n' or kind == 'x' then
          local t = tonum(fld)
          if t >= lo and t <= hi then
            local x = tonum(all[j + 1])
            if kind == 'n' then
              if not seen or x < acc then acc = x end
            elseif kind == 'x' then
              if not seen or x > acc then acc = x end
            else
              acc = acc + x
            end
            seen = true
          end
        elseif kind == 'm' or kind == 'r' or kind == 'l' then
          local t = tonum(sub(fld, 2))
          if t >= lo and t <= hi then
            if b == 115 or b == 110 then acc = acc + tonum(all[j + 1])          -- 's' sum / 'n' numerator
            elseif b == 99 or b == 100 then acc2 = acc2 + tonum(all[j + 1])     -- 'c' count / 'd' denominator
            elseif b == 116 then                                                 -- 't' ts of last
              local ts = tonum(all[j + 1])
              if best_t == nil or ts > best_t then best_t = ts; best_v = sub(fld, 2) end
            end
          end
        elseif kind == 'd' then
          local bar = find(fld, '|', 1, true)
          local t = tonum(sub(fld, 1, bar - 1))
          if t >= lo and t <= hi then
            local val = sub(fld, bar + 1)
            if not values[val] then values[val] = true; count = count + 1 end
          end
        elseif kind == 'h' then
          local t = tonum(fld)
          if t >= lo and t <= hi then hll[#hll + 1] = key .. ':h:' .. fld end
        end
      end
    end
    local r = false
    if kind == 'c' or kind == 's' then r = num(acc)
    elseif kind == 'd' then r = num(count)
    elseif kind == 'h' then
      if #hll > 0 then r = num(redis.call('PFCOUNT', unpack(hll))) else r = '0' end
    elseif kind == 'm' or kind == 'r' then
      if acc2 ~= 0 then r = num(acc / acc2) end
    elseif kind == 'n' or kind == 'x' then
      if seen then r = num(acc) end
    elseif kind == 'l' then
      if best_t ~= nil then r = redis.call('HGET', key, 'v' .. best_v) end
    end
    out[k] = r
  end
  if with_updated then out[#spec + 1] = redis.call('GET', base .. ':u') or false end
  return out
end

local results = {}
for e = 1, #KEYS do
  results[e] = read_entity(KEYS[e], specs[which[e]])
end
return results
