"""validation: the model's predictions against measurements published in public sources.

The facts are in costmodel/presets/published.json (each with its source) and, for single
links, in the measured figures of systems.json. The model is the EP side of gamma for one
collective: time = alpha_net + bytes / B, with bytes counted as the closed form counts them
(tokens × destinations × hidden × bytes per element, fp8 with its block scales).

Fitted, and only these (each from one named point; every other point is a prediction):
- alpha_net, the latency of one collective: from DeepEP's low-latency dispatch at EP256.
- eta_net, one efficiency for every scale-out/scale-up network: from IB NDR's measured figure.
- eta_host, one efficiency for every host link: from PCIe Gen4's measured figure.
The errors reported as the model's are on the points not used for fitting.
DeepSeek's production throughput cannot be predicted from these formulas alone (it
includes cache hits, attention, overlap): it is compared with the network-only bound.
"""

from __future__ import annotations

from pathlib import Path

NAME = "validation"
SUMMARY = "model vs published measurements (DeepEP, DeepSeek serving, PCIe/IB): errors, fits named, sources"
VERSION = "1"
DEPENDS = ("moelab.costmodel.closed_form", "moelab.costmodel.presets", "moelab.costmodel.specs")

LL_FIT = ("dispatch", 256)  # the one low-latency point alpha_net is fitted to
NET_FIT = "ib-ndr-400"  # the network whose measured/nominal ratio is eta_net
HOST_FIT = "pcie-gen4-x16"  # the host link whose measured/nominal ratio is eta_host


def published_path() -> Path:
    from moelab.costmodel.presets import PRESETS

    return PRESETS / "published.json"


def published() -> dict:
    import json

    return json.loads(published_path().read_text())


def INPUTS(cfg):
    from moelab.costmodel.presets import PRESETS

    return [published_path(), PRESETS / "systems.json"]


def config(quick: bool) -> dict:
    return {
        "ll_fit": list(LL_FIT),
        "net_fit": NET_FIT,
        "host_fit": HOST_FIT,
        "gpu": "h800-sxm",
        "nvlink": "nvlink4-h800",
    }


def STEPS(cfg) -> int:
    return 4


# --- the model of one collective -------------------------------------------------------------


def bytes_per_token(src: dict, kind: str) -> float:
    """Bytes one token's activations take in a dispatch (fp8 + its block scales) or a combine."""
    from moelab.costmodel.specs import DTYPE_BYTES

    d = src["hidden"]
    if kind == "dispatch":
        f = DTYPE_BYTES[src["dispatch_dtype"]]
        scales = d / src["fp8_scale_block"] * src["fp8_scale_bytes"] if src["dispatch_dtype"] == "fp8" else 0
        return d * f + scales
    return d * DTYPE_BYTES[src["combine_dtype"]]


def links(cfg) -> tuple[float, float]:
    """(B_net, B_nvlink) in B/s: the IB preset's nominal figure, and NVLink's measured one (H800)."""
    from moelab.costmodel.presets import load_system, system_table

    b_net = load_system(cfg["gpu"]).b_net
    b_nvl = system_table()["networks"][cfg["nvlink"]]["measured_GBps"] * 1e9
    return b_net, b_nvl


def ll_time(nbytes: float, ranks: int, gpus_per_node: int, alpha: float, b_net: float, b_nvl: float) -> float:
    """One low-latency collective: alpha + the slower of its inter-node (IB) and intra-node (NVLink) parts.

    DeepEP's low-latency kernels send one copy per (token, expert) pair, spread evenly over
    the R ranks: (R - G)/R of the bytes leave the node, (G - 1)/R stay on it (G GPUs per
    node), 1/R stay on the GPU. The two links run at the same time.
    """
    inter = max(ranks - gpus_per_node, 0) / ranks
    intra = (min(ranks, gpus_per_node) - 1) / ranks
    return alpha + max(nbytes * inter / b_net, nbytes * intra / b_nvl)


