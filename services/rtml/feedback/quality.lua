-- Add increments to one quality hash and (re)arm its TTL: one call per key and batch.
-- KEYS[1]: the hash (a quality tile or a version pair, under the model's hash tag).
-- ARGV[1]: TTL in ms; then field, amount, field, amount, ...
for i = 2, #ARGV, 2 do
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
