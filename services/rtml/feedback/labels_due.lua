-- The due index of label rules: which pending predictions reach their deadline when (see labels.py).
--
-- KEYS[1]  sorted set: member "<pair tag>\31<field>", score = deadline + grace (ms)
-- ARGV[1]  op:
--   add   ARGV: score, member, score, member, ...      (NX: a member under a sweeper's lease keeps it)
--   take  ARGV: now, lease ms, limit -> the members due at ``now``, each leased to the caller (re-scored to
--         now + lease), so two sweepers never decide the same prediction at once and a sweeper that dies
--         before ``done`` leaves its members to be taken again when the lease ends
--   done  ARGV: member, ...                            (ZREM)
local key, op = KEYS[1], ARGV[1]
if op == 'add' then
  if #ARGV > 1 then redis.call('ZADD', key, 'NX', unpack(ARGV, 2)) end
  return 1
end
if op == 'take' then
  local now, lease, limit = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
  local due = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'LIMIT', 0, limit)
  for _, member in ipairs(due) do redis.call('ZADD', key, 'XX', now + lease, member) end
  return due
end
if op == 'done' then
  if #ARGV > 1 then redis.call('ZREM', key, unpack(ARGV, 2)) end
  return 1
end
return redis.error_reply('labels_due.lua: unknown op ' .. tostring(op))
