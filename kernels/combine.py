"""Combine: the weighted sum of each token's expert outputs, back in token order.

    out[t] = sum_j w[t, j] * expert_out[slot[t, j]]     (slot -1: the pair adds nothing)

A gather per token (one program sums a tile of tokens in j order, in fp32), not a
scatter-add into the tokens: no atomics, the same bits on every run and every device.
The kernel is `_dispatch_triton._combine_kernel`; the reference is
`reference.combine_reference`.
"""

from __future__ import annotations

import math

import torch

from moelab.kernels import dispatch as _dispatch
from moelab.kernels.dispatch import DispatchLayout


def combine(
    expert_out: torch.Tensor,
    layout: DispatchLayout,
    topk_weights: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    *,
    config=None,
) -> torch.Tensor:
    """[N_t, d] in out_dtype (default: expert_out's dtype), accumulated in fp32.

    expert_out [N_pad, d] float (any strides): one output row per row of layout.hidden
    (padding rows are never read); topk_weights [N_t, k] float.
    config: a tuned.CombineConfig (default: the tuned one for this device and shape).
    """
    from moelab.kernels import _dispatch_triton as K
    from moelab.kernels.tuned import combine_config

    if not isinstance(expert_out, torch.Tensor) or expert_out.dim() != 2:
        raise ValueError("expert_out: expected a 2-D tensor [N_pad, d]")
    if not expert_out.dtype.is_floating_point or expert_out.dtype == _dispatch.FP8_DTYPE:
        raise TypeError(f"expert_out: dtype {expert_out.dtype}, expected a 16/32-bit float")
    if expert_out.shape[0] != layout.n_pad:
        raise ValueError(f"expert_out: {expert_out.shape[0]} rows, layout has N_pad={layout.n_pad}")
    if not isinstance(topk_weights, torch.Tensor) or topk_weights.shape != layout.slot.shape:
        raise ValueError(f"topk_weights: expected shape {tuple(layout.slot.shape)} [N_t, k]")
    if not topk_weights.dtype.is_floating_point:
        raise TypeError(f"topk_weights: dtype {topk_weights.dtype}, expected a float")
    for name, t in (("layout", layout.slot), ("topk_weights", topk_weights)):
        if t.device != expert_out.device:
            raise ValueError(f"{name}: on {t.device}, expert_out on {expert_out.device}")

    n_tokens, k = layout.slot.shape
    d = expert_out.shape[1]
    out_dtype = out_dtype or expert_out.dtype
    out = _dispatch._empty((n_tokens, d), out_dtype, expert_out.device)
    if n_tokens == 0 or d == 0:
        return out
    if k == 0:
        return out.zero_()
    cfg = config or combine_config(n_tokens, k, d, expert_out.device)
    block_d = min(cfg.block_d, max(16, _dispatch.triton_next_pow2(d)))
    grid = (math.ceil(n_tokens / cfg.block_t), math.ceil(d / block_d))
    K._combine_kernel[grid](
        expert_out, layout.slot.contiguous(), topk_weights.contiguous(), out,
        n_tokens, d, expert_out.stride(0), expert_out.stride(1), out.stride(0),
        BLOCK_T=cfg.block_t, BLOCK_D=block_d, K=k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
