"""The chaos tool's durable-audio faults and checks.

- ``persister_faults``: the persister crashes at its fault points (``persist.read``: a batch read,
  nothing written; ``persist.written``: written, not acknowledged) for a while, through
  ``TTS_DAEMON_FAULTS``; the supervisor restarts it each time. A daemon SIGKILL
  (``daemon_kill``) kills a persister mid-batch too.
- ``disk_full``: the store's filesystem fills up for a while — the store lives on a tmpfs of its
  own (as root; otherwise the fault is recorded as skipped) that is remounted at the size it uses,
  then given room again. The persister must back off and report, the hot path must not notice.

Checked after the drain: nothing is left to persist, every block delivered ``cached`` has its
audio in the store (0 lost), and every object in the store is whole and readable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from daemon.audio.store import FileAudioStore
from daemon.contracts import MODELS
from daemon.gateway.hashing import VariantHasher

__all__ = ["AudioChaos"]

STORE_ROOM = "256m"  # the store's tmpfs when it has room


class AudioChaos:
    """The store's directory for a chaos run, its faults and its verdict."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.mount: Path | None = None
        self.dir = work / "data" / "audio"
        self.disk_full_injected = 0

    def set_up(self) -> None:
        """Put the store on a tmpfs of its own when this process may mount one (root)."""
        mnt = self.work / "audio-tmpfs"
        mnt.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0 and shutil.which("mount"):
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={STORE_ROOM}", "tmpfs", str(mnt)],
                capture_output=True,
            )
            if done.returncode == 0:
                self.mount = mnt
                self.dir = mnt
                return
        mnt.rmdir()

    def tear_down(self) -> None:
        if self.mount is not None:
            subprocess.run(["umount", "-l", str(self.mount)], capture_output=True)
            self.mount = None

    def fill(self) -> dict[str, Any]:
        """Make the store's filesystem full: remount it at (about) the size it uses."""
        if self.mount is None:
            return {"skipped": "the store is not on a tmpfs of its own (needs root)"}
        used = shutil.disk_usage(self.mount).used
        size = max(used, 4096) + 4096
        done = subprocess.run(
            ["mount", "-o", f"remount,size={size}", str(self.mount)], capture_output=True
        )
        if done.returncode:
            return {"skipped": f"remount failed: {done.stderr.decode(errors='replace')}"}
        self.disk_full_injected += 1
        return {"size_bytes": size}

    def make_room(self) -> None:
        if self.mount is not None:
            subprocess.run(
                ["mount", "-o", f"remount,size={STORE_ROOM}", str(self.mount)],
                capture_output=True,
                check=True,
            )

    def config_toml(self, claim_idle_s: float) -> str:
        return f'[audio]\ndir = "{self.dir}"\nclaim_idle_s = {claim_idle_s}\n'

    def verdict(self, secret: Path, delivered_texts: Iterable[str]) -> dict[str, Any]:
        """Every delivered block's audio in the store, every object readable."""
        hasher = VariantHasher.from_file(secret)
        voice = MODELS["kokoro"].default_voice
        wanted = {hasher(text, "kokoro", voice) for text in delivered_texts}
        store = FileAudioStore(self.dir)
        missing = [h for h in wanted if not store.path(h).exists()]
        objects = unreadable = 0
        for path in (self.dir / "objects").glob("*/*"):
            objects += 1
            try:
                obj = store.get_sync(path.name, touch=False)
            except ValueError:
                unreadable += 1
                continue
            if obj is None or not obj.data:
                unreadable += 1
        return {
            "store_dir": str(self.dir),
            "on_tmpfs": self.mount is not None,
            "disk_full_injected": self.disk_full_injected,
            "delivered_variants": len(wanted),
            "delivered_not_in_store": len(missing),
            "missing_sample": missing[:10],
            "store_objects": objects,
            "unreadable_objects": unreadable,
        }
