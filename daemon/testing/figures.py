"""Figures as every tool takes and reports them.

Percentiles are nearest rank (the smallest value with at least q % of the samples at or below
it), in the samples' unit, to 3 decimals: one definition, so that a "p99" means the same in every
table and JSON this project prints."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["pct", "summary", "tap"]


def pct(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``; 0.0 when there are none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return round(ordered[k], 3)


def summary(values: Sequence[float]) -> dict[str, float]:
    """p50, p99, max and the number of samples."""
    return {
        "p50": pct(values, 50),
        "p99": pct(values, 99),
        "max": pct(values, 100),
        "n": len(values),
    }


def tap(histogram: Any, record: Callable[[float], None]) -> None:
    """Call ``record(value)`` with every observation of a daemon's Prometheus ``histogram``
    (seconds), before the histogram gets it: exact samples, where the histogram keeps buckets."""
    observe = histogram.observe

    def observe_and_record(value: float, *args: Any, **kwargs: Any) -> None:
        record(value)
        observe(value, *args, **kwargs)

    histogram.observe = observe_and_record
