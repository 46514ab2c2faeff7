"""The prediction layer: user profiles, engine efficiencies, prediction >= roofline."""

import json
from dataclasses import replace

import pytest

from moelab.cli import main
from moelab.costmodel import plan as planner
from moelab.costmodel.predict.profile import load_profile
from moelab.costmodel.presets import load_cpu, load_model, load_system, model_config
from moelab.costmodel.specs import SpecError


def make_plan(model="deepseek-r1", system="h100-sxm", **kw):
    spec = load_model(model)
    args = dict(model=spec, cfg=model_config(model), system=load_system(system, latencies=True),
                cpu=load_cpu("xeon-8470"), gpus=1, gpus_per_node=8, tokens=64, sequences=64,
                context=4096, decode=True,
                routing=planner.make_routing("uniform", spec.n_moe_layers, spec.n_experts, spec.top_k),
                host_mem=2e12)
    args.update(kw)
    return planner.Plan(**args)


def profile(**kw):
    return {"moelab_profile": 1, "engine": "ideal", **kw}


# --- the user profile -------------------------------------------------------------------


def test_profile_scale_doubles_the_offload_compute_term():
    p = make_plan()
    plain = planner.plan_offload(p)
    scaled = planner.plan_offload(replace(p, profile=load_profile(profile(scale={"compute_s": 2.0}))))
    c, s = plain["terms"]["compute_s"], plain["terms"]["stream_s"]
    assert plain["feasible"] and c > 0 and s > 0
    assert scaled["terms"]["compute_s"] == pytest.approx(2 * c, rel=1e-12)
    assert scaled["terms"]["stream_s"] == pytest.approx(s, rel=1e-12)
    # offload's step is the sum of its terms: 2c + s, its overlap the larger
    assert scaled["step_s"] == pytest.approx(2 * c + s, rel=1e-12)
    assert scaled["step_overlap_s"] == pytest.approx(max(2 * c, s), rel=1e-12)


def test_profile_fixed_costs_add_per_step_and_per_layer():
    p = make_plan(system="h200-sxm")
    layers = load_model("deepseek-r1").n_layers  # 61 in DeepSeek-R1's config.json
    assert layers == 61
    plain = planner.plan_ep(replace(p, gpus=8))
    fixed = planner.plan_ep(replace(p, gpus=8, profile=load_profile(
        profile(fixed={"per_step_s": 1e-3, "per_layer_s": 2e-5}))))
    assert fixed["step_s"] - plain["step_s"] == pytest.approx(1e-3 + 61 * 2e-5, rel=1e-9)
    assert fixed["terms"] == plain["terms"]


def test_profile_scales_terms_before_the_max():
    # EP combines its legs by a max: scaling the slower leg's rival above it changes the step
    # by the new max, not by the factor
    p = replace(make_plan(system="h200-sxm"), gpus=16, gpus_per_node=8)
    plain = planner.plan_ep(p)
    t = plain["terms"]
    assert t["network_s"] > t["nvlink_s"] > 0
    k = 3 * t["network_s"] / t["nvlink_s"]
    scaled = planner.plan_ep(replace(p, profile=load_profile(profile(scale={"nvlink_s": k}))))
    expect = t["compute_s"] + t["tp_allreduce_s"] + t["ep_latency_s"] + k * t["nvlink_s"]
    assert scaled["step_s"] == pytest.approx(expect, rel=1e-12)


