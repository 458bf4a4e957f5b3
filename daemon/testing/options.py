"""A tool's knobs as command-line options: one ``--name`` per field of a frozen attrs class of
parameters, with the field's default and type (tools/stress.py, tools/noisy.py, tools/chaos)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import attrs

__all__ = ["add_param_options", "params_from"]

P = TypeVar("P")


def add_param_options(
    ap: argparse.ArgumentParser, cls: type, choices: Mapping[str, Sequence[str]] | None = None
) -> None:
    """``--field-name`` for every field of ``cls``; ``choices`` restricts some fields' values."""
    defaults = cls()
    for field in attrs.fields(cls):
        default = getattr(defaults, field.name)
        kw: dict[str, Any] = {"default": default}
        if choices and field.name in choices:
            kw["choices"] = list(choices[field.name])
        else:
            kw["type"] = type(default)
        ap.add_argument("--" + field.name.replace("_", "-"), **kw)


def params_from(args: argparse.Namespace, cls: type[P]) -> P:
    """The parameters the parsed ``args`` name."""
    return cls(**{f.name: getattr(args, f.name) for f in attrs.fields(cls)})
