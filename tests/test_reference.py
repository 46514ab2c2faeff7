"""JAX reference against the closed form: exact on worst-case routings, within standard
errors on Monte Carlo, and its counts against brute force."""

import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.costmodel import closed_form as cf
from moelab.costmodel import reference as ref
from moelab.costmodel import routing as rt
from moelab.costmodel.specs import ModelSpec, Options, SpecError, SystemSpec, Workload, parse_routing

DTYPES = ["fp32", "bf16", "fp8", "mxfp4"]


@st.composite
def shapes(draw, max_e=64):
    """A small model (E, k, L, d, I) with E/k and dtypes drawn freely."""
    E = draw(st.integers(1, max_e))
    k = draw(st.integers(1, min(E, 8)))
    return ModelSpec(
        name="t", n_moe_layers=draw(st.integers(1, 4)), n_experts=E, top_k=k,
        hidden=draw(st.integers(1, 4096)), expert_intermediate=draw(st.integers(1, 4096)),
        expert_dtype=draw(st.sampled_from(DTYPES)), act_dtype=draw(st.sampled_from(DTYPES)),
        gated=draw(st.booleans()),
    )


@st.composite
def systems(draw):
    return SystemSpec(
        name="s", b_pcie=draw(st.floats(1e9, 1e12)), b_net=draw(st.floats(1e9, 1e12)),
        alpha_pcie=draw(st.sampled_from([0.0, 1e-6, 2.5e-5])),
        alpha_net=draw(st.sampled_from([0.0, 1e-6, 3e-5])),
    )


@st.composite
def workloads(draw):
    if draw(st.booleans()):
        return Workload(tokens=draw(st.integers(1, 200)))
    return Workload(decode=True, batch=draw(st.integers(1, 64)), steps=draw(st.integers(1, 500)))


@st.composite
def fixed_fanout_options(draw):
    """Options whose fan-out does not depend on the routing (no EP ranks)."""
    dt = st.none() | st.sampled_from(DTYPES)
    return Options(fanout=draw(st.none() | st.floats(0.5, 16)),
                   dispatch_dtype=draw(dt), combine_dtype=draw(dt),
                   resident_fraction=draw(st.sampled_from([0.0, 0.3, 0.9])))


# --- exact: worst-case routings equal the closed form ------------------------------------------


@settings(max_examples=20)
@given(model=shapes(), system=systems(), workload=workloads(), options=fixed_fanout_options())
def test_worst_case_routing_equals_closed_form(model, system, workload, options):
    N = workload.tokens_per_pass
    routes = rt.worst_case(model.n_moe_layers, N, model.n_experts, model.top_k)
    got = ref.evaluate_routes(model, system, workload, options, routes)
    want = cf.evaluate(model, system, workload, options)
    assert got["n_ue"] == want.n_ue == min(model.top_k * N, model.n_experts)
    for name in ("gamma", "t_p_overhead", "t_ep_overhead"):
        assert got[name] == pytest.approx(getattr(want, name), rel=1e-12), name
    assert got["fanout"] == pytest.approx(want.fanout, rel=1e-12)
    # bytes: what the times are made of
    assert got["bytes_offload"] == pytest.approx(
        workload.passes * model.n_moe_layers * (1 - options.resident_fraction) * want.n_ue
        * model.expert_bytes, rel=1e-12)


def test_seed_worked_example():
    """The worked example (docs/model.md): R1, fp8 experts, bf16 activations, 64 / 50 GB/s,
    N_t = 4096: gamma 75."""
    model = ModelSpec("r1", 58, 256, 8, 7168, 2048, expert_dtype="fp8", act_dtype="bf16")
    system = SystemSpec("s", b_pcie=64e9, b_net=50e9)
    routes = rt.worst_case(58, 4096, 256, 8)
    got = ref.evaluate_routes(model, system, Workload(tokens=4096), None, routes)
    assert got["gamma"] == pytest.approx(75.0, rel=1e-12)
    assert got["n_ue"] == 256


# --- counts against brute force ------------------------------------------------------------------


@settings(max_examples=8)
@given(E_per_rank=st.integers(1, 6), R=st.integers(1, 40), gpn=st.integers(1, 8),
       N=st.integers(1, 30), data=st.data())
