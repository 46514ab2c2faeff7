"""Read a Hugging Face `config.json` of any MoE family into a ModelSpec.

Families name the same things differently; each lookup below lists the names it tries,
in order. Presets are stored as their published config.json, so presets and a user's
file go through this one reader.
"""

from __future__ import annotations

from pathlib import Path

from moelab.costmodel.jsonfile import read_json
from moelab.costmodel.specs import MAX_EXPERTS, MAX_LAYERS, MAX_TOKENS, MAX_WIDTH, ModelSpec, SpecError

EXPERTS = ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts")
TOP_K = ("num_experts_per_tok", "experts_per_token", "moe_top_k", "num_experts_per_token")
HIDDEN = ("hidden_size", "d_model", "n_embd")
LAYERS = ("num_hidden_layers", "n_layers", "num_layers")
# Expert width: the MoE-specific field wins over the dense one where both exist.
EXPERT_INTERMEDIATE = ("moe_intermediate_size", "ffn_hidden_size", "intermediate_size")

TORCH_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "half": "fp16",
                "float": "fp32"}
QUANT_METHODS = {"fp8": "fp8", "mxfp4": "mxfp4", "nvfp4": "nvfp4", "modelopt_fp4": "nvfp4"}


def _flatten(cfg: dict) -> dict:
    """One flat view: Llama 4 keeps the text model in text_config, DBRX its MoE in ffn_config."""
    flat = dict(cfg)
    for nested in ("text_config", "ffn_config"):
        sub = cfg.get(nested)
        if isinstance(sub, dict):
            flat.update({k: v for k, v in sub.items() if k not in flat or flat[k] is None})
    return flat


# The most of each count the config may hold (costmodel/specs.py says why), checked here
# under the field's own name before anything loops over it.
LIMITS = {"routed experts": (MAX_EXPERTS, "the most moelab allocates per layer"),
          "layer count": (MAX_LAYERS, "the most layers moelab loops over")}


def _int(name: str, value, what: str, limit: int | None = None, why: str = "the limit") -> int:
    """`value` of config field `name` as a count >= 0 and <= limit, or one SpecError line."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"config.json: {name} ({what}) must be an integer, got {value!r:.60}")
    if value < 0:
        raise SpecError(f"config.json: {name} ({what}) must be >= 0, got {value}")
    limit, why = LIMITS.get(what, (limit or MAX_WIDTH, why))
    if value > limit:
        raise SpecError(f"config.json: {name} ({what}) {value} > {limit:,}, {why}")
    return value


# Every count moelab reads from a config (here and in memory.py) -> (what it is, its limit):
# where present and not null, a whole number in [0, limit], checked before anything uses it.
_WIDTH = ("hidden_size", "d_model", "n_embd", "intermediate_size", "moe_intermediate_size",
          "ffn_hidden_size", "intermediate_size_mlp", "shared_expert_intermediate_size",
          "num_attention_heads", "n_heads", "num_key_value_heads", "head_dim", "kv_lora_rank",
          "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "vocab_size",
          "padded_vocab_size")
COUNT_FIELDS = {
    **{n: ("width", MAX_WIDTH, "the widest moelab computes exactly") for n in _WIDTH},
    **{n: ("layer count", MAX_LAYERS, "the most layers moelab loops over")
       for n in (*LAYERS, "first_k_dense_replace", "moe_layer_freq", "decoder_sparse_step",
                 "interleave_moe_layer_step", "num_nextn_predict_layers", "nope_layer_interval")},
    **{n: ("experts", MAX_EXPERTS, "the most moelab allocates per layer")
       for n in (*TOP_K, "n_shared_experts", "n_group", "topk_group")},
    **{n: ("routed experts", MAX_EXPERTS, "the most moelab allocates per layer") for n in EXPERTS},
    **{n: ("tokens", MAX_TOKENS, "the most tokens moelab counts exactly")
       for n in ("sliding_window", "attention_chunk_size")},
}


def check_fields(flat: dict) -> None:
    """Each count of COUNT_FIELDS in `flat` (a flattened config) is a whole number in range."""
    for name, (what, limit, why) in COUNT_FIELDS.items():
        if flat.get(name) is not None:
            _int(name, flat[name], what, limit, why)


def check_memory_fields(cfg: dict) -> None:
    """What memory.py needs besides the counts: attention heads to count the attention
    weights, and an MLA config's head dims."""
    flat = _flatten(cfg)
    check_fields(flat)
    if not (flat.get("num_attention_heads") or flat.get("n_heads")):
        raise SpecError("config.json: no attention heads (num_attention_heads >= 1): the memory "
                        "count needs them")
    if flat.get("kv_lora_rank"):
        for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if flat.get(name) is None:
                raise SpecError(f"config.json: an MLA config (kv_lora_rank) needs {name}")


def _opt(cfg: dict, name: str, what: str, default: int = 0, limit: int | None = None) -> int:
    """An optional count: `default` where absent, null or 0."""
    value = cfg.get(name)
    return _int(name, value, what, limit) if value else default


def _first(cfg: dict, names: tuple[str, ...], what: str, required: bool = True):
    for name in names:
        value = cfg.get(name)
        if value is not None:
            return _int(name, value, what)
    if required:
        raise SpecError(f"config.json: no {what} (looked for {', '.join(names)})")
    return None


