"""The preset data files: every model config and system entry is valid and matches its source.

These tests read the JSON files directly (not through the loader), so a wrong figure in a
data file is caught even if the loader reads the same wrong field.
"""

import json
from pathlib import Path

import pytest

PRESETS = Path(__file__).resolve().parent.parent / "costmodel" / "presets"
MODELS = PRESETS / "models"

# Key figures written out by hand from each model's published config.json (docs/sources.md).
# name: (hidden d, routed experts E, top-k k, expert intermediate I, layers, MoE layers, shared)
FACTS = {
    "deepseek-v3": (7168, 256, 8, 2048, 61, 58, 1),
    "deepseek-r1": (7168, 256, 8, 2048, 61, 58, 1),
    "kimi-k2": (7168, 384, 8, 2048, 61, 60, 1),
    "mixtral-8x7b": (4096, 8, 2, 14336, 32, 32, 0),
    "mixtral-8x22b": (6144, 8, 2, 16384, 56, 56, 0),
    "qwen3-235b-a22b": (4096, 128, 8, 1536, 94, 94, 0),
    "qwen3-30b-a3b": (2048, 128, 8, 768, 48, 48, 0),
    "qwen1.5-moe-a2.7b": (2048, 60, 4, 1408, 24, 24, 1),  # shared expert 5632 wide
    "llama4-maverick": (5120, 128, 1, 8192, 48, 24, 1),  # interleave_moe_layer_step 2
    "llama4-scout": (5120, 16, 1, 8192, 48, 48, 1),
    "gpt-oss-120b": (2880, 128, 4, 2880, 36, 36, 0),
    "gpt-oss-20b": (2880, 32, 4, 2880, 24, 24, 0),
    "glm-4.5": (5120, 160, 8, 1536, 92, 89, 1),
    "dbrx": (6144, 16, 4, 10752, 40, 40, 0),
    "olmoe-1b-7b": (2048, 64, 8, 1024, 16, 16, 0),
}

# Expert weight storage each file must declare (the published checkpoints' dtypes).
EXPERT_QUANT = {
    "deepseek-v3": "fp8",
    "deepseek-r1": "fp8",
    "kimi-k2": "fp8",
    "gpt-oss-120b": "mxfp4",
    "gpt-oss-20b": "mxfp4",
}


def _load(name):
    return json.loads((MODELS / f"{name}.json").read_text())


def _figures(cfg):
    """(d, E, k, I, layers, MoE layers, shared) read with each family's own field names."""
    mt = cfg["model_type"]
    if mt == "llama4":
        t = cfg["text_config"]
        step = t["interleave_moe_layer_step"]
        n = t["num_hidden_layers"]
        # Llama 4: layer i holds experts when (i + 1) % step == 0; one shared expert each.
        moe = sum((i + 1) % step == 0 for i in range(n))
        return (t["hidden_size"], t["num_local_experts"], t["num_experts_per_tok"],
                t["intermediate_size"], n, moe, 1)
    if mt == "dbrx":
        f = cfg["ffn_config"]
        return (cfg["d_model"], f["moe_num_experts"], f["moe_top_k"], f["ffn_hidden_size"],
                cfg["n_layers"], cfg["n_layers"], 0)
    n = cfg["num_hidden_layers"]
    if mt in ("deepseek_v3", "kimi_k2", "glm4_moe"):
        assert cfg.get("moe_layer_freq", 1) == 1
        return (cfg["hidden_size"], cfg["n_routed_experts"], cfg["num_experts_per_tok"],
                cfg["moe_intermediate_size"], n, n - cfg["first_k_dense_replace"],
                cfg["n_shared_experts"])
    if mt in ("qwen3_moe", "qwen2_moe"):
        step, dense = cfg["decoder_sparse_step"], set(cfg.get("mlp_only_layers", []))
        moe = sum(i not in dense and (i + 1) % step == 0 for i in range(n))
        shared = 1 if cfg.get("shared_expert_intermediate_size", 0) > 0 else 0
        return (cfg["hidden_size"], cfg["num_experts"], cfg["num_experts_per_tok"],
                cfg["moe_intermediate_size"], n, moe, shared)
    if mt == "olmoe":  # every layer routed, experts as wide as intermediate_size
        return (cfg["hidden_size"], cfg["num_experts"], cfg["num_experts_per_tok"],
                cfg["intermediate_size"], n, n, 0)
    if mt in ("mixtral", "gpt_oss"):
        return (cfg["hidden_size"], cfg["num_local_experts"], cfg["num_experts_per_tok"],
                cfg["intermediate_size"], n, n, 0)
    raise AssertionError(f"no field map for model_type {mt!r}")


def test_every_listed_preset_has_a_file_and_no_file_is_unlisted():
    assert {p.stem for p in MODELS.glob("*.json")} == set(FACTS)