def ll_bytes(src: dict, kind: str) -> float:
    """Bytes of one low-latency collective per rank: tokens × k copies × bytes per token."""
    return src["tokens_per_rank"] * src["top_k"] * bytes_per_token(src, kind)


def fitted_alpha_net(cfg: dict | None = None) -> tuple[float, str]:
    """alpha_net fitted to one published point (LL_FIT); the other points test it."""
    cfg = cfg or config(False)
    ll = published()["deepep_low_latency"]
    kind, ep = cfg["ll_fit"]
    point = next(p for p in ll["points"] if p["ep"] == ep)
    b_net, b_nvl = links(cfg)
    no_latency = ll_time(ll_bytes(ll, kind), ep, ll["gpus_per_node"], 0.0, b_net, b_nvl)
    alpha = point[f"{kind}_us"] * 1e-6 - no_latency
    if alpha < 0:
        raise ValueError(f"alpha_net fit at {kind} EP{ep} is negative ({alpha:.3g} s)")
    return alpha, f"fitted to DeepEP low-latency {kind} at EP{ep} (experiment validation)"


def remote_nodes_normal(src: dict, nodes: int) -> float:
    """Expected remote nodes per token in DeepEP's internode test: top-k inside min(nodes, 4) chosen nodes.

    Each chosen node holds E/nodes experts; a chosen node is hit with probability
    p = fanout_uniform(g, g E/n, k) / (g - 1) (closed form); the own node is among the g
    chosen with probability g/n. Remote nodes = g p (1 - 1/n).
    """
    from moelab.costmodel.closed_form import fanout_uniform

    g = min(nodes, src["topk_groups_max"])
    if g < 2:
        return 0.0
    p = float(fanout_uniform(g, g * src["n_experts"] / nodes, src["top_k"])) / (g - 1)
    return g * p * (1 - 1 / nodes)


