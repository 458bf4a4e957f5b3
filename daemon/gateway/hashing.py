"""``variant_hash``: a keyed hash of (text, model, voice, model revision), so an audio URL does not
reveal whether a given text was ever synthesized (docs/workers.md). The key is generated once under
data.dir.

Daemons that share one Redis must share this key (``gateway.variant_secret_path`` naming the same
file): two keys give two hashes for the same audio, and requests through different daemons would
then neither share jobs nor find each other's cached audio.

The model revision (``[models] revision``, docs/configuration.md) is part of the hash so that audio
of a broken model build can be retired by bumping it: the same text then has a new hash, is
synthesized again, and the old audio is no longer asked for (``tts-daemon audio purge`` removes
it). A model without a revision hashes as before revisions existed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
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
    def __init__(self, key: bytes, revisions: Mapping[str, str] | None = None) -> None:
        self._key = key
        self.revisions = dict(revisions or {})

    @classmethod
    def from_file(cls, path: Path, revisions: Mapping[str, str] | None = None) -> VariantHasher:
        return cls(load_or_create_key(path), revisions)

    def revision(self, model: str) -> str:
        return self.revisions.get(model, "")

    def __call__(self, text: str, model: str, voice: str) -> str:
        # Length-prefixed fields: ("ab", "c") and ("a", "bc") must not collide.
        parts = [model.encode(), voice.encode(), text.encode()]
        revision = self.revisions.get(model, "")
        if revision:
            parts.append(b"rev:" + revision.encode())
        msg = b"".join(len(part).to_bytes(4, "big") + part for part in parts)
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:40]
