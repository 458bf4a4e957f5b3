"""Secrets under ``data.dir/secrets``: generated once, mode 0600, published atomically."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["read_secret"]


def read_secret(path: Path, nbytes: int = 24) -> str:
    """Return the secret stored at ``path``, generating it (mode 0600) on first use."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    value = secrets.token_urlsafe(nbytes)
    # Written whole to a private name, then published with link(), which fails if the name
    # exists: two processes racing both end up with the winner's complete value, never a
    # half-written file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return path.read_text().strip()
        return value
    finally:
        tmp.unlink(missing_ok=True)
