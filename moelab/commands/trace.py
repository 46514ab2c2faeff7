"""`moelab trace import | fit`: recorded routings in (docs/traces.md), and how well the
generators reproduce them.

    moelab trace import LOG.jsonl --out trace.json [--layer-field layer --ids-field topk_ids]
    moelab trace fit trace.json [--ep-ranks 8] [--json]
"""

from __future__ import annotations

HELP = "routing traces: import JSON-lines router logs; fit Zipf and Dirichlet to a trace"


def add_arguments(p):
    sub = p.add_subparsers(dest="action", required=True)
    imp = sub.add_parser("import", help="JSON-lines routing log (one record per token or per "
                                        "batch, with a layer and top-k ids) -> a trace file")
    imp.add_argument("log", help="JSON-lines file, e.g. from a vLLM or SGLang router-logging patch")
    imp.add_argument("--out", required=True, help="trace file to write (.json or .npz)")
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
        else:
            print(f"wrote {out['out']}: E={out['num_experts']}, k={out['top_k']}, "
                  f"{len(out['layers'])} layers, {out['tokens']:,} tokens"
                  + (f", {len(out['batch_sizes'])} batches" if out.get("batch_sizes") else ""))
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


def _field(record: dict, name: str, line: int):
    from moelab.costmodel.specs import SpecError

    value = record
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise SpecError(f"log: line {line} has no field {name!r} (set it with "
                            f"--{'layer' if name == 'layer' else 'ids'}-field)")
        value = value[part]
    return value


def do_import(args) -> dict:
    import json
    from pathlib import Path

    import numpy as np

    from moelab.costmodel import trace as tr
    from moelab.costmodel.specs import SpecError
    from moelab.io import write_atomic, write_json

    path = Path(args.log)
    if not path.is_file():
        raise SpecError(f"log: no such file {args.log!r}")
    if not args.out.endswith((".json", ".npz")):
        raise SpecError(f"out: must end in .json or .npz, got {args.out!r}")
    per_layer: dict[int, list] = {}
    batches: dict[int, list[int]] = {}
    k = None
    with path.open() as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except ValueError as e:
                raise SpecError(f"log: line {n} is not JSON: {e}") from None
            except RecursionError:
                raise SpecError(f"log: line {n} nests its JSON too deeply to read") from None
            layer = _field(rec, args.layer_field, n)
            ids = np.asarray(_field(rec, args.ids_field, n))
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise SpecError(f"log: line {n}: layer must be an integer >= 0, got {layer!r}")
            if ids.ndim == 1:
                ids = ids[None]
            if ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.shape[1] == 0:
                raise SpecError(f"log: line {n}: ids must be [k] or [[k], ...] integers")
            if k is None:
                k = ids.shape[1]
            if ids.shape[1] != k:
                raise SpecError(f"log: line {n} has {ids.shape[1]} ids per token, earlier lines {k}")
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
    stacked = np.stack([x[:T] for x in ids])
    E = args.num_experts if args.num_experts is not None else int(stacked.max()) + 1
    raw = {"model": args.model, "source": args.source or str(path), "dataset": args.dataset,
           "num_experts": E, "top_k": int(k), "layers": layers, "ids": stacked}
    sizes = batches[layers[0]]
    if any(s > 1 for s in sizes) and all(batches[l] == sizes for l in layers) and sum(sizes) == T:
        raw["batch_sizes"] = sizes  # per-batch records: each is a recorded forward pass
    trace = tr.from_dict(raw, args.log)  # the same validation as a loaded trace
    data = tr.to_dict(trace)
    if args.out.endswith(".npz"):
        import io

        buf = io.BytesIO()
        np.savez_compressed(buf, **{n: np.asarray(v) for n, v in data.items()})
        write_atomic(args.out, buf.getvalue())
    else:
        write_json(args.out, data)
    return {"out": args.out, **{n: v for n, v in data.items() if n != "ids"}}


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
