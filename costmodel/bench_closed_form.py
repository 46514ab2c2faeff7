"""Benchmarks of the closed form (points/s over a large grid) and of the CLI's cold start."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_closed_form(args) -> list[dict]:
    """gamma over a (tokens x B_pcie x B_net) grid of >= 10^7 points, numpy, one call."""
    from moelab.costmodel import closed_form as cf
    from moelab.costmodel.presets import load_model

    model = load_model("deepseek-r1")
    n_points = 10**5 if args.quick else 10**7
    tokens = np.geomspace(1, 1e7, n_points // 100).reshape(-1, 1, 1)
    b_pcie = np.linspace(8e9, 512e9, 10).reshape(1, -1, 1)
    b_net = np.linspace(12.5e9, 400e9, 10).reshape(1, 1, -1)

    def grid():
        n_ue = cf.n_used_worst(tokens, model.top_k, model.n_experts)
        t_p = cf.offload_overhead(n_ue, model.expert_bytes, b_pcie, model.n_moe_layers)
        t_ep = cf.ep_overhead(tokens, model.hidden, model.f_a, model.f_a, b_net,
                              model.n_moe_layers)
        return t_p / t_ep

    g = grid()
    seconds = _best_of(grid, 2 if args.quick else 3)
    # Check against the scalar path before reporting a speed.
    i, j, m = g.shape[0] // 2, 3, 7
    one = cf.gamma_seed(model.expert_params, model.f_e, model.hidden, model.f_a,
                        b_net[0, 0, m], b_pcie[0, j, 0],
                        cf.n_used_worst(tokens[i, 0, 0], model.top_k, model.n_experts),
                        tokens[i, 0, 0])
    assert np.isclose(g[i, j, m], one, rtol=1e-12), "grid disagrees with the scalar formula"
    row = {"bench": "closed-form", "points": int(g.size), "seconds": seconds,
           "points_per_s": g.size / seconds}
    print(f"closed form: {g.size:.3g} points in {seconds * 1e3:.1f} ms "
          f"= {row['points_per_s']:.3g} points/s (numpy, one broadcast call)")
    return [row]


def bench_cli_start(args) -> list[dict]:
    """Wall time of `python -m moelab gamma --json` in fresh processes (cold start)."""
    cmd = [sys.executable, "-m", "moelab", "gamma", "--json"]
    bare = [sys.executable, "-c", "pass"]
    repeats = 3 if args.quick else 7
    subprocess.run(cmd, check=True, capture_output=True)  # warm the file cache
    gamma_s = _best_of(lambda: subprocess.run(cmd, check=True, capture_output=True), repeats)
    python_s = _best_of(lambda: subprocess.run(bare, check=True, capture_output=True), repeats)
    row = {"bench": "cli-start", "seconds": gamma_s, "python_startup_s": python_s,
           "moelab_share_s": gamma_s - python_s}
    print(f"moelab gamma cold start: {gamma_s * 1e3:.0f} ms (bare python {python_s * 1e3:.0f} ms; "
          f"moelab adds {(gamma_s - python_s) * 1e3:.0f} ms; goal < 1000 ms)")
    return [row]
