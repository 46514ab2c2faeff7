#!/usr/bin/env bash
# The test suite as CI runs it: lint, then pytest with the deterministic Hypothesis profile.
# Extra arguments go to pytest (e.g. `bash ci/test.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
.venv/bin/ruff check .
if [ $# -eq 0 ]; then set -- -m "not slow"; fi
.venv/bin/python -m pytest -q --timeout=900 "$@"
