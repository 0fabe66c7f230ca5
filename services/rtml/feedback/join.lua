-- Apply one prediction or outcome record to its join slot, atomically.
--
-- KEYS[1]  the slot hash of one prediction_id (under its {p:<id>} hash tag)
-- ARGV[1]  side: "p" (prediction) or "o" (outcome)
-- ARGV[2]  the record value (JSON), stored as is
-- ARGV[3]  token of the Kafka record: "topic:partition:offset" (stable across redeliveries)
-- ARGV[4]  TTL of the slot in milliseconds (join_ttl)
--
-- Slot fields: p / pt (first prediction value / its token), o / ot (first outcome / its token),
-- j (token of the record that completed the pair).
-- Rules, deliberately mechanical (the decisions are made in join.py):
--   * the first record of a side is stored; later ones of that side never replace it;
--   * a record whose side entry is its own (first delivery or redelivery) claims the slot when the
--     other side is present and nobody claimed it yet;
--   * the TTL is (re)armed when something is written, so state is bounded by join_ttl after the last write.
-- Returns {mine, stored_now, claim or false, claimed_now, p or false, o or false, ot or false}.

local key = KEYS[1]
local side = ARGV[1]
local value = ARGV[2]
local token = ARGV[3]
local ttl = tonumber(ARGV[4])
local other = 'o'
if side == 'o' then other = 'p' end

local mine_token = redis.call('HGET', key, side .. 't')
local stored_now = 0
if not mine_token then
  redis.call('HSET', key, side, value, side .. 't', token)
  mine_token = token
  stored_now = 1
end
local mine = 0
if mine_token == token then mine = 1 end

local claim = redis.call('HGET', key, 'j')
local claimed_now = 0
if mine == 1 and not claim and redis.call('HEXISTS', key, other) == 1 then
  redis.call('HSET', key, 'j', token)
  claim = token
  claimed_now = 1
end

if stored_now == 1 or claimed_now == 1 then
  redis.call('PEXPIRE', key, ttl)
end

local fields = redis.call('HMGET', key, 'p', 'o', 'ot')
return {mine, stored_now, claim, claimed_now, fields[1], fields[2], fields[3]}
