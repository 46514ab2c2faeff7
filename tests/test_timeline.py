"""The overlap timeline: between the seed's sum and the lanes' bound, exact in the limits."""


import pytest
from hypothesis import given
from hypothesis import strategies as st

from moelab.costmodel import closed_form, presets
from moelab.costmodel.specs import Options, Workload
from moelab.costmodel.timeline import overlap_times, simulate_ep, simulate_offload

REL = 1e-9

times = st.floats(0.0, 10.0, allow_nan=False, allow_infinity=False)


@st.composite
def layers(draw, max_layers=6):
    n = draw(st.integers(1, max_layers))
    compute = draw(st.lists(times, min_size=n, max_size=n))
    transfer = draw(st.lists(times, min_size=n, max_size=n))
    return compute, transfer


def _close_or_above(a, b):
    """a >= b up to float rounding of sums."""
    return a >= b - REL * max(1.0, abs(b))


@given(layers(), st.integers(1, 5), st.integers(0, 3), st.sampled_from([0, 1]))
def test_offload_between_seed_sum_and_lane_bound(lc, copies, resident, lookahead):
    compute, transfer = lc
    t = simulate_offload(compute, transfer, copies=copies, resident=resident,
                         lookahead=lookahead).makespan
    seed = sum(compute) + sum(transfer)
    assert _close_or_above(seed, t)
    assert _close_or_above(t, max(sum(compute), sum(transfer)))
    if lookahead == 0:
        # No prefetch across layers: each layer costs at least max(compute, transfer).
        assert _close_or_above(t, sum(max(c, x) for c, x in zip(compute, transfer, strict=True)))


@given(layers(), st.integers(1, 4))
def test_ep_between_seed_sum_and_lane_bound(lc, microbatches):
    compute, network = lc
    t = simulate_ep(compute, network, microbatches=microbatches).makespan
    seed = sum(compute) + sum(network)
    assert _close_or_above(seed, t)
    assert _close_or_above(t, max(sum(compute), sum(network)))


@given(layers())
def test_ep_one_microbatch_is_the_seed(lc):
    compute, network = lc
    t = simulate_ep(compute, network, microbatches=1).makespan
    assert t == pytest.approx(sum(compute) + sum(network), rel=REL, abs=1e-12)


@pytest.mark.parametrize("lookahead", [0, 1])
@pytest.mark.parametrize(
    "compute, transfer",
    [
        ([0.0, 0.0, 0.0], [1.0, 2.0, 3.0]),  # zero compute: the seed's overhead, all of it
        ([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]),  # zero transfer: T_B, no overhead
    ],
)
def test_offload_limits(compute, transfer, lookahead):
    t = simulate_offload(compute, transfer, copies=4, lookahead=lookahead).makespan
    assert t == pytest.approx(sum(compute) + sum(transfer), rel=REL)


@pytest.mark.parametrize("c, x, n", [(1.0, 3.0, 4), (3.0, 1.0, 4), (2.0, 2.0, 1), (2.0, 2.0, 8)])
def test_offload_pipelines_within_a_layer(c, x, n):
    # On demand, alike layers: n copies and n GEMMs form a two-stage flow shop per layer,
    # makespan max(c, x) + min(c, x) / n; layers follow each other (routing not known early).
    L = 3
    t = simulate_offload([c] * L, [x] * L, copies=n, lookahead=0).makespan
    assert t == pytest.approx(L * (max(c, x) + min(c, x) / n), rel=REL)


def test_offload_oracle_lookahead_hides_next_layer():
    # Lookahead with a perfect predictor: layer l+1 copies while layer l computes, so
    # only the first layer's copy shows: x + L c when c >= x.
    L, c, x = 4, 2.0, 1.0
    t = simulate_offload([c] * L, [x] * L, copies=1, lookahead=1).makespan
    assert t == pytest.approx(x + L * c, rel=REL)


def test_offload_mispredictions_cost_link_time():
    L, c, x = 4, 2.0, 1.0
    tl = simulate_offload([c] * L, [x] * L, copies=4, lookahead=1, hit_rate=0.5)
    # Every layer's copies plus the wrong half of the predictions for layers 1..L-1.
    assert tl.busy("host_link") == pytest.approx(L * x + (L - 1) * x / 2, rel=REL)
    assert tl.busy("compute") == pytest.approx(L * c, rel=REL)


def test_ep_two_microbatches_by_hand():
    # One layer, compute 2, network 2 (0.5 per micro-batch and direction):
    # d0 [0, .5], d1 [.5, 1], gemm0 [.5, 1.5], gemm1 [1.5, 2.5], c0 [1.5, 2], c1 [2.5, 3].
    tl = simulate_ep([2.0], [2.0], microbatches=2)
    assert tl.makespan == pytest.approx(3.0)
    ends = {t.name: t.end for t in tl.tasks}
    assert ends["combine L0 mb0"] == pytest.approx(2.0)
    assert ends["gemm L0 mb1"] == pytest.approx(2.5)


def test_tasks_respect_lanes_in_order():
    tl = simulate_offload([1.0, 0.5, 2.0], [2.0, 1.0, 0.1], copies=3, lookahead=1, hit_rate=2 / 3)
    for lane in ("compute", "host_link"):
        tasks = [t for t in tl.tasks if t.lane == lane]
        for a, b in zip(tasks, tasks[1:], strict=False):
            assert b.start >= a.end - 1e-12


# --- overlap_times on the closed form ------------------------------------------------------


