"""The busiest rank: the closed-form imbalance against Monte Carlo of concrete routings
(numpy and the JAX reference), EPLB-like replicas, and the uniform-routing properties."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.costmodel import closed_form as cf
from moelab.costmodel import reference as ref
from moelab.costmodel import routing as rt
from moelab.costmodel.specs import ModelSpec, Options, SpecError, SystemSpec, Workload


def sample_top_k(rng, count, E, k):
    """[count, k] distinct expert ids, each k-subset equally likely (Floyd's algorithm)."""
    picks = np.empty((count, k), np.int64)
    for i in range(k):
        j = E - k + i
        t = rng.integers(0, j + 1, size=count)
        if i:
            t = np.where((picks[:, :i] == t[:, None]).any(1), j, t)
        picks[:, i] = t
    return picks


def mc_imbalance(N, R, E, k, samples, seed=0, held=None):
    """E[max_r X_r] / E[mean_r X_r] over uniform top-k routings of R N tokens (numpy,
    independent of the closed form): token t on rank t // N sends one row to every remote
    rank holding one of its experts; a replicated expert's token t uses copy t mod copies
    (as reference.rank_loads). Returns the ratio and its standard error."""
    rng = np.random.default_rng(seed)
    held = held or [[e for e in range(E) if e * R // E == r] for r in range(R)]
    copies = np.zeros(E, np.int64)
    table = np.zeros((E, sum(map(len, held))), np.int64)
    for r, h in enumerate(held):
        for e in h:
            table[e, copies[e]] = r
            copies[e] += 1
    T = N * R
    token, home = np.arange(T), np.arange(T) * R // T
    batch = max(1, 400_000 // (T * k))
    maxs, means = [], []
    for start in range(0, samples, batch):
        b = min(batch, samples - start)
        ids = sample_top_k(rng, b * T, E, k).reshape(b, T, k)
        dest = np.sort(table[ids, token[None, :, None] % copies[ids]], axis=2)
        keep = np.ones(dest.shape, bool)
        keep[:, :, 1:] = dest[:, :, 1:] != dest[:, :, :-1]  # one row per rank hit
        keep &= dest != home[None, :, None]  # nothing to the own rank
        x = np.bincount((np.arange(b)[:, None, None] * R + dest)[keep], minlength=b * R)
        x = x.reshape(b, R)
        maxs.append(x.max(1))
        means.append(x.mean(1))
    mx, mn = np.concatenate(maxs).astype(float), np.concatenate(means)
    ratio = mx.mean() / mn.mean()
    se = np.std(mx - ratio * mn, ddof=1) / math.sqrt(mx.size) / mn.mean()  # delta method
    return ratio, se


@pytest.mark.parametrize("N,R,E,k", [
    (1, 8, 16, 2), (2, 8, 16, 2), (1, 8, 8, 1), (2, 16, 8, 2), (1, 16, 64, 4),
    (1, 7, 20, 3),  # R not dividing E, beyond the exact path
    (2, 12, 40, 6), (1, 64, 384, 16), (1, 256, 256, 8), (16, 16, 64, 8), (8, 32, 256, 8)])
def test_imbalance_within_one_percent_of_monte_carlo(N, R, E, k):
    """Uniform routing, contiguous placement, from 1 token per rank on (the independent-
    receiver formula this replaced was 1.5-6% low at 1-2 tokens per rank: (1, 8, 16, 2) by
    3.6%, (1, 8, 8, 1) by 6%)."""
    want, se = mc_imbalance(N, R, E, k, samples=6000, seed=N * 1000 + R)
    got = cf.imbalance_uniform(N, R, E, k)
    assert abs(got / want - 1) < 0.01 + 3 * se


@pytest.mark.parametrize("N,R,E,k,redundant", [
    (1, 8, 16, 2, 8), (2, 8, 16, 2, 8), (3, 8, 16, 2, 8), (1, 12, 40, 6, 12),
    (1, 32, 256, 8, 32), (2, 32, 256, 8, 32), (1, 8, 60, 6, 4)])
def test_imbalance_with_replicas_within_one_percent_of_monte_carlo(N, R, E, k, redundant):
    """EPLB-like replicas of uniform routing, each replicated expert's tokens split over
    its copies as the JAX reference splits them (token t to copy t mod copies)."""
    held = cf.eplb_placement(np.full(E, k / E), R, redundant)
    want, se = mc_imbalance(N, R, E, k, samples=6000, seed=7 + N, held=held)
    got = cf.imbalance_uniform(N, R, E, k, redundant)
    assert got == cf.imbalance_placement(N, E, k, held)
    assert abs(got / want - 1) < 0.01 + 3 * se


def exact_by_enumeration(N, R, E, k, held=None):
    """E[max_r X_r] and E[mean_r X_r] as fractions: every token's k-subsets enumerated
    (all C(E, k) equally likely), the joint counts convolved token by token."""
    held = held or [[e for e in range(E) if e * R // E == r] for r in range(R)]
    copies, table = [0] * E, [[0] * (R * E) for _ in range(E)]
    for r, h in enumerate(held):
        for e in h:
            table[e][copies[e]] = r
            copies[e] += 1
    subsets = list(itertools.combinations(range(E), k))
    joint = {(0,) * R: Fraction(1)}
    T = N * R
    for t in range(T):
        new = {}
        for counts, p in joint.items():
            for s in subsets:
                ranks = {table[e][t % copies[e]] for e in s} - {t * R // T}
                key = tuple(c + (r in ranks) for r, c in enumerate(counts))
                new[key] = new.get(key, 0) + p / len(subsets)
        joint = new
    return (sum(p * max(c) for c, p in joint.items()),
            sum(p * Fraction(sum(c), R) for c, p in joint.items()), joint)


TINY = [(N, R, E, k) for R in (2, 3) for E in range(R, 7) for k in range(1, E + 1)
        for N in (1, 2) if math.comb(E, k) ** (N * R) <= 2e5 or N * R <= 4]


@pytest.mark.parametrize("N,R,E,k", TINY[::3])
def test_tiny_cases_exact_against_enumeration(N, R, E, k):
    """Small joint laws are summed exactly (closed_form.expected_max_exact), and the
    moments the model rests on (loads_uniform) are exact."""
    emax, emean, joint = exact_by_enumeration(N, R, E, k)
    held = cf.contiguous_placement(E, R)
    assert cf.expected_max_exact(N, E, k, held) == pytest.approx(float(emax), rel=1e-12, abs=1e-12)
    if emean:
        assert cf.imbalance_uniform(N, R, E, k) == pytest.approx(float(emax / emean), rel=1e-12)
    loads = cf.loads_uniform(N, E, k, held)
    x = np.array([c for c in joint], float)
    p = np.array([float(v) for v in joint.values()])
    assert loads.mean == pytest.approx(p @ x, abs=1e-12)
    assert loads.var == pytest.approx(p @ x**2 - (p @ x) ** 2, abs=1e-12)
    total = x.sum(1)
    assert loads.total_var == pytest.approx(p @ total**2 - (p @ total) ** 2, abs=1e-12)


@pytest.mark.parametrize("N,R,E,k,redundant", [(1, 3, 4, 2, 2), (2, 2, 3, 1, 1), (1, 4, 5, 2, 3),
                                               (2, 3, 5, 2, 4)])
def test_tiny_replica_cases_exact_against_enumeration(N, R, E, k, redundant):
    held = cf.eplb_placement(np.full(E, k / E), R, redundant)
    emax, emean, joint = exact_by_enumeration(N, R, E, k, held)
    assert cf.imbalance_uniform(N, R, E, k, redundant) == pytest.approx(float(emax / emean),
                                                                        rel=1e-12)
    loads = cf.loads_uniform(N, E, k, held)
    x = np.array([c for c in joint], float)
    p = np.array([float(v) for v in joint.values()])
    assert loads.var == pytest.approx(p @ x**2 - (p @ x) ** 2, abs=1e-12)
    assert loads.total_var == pytest.approx(p @ x.sum(1) ** 2 - (p @ x.sum(1)) ** 2, abs=1e-12)


@pytest.mark.parametrize("N,R,E,k", [t for t in TINY if t[1] == 3][::2])
def test_model_without_the_exact_path_within_one_percent_on_tiny_cases(N, R, E, k):
    """The approximation itself (what runs beyond the exact path) on the smallest cases,
    where the receivers' coupling is strongest: within 1% of enumeration."""
    emax, emean, _ = exact_by_enumeration(N, R, E, k)
    if emean == 0:
        return
    model = cf.expected_max_load(cf.loads_uniform(N, E, k, cf.contiguous_placement(E, R)))
    assert abs(model / float(emax) - 1) < 0.01


def test_remote_ranks_law_against_enumeration():
    """One token's remote ranks hit: the generating function against all k-subsets."""
    for E, R, k, home in ((7, 3, 3, 0), (10, 4, 4, 2), (9, 5, 2, 4)):
        owner = [e * R // E for e in range(E)]
        counts = np.zeros(R)
        for s in itertools.combinations(range(E), k):
            counts[len({owner[e] for e in s} - {home})] += 1
        sizes = np.bincount(owner, minlength=R)
        law = cf._remote_ranks_law(np.delete(sizes, home), int(sizes[home]), E, k)
        assert law == pytest.approx(counts[: law.size] / counts.sum(), abs=1e-14)
        assert counts[law.size:].sum() == 0


def test_conditioned_and_independent_receivers_agree_for_larger_counts():
    """Beyond 2^13 the conditioning is dropped; at the switch the two agree."""
    held = cf.contiguous_placement(64, 16)
    loads = cf.loads_uniform(16, 64, 4, held)
    R, spread = 16, float(loads.var.sum())
    f0 = (R * spread - loads.total_var) / ((R - 1) * spread)
    assert f0 > 1.03  # the receivers' coupling is there
    independent = cf._expected_max_independent(loads.trials, loads.mean[:1], f0 * loads.var[:1], [R])
    assert cf.expected_max_load(loads) == pytest.approx(independent, rel=1e-3)
    top = math.ceil(loads.mean.max() + 12 * math.sqrt(2.5 * loads.var.max()) + 16)
    assert R * top <= cf._CONDITIONED_MAX_LENGTH  # the conditioned path ran above


def test_independent_receivers_switch_to_normal_smoothly():
    """Windows over 4000 integers are integrated as normal receivers; on either side of the
    switch (sd 142.6 and 143.2) the two agree. Per integer, the beta-binomial's lgamma form
    (over 1e5 trials) agrees with its log1p form."""
    x = np.linspace(-12, 12, 200_001)  # E[max of 16 iid N(0, 1)] by quadrature: 1.76599
    cdf = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    z16 = np.trapezoid(x * 16 * cdf**15 * np.exp(-x * x / 2) / math.sqrt(2 * math.pi), x)
    per_integer, normal = (cf._expected_max_independent(10**7, np.array([5e5]),
                                                        np.array([sd**2]), [16])
                           for sd in (142.6, 143.2))
    # a discrete count with P(Y <= c) = Phi((c + 1/2 - mean) / sd) has E[max] = mean + sd z16
    assert normal == pytest.approx(5e5 + 143.2 * z16, abs=0.05)
    # per integer: a binomial of p = 0.96 (a variance below the binomial's over 1e7 trials),
    # skewness -0.0065: its max sits 0.4 lower than the normal's
    assert per_integer == pytest.approx(5e5 + 142.6 * z16, abs=0.6)
    a = cf._expected_max_independent(99_999, np.array([40.0]), np.array([45.0]), [8])
    b = cf._expected_max_independent(100_001, np.array([40.0]), np.array([45.0]), [8])
    assert a > 40 and a == pytest.approx(b, rel=1e-6)


def test_fractional_tokens_interpolate():
    """The tipping solver passes fractional N_t: E[max] and the mean are interpolated
    between neighbouring integers, so the imbalance is continuous and lies between."""
    lo, hi = cf.imbalance_uniform(2, 8, 16, 2), cf.imbalance_uniform(3, 8, 16, 2)
    mid = cf.imbalance_uniform(2.5, 8, 16, 2)
    assert hi < mid < lo
    assert cf.imbalance_uniform(2 + 1e-9, 8, 16, 2) == pytest.approx(lo, rel=1e-6)
    assert cf.imbalance_uniform(0.3, 8, 16, 2) == pytest.approx(cf.imbalance_uniform(1, 8, 16, 2))


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


@settings(max_examples=25, deadline=None)
@given(E=st.integers(2, 384), data=st.data())
def test_busiest_at_least_the_largest_mean(E, data):
    """E[max_r X_r] >= max_r E[X_r], also with unequal blocks and with replicas."""
    k = data.draw(st.integers(1, min(E, 16)))
    R = data.draw(st.integers(2, 256))
    N = data.draw(st.sampled_from([1, 2, 3, 1.5, 8]))
    redundant = data.draw(st.sampled_from([0, 0, R // 2, R]))
    held = (cf.eplb_placement(np.full(E, k / E), R, redundant) if redundant
            else cf.contiguous_placement(E, R))
    got = cf.imbalance_uniform(N, R, E, k, redundant)
    # A fractional N interpolates between its whole neighbours: the bound is the smaller of theirs.
    bounds = []
    for n in {math.floor(N), math.ceil(N)}:
        loads = cf.loads_uniform(n, E, k, held)
        bounds.append(loads.mean.max() / loads.mean.mean())
    assert got >= min(bounds) * (1 - 1e-9)
    assert got >= 1 - 1e-9


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


@pytest.mark.slow
def test_imbalance_grid_against_monte_carlo():
    """The grid behind docs/model.md's accuracy figure: 120 random (N, R, E, k, replicas)
    with N in {1, 2, 3, 4, 8} tokens per rank, R in 2..256, E in 2..384, k <= min(16, E),
    a third with R / 2, R or 32 replica slots (at most E). Prints the worst error; run with
    `pytest -m slow tests/test_imbalance.py -k grid -s`."""
    rng = np.random.default_rng(2026)
    worst = (0.0, None)
    for i in range(120):
        R = int(rng.choice([2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256]))
        E = int(rng.integers(2, 40) if rng.random() < 0.3 else rng.integers(max(2, R // 4), 385))
        k = int(rng.integers(1, min(16, E) + 1))
        N = int(rng.choice([1, 1, 1, 2, 2, 3, 4, 8]))
        redundant = int(rng.choice([R // 2, R, 32])) if rng.random() < 1 / 3 else 0
        redundant = min(redundant, E)
        held = cf.eplb_placement(np.full(E, k / E), R, redundant) if redundant else None
        samples = int(min(40_000, max(10_000, 2e7 / (N * R * k))))
        want, se = mc_imbalance(N, R, E, k, samples, seed=i, held=held)
        got = cf.imbalance_uniform(N, R, E, k, redundant)
        err = got / want - 1
        print(f"N={N} R={R} E={E} k={k} redundant={redundant}: Monte Carlo {want:.4f} "
              f"+- {se:.4f}, formula {got:.4f}, error {err:+.4f}")
        if abs(err) > abs(worst[0]):
            worst = (err, (N, R, E, k, redundant, se))
        assert abs(err) < 0.01 + 3 * se
    print(f"worst error {worst[0]:+.4f} at (N, R, E, k, redundant, se) = {worst[1]}")
