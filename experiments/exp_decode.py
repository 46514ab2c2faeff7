"""decode: gamma for decode batches (the seed: replace N_t by the tokens of one step).

Per step a batch of B tokens uses min(k B, E) experts (worst case) and both overheads are
paid once per step, so over N_OS steps both scale by N_OS and gamma does not depend on it.
gamma(B) = C k while k B <= E, then C E / B: decode batches are far below any tipping point.
"""

from __future__ import annotations

NAME = "decode"
SUMMARY = "gamma and per-step overheads for decode batches (batch 1 to 4096) across model presets"
VERSION = "1"
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
    return {
        "models": [
            "deepseek-r1",
            "kimi-k2",
            "qwen3-235b-a22b",
            "qwen3-30b-a3b",
            "mixtral-8x7b",
            "gpt-oss-120b",
            "llama4-maverick",
        ],
        "system": "h100-sxm",
        "batches": [2**i for i in range(13)],  # 1 .. 4096 tokens per step
        "table_batches": [1, 64, 256],
        "steps": 1000,  # output length N_OS for the per-request totals
        "detail_model": "deepseek-r1",
        "ep_ranks": 32,
    }


def STEPS(cfg) -> int:
    return len(cfg["models"]) + 1


def run(cfg: dict, ctx) -> None:
    import numpy as np

    from moelab.costmodel import closed_form as cf
    from moelab.costmodel.presets import load_model, load_system
    from moelab.costmodel.specs import Options, Workload
    from moelab.show import fmt

    system = load_system(cfg["system"])
    batches = np.asarray(cfg["batches"], dtype=float)
    rows, curves = [], {}
    for m in cfg["models"]:
        model = load_model(m)
        g = cf.gamma_of_tokens(model, system, Options(), batches)
        g_unif = cf.gamma_of_tokens(model, system, Options(routing="uniform"), batches)
        curves[m] = (g, g_unif)
        tipping = cf.evaluate(model, system, Workload(tokens=1)).tipping_tokens  # same N_t* as prefill
        for b, x, y in zip(cfg["batches"], g, g_unif, strict=True):
            r = cf.evaluate(model, system, Workload(decode=True, batch=b, steps=cfg["steps"]))
            # One decode step is a prefill of B tokens: the two paths must agree.
            if abs(r.gamma / x - 1) > 1e-9:
                raise RuntimeError(f"{m}, batch {b}: decode gamma {r.gamma} != prefill {x}")
            rows.append(
                {
                    "model": m,
                    "batch": b,
                    "steps": cfg["steps"],
                    "gamma": float(x),
                    "gamma_uniform": float(y),
                    "n_ue": r.n_ue,
                    "t_p_overhead_per_step_s": r.t_p_overhead / cfg["steps"],
                    "t_ep_overhead_per_step_s": r.t_ep_overhead / cfg["steps"],
                    "t_p_overhead_request_s": r.t_p_overhead,
                    "t_ep_overhead_request_s": r.t_ep_overhead,
                    "tipping_batch": tipping,
                }
            )
        ctx.advance()
    ctx.rows("decode", rows)

    detail = load_model(cfg["detail_model"])
    per_step = {}
    for label, opts in (
        ("seed", Options()),
        ("expected N_ue (uniform)", Options(routing="uniform")),
        (f"EP{cfg['ep_ranks']} fan-out", Options(ep_ranks=cfg["ep_ranks"])),
    ):
        res = [cf.evaluate(detail, system, Workload(decode=True, batch=int(b)), opts) for b in batches]
        per_step[label] = ([r.t_p_overhead for r in res], [r.t_ep_overhead for r in res])
    _plot_gamma(ctx, batches, curves, system)
    _plot_per_step(ctx, batches, per_step, detail.name, system)
    ctx.advance()

    table = (
        "| model | tipping batch (tokens/step) | "
        + " | ".join(f"gamma at B = {b}" for b in cfg["table_batches"])
        + " | offload / EP overhead per step at B = 1 |\n"
    )
    table += "|---|---|" + "---|" * len(cfg["table_batches"]) + "---|\n"
    for m in cfg["models"]:
        mine = {r["batch"]: r for r in rows if r["model"] == m}
        one = mine[1]
        table += (
            f"| {m} | {fmt(one['tipping_batch'])} | "
            + " | ".join(fmt(mine[b]["gamma"]) for b in cfg["table_batches"])
            + f" | {fmt(one['t_p_overhead_per_step_s'] * 1e3)} ms / "
            f"{fmt(one['t_ep_overhead_per_step_s'] * 1e6)} µs |\n"
        )
    min_gamma = min(r["gamma"] for r in rows)
    r1 = {r["batch"]: r for r in rows if r["model"] == cfg["detail_model"]}
    ctx.summary.update({"min_gamma": min_gamma, "gamma_r1_batch1": r1[1]["gamma"]})
    ctx.section(f"""
Decode on {system.name} ({fmt(system.b_pcie / 1e9)} GB/s host link, {fmt(system.b_net / 1e9)} GB/s network),
worst-case routing per step, batch B = {cfg["batches"][0]} to {cfg["batches"][-1]:,} tokens per step. Over
N_OS = {cfg["steps"]:,} steps both overheads scale by N_OS, so gamma is the per-step ratio. The smallest
gamma over all models and batches is {fmt(min_gamma)}: for decode, {
        "EP wins everywhere" if min_gamma > 1 else "offload wins somewhere"
    } in this range. For {cfg["detail_model"]} at batch 1, offload adds
{fmt(r1[1]["t_p_overhead_per_step_s"] * 1e3)} ms per generated token against
{fmt(r1[1]["t_ep_overhead_per_step_s"] * 1e6)} µs for EP
({fmt(r1[1]["t_p_overhead_request_s"])} s vs {fmt(r1[1]["t_ep_overhead_request_s"])} s over {
        cfg["steps"]:,} tokens).

{table}""")


