"""Versioned SQL migrations: the schema only (tables, indexes, seeded rows), each applied once.

The SQL functions are not here: their one definition is ``daemon/billing/ledger.sql``, re-applied
after these on every migrate (docs/billing.md). New files take the next unused number: 0002 and
0003 are taken (they once held functions) and stay recorded in older databases.
"""
