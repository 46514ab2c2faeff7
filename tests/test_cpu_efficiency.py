"""The CPU side of `moelab plan` under an engine's achieved figures (costmodel/predict/cpu.json).

Expected values are computed here by hand from the published raw figures and the model's
shapes (DeepSeek-V3/R1: 58 MoE layers, top-8 of 256 experts of 3 x 7168 x 2048 weights).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

import moelab
from moelab.costmodel import plan as planner
from moelab.costmodel.predict import cpu
from moelab.costmodel.presets import PRESETS, load_cpu, load_model

L, K, S = 58, 8, 3 * 7168 * 2048  # DeepSeek-V3/R1 routed experts
INT4 = 4.5 / 8  # llama.cpp Q4_0 block: 4.5 bits per weight
SYNC = 26.11e-6 + 9.02e-6  # device-to-host round trip + launch (minimind PR #837)
XEON_SOCKET = 8 * 4800e6 * 8  # Xeon Gold 6454S: 8 channels of DDR5-4800
EPYC_SOCKET = 12 * 4800e6 * 8  # EPYC 9654: 12 channels of DDR5-4800


def implied_fraction(tokens_per_s: float, nominal: float) -> float:
    """DRAM fraction a batch-1 decode implies: routed int4 bytes per token over its time less syncs."""
    return L * K * S * INT4 / (1 / tokens_per_s - L * SYNC) / nominal


KT_FRACTION = (implied_fraction(8.73, XEON_SOCKET) + implied_fraction(14, EPYC_SOCKET)) / 2


def test_every_efficiency_is_at_most_one():
    t = cpu.table()
    seen = 0
    for engine, by_isa in t["matmul"].items():
        for isa, by_dtype in by_isa.items():
            for dtype in by_dtype:
                eff, _ = cpu.matmul_efficiency(engine, isa, dtype)
                assert 0 < eff <= 1, (engine, isa, dtype)
                seen += 1
    for engine in t["dram"]:
        frac, _ = cpu.dram_fraction(engine, planner.CPU_DTYPE_BYTES)
        assert 0 < frac <= 1, engine
    for engine in t["numa"]:
        for sockets in (2, 4):
            scale, _ = cpu.numa_scale(engine, sockets)
            assert 0 < scale / sockets <= 1, (engine, sockets)
    assert seen >= 4


def test_every_figure_names_a_source_with_its_place():
    t = cpu.table()
    figures = [f for by_isa in t["matmul"].values() for d in by_isa.values() for f in d.values()]
    figures += [pt for pts in t["dram"].values() for pt in pts] + list(t["numa"].values()) + [t["sync"]]
    for f in figures:
        if f.get("achieved_ops", 0) is None:  # a figure not found says so
            assert "no source found" in f["note"]
            continue
        assert f["source"] in t["sources"] and f["how"], f
    for s in t["sources"].values():
        assert s["cite"] and s["place"]


def test_peaks_read_by_path_agree_with_the_presets():
    for name, isa, sockets in (("xeon-gold-6454s", "amx", 2), ("epyc-9654", "avx512", 1)):
        spec = load_cpu(name, isa, sockets)
        for dtype, flops in spec.matmul_flops.items():
            assert cpu.peak_ops(name, sockets, isa, dtype) == pytest.approx(flops, rel=1e-12)
        assert cpu.nominal_dram_per_socket(name) * sockets == pytest.approx(spec.dram_bw, rel=1e-12)


def test_factors_by_hand():
    # AMX int8: 35 TOPS over 64 cores x 2.2 GHz x 2048 ops per cycle
    eff, _ = cpu.matmul_efficiency("ktransformers", "amx", "int8")
    assert eff == pytest.approx(35e12 / (64 * 2.2e9 * 2048), rel=1e-12)
    # llamafile AVX-512 (KTransformers before v0.3): 91 tokens/s x 2 x L k S over 64 x 2.2 GHz x 256
    eff, _ = cpu.matmul_efficiency("ktransformers", "avx512", "int8")
    assert eff == pytest.approx(91 * 2 * L * K * S / (64 * 2.2e9 * 256), rel=1e-12)
    frac, _ = cpu.dram_fraction("ktransformers", planner.CPU_DTYPE_BYTES)
    assert frac == pytest.approx(KT_FRACTION, rel=1e-12)
    assert cpu.sync_per_layer()[0] == pytest.approx(SYNC, rel=1e-12)


def test_numa_scaling_for_two_sockets_by_hand():
    assert cpu.numa_scale("ktransformers", 1)[0] == 1.0
    assert cpu.numa_scale("ktransformers", 2)[0] == pytest.approx(12.208 / 8.73, rel=1e-12)
    assert cpu.numa_scale("llama.cpp", 2)[0] == pytest.approx(4 / 8, rel=1e-12)
    # llama.cpp's one dual-socket decode point, per socket through its NUMA scaling (0.5 of one)
    frac, _ = cpu.dram_fraction("llama.cpp", planner.CPU_DTYPE_BYTES)
    assert frac == pytest.approx(implied_fraction(4.51, XEON_SOCKET * 0.5), rel=1e-12)


def test_an_engine_without_cpu_data_gets_the_default_engines_figures():
    assert cpu.engine_key("sglang") == cpu.table()["default"]["engine"] == "ktransformers"
    assert cpu.engine_key("llama.cpp") == "llama.cpp"


def test_leaving_a_source_out_falls_back_and_says_so():
    with cpu.leaving_out("ktransformers-v3"):
        scale, note = cpu.numa_scale("ktransformers", 2)
        frac, _ = cpu.dram_fraction("ktransformers", planner.CPU_DTYPE_BYTES)
    assert scale == 2.0 and "linearly" in note
    assert frac == pytest.approx(implied_fraction(14, EPYC_SOCKET), rel=1e-12)
    assert cpu.numa_scale("ktransformers", 2)[0] == pytest.approx(12.208 / 8.73)  # restored


def plan_decode(engine: str, sockets: int = 2) -> dict:
    r = moelab.plan("deepseek-v3", "h100-sxm", gpus=1, gpus_per_node=1, decode_batch=1, context=500,
                    cpu="xeon-gold-6454s", cpu_isa="avx512", cpu_sockets=sockets, host_mem=1e12,
                    cpu_expert_dtype="int4", engine=engine)
    return next(s for s in r.strategies if s["name"] == "cpu-experts")


def test_engine_ideal_is_the_roofline_by_hand():
    s = plan_decode("ideal")
    dram = 2 * XEON_SOCKET  # nominal, both sockets (no measured figure in the preset)
    avx512 = 2 * 32 * 2.2e9 * 256  # int8 ops/s
    per_layer = max(K * S * INT4 / dram, 2 * 1 * K * S / avx512)  # batch 1: 8 experts used
    assert s["terms"]["cpu_s"] == pytest.approx(L * per_layer, rel=1e-9)
    # two transfers of one token's bf16 activations over the measured Gen5 host link, no latency
    assert s["terms"]["link_s"] == pytest.approx(L * 2 * 7168 * 2 / 35.2e9, rel=1e-9)
    assert "cpu_efficiency" not in s
    assert planner.Plan.__dataclass_fields__["engine"].default == "ideal"  # the default is the roofline


def test_an_engine_charges_achieved_dram_numa_and_sync_by_hand():
    s = plan_decode("ktransformers")
    bw = XEON_SOCKET * KT_FRACTION * 12.208 / 8.73  # one socket's achieved x the NUMA scaling
    assert s["terms"]["cpu_s"] == pytest.approx(L * K * S * INT4 / bw, rel=1e-9)
    assert s["terms"]["link_s"] == pytest.approx(L * (2 * 7168 * 2 / 35.2e9 + SYNC), rel=1e-9)
    one = plan_decode("ktransformers", sockets=1)
    assert s["terms"]["cpu_s"] / one["terms"]["cpu_s"] == pytest.approx(8.73 / 12.208, rel=1e-9)
    assert s["cpu_efficiency"]["sources"]["numa"] == ["ktransformers-v3"]


def test_a_measured_dram_figure_takes_precedence():
    # the measured figure replaces nominal x fraction x NUMA
    c = load_cpu("xeon-gold-6454s", "avx512", 2)
    measured = replace(c, dram_bw_measured=400e9)
    r = moelab.plan("deepseek-v3", "h100-sxm", gpus=1, gpus_per_node=1, decode_batch=1, context=500,
                    cpu=measured, host_mem=1e12, cpu_expert_dtype="int4", engine="ktransformers")
    s = next(x for x in r.strategies if x["name"] == "cpu-experts")
    assert s["terms"]["cpu_s"] == pytest.approx(L * K * S * INT4 / 400e9, rel=1e-9)


def test_qwen3_30b_on_one_h100_at_decode_batch_1_stays_on_the_gpu():
    for engine in ("ktransformers", "sglang"):
        r = moelab.plan("qwen3-30b-a3b", gpus=1, decode_batch=1, engine=engine)
        by = {s["name"]: s for s in r.strategies}
        assert r.best != "hybrid", engine
        # the winner keeps every expert on the GPU: nothing streams, nothing runs on the CPU
        best = by[r.best]
        assert best.get("misses_per_layer", 0) == 0 and best.get("cpu_used_per_layer", 0) == 0
        # a hybrid with experts on the CPU pays 48 syncs per token and loses to all-on-GPU
        assert by["hybrid"]["gpu_experts_per_layer"] == 128
    # the roofline (no sync) would have sent experts to the CPU: the sync is what decides
    ideal = moelab.plan("qwen3-30b-a3b", gpus=1, decode_batch=1, engine="ideal")
    assert ideal.best == "hybrid"
    # and the default engine (the best supported for the H100) keeps it on the GPU too
    assert moelab.plan("qwen3-30b-a3b", gpus=1, decode_batch=1).best != "hybrid"


@pytest.fixture(scope="module")
def pub():
    return json.loads((PRESETS / "published.json").read_text())


def test_ktransformers_v03_amx_prefill_within_25_percent_out_of_sample(pub):
    # The done-when rows: DeepSeek-V3 prefill, 2 x Xeon Gold 6454S, AMX int8, RTX 4090D, 1K-8K
    # prompts, each predicted without any figure of its own source (the KTransformers tutorial).
    rows = [r for r in pub["end_to_end"]["rows"] if r["name"].startswith("KTransformers V0.3 prefill")]
    assert len(rows) == 4
    for row in rows:
        args = row["predictor"]["plan"]
        assert (args["system"], args["engine"], args["cpu_isa"], args["prefill_attention"]) == \
            ("rtx-4090d", "ktransformers", "amx", "eager")
        with cpu.leaving_out(row["source"]):
            s = next(x for x in moelab.plan(**args).strategies if x["name"] == "cpu-experts")
        assert abs(s["tokens_per_s"] / row["measured"] - 1) <= 0.25, row["name"]
        assert s["bound_step_s"] <= s["step_s"]
    args = rows[0]["predictor"]["plan"]
    ideal = moelab.plan(**{**args, "engine": "ideal"})
    roof = next(x for x in ideal.strategies if x["name"] == "cpu-experts")
    assert roof["tokens_per_s"] / rows[0]["measured"] > 2  # the roofline's 3x, for contrast


def kt_prefill(engine: str, attention: str, n: int = 1000) -> dict:
    r = moelab.plan("deepseek-v3", "rtx-4090d", gpus=1, gpus_per_node=1, tokens=n, context=n,
                    cpu="xeon-gold-6454s", cpu_isa="amx", host_mem=1e12, cpu_expert_dtype="int8",
                    engine=engine, prefill_attention=attention)
    return next(x for x in r.strategies if x["name"] == "cpu-experts")


def test_eager_prefill_attention_by_hand():
    # DeepSeek-V3: 61 layers, 128 heads, absorbed MLA width 512 + 64. Eager attention computes
    # every query-key pair of the prompt (4 x heads x width FLOPs per pair: scores and weighted
    # sum) and keeps the scores in HBM: per head and pair the two score matmuls write 2 + 2 B,
    # their sum reads 4 and writes 2, the scaling 2 + 2, the mask 2 + 2, the fp32 softmax reads 2
    # and writes 4, the cast back 4 + 2, the PV product reads 2: 32 B.
    n, layers, heads = 1000, 61, 128
    sysd = json.loads((PRESETS / "systems.json").read_text())["gpus"]["rtx-4090d"]
    peak, hbm = sysd["bf16_dense_TFLOPs"] * 1e12, sysd["hbm_TBps"] * 1e12
    flops = 4 * heads * (512 + 64) * n * n * layers
    expect = flops / peak + layers * heads * n * n * 32 / hbm
    eager = kt_prefill("ideal", "eager", n)
    assert eager["terms"]["eager_attention_s"] == pytest.approx(expect, rel=1e-9)
    fused = kt_prefill("ideal", "fused", n)
    assert "eager_attention_s" not in fused["terms"]
    # the fused step counts the causal half of the pairs inside compute_s; eager replaces it
    causal = 4 * heads * (512 + 64) * (n - n / 2) * n * layers / peak
    assert fused["terms"]["compute_s"] - eager["terms"]["compute_s"] == pytest.approx(causal, rel=1e-6)
    with pytest.raises(moelab.SpecError, match="prefill_attention: unknown 'lazy'"):
        kt_prefill("ideal", "lazy")


def test_amx_kernel_reads_dram_then_multiplies_by_hand():
    # KTransformers' AMX rate is a kernel's on cached blocks (doc/en/AMX.md): DRAM time + matrix
    # time per layer. 1000 tokens x 8 experts over 256: every expert used.
    n = 1000
    a = cpu.achieved("ktransformers", "amx", "int8", 2, planner.CPU_DTYPE_BYTES)
    assert a.serial_dram
    assert not cpu.achieved("ktransformers", "avx512", "int8", 2, planner.CPU_DTYPE_BYTES).serial_dram
    with cpu.leaving_out("kt-amx"):
        assert not cpu.achieved("ktransformers", "amx", "int8", 2, planner.CPU_DTYPE_BYTES).serial_dram
    c = load_cpu("xeon-gold-6454s", "amx", 2)
    dram = 2 * XEON_SOCKET * a.dram_fraction * a.numa_scale / 2
    amx = 35e12  # the kernel's published int8 rate (its efficiency x the peak)
    used = 256 * (1 - (1 - 8 / 256) ** n)  # experts a uniform routing touches
    q8 = 34 / 32  # Q8_0 block: 32 int8 weights and a 2-byte scale
    per_layer = used * S * q8 / dram + 2 * n * K * S / amx
    s = kt_prefill("ktransformers", "fused", n)
    assert c.matmul_flops["int8"] * a.matmul_efficiency == pytest.approx(amx, rel=1e-9)
    assert s["terms"]["cpu_s"] == pytest.approx(L * per_layer, rel=1e-6)
    # the roofline takes the longer of the two
    ideal = kt_prefill("ideal", "fused", n)
    roof = max(used * S * q8 / (2 * XEON_SOCKET), 2 * n * K * S / c.matmul_flops["int8"])
    assert ideal["terms"]["cpu_s"] == pytest.approx(L * roof, rel=1e-6)


def test_cpu_expert_rows_take_no_figure_from_their_own_source(pub):
    from moelab.experiments import exp_validation as ev

    spec = {**pub, "end_to_end": {"rows": [r for r in pub["end_to_end"]["rows"]
                                           if r["kind"] == "e2e-cpu-experts"]}}
    rows = ev.end_to_end_rows(spec, plan=moelab.plan)
    named = set(pub["sources"]) | set(cpu.table()["sources"])
    for r in rows:
        assert r["status"] == "predicted" and r["roofline"] > r["predicted"] > 0, r["name"]
        for factor, srcs in r["cpu_efficiency"]["sources"].items():
            assert r["source"] not in srcs, (r["name"], factor)
        for name, src in r["inputs"].items():
            assert src != r["source"] and (src in named or src.startswith("leave-one-source-out fit")), \
                (r["name"], name, src)


def test_layerwise_gpu_prefill_is_an_option_of_long_prefills_only():
    def hybrid(tokens, engine):
        r = moelab.plan("deepseek-r1", gpus=1, tokens=tokens, engine=engine)
        return next(s for s in r.strategies if s["name"] == "hybrid")

    long = hybrid(32768, "ktransformers")
    # the layerwise path streams every used expert not resident, layer by layer, at the host link
    assert long["reason"].startswith("layerwise GPU prefill") and long["terms"]["cpu_s"] == 0
    m = load_model("deepseek-r1")
    r = long["gpu_experts_per_layer"]
    # 32768 tokens use every expert: E - r stream per layer, each S_E fp8 bytes at 35.2 GB/s (Gen5)
    assert long["terms"]["stream_s"] == pytest.approx(L * (256 - r) * m.expert_bytes / 35.2e9, rel=1e-6)
    assert "layerwise" not in hybrid(32768, "ideal")["reason"]  # the roofline keeps today's strategies
    assert "layerwise" not in hybrid(1024, "ktransformers")["reason"]  # the CPU is faster here
