"""`moelab gamma`: offload or expert parallelism, for one model, system and workload."""

from __future__ import annotations

import json
import math

from moelab.args import (
    add_model_system_args,
    add_option_args,
    add_workload_args,
    build_specs,
)

HELP = "gamma = offload overhead / EP overhead (< 1: offload wins, > 1: EP wins)"

CLOSED_FORM_ROUTINGS = ("worst", "uniform")


def add_arguments(p):
    add_model_system_args(p)
    add_workload_args(p)
    add_option_args(p)
    g = p.add_argument_group("routing and extras")
    g.add_argument("--routing", default="worst",
                   help="worst (the seed) | uniform | zipf:S | dirichlet:A | groups | "
                        "logits:FILE.npy | hist:FILE (Monte Carlo with --samples) [worst]")
    g.add_argument("--samples", type=int, default=0,
                   help="Monte Carlo samples of concrete routings (JAX reference) [0]")
    g.add_argument("--seed", type=int, default=0, help="random seed for --samples [0]")
    g.add_argument("--sensitivities", action="store_true",
                   help="elasticities d ln(gamma)/d ln(theta) (JAX grad)")
    g.add_argument("--overlap", action="store_true",
                   help="also gamma with transfers overlapped with compute (timeline)")
    g.add_argument("--lookahead", action="store_true",
                   help="with --overlap: prefetch layer l+1's predicted experts during layer l")
    g.add_argument("--hit-rate", type=float, default=1.0,
                   help="with --lookahead: share of predicted experts that are right [1]")
    g.add_argument("--microbatches", type=int, default=2,
                   help="with --overlap: EP micro-batches overlapping compute and network [2]")
    p.add_argument("--json", action="store_true", help="print JSON (SI units)")


def compute(args) -> dict:
    """Everything `moelab gamma` reports, as one JSON-ready dict."""
    from moelab.costmodel.closed_form import evaluate
    from moelab.costmodel.specs import SpecError

    model, system, workload, options = build_specs(args)
    if args.samples < 0:
        raise SpecError(f"--samples: must be >= 0, got {args.samples}")
    if args.routing not in CLOSED_FORM_ROUTINGS and args.samples == 0:
        raise SpecError(f"--routing: {args.routing} needs Monte Carlo: add --samples N")
    r = evaluate(model, system, workload, options)
    out = {
        "gamma": r.gamma,
        "gamma_seed_formula": r.gamma_seed,
        "decision": r.decision,
        "deciding_factor": r.deciding_factor,
        "n_ue": r.n_ue,
        "tokens": r.tokens,
        "tipping_tokens": _plain(r.tipping_tokens) if not workload.decode else None,
        "t_b_s": r.t_b,
        "t_p_s": r.t_p,
        "t_ep_s": r.t_ep,
        "t_p_overhead_s": r.t_p_overhead,
        "t_ep_overhead_s": r.t_ep_overhead,
        "model_term": r.model_term,
        "system_term": r.system_term,
        "query_term": r.query_term,
        "fanout": r.fanout,
        "f_e": r.f_e,
        "f_a": r.f_a,
        "f_dispatch": r.f_dispatch,
        "f_combine": r.f_combine,
        "b_pcie": r.b_pcie,
        "b_net": r.b_net,
        "alpha_pcie_s": system.alpha_pcie,
        "alpha_net_s": system.alpha_net,
        "resident_fraction": options.resident_fraction,
        "routing": options.routing,
        "model": {"name": model.name, "L": model.n_moe_layers, "E": model.n_experts,
                  "k": model.top_k, "d": model.hidden, "I": model.expert_intermediate,
                  "S_E": model.expert_params, "expert_dtype": model.expert_dtype,
                  "act_dtype": model.act_dtype},
        "system": {"name": system.name, "host_link": system.host_link, "network": system.network},
        "workload": {"decode": workload.decode, "tokens": workload.tokens,
                     "batch": workload.batch, "steps": workload.steps},
    }
    if args.samples:
        from moelab.costmodel.reference import gamma_distribution

        dist = gamma_distribution(model, system, workload, options, routing=args.routing,
                                  samples=args.samples, seed=args.seed)
        out.update(dist)
        out["routing"] = args.routing
        out["routing_closed_form"] = options.routing
    if args.overlap:
        from moelab.costmodel.timeline import overlap_gammas

        if not 0 <= args.hit_rate <= 1:
            raise SpecError(f"--hit-rate: must be in [0, 1], got {args.hit_rate}")
        if args.microbatches < 1:
            raise SpecError(f"--microbatches: must be >= 1, got {args.microbatches}")
        out.update(overlap_gammas(model, system, workload, options,
                                  lookahead=int(args.lookahead), hit_rate=args.hit_rate,
                                  microbatches=args.microbatches))
    if args.sensitivities:
        from moelab.costmodel.reference import sensitivities

        out["sensitivities"] = sensitivities(model, system, workload, options)
    return out


