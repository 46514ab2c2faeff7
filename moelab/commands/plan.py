"""`moelab plan`: which deployment to pick (EP, expert TP, offload, CPU experts, hybrid), memory included."""

from __future__ import annotations

HELP = "which deployment gives the most tokens/s per GPU: EP, expert TP, offload, CPU experts or a hybrid"


def add_arguments(p):
    from moelab.args import DTYPES
    from moelab.costmodel.presets import ISAS

    g = p.add_argument_group("model and hardware")
    g.add_argument("--model", default="deepseek-r1",
                   help="preset or path to a HF config.json [deepseek-r1]")
    g.add_argument("--system", default="h100-sxm", help="GPU preset or system JSON [h100-sxm]")
    g.add_argument("--gpus", type=int, default=8, metavar="N", help="GPUs available [8]")
    g.add_argument("--gpus-per-node", type=int, metavar="G", help="GPUs per node [the system's]")
    g.add_argument("--cpu", default="xeon-8470",
                   help="CPU preset of each node (moelab presets cpus) or a CPU file in the presets' "
                        "schema (moelab presets --show NAME --json; moelab calibrate --cpu) [xeon-8470]")
    g.add_argument("--cpu-isa", choices=ISAS,
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
    w.add_argument("--phase", choices=("prefill", "decode", "both"),
                   help="plan for requests of --prompt and --output tokens: their prefill (passes of "
                        "--tokens, default one prompt), their decode (steps of --decode-batch at context "
                        "prompt + output/2), or both, joined per request (docs/plan.md)")
    w.add_argument("--prompt", type=int, metavar="P", help="with --phase: prompt tokens per request [4096]")
    w.add_argument("--output", type=int, metavar="O",
                   help="with --phase decode or both: output tokens per request")
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
    e = p.add_argument_group("prediction")
    e.add_argument("--engine", choices=("vllm", "sglang", "trtllm", "ktransformers", "llama.cpp", "ideal"),
                   help="whose achieved efficiencies predict the step; ideal = the roofline "
                        "[the profile's, else the best supported for the GPU]")
    e.add_argument("--micro-batches", type=int, choices=(1, 2), default=1, metavar="{1,2}",
                   help="EP: 2 = two-batch overlap (SGLang --enable-two-batch-overlap, DeepSeek's "
                        "dual micro-batch overlap), 1 = serial, SGLang's default [1]")
    e.add_argument("--profile", metavar="FILE",
                   help="a user profile (moelab fit writes it) scaling the predicted terms")
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
    if args.phase is None:
        for flag, v in (("--prompt", args.prompt), ("--output", args.output)):
            if v is not None:
                raise SpecError(f"{flag} {v}: a request's length goes with --phase prefill|decode|both")
    if args.phase == "both" and args.slo_ms is not None:
        raise SpecError("--slo-ms: a step budget is per phase (TTFT or TPOT): not yet with --phase both")
    if args.phase == "both" and args.emit:
        raise SpecError("--emit: launch flags for one phase at a time (--phase prefill or decode), "
                        "not yet for --phase both")
    return api.plan(args.model, args.system, gpus=args.gpus, gpus_per_node=args.gpus_per_node,
                    cpu=args.cpu, cpu_isa=args.cpu_isa,
                    cpu_sockets=args.cpu_sockets, host_mem=args.host_mem_gb * 1e9,
                    gpus_per_host_link=args.gpus_per_host_link, tokens=args.tokens,
                    decode_batch=args.decode_batch, context=args.context, routing=args.routing,
                    slo=args.slo_ms / 1e3 if args.slo_ms is not None else None,
                    kv_dtype=args.kv_dtype, cpu_expert_dtype=args.cpu_expert_dtype,
                    expert_dtype=args.expert_dtype, nominal=args.nominal, host_dram_bw=dram,
                    cache_steps=args.cache_steps, seed=args.seed, engine=args.engine,
                    profile=args.profile, phase=args.phase, prompt=args.prompt, output=args.output,
                    micro_batches=args.micro_batches)


def run(args) -> int:
    out = compute(args)
    if args.json:
        print(out.to_json())
    elif "combined" in out:
        print_phases(out)
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
    h = out["host"]
    if h.get("cpu_matrix_rate_measured") or h.get("cpu_weight_bw_measured"):  # a calibrated CPU file
        kind = {True: "measured", False: "peak"}
        console.print(f"CPU experts at {h['cpu_expert_dtype']}: {h['cpu_matrix_rate'] / 1e9:,.3g} GOP/s "
                      f"({kind[h['cpu_matrix_rate_measured']]}), weights at {h['cpu_weight_bw'] / 1e9:,.3g} "
                      f"GB/s ({'measured' if h['cpu_weight_bw_measured'] else 'nominal DRAM'})",
                      highlight=False)
    t = Table()
    prof = f", profile {out['profile'].get('path', '(dict)')}" if out.get("profile") else ""
    console.print(f"engine: {out['engine']} ({out['engine_note']}{prof}); step = the engine's prediction, "
                  "roofline = the bound", highlight=False)
    for col, just in (("#", "right"), ("strategy", "left"), ("GPUs", "right"), ("step", "right"),
                      ("roofline", "right"), ("tokens/s", "right"), ("per GPU", "right"),
                      ("bound", "left")):
        t.add_column(col, justify=just)
    for i, s in enumerate(out["strategies"], 1):
        ok = s["feasible"]
        t.add_row(str(i) if ok else "—", s["name"], str(s["gpus"]), _seconds(s["step_s"]),
                  _seconds(s.get("bound_step_s")),
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


def print_phases(out: dict) -> None:
    """--phase both: each way to serve both phases, per phase its strategy, step and roofline,
    joined per request."""
    from rich.table import Table

    from moelab.show import console as make_console
    from moelab.show import fmt

    w, sy, c = out["workload"], out["system"], out["combined"]
    console = make_console()
    passes = f"{c['prefill_passes']} passes of {w['prefill_tokens_per_pass']:,}" \
        if c["prefill_passes"] > 1 else f"passes of {w['prefill_tokens_per_pass']:,} tokens"
    console.print(f"plan: {out['model']} on {sy['gpus']} x {sy['name']}, host {out['host']['cpu']}: "
                  f"requests of {w['prompt']:,} prompt + {w['output']:,} output tokens; prefill {passes}, "
                  f"decode batch {w['decode_batch']:,} at mean context {w['decode_context']:,}",
                  highlight=False)
    console.print(f"engine: {out['engine']} ({out['engine_note']}); step = the engine's prediction, "
                  "roofline = the bound; per GPU = output tokens/s per GPU (all tokens: JSON "
                  "tokens_per_s_per_gpu)", highlight=False)
    for phase in ("prefill", "decode"):
        r = out["phases"][phase]
        best = next((s for s in r["strategies"] if s["name"] == r["best"]), None)
        from moelab.costmodel.phases import mode

        alone = (f"{best['name']} on {best['gpus']} GPU{'s' if best['gpus'] > 1 else ''} ({mode(best)}), "
                 f"step {_seconds(best['step_s'])}, {fmt(best['tokens_per_s_per_gpu'])} tokens/s per GPU"
                 if best else "nothing fits")
        console.print(f"{phase} alone: {alone}", highlight=False)
    t = Table()
    for col, just in (("#", "right"), ("kind", "left"), ("GPUs", "right"), ("prefill", "left"),
                      ("step", "right"), ("roofline", "right"), ("decode", "left"), ("step", "right"),
                      ("roofline", "right"), ("request", "right"), ("per GPU", "right")):
        t.add_column(col, justify=just, no_wrap=True)
    for i, o in enumerate(c["options"], 1):
        ok = o["feasible"]
        a, b = o.get("prefill") or {}, o.get("decode") or {}
        gpus = f"{a['pool_gpus']}+{b['pool_gpus']}" if ok and "pool_gpus" in a else str(o["gpus"])
        t.add_row(str(i) if ok else "—", o["kind"], gpus, a.get("name", "—"),
                  _seconds(a.get("step_s") if ok else None), _seconds(a.get("bound_step_s") if ok else None),
                  b.get("name", "—"), _seconds(b.get("step_s") if ok else None),
                  _seconds(b.get("bound_step_s") if ok else None),
                  _long(o.get("request_s")), fmt(o["output_tokens_per_s_per_gpu"]) if ok else "—")
    console.print(t)
    for i, o in enumerate(c["options"], 1):
        if o["feasible"]:
            console.print(f"{i}. {o['kind']}: prefill {o['prefill']['mode']}; decode {o['decode']['mode']}"
                          + (f"; KV {o['kv_bytes_per_request'] / 1e9:,.3g} GB per request over the network, "
                             f"{_seconds(o['kv_transfer_s'])}" if o["kind"] == "disaggregated" else
                             f"; the decode also stalls {_long(o['decode_stall_s'])} per request while the "
                             "same GPUs prefill other prompts"),
                          highlight=False, soft_wrap=True)
        else:
            console.print(f"—  {o['kind']} {o.get('prefill', {}).get('name', '')}"
                          f"{'/' + o['decode']['name'] if 'decode' in o else ''}: {o['reason']}",
                          highlight=False, soft_wrap=True)
    single, best = c["best_single"], c["best"]
    if best is None:
        console.print("best: nothing serves both phases", highlight=False)
        return
    if single is not None:
        console.print(f"best single strategy: {single['prefill']['name']} on {single['gpus']} "
                      f"GPU{'s' if single['gpus'] > 1 else ''}, "
                      f"{fmt(single['output_tokens_per_s_per_gpu'])} output tokens/s per GPU, "
                      f"{_long(single['request_s'])} per request", highlight=False)
    a, b = best["prefill"], best["decode"]
    console.print(f"best: {best['kind']}, prefill {a['name']} ({a['mode']}) / "
                  f"decode {b['name']} ({b['mode']}), "
                  f"{fmt(best['output_tokens_per_s_per_gpu'])} output tokens/s per GPU "
                  f"({fmt(best['tokens_per_s_per_gpu'])} with the prompt), {_long(best['request_s'])} "
                  "per request", highlight=False)


def _long(x: float | None) -> str:
    """A request's time: ms, s, then whole seconds (no exponent)."""
    return _seconds(x) if x is None or x < 100 else f"{x:,.0f} s"