def _moe_layer_count(cfg: dict, n_layers: int) -> int:
    """Layers with routed experts, from whichever layout field the family uses."""
    if isinstance(cfg.get("moe_layers"), list):  # an explicit list (some Llama 4 configs)
        return len(cfg["moe_layers"])
    layers = range(n_layers)  # n_layers <= MAX_LAYERS: checked by _first
    if cfg.get("first_k_dense_replace") is not None:  # DeepSeek, Kimi, GLM-4.5
        first = _int("first_k_dense_replace", cfg["first_k_dense_replace"], "dense layers first")
        freq = _opt(cfg, "moe_layer_freq", "MoE layer every", 1)
        return sum(1 for i in layers if i >= first and i % freq == 0)
    if cfg.get("decoder_sparse_step") is not None or cfg.get("mlp_only_layers"):  # Qwen MoE
        step = _opt(cfg, "decoder_sparse_step", "MoE layer every", 1)
        dense = cfg.get("mlp_only_layers") or []
        if not isinstance(dense, list) or not all(isinstance(i, int) for i in dense):
            raise SpecError(f"config.json: mlp_only_layers must be a list of layer numbers, got "
                            f"{dense!r:.60}")
        dense = set(dense)
        return sum(1 for i in layers if i not in dense and (i + 1) % step == 0)
    if cfg.get("interleave_moe_layer_step") is not None:  # Llama 4
        step = _opt(cfg, "interleave_moe_layer_step", "MoE layer every", 1)
        return sum(1 for i in layers if (i + 1) % step == 0)
    return n_layers


def _expert_dtype(cfg: dict, act_dtype: str) -> str:
    quant = cfg.get("quantization_config")
    if isinstance(quant, dict):
        method = str(quant.get("quant_method", "")).lower()
        if method in QUANT_METHODS:
            return QUANT_METHODS[method]
        if quant.get("fmt") in ("e4m3", "float8_e4m3fn"):
            return "fp8"
    return act_dtype


def model_from_config(cfg, name: str = "config.json", source: str = "") -> ModelSpec:
    """ModelSpec from a parsed config.json; SpecError for dense models and unknown layouts."""
    if not isinstance(cfg, dict):
        raise SpecError(f"config.json: expected a JSON object, got {type(cfg).__name__}")
    flat = _flatten(cfg)
    check_fields(flat)
    n_experts = _first(flat, EXPERTS, "routed experts", required=False)
    if not n_experts:
        model_type = flat.get("model_type", "unknown model_type")
        raise SpecError(
            f"config.json: {model_type} is not a mixture of experts: no routed experts "
            f"(looked for {', '.join(EXPERTS)})"
        )
    hidden = _first(flat, HIDDEN, "hidden size")
    n_layers = _first(flat, LAYERS, "layer count")
    intermediate = _first(flat, EXPERT_INTERMEDIATE, "expert intermediate size")
    act_dtype = TORCH_DTYPES.get(str(flat.get("torch_dtype") or flat.get("dtype") or "bfloat16"),
                                 "bf16")
    n_shared = _opt(flat, "n_shared_experts", "shared experts", limit=MAX_EXPERTS)
    shared_intermediate = n_shared * intermediate
    if flat.get("shared_expert_intermediate_size"):  # qwen2_moe: one wide shared expert
        n_shared = 1
        shared_intermediate = _opt(flat, "shared_expert_intermediate_size", "shared expert width")
    elif flat.get("model_type") in ("llama4", "llama4_text"):  # one shared expert per MoE layer
        n_shared, shared_intermediate = 1, intermediate
    return ModelSpec(
        name=name,
        n_moe_layers=_moe_layer_count(flat, n_layers),
        n_experts=n_experts,
        top_k=_first(flat, TOP_K, "experts per token"),
        hidden=hidden,
        expert_intermediate=intermediate,
        n_layers=n_layers,
        n_shared_experts=n_shared,
        shared_intermediate=shared_intermediate,
        expert_dtype=_expert_dtype(flat, act_dtype),
        act_dtype=act_dtype,
        n_group=_opt(flat, "n_group", "expert groups", 1, limit=MAX_EXPERTS),
        topk_group=_opt(flat, "topk_group", "groups per token", 1, limit=MAX_EXPERTS),
        **_attention_fields(flat, hidden, n_layers),
        source=source or str(cfg.get("_moelab_source", "")),
    )


def _attention_fields(flat: dict, hidden: int, n_layers: int) -> dict:
    """Attention shape (GQA or MLA) and the dense layers' MLP width, for T_B; 0 where absent."""
    def num(name):
        v = flat.get(name)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0

    heads = num("num_attention_heads") or num("n_heads")
    out = {"n_heads": heads, "n_kv_heads": num("num_key_value_heads") or heads,
           "head_dim": num("head_dim") or (hidden // heads if heads else 0)}
    for f in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        out[f] = num(f)
    # Dense layers (those without routed experts) use the dense MLP width.
    out["dense_intermediate"] = num("intermediate_size_mlp") or num("intermediate_size")
    return out


def load_config(path: str | Path) -> dict:
    """The parsed config.json; a missing, huge, non-UTF-8, truncated or too deeply nested
    file is one SpecError line (costmodel/jsonfile.py)."""
    return read_json(path, "config.json")


def model_from_file(path: str | Path) -> ModelSpec:
    path = Path(path)
    cfg = load_config(path)
    return model_from_config(cfg, name=model_name(cfg, path), source=f"file {path}")


def model_name(cfg, path: Path) -> str:
    """What to call a model read from a file: its `_name_or_path` (the HF repo id, as
    transformers saves it) if set; else the folder of a `config.json`; else the file's stem."""
    if isinstance(cfg, dict) and isinstance(cfg.get("_name_or_path"), str) and cfg["_name_or_path"].strip():
        return cfg["_name_or_path"].strip().rstrip("/")
    if path.name == "config.json":
        return path.resolve().parent.name or path.stem
    return path.stem
