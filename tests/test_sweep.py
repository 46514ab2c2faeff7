"""The jax sweep kernel against the closed form; grid order, overrides and sharding; the CLI."""

import argparse
import csv

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.costmodel import closed_form as cf
from moelab.costmodel import sweep as sw
from moelab.costmodel.specs import ModelSpec, Options, SpecError, SystemSpec, Workload

DTYPES = ["fp32", "bf16", "fp8", "mxfp4", "nvfp4"]


@st.composite
def points(draw):
    E = draw(st.integers(1, 512))
    model = ModelSpec(
        name="m", n_moe_layers=draw(st.integers(1, 100)), n_experts=E,
        top_k=draw(st.integers(1, min(E, 16))), hidden=draw(st.integers(1, 16384)),
        expert_intermediate=draw(st.integers(1, 32768)), gated=draw(st.booleans()),
        expert_dtype=draw(st.sampled_from(DTYPES)), act_dtype=draw(st.sampled_from(DTYPES)))
    system = SystemSpec(
        name="s", b_pcie=draw(st.floats(1e9, 1e12)), b_net=draw(st.floats(1e9, 1e12)),
        alpha_pcie=draw(st.sampled_from([0.0, 2e-6, 3e-5])),
        alpha_net=draw(st.sampled_from([0.0, 5e-6, 1e-4])), b_nvlink=draw(st.floats(1e10, 2e12)),
        gpus_per_node=draw(st.integers(1, 16)))
    if draw(st.booleans()):
        workload = Workload(tokens=draw(st.integers(1, 10**7)))
    else:
        workload = Workload(decode=True, batch=draw(st.integers(1, 512)),
                            steps=draw(st.integers(1, 10**4)))
    fan = draw(st.sampled_from(["none", "fanout", "ranks"]))
    dt = st.none() | st.sampled_from(DTYPES)
    options = Options(
        fanout=draw(st.floats(0.1, 64)) if fan == "fanout" else None,
        ep_ranks=draw(st.integers(1, 512)) if fan == "ranks" else None,
        dispatch_dtype=draw(dt), combine_dtype=draw(dt),
        resident_fraction=draw(st.floats(0, 0.99)),
        routing=draw(st.sampled_from(["worst", "uniform"])),
        # mostly `moelab gamma`'s default (per-node, busiest rank); all modes and the mean rank
        dispatch_mode=draw(st.sampled_from(["per-node", "per-node", "per-rank", "flat"])),
        imbalance=draw(st.sampled_from([True, True, True, False])))
    return model, system, workload, options


def _check_against_closed_form(model, system, workload, options):
    p = {k: np.float32(v) for k, v in sw.params_of(model, system, workload, options).items()}
    got = {k: float(v) for k, v in sw.formula(p).items()}
    want = cf.evaluate(model, system, workload, options)
    for name in ("gamma", "n_ue", "fanout", "t_p_overhead", "t_ep_overhead"):
        assert got[name] == pytest.approx(getattr(want, name), rel=2e-5, abs=1e-30), name
    legs = want.ep
    if legs is not None:  # R >= 2: each leg and the busiest rank, as moelab gamma reports them
        scale = want.passes * model.n_moe_layers
        assert got["t_ep_net"] == pytest.approx(scale * legs.t_net, rel=2e-5, abs=1e-30)
        assert got["t_ep_nvlink"] == pytest.approx(scale * legs.t_nvlink, rel=2e-5, abs=1e-30)
        assert got["fanout_nodes"] == pytest.approx(legs.tiers.nodes, rel=2e-5, abs=1e-30)
        assert got["imbalance"] == pytest.approx(legs.imbalance, rel=2e-6)
        if not np.isclose(legs.t_net, legs.t_nvlink, rtol=1e-4):
            assert got["ep_leg"] == (1 if legs.deciding_leg == "network" else 2)


@settings(max_examples=60)
@given(point=points())
def test_formula_equals_closed_form(point):
    """The jnp formula is closed_form.evaluate, two tiers and the busiest rank included."""
    _check_against_closed_form(*point)