@pytest.mark.parametrize("name", sorted(FACTS))
def test_model_config_parses_and_names_its_source(name):
    cfg = _load(name)
    assert isinstance(cfg.get("_moelab_source"), str) and len(cfg["_moelab_source"]) > 20
    # A config, not a wrapper: the HF identity fields are at the top level.
    assert isinstance(cfg["model_type"], str)
    assert isinstance(cfg["architectures"], list) and cfg["architectures"]
    extra = [k for k in cfg if k.startswith("_") and k != "_moelab_source"]
    assert extra == []


@pytest.mark.parametrize("name", sorted(FACTS))
def test_model_key_figures_match_facts(name):
    assert _figures(_load(name)) == FACTS[name]


@pytest.mark.parametrize("name", sorted(FACTS))
def test_expert_storage_dtype_is_declared(name):
    cfg = _load(name)
    quant = cfg.get("quantization_config", {}).get("quant_method")
    assert quant == EXPERT_QUANT.get(name)
    if quant is None:  # unquantized experts: the checkpoint dtype says bf16
        dtype = cfg.get("torch_dtype") or cfg["text_config"]["torch_dtype"]
        assert dtype == "bfloat16"


def test_deepseek_routing_groups_and_fp8_blocks():
    for name in ("deepseek-v3", "deepseek-r1"):
        cfg = _load(name)
        assert (cfg["n_group"], cfg["topk_group"]) == (8, 4)
        assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    assert (_load("kimi-k2")["n_group"], _load("kimi-k2")["topk_group"]) == (1, 1)


# ---- systems.json ----------------------------------------------------------------------

SYSTEMS = json.loads((PRESETS / "systems.json").read_text())
LINKS = [("host_links", n) for n in SYSTEMS["host_links"]] + [
    ("networks", n) for n in SYSTEMS["networks"]
]


def test_systems_has_the_required_entries():
    assert {"pcie-gen4-x16", "pcie-gen5-x16", "pcie-gen6-x16", "nvlink-c2c"} <= set(
        SYSTEMS["host_links"])
    assert {"ib-hdr-200", "ib-ndr-400", "ib-xdr-800", "roce-100g", "nvlink4", "nvlink5"} <= set(
        SYSTEMS["networks"])
    assert {"h100-sxm", "h200-sxm", "b200", "gb200", "gh200"} <= set(SYSTEMS["gpus"])


@pytest.mark.parametrize("section,name", LINKS)
def test_link_entry_is_sourced_and_positive(section, name):
    e = SYSTEMS[section][name]
    assert {"description", "bandwidth_GBps", "measured_GBps", "latency_us", "source"} <= set(e) <= {
        "description", "bandwidth_GBps", "measured_GBps", "latency_us", "source", "latency_kind",
        "latency_source"}
    if e["latency_us"] is not None:  # a latency says whether it is published or fitted, and where from
        assert e["latency_kind"] in ("published", "fitted") and e["latency_source"].strip()
    assert e["source"].strip() and e["description"].strip()
    assert e["bandwidth_GBps"] > 0
    for key in ("measured_GBps", "latency_us"):
        assert e[key] is None or e[key] > 0
    # A measurement above the line rate means a unit or direction mix-up.
    if e["measured_GBps"] is not None:
        assert e["measured_GBps"] <= e["bandwidth_GBps"]


GPU_KEYS = {"description", "hbm_GB", "hbm_TBps", "bf16_dense_TFLOPs", "fp8_dense_TFLOPs",
            "fp4_dense_TFLOPs", "gpus_per_node", "host_link", "network", "scale_up", "source"}
# Cards without an fp8 (Ampere) or fp4 (Ampere, Ada, Hopper) tensor path: null, not a number.
NO_FP8 = {"rtx-3090", "rtx-a5000", "rtx-a6000", "a100-pcie", "a100-sxm"}
HAS_FP4 = {"b200", "gb200", "rtx-5090", "rtx-pro-6000"}
GEFORCE = {"rtx-3090", "rtx-4090", "rtx-5090"}


