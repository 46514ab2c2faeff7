"""Dispatch: permute token rows into an expert-contiguous, block-padded buffer.

    layout = dispatch(hidden, topk_ids, num_experts, block_m=64)
    y = grouped_gemm(layout.hidden, layout.block_expert, ...)   # one expert per block
    out = combine(y, layout, topk_weights)                        # moelab.kernels.combine

The layout is the contract of docs/contracts.md (`DispatchLayout` below documents each field).
Rows of one expert keep token order, then j order (pair i = t*k + j): the order is fixed by
construction (a sort inside each block of pairs plus a scan over blocks), never by atomics,
so the layout is the same on every run and every device. The kernels are in
`_dispatch_triton.py`; the plain reference the tests compare against is
`reference.dispatch_reference`.

Sizing without a host synchronization: the number of used rows is only known on the
device, so `hidden` gets the static bound

    N_pad = floor((P + min(P, E) * (block_m - 1)) / block_m) * block_m,   P = N_t * k,

(at most min(P, E) experts are used, each wastes at most block_m - 1 rows of padding; the
used rows are a multiple of block_m, so rounding the bound down still holds them).
Padding rows of `hidden` are left unwritten: `src_token == -1` marks them and
`block_expert == -1` marks whole blocks past the used rows; a grouped GEMM computes
garbage there that combine never reads. Their fp8 `scales` are zeroed (the routing kernel
visits those rows anyway), so a statistic over the scales or a scaled GEMM output holds no
NaN from uninitialized memory.

No host synchronization on this path (nor in combine): the routing is two launches, the
scatter one, and out-of-range ids raise a device flag (`layout.bad_ids`) that
`validate(layout)` reads when the caller chooses, instead of an `.item()` per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_GROUP = 128  # columns per fp8 scale (per token), as DeepEP's dispatch
INDEX_DTYPE = torch.int32


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here (tests patch it to poison the memory)."""
    return torch.empty(shape, dtype=dtype, device=device)


def padded_rows(n_tokens: int, k: int, num_experts: int, block_m: int) -> int:
    """N_pad: rows of the dispatched buffer, a bound on the used rows (module docstring)."""
    pairs = n_tokens * k
    return (pairs + min(pairs, num_experts) * (block_m - 1)) // block_m * block_m


