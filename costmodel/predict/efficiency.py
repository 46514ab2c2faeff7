"""Achieved efficiency per operation class and shape, read from efficiency.json (derived by
derive_efficiency.py from aiconfigurator-core's measured tables) and the engine profiles in
engines/<name>.json. Stdlib json and math only: `moelab plan` stays light.

An op's predicted time is its roofline / efficiency(shape), the curve interpolated in log
shape and clamped at its ends. Where a curve is missing the lookup falls back, and says so:
the GPU's table -> the engine framework's default (median across the table GPUs) -> the
default across all frameworks -> none (efficiency 1, the roofline).
"""

from __future__ import annotations

import bisect
import functools
import json
import math
from pathlib import Path

from moelab.costmodel.predict.profile import ENGINES
from moelab.costmodel.specs import SpecError

HERE = Path(__file__).resolve().parent


@functools.cache
def data() -> dict:
    return json.loads((HERE / "efficiency.json").read_text())


@functools.cache
def engine(name: str) -> dict:
    if name not in ENGINES:
        raise SpecError(f"engine: unknown {name!r} (known: {', '.join(ENGINES)})")
    return json.loads((HERE / "engines" / f"{name}.json").read_text())


@functools.cache
def curve(gpu: str, engine_name: str, cls: str, dtype: str) -> tuple[dict | None, str]:
    """(curve, where it comes from) for one op class and dtype; (None, why) for the roofline."""
    fw = engine(engine_name)["tables"]
    if fw is None:
        return None, "ideal: roofline"
    d = data()
    g = d["gpus"].get(gpu)
    if g is not None and fw != "any":
        c = g["frameworks"].get(fw, {}).get(cls, {}).get(dtype)
        if c is not None:
            return c, f"{gpu} {fw} {cls}[{dtype}]: {c['table']} ({c['used']} rows)"
    tries = ([(fw, f"{fw} default")] if fw != "any" else []) + [("any", "all-framework default")]
    for key, what in tries:
        c = d["defaults"].get(key, {}).get(cls, {}).get(dtype)
        if c is not None:
            why = ("no table of this engine" if fw == "any" else "no table for this GPU" if g is None
                   else f"no {fw} {cls}[{dtype}] table for {gpu}")
            return c, f"{what} {cls}[{dtype}] (median of {c['curves']} table curves; {why})"
    return None, f"no curve for {cls}[{dtype}]: roofline"


def gemm_curve(gpu: str, engine_name: str, dtype: str, nk: float) -> tuple[dict | None, str]:
    """The GEMM curve for weights of nk = N x K elements: the gemm_nk<b> curve of the nearest
    size bin b (even log2, within the bins the tables hold), else the all-shapes gemm curve."""
    if nk > 0:
        b = 2 * round(math.log(nk, 4))
        bins = sorted(int(k[7:]) for k in _gemm_bins(gpu, engine_name, dtype))
        if bins:
            c, why = curve(gpu, engine_name, f"gemm_nk{min(max(b, bins[0]), bins[-1])}", dtype)
            if c is not None:
                return c, why
    return curve(gpu, engine_name, "gemm", dtype)


@functools.cache
def _gemm_bins(gpu: str, engine_name: str, dtype: str) -> tuple:
    """The gemm_nk<b> classes with a curve for this dtype where `curve` would look (the GPU's
    framework table, else the defaults)."""
    fw, d = engine(engine_name)["tables"], data()
    if fw is None:
        return ()
    pools = [d["gpus"].get(gpu, {}).get("frameworks", {}).get(fw, {}) if fw != "any" else {},
             d["defaults"].get(fw, {}), d["defaults"].get("any", {})]
    for pool in pools:
        names = tuple(k for k, v in pool.items() if k.startswith("gemm_nk") and dtype in v)
        if names:
            return names
    return ()


def at(c: dict | None, x: float) -> float:
    """The curve's efficiency at shape x (log-x interpolation, clamped at the ends); 1 if None."""
    if c is None:
        return 1.0
    xs, es = c["x"], c["eff"]
    x = float(x)  # a numpy scalar would make every comparison below slow
    if x <= xs[0]:
        return es[0]
    if x >= xs[-1]:
        return es[-1]
    i = bisect.bisect_left(xs, x)  # xs[i - 1] < x <= xs[i]
    a, b = math.log(xs[i - 1]), math.log(xs[i])
    return es[i - 1] + (es[i] - es[i - 1]) * (math.log(x) - a) / (b - a)


def floor_s(c: dict | None) -> float:
    return 0.0 if c is None else c.get("floor_s", 0.0)


def default_engine(gpu: str) -> tuple[str, str]:
    """(engine, why): the framework whose tables cover the most op classes and dtypes of this
    GPU; a GPU without tables gets the framework with the most default curves."""
    d = data()
    g = d["gpus"].get(gpu)
    pool = g["frameworks"] if g is not None else {k: v for k, v in d["defaults"].items() if k != "any"}

    def count(fw):
        return sum(len(dtypes) for dtypes in pool.get(fw, {}).values())
    best = max(("vllm", "sglang", "trtllm"), key=count)
    if g is not None:
        return best, f"the default: its tables cover the most op classes on {gpu} ({count(best)} curves)"
    return best, (f"the default; no per-operation tables for {gpu}: default efficiencies ({best}'s curves, "
                  f"the median across {', '.join(sorted(d['gpus']))})")


def prefill_budget(engine_name: str, hbm_bytes: float, dp: int = 1) -> tuple[int | None, str]:
    """(prompt tokens one data-parallel rank prefills per step, source) under the engine's
    default token budget (vLLM max_num_batched_tokens, SGLang chunked_prefill_size, TRT-LLM
    max_num_tokens; engines/<name>.json, tiers by the GPU's memory in GiB); (None, why) for an
    engine without one (a prefill is then one pass). A budget the engine shares over its DP
    ranks ("per": "global", SGLang's) is divided by dp, as the engine does."""
    b = engine(engine_name).get("prefill_budget")
    if b is None:
        return None, f"{engine_name}: no token budget (one pass)"
    gib = hbm_bytes / 2**30
    tokens = next(t for limit, t in b["tiers"] if limit is None or gib < limit)
    if b["per"] == "global":
        tokens = max(1, tokens // dp)
    return tokens, b["source"]


# NVFP4 experts on a GPU with fp4 tensor cores run W4A4 there (plan.expert_lane), not weight-only
# like the int4 tables' kernels (int4_wo, w4a16_mxfp4); the tables hold no nvfp4 MoE class, so
# they read the low-precision tensor-core curve there is, fp8's (efficiency vs its own peak), and
# efficiency_sources says so. Without fp4 tensor cores NVFP4 runs weight-only: the int4 class.
NVFP4_CLASS = "fp8"
NVFP4_NOTE = "NVFP4 experts on fp4 tensor cores: no nvfp4 MoE table, fp8's curve at the fp4 peak"


def dtype_class(dtype: str, fp4_path: bool = False) -> str:
    """A weight dtype's class in the tables: fp8 (and nvfp4 where the GPU runs it on fp4 tensor
    cores, `fp4_path`: NVFP4_CLASS), the weight-only 4-bit formats, or bf16 (anything else)."""
    if dtype == "fp8":
        return "fp8"
    if dtype == "nvfp4" and fp4_path:
        return NVFP4_CLASS
    if dtype in ("int4", "mxfp4", "nvfp4"):
        return "int4"
    return "bf16"
