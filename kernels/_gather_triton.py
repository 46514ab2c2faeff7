"""Triton kernel: gather expert weight blocks into device slots, zero-copy from host memory.

The source is the host expert store: pinned (page-locked, cudaHostAlloc) memory is mapped
into the GPU's unified virtual address space, so the SMs load it straight over the host
link (PCIe or NVLink-C2C) and store into HBM: one pass, no staging copy, no copy engine.
The blocks are viewed as int32 words; every block starts 256-byte aligned and its stride
is a multiple of 16 words, so loads and stores vectorize to 128 bits.

How the host pointer reaches the kernel (`gather_blocks` tries these in order and
returns the one that worked; `moelab bench prefetch` reports it):
- "tensor": the pinned CPU tensor itself. Triton's launcher turns each pointer argument
  into a device pointer with cuPointerGetAttribute(CU_POINTER_ATTRIBUTE_DEVICE_POINTER),
  which succeeds for pinned memory (and equals the host pointer under UVA).
- "data_ptr": a small object with `data_ptr()` (the host pointer) and `dtype`, for a
  Triton whose Python side refuses CPU tensors.
- "cuda_view": a CUDA tensor aliasing the pinned memory, made by torch from a
  `__cuda_array_interface__` (the view vLLM builds for its UVA offload).
The first launch in a process checks that the route moved the right bytes (one host
synchronization) before it is kept; a route that raises or moves wrong bytes is skipped.
Under the interpreter (no GPU) everything is a CPU tensor: "interpreter".
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_blocks_kernel(
    src_ptr,  # [n_src, n_words] int32: expert blocks (pinned host memory or any memory)
    dst_ptr,  # [n_dst, n_words] int32: device slots
    src_idx_ptr,  # [n] int64: block read by pair i
    dst_idx_ptr,  # [n] int64: slot written by pair i
    n_words,
    stride_src,
    stride_dst,
    BLOCK: tl.constexpr,
):
    """grid = (cdiv(n_words, BLOCK), n): axis 0 walks a block's words (up to 2^31
    programs), axis 1 picks the (block, slot) pair (n <= 65535)."""
    i_w = tl.program_id(0)
    i_n = tl.program_id(1)
    # int64 before multiplying by strides: a layer's blocks exceed 2^31 words at full size.
    src = tl.load(src_idx_ptr + i_n).to(tl.int64)
    dst = tl.load(dst_idx_ptr + i_n).to(tl.int64)
    o_w = i_w.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    m_w = o_w < n_words
    b_x = tl.load(src_ptr + src * stride_src + o_w, mask=m_w)  # [BLOCK] over the host link
    tl.store(dst_ptr + dst * stride_dst + o_w, b_x, mask=m_w)


def gather_blocks_reference(src: torch.Tensor, src_idx, dst: torch.Tensor, dst_idx) -> None:
    """dst[dst_idx[i]] = src[src_idx[i]] for every i: the plain reference."""
    src_idx = torch.as_tensor(src_idx, dtype=torch.int64)
    dst_idx = torch.as_tensor(dst_idx, dtype=torch.int64)
    if src_idx.numel():
        dst[dst_idx.to(dst.device)] = src[src_idx.to(src.device)].to(dst.device)


class _HostPointer:
    """What Triton needs of a pointer argument: `data_ptr()` and `dtype`."""

    def __init__(self, t: torch.Tensor):
        self._t = t  # keeps the memory alive for as long as the launch may read it
        self.dtype = t.dtype

    def data_ptr(self) -> int:
        return self._t.data_ptr()


class _CudaArrayInterface:
    """A pinned CPU tensor presented as device memory (valid under UVA)."""

    _TYPESTR = {torch.int32: "<i4", torch.uint8: "|u1", torch.int64: "<i8"}

    def __init__(self, t: torch.Tensor):
        self._t = t
        self.__cuda_array_interface__ = {
            "shape": tuple(t.shape),
            "typestr": self._TYPESTR[t.dtype],
            "data": (t.data_ptr(), False),
            "strides": tuple(s * t.element_size() for s in t.stride()),
            "version": 2,
        }


def _cuda_view(t: torch.Tensor, device) -> torch.Tensor:
    return torch.as_tensor(_CudaArrayInterface(t), device=device)


# The host-pointer route that worked in this process (tried once, then reused).
_HOST_PATH: dict[str, str] = {}
HOST_PATHS = ("tensor", "data_ptr", "cuda_view")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def gather_blocks(
    src: torch.Tensor,
    src_idx: torch.Tensor,
    dst: torch.Tensor,
    dst_idx: torch.Tensor,
    *,
    block: int = 4096,
    num_warps: int = 8,
    host_path: str | None = None,
) -> str:
    """dst[dst_idx[i]] = src[src_idx[i]], rows of int32 words; returns the pointer route.

    src may live in pinned host memory (zero-copy read on a GPU) or on the device; the
    launch goes on the current stream. Index tensors must be int64 on the device of
    `dst` (on a GPU: a CUDA tensor, so that the launch needs no host synchronization).
    """
    # --- validate ---
    if src.dtype != torch.int32 or dst.dtype != torch.int32:
        raise TypeError(f"gather_blocks: int32 words expected, got {src.dtype} and {dst.dtype}")
    if src.dim() != 2 or dst.dim() != 2 or src.shape[1] != dst.shape[1]:
        raise ValueError(f"gather_blocks: rows of equal length expected, got {tuple(src.shape)} "
                         f"and {tuple(dst.shape)}")
    if src.stride(1) != 1 or dst.stride(1) != 1:
        raise ValueError("gather_blocks: rows must be contiguous")
    if src_idx.dtype != torch.int64 or dst_idx.dtype != torch.int64:
        raise TypeError("gather_blocks: int64 indices expected")
    if src_idx.shape != dst_idx.shape or src_idx.dim() != 1:
        raise ValueError("gather_blocks: src_idx and dst_idx must be 1-D of the same length")
    n, n_words = src_idx.numel(), src.shape[1]
    if n == 0 or n_words == 0:
        return "empty"
    if n > 65535:
        raise ValueError(f"gather_blocks: at most 65535 blocks per launch, got {n}")
    # --- launch ---
    grid = (triton.cdiv(n_words, block), n)

    def launch(src_arg):
        _gather_blocks_kernel[grid](
            src_arg, dst, src_idx, dst_idx, n_words, src.stride(0), dst.stride(0),
            BLOCK=block, num_warps=num_warps,
        )

    if _interpreting() or src.device == dst.device:
        launch(src)
        return "interpreter" if _interpreting() else "device"
    if src.device.type != "cpu" or dst.device.type != "cuda":
        raise ValueError(f"gather_blocks: src on {src.device}, dst on {dst.device}")
    if not src.is_pinned():
        raise ValueError("gather_blocks: host blocks must be pinned (zero-copy needs page-locked memory)")
    routes = {
        "tensor": lambda: src,
        "data_ptr": lambda: _HostPointer(src),
        "cuda_view": lambda: _cuda_view(src, dst.device),
    }
    if host_path is None and _HOST_PATH:
        launch(routes[_HOST_PATH["path"]]())
        return _HOST_PATH["path"]
    errors = []
    for name in [host_path] if host_path else list(routes):
        try:
            launch(routes[name]())
            # Host synchronization, once per process (or per forced route): a route must
            # move the right bytes, not only launch, before it is trusted.
            torch.cuda.synchronize(dst.device)
            moved = dst[dst_idx].cpu()
            if not torch.equal(moved, src[src_idx.cpu()]):
                raise RuntimeError("launched, but the slots do not hold the host blocks")
        except Exception as e:  # a refusal of this route: try the next one
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if host_path is None:
            _HOST_PATH["path"] = name
        return name
    raise RuntimeError("gather_blocks: no way to pass pinned host memory to Triton: "
                       + "; ".join(errors))
