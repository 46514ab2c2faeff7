"""The HF config.json reader on a crafted config of each family, and on bad files."""

import json

import pytest

from moelab.costmodel.hf_config import model_from_config, model_from_file
from moelab.costmodel.presets import load_model, model_names
from moelab.costmodel.specs import SpecError

# One crafted config per family: the field names each family uses, small numbers.
FAMILIES = {
    "deepseek_v3": (
        {"model_type": "deepseek_v3", "hidden_size": 64, "moe_intermediate_size": 16,
         "intermediate_size": 128, "num_hidden_layers": 6, "first_k_dense_replace": 2,
         "moe_layer_freq": 1, "n_routed_experts": 16, "n_shared_experts": 1,
         "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "torch_dtype": "bfloat16",
         "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}},
        dict(n_moe_layers=4, n_experts=16, top_k=4, hidden=64, expert_intermediate=16,
             n_shared_experts=1, expert_dtype="fp8", act_dtype="bf16", n_group=4, topk_group=2),
    ),
    "mixtral": (
        {"model_type": "mixtral", "hidden_size": 32, "intermediate_size": 112,
         "num_hidden_layers": 4, "num_local_experts": 8, "num_experts_per_tok": 2,
         "torch_dtype": "bfloat16"},
        dict(n_moe_layers=4, n_experts=8, top_k=2, hidden=32, expert_intermediate=112,
             expert_dtype="bf16"),
    ),
    "qwen2_moe": (  # one wide shared expert, sparse step 2, a dense layer listed
        {"model_type": "qwen2_moe", "hidden_size": 32, "intermediate_size": 256,
         "moe_intermediate_size": 24, "shared_expert_intermediate_size": 96,
         "num_hidden_layers": 8, "num_experts": 12, "num_experts_per_tok": 4,
         "decoder_sparse_step": 2, "mlp_only_layers": [1], "torch_dtype": "float16"},
        dict(n_moe_layers=3, n_experts=12, top_k=4, expert_intermediate=24, n_shared_experts=1,
             shared_intermediate=96, expert_dtype="fp16", act_dtype="fp16"),
    ),
    "qwen3_moe": (
        {"model_type": "qwen3_moe", "hidden_size": 32, "intermediate_size": 96,
         "moe_intermediate_size": 8, "num_hidden_layers": 5, "num_experts": 16,
         "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
         "torch_dtype": "bfloat16"},
        dict(n_moe_layers=5, n_experts=16, top_k=8, expert_intermediate=8),
    ),
    "llama4": (  # text model nested, MoE every second layer
        {"model_type": "llama4", "text_config": {
            "model_type": "llama4_text", "hidden_size": 40, "intermediate_size": 64,
            "intermediate_size_mlp": 128, "num_hidden_layers": 6, "num_local_experts": 16,
            "num_experts_per_tok": 1, "interleave_moe_layer_step": 2,
            "torch_dtype": "bfloat16"}},
        dict(n_moe_layers=3, n_experts=16, top_k=1, hidden=40, expert_intermediate=64,
             n_shared_experts=1),
    ),
    "gpt_oss": (
        {"model_type": "gpt_oss", "hidden_size": 24, "intermediate_size": 24,
         "num_hidden_layers": 3, "num_local_experts": 8, "experts_per_token": 4,
         "num_experts_per_tok": 4, "torch_dtype": "bfloat16",
         "quantization_config": {"quant_method": "mxfp4"}},
        dict(n_moe_layers=3, n_experts=8, top_k=4, expert_dtype="mxfp4"),
    ),
    "glm4_moe": (
        {"model_type": "glm4_moe", "hidden_size": 16, "moe_intermediate_size": 4,
         "intermediate_size": 40, "num_hidden_layers": 5, "first_k_dense_replace": 1,
         "n_routed_experts": 10, "n_shared_experts": 1, "num_experts_per_tok": 3,
         "n_group": 1, "topk_group": 1, "torch_dtype": "bfloat16"},
        dict(n_moe_layers=4, n_experts=10, top_k=3, expert_intermediate=4),
    ),
    "dbrx": (
        {"model_type": "dbrx", "d_model": 48, "n_layers": 3,
         "ffn_config": {"moe_num_experts": 16, "moe_top_k": 4, "ffn_hidden_size": 80},
         "torch_dtype": "bfloat16"},
        dict(n_moe_layers=3, n_experts=16, top_k=4, hidden=48, expert_intermediate=80),
    ),
    "olmoe": (  # a family not named anywhere in the reader: generic field names
        {"model_type": "olmoe", "hidden_size": 16, "intermediate_size": 8,
         "num_hidden_layers": 2, "num_experts": 64, "num_experts_per_tok": 8},
        dict(n_moe_layers=2, n_experts=64, top_k=8, expert_intermediate=8),
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family(family):
    cfg, expected = FAMILIES[family]
    m = model_from_config(cfg, name=family)
    for field, value in expected.items():
        assert getattr(m, field) == value, field
    assert m.expert_params == 3 * m.hidden * m.expert_intermediate


def test_file_round_trip(tmp_path):
    cfg, expected = FAMILIES["deepseek_v3"]
    path = tmp_path / "tiny-v3" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(cfg))
    m = model_from_file(path)
    assert m.name == "tiny-v3" and m.n_experts == expected["n_experts"]
    assert load_model(str(path)) == m


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2}, "not a mixture of experts"),  # dense
        ({"model_type": "x", "num_experts": 0, "hidden_size": 4, "num_hidden_layers": 1,
          "intermediate_size": 4, "num_experts_per_tok": 1}, "not a mixture of experts"),
        ({"num_local_experts": 8, "hidden_size": 64, "num_hidden_layers": 2,
          "intermediate_size": 8}, "experts per token"),  # unknown layout: no top-k
        ({"num_local_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 2,
          "intermediate_size": 8}, "hidden size"),
        ({"num_local_experts": 8, "num_experts_per_tok": "two", "hidden_size": 4,
          "num_hidden_layers": 2, "intermediate_size": 8}, "num_experts_per_tok"),
        ({"num_local_experts": 8, "num_experts_per_tok": 9, "hidden_size": 4,
          "num_hidden_layers": 2, "intermediate_size": 8}, "top_k"),  # k > E
        ([1, 2, 3], "JSON object"),
    ],
)
def test_bad_configs(cfg, message):
    with pytest.raises(SpecError, match=message):
        model_from_config(cfg)


def test_malformed_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"num_local_experts": 8,')
    with pytest.raises(SpecError, match="not valid JSON"):
        model_from_file(path)
    with pytest.raises(SpecError, match="no such file"):
        model_from_file(tmp_path / "missing.json")


def test_unknown_preset():
    with pytest.raises(SpecError, match="unknown preset"):
        load_model("gpt-5")


@pytest.mark.parametrize("name", model_names())
def test_every_model_preset_loads_with_its_source(name):
    m = load_model(name)
    assert m.source, f"{name} has no source"
    assert 1 <= m.top_k <= m.n_experts and m.n_moe_layers <= m.n_layers
