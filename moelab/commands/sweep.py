"""`moelab sweep`: gamma over a grid of any parameters, inside one jit, as a tidy CSV.

Every axis flag takes a comma list (`16,32,64`) or a range `START:STOP:log|lin:COUNT`
(`1:1e6:log:50`); --model, --system and the dtype flags take comma lists of names. The
grid is the Cartesian product, evaluated by `moelab.costmodel.sweep` (the closed form in
jax.numpy, sharded over the available devices). One CSV row per configuration: the axis
values, then gamma, n_ue, fanout, the two overheads (s) and the decision.
"""

from __future__ import annotations

HELP = "gamma over a grid (tokens, links, latencies, dtypes, fan-out, models, systems) -> CSV"

# flag -> (CSV column, formula parameter, scale from flag units to SI)
NUMBER_AXES = {
    "tokens": ("tokens", "tokens", 1.0),
    "b_pcie": ("b_pcie_GBps", "b_pcie", 1e9),
    "b_net": ("b_net_GBps", "b_net", 1e9),
    "alpha_pcie_us": ("alpha_pcie_us", "alpha_pcie", 1e-6),
    "alpha_net_us": ("alpha_net_us", "alpha_net", 1e-6),
    "fanout": ("fanout", "fanout", 1.0),
    "ep_ranks": ("ep_ranks", "ep_ranks", 1.0),
    "resident_fraction": ("resident_fraction", "resident_fraction", 1.0),
}
# flag -> formula parameters the dtype sets (the act dtype: both directions)
DTYPE_AXES = {
    "act_dtype": ("f_dispatch", "f_combine"),
    "expert_dtype": ("f_e",),
    "dispatch_dtype": ("f_dispatch",),
    "combine_dtype": ("f_combine",),
}
OUTPUTS = ("gamma", "n_ue", "fanout", "t_p_overhead", "t_ep_overhead")


def add_arguments(p):
    p.add_argument("--model", default="deepseek-r1", help="preset(s) or config.json, comma list")
    p.add_argument("--system", default="h100-sxm", help="system preset(s), comma list")
    p.add_argument("--latencies", action="store_true", help="take latencies from the link presets")
    p.add_argument("--routing", default="worst", help="worst, uniform or both: worst,uniform")
    g = p.add_argument_group("axes: a comma list or START:STOP:log|lin:COUNT")
    g.add_argument("--tokens", default="4096", help="tokens per pass N_t [4096]")
    g.add_argument("--b-pcie", help="host-link bandwidth, GB/s [system]")
    g.add_argument("--b-net", help="network bandwidth, GB/s [system]")
    g.add_argument("--alpha-pcie-us", help="latency per expert copy, µs [system]")
    g.add_argument("--alpha-net-us", help="latency per collective, µs [system]")
    g.add_argument("--fanout", help="remote destinations per token [1]")
    g.add_argument("--ep-ranks", help="derive the fan-out from R ranks")
    g.add_argument("--resident-fraction", help="share of used experts already resident [0]")
    for flag in DTYPE_AXES:
        g.add_argument("--" + flag.replace("_", "-"), help="dtype name(s) [model]")
    p.add_argument("--out", help="CSV file to write (atomically)")
    p.add_argument("--plot", help="PNG of gamma against the first swept number")
    p.add_argument("--json", action="store_true",
                   help="print a summary as JSON (and the rows, up to 10,000)")


def parse_values(flag: str, text: str) -> list[float]:
    """`a,b,c` or `start:stop:log|lin:count` -> floats; SpecError names the flag."""
    import numpy as np

    from moelab.costmodel.specs import SpecError

    name = "--" + flag.replace("_", "-")
    try:
        if ":" in text:
            start, stop, kind, count = text.split(":")
            start, stop, count = float(start), float(stop), int(count)
            if kind not in ("log", "lin") or count < 1:
                raise ValueError
            if kind == "log" and (start <= 0 or stop <= 0):
                raise SpecError(f"{name}: a log range needs positive ends, got {text!r}")
            space = np.geomspace if kind == "log" else np.linspace
            values = space(start, stop, count).tolist()
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except SpecError:
        raise
    except ValueError:
        raise SpecError(f"{name}: expected a comma list or START:STOP:log|lin:COUNT, "
                        f"got {text!r}") from None
    if not values or not all(np.isfinite(values)) or min(values) < 0:
        raise SpecError(f"{name}: values must be finite and >= 0, got {text!r}")
    if flag in ("b_pcie", "b_net") and min(values) <= 0:
        raise SpecError(f"{name}: bandwidths must be > 0")
    if flag == "resident_fraction" and max(values) > 1:
        raise SpecError(f"{name}: must lie in [0, 1]")
    return values


