"""Combine kernel against the plain reference: named edge cases, dtypes, errors, properties.

Interpreter on CPU (conftest), or compiled on a GPU with MOELAB_GPU_TESTS=1. Outputs are
poisoned (NaN) before every run, and padding rows of the expert outputs are NaN too:
combine must never read them.
"""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.kernels.combine import combine
from moelab.kernels.reference import combine_reference, dispatch_reference
from moelab.kernels.tuned import CombineConfig

ON_GPU = bool(os.environ.get("MOELAB_GPU_TESTS")) and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

# dtype -> (rtol, atol) against the fp64 reference: one rounding of the fp32 sum to the
# output dtype (the interpreter of triton 3.9 truncates fp32 -> bf16: up to one bf16 step)
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}


pytestmark = pytest.mark.usefixtures("poisoned_allocations")


def make_case(n_tokens, d, k, E, block_m=4, drop=0.0, dtype=torch.float32, seed=0, device=DEVICE):
    """A layout from the reference, expert outputs with NaN in every padding row, weights."""
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.rand(n_tokens, E, generator=g, device=device).argsort(dim=1)[:, :k]
    ids[torch.rand(n_tokens, k, generator=g, device=device) < drop] = -1
    ids = ids.to(torch.int32)
    lay = dispatch_reference(torch.zeros(n_tokens, 1, device=device), ids, E, block_m)
    y = torch.randn(lay.n_pad, d, generator=g, device=device).to(dtype)
    y[lay.src_token < 0] = float("nan")  # combine must never read a padding row
    w = torch.rand(n_tokens, k, generator=g, device=device)
    return lay, y, w


SMALL = CombineConfig(block_t=2, block_d=16)  # several programs along both axes


@pytest.mark.parametrize(
    "n_tokens, d, k, E, drop, dtype, config",
    [
        (0, 32, 2, 4, 0.0, torch.float32, None),  # N_t = 0: empty output
        (1, 32, 2, 4, 0.0, torch.float32, None),  # one token
        (3, 32, 1, 8, 0.0, torch.bfloat16, SMALL),  # k = 1, N_t < block_m
        (20, 48, 5, 5, 0.0, torch.float32, SMALL),  # k = E, d not a power of two
        (37, 32, 3, 13, 0.3, torch.float32, SMALL),  # prime E, slots of -1
        (16, 32, 2, 4, 1.0, torch.float32, None),  # every slot -1: zeros
        (40, 64, 4, 16, 0.2, torch.bfloat16, None),  # bf16 expert outputs
        (40, 64, 4, 16, 0.2, torch.float16, SMALL),  # fp16 expert outputs
    ],
)
def test_combine_matches_reference(n_tokens, d, k, E, drop, dtype, config, device):
    lay, y, w = make_case(n_tokens, d, k, E, drop=drop, dtype=dtype, device=device)
    out = combine(y, lay, w, config=config)
    assert out.shape == (n_tokens, d) and out.dtype == dtype
    want = combine_reference(y, lay, w)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out, want, rtol=rtol, atol=atol)


def test_out_dtype_and_non_contiguous(device):
    # expert outputs as every other column of a wider tensor; weights transposed twice
    lay, y, w = make_case(23, 64, 3, 7, drop=0.2, device=device)
    y_nc = torch.cat([y, y], dim=1)[:, ::2]
    w_nc = w.t().contiguous().t()
    assert not y_nc.is_contiguous() and not w_nc.is_contiguous()
    out = combine(y_nc, lay, w_nc, out_dtype=torch.bfloat16, config=SMALL)
    assert out.dtype == torch.bfloat16
    want = combine_reference(y_nc, lay, w, out_dtype=torch.bfloat16)
    rtol, atol = TOL[torch.bfloat16]
    torch.testing.assert_close(out, want, rtol=rtol, atol=atol)


def test_fp32_accumulation(device):
    # bf16 inputs whose running bf16 sum would lose the small terms; fp32 keeps them
    lay, y, w = make_case(8, 32, 8, 8, dtype=torch.bfloat16, device=device)
    y = torch.where(lay.src_token[:, None] >= 0, torch.ones_like(y), y)
    w = torch.full_like(w, 1.0)
    w[:, 0] = 256.0  # 256 + 7 * 1 = 263 in fp32; a bf16 running sum would stay at 256
    out = combine(y, lay, w, out_dtype=torch.float32)
    assert (out == 263.0).all()


def test_deterministic(device):
    lay, y, w = make_case(48, 32, 4, 8, drop=0.1, device=device)
    a = combine(y, lay, w, config=SMALL)
    b = combine(y, lay, w, config=SMALL)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ("rows", ValueError, "expert_out: .* rows"),  # not N_pad rows
        ("weights_shape", ValueError, "topk_weights: expected shape"),
        ("weights_dtype", TypeError, "topk_weights: dtype"),
        ("out_int", TypeError, "expert_out: dtype"),
        ("out_1d", ValueError, "expert_out: expected"),
    ],
)
def test_bad_input_raises(change, error, match, device):
    lay, y, w = make_case(6, 32, 2, 4, device=device)
    if change == "rows":
        y = y[:-1]
    elif change == "weights_shape":
        w = w[:, :1]
    elif change == "weights_dtype":
        w = w.to(torch.int32)
    elif change == "out_int":
        y = y.to(torch.int32)
    elif change == "out_1d":
        y = y[:, 0]
    with pytest.raises(error, match=match):
        combine(y, lay, w)


@settings(max_examples=8 if ON_GPU else 30, deadline=None)
@given(
    n_tokens=st.integers(0, 30),
    k=st.integers(1, 4),
    extra_experts=st.integers(0, 9),
    drop=st.sampled_from([0.0, 0.3, 1.0]),
    block_t=st.sampled_from([1, 2, 8]),
    seed=st.integers(0, 2**16),
)
def test_combine_property(n_tokens, k, extra_experts, drop, block_t, seed):
    """Any routing, any tile: the kernel equals the fp64 reference to fp32 rounding."""
    lay, y, w = make_case(n_tokens, 16, k, k + extra_experts, drop=drop, seed=seed)
    out = combine(y, lay, w, config=CombineConfig(block_t=block_t, block_d=16))
    torch.testing.assert_close(out, combine_reference(y, lay, w), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="full-size case runs compiled on a GPU (MOELAB_GPU_TESTS=1)")
def test_full_size_r1_prefill():
    # DeepSeek-R1 prefill: 4096 tokens x 7168, top-8 of 256, bf16 expert outputs
    lay, y, w = make_case(4096, 7168, 8, 256, block_m=64, drop=0.01, dtype=torch.bfloat16)
    out = combine(y, lay, w)
    rtol, atol = TOL[torch.bfloat16]
    torch.testing.assert_close(out, combine_reference(y, lay, w), rtol=rtol, atol=atol)
