"""`moelab calibrate`: measure this machine and write a system file for `--system path.json`
(or, with `--cpu`, a CPU file for `moelab plan --cpu path.json`), in the presets' schema.

The system file is one systems.json "gpus" entry (docs/contracts.md): measured fields
filled (hbm_TBps, bf16_dense_TFLOPs, an inline host_link with measured_GBps and
latency_us; its nominal bandwidth_GBps null), the rest copied from the preset, and a
"measured" object naming each measured field and how it was measured.

Measured on the GPU (CUDA events, medians):
- b_pcie: host -> device copy from pinned memory (the largest size), B/s;
- alpha_pcie: the intercept of a least-squares fit t(size) = alpha + size / B over copies
  from 4 KiB to 64 MiB: the fixed cost of one copy, s;
- hbm_bw: device -> device copy, bytes read + written per second;
- peak_flops: a bf16 GEMM (8192^3, 4096^3 with --quick): achieved, not the datasheet's;
- dispatch / combine GB/s read from the rows a `moelab bench dispatch|combine --out DIR`
  run left there (`--kernels-from DIR`; reported only: the system file has no field for
  them). Calibrate never reruns those benchmarks: on the GPU check they ran just before.
Not measurable on one GPU: b_net and alpha_net (the network) and gpus_per_node come from a
preset (--network, default: the --system preset's network, guessed from the device name);
"source" in the file says which numbers were measured and which were taken.

Without a GPU the same measurements run on the CPU as clearly labelled stand-ins (host
memcpy for the host link and HBM, an fp32 GEMM for FLOP/s; name "cpu-standin") so that
the pipeline `calibrate -> gamma --system` can be exercised; the file says so in "source".
"""

from __future__ import annotations

import json
import statistics

HELP = ("measure host link, device copy, GEMM and latency; write a system file (--system); "
        "--cpu: the CPU's memory bandwidth and expert matrix rates (plan --cpu)")

# Substring of torch.cuda.get_device_name() -> system preset.
_DEVICE_PRESETS = [("GH200", "gh200"), ("GB200", "gb200"), ("B200", "b200"),
                   ("H200", "h200-sxm"), ("H800", "h800-sxm"), ("H100", "h100-sxm")]


def add_arguments(p):
    p.add_argument("--out", help="write the system file (or with --cpu the CPU file) here, in the "
                                 "presets' schema")
    p.add_argument("--cpu", action="store_true",
                   help="measure the CPU that runs experts instead: STREAM-like triad, and torch's "
                        "bf16/int8/int4 expert matrix products (one token and 256); writes a CPU file")
    p.add_argument("--system", help="preset for what one GPU cannot measure (network, GPUs "
                                    "per node) [guessed from the device name, else h100-sxm]")
    p.add_argument("--network", help="network preset for b_net and alpha_net [the system's]")
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    p.add_argument("--kernels-from", metavar="DIR",
                   help="report dispatch/combine GB/s from bench_dispatch.json and "
                        "bench_combine.json in DIR (written by moelab bench NAME --out DIR)")
    p.add_argument("--json", action="store_true", help="print the system and the measurements")


def _timer(cuda: bool):
    """Median seconds of a callable: CUDA events on a GPU (device time), wall time on a CPU."""
    import torch

    from moelab.kernels.timing import median_time

    if not cuda:
        return lambda fn, repeats: median_time(fn, lambda: None, repeats)

    def timed(fn, repeats):
        fn()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()  # host synchronization: wait for this measurement
            times.append(start.elapsed_time(end) * 1e-3)
        return statistics.median(times)

    return timed


def _fit_latency(sizes, times) -> tuple[float, float]:
    """Least squares t = alpha + size / B; returns (alpha >= 0, B)."""
    n = len(sizes)
    mx, my = sum(sizes) / n, sum(times) / n
    sxx = sum((x - mx) ** 2 for x in sizes)
    slope = sum((x - mx) * (y - my) for x, y in zip(sizes, times, strict=True)) / sxx
    alpha = my - slope * mx
    return max(alpha, 0.0), (1.0 / slope if slope > 0 else float("inf"))


