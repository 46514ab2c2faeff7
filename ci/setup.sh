#!/usr/bin/env bash
# Set-up on a fresh machine: a virtual environment in .venv with moelab and its test tools.
# torch is pinned to the CPU build that lies on this machine's disk; an unpinned torch
# would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/python -c "import moelab, jax, triton, torch; print('moelab', moelab.__version__, \
'| jax', jax.__version__, '| triton', triton.__version__, '| torch', torch.__version__)"
