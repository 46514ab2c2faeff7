"""`moelab plan`: which deployment to pick (EP, offload, CPU experts, hybrid), memory included."""

from __future__ import annotations

HELP = "which deployment gives the most tokens/s per GPU: EP, offload, CPU experts or a hybrid"


def add_arguments(p):
    from moelab.args import DTYPES

    g = p.add_argument_group("model and hardware")
    g.add_argument("--model", default="deepseek-r1",
                   help="preset or path to a HF config.json [deepseek-r1]")
    g.add_argument("--system", default="h100-sxm", help="GPU preset or system JSON [h100-sxm]")
    g.add_argument("--gpus", type=int, default=8, metavar="N", help="GPUs available [8]")
    g.add_argument("--gpus-per-node", type=int, metavar="G", help="GPUs per node [the system's]")
    g.add_argument("--cpu", default="xeon-8470",
                   help="CPU preset of each node (moelab presets cpus) [xeon-8470]")
    g.add_argument("--cpu-isa", choices=("amx", "avx512", "sve2"),
                   help="the CPU's matrix instruction set for the experts, e.g. avx512 for an "
                        "engine without AMX kernels [the preset's best]")
    g.add_argument("--cpu-sockets", type=int, metavar="S",
                   help="sockets of --cpu per node, e.g. 1 for a run pinned to one socket [the preset's]")
    g.add_argument("--host-mem-gb", type=float, default=2000, metavar="GB",
                   help="host DRAM per node [2000, an assumption]")
    g.add_argument("--host-dram-gbps", type=float, metavar="GB/s",
                   help="node DRAM bandwidth, replacing the CPU preset's")
    g.add_argument("--gpus-per-host-link", type=int, default=1, metavar="N",
                   help="GPUs sharing one host link / PCIe switch uplink [1]")
    g.add_argument("--expert-dtype", choices=DTYPES, help="expert weight dtype [config]")
    g.add_argument("--nominal", action="store_true",
                   help="datasheet bandwidths instead of measured ones")
    w = p.add_argument_group("workload (one of --tokens or --decode-batch)")
    w.add_argument("--tokens", type=int, metavar="N",
                   help="prefill tokens per forward pass (chunked prefill: the chunk) [4096]")
    w.add_argument("--decode-batch", type=int, metavar="B", help="sequences per decode step")
    w.add_argument("--context", type=int, metavar="C",
                   help="context tokens per sequence [decode 4096, prefill --tokens]")
    w.add_argument("--routing", default="uniform",
                   help="worst | uniform | skewed (zipf:1.2) | zipf:S | hist:FILE (.npy/.json) | "
                        "trace:FILE (a recorded routing, JSON) [uniform]")
    w.add_argument("--slo-ms", type=float, metavar="ms", help="step-time budget in ms")
    w.add_argument("--kv-dtype", default="bf16", choices=DTYPES, help="KV cache dtype [bf16]")
    w.add_argument("--cpu-expert-dtype", default="int8", choices=("int8", "int4", "bf16"),
                   help="expert weights on the CPU [int8]")
    w.add_argument("--cache-steps", type=int, default=0, metavar="N",
                   help="also simulate offload's expert cache (LRU, Belady) over N passes [0]")
    w.add_argument("--seed", type=int, default=0, metavar="S", help="random seed of --cache-steps [0]")
    p.add_argument("--json", action="store_true", help="print JSON (SI units)")
    p.add_argument("--emit", choices=("vllm", "sglang", "llama.cpp"),
                   help="print launch flags for the recommended strategy in this engine")


