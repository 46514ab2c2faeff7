"""Benchmark of the closed form (`moelab bench closed-form`): points/s over a grid of 10^7, one numpy call."""

from __future__ import annotations

import time

import numpy as np


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench(args) -> list[dict]:
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
    seconds = best_of(grid, 2 if args.quick else 3)
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
