"""The busiest rank: the closed-form imbalance against Monte Carlo of concrete routings
(numpy and the JAX reference), EPLB-like replicas, and the uniform-routing properties."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.costmodel import closed_form as cf
from moelab.costmodel import reference as ref
from moelab.costmodel import routing as rt
from moelab.costmodel.specs import ModelSpec, Options, SpecError, SystemSpec, Workload


def mc_imbalance(N, R, E, k, samples, seed=0):
    """E[max_r X_r] / E[mean_r X_r] over uniform top-k routings of R N tokens (numpy,
    independent of the reference): X_r rows rank r receives from the other ranks."""
    rng = np.random.default_rng(seed)
    owner = np.repeat(np.arange(R), cf.experts_per_rank(E, R))
    T = N * R
    home = np.arange(T) * R // T
    maxs, means = [], []
    for _ in range(samples):
        ids = np.argsort(rng.random((T, E)), axis=1)[:, :k]
        hit = np.zeros((T, R), bool)
        hit[np.arange(T)[:, None], owner[ids]] = True
        hit[np.arange(T), home] = False
        x = hit.sum(0)
        maxs.append(x.max())
        means.append(x.mean())
    maxs = np.array(maxs)
    return maxs.mean() / np.mean(means), maxs.std(ddof=1) / math.sqrt(samples) / np.mean(means)


@pytest.mark.parametrize("N,R,E,k", [(16, 16, 64, 8), (8, 32, 256, 8), (64, 16, 128, 8),
                                     (8, 8, 64, 4)])
def test_imbalance_within_one_percent_of_monte_carlo(N, R, E, k):
    """The approximation (independent binomial receivers) against concrete routings."""
    want, se = mc_imbalance(N, R, E, k, samples=300)
    got = cf.imbalance_uniform(N, R, E, k)
    assert abs(got / want - 1) < 0.01 + 3 * se


def test_imbalance_few_tokens_is_an_underestimate_stated():
    """At 1-2 tokens per rank the receivers' negative correlation matters: the formula is
    low by 1-3% (the documented limit of the approximation)."""
    want, se = mc_imbalance(2, 8, 16, 2, samples=1500, seed=1)
    got = cf.imbalance_uniform(2, 8, 16, 2)
    assert got < want and got / want > 0.96


def test_imbalance_large_counts_switch_to_normal_smoothly():
    """Above 4000 integers in the window the binomials are integrated as normals."""
    hit = [0.4, 0.41]
    below = cf._expected_max_binomials([1500, 1500], hit, [8, 8])  # exact sum
    n = 1500
    mean = np.array([n * 0.4, n * 0.41])
    # by hand: the window is 28 sd wide (~ 28 * 19 = 530 integers): the exact path; the
    # normal path must agree when forced by a large count with the same mean and spread
    assert below > max(mean)
    big = cf._expected_max_binomials([150_000, 150_000], hit, [8, 8]) / 150_000
    small = cf._expected_max_binomials([1500, 1500], hit, [8, 8]) / 1500
    assert 0.41 < big < small  # the excess of the max shrinks as sqrt(n) / n


@settings(max_examples=40, deadline=None)
@given(E=st.integers(2, 300), data=st.data())
def test_imbalance_at_least_one_and_falls_towards_one(E, data):
    k = data.draw(st.integers(1, min(E, 8)))
    R = data.draw(st.integers(2, 64))
    values = [cf.imbalance_uniform(n, R, E, k) for n in (1, 4, 64, 4096, 1e6)]
    for v in values:
        assert v >= 1 - 1e-9
    for a, b in zip(values, values[1:], strict=False):
        assert b <= a * (1 + 1e-6)
    # With equal blocks the excess vanishes; unequal blocks (R not dividing E) keep the
    # structural ratio max hit / mean hit.
    hit = 1 - cf.miss_probability(cf.experts_per_rank(E, R), E, k)
    assert values[-1] == pytest.approx(max(1.0, hit.max() / hit.mean()), rel=5e-3)


def test_one_rank_and_no_tokens():
    assert cf.imbalance_uniform(100, 1, 64, 4) == 1.0
    assert cf.imbalance_from_probabilities(0, [0.5, 0.5]) == 1.0


# --- EPLB-like replicas ---------------------------------------------------------------------------


def test_eplb_placement_replicates_the_hottest_and_fills_evenly():
    load = np.array([10.0, 1, 1, 1, 1, 1, 1, 1])
    held = cf.eplb_placement(load, 4, 4)
    assert sorted(len(h) for h in held) == [3, 3, 3, 3]  # (8 + 4) / 4 slots per rank
    counts = np.bincount(np.concatenate(held), minlength=8)
    # e0 takes replicas while 10 / copies > 1, but at most one copy per rank (4); the last
    # replica goes to the hottest of the rest (a tie, the lowest id)
    assert counts.tolist() == [4, 2, 1, 1, 1, 1, 1, 1]
    assert all(len(set(h)) == len(h) for h in held)  # no rank holds two copies


def test_contiguous_placement_matches_the_reference():
    for E, R in ((8, 16), (10, 4), (256, 32)):
        held = cf.contiguous_placement(E, R)
        for r, h in enumerate(held):
            assert all(e * R // E == r for e in h)


@pytest.mark.parametrize("s", [0.8, 1.2])
def test_zipf_with_and_without_replicas_reference_against_formula(s):
    """Zipf routing, R = 16 ranks of 8 GPUs, 32 redundant slots. The JAX reference measures
    max / mean rows over concrete routings; the formula uses those routings' expert
    marginals with the same placements. Replicas must cut the imbalance."""
    E, k, R, N, redundant = 128, 8, 16, 64, 32
    key = jax.random.key(7)
    popularity_key = jax.random.fold_in(key, 0)
    base, rep, f_base, f_rep = [], [], [], []
    for i in range(6):
        # one popularity (one layer), several batches: fold the batch into the token key only
        ids = np.asarray(rt.popular(jax.random.fold_in(key, 100 + i), R * N,
                                    rt.zipf_logp(popularity_key, E, s), k))
        b = ref.busiest_rank(ids, E, R, redundant)
        base.append(b["imbalance"])
        rep.append(b["imbalance_redundant"])
        q = np.bincount(ids.reshape(-1), minlength=E) / len(ids)  # marginals, sum = k
        f_base.append(cf.imbalance_from_probabilities(
            N, cf.placement_hit_probabilities(q, cf.contiguous_placement(E, R))))
        f_rep.append(cf.imbalance_from_probabilities(N, cf.placement_hit_probabilities(q, b["held"])))
    assert np.mean(rep) < np.mean(base)
    assert np.mean(f_base) == pytest.approx(np.mean(base), rel=0.05)
    assert np.mean(f_rep) == pytest.approx(np.mean(rep), rel=0.05)


def test_reference_uniform_matches_formula():
    """The JAX reference's busiest rank on uniform routings (R N tokens) against the formula."""
    E, k, R, N = 64, 4, 8, 32
    vals = []
    for i in range(200):
        ids = np.asarray(rt.uniform(jax.random.key(i), R * N, E, k))
        vals.append(ref.busiest_rank(ids, E, R)["imbalance"])
    se = np.std(vals, ddof=1) / math.sqrt(len(vals))
    assert abs(np.mean(vals) - cf.imbalance_uniform(N, R, E, k)) < 0.01 + 3 * se