def test_counts_match_brute_force(E_per_rank, R, gpn, N, data):
    E = E_per_rank * R
    k = data.draw(st.integers(1, min(E, 6)))
    rng = np.random.default_rng(data.draw(st.integers(0, 9)))
    routes = np.stack([[rng.choice(E, k, replace=False) for _ in range(N)] for _ in range(2)])
    c = ref.route_counts(routes, E, R, gpn)
    for l, layer in enumerate(routes):
        assert int(c["n_used"][l]) == len(np.unique(layer))
        np.testing.assert_array_equal(c["tokens_per_expert"][l], np.bincount(layer.ravel(), minlength=E))
        for t, ids in enumerate(layer.tolist()):
            home = t * R // N
            ranks = {e * R // E for e in ids}
            assert int(c["remote_ranks"][l, t]) == len(ranks - {home})
            nodes = {r // gpn for r in ranks}
            assert int(c["remote_nodes"][l, t]) == len(nodes - {home // gpn})
        traffic = ref.rank_traffic(layer, E, R)
        assert traffic.sum() - np.trace(traffic) == int(c["remote_ranks"][l].sum())


# --- Monte Carlo: means within standard errors of the expectation formulas -----------------------

# Layer-samples per Monte Carlo test: the standard error of a mean is std / sqrt(this).
MC_LAYERS = 2000


def _mc(model, tokens, routing, ranks=0, gpn=8, seed=0, n=MC_LAYERS):
    spec = parse_routing(routing)
    gen = rt.layer_generator(spec, model.n_moe_layers, tokens, model.n_experts, model.top_k,
                             model.n_group, model.topk_group)
    width = model.top_k if spec.kind == "uniform" else model.n_experts
    return ref.sample_stats(gen, jax.random.key(seed), n, model.n_moe_layers, tokens,
                            width, model.n_experts, ranks, gpn)


def _within(sample: np.ndarray, expected: float, unit: float = 1.0, z: float = 4.5):
    """|mean - expected| within z standard errors. The counts are multiples of `unit`, so a
    sample whose spread is too rare to show up (sd 0) may still miss by one unit in n."""
    sample = np.asarray(sample, np.float64).ravel()
    se = max(sample.std(ddof=1), unit) / math.sqrt(sample.size)
    assert abs(sample.mean() - expected) <= z * se, (sample.mean(), expected, se)


@settings(max_examples=6)
@given(R=st.sampled_from([1, 2, 4, 8, 16]), per_rank=st.integers(1, 8), N=st.integers(1, 64),
       data=st.data())
def test_monte_carlo_matches_expectations(R, per_rank, N, data):
    E = R * per_rank
    k = data.draw(st.integers(1, min(E, 8)))
    model = ModelSpec("t", 1, E, k, 64, 64)
    s = _mc(model, N, "uniform", ranks=R, seed=data.draw(st.integers(0, 3)))
    _within(s["n_used"], float(cf.n_used_uniform(N, k, E)))
    _within(s["remote_ranks"] / N, float(cf.fanout_uniform(R, E, k)), unit=1 / N)


def test_monte_carlo_deepseek_r1_16_tokens():
    """The issue's figure: R1, 16 tokens, uniform: E[N_ue] = 101.96; EP32 fan-out 7.04."""
    model = ModelSpec("r1", 1, 256, 8, 64, 64)
    s = _mc(model, 16, "uniform", ranks=32)
    _within(s["n_used"], float(cf.n_used_uniform(16, 8, 256)))
    _within(s["remote_ranks"] / 16, float(cf.fanout_uniform(32, 256, 8)), unit=1 / 16)
    assert float(cf.n_used_uniform(16, 8, 256)) == pytest.approx(101.96, abs=0.005)


@pytest.mark.parametrize("routing,E,k,N", [
    ("zipf:1.5", 64, 4, 16),  # unsaturated
    ("dirichlet:0.2", 16, 2, 3),  # few tokens
    pytest.param("zipf:0.8", 16, 2, 3, marks=pytest.mark.slow),
    pytest.param("dirichlet:5", 64, 4, 16, marks=pytest.mark.slow),  # nearly uniform
    pytest.param("dirichlet:0.2", 64, 4, 16, marks=pytest.mark.slow),
])
def test_skewed_uses_fewer_experts_than_uniform(routing, E, k, N):
    model = ModelSpec("t", 1, E, k, 64, 64)
    s = _mc(model, N, routing)
    n = s["n_used"].astype(np.float64).ravel()
    se = n.std(ddof=1) / math.sqrt(n.size)
    uniform = float(cf.n_used_uniform(N, k, E))
    assert n.mean() <= uniform + 3 * se
    # and strictly fewer for strong skew, so the test can tell the two apart
    if routing in ("zipf:1.5", "dirichlet:0.2"):
        assert n.mean() < uniform - 5 * se


@pytest.mark.parametrize("n_group,topk_group,E,k,R,gpn", [
    (8, 4, 256, 8, 32, 4),  # DeepSeek-V3 on 8 nodes of 4 GPUs: one group per node
    (4, 1, 32, 4, 8, 2),  # one group per token: never more than one node
    (4, 2, 32, 6, 16, 4),
])
def test_group_limited_never_exceeds_topk_group_nodes(n_group, topk_group, E, k, R, gpn):
    assert R // gpn == n_group  # groups map to nodes
    model = ModelSpec("t", 1, E, k, 64, 64, n_group=n_group, topk_group=topk_group)
    routes = np.asarray(jax.jit(lambda key: rt.layers(
        lambda key, l: rt.group_limited(key, 300, E, k, n_group, topk_group), key, 2))(
        jax.random.key(0)))
    c = ref.route_counts(routes, E, R, gpn)
    home_node = (np.arange(300) * R // 300) // gpn
    node_of = (routes * R // E) // gpn
    hits_home = (node_of == home_node[None, :, None]).any(-1)
    assert np.all(np.asarray(c["remote_nodes"]) + hits_home <= topk_group)
    assert np.asarray(c["remote_nodes"]).max() <= topk_group
    # the same through the Monte Carlo path
    s = _mc(model, 50, "groups", ranks=R, gpn=gpn, n=200)
    assert s["remote_nodes"].max() <= topk_group * 50


# --- gamma_distribution and sensitivities --------------------------------------------------------

R1 = ModelSpec("r1", 58, 256, 8, 7168, 2048, expert_dtype="fp8", act_dtype="bf16", n_group=8,
               topk_group=4)
H100 = SystemSpec("h100", b_pcie=64e9, b_net=50e9)


def test_gamma_distribution_r1_16_tokens():
    out = ref.gamma_distribution(R1, H100, Workload(tokens=16), Options(ep_ranks=32), "uniform",
                                 200, seed=1)
    assert out["n_ue_mean"] == pytest.approx(101.96, rel=0.01)
    assert out["fanout_mean"] == pytest.approx(7.04, rel=0.01)
    assert out["gamma_p05"] <= out["gamma_mean"] <= out["gamma_p95"]
    assert out["samples"] == 200 and out["routing"] == "uniform"
    assert out["ep_win_fraction"] + out["offload_win_fraction"] <= 1
    # same seed, same numbers; other seed, other numbers
    again = ref.gamma_distribution(R1, H100, Workload(tokens=16), Options(ep_ranks=32), "uniform",
                                   200, seed=1)
    assert again == out
    other = ref.gamma_distribution(R1, H100, Workload(tokens=16), Options(ep_ranks=32), "uniform",
                                   200, seed=2)
    assert other["gamma_mean"] != out["gamma_mean"]


def test_gamma_distribution_is_the_mean_of_concrete_evaluations():
    model, w = R1.with_(n_moe_layers=3), Workload(tokens=12)
    opts = Options(ep_ranks=8, dispatch_dtype="fp8")
    out = ref.gamma_distribution(model, H100, w, opts, "zipf:1.0", 4, seed=3)
    spec = parse_routing("zipf:1.0")
    gen = rt.layer_generator(spec, 3, 12, 256, 8)
    gammas = [ref.evaluate_routes(model, H100, w, opts,
                                  rt.layers(gen, jax.random.fold_in(jax.random.key(3), s), 3),
                                  imbalance=out["imbalance_mean"])["gamma"]
              for s in range(4)]
    assert out["gamma_mean"] == pytest.approx(np.mean(gammas), rel=1e-5)


def test_gamma_distribution_decode_and_offload_wins():
    w = Workload(decode=True, batch=1, steps=100)
    slow_net = H100.with_(b_net=5e7, b_pcie=1e12)  # gamma = 1536 * 8 * 5e7/1e12 = 0.61
    out = ref.gamma_distribution(R1, slow_net, w, Options(), "uniform", 50)
    assert out["n_ue_mean"] == 8 and out["n_ue_std"] == 0  # batch 1: exactly k experts
    want = cf.evaluate(R1, slow_net, w).gamma
    assert want < 1 and out["gamma_mean"] == pytest.approx(want, rel=1e-9)
    assert out["offload_win_fraction"] == 1.0 and out["ep_win_fraction"] == 0.0


def test_gamma_distribution_logits_file_exact(tmp_path):
    model, w = R1.with_(n_moe_layers=2), Workload(tokens=5)
    logits = np.random.default_rng(0).normal(size=(2, 5, 256)).astype(np.float32)
    np.save(tmp_path / "l.npy", logits)
    out = ref.gamma_distribution(model, H100, w, Options(), f"logits:{tmp_path / 'l.npy'}", 100)
    routes = np.argsort(-logits, -1)[..., :8]
    assert out["samples"] == 1
    assert out["n_ue_mean"] == np.mean([len(np.unique(r)) for r in routes])


@pytest.mark.parametrize("routing", ["worst", "zipf", "bogus", "logits:"])
def test_gamma_distribution_rejects(routing):
    with pytest.raises(SpecError, match="^routing: "):
        ref.gamma_distribution(R1, H100, Workload(tokens=4), Options(), routing, 10)


def test_gamma_distribution_rejects_samples():
    with pytest.raises(SpecError, match="^samples: "):
        ref.gamma_distribution(R1, H100, Workload(tokens=4), Options(), "uniform", 0)


@settings(max_examples=15)
@given(model=shapes(max_e=300), system=systems(), tokens=st.integers(1, 10_000),
       routing=st.sampled_from(["worst", "uniform"]), ranks=st.none() | st.integers(2, 64),
       resident=st.sampled_from([0.0, 0.4]), gpn=st.integers(1, 16),
       b_nvlink=st.floats(2e10, 2e12), mode=st.sampled_from(["per-node", "per-rank", "flat"]),
       busiest=st.booleans())
def test_sensitivities_match_finite_differences(model, system, tokens, routing, ranks, resident,
                                                gpn, b_nvlink, mode, busiest):
    """Elasticities of the two-tier model against differences of the closed form's gamma
    (closed_form.gamma_of_tokens: what evaluate reports, without the tipping points it also
    solves for; float64), which includes every effect: central differences for links,
    latencies and residency; a forward one for N_t (the busiest rank's imbalance steps where
    (R - 1) N_t crosses an integer, and is smooth just above); for the counts R, G, E, k, the
    central difference over the neighbouring counts that the sensitivities define them by."""
    from dataclasses import replace

    system = system.with_(gpus_per_node=gpn, b_nvlink=b_nvlink)
    options = Options(ep_ranks=ranks, routing=routing, resident_fraction=resident,
                      dispatch_mode=mode, imbalance=busiest)
    w = Workload(tokens=tokens)
    got = ref.sensitivities(model, system, w, options)
    eps = 1e-4

    def log_gamma(m=model, sys=system, opt=options):
        return math.log(float(cf.gamma_of_tokens(m, sys, opt, np.array(w.tokens_per_pass))))

    legs = cf.ep_legs(model, system, options, tokens) if ranks else None
    if legs is not None and math.isclose(legs.t_net, legs.t_nvlink, rel_tol=1e-3):
        return  # the two legs tie: gamma has a kink, no derivative to compare
    for name in ("b_pcie", "b_net", "b_nvlink", "alpha_pcie", "alpha_net"):
        v = getattr(system, name)
        up, down = system.with_(**{name: v * (1 + eps)}), system.with_(**{name: v * (1 - eps)})
        fd = (log_gamma(sys=up) - log_gamma(sys=down)) / (math.log1p(eps) - math.log1p(-eps))
        assert got.get(name, 0.0) == pytest.approx(fd, abs=2e-4), name
    if resident:
        up = replace(options, resident_fraction=resident * (1 + eps))
        down = replace(options, resident_fraction=resident * (1 - eps))
        fd = (log_gamma(opt=up) - log_gamma(opt=down)) / (math.log1p(eps) - math.log1p(-eps))
        assert got["resident_fraction"] == pytest.approx(fd, abs=2e-4)
    if routing == "uniform" or model.top_k * tokens != model.n_experts:  # min(kN, E): a kink
        step = 1e-6
        g = [float(cf.gamma_of_tokens(model, system, options, np.array(n)))
             for n in (tokens, tokens * (1 + step))]
        fd = (math.log(g[1]) - math.log(g[0])) / math.log1p(step)
        assert got["tokens"] == pytest.approx(fd, abs=5e-4), "tokens"
    counts = {"n_experts": (model.n_experts, model.top_k, None,
                            lambda e: log_gamma(m=model.with_(n_experts=e))),
              "top_k": (model.top_k, 1, model.n_experts,
                        lambda c: log_gamma(m=model.with_(top_k=c)))}
    if ranks:
        counts["ep_ranks"] = (ranks, 2, None, lambda r: log_gamma(opt=replace(options, ep_ranks=r)))
        counts["gpus_per_node"] = (gpn, 1, None, lambda g: log_gamma(
            sys=system.with_(gpus_per_node=g)))
    # E's neighbours keep an even placement over the ranks where R divides E: E +- R
    e_step = ranks if ranks and ranks > 1 and model.n_experts % ranks == 0 else 1
    for name, (v, lo, hi, at) in counts.items():
        step = e_step if name == "n_experts" else 1
        a, b = max(v - step, lo), v + step if hi is None else min(v + step, hi)
        if b > a:
            want = (at(b) - at(a)) / (math.log(b) - math.log(a))
            assert got[name] == pytest.approx(want, abs=1e-4, rel=1e-4), name
    # every parameter is reported, and the elasticities the algebra fixes hold
    assert set(ref.SENSITIVITY_PARAMS) - set(ref.RANK_ONLY) <= set(got)
    assert (set(ref.RANK_ONLY) <= set(got)) == bool(ranks)
    if system.alpha_pcie == 0 and system.alpha_net == 0:
        assert got["b_pcie"] == pytest.approx(-1, abs=1e-5)
        # gamma ~ B_net, B_nvlink through whichever leg decides
        assert got["b_net"] + got.get("b_nvlink", 0.0) == pytest.approx(1, abs=1e-5)
        assert got["hidden"] == pytest.approx(0, abs=1e-5)  # d cancels: S_E grows with d


def test_sensitivities_r1_two_tiers_by_hand():
    """R1 at 4096 tokens on 32 ranks in nodes of 8 (per-node dispatch: the network leg, 2.7
    remote nodes per token, decides): gamma ~ B_net / B_pcie, and nothing on B_nvlink."""
    got = ref.sensitivities(R1, H100.with_(gpus_per_node=8), Workload(tokens=4096),
                            Options(ep_ranks=32))
    assert (got["b_net"], got["b_pcie"], got["b_nvlink"]) == (
        pytest.approx(1, abs=1e-5), pytest.approx(-1, abs=1e-5), 0)
    # N_t: past saturation the offload overhead is flat and EP's grows with N_t, times an
    # imbalance that falls towards 1 as N_t grows, so a little above -1
    assert -1 < got["tokens"] < -0.99


def test_sensitivities_tokens_regimes():
    """Worst case: gamma is flat in N_t below saturation (k N_t < E) and ~ 1/N_t above."""
    low = ref.sensitivities(R1, H100, Workload(tokens=8), Options())
    high = ref.sensitivities(R1, H100, Workload(tokens=4096), Options())
    assert low["tokens"] == pytest.approx(0, abs=1e-6)
    assert high["tokens"] == pytest.approx(-1, abs=1e-5)
    assert high["f_a"] == pytest.approx(-1, abs=1e-5)
    assert high["fanout"] == pytest.approx(-1, abs=1e-5)


def test_overheads_vmap_over_configurations():
    """One routing, many systems: vmap over b_pcie equals a Python loop."""
    import jax.numpy as jnp

    from moelab.costmodel.sweep import params_of

    routes = rt.layers(lambda key, l: rt.uniform(key, 40, 64, 4), jax.random.key(0), 3)
    c = ref.route_counts(routes, 64)
    model = ModelSpec("t", 3, 64, 4, 512, 256)
    p = {n: jnp.float32(v) for n, v in params_of(model, H100, Workload(tokens=40)).items()}
    b = jnp.array([1e9, 3e10, 2e11], jnp.float32)
    n_used, dest = c["n_used"].astype(jnp.float32), jnp.full(3, 40.0)
    batched = jax.vmap(lambda x: ref.overheads(n_used, dest, {**p, "b_pcie": x})["gamma"])(b)
    loop = [float(ref.overheads(n_used, dest, {**p, "b_pcie": x})["gamma"]) for x in b]
    np.testing.assert_allclose(np.asarray(batched), loop, rtol=1e-6)
