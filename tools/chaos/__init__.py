"""``python -m tools.chaos``: the command line of the chaos engine in ``daemon/testing/chaos``
(its docstring says what it runs; docs/reliability.md the method and the figures)."""

from daemon.testing.chaos import SCENARIOS, Chaos, Params

__all__ = ["SCENARIOS", "Chaos", "Params"]