@pytest.mark.parametrize("name", sorted(SYSTEMS["gpus"]))
def test_gpu_entry_is_sourced_and_its_links_exist(name):
    g = SYSTEMS["gpus"][name]
    assert set(g) == GPU_KEYS
    assert g["source"].strip() and g["description"].strip()
    for key in ("hbm_GB", "hbm_TBps", "bf16_dense_TFLOPs"):
        assert g[key] > 0
    assert (g["fp8_dense_TFLOPs"] is None) == (name in NO_FP8)
    assert (g["fp4_dense_TFLOPs"] is None) == (name not in HAS_FP4)
    # Each lower precision runs at twice the rate of the one above on every listed card
    # (datasheets round: 989 / 1979, 362.05 / 733, 503.8 / 1010 / 2020).
    if g["fp8_dense_TFLOPs"] is not None:
        assert g["fp8_dense_TFLOPs"] == pytest.approx(2 * g["bf16_dense_TFLOPs"], rel=0.02)
    if g["fp4_dense_TFLOPs"] is not None:
        # GeForce halves fp8 with fp32 accumulate but not fp4 (5090: 3,352 sparse fp4, 1,676.8 fp8).
        factor = 4 if name in GEFORCE else 2
        assert g["fp4_dense_TFLOPs"] == pytest.approx(factor * g["fp8_dense_TFLOPs"], rel=0.02)
    assert isinstance(g["gpus_per_node"], int) and g["gpus_per_node"] >= 1
    assert g["host_link"] in SYSTEMS["host_links"]
    assert g["network"] in SYSTEMS["networks"]
    # Scale-up is NVLink where the card has it, else the PCIe link's own peer-to-peer path.
    up = g["scale_up"]
    assert up in SYSTEMS["networks"]
    assert up.startswith("nvlink") or up == g["host_link"].replace("-x16", "-p2p")
    # A cited spec-sheet figure says so, so that the efficiency model applies to it.
    seeded = {"h100-sxm", "h200-sxm", "h800-sxm", "b200", "gb200", "gh200"}  # datasheet figures
    assert "spec sheet" in g["source"] or name in seeded


def test_new_gpu_presets_are_listed():
    assert {"rtx-3090", "rtx-4090", "rtx-5090", "rtx-a5000", "rtx-a6000", "rtx-6000-ada", "rtx-pro-6000",
            "l4", "l20", "l40s", "a100-pcie", "a100-sxm", "h100-pcie", "h20"} <= set(SYSTEMS["gpus"])


def test_gpu_figures_match_their_sources_by_hand():
    gpus, links, nets = SYSTEMS["gpus"], SYSTEMS["host_links"], SYSTEMS["networks"]
    # GDDR bandwidth = bus width [bit] x data rate [Gb/s] / 8, from the cited bus and pin rates.
    assert gpus["rtx-4090"]["hbm_TBps"] * 1000 == pytest.approx(384 * 21 / 8)    # 1,008 GB/s
    assert gpus["rtx-3090"]["hbm_TBps"] * 1000 == pytest.approx(384 * 19.5 / 8)  # 936 GB/s
    assert gpus["rtx-5090"]["hbm_TBps"] * 1000 == pytest.approx(512 * 28 / 8)    # 1,792 GB/s
    assert gpus["rtx-pro-6000"]["hbm_TBps"] * 1000 == pytest.approx(512 * 28 / 8)
    assert gpus["l40s"]["hbm_TBps"] * 1000 == pytest.approx(384 * 18 / 8)        # 864 GB/s
    assert gpus["rtx-a6000"]["hbm_TBps"] * 1000 == pytest.approx(384 * 16 / 8)   # 768 GB/s
    # Dense = the datasheet's with-sparsity figure halved.
    assert gpus["h100-pcie"]["bf16_dense_TFLOPs"] == pytest.approx(1513 / 2)
    assert gpus["h100-pcie"]["fp8_dense_TFLOPs"] == pytest.approx(3026 / 2)
    assert gpus["l4"]["fp8_dense_TFLOPs"] == pytest.approx(485 / 2)
    assert gpus["rtx-5090"]["fp4_dense_TFLOPs"] == pytest.approx(3352 / 2)
    # GeForce: the fp32-accumulate rate, half the fp16-accumulate one (4090: 330.3 -> 165.2).
    assert gpus["rtx-4090"]["bf16_dense_TFLOPs"] == pytest.approx(330.3 / 2, abs=0.1)
    assert gpus["rtx-5090"]["bf16_dense_TFLOPs"] == pytest.approx(838.4 / 2 / 2)
    # GA102 NVLink bridge: four links x 14.0625 GB/s each way.
    assert nets["nvlink3-bridge-ga102"]["bandwidth_GBps"] == pytest.approx(4 * 14.0625)
    # A100 NVLink 3: 12 links x 50 GB/s bidirectional, per direction half of 600.
    assert nets["nvlink3"]["bandwidth_GBps"] == pytest.approx(12 * 50 / 2)
    # The PCIe peer-to-peer paths carry the host link's own rate.
    assert nets["pcie-gen4-p2p"]["bandwidth_GBps"] == links["pcie-gen4-x16"]["bandwidth_GBps"]
    assert nets["pcie-gen5-p2p"]["bandwidth_GBps"] == links["pcie-gen5-x16"]["bandwidth_GBps"]
    # Ethernet line rates: Gb/s / 8.
    assert nets["ethernet-10g"]["bandwidth_GBps"] == pytest.approx(10 / 8)
    assert nets["ethernet-25g"]["bandwidth_GBps"] == pytest.approx(25 / 8)
    # No NVLink on the 4090, 5090, L-series and Ada/Blackwell workstation cards.
    for name in ("rtx-4090", "rtx-5090", "l4", "l20", "l40s", "rtx-6000-ada", "rtx-pro-6000"):
        assert not gpus[name]["scale_up"].startswith("nvlink")