def measure(quick: bool, kernels_from: str | None = None) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    timed = _timer(cuda)
    repeats = 5 if quick else 10
    big = (256 if quick else 1024) << 20  # bytes of the bandwidth copies
    m: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu",
               "torch": torch.__version__, "cuda": cuda}
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)  # one core's memcpy: steady on a shared machine
        big = (32 if quick else 128) << 20
    try:
        dev = torch.device("cuda" if cuda else "cpu")
        host = torch.empty(big, dtype=torch.uint8, pin_memory=cuda).fill_(1)
        dst = torch.empty(big, dtype=torch.uint8, device=dev)
        # Host link: pinned host -> device (on a CPU: memcpy, the stand-in).
        t = timed(lambda: dst.copy_(host, non_blocking=True), repeats)
        m["h2d_Bps"] = big / t
        if cuda:
            t = timed(lambda: host.copy_(dst, non_blocking=True), repeats)
            m["d2h_Bps"] = big / t
        # Latency: copies from 4 KiB to 64 MiB, fit t = alpha + size / B.
        sizes = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20]
        sizes = [s for s in sizes if s <= big]
        small_times = [timed(lambda s=s: dst[:s].copy_(host[:s], non_blocking=True),
                             repeats * 4) for s in sizes]
        m["copy_sizes_bytes"] = sizes
        m["copy_times_s"] = small_times
        m["alpha_pcie_s"], m["h2d_fit_Bps"] = _fit_latency(sizes, small_times)
        m["small_copy_s"] = small_times[0]
        # Device memory: device -> device copy moves each byte twice (read and write).
        other = torch.empty_like(dst)
        t = timed(lambda: other.copy_(dst), repeats)
        m["d2d_copy_Bps"] = 2 * big / t
        # GEMM.
        n = (4096 if quick else 8192) if cuda else (512 if quick else 1024)
        dtype = torch.bfloat16 if cuda else torch.float32
        a = torch.randn((n, n), device=dev, dtype=dtype)
        b = torch.randn((n, n), device=dev, dtype=dtype)
        t = timed(lambda: a @ b, repeats)
        m["gemm"] = {"n": n, "dtype": str(dtype).removeprefix("torch."), "seconds": t}
        m["gemm_flops"] = 2 * n**3 / t
    finally:
        torch.set_num_threads(threads)
    if kernels_from is None:
        m["dispatch_combine"] = {"skipped": "no --kernels-from: run moelab bench dispatch|"
                                            "combine --out DIR, then pass DIR"}
    else:
        m["dispatch_combine"] = _dispatch_combine(kernels_from)
    return m


def _dispatch_combine(folder: str) -> dict:
    """Dispatch and combine GB/s from the rows of their benchmarks' last run in `folder`."""
    from pathlib import Path

    from moelab.costmodel.jsonfile import read_json
    from moelab.costmodel.specs import SpecError

    out = {}
    for name in ("dispatch", "combine"):
        path = Path(folder) / f"bench_{name}.json"
        try:
            rows = read_json(path, f"bench_{name}")
        except SpecError as e:  # a missing, cut-off or huge file is reported, not fatal
            out[name] = {"skipped": str(e)}
            continue
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            out[name] = {"skipped": f"{path}: expected a JSON list of rows"}
            continue
        # The kernel's achieved B/s per shape (rows without one: no GPU, or a failed check).
        shapes = {str(r.get("shape", i)): r["bandwidth_Bps"] for i, r in enumerate(rows)
                  if isinstance(r.get("bandwidth_Bps"), int | float)}
        out[name] = {"bandwidth_Bps": shapes, "max_Bps": max(shapes.values(), default=None)}
        if not shapes:
            out[name]["skipped"] = "no kernel timing (the Triton kernels need a GPU)"
    return out


def _guess_preset(device: str) -> str:
    for key, preset in _DEVICE_PRESETS:
        if key in device:
            return preset
    return "h100-sxm"


