"""Memory of a deployment, exact from the model's config.json: weights and KV cache.

    weights_bytes      = sum over parameter groups of (parameters x bytes of its stored dtype)
    kv_bytes(context)  = sum over attention layers of min(context, window) x values x f_kv
    MLA (DeepSeek, Kimi):  values = kv_lora_rank + qk_rope_head_dim        per token and layer
    GQA (the rest):        values = 2 x num_key_value_heads x head_dim     per token and layer

What we assume, said once (and returned by `assumptions(cfg)` for the reports):
- Routed experts at the expert dtype (config's quantization, or the override).
- Other linear layers (attention, dense MLPs, shared experts) at the quantized dtype only
  when the quantization is fp8 block quantization (DeepSeek, Kimi ship every linear layer
  in fp8); MXFP4/NVFP4 checkpoints (gpt-oss) quantize only the experts. Layers listed in
  `modules_to_not_convert` stay unquantized.
- Embeddings, lm_head, norms, routers and biases at the config's torch_dtype (bf16 where
  silent). Block scales of fp8 weights (one fp32 per 128x128 block, +0.02%) not counted;
  MXFP4's scales are in its 4.25 bits.
- DeepSeek's multi-token-prediction layer (num_nextn_predict_layers) is not loaded: it
  serves only speculative decoding. Llama 4's vision encoder is not counted (text only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moelab.costmodel.hf_config import TORCH_DTYPES, _flatten
from moelab.costmodel.specs import DTYPE_BYTES, ModelSpec, SpecError, dtype_bytes


@dataclass(frozen=True)
class ParamGroup:
    """Parameters of one kind across the whole model, stored in one dtype."""

    name: str
    params: int
    dtype: str

    @property
    def bytes(self) -> float:
        return self.params * DTYPE_BYTES[self.dtype]


def _get(cfg: dict, *names, default=None):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def base_dtype(cfg: dict) -> str:
    return TORCH_DTYPES.get(str(_get(cfg, "torch_dtype", "dtype", default="bfloat16")), "bf16")


def _linear_dtype(cfg: dict, module: str) -> str:
    """Dtype of a non-expert linear layer: fp8 block quantization covers it, unless excluded."""
    quant = cfg.get("quantization_config")
    if isinstance(quant, dict) and str(quant.get("quant_method", "")).lower() == "fp8":
        skipped = " ".join(str(m) for m in quant.get("modules_to_not_convert") or [])
        if module not in skipped:
            return "fp8"
    return base_dtype(cfg)


def _heads(cfg: dict) -> tuple[int, int, int]:
    """(attention heads, KV heads, head dim)."""
    attn = cfg.get("attn_config") if isinstance(cfg.get("attn_config"), dict) else {}
    d = _get(cfg, "hidden_size", "d_model")
    h = _get(cfg, "num_attention_heads", "n_heads")
    kv = _get(cfg, "num_key_value_heads", default=attn.get("kv_n_heads", h))
    hd = _get(cfg, "head_dim", default=d // h)
    return h, kv, hd


def is_mla(cfg: dict) -> bool:
    return bool(cfg.get("kv_lora_rank"))


def attention_params(cfg: dict) -> tuple[int, int]:
    """(weight matrices, small params: biases, q/k norms, sinks) of ONE attention layer."""
    d = _get(cfg, "hidden_size", "d_model")
    h, kv, hd = _heads(cfg)
    if is_mla(cfg):
        nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
        r_kv, r_q = cfg["kv_lora_rank"], cfg.get("q_lora_rank")
        q = d * r_q + r_q * h * (nope + rope) if r_q else d * h * (nope + rope)
        kv_proj = d * (r_kv + rope) + r_kv * h * (nope + v)
        matrices = q + kv_proj + h * v * d
        small = (r_q or 0) + r_kv  # q_a_layernorm, kv_a_layernorm
        return matrices, small
    matrices = d * h * hd + 2 * d * kv * hd + h * hd * d  # q, k, v, o
    small = 0
    mt = cfg.get("model_type")
    if cfg.get("attention_bias") or mt == "qwen2_moe":
        small += h * hd + 2 * kv * hd  # q, k, v biases
        if mt == "gpt_oss":
            small += d  # gpt-oss also biases o_proj
    if mt == "qwen3_moe":
        small += 2 * hd  # q_norm, k_norm over one head
    if mt == "gpt_oss":
        small += h  # attention sinks, one per head
    return matrices, small


def dense_mlp_layers(cfg: dict, spec: ModelSpec) -> tuple[int, int]:
    """(layers without routed experts, their MLP intermediate size)."""
    n_dense = spec.n_layers - spec.n_moe_layers if spec.n_layers else 0
    width = _get(cfg, "intermediate_size_mlp", "intermediate_size", default=0)
    return n_dense, width


def param_groups(cfg: dict, spec: ModelSpec) -> list[ParamGroup]:
    """Every parameter of the model, grouped by kind and stored dtype (see the module doc)."""
    cfg = _flatten(cfg)
    d, E, L = spec.hidden, spec.n_experts, spec.n_moe_layers
    layers = spec.n_layers or spec.n_moe_layers
    base = base_dtype(cfg)
    mats = 3 if spec.gated else 2
    vocab = _get(cfg, "vocab_size", "padded_vocab_size", default=0)
    attn, attn_small = attention_params(cfg)
    n_dense, dense_width = dense_mlp_layers(cfg, spec)
    router_bias = E if cfg.get("model_type") in ("gpt_oss", "deepseek_v3", "kimi_k2", "glm4_moe") else 0
    groups = [
        ParamGroup("routed experts", L * E * spec.expert_params, spec.expert_dtype),
        ParamGroup("attention", layers * attn, _linear_dtype(cfg, "self_attn")),
        ParamGroup("shared experts", L * mats * d * spec.shared_intermediate, _linear_dtype(cfg, "mlp")),
        ParamGroup("dense MLP layers", n_dense * mats * d * dense_width, _linear_dtype(cfg, "mlp")),
        ParamGroup("routers", L * (E * d + router_bias), base),
        ParamGroup("embeddings", vocab * d, base),
        ParamGroup("lm_head", 0 if cfg.get("tie_word_embeddings") else vocab * d, base),
        # two RMSNorms per layer and the final one, plus attention's small parameters
        ParamGroup("norms and attention biases", layers * (2 * d + attn_small) + d, base),
    ]
    if cfg.get("model_type") == "gpt_oss":  # biases of every expert: gate_up (2I) and down (d)
        groups.append(ParamGroup("expert biases", L * E * (2 * spec.expert_intermediate + d), base))
    if cfg.get("model_type") == "qwen2_moe":  # one sigmoid gate of the shared expert
        groups.append(ParamGroup("shared expert gates", L * d, base))
    return [g for g in groups if g.params]


def weights_bytes(cfg: dict, spec: ModelSpec) -> float:
    return sum(g.bytes for g in param_groups(cfg, spec))


def expert_weights_bytes(spec: ModelSpec) -> float:
    """All routed experts of all MoE layers: L E S_E f_E."""
    return spec.n_moe_layers * spec.n_experts * spec.expert_bytes


def non_expert_weights_bytes(cfg: dict, spec: ModelSpec) -> float:
    """What stays on the GPU under offload and CPU experts: everything but the routed experts."""
    return weights_bytes(cfg, spec) - expert_weights_bytes(spec)


# --- KV cache -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KVLayers:
    """`layers` attention layers storing `values` values per token, at most `window` tokens."""

    layers: int
    values: int
    window: int | None = None

    def tokens_held(self, context: int) -> int:
        return context if self.window is None else min(context, self.window)


def kv_layout(cfg: dict) -> list[KVLayers]:
    """How each attention layer stores its KV cache (see the module doc)."""
    cfg = _flatten(cfg)
    n_layers = _get(cfg, "num_hidden_layers", "n_layers")
    if is_mla(cfg):
        return [KVLayers(n_layers, cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"])]
    _, kv, hd = _heads(cfg)
    values = 2 * kv * hd
    types = cfg.get("layer_types")
    if isinstance(types, list) and cfg.get("sliding_window"):  # gpt-oss: sliding and full alternate
        sliding = sum(1 for t in types if t == "sliding_attention")
        return [KVLayers(len(types) - sliding, values),
                KVLayers(sliding, values, int(cfg["sliding_window"]))]
    if cfg.get("attention_chunk_size"):  # Llama 4: every 4th layer global (NoPE), the rest chunked
        interval = cfg.get("nope_layer_interval") or 4
        global_layers = n_layers // interval
        return [KVLayers(global_layers, values),
                KVLayers(n_layers - global_layers, values, int(cfg["attention_chunk_size"]))]
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", True) is not False:
        return [KVLayers(n_layers, values, int(cfg["sliding_window"]))]  # Mistral-style SWA
    return [KVLayers(n_layers, values)]


def kv_bytes(cfg: dict, context: int, kv_dtype: str = "bf16") -> float:
    """KV cache of ONE sequence of `context` tokens, all layers."""
    if context < 0 or context != int(context):
        raise SpecError(f"context: must be an integer >= 0, got {context!r}")
    f = dtype_bytes(kv_dtype, "kv_dtype")
    return sum(g.layers * g.values * g.tokens_held(int(context)) * f for g in kv_layout(cfg))


def kv_bytes_per_token(cfg: dict, kv_dtype: str = "bf16", context: int | None = None) -> float:
    """KV bytes per token: of a full-attention token (context None), or averaged over a
    sequence of `context` tokens (windowed layers hold at most their window)."""
    if context is None:
        f = dtype_bytes(kv_dtype, "kv_dtype")
        return sum(g.layers * g.values * f for g in kv_layout(cfg))
    return kv_bytes(cfg, context, kv_dtype) / max(context, 1)


def assumptions(cfg: dict, spec: ModelSpec) -> list[str]:
    """The assumptions above that apply to this model, in words."""
    cfg = _flatten(cfg)
    out = [f"routed experts stored in {spec.expert_dtype}"]
    lin = _linear_dtype(cfg, "self_attn")
    out.append(f"attention and other linear layers in {lin}; embeddings, lm_head, norms and "
               f"routers in {base_dtype(cfg)}"
               + ("" if "torch_dtype" in cfg or "dtype" in cfg else " (config silent: bf16 assumed)"))
    if cfg.get("num_nextn_predict_layers"):
        out.append("multi-token-prediction layer not loaded")
    if cfg.get("model_type") in ("llama4", "llama4_text"):
        out.append("vision encoder not counted (text model only)")
    if lin == "fp8":
        out.append("fp8 block scales (+0.02%) not counted")
    return out


def gib(x: float) -> float:
    return x / 2**30


def ceil_div(a: int, b: int) -> int:
    return -(-a // b) if b else math.inf
