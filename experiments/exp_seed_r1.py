"""seed-r1: the worked example the seed names but leaves uncomputed: DeepSeek-R1 on an H100
with PCIe Gen5 and IB NDR.

gamma across N_t (worst-case routing, as the seed), the tipping point N_t*, the seed's
three factors, decode at batch 1; beside it the same with measured link bandwidths and
with expected (uniform) routing. Closed form only, one vectorized call per curve.
"""

from __future__ import annotations

NAME = "seed-r1"
SUMMARY = (
    "the seed's worked example: DeepSeek-R1 gamma vs N_t on H100 (PCIe Gen5, IB NDR), tipping point, "
    "3 factors"
)
VERSION = "2"
DEPENDS = ("moelab.costmodel.closed_form", "moelab.costmodel.presets", "moelab.costmodel.specs")


def INPUTS(cfg):
    from moelab.experiments.runner import preset_files

    return preset_files(cfg["model"])


def config(quick: bool) -> dict:
    return {
        "model": "deepseek-r1",
        "system": "h100-sxm",
        "host_link": "pcie-gen5-x16",
        "network": "ib-ndr-400",
        "expert_dtype": "fp8",
        "act_dtype": "bf16",
        "tokens_min": 1,
        "tokens_max": 10_000_000,
        "points": 60 if quick else 400,
        "example_tokens": 4096,
        "decode_batch": 1,
    }


def specs(cfg):
    from moelab.costmodel.presets import load_model, load_system

    model = load_model(cfg["model"]).with_(expert_dtype=cfg["expert_dtype"], act_dtype=cfg["act_dtype"])
    nominal = load_system(cfg["system"], host_link=cfg["host_link"], network=cfg["network"])
    measured = load_system(cfg["system"], host_link=cfg["host_link"], network=cfg["network"], measured=True)
    return model, nominal, measured


