"""landscape: the tipping point and gamma at typical prefill sizes, every model preset × system preset.

Seed assumptions (worst-case routing, no fan-out, no latency), each system with its usual
host link and network at nominal bandwidth. One vectorized closed-form call per pair.
"""

from __future__ import annotations

NAME = "landscape"
SUMMARY = "tipping point N_t* and gamma at typical prefill sizes for every model × system preset (heatmaps)"
VERSION = "2"
DEPENDS = (
    "moelab.costmodel.closed_form",
    "moelab.costmodel.presets",
    "moelab.costmodel.specs",
    "moelab.costmodel.hf_config",
)


def INPUTS(cfg):
    from moelab.experiments.runner import preset_files

    return preset_files(*cfg["models"])


def config(quick: bool) -> dict:
    from moelab.costmodel.presets import model_names, system_names

    return {
        "models": model_names(),
        "systems": system_names(),
        "tokens": [512, 2048, 8192, 32768],  # typical prefill sizes (a chat turn to a long document)
        "heat_tokens": 8192,
        "measured_links": False,
    }


def STEPS(cfg) -> int:
    return len(cfg["models"]) + 1


def run(cfg: dict, ctx) -> None:
    import numpy as np

    from moelab.costmodel import closed_form as cf
    from moelab.costmodel.presets import load_model, load_system
    from moelab.costmodel.specs import Options, Workload
    from moelab.show import fmt

    systems = [load_system(s, measured=cfg["measured_links"]) for s in cfg["systems"]]
    tokens = np.asarray(cfg["tokens"] + [cfg["heat_tokens"]], dtype=float)
    rows = []
    for m in cfg["models"]:
        model = load_model(m)
        for system in systems:
            gammas = cf.gamma_of_tokens(model, system, Options(), tokens)
            r = cf.evaluate(model, system, Workload(tokens=cfg["heat_tokens"]))
            row = {
                "model": m,
                "system": system.name,
                "host_link": system.host_link,
                "network": system.network,
                "E": model.n_experts,
                "k": model.top_k,
                "expert_dtype": model.expert_dtype,
                "model_term": r.model_term,
                "system_term": r.system_term,
                "gamma_below_saturation": float(cf.gamma_of_tokens(model, system, Options(), np.array(1.0))),
                "tipping_tokens": r.tipping_tokens,
                "decision_at_heat_tokens": r.decision,
            }
            row.update(
                {f"gamma_at_{int(t)}": float(x) for t, x in zip(tokens[:-1], gammas[:-1], strict=True)}
            )
            # The evaluate() path and the vectorized path must agree: a cheap self-check.
            assert abs(gammas[-1] / r.gamma - 1) < 1e-9, (m, system.name)
            rows.append(row)
        ctx.advance()
    ctx.rows("landscape", rows)

    heat = cfg["heat_tokens"]
    G = np.array([[r[f"gamma_at_{heat}"] for r in rows if r["model"] == m] for m in cfg["models"]])
    T = np.array(
        [
            [
                r["tipping_tokens"] if r["tipping_tokens"] is not None else np.nan
                for r in rows
                if r["model"] == m
            ]
            for m in cfg["models"]
        ]
    )
    _heatmap(
        ctx,
        np.log10(G),
        cfg,
        f"log10 gamma at N_t = {heat:,} [log10 ratio]",
        "gamma_heatmap",
        f"log10 gamma at N_t = {heat:,} tokens for every model × system preset (> 0: EP wins).",
        center=0.0,
        fmt_cell=lambda v: f"{10**v:.3g}",
    )
    _heatmap(
        ctx,
        np.log10(T),
        cfg,
        "log10 tipping point N_t* [log10 tokens]",
        "tipping_heatmap",
        "Tipping point N_t* (tokens) per model × system; blank: offload wins at every N_t.",
        center=None,
        fmt_cell=lambda v: f"{10**v:.2g}",
    )
    _lines(ctx, cfg)
    ctx.advance()

    ep_share = float(np.mean(G > 1))
    lo = min(rows, key=lambda r: r[f"gamma_at_{heat}"])
    hi = max(rows, key=lambda r: r[f"gamma_at_{heat}"])
    never = [r for r in rows if r["tipping_tokens"] is None]
    ctx.summary.update({"pairs": len(rows), "ep_wins_share_at_heat_tokens": ep_share})
    table = "| model | " + " | ".join(s.name for s in systems) + " |\n|---|" + "---|" * len(systems) + "\n"
    for m in cfg["models"]:
        cells = [r for r in rows if r["model"] == m]
        table += (
            f"| {m} | "
            + " | ".join(
                f"{fmt(r[f'gamma_at_{heat}'])} / "
                f"{fmt(r['tipping_tokens']) if r['tipping_tokens'] else 'none'}"
                for r in cells
            )
            + " |\n"
        )
    ctx.section(f"""
{len(cfg["models"])} model presets × {len(systems)} system presets, seed assumptions (worst-case routing,
nominal links: {", ".join(f"{s.name} {fmt(s.b_pcie / 1e9)}/{fmt(s.b_net / 1e9)} GB/s" for s in systems)}
host link/network). At N_t = {heat:,} tokens EP wins for {ep_share:.0%} of the pairs. The smallest gamma is
{fmt(lo[f"gamma_at_{heat}"])} ({lo["model"]} on {lo["system"]}), the largest {fmt(hi[f"gamma_at_{heat}"])}
({hi["model"]} on {hi["system"]}). {len(never)} pairs have no tipping point (offload wins at every N_t).
Full rows with gamma at {", ".join(f"{t:,}" for t in cfg["tokens"])} tokens: `landscape.csv`.

Each cell: gamma at N_t = {heat:,} / tipping point N_t* (tokens).

{table}""")


