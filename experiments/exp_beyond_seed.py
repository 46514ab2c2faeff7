"""beyond-seed: how each of the seed's simplifications moves the decision, one at a time and together.

Start from the seed's gamma for DeepSeek-R1 at one prefill size, change one thing, and
record gamma_variant / gamma_seed (a tornado chart of log10 changes):
- fan-out over R EP ranks: one tier at B_net (every remote rank, the mean rank: the model
  before issue 10), then two tiers (NVLink inside a node of G GPUs, the network between;
  one network copy per remote node as DeepEP's normal kernels, or per remote rank) with the
  busiest rank setting the pace (closed_form.fanout_tiers, imbalance_uniform); and under
  the model's group-limited routing, per rank (JAX reference Monte Carlo) and once per node
  (exact: closed_form.fanout_nodes_group_limited);
- dispatch in fp8, combine in bf16 (as DeepEP does);
- measured link bandwidths instead of nominal ones (presets' measured figures);
- latency per collective alpha_net, fitted to DeepEP's low-latency kernels (experiment validation);
- latency per expert copy alpha_pcie, from a GPU calibration where one exists;
- residency h: half of the GPU's memory caches experts, uniform routing (hit rate = cached share);
- expected N_ue under uniform routing instead of the worst case;
- overlap of transfers with compute (costmodel.timeline: per-expert copies, two micro-batches,
  attention and dense layers in the compute): whole-step times and the speedup of EP,
  T_P / T_EP, which does not depend on L (no longer a ratio of exposed overheads).
"""

from __future__ import annotations

NAME = "beyond-seed"
SUMMARY = (
    "fan-out, dtypes, measured links, latencies, residency, routing, overlap: each one's effect on gamma"
)
VERSION = "3"
DEPENDS = (
    "moelab.costmodel.closed_form",
    "moelab.costmodel.presets",
    "moelab.costmodel.specs",
    "moelab.costmodel.timeline",
    "moelab.costmodel.reference",
    "moelab.costmodel.routing",
    "moelab.experiments.exp_validation",
)


def INPUTS(cfg):
    from moelab.costmodel.presets import PRESETS
    from moelab.experiments.runner import preset_files

    return preset_files(cfg["model"]) + [PRESETS / "published.json", *_calibration_files()]


def _calibration_files():
    from pathlib import Path

    results = Path(__file__).parent / "results"
    return sorted(results.glob("*/calibrate.json")) if results.is_dir() else []


def config(quick: bool) -> dict:
    return {
        "model": "deepseek-r1",
        "system": "h100-sxm",
        "tokens": 4096,
        "ep_ranks": 32,  # DeepSeek's prefill unit (DeepSeek-V3 report §3.4)
        "dispatch_dtype": "fp8",
        "combine_dtype": "bf16",
        "hbm_share_for_experts": 0.5,
        "microbatches": 2,  # DeepSeek's two-micro-batch overlap
        "mc_tokens": 256,  # group-limited fan-out: Monte Carlo at this N_t (a per-token property)
        "mc_samples": 2 if quick else 4,
        "curve_points": 25 if quick else 60,
        "overlap_points": 6 if quick else 16,
    }


def STEPS(cfg) -> int:
    return 4


def _fitted_alpha_net():
    """alpha_net from the validation experiment's named fit, or None with the reason."""
    try:
        from moelab.experiments.exp_validation import fitted_alpha_net
    except ImportError:
        return None, "validation experiment not available yet"
    try:
        return fitted_alpha_net()
    except (OSError, KeyError, ValueError) as e:
        return None, f"fit not available: {e}"


def _measured_alpha_pcie():
    """Per-copy host-link latency from a GPU calibration file, or None with the reason."""
    import json

    from moelab.costmodel.presets import load_system

    for path in _calibration_files():
        data = json.loads(path.read_text())
        # A CPU stand-in (no GPU) is not a host-link measurement.
        real = isinstance(data, dict) and data.get("name") != "cpu-standin"
        # Through the loader: old SI files (alpha_pcie) and the presets' schema (host_link.latency_us).
        value = load_system(str(path), latencies=True).alpha_pcie if real else None
        if value:
            return float(value), f"measured by moelab calibrate ({path.parent.name})"
    return None, "not measured on a GPU yet"


