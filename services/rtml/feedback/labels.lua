-- Label rules: the state of one (model, match values) pair, changed atomically (see labels.py).
--
-- KEYS[1]  hash P: field "<prediction_id>|<item_id or ''>" -> the prediction's label state:
--            "P|<pred ts>|<deadline>"                      pending: no matching event yet
--            "D|<sign>|<pred ts>|<deadline>|<label ts>|<token>"  decided: sign "+" (a matching event) or
--                                                          "-" (none by the deadline); token = who decided
-- KEYS[2]  sorted set E: matching events seen, member event_id, score event ts (kept one window + grace)
-- ARGV[1]  op: "predict" | "event" | "expire"
--
-- predict  ARGV: field, pred ts, deadline, token, ttl ms, horizon ms, max entries (past max entries, decided
--          states whose deadline + horizon is before this prediction are forgotten)
--          -> {"+", label ts} when decided positive by this record (now, or earlier: a redelivery),
--             {"pending"} while waiting, {"done"} when decided by someone else.
--          An event already seen inside [pred ts, deadline] decides at once: events and predictions reach
--          feedback in any order.
-- event    ARGV: event_id, event ts, token, ttl ms, keep ms, horizon ms: events older than ``keep`` (within +
--          grace) before this one can match no prediction still to come and are forgotten; decided states
--          are remembered ``horizon`` after their deadline, so an event that late is still counted as late
--          -> flat list: field, sign, label ts for every prediction this event decides (or decided before:
--             a redelivery), then "late", n: predictions already given "-" whose window held this event
--             (counted once, on the event's first delivery).
-- expire   ARGV: field, token ("sweep"), now
--          -> {"-", label ts} when this call (or an earlier sweep whose outcome may not have been sent)
--             decided it negative, {"done"} when an event decided it, {"gone"} when the state expired.
--
-- Every write re-arms both keys' TTL (the horizon + margin), so the state is bounded by the traffic of a
-- few windows per pair.

local P, E = KEYS[1], KEYS[2]
local op = ARGV[1]

local function parse_done(v)
  local sign, pts, dl, lts, tok = string.match(v, '^D|(.)|(%-?%d+)|(%-?%d+)|(%-?%d+)|(.*)$')
  return sign, tonumber(pts), tonumber(dl), lts, tok
end

local function parse_pending(v)
  local pts, dl = string.match(v, '^P|(%-?%d+)|(%-?%d+)$')
  return tonumber(pts), tonumber(dl)
end

local function rearm(ttl)
  redis.call('PEXPIRE', P, ttl)
  if redis.call('EXISTS', E) == 1 then redis.call('PEXPIRE', E, ttl) end
end

if op == 'predict' then
  local field, pts, dl, token, ttl = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6]
  local horizon, max_entries = tonumber(ARGV[7]), tonumber(ARGV[8])
  local cur = redis.call('HGET', P, field)
  if cur then
    if string.sub(cur, 1, 1) == 'D' then
      local sign, _, _, lts, tok = parse_done(cur)
      if tok == token and sign == '+' then return {'+', lts} end
      return {'done'}
    end
    return {'pending'}
  end
  if redis.call('HLEN', P) >= max_entries then
    -- a pair predicted over and over: forget decided states whose window and grace are long gone
    local all = redis.call('HGETALL', P)
    for i = 1, #all, 2 do
      if string.sub(all[i + 1], 1, 1) == 'D' then
        local _, _, odl = parse_done(all[i + 1])
        if odl + horizon < pts then redis.call('HDEL', P, all[i]) end
      end
    end
  end
  local hit = redis.call('ZRANGEBYSCORE', E, pts, dl, 'WITHSCORES', 'LIMIT', 0, 1)
  if #hit > 0 then
    redis.call('HSET', P, field, 'D|+|' .. pts .. '|' .. dl .. '|' .. hit[2] .. '|' .. token)
    rearm(ttl)
    return {'+', hit[2]}
  end
  redis.call('HSET', P, field, 'P|' .. pts .. '|' .. dl)
  rearm(ttl)
  return {'pending'}
end

if op == 'event' then
  local event_id, ets, token, ttl = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
  local keep, horizon = tonumber(ARGV[6]), tonumber(ARGV[7])
  local first = redis.call('ZADD', E, 'NX', ets, event_id)
  redis.call('ZREMRANGEBYSCORE', E, '-inf', '(' .. (ets - keep))
  local out = {}
  local late = 0
  local all = redis.call('HGETALL', P)
  for i = 1, #all, 2 do
    local field, v = all[i], all[i + 1]
    if string.sub(v, 1, 1) == 'P' then
      local pts, dl = parse_pending(v)
      if ets >= pts and ets <= dl then
        redis.call('HSET', P, field, 'D|+|' .. pts .. '|' .. dl .. '|' .. ets .. '|' .. token)
        out[#out + 1] = field; out[#out + 1] = '+'; out[#out + 1] = tostring(ets)
      end
    else
      local sign, pts, dl, lts, tok = parse_done(v)
      if tok == token then
        out[#out + 1] = field; out[#out + 1] = sign; out[#out + 1] = lts
      elseif first == 1 and sign == '-' and ets >= pts and ets <= dl then
        late = late + 1
      elseif dl + horizon < ets then
        redis.call('HDEL', P, field)  -- decided long ago: nothing can change it any more
      end
    end
  end
  out[#out + 1] = 'late'; out[#out + 1] = late
  rearm(ttl)
  return out
end

if op == 'expire' then
  local field, token, now = ARGV[2], ARGV[3], ARGV[4]
  local cur = redis.call('HGET', P, field)
  if not cur then return {'gone'} end
  if string.sub(cur, 1, 1) == 'P' then
    local pts, dl = parse_pending(cur)
    redis.call('HSET', P, field, 'D|-|' .. pts .. '|' .. dl .. '|' .. dl .. '|' .. token)
    return {'-', tostring(dl)}
  end
  local sign, _, _, lts, tok = parse_done(cur)
  if sign == '-' and tok == token then return {'-', lts} end
  return {'done'}
end

return redis.error_reply('labels.lua: unknown op ' .. tostring(op))