def _heatmap(ctx, values, cfg, cbar_label, stem, caption, center, fmt_cell) -> None:
    import numpy as np

    from moelab.experiments import plots

    plt = plots.pyplot()
    fig, ax = plots.figure(width=7.5, height=6.5)
    finite = values[np.isfinite(values)]
    if center is not None and finite.size:
        span = float(np.max(np.abs(finite - center))) or 1.0
        im = ax.imshow(values, cmap="RdBu_r", vmin=center - span, vmax=center + span, aspect="auto")
    else:
        im = ax.imshow(values, cmap="viridis", aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            # The text colour that contrasts most with the cell's own colour (NaN cells are
            # blank: the white axes show through).
            cell = im.cmap(im.norm(v)) if np.isfinite(v) else (1.0, 1.0, 1.0)
            ax.text(
                j,
                i,
                fmt_cell(v) if np.isfinite(v) else "none",
                ha="center",
                va="center",
                fontsize=7,
                color=plots.text_color_on(cell),
            )
    ax.set_xticks(range(len(cfg["systems"])), cfg["systems"], rotation=30, ha="right")
    ax.set_yticks(range(len(cfg["models"])), cfg["models"])
    ax.set_xlabel("system preset [GPU with its host link and network]")
    ax.set_ylabel("model preset [HF config]")
    cbar = plt.colorbar(im, ax=ax)
    cbar.set_label(cbar_label)
    ctx.plot(fig, stem, caption)


def _lines(ctx, cfg, system_name: str = "h100-sxm", panels: int = 3) -> None:
    """gamma vs N_t for every model on one system: where each curve crosses 1 is its N_t*.

    All curves fall with slope -1 past saturation, so 15 of them in one frame are a bundle of
    near-parallel lines. They are dealt round-robin, in order of N_t*, into `panels` frames:
    curves side by side in N_t* land in different frames, and each frame has few enough
    lines for one distinct colour and line style each.
    """
    import numpy as np

    from moelab.costmodel import closed_form as cf
    from moelab.costmodel.presets import load_model, load_system
    from moelab.costmodel.specs import Options, Workload
    from moelab.experiments import plots

    system = load_system(system_name, measured=cfg["measured_links"])
    tokens = np.geomspace(1, 1e7, 200)
    # Models whose curves coincide (DeepSeek-V3 and R1 share every figure) get one line.
    curves: list[tuple[list[str], np.ndarray, float | None]] = []
    for m in cfg["models"]:
        model = load_model(m)
        g = cf.gamma_of_tokens(model, system, Options(), tokens)
        same = next((c for c in curves if np.allclose(c[1], g, rtol=1e-9, atol=0)), None)
        if same:
            same[0].append(m)
        else:
            curves.append(([m], g, cf.evaluate(model, system, Workload(tokens=1)).tipping_tokens))
    curves.sort(key=lambda c: c[2] if c[2] is not None else 0.0)
    fig, axes = plots.figure(ncols=panels, width=4.6 * panels, height=5.2, sharey=True)
    for p, ax in enumerate(axes):
        for i, (names, g, tip) in enumerate(curves[p::panels]):
            style = plots.series_style(i)
            ax.loglog(tokens, g, lw=1.8, label=" = ".join(names), **style)
            if tip is not None:
                ax.plot([tip], [1.0], "o", ms=5, color=style["color"])
        plots.gamma_line(ax, label="gamma = 1")
        for t in cfg["tokens"]:
            ax.axvline(t, color=plots.GUIDE_COLOR, lw=1.2, ls=":")
            ax.annotate(f"{t:,}", (t, 1), xycoords=("data", "axes fraction"), xytext=(2, -4),
                        textcoords="offset points", fontsize=7, color=plots.GUIDE_COLOR,
                        rotation=90, va="top")
        ax.set_xlabel("prefill tokens N_t [tokens]")
        ax.set_ylabel(plots.GAMMA_LABEL if p == 0 else "gamma [ratio]")
        ax.legend(fontsize=8, loc="lower left")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(
        f"Every model preset on {system.name} "
        f"({system.b_pcie / 1e9:g} GB/s host link, {system.b_net / 1e9:g} GB/s network); "
        "dot: tipping point N_t*",
        fontsize=10,
    )
    ctx.plot(
        fig,
        "gamma_vs_tokens_models",
        f"gamma vs N_t for every model preset on {system.name}, dealt over {panels} panels in order "
        "of N_t* (a dot where each curve crosses 1); dotted lines: the typical prefill sizes of the "
        "table; models with identical curves share a line.",
    )
