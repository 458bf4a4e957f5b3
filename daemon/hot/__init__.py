"""The hot path: result consumer. No Postgres here, by design and by test."""
