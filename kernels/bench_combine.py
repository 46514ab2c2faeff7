"""`moelab bench combine`: the combine kernel against a copy roof and a torch baseline.

Shapes, timing and roof as in `bench_dispatch` (see `kernels/timing.py`). The input is the
reference dispatch of uniform top-k routing with identity experts (the dispatched rows);
the baseline is the faster of torch's index_add_ and a gather-sum, both in fp32, over rows
sorted by expert without padding. The kernel is timed only after it matched the reference.
"""

from __future__ import annotations

from functools import partial

from moelab.kernels import timing as T


def bench(args) -> list[dict]:
    import torch

    from moelab.kernels.reference import (
        combine_reference,
        combine_torch,
        combine_torch_gather,
        dispatch_reference,
        dispatch_torch,
    )

    quick, cuda, interpret, env, device = T.start(args, "combine")
    rows = []
    for label, tokens, d, k, E in T.shapes(quick, cuda, interpret):
        x, ids, w = T.inputs(tokens, d, k, E, device)
        row = {"op": "combine", "shape": label, "tokens": tokens, "d": d, "k": k, "E": E,
               "block_m": T.BLOCK_M, "dtype": "bf16", **env}  # fmt: skip
        # baseline: rows sorted by expert without padding, summed back by token
        y_sorted, order, _ = dispatch_torch(x, ids, E)
        slot_sorted = torch.empty_like(order)
        slot_sorted[order] = torch.arange(order.numel(), device=device)
        slot_sorted = slot_sorted.view(tokens, k)
        t_add = T.time_op(partial(combine_torch, y_sorted, order, w), cuda, quick)[0]
        t_gather = T.time_op(partial(combine_torch_gather, y_sorted, slot_sorted, w), cuda, quick)[0]
        row["torch_time_s"] = min(t_add, t_gather)
        row["torch_baseline"] = "index_add_" if t_add <= t_gather else "gather-sum"
        if cuda or interpret:
            lay = dispatch_reference(x, ids, E, T.BLOCK_M)
            y = lay.hidden  # identity experts: the dispatched rows (padding rows are zero)
            _bench_combine_kernel(row, y, lay, w, combine_reference, cuda, quick)
        rows.append(row)
    T.print_rows(rows, ["kernel_us", "graph_us", "GB/s", "copy GB/s", "x_copy", "x_copy_graph", "x_torch",
                  "torch_us"])
    T.print_goals(rows, "combine")
    return rows


def _bench_combine_kernel(row, y, lay, w, combine_reference, cuda, quick):
    import torch

    from moelab.kernels.combine import combine

    try:
        out = combine(y, lay, w)
        want = combine_reference(y, lay, w).float()
        err = None
        if not torch.allclose(out.float(), want, rtol=1.6e-2, atol=1e-2):
            err = f"max |out - reference| = {float((out.float() - want).abs().max()):.3g}"
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
    row["ok"] = err is None
    if err:
        row["error"] = err
        return
    t, t20, t80 = T.time_op(lambda: combine(y, lay, w), cuda, quick)
    row["graph_time_s"] = T.graph_time(lambda: combine(y, lay, w), cuda)
    tokens, d = out.shape
    pairs = int((lay.slot >= 0).sum())
    # in: the routed rows, weights, slot; out: one row per token
    nbytes = pairs * d * y.element_size() + 2 * lay.slot.numel() * 4 + tokens * d * out.element_size()
    copy, copy_graph = T.copy_times(nbytes, y.device, cuda, quick)
    row.update(time_s=t, time_s_p20=t20, time_s_p80=t80, bytes=nbytes, bandwidth_Bps=nbytes / t,
               speedup_vs_torch=row["torch_time_s"] / t)  # fmt: skip
    T.roof_fields(row, nbytes, copy, copy_graph)