def compute(args):
    from moelab import api
    from moelab.costmodel.specs import SpecError

    if args.slo_ms is not None and not args.slo_ms > 0:
        raise SpecError(f"--slo-ms: must be > 0, got {args.slo_ms}")
    if not 0 < args.host_mem_gb < float("inf"):
        raise SpecError(f"--host-mem-gb: must be > 0, got {args.host_mem_gb}")
    if args.host_dram_gbps is not None and not args.host_dram_gbps > 0:
        raise SpecError(f"--host-dram-gbps: must be > 0, got {args.host_dram_gbps}")
    dram = args.host_dram_gbps * 1e9 if args.host_dram_gbps is not None else None
    return api.plan(args.model, args.system, gpus=args.gpus, gpus_per_node=args.gpus_per_node,
                    cpu=args.cpu, cpu_isa=args.cpu_isa,
                    cpu_sockets=args.cpu_sockets, host_mem=args.host_mem_gb * 1e9,
                    gpus_per_host_link=args.gpus_per_host_link, tokens=args.tokens,
                    decode_batch=args.decode_batch, context=args.context, routing=args.routing,
                    slo=args.slo_ms / 1e3 if args.slo_ms is not None else None,
                    kv_dtype=args.kv_dtype, cpu_expert_dtype=args.cpu_expert_dtype,
                    expert_dtype=args.expert_dtype, nominal=args.nominal, host_dram_bw=dram,
                    cache_steps=args.cache_steps, seed=args.seed)


def run(args) -> int:
    out = compute(args)
    if args.json:
        print(out.to_json())
    else:
        print_table(out)
    if args.emit:
        from moelab.engines import launch_flags

        flags, note = launch_flags(out, args.emit)
        print(f"\n{args.emit}: {' '.join(flags) if flags else '(cannot express it)'}")
        print(f"  {note}")
    return 0


def print_table(out: dict) -> None:
    from rich.table import Table

    from moelab.show import console as make_console
    from moelab.show import fmt

    w, sy = out["workload"], out["system"]
    what = (f"decode batch {w['tokens_per_pass']:,} at {w['context']:,} tokens of context" if w["decode"]
            else f"prefill passes of {w['tokens_per_pass']:,} tokens")
    console = make_console()
    console.print(f"plan: {out['model']} on {sy['gpus']} x {sy['name']} "
                  f"({sy['hbm_bytes'] / 1e9:,.0f} GB each, {sy['gpus_per_node']} per node), "
                  f"host {out['host']['cpu']}, {what}", highlight=False)
    console.print(f"weights {out['weights_bytes'] / 1e9:,.1f} GB; KV {fmt(out['kv_bytes_per_token'])} "
                  f"B per token ({out['kv_bytes_total'] / 1e9:,.2f} GB for the batch)", highlight=False)
    t = Table()
    for col, just in (("#", "right"), ("strategy", "left"), ("GPUs", "right"), ("step", "right"),
                      ("tokens/s", "right"), ("per GPU", "right"), ("bound", "left")):
        t.add_column(col, justify=just)
    for i, s in enumerate(out["strategies"], 1):
        ok = s["feasible"]
        t.add_row(str(i) if ok else "—", s["name"], str(s["gpus"]), _seconds(s["step_s"]),
                  fmt(s["tokens_per_s"]) if ok else "—",
                  fmt(s["tokens_per_s_per_gpu"]) if ok else "—",
                  s["bound"] if ok else "infeasible")
    console.print(t)
    for s in out["strategies"]:
        console.print(f"{s['name']}: {s['reason']}", highlight=False, soft_wrap=True)
    sim = next((s.get("cache_simulation") for s in out["strategies"] if s["name"] == "offload"), None)
    if sim:
        console.print(f"offload cache over {sim['steps']} passes ({sim['slots']:,} slots): hit rate "
                      f"pinned {sim['pinned_hit_rate']:.1%}, LRU {sim['lru_hit_rate']:.1%}, "
                      f"Belady {sim['belady_hit_rate']:.1%}", highlight=False)
    g = out["gamma"]
    ranks = f"EP over {g['ep_ranks']}" if g["ep_ranks"] > 1 else "EP with the seed's fan-out 1"
    console.print(f"seed's gamma for this pass ({ranks} vs offload, resident "
                  f"{g['resident_fraction']:.1%}): {fmt(g['gamma'])} → {g['decision']}", highlight=False)
    best = next((s for s in out["strategies"] if s["name"] == out["best"]), None)
    if best is None:
        console.print("best: nothing fits", highlight=False)
    else:
        console.print(f"best: {best['name']} on {best['gpus']} of {sy['gpus']} GPUs, "
                      f"{fmt(best['tokens_per_s_per_gpu'])} tokens/s per GPU", highlight=False)


def _seconds(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x * 1e3:,.3g} ms" if x < 1 else f"{x:,.3g} s"