def _group_fanout(cfg, model, system):
    """Mean remote ranks and remote nodes per token under group-limited routing, and the
    sources of each: ranks by JAX Monte Carlo, nodes exactly (costmodel/group_limited.py)
    where the nodes hold whole groups, else by the same Monte Carlo.

    The fan-out is a per-token property: it is sampled at a modest N_t (cfg["mc_tokens"]) and
    used as an explicit phi at the experiment's N_t.
    """
    try:
        from moelab.costmodel.reference import gamma_distribution
    except ImportError as e:
        return None, f"costmodel.reference not available yet ({e})", None
    from moelab.costmodel.specs import Options, Workload

    d = gamma_distribution(
        model,
        system,
        Workload(tokens=cfg["mc_tokens"]),
        Options(ep_ranks=cfg["ep_ranks"]),
        "groups",
        cfg["mc_samples"],
        0,
    )
    src = (
        f"JAX Monte Carlo, {d['samples']} samples at N_t = {cfg['mc_tokens']}, n_group {model.n_group}, "
        f"topk_group {model.topk_group}, {system.gpus_per_node} GPUs per node"
    )
    nodes, node_src = d["fanout_nodes_mean"], src
    R, G = cfg["ep_ranks"], system.gpus_per_node
    if R % G == 0 and model.n_group % (R // G) == 0:  # whole groups per node: exact
        from moelab.costmodel.closed_form import fanout_nodes_group_limited

        nodes = fanout_nodes_group_limited(R // G, model.n_group, model.topk_group, model.n_experts,
                                           model.top_k)
        node_src = (f"closed_form.fanout_nodes_group_limited (exact, {R // G} nodes: "
                    f"{nodes:.4f}; Monte Carlo {d['fanout_nodes_mean']:.4f})")
    return {"ranks": d["fanout_mean"], "nodes": nodes}, src, node_src


def variants(cfg, model, system):
    """name -> (system, options, source): each simplification of the seed removed on its own."""
    from moelab.costmodel.presets import load_system, system_table
    from moelab.costmodel.specs import Options

    hbm = system_table()["gpus"][cfg["system"]]["hbm_GB"] * 1e9
    all_experts = model.n_moe_layers * model.n_experts * model.expert_bytes
    h = min(1.0, cfg["hbm_share_for_experts"] * hbm / all_experts)
    alpha_net, alpha_net_src = _fitted_alpha_net()
    alpha_pcie, alpha_pcie_src = _measured_alpha_pcie()
    measured = load_system(cfg["system"], measured=True)
    R = cfg["ep_ranks"]
    out = {
        f"fan-out: EP{R}, one tier (every remote rank at B_net, mean rank)": (
            system,
            Options(ep_ranks=R, dispatch_mode="flat", imbalance=False),
            "closed_form.fanout_uniform (the model before two tiers)",
        ),
        f"fan-out: EP{R}, two tiers, per-node dispatch, busiest rank": (
            system,
            Options(ep_ranks=R),
            f"closed_form.fanout_tiers, {system.gpus_per_node} GPUs per node, NVLink "
            f"{system.b_nvlink / 1e9:g} GB/s; imbalance_uniform",
        ),
        f"fan-out: EP{R}, two tiers, per-rank dispatch, busiest rank": (
            system,
            Options(ep_ranks=R, dispatch_mode="per-rank"),
            "closed_form.fanout_tiers (one network copy per remote rank: DeepEP low-latency)",
        ),
        f"dtypes: dispatch {cfg['dispatch_dtype']}, combine {cfg['combine_dtype']}": (
            system,
            Options(dispatch_dtype=cfg["dispatch_dtype"], combine_dtype=cfg["combine_dtype"]),
            "DeepEP's FP8 dispatch / BF16 combine",
        ),
        "measured links": (
            measured,
            Options(),
            f"{measured.host_link} and {measured.network} measured figures",
        ),
        f"residency h = {h:.3f}": (
            system,
            Options(resident_fraction=h),
            f"{cfg['hbm_share_for_experts']:.0%} of {hbm / 1e9:g} GB HBM caches experts, uniform routing",
        ),
        "expected N_ue (uniform routing)": (system, Options(routing="uniform"), "E (1 - (1 - k/E)^N_t)"),
    }
    # Group-limited routing (the model's n_group / topk_group): its fan-out over ranks (sampled by
    # the JAX reference), and over nodes (exact; DeepEP's normal kernels send a token once per
    # remote node).
    groups, groups_src, nodes_src = _group_fanout(cfg, model, system)
    fanout_all = Options(ep_ranks=R)  # two tiers, per-node, busiest rank
    if groups is not None:
        out[f"fan-out: EP{cfg['ep_ranks']}, group-limited routing"] = (
            system,
            Options(fanout=groups["ranks"]),
            groups_src,
        )
        out[f"fan-out: EP{cfg['ep_ranks']}, group-limited, once per node"] = (
            system,
            Options(fanout=groups["nodes"]),
            nodes_src + "; per-node dedup as in DeepEP normal kernels",
        )
    if alpha_net is not None:
        out[f"alpha_net = {alpha_net * 1e6:.0f} µs per collective"] = (
            system.with_(alpha_net=alpha_net),
            Options(),
            alpha_net_src,
        )
    if alpha_pcie is not None:
        out[f"alpha_pcie = {alpha_pcie * 1e6:.1f} µs per copy"] = (
            system.with_(alpha_pcie=alpha_pcie),
            Options(),
            alpha_pcie_src,
        )
    combined_system = measured.with_(alpha_net=alpha_net or 0.0, alpha_pcie=alpha_pcie or 0.0)
    combined = Options(
        fanout=fanout_all.fanout,
        ep_ranks=fanout_all.ep_ranks,
        dispatch_dtype=cfg["dispatch_dtype"],
        combine_dtype=cfg["combine_dtype"],
        resident_fraction=h,
        routing="uniform",
    )
    missing = {
        "alpha_net": alpha_net_src if alpha_net is None else None,
        "alpha_pcie": alpha_pcie_src if alpha_pcie is None else None,
        "group-limited fan-out": groups_src if groups is None else None,
    }
    fan = f"EP{R} two tiers, per-node dispatch, busiest rank"
    lat = ", ".join(n for n, v in (("alpha_net", alpha_net), ("alpha_pcie", alpha_pcie)) if v is not None)
    desc = (
        f"fan-out {fan}; dispatch {cfg['dispatch_dtype']} / combine {cfg['combine_dtype']}; measured links; "
        f"h = {h:.3f}; uniform routing" + (f"; {lat}" if lat else "")
    )
    return out, (combined_system, combined, desc), missing


def run(cfg: dict, ctx) -> None:
    import math

    import numpy as np

    from moelab.costmodel import closed_form as cf
    from moelab.costmodel.presets import load_model, load_system
    from moelab.costmodel.specs import Options, Workload
    from moelab.show import fmt

    model = load_model(cfg["model"])
    system = load_system(cfg["system"])
    work = Workload(tokens=cfg["tokens"])
    seed = cf.evaluate(model, system, work)
    singles, (sys_all, opt_all, all_desc), missing = variants(cfg, model, system)
    for what, why in missing.items():
        if why:
            ctx.note(f"{what}: {why}; left out of the variants.")

    rows = [_row("seed", "the seed's assumptions", seed, seed)]
    for name, (s, o, src) in singles.items():
        rows.append(_row(name, src, cf.evaluate(model, s, work, o), seed))
    rows.append(
        _row(
            "all of the above together",
            all_desc,
            cf.evaluate(model, sys_all, work, opt_all),
            seed,
        )
    )
    ctx.advance()

    # Overlap: whole-step times on top of the seed, and on top of everything else.
    from moelab.costmodel.timeline import overlap_times

    overlap_rows = []
    for label, s, o in (
        ("seed + overlap", system, Options()),
        ("all together + overlap", sys_all, opt_all),
    ):
        ov = overlap_times(model, s, work, o, microbatches=cfg["microbatches"])
        deep = overlap_times(model.with_(n_moe_layers=2 * model.n_moe_layers,
                                         n_layers=2 * model.n_layers), s, work, o,
                             microbatches=cfg["microbatches"])
        overlap_rows.append({
            "variant": label,
            "speedup_ep_overlap": ov["speedup_ep_overlap"],
            "speedup_ep_overlap_2L": deep["speedup_ep_overlap"],
            # what the report used to call gamma overlapped: the overheads left over the
            # whole timeline (steady exposure + pipeline fill), offload over EP; grows with L
            "exposed_ratio": _old_ratio(ov),
            "exposed_ratio_2L": _old_ratio(deep),
            "t_p_overlap_s": ov["t_p_overlap_s"],
            "t_ep_overlap_s": ov["t_ep_overlap_s"],
            "t_p_exposed_s": ov["t_p_exposed_s"],
            "t_ep_exposed_s": ov["t_ep_exposed_s"],
            "t_ep_fill_s": ov["t_ep_fill_s"],
            "t_b_step_offload_s": ov["t_b_step_offload_s"],
            "t_b_step_ep_s": ov["t_b_step_ep_s"],
            "ep_transfer_hidden": ov["ep_transfer_hidden"],
            "offload_transfer_hidden": ov["offload_transfer_hidden"],
            "source": "costmodel.timeline.overlap_times",
        })
    ctx.rows("variants", rows)
    ctx.rows("overlap", overlap_rows)
    ctx.advance()

    tokens = np.geomspace(1, 1e7, cfg["curve_points"])
    curves = {"seed": cf.gamma_of_tokens(model, system, Options(), tokens)}
    for name, (s, o, _) in singles.items():
        curves[name] = cf.gamma_of_tokens(model, s, o, tokens)
    curves["all together"] = cf.gamma_of_tokens(model, sys_all, opt_all, tokens)
    t_ov = np.geomspace(64, 1e7, cfg["overlap_points"])
    overlap_curve = (
        t_ov,
        np.array([
            overlap_times(model, system, Workload(tokens=int(t)), Options(),
                          microbatches=cfg["microbatches"])["speedup_ep_overlap"]
            for t in t_ov
        ]),
    )
    ctx.rows(
        "curves",
        [{"tokens": float(t), **{n: float(c[i]) for n, c in curves.items()}} for i, t in enumerate(tokens)],
    )
    ctx.advance()

    sweeps = _sweeps(model, system, work, cfg)
    ctx.rows("sweeps", sweeps)
    _plot_tornado(ctx, rows, seed, cfg)
    _plot_curves(ctx, tokens, curves, overlap_curve, cfg)
    _plot_sweeps(ctx, sweeps, seed, cfg)
    ctx.advance()

    def g(x):
        return "∞ (fully hidden)" if math.isinf(x) else fmt(x)

    table = "| variant | gamma | × seed | N_t* (tokens) | source |\n|---|---|---|---|---|\n"
    for r in rows:
        tip = fmt(r["tipping_tokens"]) if r["tipping_tokens"] else "none"
        table += f"| {r['variant']} | {g(r['gamma'])} | {g(r['ratio_to_seed'])} | {tip} | {r['source']} |\n"
    ov_table = ("| with overlap | T_P (s) | T_EP (s) | speedup of EP, T_P / T_EP | at 2 L | "
                "offload exposed (s) | EP exposed (s) | EP fill (s) | former gamma overlapped "
                "| at 2 L |\n"
                "|---|---|---|---|---|---|---|---|---|---|\n")
    for r in overlap_rows:
        ep_exp = "0 (fully hidden)" if r["ep_transfer_hidden"] else fmt(r["t_ep_exposed_s"])
        ov_table += (f"| {r['variant']} | {fmt(r['t_p_overlap_s'])} | {fmt(r['t_ep_overlap_s'])} | "
                     f"{fmt(r['speedup_ep_overlap'])} | {fmt(r['speedup_ep_overlap_2L'])} | "
                     f"{fmt(r['t_p_exposed_s'])} | {ep_exp} | {fmt(r['t_ep_fill_s'])} | "
                     f"{'inf' if math.isinf(r['exposed_ratio']) else fmt(r['exposed_ratio'])} | "
                     f"{'inf' if math.isinf(r['exposed_ratio_2L']) else fmt(r['exposed_ratio_2L'])} |\n")
    by = {r["variant"]: r for r in rows}
    flat = by[f"fan-out: EP{cfg['ep_ranks']}, one tier (every remote rank at B_net, mean rank)"]
    tiers = by[f"fan-out: EP{cfg['ep_ranks']}, two tiers, per-node dispatch, busiest rank"]
    per_rank = by[f"fan-out: EP{cfg['ep_ranks']}, two tiers, per-rank dispatch, busiest rank"]
    legs = cf.ep_legs(model, system, Options(ep_ranks=cfg["ep_ranks"]), cfg["tokens"])
    together = next(r for r in rows if r["variant"] == "all of the above together")
    ctx.summary.update(
        {
            "gamma_seed": seed.gamma,
            "gamma_all_together": together["gamma"],
            "tipping_all_together": together["tipping_tokens"],
        }
    )
    single_rows = [r for r in rows[1 : len(singles) + 1]]
    seed_ov = overlap_rows[0]
    biggest = max(single_rows, key=lambda r: abs(math.log(r["ratio_to_seed"])))
    ctx.section(f"""
{model.name} on {system.name}, prefill of {cfg["tokens"]:,} tokens. The seed's gamma is {fmt(seed.gamma)}
(N_t* = {fmt(seed.tipping_tokens)}). Each row removes one simplification; the last rows combine them.
Together they move gamma by ×{fmt(together["ratio_to_seed"])} to {fmt(together["gamma"])} and the tipping
point to {fmt(together["tipping_tokens"]) if together["tipping_tokens"] else "none"} tokens: the decision at
{cfg["tokens"]:,} tokens {"is" if (together["gamma"] > 1) == (seed.gamma > 1) else "is no longer"}
{"EP" if together["gamma"] > 1 else "offload"}. The largest single effect is "{biggest["variant"]}"
(×{fmt(biggest["ratio_to_seed"])}).

**Two tiers and the busiest rank (what changed).** With top-{model.top_k} routing over {cfg["ep_ranks"]}
ranks a token reaches {fmt(legs.tiers.ranks)} remote ranks. Counting all of them at B_net (one tier, the
mean rank, this experiment's earlier fan-out row) gives gamma {fmt(flat["gamma"])}. But
{fmt(legs.tiers.intra)} of them are on the token's own node of {system.gpus_per_node} GPUs (NVLink,
{fmt(system.b_nvlink / 1e9)} GB/s), and DeepEP's normal kernels send one copy per remote node
({fmt(legs.tiers.nodes)} nodes) and forward inside it: with the busiest of the {cfg["ep_ranks"]} ranks
receiving ×{fmt(legs.imbalance)} the mean, gamma is {fmt(tiers["gamma"])},
×{fmt(tiers["gamma"] / flat["gamma"])} of the one-tier figure; the {legs.deciding_leg} leg decides.
One copy per remote rank ({fmt(legs.tiers.ranks_inter)} over the network) gives {fmt(per_rank["gamma"])}.

**Overlap (what changed).** This report used to show "gamma overlapped", the offload overhead left
after overlap over the EP overhead left. With micro-batches the EP one is mostly pipeline fill and
drain, a constant, so that ratio grows with the layer count: computed the old way it is
{g(seed_ov["exposed_ratio"])} at L = {model.n_moe_layers} and {g(seed_ov["exposed_ratio_2L"])} at 2 L.
It is replaced by whole-step times
(attention with {"MLA" if model.kv_lora_rank else "GQA"} and the {model.n_dense_layers} dense layers
now included, fp8 experts at the fp8 peak): EP's step is ×{fmt(seed_ov["speedup_ep_overlap"])} faster
with overlap on the seed's links, and ×{fmt(seed_ov["speedup_ep_overlap_2L"])} at 2 L (L-free).

{table}
{ov_table}""")


def _old_ratio(ov: dict) -> float:
    """The former gamma_overlap: (T_P - T_B) / (T_EP - T_B) of the whole timeline, fill included."""
    import math

    ep = ov["t_ep_exposed_s"] + ov["t_ep_fill_s"]
    return (ov["t_p_exposed_s"] + ov["t_p_fill_s"]) / ep if ep > 0 else math.inf


def _row(name, source, r, seed) -> dict:
    return {
        "variant": name,
        "gamma": r.gamma,
        "ratio_to_seed": r.gamma / seed.gamma,
        "t_p_overhead_s": r.t_p_overhead,
        "t_ep_overhead_s": r.t_ep_overhead,
        "t_b_s": r.t_b,
        "fanout": r.fanout,
        "n_ue": r.n_ue,
        "tipping_tokens": r.tipping_tokens,
        "source": source,
    }


def _sweeps(model, system, work, cfg) -> list[dict]:
    """gamma at the chosen N_t as one parameter moves over its range, the others at the seed's values."""
    import numpy as np

    from moelab.costmodel import closed_form as cf
    from moelab.costmodel.specs import Options

    t = work.tokens
    rows = []
    for h in np.linspace(0, 0.99, 34):
        rows.append(
            {
                "parameter": "resident_fraction",
                "value": float(h),
                "gamma": float(cf.gamma_of_tokens(model, system, Options(resident_fraction=float(h)), t)),
            }
        )
    for R in (2, 4, 8, 16, 32, 64, 128, 256):
        rows.append(
            {
                "parameter": "ep_ranks",
                "value": R,
                "gamma": float(cf.gamma_of_tokens(model, system, Options(ep_ranks=R), t)),
            }
        )
    for a in np.linspace(0, 500e-6, 26):
        rows.append(
            {
                "parameter": "alpha_net_s",
                "value": float(a),
                "gamma": float(cf.gamma_of_tokens(model, system.with_(alpha_net=float(a)), Options(), t)),
            }
        )
        rows.append(
            {
                "parameter": "alpha_pcie_s",
                "value": float(a),
                "gamma": float(cf.gamma_of_tokens(model, system.with_(alpha_pcie=float(a)), Options(), t)),
            }
        )
    return rows


def _plot_tornado(ctx, rows, seed, cfg) -> None:
    import math

    import numpy as np

    from moelab.experiments import plots

    shown = [r for r in rows if r["variant"] != "seed"]
    values = [math.log10(r["ratio_to_seed"]) if math.isfinite(r["ratio_to_seed"]) else np.nan for r in shown]
    finite = [v for v in values if np.isfinite(v)]
    span = max([abs(v) for v in finite] + [abs(math.log10(1 / seed.gamma))]) * 1.15
    fig, ax = plots.figure(width=8, height=0.45 * len(shown) + 1.6)
    y = np.arange(len(shown))[::-1]
    for yi, v, r in zip(y, values, shown, strict=True):
        if np.isfinite(v):
            ax.barh(yi, v, color=plots.OFFLOAD_COLOR if v < 0 else plots.EP_COLOR)
            ax.text(
                v,
                yi,
                f" ×{r['ratio_to_seed']:.3g} → {r['gamma']:.3g} ",
                va="center",
                ha="left" if v >= 0 else "right",
                fontsize=7,
            )
        else:
            ax.text(
                0, yi, " gamma = ∞: the EP overhead hides entirely behind compute", va="center", fontsize=7
            )
    flip = math.log10(1 / seed.gamma)
    ax.axvline(
        flip, color="black", ls="--", lw=1, label=f"gamma = 1 (×{1 / seed.gamma:.3g}): the decision flips"
    )
    ax.axvline(0, color="gray", lw=0.8)
    ax.set_yticks(y, [r["variant"] for r in shown], fontsize=8)
    ax.set_xlim(-span, span)
    ax.set_xlabel(f"log10(gamma / seed gamma) at N_t = {cfg['tokens']:,} [log10 ratio]")
    ax.set_ylabel("simplification removed [variant]")
    ax.set_title(f"What moves the decision: seed gamma = {seed.gamma:.3g}", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ctx.plot(
        fig,
        "tornado",
        f"Each simplification of the seed removed on its own (and all together): change "
        f"of log10 gamma at N_t = {cfg['tokens']:,}; left of the dashed line offload would win.",
    )


def _plot_curves(ctx, tokens, curves, overlap_curve, cfg) -> None:
    from moelab.experiments import plots

    fig, ax = plots.figure(width=8, height=5)
    for name, c in curves.items():
        style = (
            {"color": "black", "lw": 2.5}
            if name == "seed"
            else ({"color": "tab:purple", "lw": 2.5} if name == "all together" else {"lw": 1})
        )
        ax.loglog(tokens, c, label=name, **style)
    if overlap_curve is not None:
        t, g = overlap_curve
        ax.loglog(t, g, "s--", ms=3, color="tab:brown",
                  label="speedup of EP with overlap, T_P / T_EP (timeline)")
    plots.gamma_line(ax, label="gamma = 1")
    ax.set_xlabel("prefill tokens N_t [tokens]")
    ax.set_ylabel(plots.GAMMA_LABEL)
    ax.set_title("gamma vs N_t for each variant (and EP's overlapped speedup): crossing 1 flips the "
                 "decision", fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    ax.grid(True, which="both", alpha=0.3)
    ctx.plot(fig, "variants_vs_tokens", "gamma vs prefill tokens for the seed and each variant.")


def _plot_sweeps(ctx, sweeps, seed, cfg) -> None:
    from moelab.experiments import plots

    fig, axes = plots.figure(ncols=2, width=9, height=7.5, nrows=2)
    panels = [
        ("resident_fraction", 1.0, "resident fraction h [share of used experts]", "linear"),
        ("ep_ranks", 1.0, "EP ranks R (two tiers, per-node dispatch, busiest rank) [ranks]", "log"),
        ("alpha_net_s", 1e6, "alpha_net, latency per collective [µs]", "linear"),
        ("alpha_pcie_s", 1e6, "alpha_pcie, latency per expert copy [µs]", "linear"),
    ]
    for ax, (param, scale, label, xscale) in zip(axes.ravel(), panels, strict=True):
        pts = [r for r in sweeps if r["parameter"] == param]
        ax.plot([r["value"] * scale for r in pts], [r["gamma"] for r in pts], "o-", ms=3)
        ax.set_xscale(xscale)
        ax.set_yscale("log")
        plots.gamma_line(ax, label="gamma = 1")
        ax.axhline(seed.gamma, color="gray", lw=0.8, ls=":")
        ax.set_xlabel(label)
        ax.set_ylabel("gamma [ratio]")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"One parameter at a time, N_t = {cfg['tokens']:,} (dotted: the seed's gamma)", fontsize=10)
    ctx.plot(fig, "sweeps", "gamma as residency, EP ranks and the two latencies each move over their range.")
