"""Weights and KV cache per token, computed by hand from each config.json and compared.

Every expected value below is written out from the published config's fields (numbers
copied from costmodel/presets/models/<name>.json), not from memory.py's output. The
published totals (671B, 235B, 46.7B, 116.8B parameters) are checked as a second, outside
reference.
"""

import pytest

from moelab.costmodel import memory
from moelab.costmodel.presets import load_model, model_config
from moelab.costmodel.specs import SpecError

FP8, BF16, MXFP4 = 1.0, 2.0, 4.25 / 8


def load(name):
    return model_config(name), load_model(name)


def total_params(name):
    cfg, spec = load(name)
    return sum(g.params for g in memory.param_groups(cfg, spec))


def test_deepseek_r1_weights():
    # hidden 7168, 61 layers of which 3 dense (first_k_dense_replace) and 58 MoE, 256 routed
    # experts of moe_intermediate 2048, 1 shared expert, dense intermediate 18432, vocab 129280,
    # MLA: 128 heads, q_lora 1536, kv_lora 512, qk_nope 128, qk_rope 64, v_head 128.
    # fp8 block quantization: every linear layer fp8; embeddings, lm_head, norms, routers bf16.
    routed = 58 * 256 * (3 * 7168 * 2048)  # 653,909,360,640
    attn_per_layer = (7168 * 1536  # q_a_proj
                      + 1536 * 128 * (128 + 64)  # q_b_proj
                      + 7168 * (512 + 64)  # kv_a_proj_with_mqa
                      + 512 * 128 * (128 + 128)  # kv_b_proj
                      + 128 * 128 * 7168)  # o_proj
    assert attn_per_layer == 187_105_280
    attention = 61 * attn_per_layer
    shared = 58 * 3 * 7168 * 2048
    dense = 3 * 3 * 7168 * 18432
    routers = 58 * (256 * 7168 + 256)  # gate weight + e_score_correction_bias
    embed = lm_head = 129280 * 7168
    norms = 61 * (2 * 7168 + 1536 + 512) + 7168  # 2 RMSNorms, q_a and kv_a norms; final norm
    fp8_params = routed + attention + shared + dense
    bf16_params = routers + embed + lm_head + norms
    cfg, spec = load("deepseek-r1")
    assert total_params("deepseek-r1") == fp8_params + bf16_params
    assert memory.weights_bytes(cfg, spec) == fp8_params * FP8 + bf16_params * BF16
    assert (fp8_params + bf16_params) / 1e9 == pytest.approx(671, abs=0.5)  # published: 671B
    assert memory.expert_weights_bytes(spec) == routed * FP8


def test_deepseek_r1_kv_per_token():
    # MLA caches the compressed KV (512) and the decoupled rope key (64) per layer, 61 layers, bf16.
    cfg, _ = load("deepseek-r1")
    assert memory.kv_bytes_per_token(cfg) == 61 * (512 + 64) * 2 == 70_272
    assert memory.kv_bytes_per_token(cfg, "fp8") == 61 * 576 * 1
    assert memory.kv_bytes(cfg, 4096) == 4096 * 70_272


def test_qwen3_235b():
    # hidden 4096, 94 layers all MoE, 128 experts of 1536, GQA 64 heads / 4 KV heads of 128,
    # q_norm and k_norm (128 each) per layer, vocab 151936, untied, bf16 throughout.
    routed = 94 * 128 * 3 * 4096 * 1536
    attention = 94 * (4096 * 64 * 128 + 2 * 4096 * 4 * 128 + 64 * 128 * 4096)
    routers = 94 * 128 * 4096
    embed = lm_head = 151936 * 4096
    norms = 94 * (2 * 4096 + 2 * 128) + 4096
    total = routed + attention + routers + embed + lm_head + norms
    cfg, spec = load("qwen3-235b-a22b")
    assert total_params("qwen3-235b-a22b") == total
    assert memory.weights_bytes(cfg, spec) == total * BF16
    assert total / 1e9 == pytest.approx(235, abs=0.5)  # published: 235B
    assert memory.kv_bytes_per_token(cfg) == 94 * 2 * 4 * 128 * 2 == 192_512