def _plot_gamma(ctx, batches, curves, system) -> None:
    from moelab.experiments import plots

    fig, ax = plots.figure(width=7, height=4.6)
    for i, (m, (g, g_unif)) in enumerate(curves.items()):
        (line,) = ax.loglog(batches, g, marker="o", ms=3, label=m)
        ax.loglog(
            batches, g_unif, ls=":", color=line.get_color(), label="_" if i else "dotted: expected N_ue"
        )
    plots.gamma_line(ax, label="gamma = 1")
    ax.set_xlabel("decode batch B [tokens per step]")
    ax.set_ylabel(plots.GAMMA_LABEL)
    ax.set_title(
        f"Decode on {system.name}: gamma per step (worst case; dotted: uniform routing)", fontsize=10
    )
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    ctx.plot(
        fig,
        "gamma_vs_batch",
        "gamma vs decode batch for several model presets (log axes), with the gamma = 1 line.",
    )


def _plot_per_step(ctx, batches, per_step, model_name, system) -> None:
    import numpy as np

    from moelab.experiments import plots

    fig, ax = plots.figure(width=7, height=4.6)
    styles = ["-", ":", "--"]
    for (label, (tp, tep)), ls in zip(per_step.items(), styles, strict=False):
        ax.loglog(batches, np.asarray(tp) * 1e3, color=plots.OFFLOAD_COLOR, ls=ls, label=f"offload, {label}")
        ax.loglog(batches, np.asarray(tep) * 1e3, color=plots.EP_COLOR, ls=ls, label=f"EP, {label}")
    ax.set_xlabel("decode batch B [tokens per step]")
    ax.set_ylabel("overhead per decode step [ms]")
    ax.set_title(f"{model_name} on {system.name}: time each strategy adds to one step", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    ctx.plot(
        fig,
        "overhead_per_step",
        f"Per-step offload and EP overheads (ms) for {model_name} decode; the "
        "offload cost saturates once all experts are used.",
    )
