"""`moelab bench prefetch`: host -> device expert transfers against a plain pinned memcpy.

For expert sizes of the presets (DeepSeek-R1 fp8 44 MB, Mixtral-8x7B bf16 352 MB, Qwen3-30B
bf16 9.4 MB, gpt-oss-120b mxfp4 13 MB), in one run:
- the roof: one big `tensor.copy_` of the same bytes from pinned host memory (memcpy);
- the prefetcher's copy-engine path (one async copy per expert, events per expert);
- the prefetcher's gather path (one Triton launch per expert, zero-copy reads);
- the gather kernel alone, all experts in one launch;
each reported as achieved B/s and as a ratio to the memcpy (goal: gather >= 0.9). A path
is timed only after its result matched the host blocks byte for byte.
Then the overlap: the prefetch of a layer's experts beside a bf16 GEMM of equal length on
the compute stream; hidden = (t_copy + t_gemm - t_both) / t_copy, the fraction of the copy
hidden (goal >= 0.9). And the cache: LRU vs Belady hit rates on a routing with skew.
The last row ("path": "goals") holds the worst model of each goal and whether it is met
(`goal_*_met`: None on a CPU, which gives no verdict).

Without a GPU the same code runs on the CPU fallback (worker thread for the side stream,
the gather kernel in Triton's interpreter) on small blocks: the numbers are CPU memory
speeds, labelled so, never host-link speeds.
"""

from __future__ import annotations

import functools
import os

from moelab.kernels.timing import median_time

# (preset, experts per measured batch): about 0.3-0.7 GB per batch on a GPU.
GPU_CASES = [("deepseek-r1", 8), ("mixtral-8x7b", 2), ("qwen3-30b-a3b", 32), ("gpt-oss-120b", 24)]
GPU_QUICK = [("deepseek-r1", 8), ("qwen3-30b-a3b", 32)]
CPU_CASES = [("deepseek-r1", 4), ("qwen3-30b-a3b", 8)]
CPU_SCALE = 1 / 32  # CPU: hidden and intermediate shrunk 32x (blocks of ~43 KB for R1)
GOAL = 0.9


def _check(pf, layer, experts) -> bool:
    """The slots of a fetch hold the host blocks byte for byte."""
    import torch

    pf.synchronize()
    for e in experts:
        slot = pf.cache.slot_of[(layer, e)]
        if not torch.equal(pf.slots[slot].cpu(), pf.store.block(layer, e)):
            return False
    return True


def bench(args) -> list[dict]:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        # The gather kernel can only run in Triton's interpreter here; it must be on
        # before the kernel module is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print("prefetch: no GPU. CPU fallback: a worker thread plays the side stream, the "
              "gather kernel runs in Triton's interpreter, blocks are shrunk "
              f"{round(1 / CPU_SCALE)}x; speeds below are CPU memory speeds, not a host link.")
    from moelab.costmodel import presets

    quick = bool(getattr(args, "quick", False))
    cases = (GPU_QUICK if quick else GPU_CASES) if cuda else CPU_CASES
    repeats = (3 if quick else 5) if cuda else 5
    device = torch.device("cuda" if cuda else "cpu")
    dev_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    common = {"device": dev_name, "torch": torch.__version__}
    rows: list[dict] = []

    threads = torch.get_num_threads()
    if not cuda:
        # One intra-op thread: the worker thread is the other lane, and a pool spinning on a
        # shared machine turns a 0.2 MB copy into milliseconds.
        torch.set_num_threads(1)
    try:
        for name, n in cases:
            model = presets.load_model(name)
            rows += _transfer_rows(model, n, device, sync, repeats, quick, common)
    finally:
        torch.set_num_threads(threads)
    rows += _cache_rows(common, quick)
    rows.append(_goals(rows, common, cuda))
    _print(rows, cuda)
    return rows


