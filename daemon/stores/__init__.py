"""The only asyncio-flavoured code: Redis and Postgres access through trio-asyncio."""
