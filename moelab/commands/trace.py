"""`moelab trace import | fit`: recorded routings in (docs/traces.md), and how well the
generators reproduce them.

    moelab trace import LOG.jsonl --out trace.json [--layer-field layer --ids-field topk_ids]
    moelab trace import expert_distribution_recorder_*.pt --out trace.json   # SGLang dump
    moelab trace import responses.json --format vllm-routed --out trace.json
    moelab trace fit trace.json [--ep-ranks 8] [--json]
"""

from __future__ import annotations

HELP = "routing traces: import router logs and the engines' routing records; fit Zipf and Dirichlet"


def add_arguments(p):
    sub = p.add_subparsers(dest="action", required=True)
    imp = sub.add_parser("import", help="a routing record (JSON-lines log, SGLang expert-distribution "
                                        "dump, SGLang or vLLM routed-experts responses) -> a trace "
                                        "or histogram file")
    imp.add_argument("log", help="JSON-lines router log, SGLang .pt dump, or saved JSON responses")
    imp.add_argument("--format", choices=FORMATS, default="auto",
                     help="jsonl: router-log records; sglang-dump: /dump_expert_distribution_record's "
                          ".pt (per_token -> trace; stat, stat_approx, per_pass -> histogram); "
                          "sglang-routed / vllm-routed: responses with routed_experts "
                          "[auto: .pt is sglang-dump, else jsonl]")
    imp.add_argument("--out", required=True,
                     help="file to write: a trace (.json or .npz), or a histogram [L][E] "
                          "(.json or .npy) for counts-only dumps and with --histogram")
    imp.add_argument("--histogram", action="store_true",
                     help="write the per-layer histogram of expert choices instead of the trace "
                          "(for --routing hist:FILE)")
    imp.add_argument("--top-k", type=int, default=None,
                     help="k, to shape SGLang's flat routed_experts (the model's num_experts_per_tok)")
    imp.add_argument("--hidden-layers", type=int, default=None,
                     help="decoder layers in SGLang's routed_experts (default: from the response's "
                          "prompt_tokens + completion_tokens - 1 tokens)")
    imp.add_argument("--layer-field", default="layer",
                     help="record field holding the MoE layer index (a.b for nested) [layer]")
    imp.add_argument("--ids-field", default="topk_ids",
                     help="record field holding the top-k ids: [k] per token or [[k], ...] per "
                          "batch [topk_ids]")
    imp.add_argument("--num-experts", type=int, default=None,
                     help="E (default: the largest id + 1, which undercounts if experts never fire)")
    imp.add_argument("--truncate", action="store_true",
                     help="cut every layer to the shortest one's tokens (else unequal layers are an error)")
    for name in ("model", "source", "dataset"):
        imp.add_argument(f"--{name}", default="", help=f"{name} to record in the trace")
    imp.add_argument("--json", action="store_true", help="print a JSON summary")
    fit = sub.add_parser("fit", help="ML Zipf exponent and Dirichlet concentration of a trace, "
                                     "and the N_ue(N_t) and max-rank-load errors of uniform, Zipf "
                                     "and Dirichlet against the trace")
    fit.add_argument("file", help="trace file (.json or .npz)")
    fit.add_argument("--ep-ranks", type=int, default=None,
                     help="EP ranks for the max-rank load [min(8, E)]")
    fit.add_argument("--samples", type=int, default=200,
                     help="sampled layers per generator and N_t [200]")
    fit.add_argument("--seed", type=int, default=0, help="random seed [0]")
    fit.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    import json

    if args.action == "import":
        out = do_import(args)
        if args.json:
            print(json.dumps(out, indent=1))
        elif out.get("histogram"):
            print(f"wrote histogram {out['out']}: {out['layers']} layers x E={out['num_experts']}, "
                  f"{out['choices']:,} expert choices" + _notes(out))
        else:
            print(f"wrote {out['out']}: E={out['num_experts']}, k={out['top_k']}, "
                  f"{len(out['layers'])} layers, {out['tokens']:,} tokens"
                  + (f", {len(out['batch_sizes'])} batches" if out.get("batch_sizes") else "")
                  + _notes(out))
        return 0
    from moelab.costmodel.trace import fit

    out = fit(args.file, args.ep_ranks, args.samples, args.seed)
    if args.json:
        from moelab.api import finite_or_null

        print(json.dumps(finite_or_null(out), indent=1, allow_nan=False))
    else:
        print_fit(out)
    return 0


