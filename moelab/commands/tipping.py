"""`moelab tipping`: the prefill length N_t* above which offload beats expert parallelism."""

from __future__ import annotations

import json

from moelab.args import add_model_system_args, add_option_args, build_specs

HELP = "tipping point N_t*: offload wins for longer prefills (None: offload always wins)"


def add_arguments(p):
    add_model_system_args(p)
    add_option_args(p)
    p.add_argument("--routing", choices=("worst", "uniform"), default="worst",
                   help="worst: the seed's closed form N_t* = C E; uniform: solved numerically")
    p.add_argument("--all-models", action="store_true", help="every model preset on this system")
    p.add_argument("--json", action="store_true", help="print JSON (SI units)")
    p.set_defaults(decode=False, tokens=None, batch=1, steps=1, _tokens_default=1)


def tipping_row(args) -> dict:
    from moelab.costmodel.closed_form import evaluate

    model, system, workload, options = build_specs(args)
    # gamma at one token is the plateau C k of the seed (worst case, k <= E).
    r = evaluate(model, system, workload, options)
    return {"model": model.name, "system": system.name, "tipping_tokens": r.tipping_tokens,
            "tipping_tokens_low": r.tipping_tokens_low,
            "gamma_one_token": r.gamma, "C": r.gamma / min(model.top_k, model.n_experts),
            "E": model.n_experts, "k": model.top_k, "b_pcie": system.b_pcie,
            "b_net": system.b_net, "routing": options.routing}


def run(args) -> int:
    if args.all_models:
        from moelab.costmodel.presets import model_names

        rows = []
        for name in model_names():
            args.model = name
            rows.append(tipping_row(args))
    else:
        rows = [tipping_row(args)]
    if args.json:
        print(json.dumps(rows if args.all_models else rows[0], indent=1))
        return 0
    from rich.table import Table

    from moelab.show import console, fmt

    t = Table(title="tipping point N_t* (offload wins above it)", title_justify="left")
    low = any(r["tipping_tokens_low"] is not None for r in rows)
    cols = ("model", "system", "gamma at N_t=1", "N_t*") + (("N_t* low (EP latency)",) if low else ())
    for col in cols:
        t.add_column(col, justify="left" if col in ("model", "system") else "right")
    for r in rows:
        tip = "none: offload always wins" if r["tipping_tokens"] is None else fmt(r["tipping_tokens"])
        extra = (("-" if r["tipping_tokens_low"] is None else fmt(r["tipping_tokens_low"]),)
                 if low else ())
        t.add_row(r["model"], r["system"], fmt(r["gamma_one_token"]), tip, *extra)
    console().print(t)
    return 0