def run(args) -> int:
    import datetime

    from moelab.costmodel.presets import gpu_entry, system_from_entry
    from moelab.io import require_folder

    if args.out:
        require_folder(args.out)  # before minutes of measurement, GPU or CPU
    if args.cpu:
        return run_cpu(args)
    m = measure(args.quick, kernels_from=args.kernels_from)
    preset_name = args.system or _guess_preset(m["device"])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if m["cuda"]:
        name = f"calibrated-{preset_name}"
        how = f"measured by moelab calibrate on {m['device']} {date} (fields: see measured)"
    else:
        name = "cpu-standin"
        how = (f"CPU STAND-IN, no GPU (moelab calibrate on the CPU, {date}): the host link "
               f"and its latency from host memcpy, hbm_TBps from memcpy, bf16_dense_TFLOPs from an "
               f"fp32 GEMM on one core; not a host link, for exercising the pipeline only")
    _, gpu, _ = gpu_entry(preset_name)
    copied = [f for f in ("hbm_GB", "fp8_dense_TFLOPs", "fp4_dense_TFLOPs", "gpus_per_node", "scale_up")
              if f in gpu]
    net = args.network or gpu["network"]
    data = {
        "name": name,
        "description": f"measured by moelab calibrate on {m['device']}, {date}; the rest from preset "
                       f"{preset_name}",
        "hbm_TBps": m["d2d_copy_Bps"] / 1e12,
        "bf16_dense_TFLOPs": m["gemm_flops"] / 1e12,
        **{f: gpu[f] for f in copied},
        "host_link": {
            "description": "measured" if m["cuda"] else "cpu memcpy (stand-in)",
            "bandwidth_GBps": None,  # no datasheet figure: the link is what was measured
            "measured_GBps": m["h2d_Bps"] / 1e9,
            "latency_us": m["alpha_pcie_s"] * 1e6,
            "latency_kind": "measured",
            "source": how,
        },
        "network": net,
        "source": (f"{how}; taken from preset {preset_name}: network {net} (not measurable on one "
                   f"GPU), {', '.join(copied)}"),
        "measured": {
            "hbm_TBps": "device-to-device copy, bytes read + written per second" if m["cuda"]
                        else "host memcpy, read + write (CPU stand-in)",
            "bf16_dense_TFLOPs": f"achieved {m['gemm']['dtype']} GEMM {m['gemm']['n']}^3"
                                 + ("" if m["cuda"] else " on the CPU (stand-in, not bf16)"),
            "host_link.measured_GBps": "pinned host-to-device copy, largest size" if m["cuda"]
                                       else "host memcpy (CPU stand-in)",
            "host_link.latency_us": "intercept of t = alpha + bytes / B over copies of 4 KiB to 64 MiB",
        },
    }
    # Checked as --system reads it before anything is written: no half-good file on disk.
    system = system_from_entry(name, data, "calibrate's system file", network=args.network,
                               latencies=True)
    if args.out:
        from moelab.io import write_json

        write_json(args.out, data, make_parents=False)
    if args.json:
        print(json.dumps({"system": data, "measurements": m, "out": args.out}, indent=1,
                         default=float))
        return 0
    if not m["cuda"]:
        print("calibrate: no GPU: CPU stand-ins below (host memcpy, not a host link)")
    print(f"device        {m['device']}")
    print(f"host link     {m['h2d_Bps'] / 1e9:8.2f} GB/s H2D"
          + (f", {m['d2h_Bps'] / 1e9:.2f} GB/s D2H" if "d2h_Bps" in m else ""))
    print(f"latency       {m['alpha_pcie_s'] * 1e6:8.2f} µs per copy (fit), "
          f"{m['small_copy_s'] * 1e6:.2f} µs for 4 KiB")
    print(f"device copy   {m['d2d_copy_Bps'] / 1e9:8.1f} GB/s (read + write)")
    print(f"GEMM          {m['gemm_flops'] / 1e12:8.1f} TFLOP/s ({m['gemm']['dtype']}, "
          f"n={m['gemm']['n']})")
    dc = m["dispatch_combine"]
    if "skipped" in dc:
        print(f"dispatch/combine skipped: {dc['skipped']}")
    for k, v in ({} if "skipped" in dc else dc).items():
        if isinstance(v, dict) and v.get("max_Bps"):
            shapes = ", ".join(f"{s} {b / 1e9:.1f}" for s, b in v["bandwidth_Bps"].items())
            print(f"{k:13} {v['max_Bps'] / 1e9:8.1f} GB/s best ({shapes})")
        else:
            print(f"{k:13} skipped: {v if isinstance(v, str) else v.get('skipped', v)}")
    print(f"network       {system.b_net / 1e9:8.1f} GB/s from preset {system.network} "
          "(not measured)")
    print("measured fields: " + ", ".join(data["measured"]) + "; the rest from preset " + preset_name)
    if args.out:
        print(f"wrote {args.out}: use it with --system {args.out}")
    return 0


def run_cpu(args) -> int:
    """`calibrate --cpu`: measure the CPU (costmodel/cpu_bench.py), write a CPU file."""
    import datetime

    from moelab.costmodel import cpu_bench
    from moelab.costmodel.presets import CPU_SCHEMA, check_entry, load_cpu
    from moelab.costmodel.specs import SpecError

    for flag in ("system", "network", "kernels_from"):
        if getattr(args, flag) is not None:
            raise SpecError(f"{flag}: measures a GPU's machine; not with --cpu")
    m = cpu_bench.measure(args.quick)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    data = cpu_bench.cpu_file(m, date)
    check_entry(data, CPU_SCHEMA, "calibrate's CPU file", "cpu")  # before anything is written
    if args.out:
        from moelab.io import write_json

        path = write_json(args.out, data, make_parents=False)
        load_cpu(str(path))  # loads as plan --cpu reads it
    if args.json:
        print(json.dumps({"cpu": data, "measurements": m, "out": args.out}, indent=1, default=float))
        return 0
    info = m["cpu"]
    print(f"cpu           {info['model']}: {data['sockets']} socket(s) x {data['cores']} cores, "
          f"{m['threads']} torch threads, instruction sets {', '.join(info['isas']) or 'none found'}")
    print(f"DRAM triad    {data['dram_measured_GBps']:8.2f} GB/s per socket (24 B per element, "
          f"arrays of {m['triad']['elements']:,} float64)")
    for node, bw in enumerate(data["dram_measured_numa_GBps"] or []):
        print(f"  NUMA node {node} {bw:8.2f} GB/s alone")
    for dtype, r in m["matrix"].items():
        if r["matmul_ops"] is None:
            print(f"{dtype:5}         not measured: {r['skipped']}")
            continue
        print(f"{dtype:5} GEMV    {data['gemv_measured_GBps'][dtype]:8.2f} GB/s of weights "
              f"({r['gemv_kernel']})")
        print(f"{dtype:5} x{cpu_bench.PREFILL_TOKENS}    {data['matmul_measured_TOPS'][dtype] * 1e3:8.1f} "
              f"GOP/s ({r['matmul_kernel']})")
    print("measured fields: " + ", ".join(data["measured"]))
    if args.out:
        print(f"wrote {args.out}: use it with moelab plan --cpu {args.out}")
    return 0
