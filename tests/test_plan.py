"""`moelab plan`: feasibility where the arithmetic flips, lower bounds, monotonicity, gamma agreement."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import moelab
from moelab.cli import main
from moelab.costmodel import memory
from moelab.costmodel import plan as planner
from moelab.costmodel.presets import load_cpu, load_model, load_system, model_config
from moelab.costmodel.specs import SpecError

DONE_WHEN = ["plan", "--model", "deepseek-r1", "--system", "h100-sxm", "--gpus", "8",
             "--decode-batch", "64", "--context", "4096"]
TOP_KEYS = {"model", "weights_bytes", "kv_bytes_per_token", "strategies", "best"}
STRATEGY_KEYS = {"name", "feasible", "reason", "gpus", "step_s", "tokens_per_s",
                 "tokens_per_s_per_gpu", "memory", "bound"}


def make_plan(model="deepseek-r1", system="h100-sxm", **kw):
    spec = load_model(model)
    args = dict(model=spec, cfg=model_config(model), system=load_system(system, latencies=True),
                cpu=load_cpu("xeon-8470"), gpus=8, gpus_per_node=8, tokens=64, sequences=64,
                context=4096, decode=True,
                routing=planner.make_routing("uniform", spec.n_moe_layers, spec.n_experts, spec.top_k),
                host_mem=2e12)
    args.update(kw)
    return planner.Plan(**args)


def by_name(result):
    return {s["name"]: s for s in result["strategies"]}


# --- the command -----------------------------------------------------------------------


def test_done_when_command(capsys):
    assert main([*DONE_WHEN, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= TOP_KEYS
    assert {s["name"] for s in out["strategies"]} == set(planner.STRATEGIES)
    for s in out["strategies"]:
        assert set(s) >= STRATEGY_KEYS
    ep = by_name(out)["ep"]
    assert not ep["feasible"] and "does not fit" in ep["reason"] and "80.0 GB" in ep["reason"]
    assert ep["step_s"] is None and ep["tokens_per_s"] is None  # never a slow number
    assert ep["memory"]["gpu_each"]["needed"] > ep["memory"]["gpu_each"]["available"]
    feasible = [s for s in out["strategies"] if s["feasible"]]
    assert feasible and out["best"] == feasible[0]["name"]
    rates = [s["tokens_per_s_per_gpu"] for s in feasible]
    assert rates == sorted(rates, reverse=True)
    assert out["strategies"][-1]["name"] == "ep"  # infeasible ranks last


def test_done_when_without_jax():
    # What keeps `moelab plan` quick is that it imports none of jax, triton or torch (a
    # wall-clock bound here would fail on a loaded machine, and prove nothing on an idle one).
    probe = ("import sys; from moelab.cli import main; "
             f"main({DONE_WHEN!r}); "
             "sys.stderr.write(repr([m for m in ('jax', 'triton', 'torch') if m in sys.modules]))")
    ok = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert eval(ok.stderr.strip().splitlines()[-1]) == []
    assert "does not fit" in ok.stdout and "best:" in ok.stdout


@pytest.mark.parametrize("argv, flag", [
    (["--tokens", "0"], "--tokens"),
    (["--gpus", "0"], "--gpus"),
    (["--decode-batch", "8", "--tokens", "8"], "--tokens"),
    (["--routing", "zipf:x"], "--routing"),
    (["--cpu", "pentium"], "--cpu"),
    (["--slo-ms", "-1"], "--slo-ms"),
    (["--kv-dtype", "int3"], "--kv-dtype"),
    (["--host-mem-gb", "0"], "--host-mem-gb"),
])
def test_bad_input_one_line_exit_2(capsys, argv, flag):
    try:
        code = main(["plan", *argv])
    except SystemExit as e:  # argparse's own errors (a bad choice) exit from inside parsing
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]


def test_api_exposes_plan():
    r = moelab.plan("mixtral-8x7b", "h100-sxm", gpus=2, decode_batch=16, context=2048)
    assert r.best in planner.STRATEGIES and set(r) >= TOP_KEYS
    json.loads(r.to_json())


@pytest.mark.parametrize("engine", ["vllm", "sglang", "llama.cpp"])
def test_emit_prints_flags_or_says_why(capsys, engine):
    assert main([*DONE_WHEN, "--emit", engine]) == 0
    out = capsys.readouterr().out
    assert f"{engine}:" in out


def test_emit_flags_per_strategy():
    from moelab.engines import launch_flags

    r = moelab.plan("deepseek-r1", "h200-sxm", gpus=8, decode_batch=64, context=4096)
    flags, _ = launch_flags(r, "vllm", "ep")
    assert "--enable-expert-parallel" in flags
    flags, _ = launch_flags(r, "sglang", "ep")
    assert "--ep-size 8" in flags
    flags, _ = launch_flags(r, "vllm", "tp")
    assert "--enable-expert-parallel" not in flags
    flags, _ = launch_flags(r, "sglang", "tp")
    assert "--tp-size 8" in flags and not any(f.startswith("--ep-size") for f in flags)
    flags, note = launch_flags(r, "llama.cpp", "ep")
    assert flags == [] and "no expert parallelism" in note
    flags, _ = launch_flags(r, "llama.cpp", "offload")
    assert "--cpu-moe" in flags and any(f.startswith("--moe-cache-mib") for f in flags)
    flags, note = launch_flags(r, "vllm", "cpu-experts")
    assert flags == [] and "cannot" in note
    flags, _ = launch_flags(r, "llama.cpp", "cpu-experts")
    assert "--cpu-moe" in flags


def test_emit_two_batch_overlap_only_with_micro_batches_2():
    from moelab.engines import launch_flags

    kw = dict(gpus=8, decode_batch=64, context=4096)
    serial = moelab.plan("deepseek-r1", "h200-sxm", **kw)
    tbo = moelab.plan("deepseek-r1", "h200-sxm", micro_batches=2, **kw)
    assert "--enable-two-batch-overlap" not in launch_flags(serial, "sglang", "ep")[0]
    assert "--enable-two-batch-overlap" in launch_flags(tbo, "sglang", "ep")[0]
    assert "--enable-dbo" not in launch_flags(serial, "vllm", "ep")[0]
    ep = next(s for s in tbo["strategies"] if s["name"] == "ep")
    flags, note = launch_flags(tbo, "vllm", "ep")
    # vLLM's DBO runs only with data-parallel attention over more than one GPU (docs/engines.md)
    assert ("--enable-dbo" in flags) == ep["attention"].startswith("data")
    assert "--enable-dbo" in flags or "not emitted" in note


# --- memory: feasibility flips exactly where the arithmetic says ---------------------------


def test_r1_fp8_needs_more_than_8x80_fits_8x141():
    # R1 fp8: 58 MoE layers x 256 experts x 44,040,192 params x 1 B = 653.9 GB of experts;
    # on 8 GPUs, 32 experts per GPU: 58 x 32 x 44,040,192 B = 81.7 GB > 0.9 x 80 GB = 72 GB.
    experts_per_gpu = 58 * 32 * 44_040_192
    assert experts_per_gpu > 0.9 * 80e9
    assert not planner.plan_ep(make_plan(system="h100-sxm"))["feasible"]
    assert planner.plan_ep(make_plan(system="h200-sxm"))["feasible"]


def test_ep_feasibility_flips_at_the_computed_capacity():
    p = make_plan(system="h100-sxm")
    cfg, m = p.cfg, p.model
    experts = 58 * 32 * 44_040_192  # 32 experts per GPU, fp8
    non_expert = memory.weights_bytes(cfg, m) - 58 * 256 * 44_040_192  # all but routed experts
    kv_all = 64 * 4096 * 70_272  # KV of 64 sequences x 4096 tokens
    buffers = 2 * 8 * 8 * 7168 * 2  # all-to-all send + receive: 8 tokens x k=8 x d x bf16
    # Data-parallel attention: weights replicated, each GPU the KV of its 8 sequences.
    need_dp = experts + non_expert + kv_all / 8 + buffers
    # Tensor-parallel attention over the node: weights split 8 ways, MLA's latent KV replicated.
    need_tp = experts + non_expert / 8 + kv_all + buffers
    need = min(need_dp, need_tp)
    for scale, fits in ((1 + 1e-9, True), (1 - 1e-9, False)):
        system = p.system.with_(hbm_bytes=need / 0.9 * scale)
        assert planner.plan_ep(replace(p, system=system))["feasible"] is fits


def test_tensor_parallel_splits_gqa_kv_by_head_only():
    assert planner.kv_head_split(model_config("deepseek-r1"), 8) == 1  # MLA: one latent
    assert planner.kv_head_split(model_config("qwen3-235b-a22b"), 8) == 4  # 4 KV heads
    assert planner.kv_head_split(model_config("mixtral-8x7b"), 8) == 8  # 8 KV heads


def test_offload_infeasible_when_host_cannot_hold_experts():
    p = make_plan(host_mem=600e9)  # R1's experts: 653.9 GB
    r = planner.plan_offload(p)
    assert not r["feasible"] and "host" in r["reason"] and "653.9 GB" in r["reason"]
    # int4 on the CPU: 58 x 256 x 44,040,192 x 4.5/8 B = 367.8 GB fits in 600 GB
    assert planner.plan_cpu_experts(replace(p, cpu_expert_dtype="int4"))["feasible"]
    assert not planner.plan_cpu_experts(replace(p, cpu_expert_dtype="bf16"))["feasible"]


def test_slo_turns_a_slow_plan_infeasible_with_figures():
    r = planner.plan_offload(make_plan(slo_s=1e-3))
    assert not r["feasible"] and "latency budget" in r["reason"] and "1 ms" in r["reason"]


# --- each step time is at least its physical lower bound -------------------------------------

CASES = [("deepseek-r1", "h200-sxm", 64, True), ("qwen3-235b-a22b", "h100-sxm", 4096, False),
         ("mixtral-8x7b", "h100-sxm", 16, True), ("gpt-oss-120b", "h100-sxm", 1, True)]


@pytest.mark.parametrize("model, system, n, decode", CASES)
def test_step_at_least_lower_bound(model, system, n, decode):
    p = make_plan(model, system, tokens=n, sequences=n if decode else 1, decode=decode,
                  context=4096 if decode else n)
    m, sy = p.model, p.system
    L, E, k, S = m.n_moe_layers, m.n_experts, m.top_k, m.expert_params
    res = by_name(planner.plan_all(p))
    peak = sy.peak_flops_fp8 if m.expert_dtype == "fp8" else sy.peak_flops
    ep = res["ep"]
    if ep["feasible"]:  # every token's k experts: 2 S FLOPs each, all layers, over R GPUs at peak
        assert ep["step_s"] >= 2 * n * k * S * L / (p.gpus * peak)
    off = res["offload"]
    if off["feasible"]:  # used, non-resident experts (uniform: (E - r)(1 - (1 - k/E)^n)) over B_pcie
        g = off["gpus"]
        n_gpu = -(-n // g)
        r = off["resident_per_layer"]
        misses = (E - r) * (1 - (1 - k / E) ** n_gpu)
        assert off["step_s"] >= L * misses * m.expert_bytes / sy.b_pcie * (1 - 1e-12)
    cpu = res["cpu-experts"]
    if cpu["feasible"]:  # the used experts' int8 bytes through the node's DRAM
        n_gpu = -(-n // cpu["gpus"])
        used = E * (1 - (1 - k / E) ** n_gpu)
        dram = load_cpu("xeon-8470").bandwidth(False)
        assert cpu["step_s"] >= L * used * S * (8.5 / 8) / dram * (1 - 1e-12)
    hyb = res["hybrid"]
    if hyb["feasible"]:
        assert hyb["step_s"] >= L * hyb["cpu_used_per_layer"] * S * (8.5 / 8) / dram * (1 - 1e-12)
        assert hyb["step_s"] <= cpu["step_s"] * (1 + 1e-12)  # r = 0 is among the splits tried


# --- more hardware never lowers the best tokens/s per GPU ------------------------------------


@given(model=st.sampled_from(["deepseek-r1", "mixtral-8x7b", "qwen3-30b-a3b", "gpt-oss-120b"]),
       batch=st.sampled_from([1, 8, 64, 512]), gpus=st.sampled_from([1, 8, 16]),
       routing=st.sampled_from(["uniform", "skewed", "worst"]),
       slo=st.sampled_from([None, 0.05, 0.5]),
       hbm=st.floats(1, 3), pcie=st.floats(1, 4), net=st.floats(1, 4), hbm_bw=st.floats(1, 2),
       dram=st.floats(1, 4), cpu_flops=st.floats(1, 4))
def test_more_hardware_never_hurts(model, batch, gpus, routing, slo, hbm, pcie, net, hbm_bw, dram,
                                   cpu_flops):
    spec = load_model(model)
    p = make_plan(model, tokens=batch, sequences=batch, gpus=gpus, slo_s=slo,
                  routing=planner.make_routing(routing, spec.n_moe_layers, spec.n_experts, spec.top_k))
    s, c = p.system, p.cpu
    better = replace(
        p,
        system=s.with_(hbm_bytes=s.hbm_bytes * hbm, b_pcie=s.b_pcie * pcie, b_net=s.b_net * net,
                       hbm_bw=s.hbm_bw * hbm_bw),
        cpu=replace(c, dram_bw=c.dram_bw * dram,
                    matmul_flops={k: v * cpu_flops for k, v in c.matmul_flops.items()}),
        b_scale_up=p.b_up * net)

    def best(plan):
        r = planner.plan_all(plan)
        return r["strategies"][0]["tokens_per_s_per_gpu"] or 0.0

    assert best(better) >= best(p) * (1 - 1e-9)


# --- plan and gamma agree where their assumptions meet ---------------------------------------


@pytest.mark.parametrize("routing", ["worst", "uniform"])
@pytest.mark.parametrize("gpus, per_node", [(8, 8), (32, 8), (8, 1)])
def test_plan_offload_and_ep_terms_are_gammas(routing, gpus, per_node):
    # plan's EP communication is gamma's T_EP - T_B for the tokens of one rank and the same R
    # ranks in nodes of G (two tiers, busiest rank, latencies); with one GPU per host link and
    # DRAM far faster than the link, plan's offload stream is gamma's T_P - T_B for the same
    # tokens and resident fraction.
    n = 32 * gpus
    # gamma charges the network's alpha_net per collective even inside one node; plan charges
    # NVLink's latency there (none published: 0), so one node differs by exactly L x 2 alpha_net.
    r = moelab.plan("deepseek-r1", "h200-sxm", gpus=gpus, gpus_per_node=per_node, tokens=n,
                    routing=routing, cpu="xeon-6980p", engine="ideal")
    ep = by_name(r)["ep"]
    g_ep = moelab.gamma("deepseek-r1", "h200-sxm", tokens=32, ep_ranks=gpus, routing=routing,
                        gpus_per_node=per_node, measured_links=True, latencies=True)
    one_node = 58 * 2 * 49e-6 if gpus <= per_node else 0.0  # R1: 58 MoE layers; ib-ndr-400: 49 us
    assert ep["ep_comm_s"] == pytest.approx(g_ep["t_ep_overhead_s"] - one_node, rel=1e-12)
    single = moelab.plan("deepseek-r1", "h200-sxm", gpus=1, gpus_per_node=1, tokens=n,
                         routing=routing, cpu="xeon-6980p", engine="ideal")
    off = by_name(single)["offload"]
    g_off = moelab.gamma("deepseek-r1", "h200-sxm", tokens=n, routing=routing,
                         resident_fraction=off["resident_fraction"], measured_links=True,
                         latencies=True)
    assert off["terms"]["stream_s"] == pytest.approx(g_off["t_p_overhead_s"], rel=1e-12)
    # ... and the gamma plan reports is gamma's own number for its pass.
    assert single["gamma"]["t_p_overhead_s"] == pytest.approx(g_off["t_p_overhead_s"], rel=1e-12)
    g_all = moelab.gamma("deepseek-r1", "h200-sxm", tokens=n, routing=routing, ep_ranks=gpus,
                         gpus_per_node=per_node, measured_links=True, latencies=True,
                         resident_fraction=by_name(r)["offload"]["resident_fraction"])
    assert r["gamma"]["gamma"] == pytest.approx(g_all["gamma"], rel=1e-12)


# --- routing --------------------------------------------------------------------------------


def test_skewed_routing_caches_better_than_uniform():
    p = make_plan("mixtral-8x7b", tokens=1, sequences=1)
    uni = planner.plan_offload(p)
    skew = planner.plan_offload(replace(p, routing=planner.make_routing("skewed", 32, 8, 2)))
    assert uni["resident_per_layer"] == skew["resident_per_layer"]
    assert skew["hit_rate"] > uni["hit_rate"]


def test_histogram_routing(tmp_path):
    counts = np.zeros(8)
    counts[:2] = 1.0  # only experts 0 and 1 ever chosen: 2 used per layer whatever the batch
    path = tmp_path / "hist.json"
    path.write_text(json.dumps(counts.tolist()))
    route = planner.make_routing(f"hist:{path}", 32, 8, 2)
    used, missed = route.used(100, 2, 8, resident=2)
    assert used == pytest.approx(2) and missed == pytest.approx(0)
    with pytest.raises(SpecError, match="shape"):
        planner.make_routing(f"hist:{path}", 32, 16, 2)
    with pytest.raises(SpecError, match="no such file"):
        planner.make_routing("hist:/nonexistent.npy", 32, 8, 2)


def test_uniform_used_matches_closed_form():
    from moelab.costmodel.closed_form import n_used_uniform

    route = planner.make_routing("uniform", 58, 256, 8)
    used, _ = route.used(37, 8, 256)
    assert used == pytest.approx(float(n_used_uniform(37, 8, 256)), rel=1e-12)
    worst = planner.make_routing("worst", 58, 256, 8)
    assert worst.used(37, 8, 256) == (256, 256)
    assert worst.used(37, 8, 256, resident=64)[1] == 256 * (1 - 64 / 256)


def test_offload_cache_simulation_lru_and_belady():
    r = moelab.plan("mixtral-8x7b", "h100-sxm", gpus=1, decode_batch=4, routing="skewed",
                    cache_steps=30)
    sim = by_name(r)["offload"]["cache_simulation"]
    assert 0 <= sim["lru_hit_rate"] <= sim["belady_hit_rate"] <= 1  # Belady is the bound
    assert sim["belady_stream_s"] <= sim["lru_stream_s"] * (1 + 1e-12)
    # the trace: 30 passes x 32 layers, each with its used experts
    trace = planner.sample_steps(planner.make_routing("skewed", 32, 8, 2), 32, 8, 2, 4, 30)
    assert len(trace) == 30 * 32 and all(1 <= len(u) <= 8 and len(set(u)) == len(u) for _, u in trace)
    worst = planner.sample_steps(planner.make_routing("worst", 32, 8, 2), 2, 8, 2, 3, 2)
    assert [len(u) for _, u in worst] == [6, 6, 6, 6]
    with pytest.raises(SpecError, match="cache_steps"):
        moelab.plan("mixtral-8x7b", gpus=1, decode_batch=4, cache_steps=-1)


def test_readme_plan_example_is_what_the_command_says(capsys):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- moelab-plan:start -->")[1].split("<!-- moelab-plan:end -->")[0]
    lines = [line for line in block.strip().strip("`").strip().splitlines() if line.strip()]
    assert main(DONE_WHEN) == 0
    out = capsys.readouterr().out
    for line in lines:
        assert line in out


def test_cpu_presets_computed_from_their_parts():
    from moelab.costmodel.presets import cpu_names, cpu_table

    assert {"xeon-6980p", "xeon-8470", "epyc-9755", "epyc-9654", "grace"} <= set(cpu_names())
    for c in cpu_table()["cpus"].values():
        assert c["source"] and c["sockets"] >= 1 and c["cores"] > 0
    # Xeon 6980P: 12 channels x 6400 MT/s x 8 B = 614.4 GB/s per socket, two sockets;
    # AMX 1024 bf16 FLOP per core and cycle x 128 cores x 2.0 GHz = 262.1 TFLOP/s per socket.
    x = load_cpu("xeon-6980p")
    assert x.dram_bw == pytest.approx(2 * 12 * 6400e6 * 8)
    assert x.matmul_flops["bf16"] == pytest.approx(2 * 128 * 2.0e9 * 1024)
    # EPYC 9755: AVX-512 on Zen 5, 256 int8 ops per core and cycle x 128 cores x 2.7 GHz.
    assert load_cpu("epyc-9755").matmul_flops["int8"] == pytest.approx(2 * 128 * 2.7e9 * 256)
    assert load_cpu("grace").dram_bw == pytest.approx(512e9)  # one Grace per GH200
    with pytest.raises(SpecError, match="cpu"):
        load_cpu("pentium")


def test_gold_6454s_peaks_by_isa_and_socket_count():
    # Xeon Gold 6454S (the KTransformers V0.2 host): 32 cores per socket, 2.2 GHz base, 8 x DDR5-4800.
    # DRAM: 8 x 4800e6 x 8 B = 307.2 GB/s per socket, 614.4 GB/s for two.
    # AMX (default, listed first): 32 x 2.2e9 x 2048 = 144.18 T int8 op/s per socket, 288.36 T for two.
    # AVX-512: VPDPBUSD 2 ports x 128 = 256 int8 ops, VDPBF16PS 2 x 64 = 128 bf16 FLOP per core and cycle:
    #   two sockets: 64 x 2.2e9 x 256 = 36.04 T op/s int8, 64 x 2.2e9 x 128 = 18.02 TFLOP/s bf16.
    c = load_cpu("xeon-gold-6454s")
    assert c.isa == "amx" and c.sockets == 2
    assert c.dram_bw == pytest.approx(614.4e9)
    assert c.matmul_flops["int8"] == pytest.approx(288.3584e12)
    v = load_cpu("xeon-gold-6454s", "avx512")
    assert v.matmul_flops == pytest.approx({"int8": 36.0448e12, "bf16": 18.0224e12})
    one = load_cpu("xeon-gold-6454s", "avx512", sockets=1)  # numactl -N 1 -m 1: one socket
    assert one.dram_bw == pytest.approx(307.2e9)
    assert one.matmul_flops["int8"] == pytest.approx(18.0224e12)
    assert load_cpu("epyc-9755").isa == "avx512"
    with pytest.raises(SpecError, match="cpu_isa"):
        load_cpu("epyc-9755", "amx")  # Zen has no AMX
    with pytest.raises(SpecError, match="cpu_sockets"):
        load_cpu("xeon-8470", sockets=0)


def test_cpu_isa_scales_a_matmul_bound_cpu_time_by_the_ratio_of_peaks():
    # A long prefill with DRAM made plentiful, so the CPU matrix units bound the CPU experts under
    # both paths: cpu_s = L x 2 n k S_E / peak, so avx512 / amx = 2048 / 256 = 8 for int8 weights.
    kw = dict(gpus=1, gpus_per_node=1, tokens=8192, cpu="xeon-gold-6454s", host_dram_bw=1e16,
              host_mem=1e12, cpu_expert_dtype="int8", engine="ideal")
    runs = {isa: moelab.plan("deepseek-v3", **kw, cpu_isa=isa) for isa in ("amx", "avx512")}
    cpu = {isa: next(s for s in r["strategies"] if s["name"] == "cpu-experts") for isa, r in runs.items()}
    assert all(c["feasible"] and c["bound"] == "CPU matrix throughput" for c in cpu.values())
    assert cpu["avx512"]["terms"]["cpu_s"] / cpu["amx"]["terms"]["cpu_s"] == pytest.approx(2048 / 256)
    assert runs["avx512"]["host"]["cpu_isa"] == "avx512" and runs["amx"]["host"]["cpu_sockets"] == 2
    # The same figure from its parts: 58 MoE layers x 2 x 8192 tokens x 8 experts x S_E / 36.04 T op/s.
    m = load_model("deepseek-v3")
    assert cpu["avx512"]["terms"]["cpu_s"] == pytest.approx(
        m.n_moe_layers * 2 * 8192 * m.top_k * m.expert_params / 36.0448e12)
    # A CpuSpec carries its own peak: an ISA on top of it is refused.
    with pytest.raises(SpecError, match="cpu_isa"):
        moelab.plan("deepseek-v3", gpus=1, cpu=load_cpu("xeon-8470"), cpu_isa="avx512")


def test_presets_command_lists_cpus(capsys):
    assert main(["presets", "cpus", "--json"]) == 0
    names = [c["name"] for c in json.loads(capsys.readouterr().out)["cpus"]]
    assert "grace" in names


def test_api_takes_a_cpu_spec_and_checks_it():
    mine = planner.CpuSpec("my-host", 2, 400e9, 0.0, {"bf16": 50e12, "int8": 100e12})
    r = moelab.plan("mixtral-8x7b", gpus=1, decode_batch=4, cpu=mine)
    assert r.host["cpu"] == "my-host" and r.host["dram_bw"] == 400e9
    with pytest.raises(SpecError, match="dram_bw"):
        planner.CpuSpec("bad", 2, 0.0, 0.0, {"bf16": 1.0, "int8": 1.0})
    with pytest.raises(SpecError, match="int8"):
        planner.CpuSpec("bad", 2, 1e9, 0.0, {"bf16": 1.0})
    with pytest.raises(SpecError, match="context"):
        moelab.plan("mixtral-8x7b", tokens=4096, context=0)
    # a prefill pass of 4096 tokens of 1024-token prompts holds 4 prompts' KV cache
    r = moelab.plan("mixtral-8x7b", gpus=1, tokens=4096, context=1024)
    assert r.workload["sequences"] == 4
    assert r.kv_bytes_total == 4 * 1024 * 131_072


def test_every_transfer_pays_its_latency():
    p = make_plan("mixtral-8x7b", tokens=4, sequences=4)
    p = replace(p, system=p.system.with_(alpha_pcie=0.0, alpha_net=0.0), alpha_scale_up=0.0)
    alpha = 1e-5
    slow = replace(p, system=p.system.with_(alpha_pcie=alpha, alpha_net=alpha), alpha_scale_up=alpha)
    base, lat = by_name(planner.plan_all(p)), by_name(planner.plan_all(slow))
    # offload: one latency per streamed expert, 32 MoE layers
    off, off_lat = (planner.plan_offload(replace(x, replicas=1)) for x in (p, slow))
    assert off_lat["terms"]["stream_s"] - off["terms"]["stream_s"] == pytest.approx(
        32 * off["misses_per_layer"] * alpha)
    # CPU experts: two host-link transfers per MoE layer
    cpu, cpu_lat = (planner.plan_cpu_experts(replace(x, replicas=1)) for x in (p, slow))
    assert cpu_lat["terms"]["link_s"] - cpu["terms"]["link_s"] == pytest.approx(32 * 2 * alpha)
    # EP: dispatch and combine, one collective latency each per MoE layer
    assert lat["ep"]["ep_comm_s"] - base["ep"]["ep_comm_s"] == pytest.approx(32 * 2 * alpha)
    assert lat["ep"]["terms"]["ep_latency_s"] == pytest.approx(32 * 2 * alpha)


def test_trace_routing_gives_marginals_and_the_recorded_order(tmp_path):
    # A made-up trace (E = 4, k = 2, 2 layers, 4 tokens): layer 0 always picks experts 0 and 1;
    # layer 1 alternates {2, 3} and {0, 3}.
    ids = [[[0, 1]] * 4, [[2, 3], [0, 3], [2, 3], [0, 3]]]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"num_experts": 4, "top_k": 2, "layers": [0, 1], "ids": ids}))
    route = planner.make_routing(f"trace:{path}", 2, 4, 2)
    # layer 0: p = (1/2, 1/2, 0, 0) -> q = min(1, 2 p) = (1, 1, 0, 0)
    assert route.q[0].tolist() == [1.0, 1.0, 0.0, 0.0]
    # layer 1: counts (2, 0, 2, 4) of 8 -> q = (1/2, 0, 1/2, 1)
    assert route.q[1].tolist() == [0.5, 0.0, 0.5, 1.0]
    steps = planner.sample_steps(route, 2, 4, 2, tokens=2, steps=10)
    # 4 recorded tokens in passes of 2: two passes, in order, each layer's union of ids
    assert steps == [(0, [0, 1]), (1, [0, 2, 3]), (0, [0, 1]), (1, [0, 2, 3])]
    with pytest.raises(SpecError, match="E=4, k=2"):
        planner.make_routing(f"trace:{path}", 2, 8, 2)
    with pytest.raises(SpecError, match="layers"):
        planner.make_routing(f"trace:{path}", 1, 4, 2)
    # its histogram also reads as hist: (counts under the key "histogram")
    path.write_text(json.dumps({"histogram": [[4, 4, 0, 0], [2, 0, 2, 4]]}))
    assert planner.make_routing(f"hist:{path}", 2, 4, 2).q.tolist() == route.q.tolist()


@pytest.mark.parametrize("model", moelab.model_names())
def test_every_preset_plans(model):
    r = moelab.plan(model, "h200-sxm", gpus=8, decode_batch=32, context=2048)
    assert r.weights_bytes > 0 and r.kv_bytes_per_token > 0
    for s in r.strategies:
        assert set(s) >= STRATEGY_KEYS
        if s["feasible"]:
            assert s["step_s"] > 0 and s["tokens_per_s_per_gpu"] > 0
            assert s["memory"]["gpu_each"]["needed"] <= s["memory"]["gpu_each"]["available"]
        else:
            assert s["step_s"] is None and s["reason"]
    json.loads(r.to_json())


def test_docs_state_plans_signature():
    import inspect
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "plan.md").read_text()
    block = text.split("    moelab.plan(", 1)[1].split(")\n", 1)[0]
    documented = dict(re.findall(r"(\w+)=([^,\s]+)", block))
    params = inspect.signature(moelab.plan).parameters
    assert list(documented) == list(params)
    for name, value in documented.items():
        assert eval(value) == params[name].default, name
