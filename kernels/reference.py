"""Plain torch references of dispatch, combine and fp8 quantization (what the tests trust).

Short on purpose: each is the definition of its op, written the obvious way. The
benchmarks also use them as the torch baseline (argsort + index_select, index_add_).
"""

from __future__ import annotations

import torch

from moelab.kernels.dispatch import FP8_DTYPE, FP8_GROUP, DispatchLayout, padded_rows


def dispatch_reference(hidden, topk_ids, num_experts, block_m=64, quantize_fp8=False):
    """DispatchLayout by stable sort; padding rows of hidden (and scales) are zero."""
    n_tokens, k = topk_ids.shape
    E, dev, i32 = num_experts, topk_ids.device, torch.int32
    flat = topk_ids.reshape(-1).long()
    pairs = torch.nonzero(flat >= 0).flatten()  # valid pairs i = t*k + j, ascending
    # stable: pairs of one expert keep their (t, j) order
    order = pairs[torch.argsort(flat[pairs], stable=True)]
    e = flat[order]
    counts = torch.bincount(e, minlength=E)
    padded = (counts + block_m - 1) // block_m * block_m
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(padded, 0)])
    first_of_e = torch.cumsum(counts, 0) - counts
    rows = offsets[e] + torch.arange(len(order), device=dev) - first_of_e[e]

    n_pad = padded_rows(n_tokens, k, E, block_m)
    slot = torch.full((n_tokens * k,), -1, dtype=torch.long, device=dev)
    slot[order] = rows
    src_token = torch.full((n_pad,), -1, dtype=torch.long, device=dev)
    src_token[rows] = order // k
    out = hidden.new_zeros((n_pad, hidden.shape[1]))
    out[rows] = hidden[order // k]
    scales = None
    if quantize_fp8:
        out, scales = quantize_fp8_reference(out)
    starts = torch.arange(0, n_pad, block_m, device=dev)
    block_expert = torch.searchsorted(offsets[1:], starts, right=True)
    block_expert[starts >= offsets[E]] = -1
    return DispatchLayout(
        out, counts.to(i32), offsets.to(i32), src_token.to(i32), slot.view(n_tokens, k).to(i32),
        block_expert.to(i32), block_m, scales,
    )  # fmt: skip


def quantize_fp8_reference(x):
    """float8_e4m3fn rows with one float32 scale per row and 128 columns: x ~= q * scale."""
    n, d = x.shape
    g = x.float().view(n, d // FP8_GROUP, FP8_GROUP)
    # DeepEP's rule: the group's absolute max (floored at 1e-4) maps to the largest fp8
    scale = g.abs().amax(-1).clamp(min=1e-4) / torch.finfo(FP8_DTYPE).max
    q = (g / scale[..., None]).to(FP8_DTYPE)
    return q.view(n, d), scale


def dequantize_fp8_reference(q, scale):
    n, d = q.shape
    return (q.float().view(n, d // FP8_GROUP, FP8_GROUP) * scale[..., None]).view(n, d)


def combine_reference(expert_out, layout, topk_weights, out_dtype=None):
    """out[t] = sum_j w[t,j] * expert_out[slot[t,j]] in fp64, slots of -1 skipped."""
    slot = layout.slot.long()
    valid = slot >= 0
    rows = expert_out.double()[slot.clamp(min=0)]  # [N_t, k, d]
    w = torch.where(valid, topk_weights.double(), 0.0)
    out = torch.where(valid[..., None], w[..., None] * rows, 0.0).sum(1)
    return out.to(out_dtype or expert_out.dtype)


# torch baselines timed by the benchmarks (what a user would write without a kernel)


def dispatch_torch(hidden, topk_ids, num_experts):
    """argsort + index_select: rows sorted by expert (no block padding), counts.

    Counts by index_add_, not bincount: bincount sizes its output from the data, a host
    synchronization that would slow this baseline down for nothing.
    """
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    return hidden.index_select(0, order // topk_ids.shape[1]), order, counts


def combine_torch(expert_out, order, topk_weights):
    """index_add_ of the weighted rows back into their tokens (fp32 accumulation)."""
    k = topk_weights.shape[1]
    w = topk_weights.reshape(-1)[order].float()
    out = torch.zeros(topk_weights.shape[0], expert_out.shape[1], device=expert_out.device,
                      dtype=torch.float32)  # fmt: skip
    out.index_add_(0, order // k, expert_out.float() * w[:, None])
    return out.to(expert_out.dtype)


def combine_torch_gather(expert_out, slot, topk_weights):
    """Gather-sum: out[t] = sum_j w[t,j] * expert_out[slot[t,j]] in fp32 (all slots valid)."""
    rows = expert_out[slot.long()].float()  # [N_t, k, d]
    return (rows * topk_weights.float()[..., None]).sum(1).to(expert_out.dtype)


def check_dispatch(lay, x, ids, E, fp8) -> str | None:
    """None when a kernel's layout `lay` equals the reference's; else what differs.

    The benchmarks and the autotuner check every output with it before timing it."""
    ref = dispatch_reference(x, ids, E, lay.block_m, fp8)
    for name in ("counts", "offsets", "src_token", "slot", "block_expert"):
        if not torch.equal(getattr(lay, name), getattr(ref, name)):
            return f"{name} differs from the reference"
    rows = ref.src_token >= 0
    if fp8:
        back = dequantize_fp8_reference(lay.hidden[rows], lay.scales[rows])
        src = x[ref.src_token[rows].long()].float()
        if not torch.allclose(back, src, rtol=2**-4, atol=1e-3 * float(src.abs().max())):
            return "fp8 rows differ from the source rows beyond fp8 rounding"
    elif not torch.equal(lay.hidden[rows], ref.hidden[rows]):
        return "permuted rows differ from the source rows"
    return None
