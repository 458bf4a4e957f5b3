-- Replay one billing dead letter (tts-daemon dead-letters replay): the event goes back on the
-- billing stream and the dead letter goes, atomically, and only if the dead letter was still
-- there (two replays of it queue it once; billing itself is idempotent by event_id).
-- KEYS: 1 tts:billing:dead, 2 tts:billing. ARGV: 1 the dead-letter entry, 2 the event JSON.
-- Returns 1 if replayed, 0 if the entry was gone.
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', 'event', ARGV[2])
return 1
