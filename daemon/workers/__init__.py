"""The worker side of docs/workers.md: the atomic pull, the worker loop, adapters, the scanner."""
