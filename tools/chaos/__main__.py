"""``python -m tools.chaos …`` or ``python tools/chaos …`` (tools/chaos/__init__.py says what)."""

import os
import sys
from pathlib import Path

if not __package__:  # run as a directory (python tools/chaos): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.chaos.cli import main

if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