def build_grid(args):
    """(base parameters, axes) from the flags: model, system, routing, then the overrides."""
    from moelab.costmodel import sweep as sw
    from moelab.costmodel.presets import load_model, load_system
    from moelab.costmodel.specs import SpecError, Workload

    names = lambda text: [t.strip() for t in text.split(",") if t.strip()]
    models = [load_model(n) for n in names(args.model)]
    systems = [load_system(n, latencies=args.latencies) for n in names(args.system)]
    if not models or not systems:
        raise SpecError("--model/--system: give at least one name")
    routings = names(args.routing)
    for r in routings:
        if r not in ("worst", "uniform"):
            raise SpecError(f"--routing: the sweep takes worst and uniform, got {r!r}")
    if args.fanout and args.ep_ranks:
        raise SpecError("--fanout: give either a fan-out or EP ranks, not both")

    base = sw.params_of(models[0], systems[0], Workload(tokens=1))
    axes = [sw.model_axis(models), sw.system_axis(systems),
            sw.Axis("routing", tuple(routings),
                    {"uniform": [1.0 if r == "uniform" else 0.0 for r in routings]})]
    for flag, params in DTYPE_AXES.items():
        text = getattr(args, flag)
        if text:
            axes.append(sw.dtype_axis(flag, params, names(text)))
    notes = []
    for flag, (column, param, scale) in NUMBER_AXES.items():
        text = getattr(args, flag)
        if text:
            values = parse_values(flag, text)
            if flag == "tokens":
                values, note = whole_tokens(values)
                notes += [note] if note else []
            axes.append(sw.number_axis(column, param, values, scale))
    return base, axes, notes


def whole_tokens(values: list[float]) -> tuple[list[float], str | None]:
    """Token counts are whole: round, and merge values that round together (a log range's
    small end does). Returns the values and a note saying how many were merged, if any."""
    whole = sorted({float(round(v)) for v in values})
    if len(whole) == len(values):
        return whole, None
    return whole, (f"--tokens: {len(values)} values round to {len(whole)} distinct whole token "
                   f"counts; duplicates merged")


def compute(args) -> tuple[list[str], list[tuple], dict]:
    """(columns, rows, summary) of the sweep."""
    import time

    import jax
    import numpy as np

    from moelab.costmodel import sweep as sw

    base, axes, notes = build_grid(args)
    n = sw.grid_size(axes)
    t0 = time.perf_counter()
    res = sw.evaluate_grid(base, axes, OUTPUTS)
    seconds = time.perf_counter() - t0
    gamma = res["gamma"]
    columns = [a.name for a in axes] + [*OUTPUTS[:3], "t_p_overhead_s", "t_ep_overhead_s",
                                        "decision"]
    decision = np.where(gamma < 1, "offload", "ep")
    # float32 results: 7 significant digits are what they hold
    outs = [[float(f"{v:.7g}") for v in res[o].tolist()] for o in OUTPUTS]
    rows = [(*labels, *vals, dec) for labels, *vals, dec in
            zip(sw.grid_labels(axes), *outs, decision.tolist(), strict=True)]
    summary = {
        "configurations": n, "seconds": seconds, "devices": len(jax.devices()),
        "device": jax.devices()[0].device_kind,
        "axes": {a.name: len(a) for a in axes},
        "gamma_min": float(gamma.min()), "gamma_max": float(gamma.max()),
        "offload_win_fraction": float(np.mean(gamma < 1)),
        "notes": notes,
    }
    return columns, rows, summary


def to_csv(columns, rows) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows(rows)
    return buf.getvalue()


def plot(path: str, columns, rows, axes_sizes: dict) -> None:
    """gamma against the first swept number (log-log), one line per other combination."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moelab.costmodel.specs import SpecError
    from moelab.io import write_atomic

    axis_names = list(axes_sizes)
    numeric = [a for a in axis_names if a in {c for c, _, _ in NUMBER_AXES.values()}]
    swept = [a for a in numeric if axes_sizes[a] > 1]
    if not swept:
        raise SpecError("--plot: sweep at least one number over more than one value")
    x_name = swept[0]
    xi, gi = columns.index(x_name), columns.index("gamma")
    others = [columns.index(a) for a in axis_names if a != x_name and axes_sizes[a] > 1]
    lines: dict = {}
    for r in rows:
        lines.setdefault(tuple(r[i] for i in others), []).append((r[xi], r[gi]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, pts in list(lines.items())[:20]:
        pts.sort()
        label = ", ".join(f"{columns[i]}={v}" for i, v in zip(others, key, strict=True))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label or None)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xscale("log" if min(r[xi] for r in rows) > 0 else "linear")
    ax.set_yscale("log")
    fixed = [f"{a}={rows[0][columns.index(a)]}" for a in axis_names if axes_sizes[a] == 1]
    ax.set_title(", ".join(fixed), fontsize=9)
    ax.set_xlabel(x_name)
    ax.set_ylabel("gamma  (< 1: offload wins, > 1: EP wins)")
    if len(lines) > 1:
        ax.legend(fontsize=7, title=f"{len(lines)} lines" if len(lines) > 20 else None)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, buf.getvalue(), make_parents=False)


def run(args) -> int:
    import json
    import sys

    from moelab.io import write_atomic

    columns, rows, summary = compute(args)
    for note in summary["notes"]:
        print(f"moelab sweep: note: {note}", file=sys.stderr)
    if args.out:
        write_atomic(args.out, to_csv(columns, rows), make_parents=False)
        summary["out"] = args.out
    if args.plot:
        plot(args.plot, columns, rows, summary["axes"])
        summary["plot"] = args.plot
    if args.json:
        if len(rows) <= 10_000:
            summary["rows"] = [dict(zip(columns, r, strict=True)) for r in rows]
        print(json.dumps(summary, indent=1))
    elif not args.out:
        print(to_csv(columns, rows), end="")
    else:
        print(f"{summary['configurations']:,} configurations in {summary['seconds']:.3f} s "
              f"on {summary['devices']} {summary['device']} device(s) -> {args.out}; gamma in "
              f"[{summary['gamma_min']:.4g}, {summary['gamma_max']:.4g}]")
    return 0
