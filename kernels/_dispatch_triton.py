"""Triton kernels of dispatch and combine (launchers: dispatch.py and combine.py).

The token-expert pairs are numbered i = t*k + j (token order, then j order); every row
order below follows that numbering, so the layout never depends on atomics or on the
order in which programs run.

Dispatch is two or three launches:
1. `_histogram_kernel` (skipped when one block holds all pairs): pairs per expert in each
   block of BLOCK_P consecutive pairs -> hist [n_blocks, E].
2. `_route_kernel`: every program reads the (small) hist, so it knows the counts, the
   block-padded exclusive scan over experts (offsets) and how many pairs of each expert
   come before its own block. It then sorts its block's pairs by (expert, i) and each
   pair's row is `offsets[e] + pairs of e in earlier blocks + rank of i among the
   block's pairs of e`. It also writes -1 into src_token for the padding rows of its
   share of the rows and fills block_expert.
3. `_scatter_kernel`: each token row read once, written to its k rows (fp8 optional).
Combine is one launch, `_combine_kernel`: a gather-sum per token tile.

`python -m moelab.kernels.compile_check` lowers all of them for sm_90 without a GPU.
"""

import triton
import triton.language as tl


# Sizes are not specialized (no recompilation per value: the routing kernel's sort takes
# seconds to compile, and these kernels gain nothing from knowing a size divides by 16).
@triton.jit(do_not_specialize=["P", "E"])
def _histogram_kernel(
    ids_ptr,  # [P] int32|int64: topk_ids flattened, pair i = t*k + j; -1 = not routed
    hist_ptr,  # [n_blocks, E] int32 (out): pairs of each block routed to each expert
    P,
    E,
    BLOCK_P: tl.constexpr,  # pairs per program (power of two)
    BLOCK_E: tl.constexpr,  # power of two > E: bin BLOCK_E-1 collects the -1 ids
):
    """grid (n_blocks,) = (cdiv(P, BLOCK_P),)"""
    i_b = tl.program_id(0)
    o_p = i_b.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    b_id = tl.load(ids_ptr + o_p, mask=o_p < P, other=-1)
    # -1 ids and lanes past P land in the spare bin BLOCK_E-1 (>= E), which is not stored.
    b_e = tl.where(b_id >= 0, b_id, BLOCK_E - 1).to(tl.int32)
    b_h = tl.histogram(b_e, BLOCK_E)  # [BE]
    o_e = tl.arange(0, BLOCK_E)
    tl.store(hist_ptr + i_b.to(tl.int64) * E + o_e, b_h, mask=o_e < E)


