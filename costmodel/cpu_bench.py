"""Measure the CPU that runs the experts (`moelab calibrate --cpu`): memory bandwidth and
the achieved rates of expert matrix products, with torch's own CPU kernels.

- **DRAM**: a STREAM-like triad a = b + s c over float64 arrays, each at least 4x the
  last-level cache (STREAM's rule), on all cores (torch's intra-op threads), best of a few
  repeats. Bytes counted as STREAM counts triad: 3 arrays x 8 B per element (two reads,
  one write; the write-allocate read is not counted). With several NUMA nodes, each node
  is also measured alone, in a child process pinned to that node's CPUs before torch starts
  (torch's threads keep the affinity they are born with).
- **Expert matrix products** at the CPU-expert dtypes, weights [N, K] as nn.Linear and
  the engines store them, activations bf16:
    bf16: torch.nn.functional.linear;
    int8: torch._int_mm (int8 activations x int8 weights, int32 accumulate: the VNNI/AMX
          path) for the batch, torch.ops.aten._weight_int8pack_mm (int8 weights with a
          per-channel scale, bf16 activations) for one token, where _int_mm has no fast path;
    int4: torch.ops.aten._weight_int4pack_mm_for_cpu (two 4-bit weights per byte, bf16
          scale and zero per group of 128 along K).
  One token (GEMV, bandwidth-bound): GB/s of weight bytes as the kernel stores them, the
  fastest single call over copies of the weight taken in turn, whose total is at least 4x
  the last-level cache in every mode (--quick takes fewer rounds, never fewer bytes: with
  2x the cache, a quick int4 GEMV read faster than the DRAM triad, i.e. it read the cache),
  so every call reads its weight from DRAM. A prefill-sized batch
  (256 tokens, compute-bound): ops/s, 2 M N K per product, best of repeats. No GEMM is
  written here: what is timed is torch's.

Heavy imports (torch) stay inside the functions: `moelab plan` never imports this module.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

TRIAD_BYTES_PER_ELEMENT = 3 * 8  # STREAM's count for triad: read b and c, write a (float64)
PREFILL_TOKENS = 256
GROUP = 128  # int4 group size along K (scale and zero per group), as llama.cpp-style formats
MIN_LLC = 32 << 20  # when the cache size is unreadable: assume a 32 MiB last-level cache
SIDE = {True: 2048, False: 4096}  # K = N of the products, --quick or not
PAST_LLC = 4  # arrays streamed (triad's, the GEMV's weights together) are >= 4x the LLC (STREAM's rule)


def last_level_cache_bytes() -> int:
    """The largest cache of cpu0 (/sys/devices/system/cpu/cpu0/cache/index*/size)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * unit)
        except ValueError:
            continue
    return max(sizes, default=MIN_LLC)


def numa_nodes() -> dict[int, list[int]]:
    """NUMA node -> its CPUs (/sys/devices/system/node); {} where the kernel shows none."""
    out = {}
    for d in sorted(Path("/sys/devices/system/node").glob("node[0-9]*")):
        cpus = _cpu_list((d / "cpulist").read_text()) if (d / "cpulist").is_file() else []
        if cpus:
            out[int(d.name[4:])] = cpus
    return out


def _cpu_list(text: str) -> list[int]:
    cpus = []
    for part in text.strip().split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus += range(int(lo), int(hi) + 1)
        elif part:
            cpus.append(int(part))
    return cpus


def cpu_info() -> dict:
    """Model name, sockets, cores per socket, base clock (GHz, where the model name states
    one) and matrix instruction sets, from /proc/cpuinfo."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    blocks = [dict(line.split(":", 1) for line in b.splitlines() if ":" in line)
              for b in text.split("\n\n") if b.strip()]
    blocks = [{k.strip(): v.strip() for k, v in b.items()} for b in blocks]
    model = blocks[0].get("model name", "unknown CPU") if blocks else "unknown CPU"
    sockets = len({b.get("physical id", "0") for b in blocks}) or 1
    cores = len({(b.get("physical id", "0"), b.get("core id", str(i))) for i, b in enumerate(blocks)})
    flags = set(blocks[0].get("flags", "").split()) if blocks else set()
    isas = [isa for isa, need in (("amx", "amx_tile"), ("avx512", "avx512f"), ("avx2", "avx2"))
            if need in flags]
    base = None  # Intel names the base clock in the model name ("... @ 2.00GHz"); AMD does not
    if "@" in model and model.upper().endswith("GHZ"):
        try:
            base = float(model.rsplit("@", 1)[1].upper().removesuffix("GHZ"))
        except ValueError:
            base = None
    return {"model": model, "sockets": sockets, "cores_per_socket": max(cores // sockets, 1),
            "base_GHz": base, "isas": isas,
            "flags": sorted(f for f in flags if f.startswith(("avx512_bf16", "avx512_vnni", "amx", "avx2")))}


def _best(fn, repeats: int) -> float:
    """Best wall time of `fn` over `repeats` calls after one warm-up: the least disturbed."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _best_over(fn, items: list, rounds: int) -> float:
    """Best wall time of one call of `fn` over `items` in turn, `rounds` times: each call
    reads an item the previous ones evicted from the cache, and the best of many short calls
    is the least disturbed on a shared machine."""
    fn(items[0])
    best = float("inf")
    for _ in range(rounds):
        for v in items:
            t0 = time.perf_counter()
            fn(v)
            best = min(best, time.perf_counter() - t0)
    return best


