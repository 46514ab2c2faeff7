"""`moelab bench dispatch|combine`: the Triton kernels against a copy roof and a torch baseline.

For each shape (model presets: DeepSeek-R1, Mixtral-8x7B, Qwen3-235B prefill of 4096
tokens; R1 decode batches 1, 64, 256), all measured in the same run:
- the kernel (dispatch: route + scatter, ids unchecked; combine), median and 20/80% quantiles
  of triton.testing.do_bench;
- the minimum bytes: each input read once, each output written once (padding rows are not
  written, so not counted); achieved B/s = bytes / time;
- the roof: a device-to-device copy moving the same bytes (a copy of bytes/2: it reads
  bytes/2 and writes bytes/2); ratio_to_copy = copy time / kernel time;
- the torch baseline (dispatch: argsort + index_select + bincount; combine: the faster of
  index_add_ and a gather-sum, both in fp32), speedup = baseline time / kernel time;
- dispatch also: the metadata alone (`route`: histogram + scan + slots).
A kernel is timed only after its output matched the reference on that very shape; a row
whose check failed carries the error and no speed.

Without a GPU: the Triton kernels need one, so the torch baseline runs on the CPU at a
reduced shape. With TRITON_INTERPRET=1 (ci/gpu-check --dry-run) the kernels also run in
the interpreter on tiny shapes: this checks the code path, its times mean nothing.
"""

from __future__ import annotations

import os
import statistics
import time
from functools import partial

# the goals at the R1 prefill shape; the metadata goal is on the GPU's time (CUDA
# graph replay): Python's launch overhead is the caller's, not the kernels'
GOALS = {"ratio_to_copy": 0.8, "speedup_vs_torch": 2.0, "metadata_graph_time_s": 10e-6}
# (preset, mode, tokens per pass); decode: a batch of that many tokens
SHAPES = [
    ("deepseek-r1", "prefill", 4096),
    ("mixtral-8x7b", "prefill", 4096),
    ("qwen3-235b-a22b", "prefill", 4096),
    ("deepseek-r1", "decode", 1),
    ("deepseek-r1", "decode", 64),
    ("deepseek-r1", "decode", 256),
]
QUICK_SHAPES = [("deepseek-r1", "prefill", 4096), ("deepseek-r1", "decode", 64)]
CPU_MAX_TOKENS = 256  # torch on the CPU: shapes cut to this many tokens (quick: 64)
INTERPRET_MAX = (16, 256)  # interpreter: at most 16 tokens of 256 columns
BLOCK_M = 64
QUANTILES = [0.5, 0.2, 0.8]


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------


def _time(fn, cuda: bool, quick: bool) -> tuple[float, float, float]:
    """(median, p20, p80) seconds: do_bench on a GPU, perf_counter on the CPU."""
    if cuda:
        import triton

        ms = triton.testing.do_bench(
            fn, warmup=10 if quick else 25, rep=30 if quick else 100, quantiles=QUANTILES
        )
        return tuple(m * 1e-3 for m in ms)
    fn()
    times = []
    for _ in range(3 if quick else 7):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return statistics.median(times), q[0], q[3]


def _graph_time(fn, cuda: bool) -> float | None:
    """Median seconds of fn replayed as a CUDA graph: the GPU's time without Python's
    launch overhead (which dominates small shapes). None off the GPU or if capture fails."""
    if not cuda:
        return None
    import triton

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=20, quantiles=[0.5])[0] * 1e-3
    except Exception as e:  # not capturable: report without it
        print(f"  (CUDA graph timing unavailable: {type(e).__name__}: {e})")
        return None


def _env(cuda: bool) -> dict:
    import torch

    env = {"torch": torch.__version__, "device": "cpu"}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if cuda:
        env["device"] = torch.cuda.get_device_name()
    env["interpreter"] = bool(os.environ.get("TRITON_INTERPRET")) and not cuda
    return env


