"""Dispatch kernels against the plain reference: named edge cases, errors, properties.

Runs the Triton kernels in the interpreter on CPU (conftest), or compiled on a GPU with
MOELAB_GPU_TESTS=1 (ci/gpu-check), where the full-size case marked `gpu` runs too.
Every kernel output is poisoned before the run (NaN / -7777), so an element the kernel
should have written but did not fails the comparison.
"""

import os
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.kernels.combine import combine
from moelab.kernels.dispatch import (
    DispatchLayout,
    dispatch,
    padded_rows,
    route,
    used_experts,
    validate,
)
from moelab.kernels.reference import (
    dequantize_fp8_reference,
    dispatch_reference,
    quantize_fp8_reference,
)
from moelab.kernels.tuned import DispatchConfig

ON_GPU = bool(os.environ.get("MOELAB_GPU_TESTS")) and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# compiled, every new shape specialization costs a compile: fewer examples on the GPU
MAX_EXAMPLES = 8 if ON_GPU else 40
INT_FIELDS = ("counts", "offsets", "src_token", "slot", "block_expert")


pytestmark = pytest.mark.usefixtures("poisoned_allocations")


def make_ids(n_tokens, k, E, kind="topk", seed=0, device=DEVICE, dtype=torch.int32):
    """Routings: distinct experts per token (top-k), all to expert 0, or with dropped pairs."""
    g = torch.Generator().manual_seed(seed)
    if kind == "one":
        ids = torch.zeros(n_tokens, k, dtype=torch.int64)
    else:
        ids = torch.rand(n_tokens, E, generator=g).argsort(dim=1)[:, :k]
        if kind == "none":  # no pair routed here
            ids[:] = -1
        if kind == "drop":  # about a third of the pairs not routed here
            ids[torch.rand(n_tokens, k, generator=g) < 0.35] = -1
        if kind == "few":  # empty experts: only experts 0, 3 and E-1 used
            choices = torch.tensor([0, 3 % E, E - 1])
            ids = choices[torch.randint(0, 3, (n_tokens, k), generator=g)]
    return ids.to(dtype).to(device)


def check_layout(got: DispatchLayout, hidden, topk_ids, E, block_m, quantize_fp8=False):
    """The integer layout equals the reference exactly; meaningful rows equal the sources."""
    ref = dispatch_reference(hidden, topk_ids, E, block_m, quantize_fp8)
    for name in INT_FIELDS:
        a, b = getattr(got, name), getattr(ref, name)
        assert a.dtype == torch.int32, name
        assert torch.equal(a, b), f"{name}: {a.tolist()} != {b.tolist()}"
    assert got.hidden.shape == (padded_rows(*topk_ids.shape, E, block_m), hidden.shape[1])
    rows = got.src_token >= 0
    if quantize_fp8:
        assert got.hidden.dtype == torch.float8_e4m3fn
        torch.testing.assert_close(got.scales[rows], ref.scales[rows], rtol=1e-6, atol=0)
        # fp8 round trip: within half an e4m3 step (2^-4 relative) of the source rows
        x = hidden[got.src_token[rows].long()].float()
        back = dequantize_fp8_reference(got.hidden[rows], got.scales[rows])
        step = got.scales[rows].repeat_interleave(128, dim=1)
        assert ((back - x).abs() <= x.abs() * 2**-4 + step * 2**-9 + 1e-12).all()
        if not ON_GPU:  # same rounding rule as torch: equal values (a -0 may come out as +0)
            assert torch.equal(got.hidden[rows].float(), ref.hidden[rows].float())
    else:
        assert got.hidden.dtype == hidden.dtype
        # a permutation copies bits: compare exactly
        assert torch.equal(got.hidden[rows], ref.hidden[rows])
    return ref


# small routing blocks: several programs of the routing kernel, so the histogram launch and
# the scan over blocks run even at these small shapes
MULTI = DispatchConfig(block_p=32, block_b=2, block_r=16, block_t=2, block_d=16)


