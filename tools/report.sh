#!/usr/bin/env bash
# Health report of the billing pipeline (docs/metrics.md): `tts-daemon report`, runnable from a
# checkout without the venv on PATH: tools/report.sh [--config PATH] [--json] ...
# Exit status: 0 green, 1 amber (look soon), 2 red (act now, or the report could not be made).
# Run it from the directory the daemon runs in (relative paths in the config are relative to it);
# docs/operations.md explains every line of its output.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="$here/../.venv/bin/python"
if [[ ! -x "$python" ]]; then
    python="$(command -v python3)"
fi
# The package from this checkout, whichever Python runs it.
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m daemon report "$@"
