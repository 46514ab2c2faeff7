"""Block sizes, warps and stages of dispatch and combine: tuned per device, read at run time.

Tuned configs are data: `kernels/tuned/<device-slug>.json` (slug of the CUDA device name,
e.g. `nvidia-h200`), one entry per (op, shape class). A missing file, device or entry
falls back to `DEFAULTS`. The files are written by `kernels/autotune.py`, a tool that runs
the kernels on a GPU; this module only reads them, so the ops never import a benchmark.
Files are validated on load (`validate_configs`): a block size that is not a power of
two would fail deep inside a kernel's compilation, a wrong field silently do nothing.

Shape classes are by tokens per pass (the other dimensions move the optimum little for
these memory-bound kernels): decode batches, small and large prefills.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

from moelab.costmodel.specs import SpecError

TUNED_DIR = Path(__file__).parent / "tuned"

# (upper bound on tokens, class name), ascending
TOKEN_CLASSES = ((64, "decode"), (1024, "small"), (8192, "prefill"), (None, "large"))


@dataclass(frozen=True)
class DispatchConfig:
    block_p: int = 1024  # pairs per routing program (power of two); the sort size
    block_b: int = 32  # block counts per step of the routing's scan (capped at 8K counts)
    block_r: int = 256  # rows per store step of the routing's padding and block fills
    route_warps: int = 8
    block_t: int = 4  # tokens per scatter program
    block_d: int = 1024  # columns per scatter program (fp8: always 128, the scale group)
    num_warps: int = 4
    num_stages: int = 1


@dataclass(frozen=True)
class CombineConfig:
    # one token per program: the k row gathers are unrolled, and 4 tokens x 1024 columns
    # x 8 rows in flight need more than 255 registers (spills, seen with cuobjdump)
    block_t: int = 1
    block_d: int = 1024
    num_warps: int = 4
    num_stages: int = 1


DEFAULTS = {"dispatch": DispatchConfig(), "dispatch_fp8": DispatchConfig(block_t=16),
            "combine": CombineConfig()}  # fmt: skip
# decode: a few tokens, so narrower column tiles give the GPU more programs
DECODE_BLOCK_D = 256


def device_slug(device=None) -> str:
    """'nvidia-h200' for a CUDA device named 'NVIDIA H200'; 'cpu' without CUDA."""
    import torch

    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return "cpu"
    if not torch.cuda.is_available():
        return "cpu"
    index = device.index if device is not None and device.index is not None else None
    return _cuda_slug(torch.cuda.current_device() if index is None else index)


@lru_cache(maxsize=16)
def _cuda_slug(index: int) -> str:
    import torch

    name = torch.cuda.get_device_name(index)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def token_class(n_tokens: int) -> str:
    for bound, name in TOKEN_CLASSES:
        if bound is None or n_tokens <= bound:
            return name
    raise AssertionError("unreachable")


# What a tuned value may be: (power of two required, smallest, largest). tl.arange needs
# powers of two for every block size; warps are powers of two by CUDA's launch rules.
LIMITS = {
    "block_p": (True, 32, 4096), "block_b": (True, 1, 1024), "block_r": (True, 16, 4096),
    "route_warps": (True, 1, 16), "block_t": (True, 1, 256), "block_d": (True, 16, 8192),
    "num_warps": (True, 1, 32), "num_stages": (False, 1, 8),
}  # fmt: skip
CONFIG_CLASSES = {"dispatch": DispatchConfig, "dispatch_fp8": DispatchConfig,
                  "combine": CombineConfig}  # fmt: skip


def _check_value(where: str, value, pow2: bool, lo: int, hi: int) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
    if ok and pow2 and value & (value - 1):
        ok = False
    if not ok:
        want = f"{'a power of two' if pow2 else 'an integer'} in [{lo}, {hi}]"
        raise SpecError(f"{where}: must be {want}, got {value!r}")
    return value


def validate_configs(data, path) -> dict:
    """The `configs` of a tuned file, checked: known ops, shape classes and fields, each
    value in range (powers of two where tl.arange needs them). A bad file gets one
    SpecError naming the file and the field, e.g. `tuned/x.json: configs["dispatch:
    prefill"].block_p: must be a power of two in [32, 4096], got 100`."""
    if not isinstance(data, dict) or not isinstance(data.get("configs", {}), dict):
        raise SpecError(f"{path}: configs: expected an object of 'op:class' entries")
    classes = {name for _, name in TOKEN_CLASSES}
    out = {}
    for key, entry in data.get("configs", {}).items():
        where = f'{path}: configs["{key}"]'
        op, _, cls = str(key).partition(":")
        if op not in CONFIG_CLASSES or cls not in classes:
            raise SpecError(f"{where}: unknown entry (ops {sorted(CONFIG_CLASSES)}, classes "
                            f"{sorted(classes)})")  # fmt: skip
        if not isinstance(entry, dict):
            raise SpecError(f"{where}: expected an object of fields")
        known = {f.name for f in fields(CONFIG_CLASSES[op])}
        for name, value in entry.items():
            if name not in known:
                raise SpecError(f"{where}.{name}: unknown field (known: {', '.join(sorted(known))})")
            _check_value(f"{where}.{name}", value, *LIMITS[name])
        out[key] = dict(entry)
    return out


@lru_cache(maxsize=16)
def _load(slug: str) -> dict:
    path = TUNED_DIR / f"{slug}.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SpecError(f"{path}: not valid JSON ({e})") from None
    return validate_configs(data, path)


def _lookup(op: str, n_tokens: int, device, cls):
    slug = device_slug(device)
    cls_name = token_class(n_tokens)
    entry = _load(slug).get(f"{op}:{cls_name}")
    default = DEFAULTS[op]
    if cls_name == "decode" and op != "dispatch_fp8":
        default = replace(default, block_d=DECODE_BLOCK_D)
    if not entry:
        return default
    return replace(default, **entry)  # fields and values checked on load


def dispatch_config(n_tokens, k, num_experts, d, quantize_fp8, device) -> DispatchConfig:
    """The tuned config of this device for the shape's class. Classes go by the token
    count alone today; k, E and d are in the signature so that a finer table needs no
    change in the launchers."""
    return _lookup("dispatch_fp8" if quantize_fp8 else "dispatch", n_tokens, device, DispatchConfig)


def combine_config(n_tokens, k, d, device) -> CombineConfig:
    return _lookup("combine", n_tokens, device, CombineConfig)
