"""`moelab fit`: an engine's own benchmark results against moelab's prediction, and a profile
fitted to them that `moelab plan --profile` reads."""

from __future__ import annotations

HELP = "your engine's benchmark results vs moelab's prediction; fit and write an engine profile"

ENGINES = ("vllm", "sglang", "trtllm", "ktransformers", "llama.cpp")  # costmodel/predict/profile.py's


def add_arguments(p):
    from moelab.args import DTYPES

    p.add_argument("files", nargs="+", metavar="FILE",
                   help="result files: vllm bench serve --save-result / throughput --output-json, "
                        "sglang.bench_serving --output-file, llama-bench -o json|jsonl, "
                        "trtllm-bench --report_json")
    g = p.add_argument_group("what the files lack (as moelab plan's flags)")
    g.add_argument("--system", required=True, help="GPU preset or system JSON the runs ran on")
    g.add_argument("--cpu", required=True, help="CPU preset of the host")
    g.add_argument("--model", help="preset or config.json, for files whose model id names neither")
    g.add_argument("--engine", choices=ENGINES,
                   help="the engine the profile refines, whose efficiencies predict the runs [the files']")
    g.add_argument("--gpus", type=int, metavar="N",
                   help="GPUs of a run whose file does not say [max(--tp, --ep), else 1]")
    g.add_argument("--tp", type=int, metavar="N", help="tensor-parallel size the engine ran with")
    g.add_argument("--ep", type=int, metavar="N", help="expert-parallel size the engine ran with")
    g.add_argument("--batch", type=int, metavar="B",
                   help="sequences decoded together, where the file does not record it")
    g.add_argument("--input-len", type=int, metavar="N", help="prompt tokens (vllm bench throughput)")
    g.add_argument("--output-len", type=int, metavar="N", help="output tokens (vllm bench throughput)")
    g.add_argument("--expert-dtype", choices=DTYPES,
                   help="expert weight dtype [llama-bench: the file's quantization; else config]")
    g.add_argument("--cpu-expert-dtype", choices=("int8", "int4", "bf16"),
                   help="expert weights on the CPU [llama-bench: the file's quantization; else int8]")
    g.add_argument("--kv-dtype", default="bf16", choices=DTYPES, help="KV cache dtype [bf16]")
    g.add_argument("--host-mem-gb", type=float, default=2000, metavar="GB", help="host DRAM [2000]")
    p.add_argument("--out", metavar="FILE", help="write the fitted profile here (JSON)")
    p.add_argument("--json", action="store_true", help="print the runs and the profile as JSON")


def _in_range(name, value, top):
    from moelab.costmodel.specs import SpecError

    if value is not None and not 1 <= value <= top:
        raise SpecError(f"{name}: must be an integer from 1 to {top:,}, got {value}")


def _source(args) -> str:
    """The command that made a profile, from the parsed flags (not sys.argv: the API and
    tests call it too)."""
    import shlex

    parts = ["moelab", "fit", *args.files]
    for flag, default in (("system", None), ("cpu", None), ("model", None), ("engine", None),
                          ("gpus", None), ("tp", None), ("ep", None), ("batch", None),
                          ("input_len", None), ("output_len", None), ("expert_dtype", None),
                          ("cpu_expert_dtype", None), ("kv_dtype", "bf16"), ("host_mem_gb", 2000),
                          ("out", None)):
        v = getattr(args, flag)
        if v is not None and v != default:
            parts += ["--" + flag.replace("_", "-"), f"{v:g}" if isinstance(v, float) else str(v)]
    return shlex.join(parts)