def run(cfg: dict, ctx) -> None:
    from moelab.costmodel.closed_form import fanout_uniform
    from moelab.costmodel.presets import system_table

    pub = published()
    b_net, b_nvl = links(cfg)
    alpha, alpha_src = fitted_alpha_net(cfg)
    rows = []

    # 1. DeepEP low-latency kernels: time per collective (µs), and the bytes behind DeepEP's GB/s column.
    ll = pub["deepep_low_latency"]
    for p in ll["points"]:
        for kind in ("dispatch", "combine"):
            nbytes = ll_bytes(ll, kind)
            fitted = [kind, p["ep"]] == list(cfg["ll_fit"])
            rows.append(
                _row(
                    "deepep-ll",
                    f"{kind} EP{p['ep']}",
                    "latency [µs]",
                    p[f"{kind}_us"],
                    ll_time(nbytes, p["ep"], ll["gpus_per_node"], alpha, b_net, b_nvl) * 1e6,
                    "alpha_net (this point)" if fitted else "—",
                    ll["source"],
                    unfitted=ll_time(nbytes, p["ep"], ll["gpus_per_node"], 0.0, b_net, b_nvl) * 1e6,
                )
            )
            # DeepEP's bandwidth column is its bytes over its time: compare the bytes we count.
            rows.append(
                _row(
                    "deepep-ll-bytes",
                    f"{kind} EP{p['ep']}",
                    "bytes per rank [MB]",
                    p[f"{kind}_GBps"] * p[f"{kind}_us"] * 1e-3,
                    nbytes / 1e6,
                    "—",
                    ll["source"],
                )
            )
    ctx.advance()

    # 2. DeepEP normal kernels: bottleneck bandwidth (GB/s) = bytes / (alpha + bytes / B).
    nk = pub["deepep_normal"]
    for p in nk["points"]:
        nodes = max(p["ep"] // nk["gpus_per_node"], 1)
        if p["domain"] == "nvlink":
            dest, link = float(fanout_uniform(p["ep"], nk["n_experts"], nk["top_k"])), b_nvl
        else:
            dest, link = remote_nodes_normal(nk, nodes), b_net
        for kind in ("dispatch", "combine"):
            nbytes = nk["tokens"] * dest * bytes_per_token(nk, kind)
            predicted = nbytes / (alpha + nbytes / link) / 1e9
            rows.append(
                _row(
                    "deepep-normal",
                    f"{kind} EP{p['ep']} ({p['domain']})",
                    "bandwidth [GB/s]",
                    p[f"{kind}_GBps"],
                    predicted,
                    "—",
                    nk["source"],
                    unfitted=link / 1e9,
                )
            )
    ctx.advance()

    # 3. Single links: one efficiency per class, fitted to one link, predicts the others.
    table = system_table()
    eta_net = (
        table["networks"][cfg["net_fit"]]["measured_GBps"]
        / table["networks"][cfg["net_fit"]]["bandwidth_GBps"]
    )
    host = table["host_links"][cfg["host_fit"]]
    eta_host = host["measured_GBps"] / host["bandwidth_GBps"]
    for group, eta, fit, name_fit in (
        ("networks", eta_net, "eta_net", cfg["net_fit"]),
        ("host_links", eta_host, "eta_host", cfg["host_fit"]),
    ):
        for name, link in table[group].items():
            if not link.get("measured_GBps"):
                continue
            rows.append(
                _row(
                    f"link-{group}",
                    name,
                    "bandwidth [GB/s]",
                    link["measured_GBps"],
                    eta * link["bandwidth_GBps"],
                    f"{fit} (this point)" if name == name_fit else "—",
                    link["source"],
                    unfitted=link["bandwidth_GBps"],
                )
            )
    extra = pub["host_link_extra"]
    nominal = table["host_links"][extra["link"]]["bandwidth_GBps"]
    rows.append(
        _row(
            "link-host_links",
            f"{extra['link']} device→host",
            "bandwidth [GB/s]",
            extra["device_to_host_GBps"],
            eta_host * nominal,
            "—",
            extra["source"],
            unfitted=nominal,
        )
    )
    ctx.advance()

    # 4. DeepSeek's serving figures against the network-only bound of the model (not a fit, not an error).
    bounds = _serving_bounds(pub, b_net, alpha, cfg)
    ctx.rows("predictions", rows)
    ctx.rows("serving_bounds", bounds)
    ctx.json(
        "fits.json",
        {
            "alpha_net_s": alpha,
            "alpha_net_source": alpha_src,
            "eta_net": eta_net,
            "eta_net_source": f"{cfg['net_fit']} measured / nominal",
            "eta_host": eta_host,
            "eta_host_source": f"{cfg['host_fit']} measured / nominal",
            "b_net": b_net,
            "b_nvlink": b_nvl,
        },
    )
    _plots(ctx, rows, ll, alpha, b_net, b_nvl)
    ctx.advance()
    _section(ctx, rows, bounds, alpha, eta_net, eta_host, cfg, b_net, b_nvl)


def _row(group, point, quantity, published_value, predicted, fitted, source, unfitted=None) -> dict:
    err = predicted / published_value - 1
    row = {
        "group": group,
        "point": point,
        "quantity": quantity,
        "published": published_value,
        "predicted": predicted,
        "error": err,
        "fitted": fitted,
        "source": source,
    }
    if unfitted is not None:
        row["predicted_unfitted"] = unfitted
        row["error_unfitted"] = unfitted / published_value - 1
    return row


def _serving_bounds(pub, b_net, alpha, cfg) -> list[dict]:
    """Tokens/s per node that the network alone would allow, from the closed form's byte counts."""
    from moelab.costmodel.closed_form import fanout_uniform
    from moelab.costmodel.presets import load_model

    ds = pub["deepseek_inference"]
    model = load_model(ds["model"])
    nk, ll = pub["deepep_normal"], pub["deepep_low_latency"]
    g = nk["gpus_per_node"]
    per_pair = bytes_per_token(nk, "dispatch") + bytes_per_token(nk, "combine")
    node_bw = g * b_net
    out = []
    # Prefill (normal kernels): each token goes once to each remote node it needs; per node and
    # direction a token costs its dispatch plus the combine of someone else's token.
    remote = float(fanout_uniform(ds["prefill_nodes"], model.n_experts, model.top_k))
    per_token = model.n_moe_layers * remote * per_pair
    bound = node_bw / per_token
    computed = ds["prefill_input_tokens_per_s_per_node"] * (1 - ds["prefill_cache_hit_share"])
    out.append(
        {
            "phase": "prefill",
            "ep": ds["prefill_ep"],
            "remote_destinations_per_token": remote,
            "bytes_per_token": per_token,
            "network_bound_tokens_per_s_per_node": bound,
            "published_tokens_per_s_per_node": ds["prefill_input_tokens_per_s_per_node"],
            "published_computed_tokens_per_s_per_node": computed,
            "published_over_bound": computed / bound,
            "source": ds["source"],
        }
    )
    # Decode (low-latency kernels): one copy per (token, expert) pair leaves the node with share (R-G)/R.
    R = ds["decode_ep"]
    remote = ll["top_k"] * (R - g) / R
    per_token = model.n_moe_layers * remote * per_pair
    bound = node_bw / per_token
    pub_tps = ds["decode_output_tokens_per_s_per_node"]
    out.append(
        {
            "phase": "decode",
            "ep": R,
            "remote_destinations_per_token": remote,
            "bytes_per_token": per_token,
            "network_bound_tokens_per_s_per_node": bound,
            "published_tokens_per_s_per_node": pub_tps,
            "published_computed_tokens_per_s_per_node": pub_tps,
            "published_over_bound": pub_tps / bound,
            "source": ds["source"],
        }
    )
    return out


def _mape(rows) -> float:
    errs = [abs(r["error"]) for r in rows]
    return sum(errs) / len(errs) if errs else float("nan")


def _plots(ctx, rows, ll, alpha, b_net, b_nvl) -> None:
    import numpy as np

    from moelab.experiments import plots

    # Low-latency times: published points, the fitted model, the model without latency.
    fig, ax = plots.figure(width=7, height=4.6)
    ranks = np.array([p["ep"] for p in ll["points"]])
    # Whole nodes only: the split between NVLink and IB traffic changes with the node count.
    dense = ll["gpus_per_node"] * np.arange(1, ranks.max() // ll["gpus_per_node"] + 1)
    for kind, color in (("dispatch", "tab:blue"), ("combine", "tab:red")):
        nbytes = ll_bytes(ll, kind)
        ax.plot(
            ranks,
            [p[f"{kind}_us"] for p in ll["points"]],
            "o",
            color=color,
            label=f"{kind}: DeepEP published",
        )
        ax.plot(
            dense,
            [ll_time(nbytes, r, ll["gpus_per_node"], alpha, b_net, b_nvl) * 1e6 for r in dense],
            "-",
            color=color,
            label=f"{kind}: model, alpha_net = {alpha * 1e6:.0f} µs",
        )
        ax.plot(
            dense,
            [ll_time(nbytes, r, ll["gpus_per_node"], 0.0, b_net, b_nvl) * 1e6 for r in dense],
            ":",
            color=color,
            label=f"{kind}: model without latency",
        )
    fit_kind, fit_ep = LL_FIT
    fit_t = next(p for p in ll["points"] if p["ep"] == fit_ep)[f"{fit_kind}_us"]
    ax.plot([fit_ep], [fit_t], "s", mfc="none", mec="black", ms=11, label="the point alpha_net is fitted to")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("EP ranks R [GPUs]")
    ax.set_ylabel("time of one collective, 128 tokens per rank [µs]")
    ax.set_title("DeepEP low-latency kernels on H800 vs the model (alpha + bytes / B)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    ctx.plot(
        fig,
        "deepep_low_latency",
        "DeepEP low-latency dispatch/combine times: published points, the model "
        "with alpha_net fitted to one point, and without latency.",
    )

    # Every prediction's error, fitted points marked.
    shown = [r for r in rows if r["group"] != "deepep-ll-bytes"]
    fig, ax = plots.figure(width=8, height=0.22 * len(shown) + 1.5)
    y = np.arange(len(shown))[::-1]
    colors = {
        "deepep-ll": "tab:blue",
        "deepep-normal": "tab:green",
        "link-networks": "tab:orange",
        "link-host_links": "tab:purple",
    }
    for yi, r in zip(y, shown, strict=True):
        if r["fitted"] != "—":
            ax.text(
                0,
                yi,
                f" fitted here: {r['fitted'].split()[0]} (error 0 by construction)",
                va="center",
                fontsize=7,
                color=colors[r["group"]],
            )
            continue
        ax.barh(yi, 100 * r["error"], color=colors[r["group"]])
    ax.set_yticks(y, [f"{r['group']}: {r['point']}" for r in shown], fontsize=7)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("prediction error (predicted / published - 1) [%]")
    ax.set_ylabel("published measurement [source group: point]")
    ax.set_title("Model vs published measurements (error on the points not fitted)", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    ctx.plot(
        fig,
        "errors",
        "Prediction error of every validation point; the fitted points are marked (their error is 0 "
        "by construction).",
    )

    # Links: nominal, measured, predicted by the one efficiency of their class.
    link_rows = [r for r in rows if r["group"].startswith("link-")]
    fig, ax = plots.figure(width=8, height=4.6)
    x = np.arange(len(link_rows))
    ax.bar(
        x - 0.27,
        [r["predicted_unfitted"] for r in link_rows],
        0.27,
        label="nominal (datasheet)",
        color="0.75",
    )
    ax.bar(x, [r["published"] for r in link_rows], 0.27, label="measured (published)", color="tab:blue")
    ax.bar(
        x + 0.27,
        [r["predicted"] for r in link_rows],
        0.27,
        label="eta × nominal (one fit per class)",
        color="tab:orange",
    )
    ax.set_xticks(x, [r["point"] for r in link_rows], rotation=35, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("link [preset]")
    ax.set_ylabel("bandwidth per direction [GB/s]")
    ax.set_title("Links: nominal vs measured vs one fitted efficiency per class", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ctx.plot(
        fig, "links", "Link bandwidths: nominal, measured, and predicted with one efficiency per link class."
    )


def _section(ctx, rows, bounds, alpha, eta_net, eta_host, cfg, b_net, b_nvl) -> None:
    from moelab.show import fmt

    def pct(x):
        return f"{100 * x:+.1f}%"

    groups = [
        ("deepep-ll", "DeepEP low-latency times"),
        ("deepep-normal", "DeepEP normal-kernel bandwidths"),
        ("link-networks", "network links"),
        ("link-host_links", "host links"),
    ]
    summary_lines = []
    for g, label in groups:
        test = [r for r in rows if r["group"] == g and r["fitted"] == "—"]
        unf = [abs(r["error_unfitted"]) for r in test if "error_unfitted" in r]
        summary_lines.append(
            f"| {label} | {len(test)} | {100 * _mape(test):.1f}% | "
            f"{100 * max(abs(r['error']) for r in test):.1f}% | "
            f"{100 * sum(unf) / len(unf):.1f}% |"
        )
        ctx.summary[f"mape_{g}"] = _mape(test)
    byte_rows = [r for r in rows if r["group"] == "deepep-ll-bytes"]
    table = "| group | point | quantity | published | predicted | error | without fit | fitted |\n"
    table += "|---|---|---|---|---|---|---|---|\n"
    for r in rows:
        if r["group"] == "deepep-ll-bytes":
            continue
        table += (
            f"| {r['group']} | {r['point']} | {r['quantity']} | {fmt(r['published'])} "
            f"| {fmt(r['predicted'])} "
            f"| {pct(r['error'])} | {pct(r['error_unfitted']) if 'error_unfitted' in r else '—'} "
            f"| {r['fitted']} |\n"
        )
    bound_lines = "\n".join(
        f"| {b['phase']} (EP{b['ep']}) | {fmt(b['remote_destinations_per_token'])} | "
        f"{fmt(b['bytes_per_token'] / 1e6)} MB | {fmt(b['network_bound_tokens_per_s_per_node'])} | "
        f"{fmt(b['published_computed_tokens_per_s_per_node'])} | {b['published_over_bound']:.2f} |"
        for b in bounds
    )
    bound_head = (
        "| phase | remote destinations per token | bytes per token (all MoE layers, per direction) "
        "| bound [tokens/s/node] | published, computed tokens [tokens/s/node] | published / bound |"
    )
    gen5 = next(r for r in rows if r["point"] == "pcie-gen5-x16")
    nk = published()["deepep_normal"]
    cache_hits = published()["deepseek_inference"]["prefill_cache_hit_share"]
    sources = sorted({r["source"] for r in rows} | {b["source"] for b in bounds})
    ctx.summary.update({"alpha_net_s": alpha, "eta_net": eta_net, "eta_host": eta_host})
    ctx.section(f"""
Facts: `costmodel/presets/published.json` (DeepEP, DeepSeek serving) and the measured link figures of
`costmodel/presets/systems.json`, each with its source (listed below). Model of one collective:
time = alpha_net + bytes / B with B_net = {fmt(b_net / 1e9)} GB/s (IB NDR nominal) and
B_NVLink = {fmt(b_nvl / 1e9)} GB/s (H800, DeepSeek's measured figure); bytes counted as the closed form
counts them (DeepEP's fp8 dispatch with one {nk["fp8_scale_bytes"]}-byte scale per {nk["fp8_scale_block"]}
values: {fmt(bytes_per_token(nk, "dispatch"))} B per token of {nk["hidden"]:,} values; bf16 combine:
{fmt(bytes_per_token(nk, "combine"))} B).

**Fitted (three parameters, one point each):** alpha_net = {fmt(alpha * 1e6)} µs from DeepEP's low-latency
{cfg["ll_fit"][0]} at EP{cfg["ll_fit"][1]}; eta_net = {eta_net:.3f} from {cfg["net_fit"]}; eta_host =
{eta_host:.3f} from {cfg["host_fit"]}. Everything else is predicted.

| predicted group | points not fitted | mean abs. error | max abs. error | mean abs. error without fit |
|---|---|---|---|---|
{chr(10).join(summary_lines)}

The bytes the model counts agree with DeepEP's own (its GB/s × its µs) to
{100 * max(abs(r["error"]) for r in byte_rows):.1f}% at worst over {len(byte_rows)} points (the published
figures have two or three significant digits). DeepEP's internode normal kernels report up to
{fmt(max(r["published"] for r in rows if r["group"] == "deepep-normal" and "rdma" in r["point"]))} GB/s,
above the {fmt(b_net / 1e9)} GB/s line rate: no bandwidth-only model with B ≤ line rate reaches it. Host
links fall furthest below their datasheet figures: the seed's B_pcie = {fmt(gen5["predicted_unfitted"])} GB/s
is optimistic for host→device copies on PCIe Gen5 (measured {fmt(gen5["published"])} GB/s), which raises
gamma by ×{fmt(gen5["predicted_unfitted"] / gen5["published"])}.

**DeepSeek's serving figures against the network-only bound** (not a prediction: the bound is what the
network alone would allow if nothing else took time; a published figure must lie below it):

{bound_head}
|---|---|---|---|---|---|
{bound_lines}

Prefill counts only the tokens not served from the KV cache (DeepSeek: {100 * cache_hits:.1f}% cache
hits). Both published figures lie below the bound; the network would be busy
{100 * bounds[0]["published_over_bound"]:.0f}% (prefill) and {100 * bounds[1]["published_over_bound"]:.0f}%
(decode) of the time, which the two-micro-batch overlap can hide.

{table}
Sources:
{chr(10).join(f"- {s}" for s in sources)}
""")
