"""`moelab sweep`: gamma over a grid of any parameters, inside one jit, as a tidy CSV.

Every axis flag takes a comma list (`16,32,64`) or a range `START:STOP:log|lin:COUNT`
(`1:1e6:log:50`); --model, --system, --routing, --dispatch-mode, --rank-load and the dtype
flags take comma lists of names. The grid is the Cartesian product, evaluated by
`moelab.costmodel.sweep`: the model `moelab gamma` computes (with --ep-ranks: two tiers,
the slower leg deciding, the busiest rank), in jax.numpy, sharded over the available
devices. One CSV row per configuration: the axis values, then gamma, n_ue, the fan-outs,
the imbalance, the overheads and legs (s), the deciding leg and the decision.
"""

from __future__ import annotations

HELP = ("gamma over a grid (tokens, links, latencies, dtypes, EP ranks and tiers, routings, "
        "models, systems) -> CSV")

# flag -> (CSV column, formula parameter, scale from flag units to SI)
NUMBER_AXES = {
    "tokens": ("tokens", "tokens", 1.0),
    "batch": ("batch", "tokens", 1.0),  # --decode: tokens per step
    "b_pcie": ("b_pcie_GBps", "b_pcie", 1e9),
    "b_net": ("b_net_GBps", "b_net", 1e9),
    "b_nvlink": ("b_nvlink_GBps", "b_nvlink", 1e9),
    "alpha_pcie_us": ("alpha_pcie_us", "alpha_pcie", 1e-6),
    "alpha_net_us": ("alpha_net_us", "alpha_net", 1e-6),
    "fanout": ("fanout", "fanout", 1.0),
    "ep_ranks": ("ep_ranks", "ep_ranks", 1.0),
    "gpus_per_node": ("gpus_per_node", "gpus_per_node", 1.0),
    "resident_fraction": ("resident_fraction", "resident_fraction", 1.0),
}
WHOLE = ("tokens", "batch", "ep_ranks", "gpus_per_node")  # counts: rounded, duplicates merged
# flag -> formula parameters the dtype sets (the act dtype: both directions)
DTYPE_AXES = {
    "act_dtype": ("f_dispatch", "f_combine"),
    "expert_dtype": ("f_e",),
    "dispatch_dtype": ("f_dispatch",),
    "combine_dtype": ("f_combine",),
}
# flag -> (formula parameter, codes of its names; None: sweep.DISPATCH_CODES)
LABEL_AXES = {
    "dispatch_mode": ("dispatch_mode", None),
    "rank_load": ("busiest", {"busiest": 1.0, "mean": 0.0}),
}
OUTPUTS = ("gamma", "n_ue", "fanout", "fanout_nodes", "imbalance", "t_p_overhead",
           "t_ep_overhead", "t_ep_net", "t_ep_nvlink")
LEGS = {0: "", 1: "network", 2: "nvlink"}  # formula's ep_leg
# Configurations of one sweep: each is a CSV row held in memory (~100 B) and a jit lane;
# 2^22 rows are ~0.5 GB of text.
MAX_CONFIGURATIONS = 2**22


