"""Compile the dispatch, combine and expert-gather kernels for a GPU target without a GPU.

    python -m moelab.kernels.compile_check [--arch 90]

Triton lowers each kernel through MLIR, LLVM and ptxas for the target (sm_90: H100/H200)
at the block sizes dispatch() and the tuner use. The CPU tests run the kernels only in the
interpreter, which never lowers them; this catches what only the compiler rejects (a
tl.histogram with too few bins, an op without a lowering) and reports the shared
memory each needs. It needs TRITON_INTERPRET unset (the interpreter replaces @triton.jit) and the
ptxas that Triton's wheel ships.
"""

from __future__ import annotations

import os
import sys

POINTERS = {
    "_route_count_kernel": {p: "*i32" for p in ("ids_ptr", "hist_ptr", "rank_ptr", "counts_ptr",
                                                "offsets_ptr", "status_ptr")},
    "_route_place_kernel": {**{p: "*i32" for p in ("ids_ptr", "before_ptr", "counts_ptr", "offsets_ptr",
                                                   "slot_ptr", "src_ptr", "block_expert_ptr")},
                            "scale_ptr": "*fp32"},
    "_scatter_kernel": {"x_ptr": "*bf16", "slot_ptr": "*i32", "out_ptr": "*bf16", "scale_ptr": "*fp32"},
    "_combine_kernel": {"y_ptr": "*bf16", "slot_ptr": "*i32", "w_ptr": "*fp32", "out_ptr": "*bf16"},
    "_gather_blocks_kernel": {"src_ptr": "*i32", "dst_ptr": "*i32", "src_idx_ptr": "*i64",
                              "dst_idx_ptr": "*i64"},
}  # fmt: skip

# (kernel, constexprs, num_warps, pointer overrides): the sizes dispatch() picks for
# DeepSeek-R1 prefill and decode (E = 256, routing blocks of 1024 and 256 pairs, int64 ids
# as torch.topk gives them), Mixtral (E = 8), and the fp8 scatter
CASES = [
    ("_route_count_kernel", {"BLOCK_P": 1024, "BLOCK_E": 512, "BLOCK_B": 16}, 8, {}),
    ("_route_count_kernel", {"BLOCK_P": 256, "BLOCK_E": 512, "BLOCK_B": 16}, 8, {"ids_ptr": "*i64"}),
    ("_route_count_kernel", {"BLOCK_P": 1024, "BLOCK_E": 32, "BLOCK_B": 32}, 8, {}),
    ("_route_place_kernel", {"BLOCK_P": 1024, "BLOCK_E": 512, "BLOCK_R": 256}, 8, {}),
    ("_route_place_kernel", {"BLOCK_P": 256, "BLOCK_E": 512, "BLOCK_R": 256}, 8, {"ids_ptr": "*i64"}),
    ("_route_place_kernel", {"BLOCK_P": 1024, "BLOCK_E": 32, "BLOCK_R": 256}, 8, {}),
    ("_scatter_kernel", {"BLOCK_T": 4, "BLOCK_D": 1024, "QUANT": False, "FP8_MAX": 448.0, "K": 8}, 4, {}),
    ("_scatter_kernel", {"BLOCK_T": 16, "BLOCK_D": 128, "QUANT": True, "FP8_MAX": 448.0, "K": 8}, 4,
     {"out_ptr": "*fp8e4nv"}),
    ("_combine_kernel", {"BLOCK_T": 1, "BLOCK_D": 1024, "K": 8}, 4, {}),
    ("_gather_blocks_kernel", {"BLOCK": 4096}, 8, {}),  # the prefetcher's zero-copy path
]  # fmt: skip


def compile_all(arch: int = 90, log=print) -> list[dict]:
    """One row per case: kernel, constexprs, num_warps, ok (and error)."""
    if os.environ.get("TRITON_INTERPRET"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces @triton.jit")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moelab.kernels import _dispatch_triton, _gather_triton

    target = GPUTarget("cuda", arch, 32)
    rows = []
    for name, consts, warps, override in CASES:
        fn = getattr(_gather_triton if name.startswith("_gather") else _dispatch_triton, name)
        sig = {a: "i32" for a in fn.arg_names}
        sig.update(POINTERS[name], **override)
        sig.update({c: "constexpr" for c in consts})
        row = {"kernel": name, "constexprs": consts, "num_warps": warps}
        try:
            k = triton.compile(ASTSource(fn, sig, consts), target=target,
                               options={"num_warps": warps})  # fmt: skip
            ptx = k.asm["ptx"]
            row["ok"] = True
            if name == "_scatter_kernel" and consts["QUANT"]:
                # IEEE division, as torch's: the fp8 values then match the reference's
                row["ieee_div"] = "div.rn.f32" in ptx and "div.full.f32" not in ptx
                row["ok"] = row["ieee_div"]
            if name == "_route_count_kernel":
                # the scan's hand-off: the ticket is an acquire-release atomic at GPU scope
                # and the scan reads the other programs' counts from L2 (.cg), not L1
                row["ticket_acq_rel"] = "atom.global.gpu.acq_rel.add" in ptx
                row["scan_reads_l2"] = "ld.global.cg" in ptx
                row["ok"] = row["ticket_acq_rel"] and row["scan_reads_l2"]
            row["shared_bytes"] = k.metadata.shared
        except Exception as e:
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:1000]}")
        regs = f" shared={row['shared_bytes']}B" if "shared_bytes" in row else ""
        log(f"{'ok  ' if row['ok'] else 'FAIL'} {name} {consts} warps={warps}{regs}"
            + (f": {row['error']}" if row.get("error") else ""))  # fmt: skip
        rows.append(row)
    return rows


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m moelab.kernels.compile_check")
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 [90]")
    args = p.parse_args(argv)
    rows = compile_all(args.arch)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
