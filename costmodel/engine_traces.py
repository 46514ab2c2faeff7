"""The serving engines' own routing records, read as they are written (docs/traces.md).

Four inputs, each checked against the engine's source (the places are in docs/traces.md):

- an SGLang expert-distribution dump (`/dump_expert_distribution_record`, a torch.save .pt):
  `per_token` mode -> a trace (top-k ids per layer per forward pass); `stat`/`stat_approx`
  (`logical_count`) and `per_pass` (`global_physical_count` per pass) -> a histogram [L, E];
- SGLang's `--enable-return-routed-experts` responses: `meta_info.routed_experts`, base64
  of int32 bytes, shape (tokens - 1, hidden layers, k) -> a trace;
- vLLM's `--enable-return-routed-experts` responses: `choices[i].routed_experts`, base64 of
  an .npy file of shape (tokens - 1, hidden layers, k) -> a trace.

The engines number decoder layers, dense ones included; moelab numbers MoE layers. A layer in
which no expert was ever recorded (all -1 in a per-token dump, all-zero counts, or all-zero
ids in a routed-experts buffer, which the engines zero-fill) is taken as dense and dropped,
and the rest are renumbered 0, 1, ... in order (`dropped_layers` names them).

Every defect is one SpecError naming the file. torch is imported only to read a .pt dump.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

import numpy as np

from moelab.costmodel.specs import SpecError

# A .pt dump of the per-token recorder holds L x tokens x 8 int32 ids (61 layers and 1M tokens
# are ~2 GB); a larger file is refused before torch reads it into memory.
MAX_DUMP_BYTES = 4 * 2**30


def _fail(path, what: str):
    raise SpecError(f"trace import: {path!r}: {what}")


# --- SGLang's expert distribution recorder -----------------------------------------------------


def _load_pt(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        _fail(path, "no such file")
    size = p.stat().st_size
    if size > MAX_DUMP_BYTES:
        _fail(path, f"is {size:,} bytes; the limit is {MAX_DUMP_BYTES:,}")
    import pickle
    import zipfile

    import torch

    try:  # weights_only: plain tensors, lists and dicts only; nothing in the file is run
        raw = torch.load(p, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile, KeyError, IndexError, TypeError, AttributeError) as e:
        # A file that is no pickle reaches the weights-only unpickler as arbitrary opcodes: a
        # text file fails there with KeyError (a memo index), others with Index- or TypeError.
        _fail(path, f"is not a torch.save file torch can read safely ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''})")
    if not isinstance(raw, dict):
        _fail(path, "must hold a dict (SGLang's dump: 'records' or 'logical_count')")
    return raw


def _array(value, path, name: str, ndim: int) -> np.ndarray:
    """A tensor (or nested list) from the dump as an integer numpy array of ndim dimensions."""
    try:
        a = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
    except (TypeError, ValueError, RuntimeError):
        _fail(path, f"{name} is not an integer array")
    if a.ndim != ndim or a.dtype.kind not in "iu":
        _fail(path, f"{name} must be a {ndim}-d integer array, got shape {a.shape} ({a.dtype})")
    return a.astype(np.int64)


def _logical(ids: np.ndarray, phys_to_log: np.ndarray | None, path) -> np.ndarray:
    """ids [L, T, k] physical (-1 allowed) -> logical, through the dump's [L, P] map."""
    if phys_to_log is None:
        return ids
    L, P = phys_to_log.shape
    if ids.shape[0] != L:
        _fail(path, f"last_physical_to_logical_map has {L} layers, the ids {ids.shape[0]}")
    if ids.size and ids.max() >= P:
        _fail(path, f"physical expert id {ids.max()} is outside the map's {P} physical experts")
    out = np.take_along_axis(phys_to_log, np.where(ids < 0, 0, ids).reshape(L, -1), axis=1)
    return np.where(ids < 0, -1, out.reshape(ids.shape))