# --- import ------------------------------------------------------------------------------------

FORMATS = ("auto", "jsonl", "sglang-dump", "sglang-routed", "vllm-routed")


def _notes(out: dict) -> str:
    text = ""
    if out.get("dropped_layers"):
        text += f"; engine layers {out['dropped_layers']} had no routed expert (dense) and were dropped"
    if out.get("expert_ids"):
        text += f"; expert ids are {out['expert_ids']}"
    return text


def _field(record: dict, name: str, n: int, flag: str):
    from moelab.costmodel.specs import SpecError

    value = record
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise SpecError(f"log: record {n} has no field {name!r} (set it with {flag})")
        value = value[part]
    return value


def _jsonl(args) -> dict:
    """JSON-lines router logs (one record per token or per batch) -> the trace's raw fields."""
    import numpy as np

    from moelab.costmodel.jsonfile import read_json_lines
    from moelab.costmodel.specs import SpecError

    per_layer: dict[int, list] = {}
    batches: dict[int, list[int]] = {}
    k = None
    for n, rec in enumerate(read_json_lines(args.log, "log"), 1):
        if not isinstance(rec, dict):
            raise SpecError(f"log: record {n} is not a JSON object")
        layer = _field(rec, args.layer_field, n, "--layer-field")
        value = _field(rec, args.ids_field, n, "--ids-field")
        try:
            ids = np.asarray(value)
        except ValueError:
            ids = np.zeros((0, 0))  # ragged lists: refused below
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise SpecError(f"log: record {n}: layer must be an integer >= 0, got {layer!r}")
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.shape[1] == 0:
            raise SpecError(f"log: record {n}: ids must be [k] or [[k], ...] integers")
        if k is None:
            k = ids.shape[1]
        if ids.shape[1] != k:
            raise SpecError(f"log: record {n} has {ids.shape[1]} ids per token, earlier records {k}")
        per_layer.setdefault(layer, []).append(ids)
        batches.setdefault(layer, []).append(ids.shape[0])
    if not per_layer:
        raise SpecError(f"log: {args.log!r} holds no records")
    layers = sorted(per_layer)
    ids = [np.concatenate(per_layer[l]) for l in layers]
    counts = [len(x) for x in ids]
    if len(set(counts)) > 1 and not args.truncate:
        raise SpecError(f"log: layers hold different token counts ({min(counts)}..{max(counts)}); "
                        "--truncate cuts them to the shortest")
    T = min(counts)
    raw = {"layers": layers, "ids": np.stack([x[:T] for x in ids])}
    sizes = batches[layers[0]]
    if any(s > 1 for s in sizes) and all(batches[l] == sizes for l in layers) and sum(sizes) == T:
        raw["batch_sizes"] = sizes  # per-batch records: each is a recorded forward pass
    return raw


def _engine(args, fmt: str) -> dict:
    """An engine's own record -> the trace's raw fields, or {"histogram": [L, E]}."""
    from moelab.costmodel import engine_traces as et

    if fmt == "sglang-dump":
        got = et.sglang_dump(args.log)
    else:
        got = et.routed_experts(args.log, fmt.split("-")[0], args.top_k, args.hidden_layers)
    note = {"dropped_layers": got["dropped_layers"]}
    if "mode" in got:
        note["mode"] = got["mode"]
        if not got["logical"]:
            note["expert_ids"] = "physical (the dump has no last_physical_to_logical_map)"
    if "histogram" in got:
        return {"histogram": got["histogram"], "num_experts": got["num_experts"], **note}
    raw = {"layers": list(range(got["ids"].shape[0])), "ids": got["ids"], **note}
    if got.get("batch_sizes"):
        raw["batch_sizes"] = got["batch_sizes"]
    if got.get("num_experts"):
        raw["num_experts"] = got["num_experts"]
    return raw


def _write_histogram(out: str, h) -> None:
    import io

    import numpy as np

    from moelab.io import write_atomic, write_json

    if out.endswith(".npy"):
        buf = io.BytesIO()
        np.save(buf, np.asarray(h, np.int64), allow_pickle=False)
        write_atomic(out, buf.getvalue(), make_parents=False)
    else:
        # [L][E], as `--routing hist:FILE.json` reads
        write_json(out, np.asarray(h).tolist(), make_parents=False)


