"""routing: worst-case vs expected vs skewed N_ue, and gamma as a distribution (JAX Monte Carlo).

The seed takes the worst case, N_ue = min(k N_t, E). Real routings share experts: the
expected count under uniform top-k is E (1 - (1 - k/E)^N_t) (closed form), and skewed
popularity (Zipf, Dirichlet) or DeepSeek's group-limited routing use fewer. The JAX
reference samples concrete routings (costmodel.reference.gamma_distribution) and gives
gamma's mean and percentiles; on the seed's worst-case routing it must equal the closed form.
With EP ranks (issue 10) it also measures the two tiers of the fan-out and the busiest rank
(max over ranks of rows received / mean) from concrete routings, with and without
EPLB-like redundant experts, against the closed-form imbalance for uniform routing.
Real routing (issue 12): where ../shared/traces/ (next to the repo; MOELAB_TRACES overrides)
holds recorded traces, each one's N_ue(N_t) and max-rank load against uniform routing and the
Zipf and Dirichlet generators fitted to it (`costmodel.trace.fit`); where it is absent, the
report says so. The traces are read in place, never copied.
Sample counts are modest so the report stays within minutes on two cores.
"""

from __future__ import annotations

NAME = "routing"
SUMMARY = "worst-case vs expected vs skewed N_ue, and gamma's distribution from the JAX Monte Carlo"
VERSION = "2"
DEPENDS = (
    "moelab.costmodel.trace",
    "moelab.costmodel.closed_form",
    "moelab.costmodel.reference",
    "moelab.costmodel.routing",
    "moelab.costmodel.presets",
)


def INPUTS(cfg):
    from moelab.experiments.runner import preset_files

    return preset_files(cfg["model"]) + trace_files()


def traces_dir():
    """Where recorded traces are looked for: MOELAB_TRACES, else ../shared/traces next to the repo."""
    import os
    from pathlib import Path

    import moelab.costmodel

    root = Path(moelab.costmodel.__file__).resolve().parents[1]
    return Path(os.environ.get("MOELAB_TRACES") or root.parent / "shared" / "traces")


def trace_files():
    d = traces_dir()
    return sorted(p for p in d.glob("*") if p.suffix in (".json", ".npz")) if d.is_dir() else []


def config(quick: bool) -> dict:
    return {
        "model": "deepseek-r1",
        "system": "h100-sxm",
        "uniform_tokens": [4, 16, 64] if quick else [4, 16, 64, 256, 1024],
        "uniform_samples": 8 if quick else 32,
        "skewed": ["zipf:1", "dirichlet:0.3", "groups"],
        "skewed_tokens": [16] if quick else [16, 64, 256],
        "skewed_samples": 4 if quick else 12,
        "hist_tokens": 16,
        "hist_samples": 8 if quick else 32,
        "check_tokens": [4, 64] if quick else [4, 64, 1024],
        "ep_ranks": 32,  # DeepSeek's prefill unit
        "ep_tokens": 64,  # tokens per rank for the busiest-rank measurement
        "redundant_experts": 32,  # DeepSeek's EPLB in prefill
        "ep_samples": 2 if quick else 4,
        "seed": 0,
        "trace_samples": 50 if quick else 200,  # sampled layers per generator and N_t
    }


def STEPS(cfg) -> int:
    return (
        len(cfg["uniform_tokens"])
        + len(cfg["skewed"]) * len(cfg["skewed_tokens"])
        + len(cfg["check_tokens"])
        + len(cfg["skewed"])
        + 1 + len(cfg["skewed"])
        + 3
    )