def _moe_layers(used: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """(kept layer indices, dropped ones) from used [L] booleans."""
    return np.flatnonzero(used), [int(i) for i in np.flatnonzero(~used)]


def sglang_dump(path: str) -> dict:
    """An SGLang recorder dump -> {"mode", "ids" [L, T, k] or "histogram" [L, E],
    "batch_sizes" (per_token), "num_experts" (when the dump tells it), "dropped_layers",
    "logical" (whether ids are logical)}."""
    raw = _load_pt(path)
    if "logical_count" in raw:  # stat / stat_approx: _StatAccumulator.dump
        counts = _array(raw["logical_count"], path, "logical_count", 3)  # [steps, L, E]
        if np.any(counts < 0):
            _fail(path, "logical_count has negative counts")
        h = counts.sum(0)
        keep, dropped = _moe_layers(h.sum(1) > 0)
        if keep.size == 0:
            _fail(path, "logical_count holds no counts (nothing was recorded)")
        return {"mode": "stat", "histogram": h[keep], "num_experts": int(h.shape[1]),
                "dropped_layers": dropped, "logical": True}
    if "records" not in raw:
        _fail(path, "has neither 'records' (per_token, per_pass) nor 'logical_count' (stat)")
    records = raw["records"]
    if not isinstance(records, list) or not records:
        _fail(path, "'records' must be a non-empty list of forward passes")
    m = raw.get("last_physical_to_logical_map")
    phys_to_log = None if m is None else _array(m, path, "last_physical_to_logical_map", 2)
    E = None if phys_to_log is None else int(phys_to_log.max()) + 1
    if not all(isinstance(r, dict) for r in records):
        _fail(path, "every record must be a dict")
    records = sorted(records, key=lambda r: r.get("forward_pass_id", 0))
    if all("topk_ids_of_layer" in r for r in records):  # per_token: _DetailSinglePassGatherer
        passes = [_array(r["topk_ids_of_layer"], path, "topk_ids_of_layer", 3) for r in records]
        passes = [a for a in passes if a.shape[1] > 0]  # idle passes record no tokens
        if not passes:
            _fail(path, "the records hold no tokens")
        if len({(a.shape[0], a.shape[2]) for a in passes}) > 1:
            _fail(path, "records differ in their layer count or id slots")
        ids = np.concatenate(passes, axis=1)  # [L, T, slots]
        if ids.min() < -1:
            _fail(path, f"expert id {ids.min()} is negative (only -1, no expert, is allowed)")
        ids = _logical(ids, phys_to_log, path)
        valid = ids >= 0
        # SGLang writes a token's k ids into the first k of its 8 slots: k is the last slot used
        k = int(np.flatnonzero(valid.any((0, 1)))[-1]) + 1 if valid.any() else 0
        keep, dropped = _moe_layers(valid.any((1, 2)))
        if k == 0:
            _fail(path, "no expert id recorded in any layer")
        return {"mode": "per_token", "ids": ids[keep][..., :k],
                "batch_sizes": [int(a.shape[1]) for a in passes], "num_experts": E,
                "dropped_layers": dropped, "logical": phys_to_log is not None}
    if all("global_physical_count" in r for r in records):  # per_pass
        counts = [_array(r["global_physical_count"], path, "global_physical_count", 2)
                  for r in records]
        if len({c.shape for c in counts}) > 1:
            _fail(path, "records differ in their global_physical_count shape")
        phys = np.sum(counts, axis=0)  # [L, P]
        if np.any(phys < 0):
            _fail(path, "global_physical_count has negative counts")
        if phys_to_log is None:
            h, logical = phys, False
        else:
            if phys_to_log.shape != phys.shape:
                _fail(path, f"last_physical_to_logical_map is {phys_to_log.shape}, the counts "
                            f"{phys.shape}")
            h = np.zeros((phys.shape[0], E), np.int64)
            np.add.at(h, (np.arange(phys.shape[0])[:, None], phys_to_log), phys)
            logical = True
        keep, dropped = _moe_layers(h.sum(1) > 0)
        if keep.size == 0:
            _fail(path, "global_physical_count holds no counts")
        return {"mode": "per_pass", "histogram": h[keep], "num_experts": int(h.shape[1]),
                "dropped_layers": dropped, "logical": logical}
    _fail(path, "records carry neither topk_ids_of_layer (per_token) nor global_physical_count "
                "(per_pass)")


# --- routed experts returned with each response (SGLang, vLLM) ----------------------------------


def _b64(text, path, where: str) -> bytes:
    if not isinstance(text, str):
        _fail(path, f"{where} must be a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        _fail(path, f"{where} is not valid base64")


def _responses(path: str) -> list:
    from moelab.costmodel.jsonfile import read_json_or_lines

    values = read_json_or_lines(path, "trace import")
    if not values or not all(isinstance(v, dict) for v in values):
        _fail(path, "must hold JSON response objects (one, a list, or one per line)")
    return values


def _sglang_one(resp: dict, i: int, path, top_k: int, hidden_layers: int | None) -> np.ndarray:
    meta = resp.get("meta_info") if isinstance(resp.get("meta_info"), dict) else {}
    text = meta.get("routed_experts")
    if text is None and isinstance(resp.get("sglext"), dict):  # the OpenAI-compatible endpoints
        text = resp["sglext"].get("routed_experts")
    if text is None:
        _fail(path, f"response {i} has no meta_info.routed_experts (was the server started with "
                    "--enable-return-routed-experts and the request sent return_routed_experts?)")
    data = _b64(text, path, f"response {i}'s routed_experts")
    if len(data) % 4:
        _fail(path, f"response {i}'s routed_experts is {len(data)} bytes, not whole int32s")
    flat = np.frombuffer(data, dtype="<i4").astype(np.int64)  # SGLang: tensor.numpy().tobytes()
    if hidden_layers is None:
        try:  # the routing of every token but the last sampled one, which was never forwarded
            tokens = int(meta["prompt_tokens"]) + int(meta["completion_tokens"]) - 1
        except (KeyError, TypeError, ValueError):
            _fail(path, f"response {i} lacks meta_info prompt_tokens/completion_tokens: give "
                        "--hidden-layers")
        per_token = flat.size // tokens if tokens > 0 else 0
        if tokens < 1 or per_token * tokens != flat.size or per_token % top_k:
            _fail(path, f"response {i}: {flat.size} ids do not split into {tokens} tokens x "
                        f"layers x k={top_k} (give --hidden-layers if fewer tokens were returned)")
        hidden_layers = per_token // top_k
    if flat.size % (hidden_layers * top_k):
        _fail(path, f"response {i}: {flat.size} ids do not split into tokens x "
                    f"{hidden_layers} layers x k={top_k}")
    return flat.reshape(-1, hidden_layers, top_k)


def _vllm_one(resp: dict, i: int, path) -> list[np.ndarray]:
    choices = resp.get("choices")
    if not isinstance(choices, list) or not choices:
        _fail(path, f"response {i} has no choices")
    out = []
    for j, c in enumerate(choices):
        text = c.get("routed_experts") if isinstance(c, dict) else None
        if text is None:
            _fail(path, f"response {i} choice {j} has no routed_experts (was vLLM started with "
                        "--enable-return-routed-experts?)")
        data = _b64(text, path, f"response {i} choice {j}'s routed_experts")
        try:  # vLLM: np.save of the array, then base64; allow_pickle=False runs nothing
            a = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError):
            _fail(path, f"response {i} choice {j}'s routed_experts is not an .npy array")
        if a.ndim != 3 or a.dtype.kind not in "iu":
            _fail(path, f"response {i} choice {j}'s routed_experts must be integers "
                        f"[tokens, layers, k], got shape {a.shape} ({a.dtype})")
        out.append(a.astype(np.int64))
    return out


def routed_experts(path: str, engine: str, top_k: int | None = None,
                   hidden_layers: int | None = None) -> dict:
    """Responses with routed experts -> {"ids" [L, T, k], "dropped_layers", "requests"}: the
    requests' tokens one after another, in file order."""
    per_request = []
    for i, resp in enumerate(_responses(path)):
        if engine == "sglang":
            if top_k is None or top_k < 1:
                _fail(path, "SGLang's routed experts are flat int32s: give --top-k (the model's "
                            "num_experts_per_tok) to shape them")
            per_request.append(_sglang_one(resp, i, path, top_k, hidden_layers))
        else:
            per_request += _vllm_one(resp, i, path)
    if len({a.shape[1:] for a in per_request}) > 1:
        _fail(path, f"requests differ in layers x k: {sorted({a.shape[1:] for a in per_request})}")
    ids = np.concatenate(per_request).transpose(1, 0, 2)  # [L, T, k]
    if ids.shape[1] == 0:
        _fail(path, "the responses route no tokens")
    if ids.min() < -1:
        _fail(path, f"expert id {ids.min()} is negative")
    # Layers the engine never wrote stay as the buffer's zeros: k zeros per token (a repeated
    # expert, impossible in a real routing when k > 1), or -1 where an engine pads with it.
    untouched = np.all((ids == 0) | (ids == -1), axis=(1, 2))
    keep, dropped = _moe_layers(~untouched)
    if keep.size == 0:
        _fail(path, "every layer's ids are zero: nothing was routed")
    return {"ids": ids[keep], "dropped_layers": dropped, "requests": len(per_request)}
