"""Issue 10's smaller terms and the property tests of the expectations (Hypothesis):
used experts, saturation, the two crossings, one rank, fp8 scales, decode re-fetch,
gamma with measured links, attention and the fp8 roofline in T_B."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moelab
from moelab.costmodel import closed_form as cf
from moelab.costmodel import presets
from moelab.costmodel.specs import ModelSpec, Options, SystemSpec, Workload

R1 = ModelSpec("r1", 58, 256, 8, 7168, 2048, expert_dtype="fp8", act_dtype="bf16")
H100 = SystemSpec("h100", b_pcie=64e9, b_net=50e9)


# --- used experts (uniform top-k) -------------------------------------------------------------


@settings(max_examples=100)
@given(E=st.integers(2, 512), data=st.data())
def test_n_used_uniform_monotone_in_tokens_k_and_experts(E, data):
    k = data.draw(st.integers(1, E - 1))
    n = data.draw(st.floats(0, 1e6))
    dn = data.draw(st.floats(0.01, 1e3))
    base = cf.n_used_uniform(n, k, E)
    assert cf.n_used_uniform(n + dn, k, E) >= base - 1e-9
    assert cf.n_used_uniform(n, k + 1, E) >= base - 1e-9
    # more experts with the same k: each is picked less often, but more are there to pick;
    # over whole tokens the expected count never falls (at N = 1 it is k for every E)
    whole = math.floor(n)
    assert cf.n_used_uniform(whole, k, E + 1) >= cf.n_used_uniform(whole, k, E) - 1e-9
    # never above the seed's worst case (whole tokens; between them the curve is concave)
    assert 0 <= cf.n_used_uniform(whole, k, E) <= min(k * whole, E) + 1e-9


@settings(max_examples=100)
@given(k=st.integers(2, 16), n=st.integers(2, 256))  # E = k n <= 4096, specs.MAX_EXPERTS
def test_worst_case_saturates_exactly_at_k_n_equal_e(k, n):
    E = k * n  # k N_t = E exactly
    assert cf.n_used_worst(n, k, E) == E
    assert cf.n_used_worst(n - 1, k, E) == E - k  # one token fewer: k experts short
    assert cf.n_used_worst(n + 1, k, E) == E
    # gamma is flat below saturation, C E / N_t above: equal at the knee
    model = ModelSpec("m", 1, E, k, 64, 64)
    below = cf.evaluate(model, H100, Workload(tokens=n - 1)).gamma
    at = cf.evaluate(model, H100, Workload(tokens=n)).gamma
    above = cf.evaluate(model, H100, Workload(tokens=n + 1)).gamma
    assert below == pytest.approx(at, rel=1e-12) and above < at


def test_r1_saturates_at_32_tokens():
    """256 experts, top-8: 8 * 32 = 256."""
    assert cf.n_used_worst(32, 8, 256) == 256 and cf.n_used_worst(31, 8, 256) == 248
    r = cf.evaluate(R1, H100, Workload(tokens=32))
    assert r.n_ue == 256 and r.query_term == 8  # still the plateau C k at the knee


@settings(max_examples=50)
@given(n=st.floats(0.0, 1e5), E=st.integers(1, 300), data=st.data())
def test_fractional_tokens(n, E, data):
    """The tipping solver evaluates gamma at fractional N_t: N_ue stays between its values
    at the neighbouring integers."""
    k = data.draw(st.integers(1, E))
    lo, hi = math.floor(n), math.ceil(n)
    for f in (cf.n_used_uniform, cf.n_used_worst):
        v = float(f(n, k, E))
        assert float(f(lo, k, E)) - 1e-9 <= v <= float(f(hi, k, E)) + 1e-9


# --- two crossings --------------------------------------------------------------------------------


def test_two_crossings_with_network_latency():
    """Worst case with alpha_net: below saturation gamma = k N P / (2 a + N c) rises from
    below 1 (latency floor) to above 1, then falls past saturation. By hand, per layer:
    P = S_E f_E / B_pcie, c = d (f_d + f_c) / B_net; the lower crossing solves
    k N P = 2 a + N c: N = 2 a / (k P - c)."""
    system = H100.with_(alpha_net=5e-3)
    r = cf.evaluate(R1, system, Workload(tokens=4096))
    P = 3 * 7168 * 2048 * 1.0 / 64e9
    c = 7168 * 4 / 50e9
    want_low = 2 * 5e-3 / (8 * P - c)
    assert r.tipping_tokens_low == pytest.approx(want_low, rel=1e-6)
    # upper: E P = 2 a + N c past saturation
    assert r.tipping_tokens == pytest.approx((256 * P - 2 * 5e-3) / c, rel=1e-9)
    out = moelab.gamma(R1, system, tokens=4096)
    assert out["tipping_tokens_low"] == pytest.approx(want_low, rel=1e-6)
    assert moelab.gamma(R1, H100, tokens=4096)["tipping_tokens_low"] is None  # the seed: one


# --- one rank, fp8 scales, decode ---------------------------------------------------------------------


def test_one_ep_rank_moves_nothing():
    r = cf.evaluate(R1, H100.with_(alpha_net=1e-4), Workload(tokens=4096), Options(ep_ranks=1))
    assert r.t_ep_overhead == 0 and r.gamma == math.inf and r.fanout == 0


def test_fp8_dispatch_carries_its_scales():
    out = moelab.gamma(R1, H100, tokens=4096, dispatch_dtype="fp8")
    assert out["f_dispatch"] == 1.03125  # 1 + 4/128
    seed = moelab.gamma(R1, H100, tokens=4096)
    # EP bytes per token: (1.03125 + 2) / (2 + 2) of the seed's
    assert out["t_ep_overhead_s"] == pytest.approx(seed["t_ep_overhead_s"] * 3.03125 / 4, rel=1e-12)


def test_decode_says_it_refetches_and_the_literal_seed_number():
    out = moelab.gamma("deepseek-r1", decode=True, batch=1, steps=1000, b_pcie=64e9, b_net=50e9)
    assert out["gamma"] == pytest.approx(9600)
    # the seed's literal N_t -> N_OS: 1/2 * 3072 * 0.78125 * min(8 * 1000, 256) / 1000 = 307.2
    assert out["gamma_seed_literal_nos"] == pytest.approx(0.5 * 3072 * 0.78125 * 256 / 1000)
    assert "re-fetches" in out["decode_note"] and "307.2" in out["decode_note"]


def test_gamma_measured_names_every_input_and_its_source():
    out = moelab.gamma("gpt-oss-20b", decode=True, batch=1)
    inputs = out["gamma_measured_inputs"]
    assert set(inputs) == {"b_pcie", "b_net", "b_nvlink", "alpha_pcie", "alpha_net"}
    assert inputs["b_pcie"]["value"] == 35.2e9 and "nvbandwidth" in inputs["b_pcie"]["source"]
    assert inputs["alpha_net"]["value"] > 0 and "fitted" in inputs["alpha_net"]["source"]
    # with the fitted per-collective latency, EP at batch 1 pays 24 layers * 2 * alpha_net
    model, sys_ = presets.load_model("gpt-oss-20b"), presets.load_system("h100-sxm")
    by_hand = cf.evaluate(model, sys_.with_(b_pcie=35.2e9, b_net=49.5e9, b_nvlink=380e9,
                                            alpha_net=inputs["alpha_net"]["value"]),
                          Workload(decode=True, batch=1))
    assert out["gamma_measured"] == pytest.approx(by_hand.gamma, rel=1e-12)
    assert out["gamma_measured"] < out["gamma"] / 5  # latency makes decode EP far dearer


def test_fitted_alpha_net_in_the_preset_is_the_validation_fit():
    from moelab.experiments.exp_validation import fitted_alpha_net

    alpha, _ = fitted_alpha_net()
    preset = presets.system_table()["networks"]["ib-ndr-400"]
    assert preset["latency_kind"] == "fitted"
    assert preset["latency_us"] == pytest.approx(alpha * 1e6, abs=0.05)


# --- T_B: attention, dense layers, fp8 roofline ---------------------------------------------------


def test_attention_gqa_by_hand():
    m = ModelSpec("g", 1, 8, 2, 4096, 14336, n_heads=32, n_kv_heads=8, head_dim=128)
    s = SystemSpec("s", b_pcie=1e9, b_net=1e9, peak_flops=1e15, hbm_bw=1e12)
    N = 1000
    params = 4096 * 128 * (2 * 32 + 2 * 8)  # q, o: 32 heads; k, v: 8 heads
    flops = 2 * N * params + 4 * 32 * 128 * N * N / 2
    nbytes = 2 * params + N * 2 * 8 * 128 * 2 + 2 * N * 4096 * 2
    assert float(cf.attention_time(m, s, N)) == pytest.approx(max(flops / 1e15, nbytes / 1e12))


def test_attention_mla_decode_reads_the_compressed_cache():
    m = presets.load_model("deepseek-r1")
    s = SystemSpec("s", b_pcie=1e9, b_net=1e9, peak_flops=1e30, hbm_bw=1e12)  # memory-bound
    B, S = 64, 4096
    c, r, n, v, h, d, q = 512, 64, 128, 128, 128, 7168, 1536
    params = d * q + q * h * (n + r) + d * (c + r) + c * h * (n + v) + h * v * d
    nbytes = 2 * params + B * S * (c + r) * 2 + 2 * B * d * 2
    assert float(cf.attention_time(m, s, B, context=S)) == pytest.approx(nbytes / 1e12)


def test_fp8_experts_use_the_fp8_peak():
    s = SystemSpec("s", b_pcie=1e9, b_net=1e9, hbm_bw=1e30)  # compute-bound
    flops = 2 * 4096 * (8 * 3 * 7168 * 2048)
    assert float(cf.moe_layer_time(R1, s, 4096, 256)) == pytest.approx(flops / s.peak_flops_fp8)
    bf16 = R1.with_(expert_dtype="bf16")
    assert float(cf.moe_layer_time(bf16, s, 4096, 256)) == pytest.approx(flops / s.peak_flops)


def test_ep_rank_computes_only_its_experts():
    """Memory-bound decode: an EP rank reads its share of the used experts' weights."""
    s = presets.load_system("h100-sxm")
    w = Workload(decode=True, batch=64)
    c = cf.layer_compute(R1, s, w, Options(ep_ranks=32))
    used_all = float(cf.n_used_worst(32 * 64, 8, 256))  # every rank's 64 tokens: all 256
    assert used_all == 256
    assert c["moe_ep"] < c["moe_offload"]
    assert c["moe_ep"] == pytest.approx(float(cf.moe_layer_time(
        R1, s, 64, used_all / 32, cf.imbalance_uniform(64, 32, 256, 8))))


def test_dense_layers_counted():
    m = presets.load_model("deepseek-r1")
    assert m.n_dense_layers == 3 and m.dense_intermediate == 18432
    assert presets.load_model("mixtral-8x7b").n_dense_layers == 0
    assert np.isfinite(cf.dense_layer_time(m, presets.load_system("h100-sxm"), 4096))
