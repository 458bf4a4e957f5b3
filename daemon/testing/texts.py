"""Texts a load sends: unique, sentence-sized, reproducible from a seed (tools/stress.py, chaos)."""

from __future__ import annotations

import random

__all__ = ["make_texts"]

_WORDS = tuple(
    """
the a reader listens while quiet voices carry every sentence across long pages of history
science river mountain evening morning library letter garden window story chapter ocean bright
slowly gently through under above before after because although people remember small details
forgotten cities painted walls old trains distant bells winter summer questions answers careful
patient curious sudden warm cold green silver
""".split()  # noqa: SIM905 - a paragraph reads better than a list of 60 strings
)


def make_texts(rng: random.Random, n: int, seen: set[str]) -> list[str]:
    """``n`` unique sentence-sized texts (50–120 characters: 3–8 s of speech)."""
    out = []
    while len(out) < n:
        words = []
        while len(" ".join(words)) < rng.randint(50, 110):
            words.append(rng.choice(_WORDS))
        text = " ".join(words).capitalize() + "."
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out