def test_rank_loads_by_hand():
    # 4 tokens on 2 ranks (2 each), E = 4 (experts 0,1 on rank 0; 2,3 on rank 1), k = 2
    ids = np.array([[0, 2], [1, 3], [2, 3], [0, 1]])
    # token 0 (rank 0) -> rank 1; token 1 (rank 0) -> rank 1; token 2 (rank 1) -> none remote;
    # token 3 (rank 1) -> rank 0
    assert ref.rank_loads(ids, 4, 2).tolist() == [1, 2]
    # expert 2 also on rank 0, its copies in rank order (0, 1); token t uses copy t mod 2.
    # token 0 (rank 0): e2 copy 0 = rank 0, local -> nothing; token 1 (rank 0): e3 -> rank 1;
    # token 2 (rank 1): e2 copy 0 -> rank 0, e3 local; token 3 (rank 1): e0, e1 -> rank 0
    held = [[0, 1, 2], [2, 3]]
    assert ref.rank_loads(ids, 4, 2, held).tolist() == [2, 1]


# --- EP overhead uses the busiest rank; replicas reported ------------------------------------------

R1 = ModelSpec("r1", 58, 256, 8, 7168, 2048, expert_dtype="fp8", act_dtype="bf16")
H100 = SystemSpec("h100", b_pcie=64e9, b_net=50e9)


def test_ep_overhead_pays_the_busiest_rank():
    w = Workload(tokens=64)
    mean = cf.evaluate(R1, H100, w, Options(ep_ranks=32, imbalance=False))
    busy = cf.evaluate(R1, H100, w, Options(ep_ranks=32))
    imb = cf.imbalance_uniform(64, 32, 256, 8)
    assert busy.ep.imbalance == pytest.approx(imb)
    assert busy.t_ep_overhead == pytest.approx(imb * mean.t_ep_overhead, rel=1e-12)


def test_redundant_experts_report_memory():
    r = cf.evaluate(R1, H100, Workload(tokens=4096), Options(ep_ranks=32, redundant_experts=32))
    # 32 replicas over 32 ranks: one expert per rank per MoE layer, 58 layers of 44 M fp8 bytes
    assert r.ep.redundant_bytes_per_rank == 1 * 58 * 3 * 7168 * 2048 * 1.0
    assert r.ep.imbalance_no_redundancy == pytest.approx(cf.imbalance_uniform(4096, 32, 256, 8))
    with pytest.raises(SpecError, match="^redundant_experts"):
        Options(redundant_experts=4)


def test_monte_carlo_reports_imbalance_with_and_without_replicas():
    model = R1.with_(n_moe_layers=2)
    out = ref.gamma_distribution(model, H100, Workload(tokens=32),
                                 Options(ep_ranks=16, redundant_experts=16), "zipf:1.2", 4)
    assert out["imbalance_mean"] > out["imbalance_redundant_mean"] >= 1
    assert out["imbalance_samples"] == 8
