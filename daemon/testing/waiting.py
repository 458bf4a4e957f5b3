"""Waiting for a condition the system makes true by its own work, with a ceiling.

A test does not guess how long a row takes to be committed or a key to be set: it polls for it,
and fails with a message naming what it waited for if the ceiling passes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

__all__ = ["wait_until"]


async def wait_until(
    check: Callable[[], Any], *, timeout_s: float = 20.0, interval_s: float = 0.05, what: str = ""
) -> Any:
    """Poll an async or sync ``check`` until it returns something truthy, and return that;
    raise ``AssertionError`` after ``timeout_s``."""
    with trio.move_on_after(timeout_s) as scope:
        while True:
            value = check()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return value
            await trio.sleep(interval_s)
    if scope.cancelled_caught:
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what or check}")
    return None
