-- Apply one entity's events atomically, each at most once (dedup by event_id).
-- KEYS[1]   = the entity's seen-set (sorted set: event_id -> arrival ms)
-- KEYS[2..] = the entity's feature hashes (field = tile, or prefix..tile)
-- ARGV: now, horizon_ms, nkeys, then per feature key: ttl_ms (0 = lifetime), min_tile, kind,
--       then nevents, then per event: event_id, nops, then per op: kind, key_index, tile, a, b
-- Returns {applied, duplicates}.
local now = tonumber(ARGV[1])
local horizon = tonumber(ARGV[2])
local nkeys = tonumber(ARGV[3])
local seen = KEYS[1]
local i = 4
local ttl, min_tile, kinds, touched = {}, {}, {}, {}
for k = 1, nkeys do
  ttl[k] = tonumber(ARGV[i]); min_tile[k] = tonumber(ARGV[i + 1]); kinds[k] = ARGV[i + 2]; i = i + 3
end

redis.call('ZREMRANGEBYSCORE', seen, '-inf', now - horizon)

local applied, dups = 0, 0
local nevents = tonumber(ARGV[i]); i = i + 1
for e = 1, nevents do
  local eid = ARGV[i]; local nops = tonumber(ARGV[i + 1]); i = i + 2
  local fresh = redis.call('ZADD', seen, 'NX', now, eid) == 1
  if fresh then applied = applied + 1 else dups = dups + 1 end
  for o = 1, nops do
    if fresh then
      local ki = tonumber(ARGV[i + 1])
      local kind, key, tile, a, b = ARGV[i], KEYS[ki + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
      touched[ki] = true
      if kind == 'c' then
        redis.call('HINCRBY', key, tile, 1)
      elseif kind == 's' then
        redis.call('HINCRBYFLOAT', key, tile, a)
      elseif kind == 'm' then
        redis.call('HINCRBYFLOAT', key, 's' .. tile, a)
        redis.call('HINCRBY', key, 'c' .. tile, 1)
      elseif kind == 'n' or kind == 'x' then
        local cur = redis.call('HGET', key, tile)
        local v = tonumber(a)
        if (not cur) or (kind == 'n' and v < tonumber(cur)) or (kind == 'x' and v > tonumber(cur)) then
          redis.call('HSET', key, tile, a)
        end
      elseif kind == 'l' then
        local cur = redis.call('HGET', key, 't' .. tile)
        if (not cur) or tonumber(a) >= tonumber(cur) then
          redis.call('HSET', key, 't' .. tile, a, 'v' .. tile, b)
        end
      elseif kind == 'd' then
        redis.call('HSET', key, tile .. '|' .. a, 1)
      elseif kind == 'h' then
        -- approximate distinct count: one HyperLogLog per tile (12 KB at most), listed in the hash
        redis.call('HSET', key, tile, 1)
        local hk = key .. ':h:' .. tile
        redis.call('PFADD', hk, a)
        if ttl[ki] > 0 then redis.call('PEXPIRE', hk, ttl[ki]) end
      elseif kind == 'r' then
        if a ~= '0' then redis.call('HINCRBY', key, 'n' .. tile, tonumber(a)) end
        if b ~= '0' then redis.call('HINCRBY', key, 'd' .. tile, tonumber(b)) end
      end
    end
    i = i + 5
  end
end

-- Housekeeping: drop tiles that slid out of every future read (once per tile advance), refresh TTLs.
for k = 1, nkeys do
  local key = KEYS[k + 1]
  if touched[k] then redis.call('HSET', key, '_u', now) end
  if ttl[k] > 0 then
    local pruned = tonumber(redis.call('HGET', key, '_p') or '-1e18')
    if min_tile[k] > pruned then
      local fields = redis.call('HKEYS', key)
      for _, f in ipairs(fields) do
        local t = tonumber(string.match(f, '^%a?(%-?%d+)'))
        if t and t < min_tile[k] then
          redis.call('HDEL', key, f)
          if kinds[k] == 'h' then redis.call('DEL', key .. ':h:' .. f) end
        end
      end
      redis.call('HSET', key, '_p', min_tile[k])
    end
    redis.call('PEXPIRE', key, ttl[k])
  end
end
redis.call('PEXPIRE', seen, horizon)
return {applied, dups}