def _transfer_rows(model, n, device, sync, repeats, quick, common) -> list[dict]:
    """memcpy roof, both prefetcher paths, the gather kernel alone, the overlap: one model."""
    import torch

    from moelab.kernels._gather_triton import HOST_PATHS, gather_blocks
    from moelab.kernels.expert_store import HostExpertStore
    from moelab.kernels.prefetch import Prefetcher

    cuda = device.type == "cuda"
    rows: list[dict] = []
    name = model.name
    # Two layers, n experts each, n slots: every fetch of the other layer misses all n.
    store = HostExpertStore(model, layers=2, experts=n, scale=1.0 if cuda else CPU_SCALE)
    nbytes = n * store.block_bytes
    base = {**common, "model": name, "expert_dtype": model.expert_dtype,
            "expert_bytes": store.expert_bytes, "experts": n, "bytes": nbytes}
    slots = torch.empty((n, store.block_bytes), dtype=torch.uint8, device=device)

    # The roof: one plain copy of the same bytes (host memory is contiguous per layer).
    src = store.blocks[0][:n]
    t_memcpy = median_time(lambda: slots.copy_(src, non_blocking=True), sync, repeats)
    memcpy_ok = torch.equal(slots.cpu(), src)
    roof = nbytes / t_memcpy
    rows.append({**base, "path": "memcpy", "route": "tensor.copy_", "correct": memcpy_ok,
                 "seconds": t_memcpy, "bandwidth_Bps": roof, "ratio_to_memcpy": 1.0})

    experts = list(range(n))
    for path in ("copy", "gather"):
        pf = Prefetcher(store, n, device=device, path=path)
        layer = [0]

        def fetch_all(pf=pf, layer=layer):
            layer[0] ^= 1  # the other layer: every expert misses
            pf.fetch(layer[0], experts).release()
            pf.synchronize()

        fetch_all()  # warm-up (and the Triton compile)
        ok = _check(pf, layer[0], experts)
        row = {**base, "path": path, "route": pf.gather_route if path == "gather" else
               "copy_ non_blocking", "correct": ok}
        if ok:
            t = median_time(fetch_all, sync, repeats)
            row.update(seconds=t, bandwidth_Bps=nbytes / t, ratio_to_memcpy=t_memcpy / t)
        rows.append(row)
        pf.close()

    # The gather kernel alone: all n blocks in one launch.
    words, dst = store.words(1), slots.view(torch.int32)
    idx = torch.arange(n, dtype=torch.int64, device=device)
    # Launch shapes, with the route the process settled on; then (GPU) every way of passing
    # the host pointer, forced one by one, so the rows say which ones Triton accepts.
    configs = [(4096, 8, None)] if quick or not cuda else [(4096, 8, None), (16384, 16, None)]
    if cuda:
        configs += [(4096, 8, r) for r in HOST_PATHS]
    for block, warps, forced in configs:
        dst.fill_(-7777)
        row = {**base, "path": "gather_kernel" if forced is None else "gather_route",
               "block": block, "num_warps": warps}
        launch = functools.partial(gather_blocks, words, idx, dst, idx, block=block,
                                   num_warps=warps, host_path=forced)
        try:
            row["route"] = launch()
        except RuntimeError as e:  # this route is refused here: reported, not timed
            rows.append({**row, "route": forced, "correct": False, "error": str(e)[:300]})
            continue
        sync()
        row["correct"] = torch.equal(dst.cpu(), words[:n])
        if row["correct"]:
            t = median_time(launch, sync, repeats)
            row.update(seconds=t, bandwidth_Bps=nbytes / t, ratio_to_memcpy=t_memcpy / t)
        rows.append(row)

    rows += _overlap_rows(store, n, device, sync, repeats, base)
    return rows


def _overlap_rows(store, n, device, sync, repeats, base) -> list[dict]:
    """Prefetch beside a GEMM of equal length: the fraction of the copy that was hidden."""
    import torch

    from moelab.kernels.prefetch import Prefetcher

    size = 4096 if device.type == "cuda" else 128
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU: fp32 GEMM
    a = torch.randn((size, size), device=device, dtype=dtype)
    b = torch.randn((size, size), device=device, dtype=dtype)
    out = torch.empty_like(a)
    t_one = median_time(lambda: torch.mm(a, b, out=out), sync, repeats)
    rows = []
    experts = list(range(n))
    for path in ("copy", "gather"):
        pf = Prefetcher(store, n, device=device, path=path)
        layer = [0]

        def fetch(pf=pf, layer=layer):
            layer[0] ^= 1
            return pf.fetch(layer[0], experts)

        def copy_alone(pf=pf):
            fetch().release()
            pf.synchronize()

        copy_alone()
        t_copy = median_time(copy_alone, sync, repeats)
        reps = max(1, round(t_copy / t_one))  # a compute of equal length

        def gemms(reps=reps):
            for _ in range(reps):
                torch.mm(a, b, out=out)

        t_gemm = median_time(gemms, sync, repeats)

        def both(pf=pf, gemms=gemms):
            f = fetch()  # copies start on the side stream...
            gemms()  # ...while the GEMMs run on the compute stream
            pf.synchronize()
            f.release()

        t_both = median_time(both, sync, repeats)
        hidden = (t_copy + t_gemm - t_both) / t_copy
        rows.append({**base, "path": f"overlap_{path}", "route": pf.gather_route or "copy_",
                     "t_copy_s": t_copy, "t_gemm_s": t_gemm, "t_both_s": t_both,
                     "gemm_reps": reps, "gemm_to_copy": t_gemm / t_copy,
                     "hidden_fraction": hidden,
                     "correct": _check(pf, layer[0], experts)})
        pf.close()
    return rows