@triton.jit(do_not_specialize=["P", "E", "N_pad", "block_m", "k", "n_blocks", "rows_per_prog"])
def _route_kernel(
    ids_ptr,  # [P] int32|int64: topk_ids flattened
    hist_ptr,  # [n_blocks, E] int32: from _histogram_kernel (unused when ONE_BLOCK)
    table_ptr,  # [n_blocks, 3, BLOCK_E] int32 scratch: each program's own gather tables
    counts_ptr,  # [E] int32 (out, program 0)
    offsets_ptr,  # [E+1] int32 (out, program 0)
    slot_ptr,  # [P] int32 (out): row of pair i, -1 where the id is -1
    src_ptr,  # [N_pad] int32 (out): token of each row, -1 for padding rows
    block_expert_ptr,  # [N_pad // block_m] int32 (out): expert of each block, -1 past the used rows
    P,
    E,
    N_pad,
    block_m,
    k,
    n_blocks,
    rows_per_prog,  # rows of src_token/block_expert each program classifies (multiple of BLOCK_R)
    BLOCK_P: tl.constexpr,  # pairs per program (power of two), same as the histogram's
    BLOCK_E: tl.constexpr,  # power of two > E
    LOG2_BLOCK_E: tl.constexpr,
    BLOCK_B: tl.constexpr,  # hist rows read per step
    BLOCK_R: tl.constexpr,  # rows classified per step
    ONE_BLOCK: tl.constexpr,  # n_blocks == 1: count the block here, no histogram launch
):
    """grid (n_blocks,)"""
    i_b = tl.program_id(0)
    o_e = tl.arange(0, BLOCK_E)
    m_e = o_e < E
    o_p = tl.arange(0, BLOCK_P)
    o_i = i_b.to(tl.int64) * BLOCK_P + o_p
    m_i = o_i < P
    b_id = tl.load(ids_ptr + o_i, mask=m_i, other=-1)
    # -1 ids and lanes past P get the expert BLOCK_E-1 (>= E): counted nowhere, sorted last.
    b_e = tl.where(b_id >= 0, b_id, BLOCK_E - 1).to(tl.int32)

    # 1. counts, pairs of each expert before this block, and this block's own pairs
    if ONE_BLOCK:
        b_own = tl.where(m_e, tl.histogram(b_e, BLOCK_E), 0)  # [BE]
        b_count = b_own
        b_before = tl.zeros([BLOCK_E], dtype=tl.int32)
    else:
        b_count = tl.zeros([BLOCK_E], dtype=tl.int32)
        b_before = tl.zeros([BLOCK_E], dtype=tl.int32)
        for b0 in range(0, n_blocks, BLOCK_B):
            o_b = b0 + tl.arange(0, BLOCK_B)
            p_h = hist_ptr + o_b.to(tl.int64)[:, None] * E + o_e[None, :]
            b_h = tl.load(p_h, mask=(o_b < n_blocks)[:, None] & m_e[None, :], other=0)  # [BB, BE]
            b_count += tl.sum(b_h, axis=0)
            b_before += tl.sum(tl.where((o_b < i_b)[:, None], b_h, 0), axis=0)
        b_own = tl.load(hist_ptr + i_b.to(tl.int64) * E + o_e, mask=m_e, other=0)

    # 2. block-padded exclusive scan over experts: offsets[e] = sum_{e' < e} ceil(c/bm)*bm
    b_pad = (b_count + block_m - 1) // block_m * block_m
    b_end = tl.cumsum(b_pad, axis=0)  # offsets[e+1]
    b_start = b_end - b_pad  # offsets[e]
    n_used = tl.sum(b_pad, axis=0)
    if i_b == 0:
        tl.store(counts_ptr + o_e, b_count, mask=m_e)
        tl.store(offsets_ptr + 1 + o_e, b_end, mask=m_e)
        tl.store(offsets_ptr + o_e, b_start, mask=o_e == 0)

    # 3. gather tables (a register vector cannot be indexed by data, global memory can):
    #    base[e]  = row of this block's first pair of e, minus its sorted position;
    #    start[e] = offsets[e] and real_end[e] = offsets[e] + counts[e] (padding test),
    #    past E: a huge start so that the binary search never picks them.
    b_first = tl.cumsum(b_own, axis=0) - b_own  # sorted position of the block's first pair of e
    p_table = table_ptr + i_b.to(tl.int64) * (3 * BLOCK_E)
    tl.store(p_table + o_e, b_start + b_before - b_first)
    tl.store(p_table + BLOCK_E + o_e, tl.where(m_e, b_start, 2147483647))
    tl.store(p_table + 2 * BLOCK_E + o_e, b_start + b_count)
    # The stores above must be visible to every thread of this program before the gathers.
    tl.debug_barrier()

    # 4. slots: sort the block's pairs by (expert, pair index); position p in that order
    #    minus the position of the expert's first pair is the rank within the expert.
    b_sorted = tl.sort(b_e * BLOCK_P + o_p)  # [BP]
    b_se = b_sorted // BLOCK_P
    b_sp = b_sorted % BLOCK_P
    m_s = b_se < E
    b_row = tl.load(p_table + b_se, mask=m_s, other=0) + o_p
    o_pair = i_b.to(tl.int64) * BLOCK_P + b_sp
    tl.store(slot_ptr + o_pair, b_row, mask=m_s)
    tl.store(src_ptr + b_row.to(tl.int64), (o_pair // k).to(tl.int32), mask=m_s)
    tl.store(slot_ptr + o_i, tl.full([BLOCK_P], -1, tl.int32), mask=m_i & (b_id < 0))

    # 5. this program's share of the rows: -1 in src_token for padding, block_expert.
    for r0 in range(0, rows_per_prog, BLOCK_R):
        o_r = i_b * rows_per_prog + r0 + tl.arange(0, BLOCK_R)
        m_r = o_r < N_pad
        # binary search: the last expert whose group starts at or before the row
        b_lo = tl.zeros([BLOCK_R], dtype=tl.int32)
        for s in tl.static_range(LOG2_BLOCK_E):
            b_cand = b_lo + (BLOCK_E >> (s + 1))  # steps BLOCK_E/2, BLOCK_E/4, ..., 1
            b_v = tl.load(p_table + BLOCK_E + b_cand, mask=b_cand < BLOCK_E, other=2147483647)
            b_lo = tl.where(b_v <= o_r, b_cand, b_lo)
        b_real_end = tl.load(p_table + 2 * BLOCK_E + b_lo)
        tl.store(src_ptr + o_r, tl.full([BLOCK_R], -1, tl.int32), mask=m_r & (o_r >= b_real_end))
        b_blk = tl.where(o_r < n_used, b_lo, -1)
        tl.store(block_expert_ptr + o_r // block_m, b_blk, mask=m_r & (o_r % block_m == 0))


@triton.jit
def _round_to_e4m3(x, fp8_max):
    """fp32 x rounded to the nearest float8 e4m3 value (ties to even), saturated at fp8_max.

    The cast that follows is then exact. Why not cast directly: the interpreter's fp8
    rounding (triton 3.9) loses the carry into the exponent (127.9 -> 64), and with the
    rounding done here the interpreter and the GPU agree bit for bit.
    """
    x = tl.minimum(tl.maximum(x, -fp8_max), fp8_max)
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
        b_scale = tl.math.div_rn(b_amax, tl.full([BLOCK_T], FP8_MAX, tl.float32))
        b_q = tl.math.div_rn(b_xf, tl.broadcast_to(b_scale[:, None], [BLOCK_T, BLOCK_D]))
        b_out = _round_to_e4m3(b_q, FP8_MAX).to(tl.float8e4nv)
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
