"""Triton kernels of dispatch and combine (launchers: dispatch.py and combine.py).

The token-expert pairs are numbered i = t*k + j (token order, then j order); every row
order below follows that numbering, so the layout never depends on atomics or on the
order in which programs run.

The routing metadata is two launches over blocks of BLOCK_P consecutive pairs, linear in
the pairs (every id read twice, every block count once by each launch):
1. `_route_count_kernel`: per block, the pairs of each expert (hist[b, e]) and each pair's
   rank among its block's pairs of its expert (a sort by (expert, i) inside the block),
   parked in `slot`. Ids outside [0, E) are not routed, whatever their value (so the
   compiled kernel and the interpreter agree); those other than -1 are counted into an
   error flag on the device. The last program to finish (a ticket counter) runs the
   per-expert scan over the blocks: hist[b, e] becomes the pairs of e in earlier blocks,
   and it writes counts and the block-padded offsets.
2. `_route_place_kernel`: row of pair i = offsets[e] + hist[b, e] + rank (one tl.gather
   from two [BLOCK_E] vectors), src_token of that row; then each program's share of the
   experts (their padding rows: src_token -1, scales 0; their block_expert entries) and
   of the unused tail rows. It has a program per block and at least one per 4 experts.
The scatter is one launch, `_scatter_kernel`: each token row read once, written to its k
rows (fp8 optional). Combine is one launch, `_combine_kernel`: a gather-sum per token tile.

`python -m moelab.kernels.compile_check` lowers all of them for sm_90 without a GPU.
"""

import triton
import triton.language as tl


# Sizes are not specialized (no recompilation per value: the sort takes seconds to
# compile, and these kernels gain nothing from knowing a size divides by 16).
@triton.jit(do_not_specialize=["P", "E", "block_m", "n_blocks"])
def _route_count_kernel(
    ids_ptr,  # [P] int32|int64: topk_ids flattened, pair i = t*k + j; -1 = not routed
    hist_ptr,  # [n_blocks, E] int32 (out): pairs of e in block b; after the scan, in earlier blocks
    rank_ptr,  # [P] int32 (out): rank of pair i among its block's pairs of its expert
    counts_ptr,  # [E] int32 (out)
    offsets_ptr,  # [E+1] int32 (out)
    status_ptr,  # [2] int32, zeroed: [0] ticket counter, [1] (out) ids outside [-1, E)
    P,
    E,
    block_m,
    n_blocks,
    BLOCK_P: tl.constexpr,  # pairs per program (power of two)
    BLOCK_E: tl.constexpr,  # power of two > E: bin BLOCK_E-1 collects the pairs not routed
    BLOCK_B: tl.constexpr,  # hist rows per step of the scan
):
    """grid (n_blocks,) = (cdiv(P, BLOCK_P),)"""
    i_b = tl.program_id(0)
    o_p = tl.arange(0, BLOCK_P)
    o_i = i_b.to(tl.int64) * BLOCK_P + o_p
    m_i = o_i < P
    b_id = tl.load(ids_ptr + o_i, mask=m_i, other=-1)
    m_ok = (b_id >= 0) & (b_id < E)
    tl.atomic_add(status_ptr + 1, tl.sum((m_i & (b_id != -1) & ~m_ok).to(tl.int32), axis=0))
    # pairs not routed (and lanes past P) get the spare expert BLOCK_E-1 (>= E): counted
    # nowhere that is stored, sorted last
    b_e = tl.where(m_ok, b_id, BLOCK_E - 1).to(tl.int32)
    b_h = tl.histogram(b_e, BLOCK_E)  # [BE]
    o_e = tl.arange(0, BLOCK_E)
    m_e = o_e < E
    tl.store(hist_ptr + i_b.to(tl.int64) * E + o_e, b_h, mask=m_e)

    # rank: sort the block's pairs by (expert, pair index); sorted position minus the
    # sorted position of the expert's first pair (an exclusive scan of the histogram)
    b_sorted = tl.sort(b_e * BLOCK_P + o_p)  # [BP]
    b_se = b_sorted // BLOCK_P
    b_sp = b_sorted % BLOCK_P
    b_first = tl.cumsum(b_h, axis=0) - b_h  # [BE]
    b_rank = o_p - tl.gather(b_first, b_se, 0)
    tl.store(rank_ptr + i_b.to(tl.int64) * BLOCK_P + b_sp, b_rank, mask=b_se < E)

    # The last program to arrive scans. The barrier orders every thread's stores above
    # before the ticket's release; the scan reads through L2 (.cg), where they landed.
    tl.debug_barrier()
    ticket = tl.atomic_add(status_ptr, 1, sem="acq_rel")
    if ticket == n_blocks - 1:
        b_carry = tl.zeros([BLOCK_E], dtype=tl.int32)
        for b0 in range(0, n_blocks, BLOCK_B):
            o_b = b0 + tl.arange(0, BLOCK_B)
            p_h = hist_ptr + o_b.to(tl.int64)[:, None] * E + o_e[None, :]
            m_h = (o_b < n_blocks)[:, None] & m_e[None, :]
            b_hh = tl.load(p_h, mask=m_h, other=0, cache_modifier=".cg")  # [BB, BE]
            tl.store(p_h, tl.cumsum(b_hh, axis=0) - b_hh + b_carry[None, :], mask=m_h)
            b_carry += tl.sum(b_hh, axis=0)
        # block-padded exclusive scan over experts: offsets[e] = sum_{e' < e} ceil(c/bm)*bm
        b_pad = (b_carry + block_m - 1) // block_m * block_m
        b_end = tl.cumsum(b_pad, axis=0)
        tl.store(counts_ptr + o_e, b_carry, mask=m_e)
        tl.store(offsets_ptr + 1 + o_e, b_end, mask=m_e)
        tl.store(offsets_ptr + o_e, tl.zeros([BLOCK_E], dtype=tl.int32), mask=o_e == 0)


