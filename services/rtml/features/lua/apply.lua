-- Apply one entity's events atomically, each at most once (dedup by event_id).
-- KEYS[1] = the entity's seen-set (sorted set event_id -> arrival ms); its hash tag routes the call.
-- ARGV[1] = JSON {"now", "horizon", "base", "keys": [[feature, ttl_ms (0 = lifetime), min_tile, kind]...],
--                 "events": [[event_id, [[kind, key_index, tile, a, b], ...]], ...]}
-- Feature hashes are base .. ':f:' .. feature (same hash tag). One JSON argument instead of hundreds keeps
-- the client's encoding cost flat. Returns {applied, duplicates}.
local req = cjson.decode(ARGV[1])
local now, horizon, seen = req.now, req.horizon, KEYS[1]
local keys, ttl, min_tile, kinds, touched = {}, {}, {}, {}, {}
for k, spec in ipairs(req.keys) do
  keys[k] = req.base .. ':f:' .. spec[1]; ttl[k] = spec[2]; min_tile[k] = spec[3]; kinds[k] = spec[4]
end

redis.call('ZREMRANGEBYSCORE', seen, '-inf', now - horizon)

local applied, dups = 0, 0
for _, ev in ipairs(req.events) do
  if redis.call('ZADD', seen, 'NX', now, ev[1]) == 1 then
    applied = applied + 1
    for _, op in ipairs(ev[2]) do
      local kind, ki, tile, a, b = op[1], op[2], op[3], op[4], op[5]
      local key = keys[ki]
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
  else
    dups = dups + 1
  end
end

-- Housekeeping: drop tiles that slid out of every future read (once per tile advance), refresh TTLs.
for k = 1, #keys do
  local key = keys[k]
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
      redis.call('HSET', key, '_p', string.format('%d', min_tile[k]))
    end
    redis.call('PEXPIRE', key, ttl[k])
  end
end
redis.call('PEXPIRE', seen, horizon)
return {applied, dups}