@dataclass
class DispatchLayout:
    """Where every token-expert pair went. Integer fields are int32 on hidden's device.

    N_t tokens, k experts per token, E experts, N_pad = `padded_rows(N_t, k, E, block_m)`.
    """

    # [N_pad, d] token rows grouped by expert; group e is rows offsets[e] : offsets[e] +
    # counts[e]; rows up to offsets[e+1] are padding (unwritten). None from `route()`.
    hidden: torch.Tensor | None
    counts: torch.Tensor  # [E] rows routed to each expert (pairs with that id)
    # [E+1] first row of each expert's group, multiples of block_m; offsets[E] = used rows
    offsets: torch.Tensor
    src_token: torch.Tensor  # [N_pad] token of each row, -1 for padding rows
    slot: torch.Tensor  # [N_t, k] row of pair (t, j) in hidden, -1 where topk_ids is -1
    block_expert: torch.Tensor  # [N_pad // block_m] expert of each block of rows, -1 past offsets[E]
    block_m: int  # rows per block: every group starts at a multiple of it
    # [N_pad, d // 128] float32, only with quantize_fp8: row r, columns 128g..128g+127 of
    # the source token equal hidden[r].float() * scales[r, g] up to fp8 rounding.
    scales: torch.Tensor | None = None
    # Only with ep_ranks=R (rank of expert e = e // (E/R)). Experts are contiguous per rank
    # when rows are ordered by expert, so rows for rank r are already one contiguous range:
    rank_counts: torch.Tensor | None = None  # [R] pairs sent to each rank (padding excluded)
    rank_offsets: torch.Tensor | None = None  # [R+1] first row for each rank (= offsets[r*E/R])
    # [1] int32 on the device: ids outside [-1, E) seen (treated as not routed). Read it
    # when a sync suits you: `validate(layout)`.
    bad_ids: torch.Tensor | None = None

    def __post_init__(self):
        for name in ("counts", "offsets", "src_token", "slot", "block_expert"):
            t = getattr(self, name)
            if t.dtype != INDEX_DTYPE:
                raise TypeError(f"DispatchLayout.{name}: dtype {t.dtype}, expected {INDEX_DTYPE}")
        if self.offsets.shape != (self.counts.shape[0] + 1,):
            raise ValueError("DispatchLayout.offsets: expected E+1 entries")
        n_pad = self.src_token.shape[0]
        if n_pad % self.block_m or self.block_expert.shape != (n_pad // self.block_m,):
            raise ValueError("DispatchLayout.block_expert: expected N_pad / block_m entries")
        if self.hidden is not None and self.hidden.shape[0] != n_pad:
            raise ValueError("DispatchLayout.hidden: expected N_pad rows")
        if self.scales is not None and self.scales.dtype != torch.float32:
            raise TypeError("DispatchLayout.scales: expected float32")

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    @property
    def n_pad(self) -> int:
        return self.src_token.shape[0]

    def used_experts(self) -> torch.Tensor:
        """Experts with at least one row, ascending (int64). Host sync: see `used_experts`."""
        return used_experts(self.counts)


def used_experts(counts) -> torch.Tensor:
    """Experts with count > 0, ascending, int64, on counts' device.

    Accepts a DispatchLayout too. Its size depends on the data, so this synchronizes with
    the host (torch.nonzero); the counts exist as soon as the routing launch has run,
    before the rows are scattered, so a prefetcher can start copying weights while the
    scatter runs.
    """
    if isinstance(counts, DispatchLayout):
        counts = counts.counts
    return torch.nonzero(counts > 0).flatten().to(torch.int64)


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------


def _check_args(topk_ids: torch.Tensor, num_experts: int, block_m):
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        raise ValueError("topk_ids: expected a 2-D tensor [N_t, k]")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids: dtype {topk_ids.dtype}, expected int32 or int64")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts: expected a positive int, got {num_experts!r}")
    if not isinstance(block_m, int) or block_m < 1:
        raise ValueError(f"block_m: expected a positive int, got {block_m!r}")


def validate_ids(topk_ids: torch.Tensor, num_experts: int) -> None:
    """Raise ValueError if an id lies outside [-1, E). Host synchronization (one bool,
    and the range on failure): call it where a sync does not matter."""
    _check_args(topk_ids, num_experts, 1)
    if topk_ids.numel() and bool(((topk_ids < -1) | (topk_ids >= num_experts)).any()):
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        raise ValueError(
            f"topk_ids: ids must lie in [-1, {num_experts}) (-1 = not routed), "
            f"found values in [{lo}, {hi}]"
        )


def validate(layout: DispatchLayout) -> DispatchLayout:
    """Read the layout's device error flag (a host synchronization) and raise ValueError if
    the routing saw ids outside [-1, E); returns the layout. The kernels treat such ids as
    not routed (slot -1), so a layout is well-formed either way; this says it happened."""
    bad = int(layout.bad_ids.item()) if layout.bad_ids is not None else 0
    if bad:
        raise ValueError(
            f"topk_ids: {bad} ids outside [-1, {layout.num_experts}) (-1 = not routed); "
            "they were not routed"
        )
    return layout


# ------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------

# below this many pairs the routing blocks shrink to 256 pairs (a decode batch sorts
# 256 keys, not 1024): two block sizes in all, so two compilations per E and ids dtype
SMALL_P = 256
EXPERTS_PER_PROGRAM = 4


