"""Compile the dispatch and combine kernels for a GPU target without a GPU.

    python -m moelab.kernels.compile_check [--arch 90]

Triton lowers each kernel through MLIR, LLVM and ptxas for the target (sm_90: H100/H200)
at the block sizes dispatch() and the tuner use. The CPU tests run the kernels only in the
interpreter, which never lowers them; this catches what only the compiler rejects (a
tl.histogram with too few bins, an op without a lowering) and reports registers and
It needs TRITON_INTERPRET unset (the interpreter replaces @triton.jit) and the
ptxas that Triton's wheel ships.
"""

from __future__ import annotations

import os
import sys

POINTERS = {
    "_histogram_kernel": {"ids_ptr": "*i32", "hist_ptr": "*i32"},
    "_route_kernel": {p: "*i32" for p in ("ids_ptr", "hist_ptr", "table_ptr", "counts_ptr",
                                          "offsets_ptr", "slot_ptr", "src_ptr", "block_expert_ptr")},
    "_scatter_kernel": {"x_ptr": "*bf16", "slot_ptr": "*i32", "out_ptr": "*bf16", "scale_ptr": "*fp32"},
    "_combine_kernel": {"y_ptr": "*bf16", "slot_ptr": "*i32", "w_ptr": "*fp32", "out_ptr": "*bf16"},
}  # fmt: skip

# (kernel, constexprs, num_warps, pointer overrides): the sizes dispatch() picks for
# DeepSeek-R1 prefill (E = 256) and decode, Mixtral (E = 8), and the fp8 scatter
CASES = [
    ("_histogram_kernel", {"BLOCK_P": 1024, "BLOCK_E": 512}, 8, {}),
    ("_histogram_kernel", {"BLOCK_P": 1024, "BLOCK_E": 32}, 8, {}),
    ("_route_kernel", {"BLOCK_P": 1024, "BLOCK_E": 512, "LOG2_BLOCK_E": 9, "BLOCK_B": 32,
                       "BLOCK_R": 1024, "ONE_BLOCK": False}, 8, {}),
    ("_route_kernel", {"BLOCK_P": 256, "BLOCK_E": 512, "LOG2_BLOCK_E": 9, "BLOCK_B": 32,
                       "BLOCK_R": 128, "ONE_BLOCK": True}, 8, {"ids_ptr": "*i64"}),
    ("_route_kernel", {"BLOCK_P": 32, "BLOCK_E": 32, "LOG2_BLOCK_E": 5, "BLOCK_B": 32,
                       "BLOCK_R": 128, "ONE_BLOCK": True}, 1, {}),
    ("_scatter_kernel", {"BLOCK_T": 4, "BLOCK_D": 1024, "QUANT": False, "FP8_MAX": 448.0, "K": 8}, 4, {}),
    ("_scatter_kernel", {"BLOCK_T": 16, "BLOCK_D": 128, "QUANT": True, "FP8_MAX": 448.0, "K": 8}, 4,
     {"out_ptr": "*fp8e4nv"}),
    ("_combine_kernel", {"BLOCK_T": 4, "BLOCK_D": 1024, "K": 8}, 4, {}),
]  # fmt: skip


def compile_all(arch: int = 90, log=print) -> list[dict]:
    """One row per case: kernel, constexprs, num_warps, ok (and error)."""
    if os.environ.get("TRITON_INTERPRET"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces @triton.jit")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moelab.kernels import _dispatch_triton as K

    target = GPUTarget("cuda", arch, 32)
    rows = []
    for name, consts, warps, override in CASES:
        fn = getattr(K, name)
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
        except Exception as e:
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:1000]}")
        log(f"{'ok  ' if row['ok'] else 'FAIL'} {name} {consts} warps={warps}"
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
