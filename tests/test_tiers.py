"""Two-tier fan-out: the closed forms against brute-force enumeration and Monte Carlo.

Every expected value here is checked against an enumeration of all C(E, k) expert sets
and all R home ranks (E <= 12), computed with exact fractions, independently of the
closed form's sums over ranks and nodes.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.costmodel import closed_form as cf
from moelab.costmodel import reference as ref


def brute_force_tiers(E: int, k: int, R: int, G: int) -> dict[str, Fraction]:
    """Exact means over every home rank and every k-set of experts (expert e on rank
    e R // E, rank r on node r // G)."""
    G = min(G, R)
    sums = {"intra": Fraction(0), "ranks_inter": Fraction(0), "nodes": Fraction(0)}
    sets = list(itertools.combinations(range(E), k))
    for home in range(R):
        for chosen in sets:
            ranks = {e * R // E for e in chosen} - {home}
            sums["intra"] += sum(1 for r in ranks if r // G == home // G)
            sums["ranks_inter"] += sum(1 for r in ranks if r // G != home // G)
            sums["nodes"] += len({r // G for r in ranks} - {home // G})
    n = R * len(sets)
    return {name: v / n for name, v in sums.items()}


CASES = [(8, 2, 16, 8), (12, 3, 6, 2), (12, 2, 5, 2), (10, 4, 4, 4), (9, 2, 7, 3),
         (12, 12, 4, 2), (6, 1, 12, 4), (11, 5, 3, 1)]


@pytest.mark.parametrize("E,k,R,G", CASES)
def test_tiers_equal_brute_force(E, k, R, G):
    want = brute_force_tiers(E, k, R, G)
    got = cf.fanout_tiers(R, E, k, G)
    assert got.intra == pytest.approx(float(want["intra"]), rel=1e-12, abs=1e-15)
    assert got.ranks_inter == pytest.approx(float(want["ranks_inter"]), rel=1e-12, abs=1e-15)
    assert got.nodes == pytest.approx(float(want["nodes"]), rel=1e-12, abs=1e-15)
    total = float(want["intra"] + want["ranks_inter"])
    assert float(cf.fanout_uniform(R, E, k)) == pytest.approx(total, rel=1e-12, abs=1e-15)


def test_r16_e8_k2_is_1_875_not_1_942():
    """Eight ranks hold one expert each, eight none. A token hits a given one-expert rank
    with probability 1 - C(7,2)/C(8,2) = 1 - 21/28 = 1/4, so it reaches 8/4 = 2 ranks,
    of which its own with probability 2/16: 2 * 15/16 = 1.875."""
    assert float(cf.fanout_uniform(16, 8, 2)) == pytest.approx(1.875, rel=1e-15)
    assert brute_force_tiers(8, 2, 16, 16)["intra"] == Fraction(15, 8)
    # the old formula with E/R = 1/2 expert per rank gave 1.942
    old = 15 * (1 - (8 - 0.5) / 8 * (8 - 0.5 - 1) / 7)
    assert round(old, 3) == 1.942


@settings(max_examples=60, deadline=None)
@given(E=st.integers(1, 12), data=st.data())
def test_tiers_brute_force_property(E, data):
    k = data.draw(st.integers(1, min(E, 4)))
    R = data.draw(st.integers(1, 12))
    G = data.draw(st.integers(1, 8))
    want = brute_force_tiers(E, k, R, G)
    got = cf.fanout_tiers(R, E, k, G)
    for name in ("intra", "ranks_inter", "nodes"):
        assert getattr(got, name) == pytest.approx(float(want[name]), rel=1e-12, abs=1e-14)


@settings(max_examples=200, deadline=None)
@given(E=st.integers(1, 512), data=st.data())
def test_tier_bounds(E, data):
    k = data.draw(st.integers(1, min(E, 16)))
    R = data.draw(st.integers(1, 256))
    G = data.draw(st.integers(1, 16))
    t = cf.fanout_tiers(R, E, k, G)
    g = min(G, R)
    nodes = -(-R // g)
    eps = 1e-9
    assert -eps <= t.nodes <= min(k, nodes - 1) + eps
    assert -eps <= t.intra <= min(k, g - 1) + eps
    smallest = R - (nodes - 1) * g  # the last node may be partial
    assert -eps <= t.ranks_inter <= min(k, R - smallest) + eps
    assert t.nodes <= t.ranks_inter + eps  # a remote node is reached through a remote rank
    assert t.ranks == pytest.approx(float(cf.fanout_uniform(R, E, k)), rel=1e-9, abs=1e-12)


def test_reference_counts_equal_brute_force_on_every_set():
    """The JAX reference's per-token counts on the routing that lists every k-set once per
    home rank average to the enumerated expectation exactly."""
    E, k, R, G = 10, 3, 5, 2
    sets = np.array(list(itertools.combinations(range(E), k)))
    ids = np.repeat(sets, R, axis=0)  # token t on rank t R // N: each set on every rank once
    ids = ids.reshape(len(sets), R, k).transpose(1, 0, 2).reshape(-1, k)
    tiers = ref.token_tiers(ids, E, R, G)
    want = brute_force_tiers(E, k, R, G)
    for name in ("intra", "ranks_inter", "nodes"):
        assert Fraction(int(tiers[name].sum()), len(ids)) == want[name], name


# --- group-limited routing ----------------------------------------------------------------------


def brute_force_group_nodes(E, k, n_group, topk_group, nodes) -> Fraction:
    """Remote nodes for the uniform model of group-limited routing (the lower bound on
    DeepSeek's router; tests/test_group_limited.py checks the router itself): topk_group groups
    uniformly, then k experts uniformly among theirs; groups contiguous, nodes contiguous."""
    s = E // n_group
    per_node = n_group // nodes
    total, count = Fraction(0), 0
    for groups in itertools.combinations(range(n_group), topk_group):
        pool = [g * s + i for g in groups for i in range(s)]
        for chosen in itertools.combinations(pool, k):
            hit = {(e // s) // per_node for e in chosen}
            for home in range(nodes):
                total += len(hit - {home})
                count += 1
    return total / count


@pytest.mark.parametrize("E,k,n_group,topk_group,nodes", [
    (12, 2, 6, 3, 3), (12, 3, 4, 2, 2), (8, 2, 4, 2, 4), (12, 4, 6, 2, 6), (9, 2, 3, 1, 3)])
def test_group_limited_lower_bound_equals_brute_force(E, k, n_group, topk_group, nodes):
    want = brute_force_group_nodes(E, k, n_group, topk_group, nodes)
    got = cf.fanout_nodes_group_limited_lower_bound(nodes, n_group, topk_group, E, k)
    assert got == pytest.approx(float(want), rel=1e-12)


def test_group_limited_lower_bound_monte_carlo_within_standard_error():
    """DeepSeek-R1's shape (8 groups, 4 kept, top-8 of 256) on 4 nodes: a numpy sampler of
    the same model (groups uniformly, experts uniformly among theirs)."""
    E, k, n_group, topk_group, nodes = 256, 8, 8, 4, 4
    rng = np.random.default_rng(0)
    T = 40_000
    groups = np.argsort(rng.random((T, n_group)), 1)[:, :topk_group]
    s = E // n_group
    pool = (groups[:, :, None] * s + np.arange(s)).reshape(T, -1)
    picks = np.take_along_axis(pool, np.argsort(rng.random(pool.shape), 1)[:, :k], 1)
    node = picks // (E // nodes)
    home = rng.integers(0, nodes, T)
    hit = np.zeros((T, nodes), bool)
    hit[np.arange(T)[:, None], node] = True
    hit[np.arange(T), home] = False
    x = hit.sum(1)
    se = x.std(ddof=1) / math.sqrt(T)
    want = cf.fanout_nodes_group_limited_lower_bound(nodes, n_group, topk_group, E, k)
    assert abs(x.mean() - want) < 4 * se
    # and it never exceeds min(topk_group, nodes - 1)
    assert x.max() <= min(topk_group, nodes - 1)
