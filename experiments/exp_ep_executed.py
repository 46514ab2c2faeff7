"""ep-executed: bytes measured by the executed shard_map EP layer against the model's bytes.

Each configuration runs `python -m moelab ep --model M --devices R --tokens N --json` in a
subprocess, so that XLA's host device count (a process-wide flag read when jax starts)
can be set to R. The EP layer runs on a shrunk copy of the model (E, k and the routing
kept, d and the expert size scaled down) and reports the payload it actually sent, what
went on the wire with capacity padding, the model's bytes for that routing, the tokens it
dropped and its error against a dense single-device layer.

Its counterpart, offload executed: `python -m moelab offload --model M --tokens N --json`
runs a stack of MoE layers whose experts stream from the host store into the device cache
through the prefetcher, with the same shrinking, and reports the bytes it copied against
the model's (used experts x expert bytes, less cache hits) and its error against a dense
reference. With two passes and a cache that holds them, the second pass hits.
"""

from __future__ import annotations

NAME = "ep-executed"
SUMMARY = "executed shard_map EP layer on simulated devices: measured vs modelled bytes, padding, error"
VERSION = "2"
DEPENDS = ("moelab.costmodel.ep", "moelab.commands.ep", "moelab.costmodel.reference",
           "moelab.commands.offload", "moelab.kernels.prefetch", "moelab.kernels.dispatch")


def config(quick: bool) -> dict:
    # (model, EP ranks, tokens, capacity factor or None for dropless)
    runs = [
        ("mixtral-8x7b", 8, 256, None),
        ("mixtral-8x7b", 8, 256, 1.25),
        ("deepseek-r1", 8, 128, None),
        ("qwen3-30b-a3b", 4, 128, None),
    ]
    # offload: (model, tokens, layers, passes, slots or None for one layer's experts)
    offload = [
        ("mixtral-8x7b", 64, 4, 1, None),
        ("mixtral-8x7b", 64, 2, 2, 16),  # the second pass hits: 16 slots hold both layers
        ("deepseek-r1", 32, 2, 1, None),
    ]
    if quick:
        runs, offload = runs[:1], offload[:1]
    return {
        "runs": [{"model": m, "devices": r, "tokens": n, "capacity_factor": c} for m, r, n, c in runs],
        "offload_runs": [{"model": m, "tokens": n, "layers": L, "passes": p, "slots": c}
                         for m, n, L, p, c in offload],  # fmt: skip
        "timeout_s": 240,
    }


def STEPS(cfg) -> int:
    return len(cfg["runs"]) + len(cfg.get("offload_runs", ())) + 1


def _run_one(run: dict, timeout_s: float) -> dict:
    """One `moelab ep` subprocess; returns its JSON, or {"error": ...} with the reason it gave none."""
    import os
    import sys

    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={run['devices']}"
    env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [
        sys.executable,
        "-m",
        "moelab",
        "ep",
        "--model",
        run["model"],
        "--devices",
        str(run["devices"]),
        "--tokens",
        str(run["tokens"]),
        "--json",
    ]
    if run.get("capacity_factor"):
        cmd += ["--capacity-factor", str(run["capacity_factor"])]
    return _subprocess_json(cmd, env, timeout_s)


def _run_offload(run: dict, timeout_s: float) -> dict:
    """One `moelab offload` subprocess (the Triton interpreter off a GPU)."""
    import os
    import sys

    cmd = [sys.executable, "-m", "moelab", "offload", "--model", run["model"], "--tokens",
           str(run["tokens"]), "--layers", str(run["layers"]), "--passes", str(run["passes"]),
           "--json"]  # fmt: skip
    if run.get("slots"):
        cmd += ["--slots", str(run["slots"])]
    return _subprocess_json(cmd, dict(os.environ), timeout_s)


def _subprocess_json(cmd, env, timeout_s) -> dict:
    import json
    import subprocess

    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["(no message)"])[-1]
        return {"error": f"exit {p.returncode}: {last}"}
    try:
        return json.loads(p.stdout)
    except json.JSONDecodeError:
        return {"error": "the command printed no JSON"}