@pytest.mark.parametrize(
    "n_tokens, d, k, E, block_m, kind, dtype, config",
    [
        (0, 32, 2, 4, 4, "topk", torch.float32, None),  # N_t = 0: nothing routed
        (1, 32, 2, 4, 4, "topk", torch.float32, None),  # one token
        (3, 32, 2, 8, 16, "topk", torch.bfloat16, None),  # N_t < block_m
        (40, 32, 3, 13, 8, "topk", torch.float32, MULTI),  # prime E, several routing blocks
        (40, 48, 1, 8, 4, "topk", torch.bfloat16, MULTI),  # k = 1, d not a power of two
        (20, 32, 7, 7, 4, "topk", torch.float32, MULTI),  # k = E: every token to every expert
        (30, 32, 4, 5, 8, "one", torch.float32, MULTI),  # all pairs to one expert (duplicates)
        (10, 32, 2, 64, 4, "topk", torch.bfloat16, None),  # mostly empty experts (E >> pairs)
        (33, 32, 3, 9, 4, "few", torch.float32, MULTI),  # empty experts between used ones
        (50, 32, 4, 16, 8, "drop", torch.bfloat16, MULTI),  # ids of -1 (dropped / remote)
        (17, 32, 3, 6, 1, "drop", torch.float32, None),  # block_m = 1: no padding at all
        (12, 32, 2, 6, 4, "none", torch.float32, MULTI),  # every id -1: all rows padding
        (24, 64, 2, 256, 64, "topk", torch.bfloat16, None),  # E = 256 and block_m = 64 as R1
    ],
)
def test_dispatch_matches_reference(n_tokens, d, k, E, block_m, kind, dtype, config, device):
    hidden = torch.randn(n_tokens, d, dtype=dtype, device=device)
    ids = make_ids(n_tokens, k, E, kind, device=device)
    got = dispatch(hidden, ids, E, block_m, config=config)
    check_layout(got, hidden, ids, E, block_m)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_non_contiguous_inputs(ids_dtype, device):
    # hidden: every other column of a wider tensor; ids: a transposed view
    base = torch.randn(21, 80, device=device)
    hidden = base[:, ::2]
    ids = make_ids(21, 3, 11, "drop", device=device, dtype=ids_dtype).t().contiguous().t()
    assert not hidden.is_contiguous() and not ids.is_contiguous()
    got = dispatch(hidden, ids, 11, 4, config=MULTI)
    check_layout(got, hidden, ids, 11, 4)


@pytest.mark.parametrize("n_tokens, config", [(5, None), (37, MULTI)])
def test_fp8_dispatch(n_tokens, config, device):
    # rows with zeros, tiny and huge values: the scale floor and the saturation are exercised
    hidden = torch.randn(n_tokens, 256, dtype=torch.bfloat16, device=device)
    hidden[0] = 0
    hidden[1, :128] *= 1e-6
    hidden[-1, 5] = 1e4
    ids = make_ids(n_tokens, 2, 6, "drop", device=device)
    got = dispatch(hidden, ids, 6, 8, quantize_fp8=True, config=config)
    check_layout(got, hidden, ids, 6, 8, quantize_fp8=True)
    assert got.scales.shape == (got.n_pad, 2)