def run(cfg: dict, ctx) -> None:
    try:
        from moelab.costmodel import reference
    except ImportError as e:
        ctx.note(f"costmodel.reference not available yet ({e}): no Monte Carlo in this run.")
        ctx.section(
            "The JAX reference (costmodel.reference) is not available yet in this build: "
            "no Monte Carlo results."
        )
        return
    import numpy as np

    from moelab.costmodel import closed_form as cf
    from moelab.costmodel import routing as rt
    from moelab.costmodel.presets import load_model, load_system
    from moelab.costmodel.specs import Options, Workload, parse_routing

    model = load_model(cfg["model"])
    system = load_system(cfg["system"])
    k, E, L = model.top_k, model.n_experts, model.n_moe_layers

    # 1. The reference on the seed's worst-case routing equals the closed form.
    checks = []
    for n in cfg["check_tokens"]:
        routes = rt.worst_case(L, n, E, k)
        ref = reference.evaluate_routes(model, system, Workload(tokens=n), Options(), routes)
        closed = cf.evaluate(model, system, Workload(tokens=n))
        checks.append(
            {
                "tokens": n,
                "gamma_reference": ref["gamma"],
                "gamma_closed_form": closed.gamma,
                "rel_diff": ref["gamma"] / closed.gamma - 1,
                "n_ue_reference": ref["n_ue"],
                "n_ue_closed_form": closed.n_ue,
            }
        )
        ctx.advance()
    ctx.rows("worst_case_check", checks)

    # 2. Monte Carlo: uniform over many N_t, skewed routings over a few.
    rows = []

    def mc(routing, n, samples):
        d = reference.gamma_distribution(
            model, system, Workload(tokens=n), Options(), routing, samples, cfg["seed"]
        )
        rows.append(
            {
                "routing": routing,
                "tokens": n,
                "samples": d["samples"],
                "layers": L,
                "n_ue_mean": d["n_ue_mean"],
                "n_ue_std": d["n_ue_std"],
                "n_ue_stderr": d["n_ue_std"] / np.sqrt(d["samples"] * L),
                "n_ue_worst": float(cf.n_used_worst(n, k, E)),
                "n_ue_expected": float(cf.n_used_uniform(n, k, E)),
                "gamma_mean": d["gamma_mean"],
                "gamma_p05": d["gamma_p05"],
                "gamma_p95": d["gamma_p95"],
                "gamma_worst": float(cf.gamma_of_tokens(model, system, Options(), n)),
                "gamma_expected": float(cf.gamma_of_tokens(model, system, Options(routing="uniform"), n)),
                "offload_win_fraction": d["offload_win_fraction"],
            }
        )
        ctx.advance()

    for n in cfg["uniform_tokens"]:
        mc("uniform", n, cfg["uniform_samples"])
    for routing in cfg["skewed"]:
        for n in cfg["skewed_tokens"]:
            mc(routing, n, cfg["skewed_samples"])
    ctx.rows("monte_carlo", rows)

    # 3. Per-sample gamma at one N_t, for the histogram: the reference's per-layer counts,
    # turned into overheads by the closed form's own functions.
    n = cfg["hist_tokens"]
    hist = {}
    for routing in ["uniform", *cfg["skewed"]]:
        spec = parse_routing(routing)
        gen = rt.layer_generator(spec, L, n, E, k, model.n_group, model.topk_group)
        width = k if spec.kind == "uniform" else E
        import jax

        stats = reference.sample_stats(
            gen, jax.random.key(cfg["seed"] + 1), cfg["hist_samples"], L, n, width, E
        )
        n_used = stats["n_used"].astype(float)  # [samples, L]
        t_p = cf.offload_overhead(n_used, model.expert_bytes, system.b_pcie).sum(-1)
        t_ep = L * cf.ep_overhead(n, model.hidden, model.f_a, model.f_a, system.b_net)
        hist[routing] = (t_p / t_ep).tolist()
        ctx.advance()
    ctx.json("gamma_samples.json", {"tokens": n, "samples": hist})

    ep_rows = _busiest_rank(ctx, reference, cf, model, system, cfg)
    _plot_n_ue(ctx, rows, model)
    _plot_gamma(ctx, rows)
    _plot_hist(ctx, hist, n, model)
    ctx.advance()
    _section(ctx, rows, checks, cfg, model, ep_rows)
    _traces(ctx, cfg)
    ctx.advance()


