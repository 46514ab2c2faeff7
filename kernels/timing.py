"""How the kernel benchmarks (`bench_dispatch`, `bench_combine`, `bench_prefetch`), the
autotuner and `moelab calibrate` measure, and what the dispatch/combine benchmarks share.

- times: `triton.testing.do_bench` quantiles on a GPU, perf_counter medians on the CPU;
  `graph_time` replays a CUDA graph (the GPU's time without Python's launch overhead);
- the roof: a device-to-device copy moving the same bytes, timed in the same run;
- the shapes (from the model presets, cut down off the GPU), the inputs, the table and
  the goal lines of the dispatch and combine benchmarks.
"""

from __future__ import annotations

import os
import statistics
import time

# the goals at the R1 prefill shape; the metadata goal is on the GPU's time (CUDA
# graph replay): Python's launch overhead is the caller's, not the kernels'
GOALS = {"ratio_to_copy": 0.8, "ratio_to_copy_graph": 0.8, "speedup_vs_torch": 2.0,
         "metadata_graph_time_s": 10e-6}
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


def time_op(fn, cuda: bool, quick: bool) -> tuple[float, float, float]:
    """(median, p20, p80) seconds: do_bench on a GPU, perf_counter on the CPU."""
    if cuda:
        import triton

        ms = triton.testing.do_bench(
            fn, warmup=10 if quick else 25, rep=30 if quick else 100, quantiles=QUANTILES
        )
        return tuple(m * 1e-3 for m in ms)
    if os.environ.get("TRITON_INTERPRET"):
        # the interpreter's times mean nothing: one run checks the code path, no more
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter() - t0
        return t, t, t
    fn()
    times = []
    for _ in range(3 if quick else 7):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return statistics.median(times), q[0], q[3]


def median_time(fn, sync, repeats: int) -> float:
    """Median wall time of `fn` over `repeats` runs after one warm-up, synchronized."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def graph_time(fn, cuda: bool) -> float | None:
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


def environment(cuda: bool) -> dict:
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


def shapes(quick: bool, cuda: bool, interpret: bool):
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


def inputs(tokens, d, k, E, device, seed=0):
    """bf16 rows, uniform top-k routing (distinct experts per token), weights."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, d, device=device, generator=g).to(torch.bfloat16)
    ids = torch.rand(tokens, E, device=device, generator=g).topk(k, dim=1).indices.to(torch.int32)
    w = torch.rand(tokens, k, device=device, generator=g)
    return x, ids, w


def copy_time(nbytes: int, device, cuda: bool, quick: bool):
    """A device-to-device copy moving nbytes in all (reads nbytes/2, writes nbytes/2)."""
    return copy_times(nbytes, device, cuda, quick)[0]


def copy_times(nbytes: int, device, cuda: bool, quick: bool) -> tuple[float, float | None]:
    """(do_bench time, CUDA-graph time) of the roof copy: the kernel's ratio to the roof
    is taken both ways, wall time against wall time and graph time against graph time."""
    import torch

    n = max(1, nbytes // 4)  # bf16 elements in nbytes/2 bytes
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    run = lambda: dst.copy_(src)  # noqa: E731
    return time_op(run, cuda, quick)[0], graph_time(run, cuda)


def roof_fields(row: dict, nbytes: int, copy: float, copy_graph: float | None) -> None:
    """The copy-roof fields of a benchmark row, from do_bench and from CUDA-graph times."""
    row.update(copy_time_s=copy, copy_bandwidth_Bps=nbytes / copy, ratio_to_copy=copy / row["time_s"],
               copy_graph_time_s=copy_graph)  # fmt: skip
    graph = row.get("graph_time_s")
    row["ratio_to_copy_graph"] = copy_graph / graph if copy_graph and graph else None


def start(args, what):
    """(quick, cuda, interpret, env, device) for one benchmark, its header printed."""
    import torch

    quick = bool(getattr(args, "quick", False))
    cuda = torch.cuda.is_available()
    interpret = not cuda and bool(os.environ.get("TRITON_INTERPRET"))
    env = environment(cuda)
    header(env, what)
    if not cuda and not interpret:
        print("no CUDA device: Triton kernels need a GPU; running the torch baseline on CPU only")
    return quick, cuda, interpret, env, "cuda" if cuda else "cpu"


def header(env, what):
    where = env["device"] + (" (Triton interpreter: times are meaningless)" if env["interpreter"] else "")
    print(f"moelab bench {what} on {where}; torch {env['torch']}, triton {env['triton']}")


# table columns: header -> (row key in SI, scale, decimals)
COLUMNS = {
    "kernel_us": ("time_s", 1e6, 1),
    "graph_us": ("graph_time_s", 1e6, 1),
    "GB/s": ("bandwidth_Bps", 1e-9, 0),
    "x_copy": ("ratio_to_copy", 1, 2),
    "x_copy_graph": ("ratio_to_copy_graph", 1, 2),
    "x_torch": ("speedup_vs_torch", 1, 2),
    "meta_us": ("metadata_time_s", 1e6, 1),
    "meta_graph_us": ("metadata_graph_time_s", 1e6, 1),
    "torch_us": ("torch_time_s", 1e6, 1),
    "copy GB/s": ("copy_bandwidth_Bps", 1e-9, 0),
}


def print_rows(rows, headers):
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


def print_goals(rows, op):
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
