-- Apply one prediction or outcome record to the join state of its prediction_id, atomically.
--
-- KEYS[1]  the join hash of one prediction_id (under its {p:<id>} hash tag)
-- ARGV[1]  side: "p" (prediction) or "o" (outcome)
-- ARGV[2]  lane: which prediction record of the id this is / this outcome is for (see join.py):
--          "i:<item_id>" or "-" (no item) for a prediction, "i:<item_id>" or "*" (no item named) for an outcome
-- ARGV[3]  the record value (JSON), stored as is
-- ARGV[4]  token of the Kafka record: "topic:partition:offset" (stable across redeliveries)
-- ARGV[5]  TTL of the hash in milliseconds (join_ttl)
--
-- Fields, per lane L: L|p, L|pt (first prediction value and token), L|o, L|ot (first outcome value and
-- token), L|j (token of the record that completed the pair); and "first": the lane of the first prediction
-- record of the id, which is what an outcome naming no item ("*") joins.
-- Rules, deliberately mechanical (the decisions are made in join.py):
--   * the first record of a side in a lane is stored; later ones never replace it;
--   * a record whose entry is its own (first delivery or redelivery) claims the lane when the other side is
--     present and nobody claimed it yet;
--   * the TTL is (re)armed on every write, so state is bounded by join_ttl after the id's last write.
-- Returns {mine, stored_now, claim or false, claimed_now, p or false, o or false, ot or false} of the lane.

local key = KEYS[1]
local side = ARGV[1]
local lane = ARGV[2]
local value = ARGV[3]
local token = ARGV[4]
local ttl = tonumber(ARGV[5])
local other = 'o'
if side == 'o' then other = 'p' end
local wrote = false

local function get(l, f) return redis.call('HGET', key, l .. '|' .. f) end

if side == 'o' and lane == '*' then
  local first = redis.call('HGET', key, 'first')
  if first then lane = first end
end

local mine_token = get(lane, side .. 't')
local stored_now = 0
if not mine_token then
  redis.call('HSET', key, lane .. '|' .. side, value, lane .. '|' .. side .. 't', token)
  mine_token = token
  stored_now = 1
  wrote = true
end

if side == 'p' and redis.call('HSETNX', key, 'first', lane) == 1 then
  -- The first prediction record of the id: an outcome that named no item and arrived before it is its.
  local waiting = redis.call('HMGET', key, '*|o', '*|ot')
  if waiting[2] and not get(lane, 'ot') then
    redis.call('HSET', key, lane .. '|o', waiting[1], lane .. '|ot', waiting[2])
  end
  redis.call('HDEL', key, '*|o', '*|ot')
  wrote = true
end

local mine = 0
if mine_token == token then mine = 1 end
local claim = get(lane, 'j')
local claimed_now = 0
if mine == 1 and not claim and get(lane, other .. 't') then
  redis.call('HSET', key, lane .. '|j', token)
  claim = token
  claimed_now = 1
  wrote = true
end

if wrote then redis.call('PEXPIRE', key, ttl) end

local fields = redis.call('HMGET', key, lane .. '|p', lane .. '|o', lane .. '|ot')
return {mine, stored_now, claim, claimed_now, fields[1], fields[2], fields[3]}
