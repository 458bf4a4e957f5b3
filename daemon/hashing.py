"""``variant_hash``: a keyed hash of (text, model, voice), so an audio URL does not reveal whether a
given text was ever synthesized (SPEC section 5). The key is generated once under data.dir."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from daemon.embedded import read_secret

__all__ = ["VariantHasher"]


class VariantHasher:
    def __init__(self, key: bytes) -> None:
        self._key = key

    @classmethod
    def from_file(cls, path: Path) -> VariantHasher:
        return cls(read_secret(path, nbytes=32).encode())

    def __call__(self, text: str, model: str, voice: str) -> str:
        # Length-prefixed fields: ("ab", "c") and ("a", "bc") must not collide.
        msg = b"".join(
            len(part).to_bytes(4, "big") + part
            for part in (model.encode(), voice.encode(), text.encode())
        )
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:40]