@settings(max_examples=20)
@given(point=points())
def test_flat_mean_rank_is_the_one_tier_model(point):
    """dispatch_mode flat with the mean rank: every remote rank at B_net, phi = fanout_uniform
    (the model before two tiers), in both implementations."""
    model, system, workload, options = point
    if not options.ep_ranks or options.ep_ranks < 2:
        return
    from dataclasses import replace

    options = replace(options, dispatch_mode="flat", imbalance=False)
    _check_against_closed_form(model, system, workload, options)
    p = {k: np.float64(v) for k, v in sw.params_of(model, system, workload, options).items()}
    phi = cf.fanout_uniform(options.ep_ranks, model.n_experts, model.top_k)
    f_d, f_c = cf.activation_bytes(model, options)
    one_tier = cf.ep_overhead(workload.tokens_per_pass, model.hidden, f_d, f_c, system.b_net,
                              model.n_moe_layers, system.alpha_net, phi) * workload.passes
    assert float(sw.formula(p)["t_ep_overhead"]) == pytest.approx(float(one_tier), rel=1e-6)


R1 = ModelSpec("r1", 58, 256, 8, 7168, 2048, expert_dtype="fp8", act_dtype="bf16")
MIX = ModelSpec("mix", 32, 8, 2, 4096, 14336)
H100 = SystemSpec("h100", b_pcie=64e9, b_net=50e9)
B200 = SystemSpec("b200", b_pcie=128e9, b_net=100e9, alpha_net=1e-5)


def _small_grid():
    return [
        sw.model_axis([R1, MIX]),
        sw.system_axis([H100, B200]),
        sw.dtype_axis("expert_dtype", ("f_e",), ["bf16", "mxfp4"]),  # overrides the models' f_e
        sw.number_axis("tokens", "tokens", [1, 16, 4096]),
        sw.number_axis("ep_ranks", "ep_ranks", [0, 8]),
    ]


def test_grid_order_and_overrides_match_pointwise():
    axes = _small_grid()
    base = sw.params_of(R1, H100, Workload(tokens=1))
    res = sw.evaluate_grid(base, axes, ("gamma", "fanout"))
    rows = list(sw.grid_labels(axes))
    assert len(rows) == sw.grid_size(axes) == res["gamma"].size == 48
    models, systems = {"r1": R1, "mix": MIX}, {"h100": H100, "b200": B200}
    for (m, s, dt, n, r), g, phi in zip(rows, res["gamma"], res["fanout"], strict=True):
        model = models[m].with_(expert_dtype=dt)
        want = cf.evaluate(model, systems[s], Workload(tokens=n), Options(ep_ranks=r or None))
        assert g == pytest.approx(want.gamma, rel=2e-5)
        assert phi == pytest.approx(want.fanout, rel=2e-5)


def test_grid_sharded_over_8_devices_equals_one_device():
    assert len(jax.devices()) >= 8  # conftest: 8 simulated CPU devices
    axes = _small_grid()[:2] + [sw.number_axis("tokens", "tokens", [1, 16, 4096]),
                                sw.number_axis("b_net", "b_net", [10, 50, 400], 1e9)]
    base = sw.params_of(R1, H100, Workload(tokens=1))
    assert sw.grid_size(axes) % 8  # 36 configurations: the last shard is padded
    run = sw.grid_kernel(base, axes, ("gamma",))
    assert len(run.sharding.device_set) == len(jax.devices())
    many = run()
    one = sw.evaluate_grid(base, axes, ("gamma",), devices=jax.devices()[:1])
    # the same formula, split differently: equal up to float32 rounding of fused ops
    np.testing.assert_allclose(many["gamma"], one["gamma"], rtol=1e-6)


def test_grid_rejects_bad_input():
    base = sw.params_of(R1, H100, Workload(tokens=1))
    with pytest.raises(SpecError, match="unknown parameters"):
        sw.evaluate_grid(base, [sw.Axis("x", (1,), {"nope": np.ones(1)})])
    with pytest.raises(SpecError, match="no values"):
        sw.evaluate_grid(base, [sw.number_axis("tokens", "tokens", [])])
    with pytest.raises(SpecError, match="lack"):
        sw.evaluate_grid({"tokens": 1.0}, [])


# --- the CLI ---------------------------------------------------------------------------------


def _args(**kw):
    from moelab.cli import build_parser

    argv = ["sweep"]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, str(v)]
    return build_parser("sweep").parse_args(argv)


