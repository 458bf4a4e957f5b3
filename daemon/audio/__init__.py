"""Durable audio: the store behind the Redis cache, and the persister that fills it
(docs/tts-flow.md, "The third path: persist")."""