def triad(quick: bool) -> dict:
    """STREAM-like triad on all of torch's threads: B/s counted as STREAM counts it."""
    import torch

    n = max(PAST_LLC * last_level_cache_bytes() // 8, 1 << 20)  # elements per array: each >= 4x LLC
    a = torch.empty(n, dtype=torch.float64)
    b = torch.full((n,), 1.0, dtype=torch.float64)
    c = torch.full((n,), 2.0, dtype=torch.float64)
    t = _best(lambda: torch.add(b, c, alpha=3.0, out=a), 2 if quick else 10)
    if a[0].item() != 7.0 or a[-1].item() != 7.0:  # the triad ran: 1 + 3 x 2
        raise RuntimeError("triad: wrong result")
    return {"Bps": TRIAD_BYTES_PER_ELEMENT * n / t, "elements": n, "threads": torch.get_num_threads(),
            "seconds": t}


def _triad_pinned(cpus: list[int], quick: bool, queue) -> None:
    os.sched_setaffinity(0, cpus)  # before torch starts its threads
    import torch

    torch.set_num_threads(len(cpus))
    queue.put(triad(quick)["Bps"])


def triad_per_node(quick: bool) -> list[float] | None:
    """Triad B/s of each NUMA node alone, or None with a single node."""
    nodes = numa_nodes()
    if len(nodes) < 2:
        return None
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = []
    for cpus in nodes.values():
        q = ctx.Queue()
        proc = ctx.Process(target=_triad_pinned, args=(cpus, quick, q))
        proc.start()
        out.append(q.get(timeout=300))
        proc.join()
    return out


def _copies(w, total_bytes: int) -> list:
    """The weight and clones of it, together at least `total_bytes` (the weight's own bytes;
    its small scales are shared, so not counted): a GEMV over them in turn reads DRAM."""
    nbytes = w.numel() * w.element_size()
    return [w] + [w.clone() for _ in range(max(-(-total_bytes // nbytes) - 1, 0))]


def matrix_products(quick: bool) -> dict:
    """{dtype: {"gemv_Bps", "matmul_ops", "gemv_kernel", "matmul_kernel"}} for bf16, int8, int4
    (a dtype whose kernel this torch lacks or refuses: its figures None and the reason)."""
    import torch

    K = N = SIDE[quick]
    total = PAST_LLC * last_level_cache_bytes()  # weights past the cache, --quick too
    repeats = 2 if quick else 5  # --quick is quick by fewer rounds
    g = torch.Generator().manual_seed(0)
    x = torch.randn(PREFILL_TOKENS, K, generator=g).to(torch.bfloat16)
    x1 = x[:1].contiguous()
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    wq = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    ops = 2 * PREFILL_TOKENS * N * K
    out = {}

    def record(dtype, gemv_kernel, gemv, weights, nbytes, matmul_kernel, matmul):
        try:
            ws = _copies(weights, total)
            t1 = _best_over(gemv, ws, repeats)
            tb = _best(lambda: matmul(weights), 2 * repeats)
            out[dtype] = {"gemv_Bps": nbytes / t1, "matmul_ops": ops / tb,
                          "gemv_kernel": gemv_kernel, "matmul_kernel": matmul_kernel,
                          "shape": f"[{PREFILL_TOKENS} or 1, {K}] x [{N}, {K}]^T",
                          "gemv_weight_bytes": sum(v.numel() * v.element_size() for v in ws)}
        except (RuntimeError, NotImplementedError, AttributeError) as e:
            out[dtype] = {"gemv_Bps": None, "matmul_ops": None,
                          "skipped": f"{gemv_kernel} / {matmul_kernel}: {type(e).__name__}: {e}"[:300]}

    F = torch.nn.functional
    record("bf16", "torch.nn.functional.linear (bf16)", lambda v: F.linear(x1, v), w, w.numel() * 2,
           "torch.nn.functional.linear (bf16)", lambda v: F.linear(x, v))
    # int8 weights with one bf16 scale per output channel, as _weight_int8pack_mm takes them.
    scales = torch.rand(N, generator=g).to(torch.bfloat16) / 64
    xq = torch.randint(-127, 128, (PREFILL_TOKENS, K), generator=g, dtype=torch.int8)
    record("int8", "torch.ops.aten._weight_int8pack_mm (int8 weights, bf16 activations)",
           lambda v: torch.ops.aten._weight_int8pack_mm(x1, v, scales), wq, wq.numel() + scales.numel() * 2,
           "torch._int_mm (int8 x int8 -> int32)", lambda v: torch._int_mm(xq, v.t()))
    # int4: values 0..15 packed two per byte, bf16 scale and zero per group of 128 along K.
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32), 1)
        sz = torch.rand(K // GROUP, N, 2, generator=g).to(torch.bfloat16)
        mm4 = torch.ops.aten._weight_int4pack_mm_for_cpu
        kernel = f"torch.ops.aten._weight_int4pack_mm_for_cpu (group {GROUP}, bf16 activations)"
        nbytes = packed.numel() * packed.element_size() + sz.numel() * 2
        record("int4", kernel, lambda v: mm4(x1, v, GROUP, sz), packed, nbytes,
               kernel, lambda v: mm4(x, v, GROUP, sz))
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        why = f"no int4 kernel in torch {torch.__version__}: {type(e).__name__}: {e}"
        out["int4"] = {"gemv_Bps": None, "matmul_ops": None, "skipped": why[:300]}
    return out


def measure(quick: bool) -> dict:
    """Everything `calibrate --cpu` records, in SI units (B/s, ops/s), all sockets together."""
    import torch

    info = cpu_info()
    m = {"cpu": info, "torch": torch.__version__, "threads": torch.get_num_threads(),
         "llc_bytes": last_level_cache_bytes(), "numa_nodes": len(numa_nodes()) or 1}
    m["triad"] = triad(quick)
    m["triad_per_node_Bps"] = triad_per_node(quick)
    m["matrix"] = matrix_products(quick)
    return m


def cpu_file(m: dict, date: str) -> dict:
    """A CPU file in cpus.json's schema from `measure()`: measured fields filled per socket,
    nominal ones null where this machine does not say them (channels, MT/s)."""
    info, s = m["cpu"], m["cpu"]["sockets"]
    matmul = {d: (None if r["matmul_ops"] is None else r["matmul_ops"] / s / 1e12)
              for d, r in m["matrix"].items()}
    gemv = {d: (None if r["gemv_Bps"] is None else r["gemv_Bps"] / s / 1e9) for d, r in m["matrix"].items()}
    how = f"moelab calibrate --cpu on {info['model']}, torch {m['torch']}, {m['threads']} threads, {date}"
    measured = {
        "dram_measured_GBps": (f"STREAM-like triad a = b + 3 c (torch.add, float64, "
                               f"{m['triad']['elements']:,} elements per array, >= 4x the "
                               f"{m['llc_bytes'] >> 20} MiB last-level cache), "
                               "24 B per element counted, best of repeats, all cores, per socket"),
        "cores": "/proc/cpuinfo (distinct physical id, core id)",
        "sockets": "/proc/cpuinfo (distinct physical id)",
    }
    if m["triad_per_node_Bps"]:
        measured["dram_measured_numa_GBps"] = "the same triad in a process pinned to each NUMA node's CPUs"
    for d, r in m["matrix"].items():
        if r.get("matmul_ops") is not None:
            measured[f"matmul_measured_TOPS.{d}"] = (f"{r['matmul_kernel']}, {PREFILL_TOKENS} tokens, "
                                                     f"{r['shape']}")
            measured[f"gemv_measured_GBps.{d}"] = (f"{r['gemv_kernel']}, one token, weight bytes of the "
                                                   "fastest call over copies totalling "
                                                   f"{r['gemv_weight_bytes'] >> 20} MiB, taken in turn")
        else:
            measured[f"matmul_measured_TOPS.{d}"] = f"not measured: {r['skipped']}"
    if info["base_GHz"] is not None:
        measured["base_GHz"] = "the model name in /proc/cpuinfo"
    return {
        "name": "calibrated-cpu",
        "description": (f"{info['model']}, measured by moelab calibrate --cpu; instruction sets "
                        f"{', '.join(info['isas']) or 'none detected'} ({', '.join(info['flags'])}); "
                        "ops_per_core_cycle left empty: plan uses the measured rates"),
        "sockets": s,
        "cores": info["cores_per_socket"],
        "base_GHz": info["base_GHz"],
        "dram_channels": None,
        "dram_MTps": None,
        "dram_measured_GBps": m["triad"]["Bps"] / s / 1e9,
        "dram_measured_numa_GBps": ([b / 1e9 for b in m["triad_per_node_Bps"]]
                                    if m["triad_per_node_Bps"] else None),
        "ops_per_core_cycle": {},
        "matmul_measured_TOPS": matmul,
        "gemv_measured_GBps": gemv,
        "source": f"{how}; DRAM channels and speed not readable here (null: no nominal figure)",
        "measured": measured,
    }