def add_arguments(p):
    p.add_argument("--model", default="deepseek-r1", help="preset(s) or config.json, comma list")
    p.add_argument("--system", default="h100-sxm", help="system preset(s), comma list")
    p.add_argument("--latencies", action="store_true", help="take latencies from the link presets")
    p.add_argument("--routing", default="worst",
                   help="comma list of worst, uniform, trace:FILE (a recorded routing: N_ue, "
                        "fan-outs and the busiest rank measured on its windows of N_t tokens, "
                        "as moelab gamma --routing trace:) [worst]")
    p.add_argument("--decode", action="store_true",
                   help="decode steps of --batch tokens (a trace's windows are the batch)")
    p.add_argument("--steps", type=int, default=1, metavar="N_OS",
                   help="with --decode: steps, scaling both overheads [1]")
    g = p.add_argument_group("axes: a comma list or START:STOP:log|lin:COUNT")
    g.add_argument("--tokens", help="tokens per pass N_t [4096]")
    g.add_argument("--batch", help="with --decode: tokens per step B [1]")
    g.add_argument("--b-pcie", help="host-link bandwidth, GB/s [system]")
    g.add_argument("--b-net", help="network bandwidth per GPU between nodes, GB/s [system]")
    g.add_argument("--b-nvlink", help="NVLink bandwidth per GPU inside a node, GB/s [system]")
    g.add_argument("--alpha-pcie-us", help="latency per expert copy, µs [system]")
    g.add_argument("--alpha-net-us", help="latency per collective, µs [system]")
    g.add_argument("--fanout", help="remote destinations per token, one tier at B_net [1]")
    g.add_argument("--ep-ranks", help="EP ranks R: two tiers and the busiest rank [none]")
    g.add_argument("--gpus-per-node", help="with --ep-ranks: GPUs per node G [system]")
    g.add_argument("--dispatch-mode",
                   help="with --ep-ranks, names: per-node (one network copy per remote node, "
                        "DeepEP's normal kernels), per-rank, flat (every remote rank at B_net, "
                        "the one-tier model) [per-node]")
    g.add_argument("--rank-load", help="with --ep-ranks, names: busiest (the busiest rank sets "
                                       "the pace, as moelab gamma) or mean [busiest]")
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
            if count > MAX_CONFIGURATIONS:
                raise SpecError(f"{name}: {count:,} points > {MAX_CONFIGURATIONS:,}, the most "
                                "configurations a sweep evaluates")
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
    if flag in ("gpus_per_node", "batch") and min(values) < 1:
        raise SpecError(f"{name}: must be >= 1, got {text!r}")
    if flag in WHOLE:  # counts: the limits moelab gamma applies (costmodel/specs.py)
        from moelab.costmodel.specs import GPUS_WHY, MAX_GPUS, MAX_TOKENS, TOKENS_WHY

        limit, why = (MAX_TOKENS, TOKENS_WHY) if flag in ("tokens", "batch") else (MAX_GPUS, GPUS_WHY)
        if max(values) > limit:
            raise SpecError(f"{name}: {max(values):g} > {limit:,}{why}")
    return values


def build_grid(args):
    """(base parameters, axes, notes, traces) from the flags: model, system, routing, the
    named choices, then the overrides."""
    from moelab.costmodel import sweep as sw
    from moelab.costmodel.presets import load_model, load_system
    from moelab.costmodel.specs import SpecError, Workload

    names = lambda text: [t.strip() for t in text.split(",") if t.strip()]
    models = [load_model(n) for n in names(args.model)]
    systems = [load_system(n, latencies=args.latencies) for n in names(args.system)]
    if not models or not systems:
        raise SpecError("--model/--system: give at least one name")
    if args.fanout and args.ep_ranks:
        raise SpecError("--fanout: give either a fan-out or EP ranks, not both")
    if args.decode and args.tokens:
        raise SpecError("--tokens: give --tokens for prefill or --decode --batch B, not both")
    if args.batch and not args.decode:
        raise SpecError("--batch: a decode batch goes with --decode (prefill: --tokens)")
    if args.steps < 1 or (args.steps != 1 and not args.decode):
        raise SpecError(f"--steps: decode steps, >= 1 and with --decode, got {args.steps}")
    Workload(decode=True, steps=args.steps)  # its limit, as moelab gamma
    routings, traces = routing_axis(names(args.routing), models)
    if traces and "per-rank" in names(args.dispatch_mode or ""):
        raise SpecError("--dispatch-mode: per-rank needs the inter-node rank count per token, "
                        "which a trace's window statistics do not give (as in moelab gamma "
                        "--routing trace:): per-node or flat")

    work = Workload(decode=True, batch=1, steps=args.steps) if args.decode else Workload(tokens=1)
    base = sw.params_of(models[0], systems[0], work)
    axes = [sw.model_axis(models), sw.system_axis(systems), routings]
    for flag, (param, codes) in LABEL_AXES.items():
        text = getattr(args, flag)
        if text:
            codes = codes or sw.DISPATCH_CODES
            if not names(text) or any(v not in codes for v in names(text)):
                raise SpecError(f"--{flag.replace('_', '-')}: expected a comma list of "
                                f"{', '.join(codes)}, got {text!r}")
            axes.append(sw.label_axis(flag, param, codes, names(text)))
    for flag, params in DTYPE_AXES.items():
        text = getattr(args, flag)
        if text:
            axes.append(sw.dtype_axis(flag, params, names(text)))
    notes = []
    defaults = {"batch": "1"} if args.decode else {"tokens": "4096"}
    for flag, (column, param, scale) in NUMBER_AXES.items():
        text = getattr(args, flag) or defaults.get(flag)
        if text:
            values = parse_values(flag, text)
            if flag in WHOLE:
                values, note = whole(flag, values)
                notes += [note] if note else []
            axes.append(sw.number_axis(column, param, values, scale))
    n = sw.grid_size(axes)
    if n > MAX_CONFIGURATIONS:
        raise SpecError(f"sweep: the axes make {n:,} configurations > {MAX_CONFIGURATIONS:,}, the "
                        "most a sweep evaluates (one CSV row each)")
    return base, axes, notes, traces