def test_seed_system_figures_are_exact():
    # The seed's worked example: H100 + PCIe Gen5 + IB NDR, B_pcie = 64 GB/s, B_net = 50 GB/s.
    h100 = SYSTEMS["gpus"]["h100-sxm"]
    assert SYSTEMS["host_links"][h100["host_link"]]["bandwidth_GBps"] == 64
    assert SYSTEMS["networks"][h100["network"]]["bandwidth_GBps"] == 50


# ---- cpus.json -------------------------------------------------------------------------

CPUS = json.loads((PRESETS / "cpus.json").read_text())
CPU_KEYS = {"description", "sockets", "cores", "base_GHz", "dram_channels", "dram_MTps",
            "dram_measured_GBps", "source", "ops_per_core_cycle"}
NEW_CPUS = {"ryzen-9-7950x", "ryzen-9-9950x", "core-i9-14900k", "core-ultra-9-285k",
            "threadripper-pro-7995wx", "epyc-9355", "epyc-9355-2s", "epyc-9965", "epyc-9965-2s",
            "xeon-w9-3495x"}
ISAS = ("amx", "avx512", "avx2", "sve2")  # best first


@pytest.mark.parametrize("name", sorted(NEW_CPUS))
def test_new_cpu_entry_is_complete(name):
    c = CPUS["cpus"][name]
    assert set(c) == CPU_KEYS
    assert c["source"].strip() and c["description"].strip() and "spec sheet" in c["source"]
    for key in ("sockets", "cores", "dram_channels", "dram_MTps"):
        assert isinstance(c[key], int) and c[key] > 0
    assert c["base_GHz"] > 0
    isas = list(c["ops_per_core_cycle"])
    assert isas and set(isas) <= set(ISAS)
    assert isas == sorted(isas, key=ISAS.index)  # best first: plan's default
    for isa, rates in c["ops_per_core_cycle"].items():
        # An int8 dot product does twice a bf16 dot product's work; AVX2 has no bf16 dot
        # product (bf16 widened to fp32 FMAs), so there int8 is 4x.
        assert rates["int8"] == (4 if isa == "avx2" else 2) * rates["bf16"]


def test_cpu_figures_match_their_sources_by_hand():
    cpus = CPUS["cpus"]

    def dram_GBps(name):  # channels x MT/s x 8 B per 64-bit channel transfer
        c = cpus[name]
        return c["dram_channels"] * c["dram_MTps"] * 8 / 1000

    assert dram_GBps("ryzen-9-9950x") == pytest.approx(89.6)      # dual-channel DDR5-5600
    assert dram_GBps("ryzen-9-7950x") == pytest.approx(83.2)      # dual-channel DDR5-5200
    assert dram_GBps("core-ultra-9-285k") == pytest.approx(102.4)  # dual-channel DDR5-6400
    assert dram_GBps("xeon-w9-3495x") == pytest.approx(307.2)     # sweclockers: 307.2 GB/s
    assert dram_GBps("epyc-9965") == pytest.approx(614.4)         # '单路带宽 614GB/s'
    # Desktop Intel parts: AVX2 only, P-cores counted; 2 FMA x 8 fp32 lanes x 2 FLOP; VNNI 2 x 64 ops.
    for name in ("core-i9-14900k", "core-ultra-9-285k"):
        assert cpus[name]["ops_per_core_cycle"] == {"avx2": {"bf16": 2 * 8 * 2, "int8": 2 * 64}}
        assert cpus[name]["cores"] == 8
    # Zen 4 double-pumps 512-bit: half of Zen 5's full-width rate.
    assert cpus["ryzen-9-7950x"]["ops_per_core_cycle"]["avx512"]["bf16"] * 2 == \
        cpus["ryzen-9-9950x"]["ops_per_core_cycle"]["avx512"]["bf16"]
    assert "amx" in cpus["xeon-w9-3495x"]["ops_per_core_cycle"]
    # The two-socket variants are the one-socket part twice.
    for one in ("epyc-9355", "epyc-9965"):
        a, b = cpus[one], cpus[one + "-2s"]
        assert (a["sockets"], b["sockets"]) == (1, 2)
        assert {k: v for k, v in a.items() if k not in ("sockets", "description")} == \
            {k: v for k, v in b.items() if k not in ("sockets", "description")}
