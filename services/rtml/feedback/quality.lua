-- Add increments to one quality hash and (re)arm its TTL: one call per key and batch, at most once per record.
-- KEYS[1]: the hash (a quality tile, a version pair or the learning counters, under the model's hash tag).
-- KEYS[2]: its marks (same hash tag): per source stream (the Kafka topic:partition the join consumed), the
--          offset of the last record whose increments this hash holds.
-- ARGV[1]: TTL in ms; ARGV[2]: n, the streams of the batch; then n x (stream, replayed, first, last): the
--          first offset of the replayed records whose increments this call carries (-1: none), the first
--          offset of the batch's first-time records (-1: none) and the batch's last offset; then field, amount,
--          field, amount, ...
-- Returns 0, applying nothing, when a stream's mark reaches the first replayed record (another process applied
-- it since the caller read the marks: the caller retries, reading them again); else applies everything and
-- raises the marks to the last offsets: 1, or 2 when a mark was at or past a first-time record (the topic was
-- recreated and its offsets started again, or two consumers overlapped in a rebalance): that mark is reset.
-- A mark only moves back on a reset: a redelivery may end before the earlier delivery did, and lowering the
-- mark to its last offset would let the records in between count again.
local n = tonumber(ARGV[2])
local reset = false
local moves = {}
for i = 0, n - 1 do
  local stream, last = ARGV[3 + 4 * i], tonumber(ARGV[6 + 4 * i])
  local mark = redis.call('HGET', KEYS[2], stream)
  if mark then
    mark = tonumber(mark)
    local replayed = tonumber(ARGV[4 + 4 * i])
    if replayed >= 0 and mark >= replayed then
      return 0
    end
    local first = tonumber(ARGV[5 + 4 * i])
    if first >= 0 and mark >= first then
      reset = true
      moves[#moves + 1] = stream
      moves[#moves + 1] = last
    elseif last > mark then
      moves[#moves + 1] = stream
      moves[#moves + 1] = last
    end
  else
    moves[#moves + 1] = stream
    moves[#moves + 1] = last
  end
end
for i = 3 + 4 * n, #ARGV, 2 do
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if #moves > 0 then
  redis.call('HSET', KEYS[2], unpack(moves))
end
if n > 0 then
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
if reset then
  return 2
end
return 1
