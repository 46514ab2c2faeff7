"""`moelab gamma`: offload or expert parallelism, for one model, system and workload."""

from __future__ import annotations

import math

from moelab.args import add_model_system_args, add_option_args, add_workload_args, spec_kwargs

HELP = "gamma = offload overhead / EP overhead (< 1: offload wins, > 1: EP wins)"


def add_arguments(p):
    add_model_system_args(p)
    add_workload_args(p)
    add_option_args(p)
    g = p.add_argument_group("routing and extras")
    g.add_argument("--routing", default="worst",
                   help="worst (the seed) | uniform | zipf:S | dirichlet:A | groups | "
                        "logits:FILE.npy | hist:FILE (Monte Carlo with --samples) | "
                        "trace:FILE (a recorded routing, docs/traces.md) [worst]")
    g.add_argument("--samples", type=int, default=0,
                   help="Monte Carlo samples of concrete routings (JAX reference) [0]")
    g.add_argument("--seed", type=int, default=0, help="random seed for --samples [0]")
    g.add_argument("--sensitivities", action="store_true",
                   help="elasticities d ln(gamma)/d ln(theta) (JAX grad)")
    g.add_argument("--overlap", action="store_true",
                   help="also whole-step times with transfers overlapped with compute (timeline): "
                        "speedup_ep_overlap = T_P / T_EP, and what stays exposed")
    g.add_argument("--lookahead", action="store_true",
                   help="with --overlap: prefetch layer l+1's predicted experts during layer l")
    g.add_argument("--hit-rate", type=float, default=1.0,
                   help="with --lookahead: share of predicted experts that are right [1]")
    g.add_argument("--microbatches", type=int, default=2,
                   help="with --overlap: EP micro-batches overlapping compute and network [2]")
    p.add_argument("--json", action="store_true", help="print JSON (SI units)")


def compute(args) -> dict:
    """Everything `moelab gamma` reports, as one JSON-ready dict (the API's Report)."""
    from moelab import api

    return api.gamma(**spec_kwargs(args), routing=args.routing, samples=args.samples,
                     seed=args.seed, sensitivities=args.sensitivities, overlap=args.overlap,
                     lookahead=args.lookahead, hit_rate=args.hit_rate,
                     microbatches=args.microbatches, progress=_progress_bar())


def _progress_bar():
    """A progress callback drawing on stderr when it is a terminal (JSON on stdout stays clean)."""
    import sys

    if not sys.stderr.isatty():
        return None
    state = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            from rich.progress import Progress

            state["bar"] = Progress(console=_stderr_console(), transient=True)
            state["bar"].start()
            state["task"] = state["bar"].add_task("Monte Carlo samples", total=total)
        state["bar"].update(state["task"], completed=done)
        if done >= total:
            state["bar"].stop()

    return update


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def run(args) -> int:
    out = compute(args)
    if args.json:
        print(out.to_json())
    else:
        print_table(out)
    return 0


