"""Benchmark of the CLI's cold start (`moelab bench cli`): `moelab gamma` in fresh processes.

The CLI imports no jax, triton or torch for `gamma`; this measures what that buys, against
a bare `python -c pass` measured in the same run.
"""

from __future__ import annotations

import subprocess
import sys

from moelab.costmodel.bench_closed_form import best_of


def bench(args) -> list[dict]:
    """Wall time of `python -m moelab gamma --json` in fresh processes (cold start)."""
    cmd = [sys.executable, "-m", "moelab", "gamma", "--json"]
    bare = [sys.executable, "-c", "pass"]
    repeats = 3 if args.quick else 7
    subprocess.run(cmd, check=True, capture_output=True)  # warm the file cache
    gamma_s = best_of(lambda: subprocess.run(cmd, check=True, capture_output=True), repeats)
    python_s = best_of(lambda: subprocess.run(bare, check=True, capture_output=True), repeats)
    row = {"bench": "cli-start", "seconds": gamma_s, "python_startup_s": python_s,
           "moelab_share_s": gamma_s - python_s}
    print(f"moelab gamma cold start: {gamma_s * 1e3:.0f} ms (bare python {python_s * 1e3:.0f} ms; "
          f"moelab adds {(gamma_s - python_s) * 1e3:.0f} ms; goal < 1000 ms)")
    return [row]
