#!/usr/bin/env bash
# The test suite as CI runs it: lint, the GPU check's CPU dry run, then pytest with the
# deterministic Hypothesis profile. Extra arguments go to pytest alone
# (e.g. `bash ci/test.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
.venv/bin/ruff check .
if [ $# -eq 0 ]; then
    # The script a GPU machine runs must keep working where no GPU is lent. The GPU machine
    # has the dependencies but no moelab installed: the dry run's python sees the venv's
    # packages but not its install of moelab (-S: no .pth files), as there.
    site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    bare=$(mktemp); printf '#!/bin/sh\nexec %s -S "$@"\n' "$PWD/.venv/bin/python" > "$bare"
    chmod +x "$bare"
    PYTHON=$bare PYTHONPATH=$site bash ci/gpu-check --dry-run > /tmp/moelab-gpu-check-dry-run.log 2>&1 \
        || { tail -40 /tmp/moelab-gpu-check-dry-run.log; echo "ci/gpu-check --dry-run failed"; exit 1; }
    echo "ci/gpu-check --dry-run: ok"
    # Two workers, one per core: a serial run keeps ~1.1 of the 2 cores busy (XLA compiles
    # and numpy loops on one thread most of the time).
    set -- -m "not slow" -n 2
fi
.venv/bin/python -m pytest -q --timeout=900 "$@"