def print_table(out: dict) -> None:
    from rich.table import Table

    from moelab.show import console as make_console
    from moelab.show import fmt

    m, w, sys_ = out["model"], out["workload"], out["system"]
    where = (f"decode, batch {w['batch']} x {w['steps']} steps" if w["decode"]
             else f"prefill of {out['tokens']:,} tokens")
    links = f" (host link {sys_['host_link']}, network {sys_['network']})" if sys_.get("swapped") else ""
    title = f"gamma: {m['name']} on {sys_['name']}{links}, {where}"
    t = Table()
    t.add_column("factor")
    t.add_column("formula")
    t.add_column("value", justify="right")
    t.add_row("model", "S_E f_E / (d f_a)", fmt(out["model_term"]))
    t.add_row("system", "B_net / B_pcie", fmt(out["system_term"]))
    t.add_row("query", f"N_ue / N_t = {fmt(out['n_ue'])} / {out['tokens']:,}",
              fmt(out["query_term"]))
    t.add_row("seed gamma", "1/2 · model · system · query", fmt(out["gamma_seed_formula"]))
    extra = out["gamma"] / out["gamma_seed_formula"] if out["gamma_seed_formula"] else float("nan")
    if abs(extra - 1) > 1e-12:
        t.add_row("past the seed", "fan-out, tiers, busiest rank, dtypes, latency, residency",
                  f"×{fmt(extra)}")
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
    if out.get("tipping_tokens_low") is not None:
        t.add_row("N_t* low", "lower crossing (EP latency floor)", fmt(out["tipping_tokens_low"]))
    if "fanout_nodes" in out:
        t.add_section()
        G = out["gpus_per_node"]
        t.add_row("fan-out intra", f"remote ranks on the own node (G = {G})", fmt(out["fanout_intra"]))
        t.add_row("fan-out nodes", "remote nodes", fmt(out["fanout_nodes"]))
        t.add_row("fan-out inter", "remote ranks on other nodes", fmt(out["fanout_ranks_inter"]))
        t.add_row("imbalance", "busiest rank / mean (rows received)", fmt(out["imbalance"]))
        if out.get("redundant_experts"):
            t.add_row("  without replicas", "contiguous placement", fmt(out["imbalance_no_redundancy"]))
            t.add_row("  replica memory", "per rank, all MoE layers",
                      f"{fmt(out['redundant_expert_bytes_per_rank'] / 1e9)} GB")
        leg = out["ep_deciding_leg"]
        t.add_row("network leg" + (" ◀ decides" if leg == "network" else ""),
                  f"{fmt(out['net_copies'])} copies/token at B_net ({out['dispatch_mode']})",
                  f"{fmt(out['t_ep_net_s'])} s")
        t.add_row("NVLink leg" + (" ◀ decides" if leg == "nvlink" else ""),
                  f"{fmt(out['nvlink_copies'])} copies/token at B_nvlink", f"{fmt(out['t_ep_nvlink_s'])} s")
    if out.get("gamma_measured") is not None:
        t.add_section()
        t.add_row("gamma measured", "measured links, published/fitted latencies (--json: sources)",
                  fmt(out["gamma_measured"]))
    sampled = "gamma_mean" in out
    trace = out.get("trace")  # a recorded routing: its windows are the samples
    if sampled:
        t.add_section()
        if trace:
            from pathlib import Path

            size = trace["window_tokens"]
            windows = (f"windows of {size:,} tokens" if isinstance(size, int)
                       else "recorded passes")
            t.add_row(f"gamma (trace {Path(trace['path']).name})",
                      f"mean of {trace['windows']:,} {windows}", fmt(out["gamma_mean"]))
        else:
            t.add_row(f"gamma ({out['routing']})", f"mean of {out['samples']:,} sampled routings",
                      fmt(out["gamma_mean"]))
        t.add_row("  p05 – p95", "5th and 95th percentiles",
                  f"{fmt(out['gamma_p05'])} – {fmt(out['gamma_p95'])}")
        t.add_row("N_ue mean", "used experts per layer", fmt(out["n_ue_mean"]))
        if "fanout_nodes_mean" in out:
            t.add_row("fan-out nodes mean", "remote nodes per token, sampled", fmt(out["fanout_nodes_mean"]))
        if "fanout_nodes_group_limited" in out:
            t.add_row("  exact", "group-limited router (group_limited.py)",
                      fmt(out["fanout_nodes_group_limited"]))
        if trace:
            t.add_row("  p05 – p95", "over windows and layers",
                      f"{fmt(out['n_ue_p05'])} – {fmt(out['n_ue_p95'])}")
        t.add_row("offload wins", "share of samples", f"{out['offload_win_fraction']:.1%}")
    if "speedup_ep_overlap" in out:
        t.add_section()
        t.add_row("T_P overlapped", "offload step, copies behind compute", f"{fmt(out['t_p_overlap_s'])} s")
        t.add_row("T_EP overlapped", "EP step, micro-batches", f"{fmt(out['t_ep_overlap_s'])} s")
        t.add_row("speedup of EP", "T_P / T_EP, overlapped (L-free)", fmt(out["speedup_ep_overlap"]))
        for name, key, flag in (("offload exposed", "t_p_exposed_s", "offload_transfer_hidden"),
                                ("EP exposed", "t_ep_exposed_s", "ep_transfer_hidden")):
            t.add_row(name, "overhead left after overlap",
                      "fully hidden" if out[flag] else f"{fmt(out[key])} s")
        t.add_row("  with an oracle prefetch", "offload exposed, next layer known early",
                  f"{fmt(out['t_p_oracle_exposed_s'])} s")
    if "sensitivities" in out:
        t.add_section()
        for name, value in out["sensitivities"].items():
            t.add_row(f"d ln γ / d ln {name}", "elasticity", _signed(value))
    console = make_console()
    console.print(title, highlight=False)
    console.print(t)
    if m.get("n_shared_experts"):
        console.print(f"Shared experts ({m['n_shared_experts']} per MoE layer): resident under both "
                      "strategies, counted in T_B, never moved.")
    if out.get("trace_layers_note"):
        console.print(f"Trace: {out['trace_layers_note']}.")
    if out.get("decode_note"):
        console.print(out["decode_note"] + ".")
    verdict = out["gamma_mean"] if sampled else out["gamma"]
    winner = "OFFLOAD over the host link" if verdict < 1 else "EXPERT PARALLELISM"
    if trace:
        basis = f"mean over {trace['windows']:,} windows of the trace"
    elif sampled:
        basis = f"mean over {out['samples']:,} {out['routing']} routings"
    else:
        basis = "expected, uniform routing" if out["routing"] == "uniform" else "worst case"
    console.print(f"gamma = {fmt(verdict)} ({basis}) → {winner} wins.")


def _signed(x: float) -> str:
    """An elasticity with its sign; a value that rounds to zero prints as 0, never -0."""
    text = f"{x:+.3g}"
    return "0" if float(text) == 0 else text