def run(cfg: dict, ctx) -> None:
    import numpy as np

    from moelab.costmodel import closed_form as cf
    from moelab.costmodel.specs import Options, Workload
    from moelab.show import fmt

    model, nominal, measured = specs(cfg)
    k, E = model.top_k, model.n_experts
    tokens = np.unique(np.round(np.geomspace(cfg["tokens_min"], cfg["tokens_max"], cfg["points"])))
    tokens = np.union1d(tokens, [cfg["example_tokens"], E // k])

    # Curves: the general definition (ratio of overheads) and the seed's boxed formula.
    n_worst = cf.n_used_worst(tokens, k, E)
    n_unif = cf.n_used_uniform(tokens, k, E)
    g = cf.gamma_of_tokens(model, nominal, Options(), tokens)
    g_boxed = cf.gamma_seed(
        model.expert_params,
        model.f_e,
        model.hidden,
        model.f_a,
        nominal.b_net,
        nominal.b_pcie,
        n_worst,
        tokens,
    )
    g_meas = cf.gamma_of_tokens(model, measured, Options(), tokens)
    g_unif = cf.gamma_of_tokens(model, nominal, Options(routing="uniform"), tokens)
    L = model.n_moe_layers
    t_p = cf.offload_overhead(n_worst, model.expert_bytes, nominal.b_pcie, L)
    t_ep = cf.ep_overhead(tokens, model.hidden, model.f_a, model.f_a, nominal.b_net, L)
    identity_err = float(np.max(np.abs(g / g_boxed - 1)))
    ctx.advance()

    ex = cf.evaluate(model, nominal, Workload(tokens=cfg["example_tokens"]))
    ex_meas = cf.evaluate(model, measured, Workload(tokens=cfg["example_tokens"]))
    ex_unif = cf.evaluate(model, nominal, Workload(tokens=cfg["example_tokens"]), Options(routing="uniform"))
    dec = cf.evaluate(model, nominal, Workload(decode=True, batch=cfg["decode_batch"]))
    C = ex.c_seed
    ctx.advance()

    rows = [
        {
            "tokens": int(t),
            "n_ue_worst": float(a),
            "n_ue_uniform": float(b),
            "gamma": float(c),
            "gamma_boxed_formula": float(d),
            "gamma_measured_links": float(e),
            "gamma_uniform": float(f),
            "t_p_overhead_s": float(p),
            "t_ep_overhead_s": float(q),
        }
        for t, a, b, c, d, e, f, p, q in zip(
            tokens, n_worst, n_unif, g, g_boxed, g_meas, g_unif, t_p, t_ep, strict=True
        )
    ]
    ctx.rows("gamma_vs_tokens", rows)
    tip = ex.tipping_tokens
    result = {
        "model": model.name,
        "system": nominal.name,
        "host_link": nominal.host_link,
        "network": nominal.network,
        "L": L,
        "E": E,
        "k": k,
        "d": model.hidden,
        "S_E": model.expert_params,
        "f_e": model.f_e,
        "f_a": model.f_a,
        "b_pcie": nominal.b_pcie,
        "b_net": nominal.b_net,
        "b_pcie_measured": measured.b_pcie,
        "b_net_measured": measured.b_net,
        "example_tokens": cfg["example_tokens"],
        "model_term": ex.model_term,
        "system_term": ex.system_term,
        "query_term": ex.query_term,
        "C": C,
        "gamma_below_saturation": C * k,
        "saturation_tokens": E / k,
        "gamma": ex.gamma,
        "gamma_boxed_formula": ex.gamma_seed,
        "n_ue": ex.n_ue,
        "t_p_overhead_s": ex.t_p_overhead,
        "t_ep_overhead_s": ex.t_ep_overhead,
        "t_b_s": ex.t_b,
        "tipping_tokens": tip,
        "tipping_tokens_C_times_E": C * E,
        "gamma_measured_links": ex_meas.gamma,
        "tipping_tokens_measured_links": ex_meas.tipping_tokens,
        "gamma_uniform": ex_unif.gamma,
        "tipping_tokens_uniform": ex_unif.tipping_tokens,
        "decode_batch": cfg["decode_batch"],
        "gamma_decode": dec.gamma,
        "max_rel_diff_ratio_vs_boxed": identity_err,
    }
    ctx.json("result.json", result)
    ctx.summary.update(
        {
            k_: result[k_]
            for k_ in (
                "model",
                "system",
                "host_link",
                "network",
                "example_tokens",
                "decode_batch",
                "gamma",
                "tipping_tokens",
                "gamma_decode",
                "model_term",
                "system_term",
                "query_term",
            )
        }
    )

    _plot_gamma(ctx, tokens, g, g_meas, g_unif, result)
    _plot_factors(ctx, tokens, result, n_worst)
    _plot_overheads(ctx, tokens, t_p, t_ep, result)
    ctx.advance()

    n_ex = cfg["example_tokens"]

    def tipping(x):
        return f"{fmt(x)} tokens" if x is not None else "none (offload wins at every N_t)"

    ctx.section(f"""
DeepSeek-R1 (L = {L} MoE layers, E = {E}, k = {k}, d = {model.hidden}, S_E = {model.expert_params / 1e6:.1f} M
parameters, {model.expert_dtype} experts, {model.act_dtype} activations) on {nominal.name} with
{nominal.host_link} (B_pcie = {fmt(nominal.b_pcie / 1e9)} GB/s) and {nominal.network}
(B_net = {fmt(nominal.b_net / 1e9)} GB/s), worst-case routing as in the seed.

| quantity | formula | value |
|---|---|---|
| model factor | S_E f_E / (d f_a) | {fmt(result["model_term"])} |
| system factor | B_net / B_pcie | {fmt(result["system_term"])} |
| query factor at N_t = {n_ex:,} | N_ue / N_t = {fmt(ex.n_ue)} / {n_ex:,} | {fmt(result["query_term"])} |
| C | 1/2 · model · system | {fmt(C)} |
| gamma at N_t = {cfg["example_tokens"]:,} | (T_P - T_B) / (T_EP - T_B) | **{fmt(ex.gamma)}** |
| gamma below saturation (k N_t ≤ E) | C k | {fmt(C * k)} |
| tipping point N_t* | C E | **{tipping(tip)}** |
| decode, batch {cfg["decode_batch"]} | C k | {fmt(dec.gamma)} |
| offload overhead at N_t = {cfg["example_tokens"]:,} | L S_E f_E N_ue / B_pcie | {fmt(ex.t_p_overhead)} s |
| EP overhead at N_t = {cfg["example_tokens"]:,} | 2 L N_t d f_a / B_net | {fmt(ex.t_ep_overhead)} s |

The ratio of overheads and the seed's boxed formula agree to {identity_err:.1e} (relative) over
{len(tokens)} values of N_t. With the measured links ({fmt(measured.b_pcie / 1e9)} GB/s host→device,
{fmt(measured.b_net / 1e9)} GB/s network) gamma at {cfg["example_tokens"]:,} tokens is
{fmt(ex_meas.gamma)} and N_t* = {tipping(ex_meas.tipping_tokens)}; with expected (uniform) routing
instead of the worst case, gamma = {fmt(ex_unif.gamma)} and N_t* = {tipping(ex_unif.tipping_tokens)}.
The three factors scale gamma alike (each enters it once); the model term is the one far from 1:
one {model.name} expert weighs as much as {fmt(ex.model_term)} tokens' activations, so EP wins for
every prefill below {tipping(tip)}.
""")


def _plot_gamma(ctx, tokens, g, g_meas, g_unif, r) -> None:
    from moelab.experiments import plots

    fig, ax = plots.figure()
    ax.loglog(
        tokens,
        g,
        color="black",
        lw=2,
        label=f"seed: worst case, nominal links ({r['b_pcie'] / 1e9:g} / {r['b_net'] / 1e9:g} GB/s)",
    )
    ax.loglog(
        tokens,
        g_meas,
        color="tab:orange",
        label=f"worst case, measured links "
        f"({r['b_pcie_measured'] / 1e9:g} / {r['b_net_measured'] / 1e9:g} GB/s)",
    )
    ax.loglog(tokens, g_unif, color="tab:green", ls=":", lw=2, label="expected N_ue (uniform routing)")
    plots.gamma_line(ax)
    if r["tipping_tokens"]:
        ax.axvline(r["tipping_tokens"], color="gray", lw=0.8)
        ax.annotate(
            f"N_t* = {r['tipping_tokens']:,.0f}",
            (r["tipping_tokens"], 1),
            textcoords="offset points",
            xytext=(-110, 30),
            arrowprops={"arrowstyle": "->"},
        )
    ax.plot([r["example_tokens"]], [r["gamma"]], "o", color="black")
    ax.annotate(
        f"gamma = {r['gamma']:.4g} at N_t = {r['example_tokens']:,}",
        (r["example_tokens"], r["gamma"]),
        textcoords="offset points",
        xytext=(8, 8),
    )
    ax.set_xlabel("prefill tokens N_t [tokens]")
    ax.set_ylabel(plots.GAMMA_LABEL)
    ax.set_title("DeepSeek-R1 on H100: above 1 EP wins, below 1 offload wins", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(True, which="both", alpha=0.3)
    ctx.plot(
        fig,
        "gamma_vs_tokens",
        "DeepSeek-R1 gamma vs prefill tokens (log axes) with the gamma = 1 line and the tipping point.",
    )


def _plot_factors(ctx, tokens, r, n_worst) -> None:
    import numpy as np

    from moelab.experiments import plots

    fig, ax = plots.figure()
    ax.loglog(tokens, np.full(tokens.shape, 0.5 * r["model_term"]), label="1/2 · model: S_E f_E / (2 d f_a)")
    ax.loglog(tokens, np.full(tokens.shape, r["system_term"]), label="system: B_net / B_pcie")
    ax.loglog(tokens, n_worst / tokens, label="query: N_ue / N_t = min(k N_t, E) / N_t")
    ax.loglog(
        tokens,
        0.5 * r["model_term"] * r["system_term"] * n_worst / tokens,
        color="black",
        lw=2,
        label="gamma (their product)",
    )
    plots.gamma_line(ax, label="1")
    ax.axvline(r["saturation_tokens"], color="gray", lw=0.8, ls=":")
    ax.set_xlabel("prefill tokens N_t [tokens]")
    ax.set_ylabel("factor value [ratio]")
    ax.set_title("The seed's three factors (the query factor falls past N_t = E/k)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ctx.plot(fig, "factors", "The seed's three factors of gamma for DeepSeek-R1 on H100 and their product.")


def _plot_overheads(ctx, tokens, t_p, t_ep, r) -> None:
    from moelab.experiments import plots

    fig, ax = plots.figure()
    ax.loglog(
        tokens, t_p, color=plots.OFFLOAD_COLOR, lw=2, label="offload: T_P - T_B = L S_E f_E N_ue / B_pcie"
    )
    ax.loglog(tokens, t_ep, color=plots.EP_COLOR, lw=2, label="EP: T_EP - T_B = 2 L N_t d f_a / B_net")
    if r["tipping_tokens"]:
        ax.axvline(r["tipping_tokens"], color="gray", lw=0.8, label=f"N_t* = {r['tipping_tokens']:,.0f}")
    ax.set_xlabel("prefill tokens N_t [tokens]")
    ax.set_ylabel("overhead over the baseline T_B [s]")
    ax.set_title("DeepSeek-R1 prefill on H100: time each strategy adds", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ctx.plot(
        fig, "overheads", "Offload and EP overheads (seconds) for DeepSeek-R1 prefill; they cross at N_t*."
    )


def STEPS(cfg) -> int:
    return 3