def test_parse_values():
    from moelab.commands.sweep import parse_values, whole

    assert parse_values("b_pcie", "16,32") == [16.0, 32.0]
    np.testing.assert_allclose(parse_values("b_net", "1:100:log:3"), [1, 10, 100])
    # 1, 1.33, 1.76, 2.33, 3.08, ...: rounded, duplicates merged, and said so
    values, note = whole("tokens", parse_values("tokens", "1:1e6:log:50"))
    assert values[:3] == [1.0, 2.0, 3.0] and "50 values round to 48" in note
    assert whole("tokens", [1.0, 2.0, 8.0]) == ([1.0, 2.0, 8.0], None)
    assert whole("ep_ranks", [2.0, 2.4, 8.0]) == ([2.0, 8.0], "--ep-ranks: 3 values round to 2 "
                                                 "distinct whole rank counts; duplicates merged")
    assert parse_values("resident_fraction", "0:1:lin:5") == [0, 0.25, 0.5, 0.75, 1]
    with pytest.raises(SpecError, match="positive ends"):
        parse_values("tokens", "0:1:log:3")
    for flag, text in [("tokens", "a,b"), ("b_pcie", "0:10:log:3"), ("b_pcie", "0,1"),
                       ("tokens", "1:10:cubic:3"), ("tokens", "1:10:log:0"),
                       ("resident_fraction", "2"), ("tokens", "-1"), ("b_net", "nan")]:
        with pytest.raises(SpecError, match="^--"):
            parse_values(flag, text)


def test_cli_writes_tidy_csv_and_plot(tmp_path, capsys):
    from moelab.commands import sweep as cmd_sweep

    out, png = tmp_path / "s.csv", tmp_path / "s.png"
    args = _args(model="deepseek-r1", tokens="1:1e6:log:50", b_pcie="16,32,64,128", out=out,
                 plot=png)
    assert cmd_sweep.run(args) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    # 50 log-spaced values from 1 to 1e6 round to 48 whole token counts (1, 1, 2, 2, 3, ...:
    # the first ratio is 10^(6/49) = 1.33), so 4 x 48 rows
    n_tokens = len({round(v) for v in np.geomspace(1, 1e6, 50)})
    assert n_tokens == 48 and len(rows) == 4 * n_tokens
    assert "50 values round to 48 distinct" in capsys.readouterr().err
    assert list(rows[0])[:5] == ["model", "system", "routing", "tokens", "b_pcie_GBps"]
    # below saturation gamma = C k (docs/model.md): 1/2 * 3072 * 50/64 * 8 = 9600 at N_t = 1
    r = next(r for r in rows if r["tokens"] == "1" and r["b_pcie_GBps"] == "64")
    assert float(r["gamma"]) == pytest.approx(9600, rel=1e-6) and r["decision"] == "ep"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half-written left behind