def compute(args) -> dict:
    import math

    from moelab import api
    from moelab.costmodel import fit as F
    from moelab.costmodel.engine_results import MAX_GPUS, MAX_RUNS, MAX_TOKENS, read_runs
    from moelab.costmodel.specs import SpecError

    for name in ("gpus", "tp", "ep", "batch", "input_len", "output_len"):
        top = MAX_GPUS if name in ("gpus", "tp", "ep") else MAX_TOKENS
        _in_range("--" + name.replace("_", "-"), getattr(args, name), top)
    if not (math.isfinite(args.host_mem_gb) and args.host_mem_gb > 0):
        raise SpecError(f"--host-mem-gb: must be > 0, got {args.host_mem_gb}")
    gpus = args.gpus or (max(args.tp or 1, args.ep or 1) if (args.tp or args.ep) else None)
    setup = F.Setup(system=args.system, cpu=args.cpu, model=args.model, gpus=gpus, engine=args.engine,
                    tp=args.tp, ep=args.ep, expert_dtype=args.expert_dtype,
                    cpu_expert_dtype=args.cpu_expert_dtype,
                    kv_dtype=args.kv_dtype, host_mem=args.host_mem_gb * 1e9)
    runs = []
    for f in args.files:
        runs += read_runs(f, batch=args.batch, input_len=args.input_len, output_len=args.output_len)
        if len(runs) > MAX_RUNS:
            raise SpecError(f"files: more than {MAX_RUNS:,} runs in all; fit fewer files at a time")
    engines = sorted({r.engine for r in runs})
    engine = args.engine or (engines[0] if len(engines) == 1 else None)
    if engine is None:
        raise SpecError(f"engine: the files come from {', '.join(engines)}: a profile refines one; "
                        "give --engine or fit each engine's files apart")
    preds = [F.predict_run(r, setup, api.plan) for r in runs]
    used = [i for i, p in enumerate(preds) if p is not None]
    if not used:
        raise SpecError("no run can be predicted: " + "; ".join(f"{r.label}: {r.skip}" for r in runs))
    fit = F.fit_scales([runs[i].measured_s for i in used], [preds[i].informs for i in used],
                       lambda j, prof: preds[used[j]].under(prof))
    fitted_from = [{"file": runs[i].file, "run": runs[i].label, "measured_s": runs[i].measured_s,
                    "informs": list(preds[i].informs)} for i in used]
    profile = F.make_profile(engine, fit, fitted_from, _source(args))
    rows = []
    for r, p in zip(runs, preds, strict=True):
        row = {"file": r.file, "run": r.label, "engine": r.engine, "what": r.what,
               "measured_s": r.measured_s, "notes": r.notes, "skip": r.skip}
        if p is not None:
            row.update(model=p.model, gpus=p.gpus, strategy=p.strategy, predicted_s=p.step_s,
                       bound_s=p.bound_s, error=p.step_s / r.measured_s - 1,
                       fitted_s=F.predict_run(r, setup, api.plan, profile).step_s, informs=p.informs,
                       dominant_share=p.dominant_share, terms=p.terms)
        rows.append(row)
    return {"runs": rows, "profile": profile, "runs_per_term": fit.runs_per_term, "refused": fit.refused}


def run(args) -> int:
    import json

    out = compute(args)
    if args.out:
        from moelab.io import write_json

        write_json(args.out, out["profile"], make_parents=False)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    _print(out, args.out)
    return 0


def _ms(x):
    return "—" if x is None else (f"{x * 1e3:,.4g} ms" if x < 1 else f"{x:,.4g} s")


def _print(out: dict, path: str | None) -> None:
    from moelab.costmodel.predict.profile import TERMS

    rows, prof = out["runs"], out["profile"]
    print(f"{'run':<34} {'measured':>11} {'predicted':>11} {'bound':>11} {'error':>8}  informs")
    for r in rows:
        name = f"{r['file'].rsplit('/', 1)[-1]} {r['run']}"[:34]
        if r["skip"]:
            print(f"{name:<34} {_ms(r['measured_s']):>11}  not predicted: {r['skip']}")
            continue
        informs = (", ".join(r["informs"])
                   or f"nothing (no term is half the step; top {r['dominant_share']:.0%})")
        print(f"{name:<34} {_ms(r['measured_s']):>11} {_ms(r['predicted_s']):>11} {_ms(r['bound_s']):>11} "
              f"{r['error']:>+8.1%}  {informs}")
    for r in rows:
        if not r["skip"]:
            print(f"  {r['run']}: {r['what']}; {r['model']} on {r['gpus']} GPU(s), {r['strategy']}"
                  + "".join(f"; {n}" for n in r["notes"]))
    print(f"profile for {prof['engine']}:")
    for t, s in prof["scale"].items():
        u = prof["uncertainty"][t]
        n = out["runs_per_term"][t]
        unc = f", std of log {u:.3g}" if u is not None else " (no uncertainty under 3 runs)"
        print(f"  {t} x {s:.4g} from {n} run{'s' if n > 1 else ''}{unc}")
    for t, why in out["refused"].items():
        print(f"  {t} not fitted: {why}")
    stayed = [t for t in TERMS if t not in prof["scale"]]
    print(f"  stayed at 1: {', '.join(stayed)}; per_step_s and per_layer_s 0 (not fitted)")
    if path:
        print(f"wrote {path} (moelab plan --profile {path})")