def run(cfg: dict, ctx) -> None:
    from moelab.show import fmt

    rows = []
    for r in cfg["runs"]:
        out = _run_one(r, cfg["timeout_s"])
        row = {**r, **{k: v for k, v in out.items() if not isinstance(v, dict | list)}}
        rows.append(row)
        ctx.advance()
    ok = [r for r in rows if "error" not in r]
    for r in rows:
        if "error" in r:
            ctx.note(
                f"{r['model']} on {r['devices']} devices: `moelab ep` not available yet or failed "
                f"({r['error']})"
            )
    for r in ok:
        r["label"] = f"{r['model']} R={r['devices']} N_t={r['tokens']}" + (
            f" capacity {r['capacity_factor']:g}" if r.get("capacity_factor") else " dropless"
        )
        r["wire_over_payload"] = (
            r["bytes_on_wire"] / r["bytes_sent_measured"] if r["bytes_sent_measured"] else None
        )
    ctx.rows("ep_runs", rows)
    offload = _offload(cfg, ctx)
    if not ok:
        ctx.section("No executed EP results in this run: " + "; ".join(ctx.notes) + offload)
        return

    _plot_bytes(ctx, ok)
    ctx.advance()
    table = (
        "| run | payload measured | model | on the wire | wire / payload | dropped | fan-out measured "
        "| fan-out closed form | max abs. error |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    for r in ok:
        table += (
            f"| {r['label']} | {fmt(r['bytes_sent_measured'])} B | {fmt(r['bytes_sent_model'])} B "
            f"| {fmt(r['bytes_on_wire'])} B | ×{r['wire_over_payload']:.2f} | {fmt(r.get('dropped'))} "
            f"| {fmt(r.get('fanout_measured'))} | {fmt(r.get('fanout_uniform'))} | {r['max_abs_err']:.2g} |\n"
        )
    equal = sum(r["bytes_sent_measured"] == r["bytes_sent_model"] for r in ok)
    worst_err = max(r["max_abs_err"] for r in ok)
    ctx.summary.update(
        {
            "runs": len(ok),
            "payload_equals_model": equal,
            "max_abs_err": worst_err,
            "max_wire_over_payload": max(r["wire_over_payload"] for r in ok),
        }
    )
    ctx.section(f"""
The EP layer ran {len(ok)} time(s) as a `jax.shard_map` with `all_to_all` dispatch and combine on simulated
CPU devices (shrunk models: E, k and routing kept; d and the expert size scaled down). The payload it sent
equals the model's bytes for the same routing in {equal} of {len(ok)} runs; its output matches a dense
single-device layer to {worst_err:.1e} at worst. `all_to_all` moves fixed-size blocks, so more goes on the
wire than the payload: ×{", ×".join(f"{r['wire_over_payload']:.2f} ({r['label']})" for r in ok)}. A dropless
layer must size every block for the worst case; a capacity factor shrinks the padding and drops tokens
instead. The seed's formula counts the payload only: sent padding multiplies
the EP overhead and divides gamma by the same factor.

{table}{offload}""")


def _offload(cfg, ctx) -> str:
    """Run the offload counterparts; their rows, summary and a Markdown section."""
    from moelab.show import fmt

    rows = []
    for r in cfg.get("offload_runs", ()):
        out = _run_offload(r, cfg["timeout_s"])
        rows.append({**r, **{k: v for k, v in out.items() if not isinstance(v, dict | list)}})
        ctx.advance()
    if not rows:
        return ""
    ctx.rows("offload_runs", rows)
    ok = [r for r in rows if "error" not in r]
    for r in rows:
        if "error" in r:
            ctx.note(f"offload {r['model']} N_t={r['tokens']}: `moelab offload` failed ({r['error']})")
    if not ok:
        return "\n\n## Offload executed\n\nNo executed offload results in this run.\n"
    equal = sum(bool(r["bytes_match"]) for r in ok)
    worst = max(r["max_abs_err"] for r in ok)
    ctx.summary.update({"offload_runs": len(ok), "offload_bytes_equal_model": equal,
                        "offload_max_abs_err": worst})  # fmt: skip
    table = ("| run | copied (measured) | model | cache hits | copies | max abs. error | transfer |\n"
             "|---|---|---|---|---|---|---|\n")  # fmt: skip
    for r in ok:
        label = f"{r['model']} N_t={r['tokens']} L={r['layers']} x{r['passes']} C={r['slots']}"
        table += (f"| {label} | {fmt(r['bytes_copied_measured'])} B | {fmt(r['bytes_copied_model'])} B "
                  f"| {r['cache_hits_model']} | {r['copies_measured']} | {r['max_abs_err']:.2g} "
                  f"| {r['transfer']}{' (stand-in)' if r.get('transfer_stand_in') else ''} |\n")  # fmt: skip
    note = ""
    if any(r.get("transfer_stand_in") for r in ok):
        note = (" Off a GPU the copies run on a worker thread standing in for the copy stream, and the "
                "kernels in Triton's interpreter: bytes and errors are exact, times are not measured.")
    return f"""

## Offload executed: the counterpart

`moelab offload` ran {len(ok)} layer stack(s) with the experts in the host store, each layer's used
experts brought into the device cache by the prefetcher, then dispatch, the experts' GEMMs and combine
(same shrinking as EP: E, k and routing kept). The bytes it copied equal the model's (used experts x
expert bytes, less the cache hits of an LRU over the same routing) in {equal} of {len(ok)} runs; its
output matches a dense reference to {worst:.1e} at worst.{note}

{table}"""


def _plot_bytes(ctx, rows) -> None:
    import numpy as np

    from moelab.experiments import plots

    fig, ax = plots.figure(width=7, height=4.4)
    x = np.arange(len(rows))
    ax.bar(
        x - 0.27, [r["bytes_sent_model"] / 1e3 for r in rows], 0.27, label="model (this routing)", color="0.6"
    )
    ax.bar(
        x, [r["bytes_sent_measured"] / 1e3 for r in rows], 0.27, label="payload measured", color="tab:blue"
    )
    ax.bar(
        x + 0.27,
        [r["bytes_on_wire"] / 1e3 for r in rows],
        0.27,
        label="on the wire (with padding)",
        color="tab:red",
    )
    ax.set_xticks(
        x,
        [
            r["label"]
            .replace(" R=", "\nR=")
            .replace(" capacity", "\ncapacity")
            .replace(" dropless", "\ndropless")
            for r in rows
        ],
        fontsize=7,
    )
    ax.set_xlabel("configuration [model, EP ranks, tokens, capacity]")
    ax.set_ylabel("bytes as counted by moelab ep (shrunk model) [kB]")
    ax.set_title("Executed EP (shard_map all_to_all): measured vs modelled bytes", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    ctx.plot(
        fig,
        "ep_bytes",
        "Bytes the executed EP layer sent (payload and on the wire) against the model's "
        "bytes for the same routing.",
    )