def test_profile_reads_from_a_file_and_the_cli(tmp_path, capsys):
    f = tmp_path / "prof.json"
    f.write_text(json.dumps(profile(engine="vllm", scale={"compute_s": 1.5}, source="test")))
    assert load_profile(str(f)).factor("compute_s") == 1.5
    assert main(["plan", "--gpus", "1", "--decode-batch", "4", "--profile", str(f), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["engine"] == "vllm" and out["profile"]["scale"] == {"compute_s": 1.5}


@pytest.mark.parametrize("bad, words", [
    ({"engine": "ideal"}, "not a moelab profile"),
    (profile(engine="tensorflow"), "engine must be one of"),
    (profile(scale={"compute": 2.0}), "unknown term 'compute'"),
    (profile(scale={"compute_s": 0}), "> 0"),
    (profile(scale={"compute_s": float("nan")}), "finite"),
    (profile(fixed={"per_step_s": -1.0}), ">= 0"),
    (profile(fixed={"per_token_s": 1.0}), "unknown key 'per_token_s'"),
    (profile(extra=1), "unknown key 'extra'"),
    ([1, 2], "a path or a JSON object"),
])
def test_bad_profiles_give_one_line(bad, words):
    with pytest.raises(SpecError, match=words) as e:
        load_profile(bad)
    assert "\n" not in str(e.value)


def test_bad_profile_file_exits_2(tmp_path, capsys):
    f = tmp_path / "prof.json"
    f.write_text("{\"moelab_profile\": 1, ")
    assert main(["plan", "--profile", str(f)]) == 2
    err = capsys.readouterr().err
    assert "profile" in err and str(f) in err and len(err.strip().splitlines()) == 1


# --- the regeneration script, on a tiny table tree ------------------------------------------------


def _tree(root):
    """A made-up aiconfigurator-style tree: H100 GEMM (vLLM), SGLang custom all-reduce, and a GPU
    without a moelab preset (skipped)."""
    import pandas as pd

    def put(rel, rows):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_parquet(path)

    g = dict(framework="VLLM", version="0.1", device="H100", op_name="gemm", kernel_source="a")
    put("h100_sxm/gemm/vllm/0.1/gemm_perf.parquet", [
        {**g, "gemm_dtype": "bfloat16", "m": 1, "n": 4096, "k": 4096, "latency": 0.02},
        {**g, "gemm_dtype": "bfloat16", "m": 1, "n": 4096, "k": 4096, "latency": 0.04},  # slower kernel
        {**g, "gemm_dtype": "bfloat16", "m": 1, "n": 8192, "k": 8192, "latency": 0.05},
        {**g, "gemm_dtype": "bfloat16", "m": 1, "n": 512, "k": 4096, "latency": 0.01},  # N < 1024: out
        {**g, "gemm_dtype": "bfloat16", "m": 4, "n": 4096, "k": 4096, "latency": 0.001},  # above 1: clipped
    ])
    a = dict(framework="SGLang", version="0.1", device="H100", op_name="all_reduce", kernel_source="c",
             allreduce_dtype="bfloat16")
    put("h100_sxm/comm/sglang/0.1/custom_allreduce_perf.parquet", [
        {**a, "num_gpus": 2, "message_size": 128, "latency": 0.005},
        {**a, "num_gpus": 2, "message_size": 524288, "latency": 0.02},
        {**a, "num_gpus": 4, "message_size": 128, "latency": 0.007},
        {**a, "num_gpus": 4, "message_size": 524288, "latency": 0.03},
    ])
    put("l40s/gemm/vllm/0.1/gemm_perf.parquet", [{**g, "gemm_dtype": "bfloat16", "m": 1, "n": 4096,
                                                  "k": 4096, "latency": 0.02}])


def test_regeneration_script_on_a_tiny_tree(tmp_path):
    from moelab.costmodel.predict import derive_efficiency

    _tree(tmp_path / "data")
    out = tmp_path / "eff.json"
    assert derive_efficiency.main(["--tables", str(tmp_path / "data"), "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert list(d["gpus"]) == ["h100-sxm"] and d["skipped_gpus"]["no moelab preset"] == ["l40s"]
    vllm, sglang = d["gpus"]["h100-sxm"]["frameworks"]["vllm"], d["gpus"]["h100-sxm"]["frameworks"]["sglang"]
    # GEMM, by hand: H100 preset 989 TFLOP/s bf16, 3.35 TB/s; bytes (MK + KN) 2 + 2 MN; M = 1 is
    # memory-bound. The fastest kernel of each shape counts.
    t1 = ((4096 + 4096 * 4096) * 2 + 2 * 4096) / 3.35e12
    t2 = ((8192 + 8192 * 8192) * 2 + 2 * 8192) / 3.35e12
    gemm = vllm["gemm"]["bf16"]
    assert gemm["x"] == [1.0, 4.0]
    assert gemm["eff"][0] == pytest.approx((t1 / 20e-6 + t2 / 50e-6) / 2, rel=1e-3)
    assert gemm["eff"][1] == 1.0 and gemm["clipped"] == 1 and gemm["used"] == 3
    assert gemm["table"] == "h100_sxm/gemm/vllm/0.1/gemm_perf.parquet"
    # All-reduce, by hand: floor = median over GPU counts of the smallest time = (5 + 7)/2 us;
    # eff = ring bytes 2 (n-1)/n x 2 B x elements / 380 GB/s (NVLink 4 measured) over (time - floor).
    ar = sglang["allreduce"]["bf16"]
    floor = 6e-6
    assert ar["floor_s"] == pytest.approx(floor)
    big = [2 * (n - 1) / n * 524288 * 2 / 380e9 / (t - floor) for n, t in ((2, 20e-6), (4, 30e-6))]
    small = 2 * 3 / 4 * 128 * 2 / 380e9 / (7e-6 - floor)  # n = 2 at 128 runs below the floor: dropped
    assert ar["x"] == [256.0, 1048576.0]
    assert ar["eff"] == pytest.approx([small, sum(big) / 2], rel=1e-3)
    # a GPU without tables gets the median across the table GPUs: here the one
    assert d["defaults"]["vllm"]["gemm"]["bf16"]["eff"] == gemm["eff"]


# --- the committed curves ----------------------------------------------------------------------


def test_committed_curves_are_efficiencies():
    from pathlib import Path

    from moelab.costmodel.predict import efficiency

    path = Path(efficiency.__file__).with_name("efficiency.json")
    assert path.stat().st_size < 200_000
    d = efficiency.data()
    assert d["source"]["package"] == "aiconfigurator-core" and d["source"]["version"] == "0.12.0"
    curves = [c for g in d["gpus"].values() for f in g["frameworks"].values() for cl in f.values()
              for c in cl.values()] + [c for f in d["defaults"].values() for cl in f.values()
                                       for c in cl.values()]
    assert len(curves) > 50
    for c in curves:
        assert all(0 < e <= 1 for e in c["eff"]), c
        assert c["x"] == sorted(c["x"]) and len(c["x"]) == len(c["eff"])
    assert {"h100-sxm", "h200-sxm", "b200", "gb200"} <= set(d["gpus"])


def test_interpolation_is_log_linear_and_clamped():
    from moelab.costmodel.predict.efficiency import at

    c = {"x": [1.0, 16.0], "eff": [0.2, 0.6]}
    assert at(c, 4.0) == pytest.approx(0.4)  # half-way in log x
    assert at(c, 0.1) == 0.2 and at(c, 1e6) == 0.6
    assert at(None, 5.0) == 1.0


# --- prediction and bound ----------------------------------------------------------------------


ENGINES = ("vllm", "sglang", "trtllm", "ktransformers", "llama.cpp")
CASES = [("deepseek-r1", "h200-sxm", dict(gpus=8, decode_batch=64)),
         ("deepseek-r1", "b200", dict(gpus=16, tokens=4096)),
         ("mixtral-8x7b", "h800-sxm", dict(gpus=2, decode_batch=4))]


@pytest.mark.parametrize("engine", ENGINES)
def test_prediction_is_never_below_the_bound(engine):
    import moelab

    for model, system, kw in CASES:
        r = moelab.plan(model, system, engine=engine, **kw)
        assert r.engine == engine
        for s in r.strategies:
            if not s["feasible"]:
                continue
            assert s["step_s"] >= s["bound_step_s"] * (1 - 1e-12), (model, system, s["name"])
            assert s["engine"] == engine and s["efficiency_sources"]
        assert any(s["feasible"] and s["step_s"] > s["bound_step_s"] * 1.01 for s in r.strategies)


def test_ideal_is_the_bound_and_the_old_roofline():
    # Figures printed by commit f2ccb7a's costmodel/plan.py (before the prediction layer) for the
    # same Plans, with NVLink's latency set to the network's as that code charged it.
    old = [("deepseek-r1", "h200-sxm", {}, {"ep": 0.02718526989033858, "offload": 14.124363800924252,
                                             "hybrid": 0.8629497973602658}),
           ("deepseek-r1", "h200-sxm", dict(gpus=16), {"ep": 0.018600548989551338}),
           ("mixtral-8x7b", "h100-sxm", dict(gpus=1, tokens=4, sequences=4),
            {"offload": 0.6768558175591859, "cpu-experts": 0.05497183280629579}),
           ("qwen3-30b-a3b", "h100-sxm", dict(gpus=2, gpus_per_node=1, tokens=4096, sequences=1,
                                              decode=False), {"ep": 0.0399411269576104})]
    for model, system, kw, want in old:
        p = make_plan(model, system, **{"gpus": 8, **kw})
        p = replace(p, system=load_system(system, measured=True, latencies=True))
        p = replace(p, alpha_scale_up=p.system.alpha_net)
        got = {s["name"]: s for s in planner.plan_all(p)["strategies"]}
        for name, step in want.items():
            assert got[name]["step_s"] == pytest.approx(step, rel=1e-12), (model, kw, name)
            assert got[name]["bound_step_s"] == got[name]["step_s"]


def test_one_nvlink_domain_pays_no_network_latency():
    p = make_plan("deepseek-r1", "h200-sxm", gpus=8)
    slow_net = replace(p, system=p.system.with_(alpha_net=1e-3))
    for engine in ("ideal", "sglang"):
        a, b = (planner.plan_ep(replace(x, engine=engine)) for x in (p, slow_net))
        assert a["feasible"] and a["step_s"] == b["step_s"]  # alpha_net plays no part in one node
    # ideal: NVLink's latency (none published: 0); sglang: its measured DeepEP low-latency floor
    assert planner.plan_ep(p)["terms"]["ep_latency_s"] == 0.0
    from moelab.costmodel.predict import efficiency

    floor = efficiency.data()["gpus"]["h200-sxm"]["frameworks"]["sglang"]["a2a_ll"]["bf16"]["floor_s"]
    got = planner.plan_ep(replace(p, engine="sglang"))["terms"]["ep_latency_s"]
    assert got == pytest.approx(58 * floor)  # one floor (dispatch + combine) per MoE layer, 58 layers
    # across nodes the network's latency is paid, twice per MoE layer
    two = planner.plan_ep(replace(slow_net, gpus=16))
    assert two["terms"]["ep_latency_s"] == pytest.approx(58 * 2 * 1e-3)


def test_default_engine_is_said():
    import moelab

    r = moelab.plan("mixtral-8x7b", "h100-sxm", gpus=1, decode_batch=4)
    assert r.engine in ENGINES[:3] and "the default" in r.engine_note
    r = moelab.plan("mixtral-8x7b", "h800-sxm", gpus=1, decode_batch=4)
    assert "no per-operation tables for h800-sxm" in r.engine_note
    with pytest.raises(SpecError, match="engine"):
        moelab.plan("mixtral-8x7b", gpus=1, decode_batch=4, engine="tgi")


def test_table_shows_step_and_roofline(capsys):
    assert main(["plan", "--model", "mixtral-8x7b", "--gpus", "1", "--decode-batch", "4",
                 "--engine", "vllm"]) == 0
    out = capsys.readouterr().out
    assert "roofline" in out and "engine: vllm (as asked)" in out


def test_engines_name_their_tables():
    p = make_plan("deepseek-r1", "h200-sxm", gpus=8)
    src = {e: planner.with_bound(replace(p, engine=e), planner.plan_ep, planner.plan_ep(replace(p, engine=e)))
           for e in ("sglang", "ktransformers", "llama.cpp", "vllm")}
    gemm = {e: next(s["source"] for s in r["efficiency_sources"] if s["op"] == "gemm")
            for e, r in src.items()}
    assert gemm["sglang"].startswith("h200-sxm sglang gemm[fp8]") and gemm["ktransformers"] == gemm["sglang"]
    assert gemm["llama.cpp"].startswith("all-framework default")
    # vLLM has no MLA decode table: the all-framework default, said
    mla = next(s["source"] for s in src["vllm"]["efficiency_sources"] if s["op"] == "mla_decode")
    assert mla.startswith("all-framework default") and "no vllm mla_decode" in mla
    assert src["sglang"]["step_s"] == src["ktransformers"]["step_s"]


def test_prefill_budget_engine_defaults():
    from moelab.costmodel.predict import efficiency

    # vLLM serve: 8192 on >= 70 GiB GPUs; SGLang: 8192 below 160 GiB (H200: 141 GB = 131 GiB),
    # 16384 above (B200: 180 GB = 168 GiB), divided over DP ranks; TRT-LLM: 8192 per rank
    assert efficiency.prefill_budget("vllm", 80e9)[0] == 8192
    assert efficiency.prefill_budget("vllm", 40e9)[0] == 2048
    assert efficiency.prefill_budget("vllm", 180e9, dp=8)[0] == 8192
    assert efficiency.prefill_budget("sglang", 141e9)[0] == 8192
    assert efficiency.prefill_budget("sglang", 180e9)[0] == 16384
    assert efficiency.prefill_budget("sglang", 180e9, dp=8)[0] == 2048
    assert efficiency.prefill_budget("trtllm", 141e9, dp=4)[0] == 8192
    assert efficiency.prefill_budget("ideal", 80e9)[0] is None


def test_gemm_shapes_of_deepseek_r1_by_hand():
    # DeepSeek-R1's config: hidden 7168, 128 heads, q_lora 1536, kv_lora 512, nope 128, rope 64,
    # v 128; 61 layers (58 MoE, 3 dense of intermediate 18432), shared expert 2048, 256 experts,
    # vocab 129280
    p = planner.Plan(model=load_model("deepseek-r1"), cfg=model_config("deepseek-r1"),
                     system=load_system("h200-sxm"), cpu=load_cpu("xeon-8470"), gpus=1, gpus_per_node=8,
                     tokens=4, sequences=4, context=1024, decode=True,
                     routing=planner.make_routing("uniform", 58, 256, 8), host_mem=1e12)
    want = [(61, 7168 * 1536), (61, 1536 * 128 * 192), (61, 7168 * 576), (61, 512 * 128 * 256),
            (61, 128 * 128 * 7168), (58 * 3, 7168 * 2048), (3 * 3, 7168 * 18432), (58, 256 * 7168),
            (1, 129280 * 7168)]
    assert planner.gemm_shapes(p) == want
    # the attention matrices add up to the attention parameter group (memory.param_groups)
    assert 61 * sum(nk for _, nk in want[:5]) == 11_413_422_080


def test_gemm_curve_by_weight_size():
    from moelab.costmodel.predict import efficiency

    # 4 M elements (2^22) reads the gemm_nk22 curve, 100 M the nk26 one (log4 100e6 = 13.3),
    # below the smallest bin the smallest; no size: the all-shapes curve
    g = efficiency.data()["gpus"]["h200-sxm"]["frameworks"]["trtllm"]
    assert efficiency.gemm_curve("h200-sxm", "trtllm", "fp8", 2**22)[0] is g["gemm_nk22"]["fp8"]
    assert efficiency.gemm_curve("h200-sxm", "trtllm", "fp8", 100e6)[0] is g["gemm_nk26"]["fp8"]
    assert efficiency.gemm_curve("h200-sxm", "trtllm", "fp8", 10)[0] is g["gemm_nk20"]["fp8"]
    assert efficiency.gemm_curve("h200-sxm", "trtllm", "fp8", 0)[0] is g["gemm"]["fp8"]
    assert efficiency.gemm_curve("h200-sxm", "ideal", "fp8", 2**22)[0] is None
