"""``variant_hash``: a keyed hash of (text, model, voice), so an audio URL does not reveal whether a
given text was ever synthesized (docs/workers.md). The key is generated once under data.dir.

Daemons that share one Redis must share this key (``gateway.variant_secret_path`` naming the same
file): two keys give two hashes for the same audio, and requests through different daemons would
then neither share jobs nor find each other's cached audio.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from daemon.embedded import read_secret

__all__ = ["VariantHasher", "load_or_create_key"]

MIN_KEY_CHARS = 16


def load_or_create_key(path: Path) -> bytes:
    """The key stored at ``path``; generated (mode 0600, published atomically by
    :func:`daemon.embedded.read_secret`) if there is none. An operator-supplied key shorter than
    ``MIN_KEY_CHARS`` is refused."""
    key = read_secret(path, nbytes=32)
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(f"variant hash key {path}: too short (at least {MIN_KEY_CHARS} chars)")
    return key.encode()


class VariantHasher:
    def __init__(self, key: bytes) -> None:
        self._key = key

    @classmethod
    def from_file(cls, path: Path) -> VariantHasher:
        return cls(load_or_create_key(path))

    def __call__(self, text: str, model: str, voice: str) -> str:
        # Length-prefixed fields: ("ab", "c") and ("a", "bc") must not collide.
        msg = b"".join(
            len(part).to_bytes(4, "big") + part
            for part in (model.encode(), voice.encode(), text.encode())
        )
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:40]