def _cache_rows(common, quick) -> list[dict]:
    """LRU vs Belady on a skewed routing (Zipf-like expert popularity), DeepSeek-R1 shape."""
    import torch

    from moelab.kernels.expert_cache import simulate_cache

    E, k, layers, passes, tokens = 256, 8, 4, (4 if quick else 16), 1
    g = torch.Generator().manual_seed(0)
    popularity = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.1
    steps = []
    for _ in range(passes):
        for layer in range(layers):
            ids = torch.multinomial(popularity.expand(tokens, E), k, generator=g)
            steps.append((layer, sorted(set(ids.flatten().tolist()))))
    rows = []
    for slots in (16, 64):
        for policy in ("lru", "belady"):
            s = simulate_cache(steps, slots, policy)
            rows.append({**common, "path": f"cache_{policy}", "slots": slots,
                         "accesses": s["accesses"], "hits": s["hits"], "misses": s["misses"],
                         "hit_rate": s["hit_rate"]})
    return rows


def _fmt_bw(x) -> str:
    return f"{x / 1e9:8.2f}" if isinstance(x, float) else f"{'-':>8}"


def _print(rows, cuda) -> None:
    unit = "GB/s" if cuda else "GB/s (CPU memory, not a host link)"
    print(f"{'model':15} {'path':15} {'route':20} {'expert MB':>9} {'GB/s':>8}  vs memcpy  ok"
          f"   ({unit})")
    for r in rows:
        if "bandwidth_Bps" in r or r["path"] in ("copy", "gather", "gather_kernel",
                                                  "gather_route"):
            ratio = r.get("ratio_to_memcpy")
            ratio_s = f"{ratio:9.3f}" if ratio is not None else f"{'-':>9}"
            print(f"{r['model']:15} {r['path']:15} {str(r['route']):20} "
                  f"{r['expert_bytes'] / 1e6:9.3f} {_fmt_bw(r.get('bandwidth_Bps'))}  {ratio_s}  "
                  f"{'yes' if r['correct'] else 'NO: not timed'}"
                  + (f"  ({r['error']})" if "error" in r else ""))
    print()
    print(f"{'model':15} {'overlap':15} {'t_copy ms':>9} {'t_gemm ms':>9} {'t_both ms':>9} "
          "hidden (of the copy)")
    for r in rows:
        if r["path"].startswith("overlap_"):
            print(f"{r['model']:15} {r['path']:15} {r['t_copy_s'] * 1e3:9.2f} "
                  f"{r['t_gemm_s'] * 1e3:9.2f} {r['t_both_s'] * 1e3:9.2f} "
                  f"{r['hidden_fraction']:6.3f}")
    print()
    for r in rows:
        if r["path"].startswith("cache_"):
            print(f"cache {r['path'][6:]:7} slots {r['slots']:3}: hit rate {r['hit_rate']:.3f} "
                  f"({r['hits']}/{r['accesses']})")
    print()
    goals = next((r for r in rows if r["path"] == "goals"), None)
    if goals is None:
        return
    for key, text in (("gather_ratio", "zero-copy gather >= {:.0%} of pinned memcpy (best "
                                       "launch per model)"),
                      ("hidden_fraction", "prefetch >= {:.0%} hidden behind a GEMM of equal "
                                          "length (copy engine)")):
        worst, met = goals.get(f"{key}_worst"), goals.get(f"goal_{key}_met")
        if worst is None:
            continue
        verdict = "no verdict on a CPU" if met is None else ("met" if met else "NOT met")
        print(f"goal: {text.format(goals[f'goal_{key}'])}: worst model {worst:.3f} -> {verdict}")


def _goals(rows, common, cuda) -> dict:
    """The two GPU goals as one row: worst model of each, met or not (None on a CPU)."""
    best: dict[str, float] = {}
    for r in rows:
        if r["path"] in ("gather", "gather_kernel", "gather_route") and "ratio_to_memcpy" in r:
            best[r["model"]] = max(best.get(r["model"], 0.0), r["ratio_to_memcpy"])
    hidden = [r["hidden_fraction"] for r in rows if r["path"] == "overlap_copy"]
    row = {**common, "path": "goals", "goal_gather_ratio": GOAL, "goal_hidden_fraction": GOAL}
    for key, values in (("gather_ratio", list(best.values())), ("hidden_fraction", hidden)):
        worst = min(values) if values else None
        row[f"{key}_worst"] = worst
        row[f"goal_{key}_met"] = (worst >= GOAL) if cuda and worst is not None else None
    return row