def _traces(ctx, cfg) -> None:
    """Recorded traces against uniform routing and the generators fitted to them."""
    from moelab.costmodel.trace import fit
    from moelab.show import fmt

    files = trace_files()
    if not files:
        ctx.note(f"no routing traces at {traces_dir()}: the real-routing comparison is skipped")
        ctx.section(f"""
**Real routing.** No recorded traces were found at `{traces_dir()}` (set MOELAB_TRACES to a folder of
trace files, docs/traces.md), so this run compares no real routing with the generators.""")
        return
    fits = [fit(str(f), samples=cfg["trace_samples"], seed=cfg["seed"]) for f in files]
    rows = [{"file": f["file"].rsplit("/", 1)[-1], "E": f["num_experts"], "k": f["top_k"],
             "layers": f["layers"], "trace_tokens": f["tokens"], "zipf_s": f["zipf_s"],
             "dirichlet_a": f["dirichlet_a"], **r} for f in fits for r in f["rows"]]
    ctx.rows("traces", rows)
    table = ("| trace | N_t | N_ue trace | uniform | Zipf (s) | Dirichlet (a) | max-rank load trace "
             "| uniform | Zipf | Dirichlet |\n|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        if not r["windows"]:
            continue
        table += (f"| {r['file']} | {r['tokens']} | {fmt(r['trace_n_ue'])} "
                  f"| {r['uniform_n_ue_error']:+.1%} | {r['zipf_n_ue_error']:+.1%} ({fmt(r['zipf_s'])}) "
                  f"| {r['dirichlet_n_ue_error']:+.1%} ({fmt(r['dirichlet_a'])}) "
                  f"| {fmt(r['trace_max_rank_load'])} | {r['uniform_max_rank_load_error']:+.1%} "
                  f"| {r['zipf_max_rank_load_error']:+.1%} | {r['dirichlet_max_rank_load_error']:+.1%} |\n")
    worst = max((r for r in rows if r["windows"]), key=lambda r: abs(r["uniform_n_ue_error"]))
    ctx.summary["trace_uniform_n_ue_max_error"] = worst["uniform_n_ue_error"]
    direction = ("there the real tokens share experts more than uniform ones, so uniform routing "
                 "overstates what offload must move" if worst["uniform_n_ue_error"] > 0 else
                 "there the real tokens spread over more experts than uniform ones")
    ctx.section(f"""
**Real routing.** {len(files)} recorded trace(s) from `{traces_dir()}` (read in place; provenance in
its README), cut into windows of N_t consecutive tokens and counted exactly. Errors are generator /
trace - 1 (uniform N_ue in closed form; Zipf and Dirichlet fitted to each trace's histogram by
maximum likelihood, {cfg["trace_samples"]} sampled layers each; max-rank load on min(8, E) EP ranks).
Uniform routing misses N_ue by up to {worst["uniform_n_ue_error"]:+.1%} ({worst["file"]},
N_t = {worst["tokens"]}): {direction}.

{table}""")


def _busiest_rank(ctx, reference, cf, model, system, cfg) -> list[dict]:
    """Per routing, at EP R with N tokens per rank: the two tiers (Monte Carlo means), the
    busiest rank with and without redundant experts, and gamma with and without them."""
    from moelab.costmodel.specs import Options, Workload

    R, n, red = cfg["ep_ranks"], cfg["ep_tokens"], cfg["redundant_experts"]
    out = []
    for routing in ["uniform", *cfg["skewed"]]:
        d = reference.gamma_distribution(model, system, Workload(tokens=n),
                                         Options(ep_ranks=R, redundant_experts=red), routing,
                                         cfg["ep_samples"], cfg["seed"])
        plain = reference.gamma_distribution(model, system, Workload(tokens=n), Options(ep_ranks=R),
                                             routing, cfg["ep_samples"], cfg["seed"])
        out.append({
            "routing": routing, "ep_ranks": R, "tokens_per_rank": n,
            "fanout_mean": d["fanout_mean"], "fanout_nodes_mean": d["fanout_nodes_mean"],
            "imbalance": d["imbalance_mean"], "imbalance_redundant": d["imbalance_redundant_mean"],
            "imbalance_closed_form": (cf.imbalance_uniform(n, R, model.n_experts, model.top_k)
                                      if routing == "uniform" else None),
            "gamma_mean": plain["gamma_mean"], "gamma_mean_redundant": d["gamma_mean"],
            "samples": d["imbalance_samples"],
        })
        ctx.advance()
    ctx.rows("busiest_rank", out)
    return out


def _plot_n_ue(ctx, rows, model) -> None:
    import numpy as np

    from moelab.costmodel import closed_form as cf
    from moelab.experiments import plots

    fig, ax = plots.figure(width=7, height=4.6)
    t = np.geomspace(1, 4096, 200)
    ax.loglog(
        t,
        cf.n_used_worst(t, model.top_k, model.n_experts),
        color="black",
        lw=2,
        label="worst case (seed): min(k N_t, E)",
    )
    ax.loglog(
        t,
        cf.n_used_uniform(t, model.top_k, model.n_experts),
        color="tab:green",
        lw=1.5,
        label="expected, uniform: E (1 - (1 - k/E)^N_t)",
    )
    markers = {"uniform": "o", "zipf:1": "s", "dirichlet:0.3": "^", "groups": "D"}
    for routing in dict.fromkeys(r["routing"] for r in rows):
        pts = [r for r in rows if r["routing"] == routing]
        ax.errorbar(
            [r["tokens"] for r in pts],
            [r["n_ue_mean"] for r in pts],
            yerr=[r["n_ue_std"] for r in pts],
            fmt=markers.get(routing, "o"),
            ms=5,
            capsize=3,
            label=f"Monte Carlo, {routing} (± 1 s.d.)",
        )
    ax.set_xlabel("prefill tokens N_t [tokens]")
    ax.set_ylabel("used experts per layer N_ue [experts]")
    ax.set_title(f"{model.name}: used experts, worst case vs sampled routings", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    ctx.plot(
        fig,
        "n_ue",
        "Used experts per layer: the seed's worst case, the uniform expectation, and Monte "
        "Carlo means (JAX reference) for uniform, Zipf, Dirichlet and group-limited routing.",
    )


def _plot_gamma(ctx, rows) -> None:
    import numpy as np

    from moelab.experiments import plots

    fig, ax = plots.figure(width=7, height=4.6)
    uni = [r for r in rows if r["routing"] == "uniform"]
    t = [r["tokens"] for r in uni]
    ax.loglog(t, [r["gamma_worst"] for r in uni], "k-", lw=2, label="worst case (seed)")
    ax.loglog(
        t, [r["gamma_expected"] for r in uni], "-", color="tab:green", label="expected N_ue (closed form)"
    )
    for i, routing in enumerate(dict.fromkeys(r["routing"] for r in rows)):
        pts = [r for r in rows if r["routing"] == routing]
        x = np.array([r["tokens"] for r in pts]) * (1 + 0.06 * i)  # a small offset keeps the bars apart
        mean = np.array([r["gamma_mean"] for r in pts])
        lo = mean - np.array([r["gamma_p05"] for r in pts])
        hi = np.array([r["gamma_p95"] for r in pts]) - mean
        ax.errorbar(x, mean, yerr=[lo, hi], fmt="o", ms=4, capsize=3, label=f"{routing}: mean, 5-95%")
    plots.gamma_line(ax, label="gamma = 1")
    ax.set_xlabel("prefill tokens N_t [tokens]")
    ax.set_ylabel(plots.GAMMA_LABEL)
    ax.set_title("gamma from sampled routings (JAX Monte Carlo) vs the closed form", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    ctx.plot(
        fig,
        "gamma_distribution",
        "gamma's Monte Carlo mean and 5-95% range per routing, against the "
        "worst case and the uniform expectation.",
    )


def _plot_hist(ctx, hist, n, model) -> None:
    import numpy as np

    from moelab.experiments import plots

    fig, ax = plots.figure(width=7, height=4.4)
    # One set of bins for every routing, so the bars compare.
    bins = np.histogram_bin_edges(np.concatenate([np.asarray(g) for g in hist.values()]), bins=60)
    for routing, g in hist.items():
        ax.hist(g, bins=bins, alpha=0.55, label=f"{routing} ({len(g)} samples)")
    ax.set_xlabel(f"gamma at N_t = {n} tokens [ratio]")
    ax.set_ylabel("sampled forward passes [count]")
    ax.set_title(f"{model.name}: gamma over sampled routings ({model.n_moe_layers} layers each)", fontsize=10)
    ax.legend(fontsize=7)
    ctx.plot(
        fig,
        "gamma_histogram",
        f"Distribution of gamma at N_t = {n} over sampled routings (each sample a whole forward pass).",
    )


def _section(ctx, rows, checks, cfg, model, ep_rows) -> None:
    from moelab.show import fmt

    worst_err = max(abs(c["rel_diff"]) for c in checks)
    uni = [r for r in rows if r["routing"] == "uniform"]
    # Monte Carlo mean of N_ue vs the closed-form expectation, in standard errors.
    z = max(abs(r["n_ue_mean"] - r["n_ue_expected"]) / max(r["n_ue_stderr"], 1e-12) for r in uni)
    table = (
        "| routing | N_t | samples | N_ue mean ± s.d. | N_ue worst / expected | gamma mean [5%, 95%] "
        "| gamma worst |\n|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        table += (
            f"| {r['routing']} | {r['tokens']:,} | {r['samples']} "
            f"| {fmt(r['n_ue_mean'])} ± {fmt(r['n_ue_std'])} "
            f"| {fmt(r['n_ue_worst'])} / {fmt(r['n_ue_expected'])} | {fmt(r['gamma_mean'])} "
            f"[{fmt(r['gamma_p05'])}, {fmt(r['gamma_p95'])}] | {fmt(r['gamma_worst'])} |\n"
        )
    least = min(rows, key=lambda r: r["gamma_mean"])
    # Each skewed routing against uniform at the same N_t: the share of experts it uses.
    n0 = cfg["skewed_tokens"][0]
    base = next((r for r in uni if r["tokens"] == n0), None)
    shares = ", ".join(
        f"{r['routing']} {r['n_ue_mean'] / base['n_ue_mean']:.0%}"
        for r in rows
        if base and r["tokens"] == n0 and r["routing"] != "uniform"
    )
    verdict = "EP still wins in every sample" if least["gamma_p05"] > 1 else "offload wins in some samples"
    uni_ep = next(r for r in ep_rows if r["routing"] == "uniform")
    skew_text = ", ".join(f"{r['routing']} ×{fmt(r['imbalance'])} (gamma {fmt(r['gamma_mean'])})"
                          for r in ep_rows if r["routing"] != "uniform")
    rep_text = ", ".join(f"×{fmt(r['imbalance_redundant'])} ({r['routing']}, gamma "
                         f"{fmt(r['gamma_mean_redundant'])})" for r in ep_rows)
    ep_table = ("| routing | EP ranks | remote ranks / nodes per token | busiest / mean | with replicas "
                "| gamma | with replicas |\n|---|---|---|---|---|---|---|\n")
    for r in ep_rows:
        ep_table += (f"| {r['routing']} | {r['ep_ranks']} | {fmt(r['fanout_mean'])} / "
                     f"{fmt(r['fanout_nodes_mean'])} | {fmt(r['imbalance'])} | "
                     f"{fmt(r['imbalance_redundant'])} | {fmt(r['gamma_mean'])} | "
                     f"{fmt(r['gamma_mean_redundant'])} |\n")
    ctx.summary.update(
        {
            "worst_case_rel_diff": worst_err,
            "uniform_n_ue_max_z": float(z),
            "min_gamma_mean": least["gamma_mean"],
        }
    )
    ctx.section(f"""
{model.name} on {cfg["system"]}. On the seed's worst-case routing the JAX reference and the closed form
agree to {worst_err:.1e} (relative) at N_t = {", ".join(str(c["tokens"]) for c in checks)}. Under uniform
routing the Monte Carlo mean of N_ue lies within {z:.1f} standard errors of E (1 - (1 - k/E)^N_t) at every
N_t. At N_t = {n0} the other routings use this share of the experts uniform routing uses: {shares}; fewer
experts make offload cheaper. The smallest sampled mean gamma is {fmt(least["gamma_mean"])}
({least["routing"]}, N_t = {least["tokens"]:,}; 5% percentile {fmt(least["gamma_p05"])}): {verdict}.
gamma's spread is narrow because each sample averages N_ue over {model.n_moe_layers} layers.

{table}
**The busiest rank (what changed).** With EP the all-to-all ends when its busiest receiver does; the
EP overhead now pays that rank's rows, measured here on concrete routings with every one of
{cfg["ep_ranks"]} ranks holding {cfg["ep_tokens"]} tokens, and with {cfg["redundant_experts"]} redundant
expert slots filled by replicas of each routing's hottest experts (EPLB-like, placed from the
routing's own counts: an oracle). Uniform routing: ×{fmt(uni_ep["imbalance"])} the mean rank (closed
form ×{fmt(uni_ep["imbalance_closed_form"])}). Skewed routings load one rank far more:
{skew_text}. Replicas bring the busiest rank back to {rep_text}.

{ep_table}""")
