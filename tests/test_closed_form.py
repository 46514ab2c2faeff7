"""Properties of the closed form: the seed's formulas, their boundaries, and the extensions."""

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from moelab.costmodel import closed_form as cf
from moelab.costmodel.presets import load_model, load_system
from moelab.costmodel.specs import ModelSpec, Options, SpecError, SystemSpec, Workload

tokens = st.integers(0, 10**7)
ks = st.integers(1, 64)
experts = st.integers(1, 1024)
bandwidth = st.floats(1e8, 1e13)
positive = st.floats(1e-3, 1e3)


@st.composite
def models(draw):
    E = draw(experts)
    return ModelSpec(
        name="m",
        n_moe_layers=draw(st.integers(1, 128)),
        n_experts=E,
        top_k=draw(st.integers(1, E)),
        hidden=draw(st.integers(1, 16384)),
        expert_intermediate=draw(st.integers(1, 32768)),
        expert_dtype=draw(st.sampled_from(["fp8", "bf16", "fp32", "mxfp4"])),
        act_dtype=draw(st.sampled_from(["fp8", "bf16", "fp32"])),
    )


@st.composite
def systems(draw):
    return SystemSpec(name="s", b_pcie=draw(bandwidth), b_net=draw(bandwidth),
                      hbm_bw=draw(bandwidth), peak_flops=draw(st.floats(1e12, 1e16)))


def gamma(model, system, n_tokens, options=None):
    return cf.evaluate(model, system, Workload(tokens=n_tokens), options).gamma


# --- N_ue = min(k N_t, E) ---------------------------------------------------------------


@given(tokens, tokens, ks, experts)
def test_n_used_worst_non_decreasing_in_tokens(n1, n2, k, E):
    lo, hi = sorted((n1, n2))
    assert cf.n_used_worst(lo, k, E) <= cf.n_used_worst(hi, k, E)


@given(tokens, ks, ks, experts, experts)
def test_n_used_worst_non_decreasing_in_k_and_E(n, k1, k2, E1, E2):
    (ka, kb), (Ea, Eb) = sorted((k1, k2)), sorted((E1, E2))
    assert cf.n_used_worst(n, ka, Ea) <= cf.n_used_worst(n, kb, Ea)
    assert cf.n_used_worst(n, ka, Ea) <= cf.n_used_worst(n, ka, Eb)


@given(tokens, ks, experts)
def test_n_used_worst_bounds_and_regimes(n, k, E):
    used = cf.n_used_worst(n, k, E)
    assert used <= k * n and used <= E
    if n <= E / k:
        assert used == k * n
    else:
        assert used == E
    assert cf.n_used_worst(0, k, E) == 0


@given(st.integers(1, 10**6), ks, experts)
def test_expected_used_between_k_and_worst(n, k, E):
    assume(k <= E)
    expected = cf.n_used_uniform(n, k, E)
    assert expected <= cf.n_used_worst(n, k, E) * (1 + 1e-12)
    assert expected >= min(k, E) * (1 - 1e-12)


def test_expected_used_r1_sixteen_tokens():
    # E (1 - (1 - k/E)^N_t) for DeepSeek-R1 (E = 256, k = 8) at 16 tokens.
    assert cf.n_used_uniform(16, 8, 256) == pytest.approx(256 * (1 - (1 - 8 / 256) ** 16))
    assert cf.n_used_uniform(16, 8, 256) == pytest.approx(101.96, abs=0.01)


