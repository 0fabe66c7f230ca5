-- Add increments to one quality hash and (re)arm its TTL: one call per key and batch, at most once per record.
-- KEYS[1]: the hash (a quality tile, a version pair or the learning counters, under the model's hash tag).
-- KEYS[2]: its marks (same hash tag): per source stream (the Kafka topic:partition the join consumed), the
--          offset of the last record whose increments this hash holds.
-- ARGV[1]: TTL in ms; ARGV[2]: n, the streams of this call; then n x (stream, first offset, last offset) of the
--          records the increments come from; then field, amount, field, amount, ...
-- Returns 1 when applied; 0, applying nothing, when a stream's mark already reaches this call's first offset
-- (another process applied some of these records meanwhile: the caller reads the marks again and retries).
local n = tonumber(ARGV[2])
for i = 0, n - 1 do
  local mark = redis.call('HGET', KEYS[2], ARGV[3 + 3 * i])
  if mark and tonumber(mark) >= tonumber(ARGV[4 + 3 * i]) then
    return 0
  end
end
for i = 3 + 3 * n, #ARGV, 2 do
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if n > 0 then
  for i = 0, n - 1 do
    redis.call('HSET', KEYS[2], ARGV[3 + 3 * i], ARGV[5 + 3 * i])
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
return 1
