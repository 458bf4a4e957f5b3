"""The cold path: billing consumer with its own Postgres pool."""
