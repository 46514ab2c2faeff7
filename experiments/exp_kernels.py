"""kernels: dispatch, combine and prefetch measured on a GPU, and the calibrated system's gamma.

Reads what `ci/gpu-check` wrote to experiments/results/<device>/ (bench_dispatch.json,
bench_combine.json, bench_prefetch.json, calibrate.json, offload.json): the kernels against
the copy roof (from do_bench and from CUDA-graph times), the routing metadata at 4K, 32K
and 256K tokens, and the executed offload's copy time against the model. Nothing is measured here; where
no GPU run exists the experiment says "not measured on a GPU yet".
"""

from __future__ import annotations

from pathlib import Path

NAME = "kernels"
SUMMARY = (
    "dispatch, combine, prefetch results from GPU runs (experiments/results/DEVICE/) and calibrated gamma"
)
VERSION = "2"
DEPENDS = ("moelab.costmodel.closed_form", "moelab.costmodel.presets")

RESULTS = Path(__file__).parent / "results"
FILES = {
    "dispatch": ("bench_dispatch.json", "dispatch.json"),
    "combine": ("bench_combine.json", "combine.json"),
    "prefetch": ("bench_prefetch.json", "prefetch.json"),
    "calibrate": ("calibrate.json",),
    "offload": ("offload.json",),
}


def devices() -> list[Path]:
    """Result folders of GPU runs (a CPU stand-in or dry run is not a GPU measurement)."""
    if not RESULTS.is_dir():
        return []
    return sorted(p for p in RESULTS.iterdir() if p.is_dir() and any(p.glob("*.json")))


def INPUTS(cfg):
    return sorted(str(f) for d in devices() for f in d.glob("*.json"))


def config(quick: bool) -> dict:
    # The results themselves enter the cache key through INPUTS (their contents).
    return {"model": "deepseek-r1", "tokens": 4096, "preset": "h100-sxm"}


def STEPS(cfg) -> int:
    return max(len(devices()), 1)


def _load(folder: Path, what: str):
    import json

    for name in FILES[what]:
        p = folder / name
        if p.is_file():
            return json.loads(p.read_text())
    return None


def _on_gpu(rows) -> bool:
    return any(isinstance(r, dict) and r.get("device") not in (None, "cpu") for r in rows or [])


def run(cfg: dict, ctx) -> None:
    from moelab.show import fmt

    found = devices()
    parts, all_rows = [], []
    for folder in found:
        dev = folder.name
        for op in ("dispatch", "combine"):
            rows = _load(folder, op)
            if not _on_gpu(rows):
                continue
            timed = [r for r in rows if r.get("time_s") and r.get("ok", True)]
            for r in timed:
                all_rows.append(
                    {
                        "device": dev,
                        "op": op,
                        **{
                            k: r.get(k)
                            for k in (
                                "shape",
                                "tokens",
                                "d",
                                "k",
                                "E",
                                "time_s",
                                "bandwidth_Bps",
                                "copy_bandwidth_Bps",
                                "ratio_to_copy",
                                "ratio_to_copy_graph",
                                "speedup_vs_torch",
                                "metadata_time_s",
                                "torch_time_s",
                            )
                        },
                    }
                )
            if timed:
                _plot_op(ctx, dev, op, timed)
                parts.append(_op_table(dev, op, timed, fmt))
            scaling = [r for r in rows if r.get("op") == "route" and r.get("metadata_time_s")]
            if scaling:
                parts.append(_metadata_table(dev, scaling, fmt))
        pre = _load(folder, "prefetch")
        if _on_gpu(pre):
            paths = [r for r in pre if r.get("bandwidth_Bps") and r.get("expert_bytes")]
            if paths:
                _plot_prefetch(ctx, dev, paths)
                parts.append(_prefetch_table(dev, paths, fmt))
        off = _load(folder, "offload")
        if isinstance(off, dict) and off.get("copy_time_s"):
            parts.append(
                f"**offload executed on {dev}:** {off['model']} ({off['layers']} layers x "
                f"{off['tokens']} tokens): copied {fmt(off['bytes_copied_measured'])} B, model "
                f"{fmt(off['bytes_copied_model'])} B; copy time {fmt(off['copy_time_s'] * 1e3)} ms "
                f"against {fmt(off['copy_time_model_s'] * 1e3)} ms at B_pcie "
                f"{fmt(off['b_pcie'] / 1e9)} GB/s (x{fmt(off['copy_time_ratio'])}); max error "
                f"{off['max_abs_err']:.1e}."
            )
        cal = _load(folder, "calibrate")
        # A GPU's calibration: an old SI file (b_pcie) or one in the presets' schema (host_link).
        if isinstance(cal, dict) and cal.get("name") != "cpu-standin" and (cal.get("b_pcie")
                                                                           or cal.get("host_link")):
            parts.append(_calibrated_gamma(ctx, dev, folder, cal, cfg, fmt))
        ctx.advance()
    ctx.rows("kernel_rows", all_rows)
    if not parts:
        ctx.note(
            "not measured on a GPU yet: no GPU results under experiments/results/<device>/ "
            "(run ci/gpu-check on a GPU machine)"
        )
        ctx.section(
            "Not measured on a GPU yet: `experiments/results/<device>/` holds no GPU results "
            f"({len(found)} result folder(s) found). `ci/gpu-check` on a GPU machine writes them."
        )
        return
    ctx.summary.update({"devices": [f.name for f in found], "rows": len(all_rows)})
    ctx.section("\n\n".join(parts))


