"""Host crash emulation: which AOF bytes were durable? A recorder preloaded into redis-server
(``fsync_shim.c``, compiled at run time) logs the AOF's size at every fsync; a crash then cuts
the AOF back to its size at the last one."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SHIM_SOURCE = Path(__file__).with_name("fsync_shim.c")


def fsync_shim(build_dir: Path) -> Path:
    """Compile the fsync recorder (needs a C compiler) and return the shared object's path."""
    build_dir.mkdir(parents=True, exist_ok=True)
    src, out = build_dir / "fsync_shim.c", build_dir / "fsync_shim.so"
    shutil.copyfile(SHIM_SOURCE, src)
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("redis-crash needs a C compiler (cc) to build its fsync recorder")
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(src), "-ldl"],
                   check=True, capture_output=True)  # fmt: skip
    return out


def cut_to_last_fsync(aof: Path, fsync_log: Path) -> int:
    """Truncate ``aof`` to its size at the last fsync of that very file (same inode): what a
    power loss would leave on disk at worst. Returns the bytes cut."""
    st = aof.stat()
    durable = 0
    if fsync_log.exists():
        for line in fsync_log.read_text().splitlines():
            try:
                dev, ino, size = (int(x) for x in line.split())
            except ValueError:
                continue
            if (dev, ino) == (st.st_dev, st.st_ino):
                durable = size
    cut = max(0, st.st_size - durable)
    if cut:
        os.truncate(aof, durable)
    return cut
