"""The fp4 FLOP lane: NVFP4 experts at the GPU's fp4 peak (plan.compute_s, expert_work), its
fallbacks, and that nothing else moved."""

import json
from pathlib import Path

import pytest

from moelab.costmodel import plan as planner
from moelab.costmodel.predict import efficiency
from moelab.costmodel.presets import load_cpu, load_model, load_system, model_config

SYSTEMS = json.loads((Path(planner.__file__).parent / "presets" / "systems.json").read_text())


def make_plan(model="deepseek-r1", system="h100-sxm", expert_dtype=None, **kw):
    spec = load_model(model)
    if expert_dtype:
        spec = spec.with_(expert_dtype=expert_dtype)
    if isinstance(system, str):
        system = load_system(system, latencies=True)
    args = dict(model=spec, cfg=model_config(model), system=system,
                cpu=load_cpu("xeon-8470"), gpus=8, gpus_per_node=8, tokens=64, sequences=64,
                context=4096, decode=True,
                routing=planner.make_routing("uniform", spec.n_moe_layers, spec.n_experts, spec.top_k),
                host_mem=2e12)
    args.update(kw)
    return planner.Plan(**args)


def test_loader_reads_the_fp4_peak():
    # the preset's figure, read straight from the JSON; Hopper has none (0: no fp4 path)
    for name, g in SYSTEMS["gpus"].items():
        assert load_system(name).peak_flops_fp4 == (g.get("fp4_dense_TFLOPs") or 0) * 1e12
    assert load_system("b200").peak_flops_fp4 == 9000e12
    assert load_system("gb200").peak_flops_fp4 == 10000e12
    assert load_system("h100-sxm").peak_flops_fp4 == 0.0


def test_fp4_lane_by_hand_on_b200():
    # DeepSeek-R1, NVFP4 experts, 2^18 token-expert pairs (1,024 per expert) on all 256 experts of
    # all 58 MoE layers: FLOPs = 2 x rows x 3 d I x L, at 9,000 TFLOP/s;
    # bytes = L (256 x 3 d I x 4.5/8 + 2 rows d x 2) at the preset's HBM TB/s
    p = make_plan(system="b200", expert_dtype="nvfp4")
    d, inter, L, rows = 7168, 2048, 58, 1 << 18
    hbm = SYSTEMS["gpus"]["b200"]["hbm_TBps"] * 1e12
    flops = 2 * rows * 3 * d * inter * L
    bytes_ = L * (256 * 3 * d * inter * 4.5 / 8 + 2 * rows * d * 2)
    w = planner.expert_work(p, rows, 256)
    assert (w.flops, w.flops_fp8, w.flops_fp4) == (0, 0, flops)
    assert w.bytes == pytest.approx(bytes_, rel=1e-12)
    assert w.time(p.system) == pytest.approx(max(flops / 9000e12, bytes_ / hbm), rel=1e-12)
    # at this size compute binds: the fp4 peak is the one in the step (half the fp8 time)
    assert flops / 9000e12 > bytes_ / hbm
    fp8 = planner.expert_work(make_plan(system="b200", expert_dtype="fp8"), rows, 256)
    assert fp8.time(p.system) == pytest.approx(flops / 4500e12, rel=1e-12)
    assert w.bound(p.system) == "GPU compute"


@pytest.mark.parametrize("system", ["h100-sxm", "h200-sxm", "rtx-4090"])
def test_nvfp4_without_fp4_path_runs_weight_only_at_bf16(system):
    # Hopper/Ada: no fp4 tensor path; engines run NVFP4 as Marlin W4A16 (bf16 MMAs), so the experts
    # stay where they were before the lane: bf16 FLOPs, the weight-only (int4) curve
    p = make_plan(system=system, expert_dtype="nvfp4")
    assert p.system.peak_flops_fp4 == 0
    rows = 1 << 16
    flops = 2 * rows * 3 * 7168 * 2048 * 58
    w = planner.expert_work(p, rows, 256)
    assert (w.flops, w.flops_fp8, w.flops_fp4) == (flops, 0, 0)
    assert w.parts[0].dtype == "int4"
    bf16 = SYSTEMS["gpus"][system]["bf16_dense_TFLOPs"] * 1e12
    assert w.time(p.system) >= flops / bf16
    # the lane itself, handed fp4 FLOPs on such a GPU, runs them at the bf16 peak
    assert planner.compute_s(p.system, 0.0, 0.0, 1e15) == 1e15 / bf16


def test_mxfp4_experts_stay_in_the_bf16_lane():
    # mxfp4 (gpt-oss) runs with bf16/mxfp8 activations, never the fp4 peak
    w = planner.expert_work(make_plan(system="b200", expert_dtype="mxfp4"), 4096, 256)
    assert w.flops > 0 and w.flops_fp8 == 0 and w.flops_fp4 == 0
    assert efficiency.dtype_class("mxfp4") == efficiency.dtype_class("int4") == "int4"


def test_nvfp4_reads_fp8_curve_and_says_so():
    assert efficiency.dtype_class("nvfp4", fp4_path=True) == "fp8"
    assert efficiency.dtype_class("nvfp4") == "int4"
    p = make_plan(system="b200", expert_dtype="nvfp4", engine="sglang")
    r = planner.plan_ep(p)
    moe = [s for s in r["efficiency_sources"] if s["op"] == "moe"] if "efficiency_sources" in r else None
    if moe is None:
        moe = [s for s in planner.efficiency_sources(p, r) if s["op"] == "moe"]
    assert moe[0]["dtype"] == "fp8" and "no nvfp4 MoE table" in moe[0]["source"]


@pytest.mark.parametrize("system", ["b200", "gb200", "h100-sxm"])
@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_prediction_at_least_the_bound(system, engine):
    p = make_plan(system=system, expert_dtype="nvfp4", engine=engine, tokens=512, sequences=512)
    w = planner.expert_work(p, 512 * 8, 256) + planner.non_expert_work(p, 512, 1e9, 1e9)
    assert w.predict(p) >= w.time(p.system)


# Ideal plans of Hopper models, and of non-NVFP4 experts on Blackwell, are the same to the last bit
# as without the lane: the step computed with the fp4 lane's inputs cleared equals the plan's.
@pytest.mark.parametrize("model, system, dtype", [
    ("deepseek-r1", "h100-sxm", None), ("deepseek-r1", "h200-sxm", None),
    ("mixtral-8x7b", "h100-sxm", None), ("deepseek-r1", "b200", None), ("deepseek-r1", "b200", "mxfp4")])
def test_unchanged_where_no_fp4_experts(model, system, dtype):
    p = make_plan(model, system, expert_dtype=dtype)
    w = planner.expert_work(p, 64 * p.model.top_k, 64)
    assert w.flops_fp4 == 0
    s = p.system
    old = max(w.flops / s.peak_flops + w.flops_fp8 / s.peak_flops_fp8, w.bytes / s.hbm_bw)
    assert w.time(s) == old  # bit for bit
    # and a (made-up, far higher) fp4 peak leaves their plans as they were, bit for bit
    for engine in ("ideal", "sglang"):
        a = planner.plan_ep(make_plan(model, system, expert_dtype=dtype, engine=engine))
        b = planner.plan_ep(make_plan(model, s.with_(peak_flops_fp4=1e18), expert_dtype=dtype,
                                      engine=engine))
        assert a["feasible"] == b["feasible"] and a.get("step_s") == b.get("step_s")