def routing_axis(routings: list[str], models) -> tuple:
    """(the routing axis, the traces as sweep.host_terms takes them): worst, uniform or
    trace:FILE, each trace checked against every model (E, k and layers, as moelab gamma
    checks it)."""
    import numpy as np

    from moelab.costmodel import sweep as sw
    from moelab.costmodel.specs import SpecError, parse_routing

    if not routings:
        raise SpecError("--routing: give at least one routing")
    traces, uniform, index = [], [], []
    for r in routings:
        if r in ("worst", "uniform"):
            uniform.append(1.0 if r == "uniform" else 0.0)
            index.append(0.0)
            continue
        if not r.startswith("trace:"):
            raise SpecError(f"--routing: the sweep takes worst, uniform and trace:FILE, got {r!r}")
        from functools import partial

        from moelab.costmodel.trace import check_model, load, window_means

        t = load(parse_routing(r).path)  # a missing or malformed file: SpecError naming it
        for m in models:
            check_model(t, m.n_experts, m.top_k, m.n_moe_layers)
        traces.append(partial(window_means, t))
        uniform.append(0.0)
        index.append(float(len(traces)))  # the formula's `trace`: 1-based, 0 is none
    return sw.Axis("routing", tuple(routings), {"uniform": np.array(uniform),
                                                "trace": np.array(index)}), traces


def whole(flag: str, values: list[float]) -> tuple[list[float], str | None]:
    """Counts are whole: round, and merge values that round together (a log range's small
    end does). Returns the values and a note saying how many were merged, if any."""
    rounded = sorted({float(round(v)) for v in values})
    if len(rounded) == len(values):
        return rounded, None
    what = {"tokens": "token counts", "batch": "batch sizes", "ep_ranks": "rank counts",
            "gpus_per_node": "GPU counts"}[flag]
    return rounded, (f"--{flag.replace('_', '-')}: {len(values)} values round to {len(rounded)} "
                     f"distinct whole {what}; duplicates merged")


def compute(args) -> tuple[list[str], list[tuple], dict]:
    """(columns, rows, summary) of the sweep."""
    import time

    import jax
    import numpy as np

    from moelab.costmodel import sweep as sw

    base, axes, notes, traces = build_grid(args)
    n = sw.grid_size(axes)
    run = sw.grid_kernel(base, axes, (*OUTPUTS, "ep_leg"), traces=traces)  # host terms here
    t0 = time.perf_counter()
    res = run()
    seconds = time.perf_counter() - t0
    gamma = res["gamma"]
    columns = [a.name for a in axes] + [*OUTPUTS[:5], "t_p_overhead_s", "t_ep_overhead_s",
                                        "t_ep_net_s", "t_ep_nvlink_s", "ep_deciding_leg",
                                        "decision"]
    decision = np.where(gamma < 1, "offload", "ep")
    legs = [LEGS[int(v)] for v in res["ep_leg"].tolist()]
    # float32 results: 7 significant digits are what they hold
    outs = [[float(f"{v:.7g}") for v in res[o].tolist()] for o in OUTPUTS]
    rows = [(*labels, *vals, leg, dec) for labels, *vals, leg, dec in
            zip(sw.grid_labels(axes), *outs, legs, decision.tolist(), strict=True)]
    summary = {
        "configurations": n, "seconds": seconds, "host_seconds": run.host_seconds,
        "devices": len(jax.devices()), "device": jax.devices()[0].device_kind,
        "axes": {a.name: len(a) for a in axes},
        "gamma_min": float(gamma.min()), "gamma_max": float(gamma.max()),
        "offload_win_fraction": float(np.mean(gamma < 1)),
        "notes": notes + run.notes,
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

    from moelab.io import require_folder, write_atomic

    for path in (args.out, args.plot):  # both before the work: no CSV left without its plot
        if path:
            require_folder(path)
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