def test_mixtral_8x7b():
    # hidden 4096, 32 layers, 8 experts of 14336, 32 heads / 8 KV heads of 128, vocab 32000, bf16.
    routed = 32 * 8 * 3 * 4096 * 14336
    attention = 32 * (4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096)
    routers = 32 * 8 * 4096
    embed = lm_head = 32000 * 4096
    norms = 32 * 2 * 4096 + 4096
    total = routed + attention + routers + embed + lm_head + norms
    cfg, spec = load("mixtral-8x7b")
    assert total_params("mixtral-8x7b") == total
    assert memory.weights_bytes(cfg, spec) == total * BF16
    assert total / 1e9 == pytest.approx(46.7, abs=0.05)  # published: 46.7B
    assert memory.kv_bytes_per_token(cfg) == 32 * 2 * 8 * 128 * 2 == 131_072


def test_gpt_oss_120b():
    # hidden 2880, 36 layers, 128 experts of 2880 in MXFP4 (4.25 bits), expert biases bf16
    # (gate_up 2 x 2880, down 2880), 64 heads / 8 KV heads of 64 with q, k, v, o biases and one
    # sink per head, router with bias, vocab 201088, untied; attention, router, embeddings bf16.
    routed = 36 * 128 * 3 * 2880 * 2880
    expert_biases = 36 * 128 * (2 * 2880 + 2880)
    attention = 36 * (2880 * 4096 + 2 * 2880 * 512 + 4096 * 2880)
    small = 36 * (4096 + 512 + 512 + 2880 + 64 + 2 * 2880) + 2880  # biases, sinks, norms; final norm
    routers = 36 * (128 * 2880 + 128)
    embed = unembed = 201088 * 2880
    bf16_params = expert_biases + attention + small + routers + embed + unembed
    cfg, spec = load("gpt-oss-120b")
    assert total_params("gpt-oss-120b") == routed + bf16_params
    assert memory.weights_bytes(cfg, spec) == pytest.approx(routed * MXFP4 + bf16_params * BF16, rel=1e-15)
    assert (routed + bf16_params) / 1e9 == pytest.approx(116.83, abs=0.01)  # published: 116.83B


def test_gpt_oss_sliding_window_kv():
    # 36 layers alternate sliding (window 128) and full attention; 8 KV heads of 64, bf16:
    # 2 * 8 * 64 * 2 = 2048 B per layer and token.
    cfg, _ = load("gpt-oss-120b")
    per_layer = 2 * 8 * 64 * 2
    assert memory.kv_bytes_per_token(cfg) == 36 * per_layer  # no window: every layer
    assert memory.kv_bytes(cfg, 4096) == 18 * per_layer * 4096 + 18 * per_layer * 128
    assert memory.kv_bytes(cfg, 100) == 36 * per_layer * 100  # below the window: all held
    assert memory.kv_bytes_per_token(cfg, context=4096) == pytest.approx(
        (18 * 4096 + 18 * 128) * per_layer / 4096)


def test_llama4_chunked_attention_kv():
    # 48 layers, every 4th global (12), the other 36 chunked at 8192; 8 KV heads of 128, bf16.
    cfg, _ = load("llama4-maverick")
    per_layer = 2 * 8 * 128 * 2
    assert memory.kv_bytes(cfg, 100_000) == 12 * per_layer * 100_000 + 36 * per_layer * 8192
    assert memory.kv_bytes(cfg, 8192) == 48 * per_layer * 8192


def test_bad_kv_inputs():
    cfg, _ = load("mixtral-8x7b")
    with pytest.raises(SpecError, match="kv_dtype"):
        memory.kv_bytes(cfg, 10, "int3")
    with pytest.raises(SpecError, match="context"):
        memory.kv_bytes(cfg, -1)


def test_assumptions_are_named():
    cfg, spec = load("deepseek-r1")
    text = " ".join(memory.assumptions(cfg, spec))
    assert "fp8" in text and "multi-token-prediction" in text and "bf16" in text
