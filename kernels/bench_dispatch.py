"""`moelab bench dispatch`: the dispatch kernel against a copy roof and a torch baseline.

For each shape (model presets: DeepSeek-R1, Mixtral-8x7B, Qwen3-235B prefill of 4096
tokens; R1 decode batches 1, 64, 256), all measured in the same run:
- the kernel (dispatch: route + scatter, ids unchecked; combine), median and 20/80% quantiles
  of triton.testing.do_bench;
- the minimum bytes: each input read once, each output written once (padding rows are not
  written, so not counted); achieved B/s = bytes / time;
- the roof: a device-to-device copy moving the same bytes (a copy of bytes/2: it reads
  bytes/2 and writes bytes/2); ratio_to_copy = copy time / kernel time;
- the torch baseline (dispatch: argsort + index_select + bincount; combine: the faster of
  index_add_ and a gather-sum, both in fp32), speedup = baseline time / kernel time;
- dispatch also: the metadata alone (`route`: counts + scan + slots), at each shape and,
  at R1's E and k, at 4K, 32K and 256K tokens (`metadata_scaling`: linear in the tokens
  is the goal, <= 10 us at 4K).
A kernel is timed only after its output matched the reference on that very shape; a row
whose check failed carries the error and no speed.

Without a GPU: the Triton kernels need one, so the torch baseline runs on the CPU at a
reduced shape. With TRITON_INTERPRET=1 (ci/gpu-check --dry-run) the kernels also run in
the interpreter on tiny shapes: this checks the code path, its times mean nothing.
"""

from __future__ import annotations

from functools import partial

from moelab.kernels import timing as T
from moelab.kernels.reference import check_dispatch


def _dispatch_bytes(x, ids, n_pad, fp8: bool) -> int:
    tokens, d = x.shape
    pairs = int((ids >= 0).sum())
    out_elt = 1 if fp8 else x.element_size()
    scales = pairs * (d // 128) * 4 if fp8 else 0
    # in: rows + ids; out: the routed rows, (scales), slot, src_token, counts, offsets, blocks
    meta = ids.numel() * 4 + n_pad * 4 + (n_pad // T.BLOCK_M) * 4
    return (
        tokens * d * x.element_size()
        + ids.numel() * ids.element_size()
        + (pairs * d * out_elt + scales + meta)
    )


def bench(args) -> list[dict]:

    from moelab.kernels.reference import dispatch_torch

    quick, cuda, interpret, env, device = T.start(args, "dispatch")
    rows = []
    for label, tokens, d, k, E in T.shapes(quick, cuda, interpret):
        x, ids, _ = T.inputs(tokens, d, k, E, device)
        variants = [False, True] if (cuda or interpret) and d % 128 == 0 else [False]
        if quick or "decode" in label:
            variants = variants[:1]  # fp8 only at the prefill shapes of the full run
        for fp8 in variants:
            row = {"op": "dispatch", "shape": label + (" fp8" if fp8 else ""), "tokens": tokens,
                   "d": d, "k": k, "E": E, "block_m": T.BLOCK_M, "dtype": "bf16",
                   "out_dtype": "fp8" if fp8 else "bf16", **env}  # fmt: skip
            base = T.time_op(partial(dispatch_torch, x, ids, E), cuda, quick)[0]
            row["torch_time_s"] = base
            if cuda or interpret:
                _bench_dispatch_kernel(row, x, ids, E, fp8, cuda, quick)
            rows.append(row)
    headers = ["kernel_us", "graph_us", "GB/s", "copy GB/s", "x_copy", "x_copy_graph", "x_torch",
               "torch_us"]
    T.print_rows(rows, headers + ["meta_us", "meta_graph_us"])
    T.print_goals(rows, "dispatch")
    scaling = metadata_scaling(quick, cuda, interpret, env, device)
    if scaling:
        T.print_rows(scaling, ["meta_us", "meta_graph_us"])
    return rows + scaling


# tokens of the metadata's scaling rows (R1: top-8 of 256); the interpreter runs a few
METADATA_TOKENS = (4096, 32768, 262144)
METADATA_TOKENS_INTERPRET = (4, 8)


def metadata_scaling(quick, cuda, interpret, env, device) -> list[dict]:
    """`route` alone at 4K, 32K and 256K tokens of R1 routing: its time should grow
    linearly. Checked against the reference before timing, as every kernel here."""
    from moelab.kernels.dispatch import route
    from moelab.kernels.reference import dispatch_reference

    if not (cuda or interpret):
        print("metadata scaling (4K, 32K, 256K tokens): no GPU, not measured")
        return []
    k, E = 8, 256
    rows = []
    for tokens in METADATA_TOKENS if cuda else METADATA_TOKENS_INTERPRET:
        _, ids, _ = T.inputs(tokens, 1, k, E, device)
        row = {"op": "route", "shape": f"deepseek-r1 metadata {tokens}", "tokens": tokens,
               "k": k, "E": E, "block_m": T.BLOCK_M, **env}  # fmt: skip
        try:
            lay = route(ids, E, T.BLOCK_M)
            ref = dispatch_reference(ids[:, :1].float(), ids, E, T.BLOCK_M)
            same = all(torch_equal(getattr(lay, f), getattr(ref, f))
                       for f in ("counts", "offsets", "src_token", "slot", "block_expert"))
            row["ok"] = same
            if not same:
                row["error"] = "route's layout differs from the reference"
        except Exception as e:  # report, never crash the whole benchmark
            row.update(ok=False, error=f"{type(e).__name__}: {e}")
        if row["ok"]:
            run = partial(route, ids, E, T.BLOCK_M)
            row["metadata_time_s"] = T.time_op(run, cuda, quick)[0]
            row["metadata_graph_time_s"] = T.graph_time(run, cuda)
        rows.append(row)
    base = rows[0].get("metadata_graph_time_s") or rows[0].get("metadata_time_s")
    for r in rows:
        t = r.get("metadata_graph_time_s") or r.get("metadata_time_s")
        if base and t:  # time per token relative to the smallest: 1.0 when linear
            r["time_per_token_vs_smallest"] = (t / r["tokens"]) / (base / rows[0]["tokens"])
    return rows


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def _bench_dispatch_kernel(row, x, ids, E, fp8, cuda, quick):
    from moelab.kernels.dispatch import dispatch, route

    try:
        lay = dispatch(x, ids, E, T.BLOCK_M, quantize_fp8=fp8)
        err = check_dispatch(lay, x, ids, E, fp8)
    except Exception as e:  # report, never crash the whole benchmark
        err = f"{type(e).__name__}: {e}"
    row["ok"] = err is None
    if err:
        row["error"] = err
        return
    run = partial(dispatch, x, ids, E, T.BLOCK_M, quantize_fp8=fp8)
    t, t20, t80 = T.time_op(run, cuda, quick)
    run_route = partial(route, ids, E, T.BLOCK_M)
    meta = T.time_op(run_route, cuda, quick)[0]
    meta_graph = T.graph_time(run_route, cuda)
    graph = T.graph_time(run, cuda)
    nbytes = _dispatch_bytes(x, ids, lay.n_pad, fp8)
    copy, copy_graph = T.copy_times(nbytes, x.device, cuda, quick)
    row.update(graph_time_s=graph, metadata_graph_time_s=meta_graph)
    row.update(time_s=t, time_s_p20=t20, time_s_p80=t80, metadata_time_s=meta, bytes=nbytes,
               bandwidth_Bps=nbytes / t, speedup_vs_torch=row["torch_time_s"] / t)  # fmt: skip
    T.roof_fields(row, nbytes, copy, copy_graph)