def do_import(args) -> dict:
    import numpy as np

    from moelab.costmodel import trace as tr
    from moelab.costmodel.specs import SpecError
    from moelab.io import require_folder, write_atomic, write_json

    require_folder(args.out)  # before the log is read: a missing folder is not created
    fmt = args.format
    if fmt == "auto":
        fmt = "sglang-dump" if args.log.endswith(".pt") else "jsonl"
    raw = _jsonl(args) if fmt == "jsonl" else _engine(args, fmt)
    note = {n: raw.pop(n) for n in ("dropped_layers", "mode", "expert_ids") if n in raw}
    E_found = raw.pop("num_experts", None)
    if args.num_experts is not None and E_found is not None and args.num_experts != E_found:
        raise SpecError(f"num_experts: {args.log!r} records {E_found} experts per layer, "
                        f"--num-experts says {args.num_experts}")
    histogram = "histogram" in raw or args.histogram
    suffixes = (".json", ".npy") if histogram else (".json", ".npz")
    if not args.out.endswith(suffixes):
        raise SpecError(f"out: a {'histogram' if histogram else 'trace'} is written as "
                        f"{' or '.join(suffixes)}, got {args.out!r}")
    if "histogram" in raw:  # counts only (SGLang stat / per_pass): no tokens, no trace
        h = raw["histogram"]
        if args.num_experts is not None and h.shape[1] != args.num_experts:
            raise SpecError(f"num_experts: {args.log!r} counts {h.shape[1]} experts, "
                            f"--num-experts says {args.num_experts}")
        _write_histogram(args.out, h)
        return {"out": args.out, "histogram": True, "layers": int(h.shape[0]),
                "num_experts": int(h.shape[1]), "choices": int(h.sum()), **note}
    ids = raw["ids"]
    E = args.num_experts or E_found or (int(ids.max()) + 1 if ids.size else 1)
    raw.update(model=args.model, source=args.source or str(args.log), dataset=args.dataset,
               num_experts=E, top_k=int(ids.shape[2]))
    trace = tr.from_dict(raw, args.log)  # the same validation as a loaded trace
    if histogram:
        h = tr.histogram(trace)
        _write_histogram(args.out, h)
        return {"out": args.out, "histogram": True, "layers": int(h.shape[0]),
                "num_experts": E, "choices": int(h.sum()), "tokens": trace.tokens, **note}
    data = tr.to_dict(trace)
    if args.out.endswith(".npz"):
        import io

        buf = io.BytesIO()
        np.savez_compressed(buf, **{n: np.asarray(v) for n, v in data.items()})
        write_atomic(args.out, buf.getvalue(), make_parents=False)
    else:
        write_json(args.out, data, make_parents=False)
    return {"out": args.out, **{n: v for n, v in data.items() if n != "ids"}, **note}


# --- fit ---------------------------------------------------------------------------------------


def print_fit(out: dict) -> None:
    from rich.table import Table

    from moelab.show import console as make_console
    from moelab.show import fmt

    c = make_console()
    c.print(f"trace {out['file']}: E={out['num_experts']}, k={out['top_k']}, "
            f"{out['layers']} layers, {out['tokens']:,} tokens", highlight=False)
    c.print(f"maximum likelihood on its histogram: Zipf s = {out['zipf_s']:.4g}, "
            f"Dirichlet a = {out['dirichlet_a']:.4g}", highlight=False)
    for what, key in (("N_ue (experts used per layer)", "n_ue"),
                      (f"max-rank load (EP{out['ep_ranks']}: most (token, expert) pairs on one rank)",
                       "max_rank_load")):
        t = Table(title=what)
        t.add_column("N_t", justify="right")
        t.add_column("windows", justify="right")
        t.add_column("trace", justify="right")
        for g in ("uniform", "zipf", "dirichlet"):
            t.add_column(g, justify="right")
            t.add_column("error", justify="right")
        for r in out["rows"]:
            if not r["windows"]:
                t.add_row(str(r["tokens"]), "0", "trace too short", *[""] * 6)
                continue
            cells = []
            for g in ("uniform", "zipf", "dirichlet"):
                cells += [fmt(r[f"{g}_{key}"]), f"{r[f'{g}_{key}_error']:+.1%}"]
            t.add_row(f"{r['tokens']:,}", f"{r['windows']:,}", fmt(r[f"trace_{key}"]), *cells)
        c.print(t)
    c.print(f"Generators: {out['samples']} sampled layers per N_t (uniform N_ue: closed form); "
            "error = generator / trace - 1.", highlight=False)
