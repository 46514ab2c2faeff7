"""Autotuning of dispatch and combine on a GPU: writes `kernels/tuned/<device-slug>.json`.

A tool, not part of the ops: it runs candidate configs of each op at one representative
shape per token class (`tuned.TOKEN_CLASSES`), checks every candidate's output against
the reference before it may win, and keeps the fastest. The ops read the result through
`kernels/tuned.py`.

    python -m moelab.kernels.autotune [--budget S] [--out DIR] [--parts route,ops]

Two parts, each runnable alone (ci/gpu-check runs `route` first, since the routing
metadata matters most, and `ops` after the benchmarks): `route` tunes the routing
kernels' block of pairs and warps at the prefill shape; `ops` the scatter, fp8 scatter
and combine tiles per class, on top of the routing winner. A part merges its entries
into the device's file; the other part's entries are kept.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

from moelab.kernels.tuned import (
    DEFAULTS,
    TUNED_DIR,
    CombineConfig,
    DispatchConfig,
    _load,
    device_slug,
)

# one representative shape per class: (tokens, d, k, E), DeepSeek-R1-like
TUNE_SHAPES = {"decode": (64, 7168, 8, 256), "small": (512, 7168, 8, 256),
               "prefill": (4096, 7168, 8, 256)}  # fmt: skip


def _candidates(op: str, cls: str):
    widths = (256, 512, 1024) if cls == "decode" else (1024, 2048)
    if op == "combine":
        # more than 2 tokens per program spill at 8 unrolled gathers (cuobjdump)
        for bt in (1, 2):
            for bd in (256, 512, 1024) if cls == "decode" else (512, 1024, 2048):
                for w in (4, 8):
                    yield CombineConfig(block_t=bt, block_d=bd, num_warps=w)
    else:
        fp8 = op == "dispatch_fp8"
        for bt in (4, 8, 16, 32) if fp8 else (1, 2, 4, 8):
            for bd in (128,) if fp8 else widths:
                for w in (4, 8):
                    yield DispatchConfig(block_t=bt, block_d=bd, num_warps=w)


def _route_candidates():
    for bp in (512, 1024, 2048):
        for w in (4, 8):
            yield {"block_p": bp, "route_warps": w}


def _close(want, got):
    import torch

    return torch.allclose(got.float(), want, rtol=2e-2, atol=2e-2)


def _dispatch_ok(x, ids, E, fp8, got) -> bool:
    """The benchmarks' own check: the whole layout, and the rows (dequantized for fp8)."""
    from moelab.kernels.reference import check_dispatch

    return check_dispatch(got, x, ids, E, fp8) is None


def _same_slots(ref, got) -> bool:
    import torch

    return torch.equal(got.slot, ref.slot)


def _best(op, cls, candidates, run, check, left, log):
    """The fastest candidate config whose output passes `check`; (None, inf) if none."""
    import triton

    best, best_t = None, float("inf")
    for cand in candidates:
        if left() <= 0:
            log(f"tune {op}:{cls}: time budget spent")
            break
        try:
            if not check(run(config=cand)):
                log(f"tune {op}:{cls} {cand}: wrong result, skipped")
                continue
            t = triton.testing.do_bench(partial(run, config=cand), warmup=5, rep=20)
        except Exception as e:  # a config that fails to compile is just not a candidate
            log(f"tune {op}:{cls} {cand}: {type(e).__name__}: {e}")
            continue
        if t < best_t:
            best, best_t = cand, t
    if best is not None:
        log(f"tune {op}:{cls}: {best_t * 1e3:.1f} us with {asdict(best)}")
    return best, best_t


PARTS = ("route", "ops")


