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


@pytest.mark.parametrize("name", sorted(SYSTEMS["gpus"]))
def test_gpu_entry_is_sourced_and_its_links_exist(name):
    g = SYSTEMS["gpus"][name]
    assert g["source"].strip() and g["description"].strip()
    for key in ("hbm_GB", "hbm_TBps", "bf16_dense_TFLOPs", "fp8_dense_TFLOPs"):
        assert g[key] > 0
    # fp8 runs at twice the bf16 rate on Hopper and Blackwell (datasheets round: 989 / 1979).
    assert g["fp8_dense_TFLOPs"] == pytest.approx(2 * g["bf16_dense_TFLOPs"], rel=1e-3)
    assert isinstance(g["gpus_per_node"], int) and g["gpus_per_node"] >= 1
    assert g["host_link"] in SYSTEMS["host_links"]
    assert g["network"] in SYSTEMS["networks"]
    assert g["scale_up"].startswith("nvlink") and g["scale_up"] in SYSTEMS["networks"]


def test_seed_system_figures_are_exact():
    # The seed's worked example: H100 + PCIe Gen5 + IB NDR, B_pcie = 64 GB/s, B_net = 50 GB/s.
    h100 = SYSTEMS["gpus"]["h100-sxm"]
    assert SYSTEMS["host_links"][h100["host_link"]]["bandwidth_GBps"] == 64
    assert SYSTEMS["networks"][h100["network"]]["bandwidth_GBps"] == 50