def _op_table(dev, op, rows, fmt) -> str:
    t = (
        f"**{op} on {dev}**\n\n"
        "| shape | time | GB/s | device copy GB/s | ratio to copy | ratio (graphs) | × torch "
        "| metadata |\n|---|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        t += (
            f"| {r['shape']} | {fmt(r['time_s'] * 1e6)} µs | {fmt(r['bandwidth_Bps'] / 1e9)} "
            f"| {fmt((r.get('copy_bandwidth_Bps') or 0) / 1e9)} | {fmt(r.get('ratio_to_copy'))} "
            f"| {fmt(r.get('ratio_to_copy_graph'))} | {fmt(r.get('speedup_vs_torch'))} "
            f"| {fmt(r['metadata_time_s'] * 1e6) + ' µs' if r.get('metadata_time_s') else '—'} |\n"
        )
    return t


def _metadata_table(dev, rows, fmt) -> str:
    t = (f"**routing metadata on {dev}** (top-8 of 256): linear in the tokens when the time per "
         "token stays at the smallest's\n\n| tokens | µs | CUDA graph µs | time per token vs "
         "smallest |\n|---|---|---|---|\n")  # fmt: skip
    for r in rows:
        graph = r.get("metadata_graph_time_s")
        per_token = fmt(r.get("time_per_token_vs_smallest"))
        t += (f"| {r['tokens']:,} | {fmt(r['metadata_time_s'] * 1e6)} "
              f"| {fmt(graph * 1e6) if graph else '—'} | {per_token} |\n")  # fmt: skip
    return t


def _prefetch_table(dev, rows, fmt) -> str:
    t = f"**prefetch on {dev}**\n\n| model | path | expert size | GB/s | ratio to memcpy |\n"
    t += "|---|---|---|---|---|\n"
    for r in rows:
        t += (
            f"| {r.get('model', '')} | {r['path']} | {fmt(r['expert_bytes'] / 1e6)} MB "
            f"| {fmt(r['bandwidth_Bps'] / 1e9)} | {fmt(r.get('ratio_to_memcpy'))} |\n"
        )
    return t


def _plot_op(ctx, dev, op, rows) -> None:
    import numpy as np

    from moelab.experiments import plots

    fig, ax = plots.figure(width=8, height=4.6)
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["bandwidth_Bps"] / 1e9 for r in rows], 0.4, label=f"{op} kernel", color="tab:blue")
    ax.bar(
        x + 0.2,
        [(r.get("copy_bandwidth_Bps") or 0) / 1e9 for r in rows],
        0.4,
        label="device copy of the same bytes (same run)",
        color="0.6",
    )
    ax.set_xticks(x, [r["shape"] for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_xlabel("shape [preset, tokens]")
    ax.set_ylabel("achieved bandwidth [GB/s]")
    ax.set_title(f"{op} on {dev}: kernel vs device copy", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    ctx.plot(
        fig, f"{op}_{dev}", f"{op} kernel bandwidth on {dev} against a device copy measured in the same run."
    )


def _plot_prefetch(ctx, dev, rows) -> None:
    from moelab.experiments import plots

    fig, ax = plots.figure(width=7, height=4.4)
    for path in dict.fromkeys(r["path"] for r in rows):
        pts = sorted((r for r in rows if r["path"] == path), key=lambda r: r["expert_bytes"])
        ax.plot(
            [r["expert_bytes"] / 1e6 for r in pts], [r["bandwidth_Bps"] / 1e9 for r in pts], "o-", label=path
        )
    ax.set_xscale("log")
    ax.set_xlabel("expert size [MB]")
    ax.set_ylabel("host → device bandwidth [GB/s]")
    ax.set_title(f"Expert prefetch paths on {dev}", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    ctx.plot(
        fig, f"prefetch_{dev}", f"Host-to-device bandwidth of each prefetch path on {dev} by expert size."
    )


def _calibrated_gamma(ctx, dev, folder, cal, cfg, fmt) -> str:
    """gamma for the seed's example with the measured host link in place of the datasheet's."""
    from moelab.costmodel import closed_form as cf
    from moelab.costmodel.presets import load_model, load_system
    from moelab.costmodel.specs import Workload

    model = load_model(cfg["model"])
    measured = load_system(str(folder / "calibrate.json"), latencies=True)  # the measured alpha_pcie
    nominal = load_system(cfg["preset"])
    work = Workload(tokens=cfg["tokens"])
    g_meas, g_nom = cf.evaluate(model, measured, work), cf.evaluate(model, nominal, work)
    ctx.json(
        f"calibrated_gamma_{dev}.json",
        {
            "gamma_calibrated": g_meas.gamma,
            "gamma_nominal": g_nom.gamma,
            "b_pcie": measured.b_pcie,
            "alpha_pcie": measured.alpha_pcie,
            "tipping_calibrated": g_meas.tipping_tokens,
        },
    )
    return (
        f"**calibrated system on {dev}:** host→device {fmt(measured.b_pcie / 1e9)} GB/s, "
        f"{fmt(measured.alpha_pcie * 1e6)} µs per copy, device copy {fmt(measured.hbm_bw / 1e9)} GB/s. "
        f"{model.name} at N_t = {cfg['tokens']:,}: gamma {fmt(g_meas.gamma)} with the measured host link "
        f"against {fmt(g_nom.gamma)} with {nominal.name}'s datasheet figures; N_t* = "
        f"{fmt(g_meas.tipping_tokens)}."
    )