@triton.jit
def _fill_range(ptr, lo, hi, value, BLOCK: tl.constexpr):
    """ptr[lo:hi] = value (hi <= lo: nothing)."""
    for r0 in range(lo, hi, BLOCK):
        o_r = r0 + tl.arange(0, BLOCK)
        tl.store(ptr + o_r, tl.zeros([BLOCK], ptr.dtype.element_ty) + value, mask=o_r < hi)


@triton.jit(do_not_specialize=["P", "E", "N_pad", "block_m", "k", "experts_per_prog",
                               "rows_per_prog", "n_groups"])
def _route_place_kernel(
    ids_ptr,  # [P] int32|int64
    before_ptr,  # [n_blocks, E] int32: pairs of e in earlier blocks (from the count kernel)
    counts_ptr,  # [E] int32
    offsets_ptr,  # [E+1] int32
    slot_ptr,  # [P] int32: in, the rank; out, the row of pair i (-1 where not routed)
    src_ptr,  # [N_pad] int32 (out): token of each row, -1 for padding rows
    block_expert_ptr,  # [N_pad // block_m] int32 (out): expert of each block, -1 past the used rows
    scale_ptr,  # [N_pad * n_groups] float32 (out, padding rows only: 0); n_groups 0: unused
    P,
    E,
    N_pad,
    block_m,
    k,
    experts_per_prog,  # experts whose padding and blocks each program writes
    rows_per_prog,  # unused tail rows each program writes (at most)
    n_groups,  # fp8 scales per row (0 without fp8)
    BLOCK_P: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rows per store step
):
    """grid (n_place,), n_place >= n_blocks: programs past the blocks place no pairs"""
    i_b = tl.program_id(0)
    o_e = tl.arange(0, BLOCK_E)
    m_e = o_e < E
    # first row of this block's pairs of each expert
    o_i = i_b.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    m_i = o_i < P
    # a program past the blocks of pairs (only experts and rows to write) reads no block row
    m_eb = m_e & (tl.zeros([BLOCK_E], tl.int64) + i_b.to(tl.int64) * BLOCK_P < P)
    b_base = tl.load(offsets_ptr + o_e, mask=m_eb, other=0) + tl.load(
        before_ptr + i_b.to(tl.int64) * E + o_e, mask=m_eb, other=0)  # [BE]
    b_id = tl.load(ids_ptr + o_i, mask=m_i, other=-1)
    m_ok = m_i & (b_id >= 0) & (b_id < E)
    b_e = tl.where(m_ok, b_id, 0).to(tl.int32)
    b_row = tl.gather(b_base, b_e, 0) + tl.load(slot_ptr + o_i, mask=m_ok, other=0)
    tl.store(slot_ptr + o_i, tl.where(m_ok, b_row, -1), mask=m_i)
    tl.store(src_ptr + b_row.to(tl.int64), (o_i // k).to(tl.int32), mask=m_ok)

    # this program's experts: padding rows (src_token -1, scales 0) and block_expert
    e_lo = i_b * experts_per_prog
    e_hi = tl.minimum(e_lo + experts_per_prog, E)
    for e in range(e_lo, e_hi):
        start = tl.load(offsets_ptr + e)
        real_end = start + tl.load(counts_ptr + e)
        end = tl.load(offsets_ptr + e + 1)
        _fill_range(src_ptr, real_end, end, -1, BLOCK_R)
        _fill_range(scale_ptr, real_end.to(tl.int64) * n_groups, end.to(tl.int64) * n_groups, 0.0, BLOCK_R)
        _fill_range(block_expert_ptr, start // block_m, end // block_m, e, BLOCK_R)
    # this program's share of the rows past the used ones
    n_used = tl.load(offsets_ptr + E)
    lo = tl.minimum(n_used + i_b * rows_per_prog, N_pad)
    hi = tl.minimum(lo + rows_per_prog, N_pad)
    _fill_range(src_ptr, lo, hi, -1, BLOCK_R)
    _fill_range(scale_ptr, lo.to(tl.int64) * n_groups, hi.to(tl.int64) * n_groups, 0.0, BLOCK_R)
    # used rows end on a block boundary, so the tail's blocks are [lo/bm, ceil(hi/bm))
    _fill_range(block_expert_ptr, (lo + block_m - 1) // block_m, (hi + block_m - 1) // block_m, -1, BLOCK_R)


@triton.jit
def _round_to_e4m3(x, fp8_max):
    """fp32 x rounded to the nearest float8 e4m3 value (ties to even), saturated at fp8_max.

    The cast that follows is then exact. Why not cast directly: the interpreter's fp8
    rounding (triton 3.9) loses the carry into the exponent (127.9 -> 64), and with the
    rounding done here the interpreter and the GPU agree bit for bit.
    """
    # NaN stays NaN (tl.minimum/maximum would drop it, turning it into -fp8_max)
    x = tl.clamp(x, -fp8_max, fp8_max, propagate_nan=tl.PropagateNan.ALL)
    b_exp = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    # e4m3: 3 mantissa bits, smallest normal exponent -6 (below it the step stays 2^-9)
    b_ulp_exp = tl.maximum(b_exp, -6) - 3
    # c = 1.5 * 2^(ulp_exp + 23): the fp32 spacing at c is the e4m3 step at x, so x + c
    # rounds x to that step (ties to even, as fp32 addition does) and - c is exact.
    b_c = (((b_ulp_exp + 150) << 23) | (1 << 22)).to(tl.float32, bitcast=True)
    return (x + b_c) - b_c


@triton.jit
def _scatter_kernel(
    x_ptr,  # [N_t, d] float (any strides)
    slot_ptr,  # [N_t, k] int32 contiguous: row of pair (t, j), -1 = not routed
    out_ptr,  # [N_pad, d] x's dtype, or float8_e4m3fn when QUANT; contiguous
    scale_ptr,  # [N_pad, d // BLOCK_D] float32 (QUANT only): x ~= out * scale
    N_t,
    d,
    stride_xt,
    stride_xd,
    stride_om,
    stride_sm,
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_D: tl.constexpr,  # columns per program; QUANT: the scale group (128)
    QUANT: tl.constexpr,
    FP8_MAX: tl.constexpr,  # largest finite fp8 value (448.0 for e4m3fn)
    K: tl.constexpr,  # experts per token (unrolled: the k slot loads are in flight at once)
):
    """grid (cdiv(N_t, BLOCK_T), cdiv(d, BLOCK_D)): each row tile read once, stored k times."""
    i_t = tl.program_id(0)
    i_d = tl.program_id(1)
    o_t = i_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    o_d = i_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_t = o_t < N_t
    m_d = o_d < d
    p_x = x_ptr + o_t[:, None] * stride_xt + o_d[None, :] * stride_xd
    b_x = tl.load(p_x, mask=m_t[:, None] & m_d[None, :], other=0.0)  # [BT, BD]
    if QUANT:
        b_xf = b_x.to(tl.float32)
        # per token and 128 columns, as DeepEP: the group's absolute max maps to fp8_max
        # (floored so that an all-zero group gets a finite scale). div_rn: IEEE division,
        # as torch's; a plain `/` compiles to an approximate division on NVIDIA GPUs.
        b_amax = tl.maximum(tl.max(tl.abs(b_xf), axis=1), 1e-4)  # [BT]
        # tl.max and tl.maximum drop NaN; torch's amax and clamp keep it: a group holding a
        # NaN gets scale NaN (so every value of it dequantizes to NaN), as in torch. An
        # infinity needs nothing: scale inf, finite values 0, the infinity inf/inf = NaN.
        b_nan = tl.max((b_xf != b_xf).to(tl.int32), axis=1) > 0
        b_amax = tl.where(b_nan, float("nan"), b_amax)
        b_scale = tl.math.div_rn(b_amax, tl.full([BLOCK_T], FP8_MAX, tl.float32))
        b_q = tl.math.div_rn(b_xf, tl.broadcast_to(b_scale[:, None], [BLOCK_T, BLOCK_D]))
        b_out = _round_to_e4m3(b_q, FP8_MAX).to(tl.float8e4nv)
        # NaN written as e4m3's NaN bits (0x7F), as torch: the interpreter's cast of a NaN
        # gives 384, the GPU's saturating cast is not documented to keep it
        b_nan8 = tl.full([BLOCK_T, BLOCK_D], 0x7F, tl.int8).to(tl.float8e4nv, bitcast=True)
        b_out = tl.where(b_q != b_q, b_nan8, b_out)
    else:
        b_out = b_x
    for j in tl.static_range(K):
        b_s = tl.load(slot_ptr + o_t * K + j, mask=m_t, other=-1).to(tl.int64)  # [BT]
        m_s = b_s >= 0
        p_o = out_ptr + b_s[:, None] * stride_om + o_d[None, :]
        tl.store(p_o, b_out, mask=m_s[:, None] & m_d[None, :])
        if QUANT:
            tl.store(scale_ptr + b_s * stride_sm + i_d, b_scale, mask=m_s)


@triton.jit
def _combine_kernel(
    y_ptr,  # [N_pad, d] expert outputs (float, any strides)
    slot_ptr,  # [N_t, k] int32 contiguous: row of pair (t, j), -1 = contributes nothing
    w_ptr,  # [N_t, k] float contiguous: routing weights
    out_ptr,  # [N_t, d] (out) contiguous
    N_t,
    d,
    stride_ym,
    stride_yd,
    stride_ot,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    K: tl.constexpr,  # experts per token (unrolled: the k row gathers are in flight at once)
):
    """grid (cdiv(N_t, BLOCK_T), cdiv(d, BLOCK_D)): out[t] = sum_j w[t,j] * y[slot[t,j]].

    A gather, not a scatter-add: each output element is summed by one program in j order,
    in fp32, so the result is the same on every run and every device (no atomics).
    """
    i_t = tl.program_id(0)
    i_d = tl.program_id(1)
    o_t = i_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    o_d = i_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_t = o_t < N_t
    m_d = o_d < d
    b_acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(K):
        b_s = tl.load(slot_ptr + o_t * K + j, mask=m_t, other=-1).to(tl.int64)  # [BT]
        b_w = tl.load(w_ptr + o_t * K + j, mask=m_t, other=0.0).to(tl.float32)  # [BT]
        m_s = b_s >= 0
        p_y = y_ptr + b_s[:, None] * stride_ym + o_d[None, :] * stride_yd
        b_y = tl.load(p_y, mask=m_s[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        # where(), not a multiply by a zero weight: a -1 slot adds exactly nothing
        b_acc += tl.where(m_s[:, None], b_w[:, None] * b_y, 0.0)
    p_o = out_ptr + o_t[:, None] * stride_ot + o_d[None, :]
    tl.store(p_o, b_acc.to(out_ptr.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])