@given(st.integers(1, 5000), st.integers(1, 64))
def test_marginals_uniform_equals_uniform_formula(n, E):
    k = max(1, E // 3)
    q = np.full(E, k / E)
    assert cf.n_used_marginals(n, q) == pytest.approx(cf.n_used_uniform(n, k, E), rel=1e-9)


def _capped_marginals(weights, k):
    """Marginals proportional to `weights` where below 1, capped at 1, summing to k <= E:
    q_e = min(1, c w_e) with c found by bisection (the sum is increasing in c)."""
    lo, hi = 0.0, k / weights.min()
    for _ in range(200):
        c = 0.5 * (lo + hi)
        lo, hi = (c, hi) if np.minimum(1, c * weights).sum() < k else (lo, c)
    return np.minimum(1, hi * weights)


@given(st.integers(1, 5000), st.lists(st.floats(0.01, 1), min_size=2, max_size=64), ks)
def test_skewed_marginals_use_fewer_experts(n, weights, k):
    # For a fixed k, uniform marginals maximize the expected number of used experts
    # (1 - (1-q)^n is concave in q).
    E = len(weights)
    k = min(k, E)
    q = _capped_marginals(np.asarray(weights), k)
    assert np.all(q <= 1) and np.isclose(q.sum(), k)
    assert cf.n_used_marginals(n, q) <= cf.n_used_uniform(n, k, E) * (1 + 1e-9)


# --- fan-out ----------------------------------------------------------------------------


@given(st.integers(1, 64), st.integers(1, 16), st.integers(1, 64))
def test_fanout_between_zero_and_min_k_R_minus_one(R, per_rank, k):
    E = R * per_rank
    k = min(k, E)
    phi = cf.fanout_uniform(R, E, k)
    assert -1e-12 <= phi <= min(k, R - 1) + 1e-9


def test_fanout_matches_combinatorics():
    # R1 on EP32: 31 * (1 - C(248, 8) / C(256, 8)) (= 7.04)
    expected = 31 * (1 - math.comb(248, 8) / math.comb(256, 8))
    assert cf.fanout_uniform(32, 256, 8) == pytest.approx(expected, rel=1e-12)
    assert round(float(cf.fanout_uniform(32, 256, 8)), 2) == 7.04
    assert cf.fanout_uniform(1, 256, 8) == 0  # one rank: nothing is remote
    assert cf.fanout_uniform(8, 8, 8) == pytest.approx(7)  # k = E: every rank is hit


# --- gamma ------------------------------------------------------------------------------


@given(models(), systems(), st.integers(1, 10**6))
def test_boxed_formula_equals_overhead_ratio(model, system, n):
    r = cf.evaluate(model, system, Workload(tokens=n))
    assert r.gamma == pytest.approx(r.gamma_seed, rel=1e-9)
    # The seed's two overheads written out by hand: L S_E f_E N_ue / B_pcie, 2 L N_t d f_a / B_net
    L, n_ue = model.n_moe_layers, min(model.top_k * n, model.n_experts)
    t_p = L * model.expert_params * model.f_e * n_ue / system.b_pcie
    t_ep = 2 * L * n * model.hidden * model.f_a / system.b_net
    assert r.t_p_overhead == pytest.approx(t_p, rel=1e-12)
    assert r.t_ep_overhead == pytest.approx(t_ep, rel=1e-12)
    assert r.gamma == pytest.approx(t_p / t_ep, rel=1e-12)
    assert r.gamma == pytest.approx((r.t_p - r.t_b) / (r.t_ep - r.t_b), rel=1e-6)


@given(models(), systems(), st.integers(1, 10**6), st.integers(1, 10**6))
def test_gamma_non_increasing_in_tokens(model, system, n1, n2):
    lo, hi = sorted((n1, n2))
    assert gamma(model, system, hi) <= gamma(model, system, lo) * (1 + 1e-12)


@given(models(), systems(), st.integers(1, 10**6), positive)
def test_gamma_proportional_to_b_net_and_inverse_b_pcie(model, system, n, s):
    g = gamma(model, system, n)
    assert gamma(model, system.with_(b_net=system.b_net * s), n) == pytest.approx(g * s, rel=1e-9)
    assert gamma(model, system.with_(b_pcie=system.b_pcie * s), n) == pytest.approx(g / s, rel=1e-9)
    both = system.with_(b_net=system.b_net * s, b_pcie=system.b_pcie * s)
    assert gamma(model, both, n) == pytest.approx(g, rel=1e-9)


@given(models(), systems(), st.integers(1, 10**6), st.integers(1, 200), positive)
def test_gamma_independent_of_layers_and_baseline(model, system, n, L, s):
    g = gamma(model, system, n)
    assert gamma(model.with_(n_moe_layers=L), system, n) == pytest.approx(g, rel=1e-12)
    faster = system.with_(hbm_bw=system.hbm_bw * s, peak_flops=system.peak_flops * s)
    assert gamma(model, faster, n) == pytest.approx(g, rel=1e-12)


@given(models(), systems(), st.integers(1, 10**6))
def test_gamma_below_one_exactly_when_offload_is_faster(model, system, n):
    r = cf.evaluate(model, system, Workload(tokens=n))
    assume(abs(r.gamma - 1) > 1e-9)
    assert (r.gamma < 1) == (r.t_p < r.t_ep)
    assert r.decision == ("offload" if r.t_p < r.t_ep else "ep")


@given(models(), systems())
def test_gamma_is_one_at_tipping_point(model, system):
    r = cf.evaluate(model, system, Workload(tokens=1))
    C = r.c_seed
    assert r.gamma == pytest.approx(C * model.top_k, rel=1e-9)  # the plateau gamma = C k
    if C * model.top_k > 1:
        assert r.tipping_tokens == pytest.approx(C * model.n_experts, rel=1e-9)
        at = cf.gamma_of_tokens(model, system, Options(), np.array(r.tipping_tokens))
        assert at == pytest.approx(1.0, rel=1e-9)
    else:
        assert r.tipping_tokens is None


@given(models(), systems(), st.floats(0, 1e-3), st.floats(0, 1e-3), st.floats(0.5, 64),
       st.floats(0, 0.99))
def test_tipping_point_with_extensions_is_a_crossing(model, system, a_p, a_n, phi, h):
    system = system.with_(alpha_pcie=a_p, alpha_net=a_n)
    options = Options(fanout=phi, resident_fraction=h)
    tip = cf.evaluate(model, system, Workload(tokens=1), options).tipping_tokens
    g = lambda n: float(cf.gamma_of_tokens(model, system, options, np.array(n)))
    if tip is None:
        grid = np.geomspace(1, 1e9, 100)
        assert np.all(cf.gamma_of_tokens(model, system, options, grid) <= 1 + 1e-9)
    else:
        assert g(tip) == pytest.approx(1.0, rel=1e-6)
        assert g(tip * 1.01) < 1


def test_seed_worked_example():
    model = load_model("deepseek-r1").with_(expert_dtype="fp8", act_dtype="bf16")
    system = load_system("h100-sxm").with_(b_pcie=64e9, b_net=50e9)
    r = cf.evaluate(model, system, Workload(tokens=4096))
    assert r.model_term == 3072
    assert r.gamma == pytest.approx(75)
    assert r.tipping_tokens == pytest.approx(307_200)
    decode = cf.evaluate(model, system, Workload(decode=True, batch=1, steps=1000))
    assert decode.gamma == pytest.approx(9600)


@given(models(), systems(), st.integers(1, 4096), st.integers(1, 1000))
def test_decode_is_prefill_of_one_batch_repeated(model, system, batch, steps):
    decode = cf.evaluate(model, system, Workload(decode=True, batch=batch, steps=steps))
    step = cf.evaluate(model, system, Workload(tokens=batch))
    assert decode.gamma == pytest.approx(step.gamma, rel=1e-12)
    assert decode.t_p_overhead == pytest.approx(steps * step.t_p_overhead, rel=1e-12)
    assert decode.t_ep_overhead == pytest.approx(steps * step.t_ep_overhead, rel=1e-12)


# --- extensions default to the seed and act as their formulas say -----------------------


@given(models(), systems(), st.integers(1, 10**5), st.floats(0.1, 64), st.floats(0, 0.999))
def test_fanout_and_residency_scale_the_overheads(model, system, n, phi, h):
    base = cf.evaluate(model, system, Workload(tokens=n))
    ext = cf.evaluate(model, system, Workload(tokens=n), Options(fanout=phi, resident_fraction=h))
    assert ext.t_ep_overhead == pytest.approx(phi * base.t_ep_overhead, rel=1e-9)
    assert ext.t_p_overhead == pytest.approx((1 - h) * base.t_p_overhead, rel=1e-9)


@given(models(), systems(), st.integers(1, 10**5),
       st.sampled_from(["fp8", "bf16", "fp32"]), st.sampled_from(["fp8", "bf16", "fp32"]))
def test_dispatch_and_combine_dtypes(model, system, n, fd, fc):
    base = cf.evaluate(model, system, Workload(tokens=n))
    ext = cf.evaluate(model, system, Workload(tokens=n),
                      Options(dispatch_dtype=fd, combine_dtype=fc))
    # an explicit fp8 transfer carries one float32 scale per 128 values: 4/128 bytes more
    scale = {t: 4 / 128 if t == "fp8" else 0.0 for t in (fd, fc)}
    ratio = (cf.DTYPE_BYTES[fd] + scale[fd] + cf.DTYPE_BYTES[fc] + scale[fc]) / (2 * model.f_a)
    assert ext.t_ep_overhead == pytest.approx(ratio * base.t_ep_overhead, rel=1e-9)


@given(models(), systems(), st.integers(1, 10**5), st.floats(0, 1e-3), st.floats(0, 1e-3))
def test_latencies_add_count_times_alpha(model, system, n, a_p, a_n):
    base = cf.evaluate(model, system, Workload(tokens=n))
    ext = cf.evaluate(model, system.with_(alpha_pcie=a_p, alpha_net=a_n), Workload(tokens=n))
    L = model.n_moe_layers
    assert ext.t_p_overhead == pytest.approx(base.t_p_overhead + L * base.n_ue * a_p, rel=1e-9)
    assert ext.t_ep_overhead == pytest.approx(base.t_ep_overhead + L * 2 * a_n, rel=1e-9)


def test_vectorized_over_broadcast_inputs():
    n = np.array([[1], [100], [10**5]])
    b_pcie = np.array([16e9, 32e9, 64e9, 128e9])
    model, system = load_model("deepseek-r1"), load_system("h100-sxm")
    n_ue = cf.n_used_worst(n, model.top_k, model.n_experts)
    g = cf.offload_overhead(n_ue, model.expert_bytes, b_pcie) / cf.ep_overhead(
        n, model.hidden, model.f_a, model.f_a, system.b_net)
    assert g.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            one = cf.evaluate(model, system.with_(b_pcie=b_pcie[j]), Workload(tokens=int(n[i, 0])))
            assert g[i, j] == pytest.approx(one.gamma, rel=1e-12)


# --- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: SystemSpec(name="s", b_pcie=0, b_net=1), "b_pcie"),
        (lambda: SystemSpec(name="s", b_pcie=1, b_net=-5), "b_net"),
        (lambda: SystemSpec(name="s", b_pcie=float("nan"), b_net=1), "b_pcie"),
        (lambda: SystemSpec(name="s", b_pcie=1, b_net=1, alpha_net=-1), "alpha_net"),
        (lambda: ModelSpec("m", 1, 8, 9, 1, 1), "top_k"),  # k > E
        (lambda: ModelSpec("m", 1, 8, 0, 1, 1), "top_k"),  # k < 1
        (lambda: ModelSpec("m", 1, 0, 1, 1, 1), "n_experts"),  # E < 1
        (lambda: ModelSpec("m", -1, 8, 1, 1, 1), "n_moe_layers"),
        (lambda: ModelSpec("m", 1, 8, 1, 1, 1, expert_dtype="int3"), "expert_dtype"),
        (lambda: Workload(tokens=-1), "tokens"),
        (lambda: Workload(decode=True, batch=0), "batch"),
        (lambda: Options(resident_fraction=1.5), "resident_fraction"),
        (lambda: Options(fanout=2, ep_ranks=4), "fanout"),
        (lambda: Options(routing="zipf"), "routing"),
    ],
)
def test_bad_specs_name_their_field(make, field):
    with pytest.raises(SpecError, match=f"^{field}"):
        make()


@pytest.mark.parametrize(
    "n, k, E, expected",
    [
        (0, 8, 256, 0.0),  # no tokens, no experts
        (0, 8, 8, 0.0),  # no tokens with k = E (0 * log 0 must not give NaN)
        (1, 8, 8, 8.0),  # k = E: every expert at once
        (1, 1, 1, 1.0),  # one expert
        (10**9, 8, 256, 256.0),  # saturates at E
    ],
)
def test_expected_used_edges(n, k, E, expected):
    assert cf.n_used_uniform(n, k, E) == pytest.approx(expected, abs=1e-9)
    assert cf.n_used_marginals(n, np.full(E, k / E)) == pytest.approx(expected, abs=1e-9)