def route(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int = 64,
    *,
    check_ids: bool = False,
    config=None,
    _scales: torch.Tensor | None = None,
) -> DispatchLayout:
    """The layout's metadata only (counts, block-padded offsets, slots): hidden is None.

    Two launches, no host synchronization: ids outside [-1, E) are treated as not routed
    and counted in `layout.bad_ids` (on the device; `validate(layout)` reads it).
    check_ids=True checks them on the host first instead (`validate_ids`, which syncs).
    """
    from moelab.kernels import _dispatch_triton as K
    from moelab.kernels.tuned import dispatch_config

    _check_args(topk_ids, num_experts, block_m)
    if check_ids:
        validate_ids(topk_ids, num_experts)
    n_tokens, k = topk_ids.shape
    device = topk_ids.device
    E, P = num_experts, n_tokens * k
    n_pad = padded_rows(n_tokens, k, E, block_m)
    cfg = config or dispatch_config(n_tokens, k, E, 0, False, device)
    # [0] the count kernel's ticket counter, [1] ids outside [-1, E)
    status = torch.zeros((2,), dtype=INDEX_DTYPE, device=device)

    if P == 0:  # nothing routed (no tokens or k = 0): no launch, N_pad = 0
        zeros = torch.zeros((E + 1,), dtype=INDEX_DTYPE, device=device)
        empty = torch.zeros((0,), dtype=INDEX_DTYPE, device=device)
        slot = torch.full((n_tokens, k), -1, dtype=INDEX_DTYPE, device=device)
        return DispatchLayout(None, zeros[:E].clone(), zeros, empty, slot, empty.clone(), block_m,
                              bad_ids=status[1:])  # fmt: skip

    ids = topk_ids.contiguous().view(-1)
    counts = _empty((E,), INDEX_DTYPE, device)
    offsets = _empty((E + 1,), INDEX_DTYPE, device)
    slot = _empty((n_tokens, k), INDEX_DTYPE, device)
    src_token = _empty((n_pad,), INDEX_DTYPE, device)
    block_expert = _empty((n_pad // block_m,), INDEX_DTYPE, device)

    # tl.histogram (compiled) needs a multiple of 32 bins and, to count each element once,
    # at least one element per thread: BLOCK_P >= 32 * warps, BLOCK_E >= 32.
    block_p = cfg.block_p if P > SMALL_P else min(cfg.block_p, SMALL_P)
    warps = max(1, min(cfg.route_warps, block_p // 32))
    n_blocks = math.ceil(P / block_p)
    block_e = max(32, triton_next_pow2(E + 1))  # one spare bin (at least) for the -1 ids
    block_b = max(1, min(cfg.block_b, 8192 // block_e))  # the scan's tile: <= 8K counts
    hist = _empty((n_blocks, E), INDEX_DTYPE, device)
    # fp8 dispatch: the padding rows' scales are zeroed here (rows this kernel visits anyway)
    scales = _scales if _scales is not None else torch.empty((1,), dtype=torch.float32, device=device)
    n_groups = _scales.shape[1] if _scales is not None else 0
    K._route_count_kernel[(n_blocks,)](
        ids, hist, slot, counts, offsets, status, P, E, block_m, n_blocks,
        BLOCK_P=block_p, BLOCK_E=block_e, BLOCK_B=block_b, num_warps=warps,
    )  # fmt: skip
    # the placement's programs: one per block of pairs, and enough that none loops over
    # more than EXPERTS_PER_PROGRAM experts (their padding and blocks: serial scalar loads)
    n_place = max(n_blocks, math.ceil(E / EXPERTS_PER_PROGRAM))
    K._route_place_kernel[(n_place,)](
        ids, hist, counts, offsets, slot, src_token, block_expert, scales,
        P, E, n_pad, block_m, k, math.ceil(E / n_place), math.ceil(n_pad / n_place), n_groups,
        BLOCK_P=block_p, BLOCK_E=block_e, BLOCK_R=cfg.block_r, num_warps=warps,
    )  # fmt: skip
    return DispatchLayout(None, counts, offsets, src_token, slot, block_expert, block_m,
                          bad_ids=status[1:])  # fmt: skip


def dispatch(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int = 64,
    quantize_fp8: bool = False,
    ep_ranks: int | None = None,
    *,
    check_ids: bool = False,
    config=None,
) -> DispatchLayout:
    """Permute token rows into expert groups (docs/contracts.md).

    hidden [N_t, d] float (any strides); topk_ids [N_t, k] int32/int64 in [-1, E), -1 =
    not routed here (dropped or remote). quantize_fp8: rows stored as float8_e4m3fn with
    per-token, per-128-column float32 scales (d must be a multiple of 128). ep_ranks=R:
    also per-rank counts/offsets (E must be a multiple of R). No host synchronization: ids
    outside [-1, E) are not routed and counted in `layout.bad_ids` (`validate(layout)`
    raises if any); check_ids=True checks them on the host before launching instead.
    config: a tuned.DispatchConfig (default: the tuned one for this device and shape).
    """
    from moelab.kernels import _dispatch_triton as K
    from moelab.kernels.tuned import dispatch_config

    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError("hidden: expected a 2-D tensor [N_t, d]")
    if not hidden.dtype.is_floating_point or hidden.dtype == FP8_DTYPE:
        raise TypeError(f"hidden: dtype {hidden.dtype}, expected float32, bfloat16 or float16")
    if isinstance(topk_ids, torch.Tensor) and topk_ids.dim() == 2 and (topk_ids.shape[0] != hidden.shape[0]):
        raise ValueError(f"topk_ids: {topk_ids.shape[0]} tokens, hidden has {hidden.shape[0]} rows")
    if isinstance(topk_ids, torch.Tensor) and topk_ids.device != hidden.device:
        raise ValueError(f"topk_ids: on {topk_ids.device}, hidden on {hidden.device}")
    n_tokens, d = hidden.shape
    if quantize_fp8 and d % FP8_GROUP:
        raise ValueError(f"hidden: fp8 dispatch needs d % {FP8_GROUP} == 0, got d={d}")
    if ep_ranks is not None and (not isinstance(ep_ranks, int) or ep_ranks < 1 or num_experts % ep_ranks):
        raise ValueError(f"ep_ranks: must divide num_experts={num_experts}, got {ep_ranks!r}")
    k = topk_ids.shape[1] if isinstance(topk_ids, torch.Tensor) and topk_ids.dim() == 2 else 0
    cfg = config or dispatch_config(n_tokens, k, num_experts, d, quantize_fp8, hidden.device)

    _check_args(topk_ids, num_experts, block_m)
    n_pad = padded_rows(n_tokens, k, num_experts, block_m)
    out = _empty((n_pad, d), FP8_DTYPE if quantize_fp8 else hidden.dtype, hidden.device)
    scales = _empty((n_pad, d // FP8_GROUP), torch.float32, hidden.device) if quantize_fp8 else None
    layout = route(topk_ids, num_experts, block_m, check_ids=check_ids, config=cfg, _scales=scales)
    block_d = FP8_GROUP if quantize_fp8 else min(cfg.block_d, max(16, triton_next_pow2(d)))
    if n_tokens and d and k:
        grid = (math.ceil(n_tokens / cfg.block_t), math.ceil(d / block_d))
        K._scatter_kernel[grid](
            hidden, layout.slot, out, scales if quantize_fp8 else out,
            n_tokens, d, hidden.stride(0), hidden.stride(1), out.stride(0),
            scales.stride(0) if quantize_fp8 else 0,
            BLOCK_T=cfg.block_t, BLOCK_D=block_d, QUANT=quantize_fp8,
            FP8_MAX=float(torch.finfo(FP8_DTYPE).max), K=k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    layout.hidden, layout.scales = out, scales
    if ep_ranks is not None:
        per_rank = num_experts // ep_ranks
        layout.rank_counts = layout.counts.view(ep_ranks, per_rank).sum(1, dtype=INDEX_DTYPE)
        layout.rank_offsets = layout.offsets[::per_rank].contiguous()
    return layout


def triton_next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
