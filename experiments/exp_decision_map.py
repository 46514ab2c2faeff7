"""decision-map: the best deployment (EP, offload, CPU experts, hybrid) over two planes.

For three models on H100 nodes with a Sapphire Rapids host (`moelab plan`'s defaults):
(1) prefill tokens per forward pass x GPUs available; (2) decode batch x host DRAM
bandwidth on one 8-GPU node. Each cell is `moelab.plan`'s best strategy by tokens/s per
GPU, or "none" where nothing fits; the regions are labelled in the plots and tables.
"""

from __future__ import annotations

NAME = "decision-map"
SUMMARY = "best deployment (EP / offload / CPU experts / hybrid) over tokens x GPUs and batch x DRAM"
VERSION = "2"
DEPENDS = (
    "moelab.api",
    "moelab.costmodel.plan",
    "moelab.costmodel.memory",
    "moelab.costmodel.closed_form",
    "moelab.costmodel.presets",
    "moelab.costmodel.specs",
    "moelab.costmodel.hf_config",
)
LABELS = {"ep": "EP", "tp": "TP", "offload": "OFF", "cpu-experts": "CPU", "hybrid": "HYB", None: "none"}
COLORS = {"ep": "#d62728", "tp": "#9467bd", "offload": "#1f77b4", "cpu-experts": "#2ca02c",
          "hybrid": "#ff7f0e", None: "#bbbbbb"}


def INPUTS(cfg):
    from moelab.experiments.runner import preset_files

    files = preset_files(*cfg["models"])
    from moelab.costmodel.presets import PRESETS

    return [*files, PRESETS / "cpus.json"]


def config(quick: bool) -> dict:
    return {
        "models": ["deepseek-r1", "qwen3-235b-a22b", "mixtral-8x7b"],
        "system": "h100-sxm",
        "cpu": "xeon-8470",
        "routing": "uniform",
        "tokens": [1, 16, 256, 4096] if quick else [1, 4, 16, 64, 256, 1024, 4096, 16384],
        "gpus": [1, 8, 32] if quick else [1, 2, 4, 8, 16, 32, 64],
        "batches": [1, 64] if quick else [1, 4, 16, 64, 256, 1024],
        "dram_GBps": [100, 800] if quick else [100, 200, 400, 800, 1600],
        "decode_gpus": 8,
        "context": 4096,
    }


def STEPS(cfg) -> int:
    return len(cfg["models"])


def run(cfg: dict, ctx) -> None:
    from moelab import api

    rows = []
    for m in cfg["models"]:
        for n in cfg["tokens"]:
            for g in cfg["gpus"]:
                r = api.plan(m, cfg["system"], gpus=g, tokens=n, cpu=cfg["cpu"], routing=cfg["routing"])
                rows.append(_row("tokens_x_gpus", m, r, tokens=n, gpus=g))
        for b in cfg["batches"]:
            for bw in cfg["dram_GBps"]:
                r = api.plan(m, cfg["system"], gpus=cfg["decode_gpus"], decode_batch=b,
                             context=cfg["context"], cpu=cfg["cpu"], routing=cfg["routing"],
                             host_dram_bw=bw * 1e9)
                rows.append(_row("batch_x_dram", m, r, batch=b, dram_GBps=bw))
        ctx.advance()
    ctx.rows("decision_map", rows)
    _plot(ctx, cfg, rows, "tokens_x_gpus", "tokens", "gpus", "prefill tokens per pass [tokens]",
          "GPUs available [count]")
    _plot(ctx, cfg, rows, "batch_x_dram", "batch", "dram_GBps", "decode batch [sequences]",
          "host DRAM bandwidth per node [GB/s]")
    counts = {}
    for r in rows:
        counts[(r["plane"], r["best"])] = counts.get((r["plane"], r["best"]), 0) + 1
    ctx.summary.update({f"{plane}:{best}": c for (plane, best), c in counts.items()})
    ctx.section(_section(cfg, rows))


def _row(plane, model, r, **coords):
    best = r["best"]
    s = next((x for x in r["strategies"] if x["name"] == best), None) if best else None
    return {"plane": plane, "model": model, **coords, "best": best, "engine": r["engine"],
            "engine_note": r.get("engine_note"),
            "step_s": s.get("step_s") if s else None, "bound_step_s": s.get("bound_step_s") if s else None,
            "tokens_per_s_per_gpu": s["tokens_per_s_per_gpu"] if s else None,
            "gpus_used": s["gpus"] if s else None, "bound": s["bound"] if s else None,
            "ep_feasible": any(x["name"] == "ep" and x["feasible"] for x in r["strategies"])}


def _grid(cfg, rows, plane, model, xkey, ykey):
    xs = cfg["tokens" if xkey == "tokens" else "batches"]
    ys = cfg["gpus" if ykey == "gpus" else "dram_GBps"]
    cell = {(r[xkey], r[ykey]): r for r in rows if r["plane"] == plane and r["model"] == model}
    return xs, ys, cell