def test_ep_rank_grouping(device):
    E, R = 12, 4
    hidden = torch.randn(40, 32, device=device)
    ids = make_ids(40, 3, E, "drop", device=device)
    got = dispatch(hidden, ids, E, 4, ep_ranks=R, config=MULTI)
    ref = check_layout(got, hidden, ids, E, 4)
    rank_of = torch.arange(E, device=device) // (E // R)
    valid = ids >= 0
    want = torch.bincount(rank_of[ids[valid].long()], minlength=R)
    assert torch.equal(got.rank_counts, want.to(torch.int32))
    assert torch.equal(got.rank_offsets, ref.offsets[:: E // R])
    # every row of rank r's range holds a pair routed to one of rank r's experts
    for r in range(R):
        lo, hi = got.rank_offsets[r].item(), got.rank_offsets[r + 1].item()
        rows = torch.arange(lo, hi, device=device)
        rows = rows[got.src_token[lo:hi] >= 0]
        t = got.src_token[rows].long()
        hit = (ids[t].long() // (E // R) == r) & (got.slot[t] == rows[:, None])
        assert hit.any(dim=1).all()


def test_used_experts(device):
    ids = make_ids(33, 3, 9, "few", device=device)
    lay = route(ids, 9, 4, config=MULTI)
    want = torch.unique(ids[ids >= 0]).to(torch.int64)
    assert torch.equal(used_experts(lay.counts), want)
    assert torch.equal(lay.used_experts(), want)
    assert torch.equal(used_experts(lay), want)
    assert used_experts(lay.counts).dtype == torch.int64


def test_route_needs_no_hidden(device):
    ids = make_ids(19, 2, 5, "drop", device=device)
    lay = route(ids, 5, 4)
    ref = dispatch_reference(torch.zeros(19, 1, device=device), ids, 5, 4)
    assert lay.hidden is None
    for name in INT_FIELDS:
        assert torch.equal(getattr(lay, name), getattr(ref, name)), name


def test_deterministic(device):
    hidden = torch.randn(24, 32, device=device)
    ids = make_ids(24, 4, 8, "topk", device=device)
    a = dispatch(hidden, ids, 8, 8, config=MULTI)
    b = dispatch(hidden, ids, 8, 8, config=MULTI)
    for name in INT_FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name))


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", [-2, -1000, 6, 31, 32, 1000, 2**31 - 1])
def test_out_of_range_ids_are_flagged_not_routed(bad_id, device):
    """E = 6 gives BLOCK_E = 32: ids in [6, 32), at 32 and far past it all behave alike
    (compiled, a histogram bin takes the id's low bits; so they are masked before it)."""
    E = 6
    ids = make_ids(9, 2, E, device=device)
    ids[2, 1] = bad_id
    ids[7, 0] = bad_id
    hidden = torch.randn(9, 32, device=device)
    lay = dispatch(hidden, ids, E, 4, config=MULTI)  # no raise, no host sync
    as_dropped = torch.where((ids >= -1) & (ids < E), ids, -1)
    check_layout(lay, hidden, as_dropped, E, 4)  # the bad pairs are not routed
    assert lay.bad_ids.tolist() == [2]  # two bad ids were counted on the device
    with pytest.raises(ValueError, match=r"topk_ids: 2 ids outside \[-1, 6\)"):
        validate(lay)
    with pytest.raises(ValueError, match=r"topk_ids: ids must lie in \[-1, 6\)"):
        dispatch(hidden, ids, E, 4, check_ids=True)  # the host check, on request


def test_validate_passes_good_ids(device):
    ids = make_ids(9, 2, 6, "drop", device=device)
    lay = route(ids, 6, 4)
    assert validate(lay) is lay and lay.bad_ids.tolist() == [0]


@pytest.mark.skipif(ON_GPU, reason="counts the loads of the Triton interpreter")
def test_routing_loads_grow_linearly(monkeypatch):
    """Global loads of the routing programs, counted through the interpreter's load: with
    the pairs doubled twice (4, 8, 16 routing blocks), each doubling adds the same number
    of loads per added pair. Re-reading every block's counts in every program (the old
    O(n_blocks^2 E) routing) adds 4x then 16x the block term and fails this."""
    from triton.runtime import interpreter

    loaded = []
    original = interpreter.InterpreterBuilder.create_masked_load

    def counting(self, ptrs, mask, *args):
        loaded[-1] += int(mask.data.sum())
        return original(self, ptrs, mask, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", counting)
    config = DispatchConfig(block_p=32, block_b=2)
    for n_tokens in (64, 128, 256):  # P = 128, 256, 512 pairs in blocks of 32
        ids = make_ids(n_tokens, 2, 8, "topk", device="cpu")  # no -1: loads fixed by shape
        loaded.append(0)
        route(ids, 8, 4, config=config)
    a, b, c = loaded
    assert a > 0
    assert c - b == 2 * (b - a), loaded  # zero second difference: linear in the pairs
    assert c < 4 * a


def test_dispatch_and_combine_never_sync_with_the_host(monkeypatch, device):
    """The default path calls no .item(), .tolist(), .cpu() nor torch.cuda.synchronize:
    each raises here when called from moelab code (Triton's interpreter may copy)."""
    import sys

    def guard(name, original):
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("moelab"):
                raise AssertionError(f"host sync: {name} called from {caller}")
            return original(*args, **kwargs)

        return wrapper

    for name in ("item", "tolist", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", guard("synchronize", torch.cuda.synchronize))
    hidden = torch.randn(20, 256, device=device)
    ids = make_ids(20, 3, 8, "drop", device=device)
    ids[0, 0] = 99  # a bad id: flagged on the device, no raise and no sync
    w = torch.rand(20, 3, device=device)
    for fp8 in (False, True):
        lay = dispatch(hidden, ids, 8, 8, quantize_fp8=fp8, ep_ranks=2, config=MULTI)
        combine(lay.hidden.float() if fp8 else lay.hidden, lay, w)
    with pytest.raises(AssertionError, match="host sync: item"):
        validate(lay)  # the one place that reads the flag, when the caller chooses


def _poison_fp8_inputs(device):
    """Rows: a NaN in the first group, +inf, -inf, a whole row of NaN, a normal row."""
    hidden = torch.randn(5, 256, device=device)
    hidden[0, 3] = float("nan")
    hidden[1, 130] = float("inf")
    hidden[2, 7] = float("-inf")
    hidden[3] = float("nan")
    return hidden


# The interpreter evaluates the NaN rows' reductions in numpy, which warns about them:
# the NaN is the input under test, not a fault.
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
def test_fp8_non_finite_rows_match_torch(device):
    """NaN, +inf and -inf go through the fp8 quantization as in torch: a group with a NaN
    gets scale NaN and NaN values; one with an infinity scale inf, the infinity NaN
    (inf/inf), its finite values 0. The other groups are untouched."""
    hidden = _poison_fp8_inputs(device)
    ids = torch.tensor([[0], [1], [0], [1], [0]], dtype=torch.int32, device=device)
    lay = dispatch(hidden, ids, 2, 1, quantize_fp8=True)
    rows = lay.slot[:, 0].long()
    got_q, got_s = lay.hidden[rows].float(), lay.scales[rows]
    want_q, want_s = quantize_fp8_reference(hidden)
    assert torch.equal(got_s.isnan(), want_s.isnan()) and torch.equal(got_s.isinf(), want_s.isinf())
    finite = want_s.isfinite()
    torch.testing.assert_close(got_s[finite], want_s[finite], rtol=1e-6, atol=0)
    want_q = want_q.float()
    assert torch.equal(got_q.isnan(), want_q.isnan())
    assert torch.equal(got_q[~want_q.isnan()], want_q[~want_q.isnan()])
    # spelled out for row 1 (+inf at column 130, group 1): scale inf, the inf NaN, rest 0
    assert got_s[1, 1] == float("inf") and got_q[1, 130].isnan()
    assert (got_q[1, 128:130] == 0).all() and got_s[1, 0].isfinite()
    assert got_q[3].isnan().all() and got_s[3].isnan().all()  # the NaN row stays NaN


def test_fp8_padding_scales_are_zero(device):
    """Scales of padding rows are written (0), not left as allocated (NaN under poison)."""
    hidden = torch.randn(13, 256, device=device)
    ids = make_ids(13, 2, 5, "drop", device=device)
    lay = dispatch(hidden, ids, 5, 8, quantize_fp8=True, config=MULTI)
    padding = lay.src_token < 0
    assert padding.any()
    assert (lay.scales[padding] == 0).all()
    assert not lay.scales.isnan().any()


@pytest.mark.parametrize(
    "hidden_shape, hidden_dtype, ids, kwargs, error, match",
    [
        ((4, 32), torch.float32, torch.zeros(4, 2), {}, TypeError, "topk_ids: dtype"),  # float ids
        ((4, 32), torch.int32, torch.zeros(4, 2, dtype=torch.int32), {}, TypeError, "hidden: dtype"),
        ((4, 32), torch.float32, torch.zeros(8, dtype=torch.int32), {}, ValueError, "topk_ids: expected"),
        ((4, 32), torch.float32, torch.zeros(5, 2, dtype=torch.int32), {}, ValueError, "5 tokens"),
        ((4,), torch.float32, torch.zeros(4, 2, dtype=torch.int32), {}, ValueError, "hidden: expected"),
        ((4, 32), torch.float32, torch.zeros(4, 2, dtype=torch.int32), {"quantize_fp8": True},
         ValueError, "multiple of 128|d % 128"),  # fp8 needs whole 128-column groups
        ((4, 32), torch.float32, torch.zeros(4, 2, dtype=torch.int32), {"ep_ranks": 4},
         ValueError, "ep_ranks"),  # 6 experts do not split over 4 ranks
        ((4, 32), torch.float32, torch.zeros(4, 2, dtype=torch.int32), {"block_m": 0},
         ValueError, "block_m"),
    ],
)  # fmt: skip
def test_bad_input_raises(hidden_shape, hidden_dtype, ids, kwargs, error, match, device):
    hidden = torch.zeros(hidden_shape, dtype=hidden_dtype, device=device)
    with pytest.raises(error, match=match):
        dispatch(hidden, ids.to(device), 6, **kwargs)


# --- properties ---------------------------------------------------------------------------


@st.composite
def routings(draw):
    """Small routings: empty inputs, duplicate ids, -1 ids and empty experts allowed."""
    n_tokens = draw(st.integers(0, 40))
    E = draw(st.integers(1, 17))
    k = draw(st.integers(1, 4))
    block_m = draw(st.sampled_from([1, 2, 4, 8, 16]))
    flat = draw(st.lists(st.integers(-1, E - 1), min_size=n_tokens * k, max_size=n_tokens * k))
    ids = torch.tensor(flat, dtype=torch.int32).view(n_tokens, k).to(DEVICE)
    block_p = draw(st.sampled_from([32, 64, 1024]))  # 32/64: several routing programs
    config = DispatchConfig(block_p=block_p, block_b=2, block_r=16, block_t=4, block_d=16)
    seed = draw(st.integers(0, 2**16))
    return ids, E, block_m, config, seed


@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(routings())
def test_layout_properties(case):
    ids, E, block_m, config, seed = case
    n_tokens, k = ids.shape
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tokens, 16, generator=g).to(DEVICE)
    lay = dispatch(hidden, ids, E, block_m, config=config)
    ref = check_layout(lay, hidden, ids, E, block_m)  # layout equals the reference exactly

    valid = ids >= 0
    slot, src = lay.slot.long(), lay.src_token.long()
    offsets, counts = lay.offsets.long(), lay.counts.long()
    # offsets block-aligned, each group sized by its count, counts sum to the valid pairs
    assert (offsets % block_m == 0).all() and offsets[0] == 0
    assert torch.equal(offsets[1:] - offsets[:-1], (counts + block_m - 1) // block_m * block_m)
    assert counts.sum() == valid.sum()
    # slot is a bijection from the valid pairs onto the non-padding rows
    assert (slot[~valid] == -1).all()
    used_rows = slot[valid]
    assert used_rows.unique().numel() == used_rows.numel()
    assert torch.equal(used_rows.sort().values, torch.nonzero(src >= 0).flatten())
    # src_token and slot are mutually inverse
    t_of_pair = torch.arange(n_tokens, device=ids.device)[:, None].expand(n_tokens, k)
    assert torch.equal(src[used_rows], t_of_pair[valid])
    # rows of one expert keep (t, j) order; each row lies in its expert's group
    e = ids.long()[valid]
    assert ((used_rows >= offsets[e]) & (used_rows < offsets[e] + counts[e])).all()
    pair_index = torch.arange(n_tokens * k, device=ids.device).view(n_tokens, k)[valid]
    by_row = pair_index[used_rows.argsort()]
    assert (by_row[1:] > by_row[:-1])[e[used_rows.argsort()][1:] == e[used_rows.argsort()][:-1]].all()
    # permuted rows equal their source rows
    assert torch.equal(lay.hidden[used_rows], hidden[t_of_pair[valid]])
    assert ref.n_pad == lay.n_pad


@settings(max_examples=MAX_EXAMPLES // 2 + 5, deadline=None)
@given(routings())
def test_combine_of_dispatch_is_weighted_sum(case):
    """Identity experts: combine(dispatch(x)) = sum_j w[t,j] x_t over the routed pairs."""
    ids, E, block_m, config, seed = case
    n_tokens, k = ids.shape
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tokens, 16, generator=g).to(DEVICE)
    w = torch.rand(n_tokens, k, generator=g).to(DEVICE)
    lay = dispatch(hidden, ids, E, block_m, config=config)
    out = combine(lay.hidden, lay, w)
    want = hidden * torch.where(ids >= 0, w, 0.0).sum(1, keepdim=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


# --- full size, compiled (ci/gpu-check) ---------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="full-size case runs compiled on a GPU (MOELAB_GPU_TESTS=1)")
@pytest.mark.parametrize("quantize_fp8", [False, True])
def test_full_size_r1_prefill(quantize_fp8):
    # DeepSeek-R1 prefill: 4096 tokens x 7168, top-8 of 256, block_m 64
    n_tokens, d, k, E = 4096, 7168, 8, 256
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n_tokens, d, device="cuda", dtype=torch.bfloat16, generator=g)
    ids = torch.rand(n_tokens, E, device="cuda", generator=g).topk(k, dim=1).indices.to(torch.int32)
    ids[:7, 3] = -1  # a few dropped pairs
    lay = dispatch(hidden, ids, E, 64, quantize_fp8=quantize_fp8)
    check_layout(lay, hidden, ids, E, 64, quantize_fp8)
    if not quantize_fp8:
        w = torch.rand(n_tokens, k, device="cuda", generator=g)
        out = combine(lay.hidden, lay, w)
        want = hidden.float() * torch.where(ids >= 0, w, 0.0).sum(1, keepdim=True)
        torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU (MOELAB_GPU_TESTS=1)")
def test_dispatch_combine_replay_as_a_cuda_graph():
    """No host sync on the default path, so dispatch + combine capture into one graph;
    a replay on new inputs (copied into the captured buffers) gives their fresh result."""
    n_tokens, d, k, E = 256, 512, 8, 256
    x = torch.randn(n_tokens, d, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(n_tokens, E, device="cuda").topk(k, dim=1).indices.to(torch.int32)
    w = torch.rand(n_tokens, k, device="cuda")
    for _ in range(2):  # compile and warm the allocator outside the capture
        dispatch(x, ids, E, 64)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lay = dispatch(x, ids, E, 64)
        out = combine(lay.hidden, lay, w)
    x.copy_(torch.randn_like(x))
    ids.copy_(torch.rand(n_tokens, E, device="cuda").topk(k, dim=1).indices.to(torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    check_layout(lay, x, ids, E, 64)
    want = x.float() * w.sum(1, keepdim=True)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(ON_GPU, reason="the compiled tests above cover it on a GPU")
def test_kernels_compile_for_hopper():
    """The interpreter never lowers the kernels: compile them for sm_90 (no GPU needed)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "moelab.kernels.compile_check", "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("ok ") >= 10


def test_tuned_configs_are_data(tmp_path, monkeypatch):
    """A tuned/<device>.json entry replaces the defaults for its shape class; else defaults."""
    import json

    from moelab.kernels import tuned

    monkeypatch.setattr(tuned, "TUNED_DIR", tmp_path)
    tuned._load.cache_clear()
    entry = {"block_p": 64, "block_t": 2}
    (tmp_path / "cpu.json").write_text(json.dumps({"configs": {"dispatch:prefill": entry}}))
    try:
        got = tuned.dispatch_config(4096, 8, 256, 7168, False, "cpu")
        assert (got.block_p, got.block_t) == (64, 2)
        assert got.block_d == tuned.DEFAULTS["dispatch"].block_d  # untouched fields: defaults
        assert tuned.dispatch_config(8, 8, 256, 7168, False, "cpu").block_p == 1024  # decode
        assert tuned.combine_config(4096, 8, 7168, "cpu") == tuned.DEFAULTS["combine"]
        # and a dispatch with the tuned config still gives the reference layout
        ids = make_ids(40, 2, 6, "drop", device=DEVICE)
        hidden = torch.randn(40, 32, device=DEVICE)
        check_layout(dispatch(hidden, ids, 6, 4), hidden, ids, 6, 4)
    finally:
        tuned._load.cache_clear()


@pytest.mark.parametrize(
    "entry, field, message",
    [
        ({"dispatch:prefill": {"block_p": 100}}, "block_p",
         "must be a power of two in \\[32, 4096\\], got 100"),
        ({"dispatch:prefill": {"block_d": 0}}, "block_d", "must be a power of two in \\[16, 8192\\], got 0"),
        ({"combine:decode": {"num_warps": 3}}, "num_warps", "must be a power of two in \\[1, 32\\], got 3"),
        ({"combine:decode": {"num_stages": 99}}, "num_stages", "must be an integer in \\[1, 8\\], got 99"),
        ({"dispatch_fp8:small": {"block_t": "16"}}, "block_t",
         "must be a power of two in \\[1, 256\\], got '16'"),
        ({"dispatch:small": {"block_tt": 4}}, "block_tt", "unknown field"),
        ({"scatter:small": {"block_t": 4}}, None, "unknown entry"),
        ({"dispatch:huge": {"block_t": 4}}, None, "unknown entry"),
    ],
)  # fmt: skip
def test_tuned_files_are_validated_on_load(entry, field, message, tmp_path, monkeypatch):
    """One SpecError naming the file and the field, before any kernel sees the value."""
    import json

    from moelab.costmodel.specs import SpecError
    from moelab.kernels import tuned

    monkeypatch.setattr(tuned, "TUNED_DIR", tmp_path)
    tuned._load.cache_clear()
    (tmp_path / "cpu.json").write_text(json.dumps({"configs": entry}))
    key = next(iter(entry))
    where = f'{tmp_path / "cpu.json"}: configs["{key}"]' + (f".{field}" if field else "")
    try:
        with pytest.raises(SpecError, match=re.escape(where) + ": " + message):
            tuned.dispatch_config(4096, 8, 256, 7168, False, "cpu")
    finally:
        tuned._load.cache_clear()


def test_tuned_file_not_json(tmp_path, monkeypatch):
    from moelab.costmodel.specs import SpecError
    from moelab.kernels import tuned

    monkeypatch.setattr(tuned, "TUNED_DIR", tmp_path)
    tuned._load.cache_clear()
    (tmp_path / "cpu.json").write_text("{configs: ")
    try:
        with pytest.raises(SpecError, match="cpu.json: not valid JSON"):
            tuned.combine_config(8, 8, 7168, "cpu")
    finally:
        tuned._load.cache_clear()
