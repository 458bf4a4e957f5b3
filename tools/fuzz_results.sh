#!/bin/sh
# The worker-result fuzz (tests/test_result_fuzz.py) at full size, run by hand: 500 examples,
# about 3,000 results against one live daemon (CI runs 50). Usage: tools/fuzz_results.sh [N]
set -eu
cd "$(dirname "$0")/.."
TTS_FUZZ_EXAMPLES="${1:-500}" exec .venv/bin/python -m pytest -q -s \
    tests/test_result_fuzz.py