def _shapes(quick: bool, cuda: bool, interpret: bool):
    """(label, tokens, d, k, E) from the presets, cut down off the GPU."""
    from moelab.costmodel.presets import load_model

    out = []
    for name, mode, tokens in QUICK_SHAPES if quick else SHAPES:
        m = load_model(name)
        d = m.hidden
        if interpret:
            tokens, d = min(tokens, INTERPRET_MAX[0]), min(d, INTERPRET_MAX[1])
        elif not cuda:
            tokens = min(tokens, CPU_MAX_TOKENS // (4 if quick else 1))
        out.append((f"{name} {mode} {tokens}", tokens, d, m.top_k, m.n_experts))
    return out


def _inputs(tokens, d, k, E, device, seed=0):
    """bf16 rows, uniform top-k routing (distinct experts per token), weights."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, d, device=device, generator=g).to(torch.bfloat16)
    ids = torch.rand(tokens, E, device=device, generator=g).topk(k, dim=1).indices.to(torch.int32)
    w = torch.rand(tokens, k, device=device, generator=g)
    return x, ids, w


def _copy_time(nbytes: int, device, cuda: bool, quick: bool):
    """A device-to-device copy moving nbytes in all (reads nbytes/2, writes nbytes/2)."""
    import torch

    n = max(1, nbytes // 4)  # bf16 elements in nbytes/2 bytes
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    return _time(lambda: dst.copy_(src), cuda, quick)[0]


def _start(args, what):
    """(quick, cuda, interpret, env, device) for one benchmark, its header printed."""
    import torch

    quick = bool(getattr(args, "quick", False))
    cuda = torch.cuda.is_available()
    interpret = not cuda and bool(os.environ.get("TRITON_INTERPRET"))
    env = _env(cuda)
    _header(env, what)
    if not cuda and not interpret:
        print("no CUDA device: Triton kernels need a GPU; running the torch baseline on CPU only")
    return quick, cuda, interpret, env, "cuda" if cuda else "cpu"


def _header(env, what):
    where = env["device"] + (" (Triton interpreter: times are meaningless)" if env["interpreter"] else "")
    print(f"moelab bench {what} on {where}; torch {env['torch']}, triton {env['triton']}")


# table columns: header -> (row key in SI, scale, decimals)
COLUMNS = {
    "kernel_us": ("time_s", 1e6, 1),
    "graph_us": ("graph_time_s", 1e6, 1),
    "GB/s": ("bandwidth_Bps", 1e-9, 0),
    "x_copy": ("ratio_to_copy", 1, 2),
    "x_torch": ("speedup_vs_torch", 1, 2),
    "meta_us": ("metadata_time_s", 1e6, 1),
    "meta_graph_us": ("metadata_graph_time_s", 1e6, 1),
    "torch_us": ("torch_time_s", 1e6, 1),
    "copy GB/s": ("copy_bandwidth_Bps", 1e-9, 0),
}


def _print_rows(rows, headers):
    """A plain table: µs and GB/s from the SI fields of the rows; '-' where not measured."""
    print(f"{'shape':<28}" + "".join(f"{h:>14}" for h in headers))
    for r in rows:
        cells = []
        for h in headers:
            key, scale, decimals = COLUMNS[h]
            v = r.get(key)
            cells.append("-" if v is None else f"{v * scale:.{decimals}f}")
        print(f"{r['shape']:<28}" + "".join(f"{c:>14}" for c in cells))
        if r.get("error"):
            print(f"    FAILED correctness check, not timed: {r['error']}")


# ------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------


def _dispatch_bytes(x, ids, n_pad, fp8: bool) -> int:
    tokens, d = x.shape
    pairs = int((ids >= 0).sum())
    out_elt = 1 if fp8 else x.element_size()
    scales = pairs * (d // 128) * 4 if fp8 else 0
    # in: rows + ids; out: the routed rows, (scales), slot, src_token, counts, offsets, blocks
    meta = ids.numel() * 4 + n_pad * 4 + (n_pad // BLOCK_M) * 4
    return (
        tokens * d * x.element_size()
        + ids.numel() * ids.element_size()
        + (pairs * d * out_elt + scales + meta)
    )


def _check_dispatch(lay, x, ids, E, fp8) -> str | None:
    """None when the kernel's layout equals the reference's; else what differs."""
    import torch

    from moelab.kernels.reference import dequantize_fp8_reference, dispatch_reference

    ref = dispatch_reference(x, ids, E, BLOCK_M, fp8)
    for name in ("counts", "offsets", "src_token", "slot", "block_expert"):
        if not torch.equal(getattr(lay, name), getattr(ref, name)):
            return f"{name} differs from the reference"
    rows = ref.src_token >= 0
    if fp8:
        back = dequantize_fp8_reference(lay.hidden[rows], lay.scales[rows])
        src = x[ref.src_token[rows].long()].float()
        if not torch.allclose(back, src, rtol=2**-4, atol=1e-3 * float(src.abs().max())):
            return "fp8 rows differ from the source rows beyond fp8 rounding"
    elif not torch.equal(lay.hidden[rows], ref.hidden[rows]):
        return "permuted rows differ from the source rows"
    return None


def bench_dispatch(args) -> list[dict]:

    from moelab.kernels.reference import dispatch_torch

    quick, cuda, interpret, env, device = _start(args, "dispatch")
    rows = []
    for label, tokens, d, k, E in _shapes(quick, cuda, interpret):
        x, ids, _ = _inputs(tokens, d, k, E, device)
        variants = [False, True] if (cuda or interpret) and d % 128 == 0 else [False]
        if quick or "decode" in label:
            variants = variants[:1]  # fp8 only at the prefill shapes of the full run
        for fp8 in variants:
            row = {"op": "dispatch", "shape": label + (" fp8" if fp8 else ""), "tokens": tokens,
                   "d": d, "k": k, "E": E, "block_m": BLOCK_M, "dtype": "bf16",
                   "out_dtype": "fp8" if fp8 else "bf16", "check_ids": False, **env}  # fmt: skip
            base = _time(partial(dispatch_torch, x, ids, E), cuda, quick)[0]
            row["torch_time_s"] = base
            if cuda or interpret:
                _bench_dispatch_kernel(row, x, ids, E, fp8, cuda, quick)
            rows.append(row)
    headers = ["kernel_us", "graph_us", "GB/s", "copy GB/s", "x_copy", "x_torch", "torch_us"]
    _print_rows(rows, headers + ["meta_us", "meta_graph_us"])
    _print_goals(rows, "dispatch")
    return rows


def _bench_dispatch_kernel(row, x, ids, E, fp8, cuda, quick):
    from moelab.kernels.dispatch import dispatch, route

    try:
        lay = dispatch(x, ids, E, BLOCK_M, quantize_fp8=fp8)
        err = _check_dispatch(lay, x, ids, E, fp8)
    except Exception as e:  # report, never crash the whole benchmark
        err = f"{type(e).__name__}: {e}"
    row["ok"] = err is None
    if err:
        row["error"] = err
        return
    t, t20, t80 = _time(lambda: dispatch(x, ids, E, BLOCK_M, quantize_fp8=fp8, check_ids=False), cuda, quick)
    run_route = partial(route, ids, E, BLOCK_M, check_ids=False)
    meta = _time(run_route, cuda, quick)[0]
    meta_graph = _graph_time(run_route, cuda)
    graph = _graph_time(partial(dispatch, x, ids, E, BLOCK_M, quantize_fp8=fp8, check_ids=False), cuda)
    nbytes = _dispatch_bytes(x, ids, lay.n_pad, fp8)
    copy = _copy_time(nbytes, x.device, cuda, quick)
    row.update(graph_time_s=graph, metadata_graph_time_s=meta_graph)
    row.update(time_s=t, time_s_p20=t20, time_s_p80=t80, metadata_time_s=meta, bytes=nbytes,
               bandwidth_Bps=nbytes / t, copy_time_s=copy, copy_bandwidth_Bps=nbytes / copy,
               ratio_to_copy=copy / t, speedup_vs_torch=row["torch_time_s"] / t)  # fmt: skip


def _print_goals(rows, op):
    """The issue's GPU goals at the R1 prefill shape: met or not, measured in this run."""
    for r in rows:
        if not r["shape"].startswith("deepseek-r1 prefill 4096") or r["shape"].endswith("fp8"):
            continue
        if r.get("interpreter") or r.get("time_s") is None:
            continue
        for key, goal in GOALS.items():
            if r.get(key) is None:
                continue
            met = r[key] <= goal if key.endswith("_s") else r[key] >= goal
            r[f"goal_{key}"] = goal
            r[f"goal_{key}_met"] = met
            shown = f"{r[key] * 1e6:.1f} us" if key.endswith("_s") else f"{r[key]:.2f}"
            want = f"<= {goal * 1e6:.0f} us" if key.endswith("_s") else f">= {goal}"
            print(f"goal {op} {key}: {shown} ({want}): {'met' if met else 'NOT met'}")


# ------------------------------------------------------------------------------------------
# combine
# ------------------------------------------------------------------------------------------


def bench_combine(args) -> list[dict]:
    import torch

    from moelab.kernels.reference import (
        combine_reference,
        combine_torch,
        combine_torch_gather,
        dispatch_reference,
        dispatch_torch,
    )

    quick, cuda, interpret, env, device = _start(args, "combine")
    rows = []
    for label, tokens, d, k, E in _shapes(quick, cuda, interpret):
        x, ids, w = _inputs(tokens, d, k, E, device)
        row = {"op": "combine", "shape": label, "tokens": tokens, "d": d, "k": k, "E": E,
               "block_m": BLOCK_M, "dtype": "bf16", **env}  # fmt: skip
        # baseline: rows sorted by expert without padding, summed back by token
        y_sorted, order, _ = dispatch_torch(x, ids, E)
        slot_sorted = torch.empty_like(order)
        slot_sorted[order] = torch.arange(order.numel(), device=device)
        slot_sorted = slot_sorted.view(tokens, k)
        t_add = _time(partial(combine_torch, y_sorted, order, w), cuda, quick)[0]
        t_gather = _time(partial(combine_torch_gather, y_sorted, slot_sorted, w), cuda, quick)[0]
        row["torch_time_s"] = min(t_add, t_gather)
        row["torch_baseline"] = "index_add_" if t_add <= t_gather else "gather-sum"
        if cuda or interpret:
            lay = dispatch_reference(x, ids, E, BLOCK_M)
            y = lay.hidden  # identity experts: the dispatched rows (padding rows are zero)
            _bench_combine_kernel(row, y, lay, w, combine_reference, cuda, quick)
        rows.append(row)
    _print_rows(rows, ["kernel_us", "graph_us", "GB/s", "copy GB/s", "x_copy", "x_torch", "torch_us"])
    _print_goals(rows, "combine")
    return rows


def _bench_combine_kernel(row, y, lay, w, combine_reference, cuda, quick):
    import torch

    from moelab.kernels.combine import combine

    try:
        out = combine(y, lay, w)
        want = combine_reference(y, lay, w).float()
        err = None
        if not torch.allclose(out.float(), want, rtol=1.6e-2, atol=1e-2):
            err = f"max |out - reference| = {float((out.float() - want).abs().max()):.3g}"
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
    row["ok"] = err is None
    if err:
        row["error"] = err
        return
    t, t20, t80 = _time(lambda: combine(y, lay, w), cuda, quick)
    row["graph_time_s"] = _graph_time(lambda: combine(y, lay, w), cuda)
    tokens, d = out.shape
    pairs = int((lay.slot >= 0).sum())
    # in: the routed rows, weights, slot; out: one row per token
    nbytes = pairs * d * y.element_size() + 2 * lay.slot.numel() * 4 + tokens * d * out.element_size()
    copy = _copy_time(nbytes, y.device, cuda, quick)
    row.update(time_s=t, time_s_p20=t20, time_s_p80=t80, bytes=nbytes, bandwidth_Bps=nbytes / t,
               copy_time_s=copy, copy_bandwidth_Bps=nbytes / copy, ratio_to_copy=copy / t,
               speedup_vs_torch=row["torch_time_s"] / t)  # fmt: skip
