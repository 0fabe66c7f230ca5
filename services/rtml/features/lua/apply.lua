-- Apply a micro-batch to a group of entities: per entity atomically, each event_id at most once.
-- KEYS[e] = entity e's seen-set (sorted set event_id -> arrival ms). All KEYS share one hash slot when Redis
--           is a cluster (the client groups entities by slot); on a single node any entities may share a call.
-- ARGV[1] = ONE flat JSON array (flat: decoding nested tables cost Redis more than applying the batch):
--   now, horizon, trim, nfeats, then per feature: name, ttl_ms (0 = lifetime), oldest tile read, kind, tile_ms;
--   then per entity: base, nids, ids..., mode, and
--     mode 0: nops, ops...  -- the events' ops folded per feature and tile (plan.aggregate); applied only when
--             every id is new; nothing is written when all are duplicates; a MIX answers -1 and writes
--             nothing (the client resends that entity in mode 1). Folding: a busy entity costs ~5 commands.
--     mode 1: per id: nops, ops...  -- that event's own ops, applied when the id is new.
--   An op is kind, feature index, then: tile, a, b (c s m r n x l); n, tile|key... (d); tile, n, key... (h).
-- Keys: feature hashes base .. ':f:' .. name (tile fields -> partial aggregates, '_p' = oldest tile kept);
-- base .. ':u' = when the entity last changed. Returns {applied_1, duplicates_1, ...}; applied -1 = resend.
-- Needs Redis >= 6.2 (ZMSCORE, SET ... GET).
local a = cjson.decode(ARGV[1])
local now, horizon, trim = a[1], a[2], a[3]
local call, unpack, tonumber = redis.call, unpack, tonumber
local CHUNK = 1000  -- arguments per command (Lua's unpack is limited to a few thousand)
local feats = {}
local i = 5
for f = 1, a[4] do
  feats[f] = {a[i], a[i + 1], a[i + 2], a[i + 3], a[i + 4]}  -- name, ttl, min_tile, kind, tile_ms
  i = i + 5
end

-- A write created a new field of a windowed feature (a new tile, or a new key): when the oldest tile to keep
-- has moved since '_p' (kept inside the hash, so a hash that expired comes back without it), drop the tiles
-- that slid out and renew the TTL. Every field is created after such a check in its tile period, so the TTL
-- (window + 2 tiles + future allowance from the check) outlives every read the field can serve.
local function housekeep(key, f)
  if f[2] == 0 then return end
  local min_tile = f[3]
  if min_tile <= tonumber(call('HGET', key, '_p') or '-1e18') then return end
  for _, fld in ipairs(call('HKEYS', key)) do
    local t = tonumber(string.match(fld, '^%a?(%-?%d+)'))
    if t and t < min_tile then
      call('HDEL', key, fld)
      if f[4] == 'h' then call('DEL', key .. ':h:' .. fld) end
    end
  end
  call('HSET', key, '_p', string.format('%d', min_tile))
  call('PEXPIRE', key, f[2] + f[5])
end

-- Apply ops a[j..]; returns the index after them. `write` false: only skip over them.
local function ops(base, j, nops, write)
  for _ = 1, nops do
    local kind, f = a[j], feats[a[j + 1]]
    local key = base .. ':f:' .. f[1]
    if kind == 'd' then
      local n = a[j + 2]
      if write then
        local new = 0
        for k = j + 3, j + 2 + n, CHUNK do
          local args = {}
          for m = k, math.min(k + CHUNK - 1, j + 2 + n) do args[#args + 1] = a[m]; args[#args + 1] = 1 end
          new = new + call('HSET', key, unpack(args))
        end
        if new > 0 then housekeep(key, f) end
      end
      j = j + 3 + n
    elseif kind == 'h' then
      local tile, n = a[j + 2], a[j + 3]
      if write then
        -- approximate distinct count: one HyperLogLog per tile (12 KB at most), listed in the hash
        local hk = key .. ':h:' .. tile
        for k = j + 4, j + 3 + n, CHUNK do call('PFADD', hk, unpack(a, k, math.min(k + CHUNK - 1, j + 3 + n))) end
        if f[2] > 0 then call('PEXPIRE', hk, f[2]) end
        if call('HSET', key, tile, 1) == 1 then housekeep(key, f) end
      end
      j = j + 4 + n
    else
      if write then
        local tile, x, y = a[j + 2], a[j + 3], a[j + 4]
        local new = false
        if kind == 'c' then
          new = call('HINCRBY', key, tile, x) == x
        elseif kind == 's' then
          new = tonumber(call('HINCRBYFLOAT', key, tile, x)) == tonumber(x)
        elseif kind == 'm' then
          call('HINCRBYFLOAT', key, 's' .. tile, x)
          new = call('HINCRBY', key, 'c' .. tile, y) == y
        elseif kind == 'r' then
          if x ~= 0 and call('HINCRBY', key, 'n' .. tile, x) == x then new = true end
          if y ~= 0 and call('HINCRBY', key, 'd' .. tile, y) == y then new = true end
        elseif kind == 'n' or kind == 'x' then
          local cur = call('HGET', key, tile)
          local v = tonumber(x)
          if (not cur) or (kind == 'n' and v < tonumber(cur)) or (kind == 'x' and v > tonumber(cur)) then
            call('HSET', key, tile, x)
          end
          new = not cur
        elseif kind == 'l' then
          local cur = call('HGET', key, 't' .. tile)
          if (not cur) or x >= tonumber(cur) then  -- ties: the later arrival
            call('HSET', key, 't' .. tile, x, 'v' .. tile, y)
          end
          new = not cur
        end
        if new then housekeep(key, f) end
      end
      j = j + 5
    end
  end
  return j
end

-- Are ids a[j..j+n-1] all new ('new', and now recorded), all seen ('dup') or a mix ('mixed')? Nothing is
-- written unless all are new. Two commands whatever n is.
local function check_all(seen, j, n)
  if n == 1 then
    if call('ZADD', seen, 'NX', now, a[j]) == 1 then return 'new' end
    return 'dup'
  end
  local present = 0
  for k = j, j + n - 1, CHUNK do
    for _, s in ipairs(call('ZMSCORE', seen, unpack(a, k, math.min(k + CHUNK - 1, j + n - 1)))) do
      if s then present = present + 1 end
    end
  end
  if present == n then return 'dup' end
  if present > 0 then return 'mixed' end
  for k = j, j + n - 1, CHUNK do
    local args = {}
    for m = k, math.min(k + CHUNK - 1, j + n - 1) do args[#args + 1] = now; args[#args + 1] = a[m] end
    call('ZADD', seen, unpack(args))
  end
  return 'new'
end

local result = {}
local e = 0
while i <= #a do
  e = e + 1
  local seen, base, nids = KEYS[e], a[i], a[i + 1]
  local ids = i + 2
  local mode = a[ids + nids]
  i = ids + nids + 1
  local applied, dups = 0, 0
  if mode == 1 then
    for k = 0, nids - 1 do
      local new = call('ZADD', seen, 'NX', now, a[ids + k]) == 1
      if new then applied = applied + 1 else dups = dups + 1 end
      i = ops(base, i + 1, a[i], new)
    end
  else
    local state = check_all(seen, ids, nids)
    if state == 'mixed' then applied = -1
    elseif state == 'dup' then dups = nids
    else applied = nids end
    i = ops(base, i + 1, a[i], state == 'new')
  end
  if applied > 0 then
    -- when the entity last changed; its previous value decides the (once a `trim` period) seen-set trim
    local prev = call('SET', base .. ':u', now, 'PX', horizon, 'GET')
    if (not prev) or math.floor(tonumber(prev) / trim) ~= math.floor(now / trim) then
      call('ZREMRANGEBYSCORE', seen, '-inf', now - horizon)
      call('PEXPIRE', seen, horizon + trim)
    end
  end
  result[2 * e - 1] = applied
  result[2 * e] = dups
end
return result
