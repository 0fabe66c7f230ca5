-- Apply events to a group of entities; per entity atomically and each event at most once (dedup by event_id).
-- KEYS[e]  = entity e's seen-set (sorted set event_id -> arrival ms). All KEYS share one hash slot when Redis
--            is a cluster (the client groups entities by slot); on a single node any entities may share a call.
-- ARGV[1]  = JSON {"now", "horizon", "entities": [{"base", "keys": [[feature, ttl_ms (0 = lifetime), min_tile,
--             kind]...], "events": [[event_id, [[kind, key_index, tile, a, b], ...]], ...]}, ...]}
-- Feature hashes are base .. ':f:' .. feature (same hash tag as the seen-set); base .. ':u' holds when the
-- entity last changed and base .. ':p' the oldest tile kept per windowed feature. One JSON argument instead of
-- hundreds keeps the client's encoding cost flat. Returns {applied_1, duplicates_1, applied_2, ...}.
local req = cjson.decode(ARGV[1])
local now, horizon = req.now, req.horizon
local result = {}

local function apply_entity(seen, ent)
  local keys, ttl, min_tile, kinds, windowed = {}, {}, {}, {}, {}
  for k, spec in ipairs(ent.keys) do
    keys[k] = ent.base .. ':f:' .. spec[1]; ttl[k] = spec[2]; min_tile[k] = spec[3]; kinds[k] = spec[4]
    if spec[2] > 0 then windowed[#windowed + 1] = k end
  end

  redis.call('ZREMRANGEBYSCORE', seen, '-inf', now - horizon)

  local applied, dups = 0, 0
  for _, ev in ipairs(ent.events) do
    if redis.call('ZADD', seen, 'NX', now, ev[1]) == 1 then
      applied = applied + 1
      for _, op in ipairs(ev[2]) do
        local kind, ki, tile, a, b = op[1], op[2], op[3], op[4], op[5]
        local key = keys[ki]
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

  -- Housekeeping, in few calls: when the entity last changed ({base}:u), and per windowed feature the oldest
  -- tile kept ({base}:p, one HMGET): tiles that slid out of every future read are dropped once per tile advance.
  if applied > 0 then redis.call('SET', ent.base .. ':u', now, 'PX', horizon) end
  if #windowed > 0 then
    local pk = ent.base .. ':p'
    local names = {}
    for j, k in ipairs(windowed) do names[j] = ent.keys[k][1] end
    local pruned = redis.call('HMGET', pk, unpack(names))
    for j, k in ipairs(windowed) do
      local key = keys[k]
      if min_tile[k] > tonumber(pruned[j] or '-1e18') then
        for _, f in ipairs(redis.call('HKEYS', key)) do
          local t = tonumber(string.match(f, '^%a?(%-?%d+)'))
          if t and t < min_tile[k] then
            redis.call('HDEL', key, f)
            if kinds[k] == 'h' then redis.call('DEL', key .. ':h:' .. f) end
          end
        end
        redis.call('HSET', pk, names[j], string.format('%d', min_tile[k]))
      end
      redis.call('PEXPIRE', key, ttl[k])
    end
    redis.call('PEXPIRE', pk, horizon)
  end
  redis.call('PEXPIRE', seen, horizon)
  return applied, dups
end

for e, ent in ipairs(req.entities) do
  local a, d = apply_entity(KEYS[e], ent)
  result[2 * e - 1] = a
  result[2 * e] = d
end
return result
