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
-- Returns {mine, stored_now, claim or false, claimed_now, p, o, ot} of the lane, where p, o and ot (the stored
-- values and the outcome's token) are given only once the lane is claimed (false before): the caller needs
-- them only then, and a prediction's own value need not travel back.
-- Cost: one HMGET reads everything a decision needs, one HSET and one PEXPIRE write (a new prediction: 3
-- commands).

local key = KEYS[1]
local side = ARGV[1]
local lane = ARGV[2]
local value = ARGV[3]
local token = ARGV[4]
local ttl = tonumber(ARGV[5])
local other = 'o'
if side == 'o' then other = 'p' end

if side == 'o' and lane == '*' then
  local first = redis.call('HGET', key, 'first')
  if first then lane = first end
end

local f = redis.call('HMGET', key, lane .. '|' .. side .. 't', lane .. '|j', lane .. '|' .. other .. 't',
                     'first', '*|o', '*|ot')
local mine_token, claim, other_token = f[1], f[2], f[3]
local writes = {}
local function put(field, v) writes[#writes + 1] = field; writes[#writes + 1] = v end

local stored_now = 0
if not mine_token then
  put(lane .. '|' .. side, value)
  put(lane .. '|' .. side .. 't', token)
  mine_token = token
  stored_now = 1
end

local drop_waiting = false
if side == 'p' and not f[4] then
  -- The first prediction record of the id: an outcome that named no item and arrived before it is its.
  put('first', lane)
  if f[6] and not other_token then
    put(lane .. '|o', f[5])
    put(lane .. '|ot', f[6])
    other_token = f[6]
  end
  drop_waiting = f[5] or f[6]
end

local mine = 0
if mine_token == token then mine = 1 end
local claimed_now = 0
if mine == 1 and not claim and other_token then
  put(lane .. '|j', token)
  claim = token
  claimed_now = 1
end

if #writes > 0 then redis.call('HSET', key, unpack(writes)) end
if drop_waiting then redis.call('HDEL', key, '*|o', '*|ot') end
if #writes > 0 or drop_waiting then redis.call('PEXPIRE', key, ttl) end

if not claim then return {mine, stored_now, false, claimed_now, false, false, false} end
local v = redis.call('HMGET', key, lane .. '|p', lane .. '|o', lane .. '|ot')
return {mine, stored_now, claim, claimed_now, v[1], v[2], v[3]}