def autotune(budget_s: float = 60.0, out_dir: Path | None = None, log=print,
             parts=PARTS) -> dict:
    """Measure candidates on this GPU and merge them into tuned/<slug>.json; returns the
    file's dict. Every candidate's output is checked against the reference before it may
    win; no new candidate is tried once the budget is spent (the best so far is kept)."""
    import json

    import torch
    import triton

    from moelab.kernels.combine import combine
    from moelab.kernels.dispatch import dispatch, route
    from moelab.kernels.reference import combine_reference, dispatch_reference

    if not torch.cuda.is_available():
        raise RuntimeError("autotune needs a CUDA device")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"parts: unknown {sorted(unknown)} (known: {', '.join(PARTS)})")
    t0 = time.perf_counter()
    dev = torch.device("cuda")
    slug = device_slug(dev)
    path = (Path(out_dir) if out_dir else TUNED_DIR) / f"{slug}.json"
    result = {"device": torch.cuda.get_device_name(dev), "slug": slug,
              "torch": torch.__version__, "triton": triton.__version__, "configs": {},
              "timings_us": {}}  # fmt: skip
    if path.exists():  # the other part's entries stay
        old = json.loads(path.read_text())
        result["configs"].update(old.get("configs", {}))
        result["timings_us"].update(old.get("timings_us", {}))
    gen = torch.Generator(device=dev).manual_seed(0)

    def left():
        return budget_s - (time.perf_counter() - t0)

    def shape(cls):
        n, d, k, E = TUNE_SHAPES[cls]
        x = torch.randn(n, d, device=dev, dtype=torch.bfloat16, generator=gen)
        ids = torch.rand(n, E, device=dev, generator=gen).topk(k, dim=1).indices.to(torch.int32)
        w = torch.rand(n, k, device=dev, generator=gen)
        return x, ids, w, E, dispatch_reference(x, ids, E, 64)

    route_fields = {}
    if "route" in parts:
        # the routing kernels' own parameters, at prefill: below ~1000 pairs one routing
        # program holds them all anyway
        x, ids, w, E, ref = shape("prefill")
        key = "dispatch:prefill"
        base = DispatchConfig(**result["configs"].get(key, asdict(DEFAULTS["dispatch"])))
        cands = (replace(base, **rc) for rc in _route_candidates())
        run = partial(route, ids, E, 64)
        best, best_t = _best("route", "prefill", cands, run, partial(_same_slots, ref), left, log)
        if best is not None:
            result["configs"][key] = asdict(best)
            result["timings_us"]["route:prefill"] = best_t * 1e3
    if "ops" in parts:
        prefill = result["configs"].get("dispatch:prefill", {})
        route_fields = {f: prefill[f] for f in ("block_p", "route_warps", "block_b") if f in prefill}
        for cls in ("prefill", "decode", "small"):
            x, ids, w, E, ref = shape(cls)
            for op in ("dispatch", "combine", "dispatch_fp8"):
                if op == "combine":
                    run = partial(combine, ref.hidden, ref, w)
                    want = combine_reference(ref.hidden, ref, w).float()
                    check = partial(_close, want)
                    cands = _candidates(op, cls)
                else:
                    run = partial(dispatch, x, ids, E, 64, op == "dispatch_fp8")
                    check = partial(_dispatch_ok, x, ids, E, op == "dispatch_fp8")
                    # the routing winner stays under the scatter candidates
                    cands = (replace(c, **route_fields) for c in _candidates(op, cls))
                best, best_t = _best(op, cls, cands, run, check, left, log)
                if best is not None:
                    result["configs"][f"{op}:{cls}"] = asdict(best)
                    result["timings_us"][f"{op}:{cls}"] = best_t * 1e3
        # "large" is not measured (it would not fit the budget): it takes the prefill configs
        for op in ("dispatch", "dispatch_fp8", "combine"):
            if f"{op}:prefill" in result["configs"]:
                result["configs"][f"{op}:large"] = result["configs"][f"{op}:prefill"]
    result["elapsed_s"] = time.perf_counter() - t0
    from moelab.io import write_json

    write_json(path, result)
    _load.cache_clear()
    log(f"tuned configs ({', '.join(parts)}) written to {path} ({result['elapsed_s']:.0f} s)")
    return result


def main(argv=None) -> int:
    """python -m moelab.kernels.autotune [--budget S] [--out DIR] [--parts route,ops]"""
    import argparse

    p = argparse.ArgumentParser(prog="python -m moelab.kernels.autotune", description=__doc__)
    p.add_argument("--budget", type=float, default=60.0, help="seconds to spend at most")
    p.add_argument("--out", help="folder for <slug>.json (default: kernels/tuned)")
    p.add_argument("--parts", default=",".join(PARTS), help="route, ops or both [route,ops]")
    args = p.parse_args(argv)
    autotune(args.budget, Path(args.out) if args.out else None,
             parts=tuple(x for x in args.parts.split(",") if x))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