@pytest.mark.parametrize(
    "workload",
    [
        Workload(tokens=4096),  # prefill, every expert used
        Workload(tokens=3),  # few tokens, 24 experts
        Workload(decode=True, batch=1, steps=16),  # decode: one token per step
    ],
)
def test_overlap_exposed_between_bounds(workload):
    model, system = presets.load_model("deepseek-r1"), presets.load_system("h100-sxm")
    r = closed_form.evaluate(model, system, workload, Options())
    out = overlap_times(model, system, workload, Options())
    for name, seed, base in (("p", r.t_p_overhead, out["t_b_step_offload_s"]),
                             ("ep", r.t_ep_overhead, out["t_b_step_ep_s"])):
        exposed = out[f"t_{name}_exposed_s"]
        # Hidden at most the whole compute, at most the whole overhead.
        assert _close_or_above(seed, exposed)
        assert _close_or_above(exposed, max(seed - base, 0.0))
        assert out[f"t_{name}_overlap_s"] == pytest.approx(base + exposed, rel=1e-9)
    assert out["speedup_ep_overlap"] == pytest.approx(
        out["t_p_overlap_s"] / out["t_ep_overlap_s"], rel=1e-12)
    assert not any(k.startswith("gamma") for k in out)  # no ratio of exposed overheads left


def test_overlap_zero_compute_is_the_seed():
    model = presets.load_model("mixtral-8x7b")
    # A GPU with no compute cost: nothing to hide behind, the step is the overheads.
    system = presets.load_system("h100-sxm").with_(peak_flops=1e300, peak_flops_fp8=1e300,
                                                   hbm_bw=1e300)
    r = closed_form.evaluate(model, system, Workload(tokens=512), Options())
    out = overlap_times(model, system, Workload(tokens=512), Options())
    assert out["t_b_step_offload_s"] < 1e-200
    assert out["t_p_exposed_s"] == pytest.approx(r.t_p_overhead, rel=1e-9)
    assert out["t_ep_exposed_s"] == pytest.approx(r.t_ep_overhead, rel=1e-9)
    assert out["speedup_ep_overlap"] == pytest.approx(r.gamma, rel=1e-9)


def test_overlap_zero_transfer_is_fully_hidden():
    model = presets.load_model("mixtral-8x7b")
    system = presets.load_system("h100-sxm").with_(b_pcie=1e300, b_net=1e300)
    out = overlap_times(model, system, Workload(tokens=512), Options())
    assert out["t_p_exposed_s"] == 0.0 and out["t_ep_exposed_s"] == 0.0
    assert out["offload_transfer_hidden"] and out["ep_transfer_hidden"]
    assert out["speedup_ep_overlap"] == pytest.approx(
        out["t_b_step_offload_s"] / out["t_b_step_ep_s"], rel=1e-9)


def test_overlap_ep_hidden_behind_attention_and_experts():
    """A fast network: two micro-batches hide dispatch and combine entirely behind compute."""
    model, system = presets.load_model("deepseek-r1"), presets.load_system("h100-sxm")
    out = overlap_times(model, system.with_(b_net=5e12), Workload(tokens=4096), Options())
    assert out["ep_transfer_hidden"] and not out["offload_transfer_hidden"]


def test_overlap_resident_experts_need_no_copy():
    model, system = presets.load_model("qwen3-30b-a3b"), presets.load_system("h100-sxm")
    half = overlap_times(model, system, Workload(tokens=8), Options(resident_fraction=0.5))
    none = overlap_times(model, system, Workload(tokens=8), Options())
    assert half["schedule"]["copies_per_layer"] * 2 == none["schedule"]["copies_per_layer"]
    assert half["t_p_exposed_s"] < none["t_p_exposed_s"]


@pytest.mark.parametrize("name,workload,kw", [
    ("deepseek-r1", Workload(tokens=4096), {}),
    ("kimi-k2", Workload(tokens=1024), {"ep_ranks": 16}),
    ("mixtral-8x7b", Workload(decode=True, batch=4, steps=3), {}),
    ("gpt-oss-20b", Workload(tokens=64), {"lookahead": 1, "microbatches": 4}),
])
def test_speedup_ep_overlap_does_not_depend_on_L(name, workload, kw):
    """Doubling every layer (MoE and dense) doubles both step times: the ratio stays."""
    model, system = presets.load_model(name), presets.load_system("h100-sxm")
    opts = Options(ep_ranks=kw.pop("ep_ranks", None))
    one = overlap_times(model, system, workload, opts, **kw)
    two = overlap_times(model.with_(n_moe_layers=2 * model.n_moe_layers,
                                    n_layers=2 * model.n_layers), system, workload, opts, **kw)
    assert two["speedup_ep_overlap"] == pytest.approx(one["speedup_ep_overlap"], rel=1e-9)
    assert two["t_p_overlap_s"] == pytest.approx(2 * one["t_p_overlap_s"], rel=1e-9)
    assert two["t_ep_exposed_s"] == pytest.approx(2 * one["t_ep_exposed_s"], rel=1e-9, abs=1e-15)


def test_nothing_called_gamma_grows_with_L():
    import moelab

    model = presets.load_model("deepseek-r1")
    deep = model.with_(n_moe_layers=4 * model.n_moe_layers, n_layers=4 * model.n_layers)
    for kw in ({}, {"ep_ranks": 32}, {"microbatches": 4}):
        a = moelab.gamma(model, overlap=True, **kw)
        b = moelab.gamma(deep, overlap=True, **kw)
        keys = [k for k in a if "gamma" in k and isinstance(a[k], float)]
        assert "gamma" in keys and "gamma_measured" in keys
        for k in keys + ["speedup_ep_overlap", "speedup_ep_overlap_oracle"]:
            assert b[k] == pytest.approx(a[k], rel=1e-9), k