def _plain(x):
    """JSON-friendly number: integers print as integers."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    if math.isinf(x):  # EP costs nothing (one rank): offload never wins; null in JSON
        return x
    return int(round(x)) if abs(x - round(x)) < 1e-6 * max(1.0, abs(x)) else x


def _finite_or_null(obj):
    """Strict JSON has no inf or NaN: a gamma with nothing left to hide behind is null."""
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def run(args) -> int:
    out = compute(args)
    if args.json:
        print(json.dumps(_finite_or_null(out), indent=1, allow_nan=False))
    else:
        print_table(out)
    return 0


def print_table(out: dict) -> None:
    from rich.table import Table

    from moelab.show import console as make_console
    from moelab.show import fmt

    m, w = out["model"], out["workload"]
    where = (f"decode, batch {w['batch']} x {w['steps']} steps" if w["decode"]
             else f"prefill of {out['tokens']:,} tokens")
    t = Table(title=f"gamma: {m['name']} on {out['system']['name']}, {where}",
              title_justify="left")
    t.add_column("factor")
    t.add_column("formula")
    t.add_column("value", justify="right")
    decides = out["deciding_factor"]
    mark = {name: " ◀ decides" if name == decides else "" for name in ("model", "system", "query")}
    t.add_row("model" + mark["model"], "S_E f_E / (d f_a)", fmt(out["model_term"]))
    t.add_row("system" + mark["system"], "B_net / B_pcie", fmt(out["system_term"]))
    t.add_row("query" + mark["query"], f"N_ue / N_t = {fmt(out['n_ue'])} / {out['tokens']:,}",
              fmt(out["query_term"]))
    t.add_row("seed gamma", "1/2 · model · system · query", fmt(out["gamma_seed_formula"]))
    extra = out["gamma"] / out["gamma_seed_formula"] if out["gamma_seed_formula"] else float("nan")
    if abs(extra - 1) > 1e-12:
        t.add_row("past the seed", "fan-out, dtypes, latency, residency", f"×{fmt(extra)}")
    t.add_row("[bold]gamma[/bold]", "(T_P - T_B) / (T_EP - T_B)", f"[bold]{fmt(out['gamma'])}[/bold]")
    t.add_section()
    t.add_row("T_P - T_B", "offload overhead", f"{fmt(out['t_p_overhead_s'])} s")
    t.add_row("T_EP - T_B", "EP overhead", f"{fmt(out['t_ep_overhead_s'])} s")
    t.add_row("T_B", "roofline baseline (MoE layers)", f"{fmt(out['t_b_s'])} s")
    if out.get("tipping_tokens") == math.inf:
        t.add_row("N_t*", "tokens where gamma = 1", "none: EP wins at every N_t")
    elif out.get("tipping_tokens") is not None:
        t.add_row("N_t*", "tokens where gamma = 1", f"{fmt(out['tipping_tokens'])}")
    elif not w["decode"]:
        t.add_row("N_t*", "tokens where gamma = 1", "none: offload wins at every N_t")
    if "gamma_mean" in out:
        t.add_section()
        t.add_row(f"gamma ({out['routing']})", f"{out.get('samples', '')} sampled routings",
                  f"{fmt(out['gamma_mean'])} [{fmt(out['gamma_p05'])}, {fmt(out['gamma_p95'])}]")
        t.add_row("N_ue mean", "used experts per layer", fmt(out["n_ue_mean"]))
        if "offload_win_fraction" in out:
            t.add_row("offload wins", "share of samples", f"{out['offload_win_fraction']:.1%}")
    if "gamma_overlap" in out:
        t.add_section()
        t.add_row("gamma overlapped", "transfers hidden behind compute", fmt(out["gamma_overlap"]))
        t.add_row("  with an oracle prefetch", "next layer's experts known early",
                  fmt(out.get("gamma_overlap_oracle")))
    console = make_console()
    console.print(t)
    winner = "OFFLOAD over the host link" if out["decision"] == "offload" else "EXPERT PARALLELISM"
    console.print(f"gamma = {fmt(out['gamma'])} → {winner} wins.")
    if "sensitivities" in out:
        s = out["sensitivities"]
        console.print("elasticities d ln γ / d ln θ: " +
                      ", ".join(f"{k} {v:+.3g}" for k, v in s.items()))
