"""Moved to :mod:`daemon.testing.figures`; this name stays only until ``tools/chaos.py`` imports
the harness directly."""

from daemon.testing.figures import pct, summary, tap

__all__ = ["pct", "summary", "tap"]
