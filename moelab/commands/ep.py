"""`moelab ep`: run expert parallelism for real (shard_map + all_to_all) and count its bytes.

The model keeps its E, k and routing; d and the expert size are scaled down to fit (the
bytes per row scale with d, the row counts do not). Runs on simulated CPU devices when
fewer real ones exist; on GPUs and across hosts see `moelab.costmodel.ep`'s docstring.
"""

from __future__ import annotations

import os
import sys

HELP = "execute an EP MoE layer on R devices (all_to_all) and check its bytes against the model"


def add_arguments(p):
    p.add_argument("--model", default="deepseek-r1", help="preset or config.json [deepseek-r1]")
    p.add_argument("--devices", type=int, default=8, metavar="R", help="EP ranks [8]")
    p.add_argument("--tokens", type=int, default=256, metavar="N_t", help="tokens [256]")
    p.add_argument(
        "--routing",
        default="uniform",
        help="uniform | zipf:S | dirichlet:A | groups | logits:F.npy | hist:F [uniform]",
    )
    p.add_argument(
        "--capacity-factor",
        type=float,
        metavar="F",
        help="rows per destination block = F x its mean load under uniform "
        "routing; default: dropless (every token to every rank)",
    )
    p.add_argument("--hidden", type=int, default=64, metavar="d", help="hidden size run [64]")
    p.add_argument(
        "--intermediate", type=int, default=128, metavar="I", help="expert intermediate size run [128]"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON (SI units)")


def _ensure_devices(n: int) -> None:
    """Join a multi-host run, or simulate `n` CPU devices: only before jax is imported."""
    if "jax" in sys.modules:
        return
    if os.environ.get("MOELAB_COORDINATOR"):
        import jax

        jax.distributed.initialize(
            os.environ["MOELAB_COORDINATOR"],
            int(os.environ["MOELAB_NUM_PROCESSES"]),
            int(os.environ["MOELAB_PROCESS_ID"]),
        )
        return
    import re

    flag = "--xla_force_host_platform_device_count"
    flags = os.environ.get("XLA_FLAGS", "")
    m = re.search(flag + r"=(\d+)", flags)
    if m is None:
        os.environ["XLA_FLAGS"] = f"{flags} {flag}={n}".strip()
    elif int(m.group(1)) < n:  # too few simulated devices asked for elsewhere: raise it
        os.environ["XLA_FLAGS"] = flags.replace(m.group(0), f"{flag}={n}")


def compute(args) -> dict:
    import time

    from moelab.costmodel.specs import SpecError, parse_routing

    R, N = args.devices, args.tokens
    for name, v in (
        ("--devices", R),
        ("--tokens", N),
        ("--hidden", args.hidden),
        ("--intermediate", args.intermediate),
    ):
        if v < 1:
            raise SpecError(f"{name}: must be >= 1, got {v}")
    if args.capacity_factor is not None and not args.capacity_factor > 0:
        raise SpecError(f"--capacity-factor: must be > 0, got {args.capacity_factor}")
    _ensure_devices(R)

    import jax
    import numpy as np

    from moelab.costmodel import ep
    from moelab.costmodel import routing as rt
    from moelab.costmodel.closed_form import fanout_uniform
    from moelab.costmodel.presets import load_model

    model = load_model(args.model)
    E, k, d, I = model.n_experts, model.top_k, args.hidden, args.intermediate
    if E % R:
        raise SpecError(f"--devices: E={E} experts do not split over {R} ranks")
    if len(jax.devices()) < R:
        raise SpecError(
            f"--devices: {R} asked, {len(jax.devices())} available "
            "(jax was imported before the device count could be set)"
        )

    key = jax.random.key(args.seed)
    gen = rt.layer_generator(parse_routing(args.routing), 1, N, E, k, model.n_group, model.topk_group)
    ids = np.asarray(gen(jax.random.fold_in(key, 0), 0))
    # Pad to a multiple of R with tokens routed nowhere (ids -1): they move nothing.
    n_pad = -(-N // R) * R
    ids = np.concatenate([ids, np.full((n_pad - N, k), -1, np.int32)])
    rng = np.random.default_rng(args.seed)
    logits = rng.normal(size=(n_pad, k))
    w = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    x = rng.normal(size=(n_pad, d)).astype(np.float32)
    wg = (rng.normal(size=(E, d, I)) / np.sqrt(d)).astype(np.float32)
    wu = (rng.normal(size=(E, d, I)) / np.sqrt(d)).astype(np.float32)
    wd = (rng.normal(size=(E, I, d)) / np.sqrt(I)).astype(np.float32)

    capacity = ep.default_capacity(n_pad // R, E, k, R, args.capacity_factor)
    out, st = ep.ep_layer(x, ids, w, wg, wu, wd, ranks=R, capacity=capacity)
    t0 = time.perf_counter()
    ep.ep_layer(x, ids, w, wg, wu, wd, ranks=R, capacity=capacity)  # compiled: time it
    seconds = time.perf_counter() - t0

    keep = ep.kept_mask(ids, E, R, capacity)
    want = ep.dense_reference(x, ids, w, wg, wu, wd, keep)
    row = d * x.dtype.itemsize  # bytes of one payload row, each direction
    rows_model = ep.expected_rows(ids, E, R, keep)  # remote rows per device, as routed
    rows_undropped = ep.expected_rows(ids, E, R)
    measured = int(st.rows_sent.sum() + st.rows_returned.sum()) * row
    model_bytes = 2 * int(rows_model.sum()) * row
    on_wire = 2 * R * (R - 1) * capacity * row  # every off-diagonal block, full
    meta_on_wire = R * (R - 1) * capacity * (k * (4 + w.dtype.itemsize) + 1)
    full_row = model.hidden * (model.f_a + model.f_a)
    remote_rows = int(st.rows_sent.sum())
    return {
        "model": model.name,
        "devices": R,
        "tokens": N,
        "tokens_padded": n_pad,
        "n_experts": E,
        "top_k": k,
        "routing": args.routing,
        "hidden_run": d,
        "intermediate_run": I,
        "dtype_run": str(x.dtype),
        "capacity": capacity,
        "capacity_factor": args.capacity_factor,
        "dropless": args.capacity_factor is None,
        "max_abs_err": float(np.abs(out - want).max()) if N else 0.0,
        "max_abs_out": float(np.abs(want).max()) if N else 0.0,
        "bytes_sent_measured": measured,
        "bytes_sent_model": model_bytes,
        "bytes_sent_model_undropped": 2 * int(rows_undropped.sum()) * row,
        "bytes_match": bool(measured == model_bytes and np.array_equal(st.rows_sent, rows_model)),
        "bytes_on_wire": on_wire,
        "padding_overhead": on_wire / measured if measured else float("inf"),
        "bytes_metadata_on_wire": meta_on_wire,
        "dropped": int(st.dropped_rows.sum()),
        "dropped_assignments": int(st.dropped_assignments.sum()),
        "rows_sent_per_device": st.rows_sent.tolist(),
        "rows_model_per_device": rows_model.tolist(),
        "rows_local": int(st.rows_local.sum()),
        "fanout_measured": remote_rows / N if N else 0.0,
        "fanout_uniform": float(fanout_uniform(R, E, k)),
        "bytes_full_size_model": remote_rows * full_row,
        "layer_seconds": seconds,
        "device": jax.devices()[0].device_kind,
    }


def run(args) -> int:
    import json

    out = compute(args)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(
        f"EP layer: {out['model']} (E={out['n_experts']}, k={out['top_k']}) on {out['devices']} "
        f"{out['device']} devices, {out['tokens']} tokens, d={out['hidden_run']}, "
        f"I={out['intermediate_run']}, routing {out['routing']}"
    )
    print(
        f"  max |out - dense reference| = {out['max_abs_err']:.3g} (outputs up to {out['max_abs_out']:.3g})"
    )
    print(
        f"  payload sent {out['bytes_sent_measured']:,} B, model {out['bytes_sent_model']:,} B: "
        f"{'equal' if out['bytes_match'] else 'DIFFERENT'}"
    )
    print(
        f"  on the wire {out['bytes_on_wire']:,} B with capacity {out['capacity']} rows per "
        f"block: padding x{out['padding_overhead']:.2f} (+{out['bytes_metadata_on_wire']:,} B "
        "ids and weights)"
    )
    print(
        f"  dropped {out['dropped']} (token, rank) rows, {out['dropped_assignments']} "
        f"(token, expert) pairs; fan-out {out['fanout_measured']:.3f} "
        f"(uniform expectation {out['fanout_uniform']:.3f})"
    )
    return 0
