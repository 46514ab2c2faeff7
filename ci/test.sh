#!/usr/bin/env bash
# The test suite as CI runs it: lint, the GPU check's CPU dry run, then pytest with the
# deterministic Hypothesis profile. Extra arguments go to pytest alone
# (e.g. `bash ci/test.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
.venv/bin/ruff check .
if [ $# -eq 0 ]; then
    # The script a GPU machine runs must keep working where no GPU is lent.
    bash ci/gpu-check --dry-run > /tmp/moelab-gpu-check-dry-run.log 2>&1 \
        || { tail -40 /tmp/moelab-gpu-check-dry-run.log; echo "ci/gpu-check --dry-run failed"; exit 1; }
    echo "ci/gpu-check --dry-run: ok"
    set -- -m "not slow"
fi
.venv/bin/python -m pytest -q --timeout=900 "$@"