def _plot(ctx, cfg, rows, plane, xkey, ykey, xlabel, ylabel):
    from matplotlib.patches import Patch

    from moelab.experiments import plots
    from moelab.show import fmt

    models = cfg["models"]
    fig, axes = plots.figure(ncols=len(models), width=5.2 * len(models), height=4.4)
    for ax, m in zip(axes, models, strict=True):
        xs, ys, cell = _grid(cfg, rows, plane, m, xkey, ykey)
        for i, x in enumerate(xs):
            for j, y in enumerate(ys):
                r = cell[(x, y)]
                ax.add_patch(plots.pyplot().Rectangle((i, j), 1, 1, color=COLORS[r["best"]]))
                label = LABELS[r["best"]]
                rate = r["tokens_per_s_per_gpu"]
                if rate:
                    label += "\n" + fmt(round(rate, 3 if rate < 10 else 0))
                ax.text(i + 0.5, j + 0.5, label, ha="center", va="center", fontsize=6)
        ax.set_xlim(0, len(xs))
        ax.set_ylim(0, len(ys))
        ax.set_xticks([i + 0.5 for i in range(len(xs))], [f"{x:,}" for x in xs], fontsize=7)
        ax.set_yticks([j + 0.5 for j in range(len(ys))], [f"{y:,}" for y in ys], fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(m, fontsize=10)
    legend = [Patch(color=COLORS[k], label=f"{LABELS[k]}: {k or 'nothing fits'}") for k in COLORS]
    axes[-1].legend(handles=legend, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    what = ("prefill tokens per pass x GPUs" if plane == "tokens_x_gpus"
            else f"decode batch x host DRAM bandwidth ({cfg['decode_gpus']} GPUs, "
                 f"context {cfg['context']:,})")
    ctx.plot(fig, plane, f"Best strategy by tokens/s per GPU over {what}, on {cfg['system']} with "
                         f"{cfg['cpu']} hosts, {cfg['routing']} routing; cell text: region and "
                         "tokens/s per GPU.")


def _section(cfg, rows) -> str:
    engines = sorted({(r["engine"], r["engine_note"]) for r in rows})
    said = "; ".join(f"{e} ({note})" for e, note in engines)
    parts = [f"""`moelab.plan` on {cfg["system"]} nodes with {cfg["cpu"]} hosts, {cfg["routing"]} routing,
at plan's default engine: {said}. Every cell is a prediction (`step_s`, the engine's achieved
efficiencies), not the roofline (`bound_step_s`, kept in the rows).
Each cell holds the strategy with the most tokens/s per GPU that fits (EP = expert parallelism over
the GPUs, OFF = offload with a resident hot-expert cache, CPU = routed experts on the CPU, HYB =
hottest experts on the GPU and the rest on the CPU; none = nothing fits), then that rate.
The objective is tokens/s per GPU: EP uses all the GPUs of its row, the single-GPU
strategies as many as pay (`gpus_used` in the rows; often one GPU with the whole host).
CPU experts run at the achieved figures of costmodel/predict/cpu.json (an engine without CPU
kernels of its own runs them through KTransformers' kt-kernel, so gets KTransformers' figures);
long prefills may stream the experts to the GPU layer by layer (KTransformers' layerwise
prefill), which is where the hybrid wins a large prefill on one GPU.
"""]
    planes = (("tokens_x_gpus", "tokens", "gpus", "prefill tokens per pass (columns) x GPUs (rows)"),
              ("batch_x_dram", "batch", "dram_GBps", "decode batch (columns) x host DRAM GB/s (rows)"))
    for plane, xkey, ykey, title in planes:
        parts.append(f"\n### {title}\n")
        for m in cfg["models"]:
            xs, ys, cell = _grid(cfg, rows, plane, m, xkey, ykey)
            parts.append(f"\n**{m}**\n\n| | " + " | ".join(f"{x:,}" for x in xs) + " |\n|---|"
                         + "---|" * len(xs) + "\n")
            for y in ys:
                parts.append(f"| {y:,} | " + " | ".join(LABELS[cell[(x, y)]["best"]] for x in xs) + " |\n")
    cell = next((r for r in rows if r["plane"] == "tokens_x_gpus" and r["model"] == "mixtral-8x7b"
                 and r.get("tokens") == max(cfg["tokens"]) and r.get("gpus") == 1), None)
    if cell is not None and cell["step_s"]:
        n = cell["tokens"]
        parts.append(f"\nMixtral-8x7B prefill of {n:,} tokens on one GPU: {LABELS[cell['best']]} at "
                     f"{n / cell['step_s']:,.0f} tokens/s predicted (bound: {cell['bound']}); its roofline "
                     f"(`bound_step_s`) would give {n / cell['bound_step_s']:,.0f}. The map's cells are the "
                     "predictions, not the CPU's or the GPU's peak.\n")
    regions = {}
    for r in rows:
        regions.setdefault((r["model"], r["plane"]), set()).add(LABELS[r["best"]])
    parts.append("\nRegions seen: " + "; ".join(f"{m} {p.replace('_x_', ' x ')}: {', '.join(sorted(v))}"
                                               for (m, p), v in regions.items()) + ".\n")
    return "".join(parts)