def test_cli_json_and_errors(capsys):
    import json

    from moelab.commands import sweep as cmd_sweep

    assert cmd_sweep.run(_args(model="deepseek-r1,mixtral-8x7b", routing="worst,uniform",
                               tokens="16,4096", act_dtype="bf16,fp8", json=True)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["configurations"] == 16 and len(summary["rows"]) == 16
    seed = next(r for r in summary["rows"] if r["model"] == "deepseek-r1" and r["tokens"] == 4096
                and r["routing"] == "worst" and r["act_dtype"] == "bf16")
    assert seed["gamma"] == pytest.approx(75.0, rel=1e-6)
    for kw, match in [(dict(routing="zipf:1"), "--routing"), (dict(fanout="2", ep_ranks="8"),
                      "--fanout"), (dict(model="nope"), "model"), (dict(act_dtype="fp7"), "dtype")]:
        with pytest.raises(SpecError, match=match):
            cmd_sweep.compute(_args(**kw))
    with pytest.raises(SpecError, match="--plot"):
        cmd_sweep.run(argparse.Namespace(**{**vars(_args()), "plot": "x.png"}))


@pytest.mark.slow
def test_benchmarks_run_quick(capsys):
    """The benchmarks check their results before they report a speed; run them small."""
    from moelab.costmodel.bench_reference import bench as bench_reference
    from moelab.costmodel.bench_sweep import bench as bench_sweep

    args = argparse.Namespace(quick=True, out=None, json=False)
    rows = bench_sweep(args) + bench_reference(args)
    assert all(r["measured_s"] > 0 for r in rows)
    assert "goal/meas" in capsys.readouterr().out


# --- a recorded trace in the sweep ---------------------------------------------------------------


def _zipf_trace(path, layers, tokens, E, k, seed=0, holes=0.05):
    """A generated trace (Zipf-skewed, some -1 ids), written as JSON (docs/traces.md)."""
    import json

    from moelab.costmodel import routing as rt
    from moelab.costmodel.specs import parse_routing

    gen = rt.layer_generator(parse_routing("zipf:1.0"), layers, tokens, E, k)
    ids = np.stack([np.asarray(gen(jax.random.fold_in(jax.random.key(seed), l), l))
                    for l in range(layers)])
    ids = np.where(np.random.default_rng(seed).random(ids.shape) < holes, -1, ids)
    path.write_text(json.dumps({"num_experts": E, "top_k": k, "layers": list(range(layers)),
                                "ids": ids.tolist()}))
    return str(path)


def _sweep_rows(**kw):
    from moelab.commands import sweep as cmd_sweep

    columns, rows, summary = cmd_sweep.compute(_args(**kw))
    return [dict(zip(columns, r, strict=True)) for r in rows], summary


# one rank: gamma's per-window gammas are all infinite; their spread is NaN, without a warning
@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("ranks,mode", [(None, None), (4, "per-node"), (4, "flat"), (1, None)])
def test_trace_rows_are_gamma_trace_means(tmp_path, ranks, mode):
    """Each row of `sweep --routing trace:` is `gamma --routing trace:` at the same point: the
    trace's mean N_ue, fan-outs and busiest rank in the formula, so the overheads are the mean
    overheads over the windows (one leg decides in every window here: windows of >= 16
    tokens always cross nodes) and gamma is their ratio."""
    from moelab import api

    path = _zipf_trace(tmp_path / "mix.json", 3, 1024, 8, 2, seed=1)  # Mixtral: E = 8, k = 2
    kw = dict(model="mixtral-8x7b", routing=f"trace:{path}", tokens="16,64", json=True)
    if ranks:
        kw.update(ep_ranks=str(ranks), gpus_per_node="2")
    if mode:
        kw.update(dispatch_mode=mode)
    rows, summary = _sweep_rows(**kw)
    assert len(rows) == 2
    for row in rows:
        g = api.gamma("mixtral-8x7b", tokens=row["tokens"], routing=f"trace:{path}",
                      ep_ranks=ranks, gpus_per_node=2 if ranks else None,
                      dispatch_mode=mode or "per-node")
        assert row["n_ue"] == pytest.approx(g.n_ue_mean, rel=1e-6)
        assert row["t_p_overhead_s"] == pytest.approx(g.t_p_overhead_mean, rel=1e-6)
        if ranks == 1:  # nothing is remote: EP costs nothing, gamma is infinite
            assert row["t_ep_overhead_s"] == 0 and g.t_ep_overhead_mean == 0
            continue
        assert row["t_ep_overhead_s"] == pytest.approx(g.t_ep_overhead_mean, rel=1e-6)
        assert row["gamma"] == pytest.approx(g.t_p_overhead_mean / g.t_ep_overhead_mean, rel=1e-6)
        if ranks:
            assert row["fanout"] == pytest.approx(g.fanout_mean, rel=1e-6)
            assert row["fanout_nodes"] == pytest.approx(g.fanout_nodes_mean, rel=1e-6)
            assert row["imbalance"] == pytest.approx(g.imbalance_mean, rel=1e-6)
            assert g.imbalance_samples > 0 and row["imbalance"] > 1
    # skewed routing uses fewer experts than uniform: the trace is not the closed form
    uniform, _ = _sweep_rows(model="mixtral-8x7b", routing="uniform", tokens="16", json=True)
    assert rows[0]["n_ue"] < uniform[0]["n_ue"]


def test_trace_decode_windows_are_the_batch(tmp_path):
    from moelab import api

    path = _zipf_trace(tmp_path / "mix.json", 2, 256, 8, 2, seed=2)
    rows, summary = _sweep_rows(model="mixtral-8x7b", routing=f"worst,trace:{path}", decode=True,
                                batch="2,8", steps="10", ep_ranks="8", dispatch_mode="flat",
                                json=True)
    assert [(r["routing"], r["batch"]) for r in rows] == [
        ("worst", 2), ("worst", 8), (f"trace:{path}", 2), (f"trace:{path}", 8)]
    for row in rows[2:]:
        g = api.gamma("mixtral-8x7b", decode=True, batch=row["batch"], steps=10,
                      routing=f"trace:{path}", ep_ranks=8, dispatch_mode="flat")
        assert row["n_ue"] == pytest.approx(g.n_ue_mean, rel=1e-6)
        assert row["t_p_overhead_s"] == pytest.approx(g.t_p_overhead_mean, rel=1e-6)
        assert row["t_ep_overhead_s"] == pytest.approx(g.t_ep_overhead_mean, rel=1e-6)
    # the worst-case rows are the closed form's
    for row in rows[:2]:
        g = api.gamma("mixtral-8x7b", decode=True, batch=row["batch"], steps=10, ep_ranks=8,
                      dispatch_mode="flat")
        assert row["gamma"] == pytest.approx(g.gamma, rel=2e-5)
    # the busiest rank needs windows of R B tokens: 8 x 64 = 512 > the trace's 256, so none is
    # measured (the ranks count as balanced) and a note says so
    _, summary = _sweep_rows(model="mixtral-8x7b", routing=f"trace:{path}", decode=True,
                             batch="64", ep_ranks="8", json=True)
    assert any("no busiest rank measured" in n for n in summary["notes"])


def test_trace_errors_exit_2(tmp_path, capsys):
    from moelab.cli import main

    other = _zipf_trace(tmp_path / "olmoe.json", 1, 64, 64, 8)
    mix = _zipf_trace(tmp_path / "mix.json", 1, 64, 8, 2)
    for argv, needle in [
        (["--model", "mixtral-8x7b", "--routing", f"trace:{other}"], "E=64, k=8"),
        (["--model", "mixtral-8x7b,olmoe-1b-7b", "--routing", f"trace:{mix}"], "E=8, k=2"),
        (["--model", "mixtral-8x7b", "--routing", "trace:nope.json"], "no such file"),
        (["--model", "mixtral-8x7b", "--routing", "zipf:1"], "worst, uniform and trace:FILE"),
        (["--model", "mixtral-8x7b", "--routing", f"trace:{mix}", "--ep-ranks", "4",
          "--dispatch-mode", "per-rank"], "per-rank"),
        (["--model", "mixtral-8x7b", "--routing", f"trace:{mix}", "--tokens", "65"],
         "fewer than one window of 65"),
        (["--dispatch-mode", "per-gpu"], "per-node, per-rank"),
        (["--decode", "--tokens", "4"], "--tokens"),
        (["--batch", "4"], "--batch"),
        (["--steps", "10"], "--steps"),
        (["--decode", "--steps", "0"], "--steps"),
    ]:
        assert main(["sweep", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and "--routing" in err if "routing" in needle else needle in err, err


def test_cli_two_tier_rows_are_moelab_gamma():
    """Rows over R, G, B_nvlink and the dispatch mode are `moelab gamma` at the same point:
    gamma, the legs, the deciding one, the busiest rank; --rank-load mean is the closed form
    with imbalance off. R = 40 does not divide E = 384 (ranks of 9 and 10 experts)."""
    from moelab import api

    rows, _ = _sweep_rows(model="kimi-k2", tokens="1,4096", ep_ranks="16,40", gpus_per_node="4,8",
                          b_nvlink="100,450", dispatch_mode="per-node,per-rank",
                          rank_load="busiest,mean", json=True)
    assert len(rows) == 64
    m = api.model_spec("kimi-k2")
    for row in rows:
        system = api.system_spec("h100-sxm").with_(b_nvlink=row["b_nvlink_GBps"] * 1e9,
                                                    gpus_per_node=row["gpus_per_node"])
        kw = dict(tokens=row["tokens"], ep_ranks=row["ep_ranks"], dispatch_mode=row["dispatch_mode"])
        if row["rank_load"] == "mean":
            r = cf.evaluate(m, system, Workload(tokens=row["tokens"]),
                            Options(ep_ranks=row["ep_ranks"], dispatch_mode=row["dispatch_mode"],
                                    imbalance=False))
            assert row["gamma"] == pytest.approx(r.gamma, rel=2e-5)
            assert row["imbalance"] == 1
            continue
        g = api.gamma(m, system, **kw)
        assert row["gamma"] == pytest.approx(g.gamma, rel=2e-5)
        assert row["imbalance"] == pytest.approx(g.imbalance, rel=1e-6)
        assert row["fanout"] == pytest.approx(g.fanout, rel=1e-6)
        assert row["fanout_nodes"] == pytest.approx(g.fanout_nodes, rel=1e-6)
        assert row["t_ep_net_s"] == pytest.approx(g.t_ep_net_s, rel=2e-5)
        assert row["t_ep_nvlink_s"] == pytest.approx(g.t_ep_nvlink_s, rel=2e-5)
        assert row["ep_deciding_leg"] == g.ep_deciding_leg
    # both legs decide somewhere on this grid, and the busiest rank costs something at 1 token
    assert {r["ep_deciding_leg"] for r in rows} == {"network", "nvlink"}
    assert min(r["imbalance"] for r in rows if r["rank_load"] == "busiest" and r["tokens"] == 1) > 1.3
