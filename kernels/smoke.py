"""Smoke check: every kernel compiled once on this machine's Triton and torch, and checked.

    python -m moelab.kernels.smoke [--json FILE]

The first step of ci/gpu-check (a budget of 20 s): the image's Triton and torch may be
older than CI's, and a kernel that does not compile there would make every later section
fail slowly. One small DeepSeek-R1-like shape (64 tokens, top-8 of 256 experts, d = 256,
so 512 pairs: the routing's prefill-sized blocks) runs the routing (both launches),
dispatch in bf16 and fp8, combine and the expert gather, each against its reference.
Exit 1 at the first failure (the rest of the GPU check is then pointless). Under
TRITON_INTERPRET=1 (the dry run) the same code runs in the interpreter.
"""

from __future__ import annotations

import sys
import time

TOKENS, D, K, E, BLOCK_M = 64, 256, 8, 256, 64


def _steps():
    import torch

    from moelab.kernels._gather_triton import gather_blocks
    from moelab.kernels.combine import combine
    from moelab.kernels.dispatch import dispatch, route
    from moelab.kernels.reference import check_dispatch, combine_reference, dispatch_reference

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(TOKENS, D, device=dev, generator=g).to(torch.bfloat16)
    ids = torch.rand(TOKENS, E, device=dev, generator=g).topk(K, dim=1).indices.to(torch.int32)
    w = torch.rand(TOKENS, K, device=dev, generator=g)
    ref = dispatch_reference(x, ids, E, BLOCK_M)

    def check_route():
        lay = route(ids, E, BLOCK_M)
        bad = [f for f in ("counts", "offsets", "src_token", "slot", "block_expert")
               if not torch.equal(getattr(lay, f), getattr(ref, f))]  # fmt: skip
        return f"{bad} differ from the reference" if bad else None

    def check_dispatch_fp8(fp8):
        return lambda: check_dispatch(dispatch(x, ids, E, BLOCK_M, quantize_fp8=fp8), x, ids, E, fp8)

    def check_combine():
        out = combine(ref.hidden, ref, w).float()
        want = combine_reference(ref.hidden, ref, w).float()
        ok = torch.allclose(out, want, rtol=1.6e-2, atol=1e-2)
        return None if ok else f"max |out - reference| = {float((out - want).abs().max()):.3g}"

    def check_gather():
        src = torch.randint(-(2**31), 2**31 - 1, (4, 1024), dtype=torch.int32,
                            pin_memory=dev == "cuda")  # fmt: skip
        dst = torch.zeros((2, 1024), dtype=torch.int32, device=dev)
        src_idx = torch.tensor([3, 1], dtype=torch.int64, device=dev)
        dst_idx = torch.tensor([0, 1], dtype=torch.int64, device=dev)
        gather_blocks(src, src_idx, dst, dst_idx)
        ok = torch.equal(dst.cpu(), src[[3, 1]])
        return None if ok else "gathered rows differ from the source rows"

    return [("route", check_route), ("dispatch bf16", check_dispatch_fp8(False)),
            ("dispatch fp8", check_dispatch_fp8(True)), ("combine", check_combine),
            ("gather", check_gather)]  # fmt: skip


def smoke(log=print) -> list[dict]:
    """One row per step: name, seconds (the first call: compile + run), ok, error."""
    import torch

    rows = []
    for name, step in _steps():
        t0 = time.perf_counter()
        try:
            err = step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        except Exception as e:
            err = f"{type(e).__name__}: {str(e)[:500]}"
        row = {"step": name, "seconds": time.perf_counter() - t0, "ok": err is None}
        if err:
            row["error"] = err
        rows.append(row)
        log(f"{'ok  ' if row['ok'] else 'FAIL'} {name}: {row['seconds']:.1f} s" + (f": {err}" if err else ""))
        if err:
            break  # fail fast
    return rows


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m moelab.kernels.smoke")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    rows = smoke()
    if args.json:
        from moelab.io import write_json

        write_json(args.json, rows)
    ok = len(rows) == len(_steps()) and all(r["ok"] for r in rows)
    print(f"smoke: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
