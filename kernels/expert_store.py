"""The host expert store: every routed expert of the chosen layers, in (pinned) host memory.

One contiguous, 256-byte aligned block per expert (gate, up, down back to back), laid out
from a `ModelSpec`; what the prefetcher copies (copy engine) or gathers (Triton kernel).
"""

from __future__ import annotations

import math

import torch

from moelab.costmodel.specs import ModelSpec, SpecError

# Each expert block starts 256-byte aligned: its stride in int32 words is a multiple of 16,
# which lets Triton prove 128-bit alignment and vectorize the gather's loads and stores.
ALIGN = 256

# Storage of one expert dtype: (torch dtype of a typed view or None, bytes per parameter).
# Block-scaled 4-bit formats are kept as raw bytes (values and scales): what crosses the
# link is their byte count, DTYPE_BYTES (4.25 bits for mxfp4).
_TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "float8_e4m3fn"}


# Per int32 word: 0xBFFFFFFF (fp32), 0xBFFFBFFF (two 16-bit floats), 0xBFBFBFBF (four fp8).
_FINITE_MASK = {"fp32": -0x40000001, "bf16": -0x40004001, "fp16": -0x40004001,
                "fp8": -0x40404041}


def _signature(layer: int, expert: int) -> int:
    """A distinct int32 per (layer, expert): XORed into the layer's random base block."""
    return ((layer * 1_000_003 + expert + 1) * 2654435761) % (2**31 - 1) + 1


class HostExpertStore:
    """Routed-expert weights of `layers` MoE layers: `[E, block_bytes]` uint8 per layer.

    One contiguous block per expert (gate, up, down back to back, each `[rows, cols]` in the
    expert dtype), 256-byte aligned. `scale` shrinks hidden and intermediate sizes (1.0 is
    the model's true expert size), or `hidden` and `intermediate` set them; `experts`
    limits how many experts per layer are stored (default: all E). Memory is pinned when
    CUDA is available (zero-copy and async copies need page-locked memory). Contents are
    random (a random base block per layer XORed with a per-expert signature), so that a
    wrong block or a wrong offset is detected.
    """

    def __init__(self, model: ModelSpec, *, layers: int = 1, experts: int | None = None,
                 scale: float = 1.0, pin: bool | None = None, seed: int = 0,
                 hidden: int | None = None, intermediate: int | None = None):
        if not 0 < scale <= 1:
            raise SpecError(f"scale: must be in (0, 1], got {scale}")
        for name, v in (("hidden", hidden), ("intermediate", intermediate)):
            if v is not None and v < 1:
                raise SpecError(f"{name}: must be >= 1, got {v}")
        if layers < 1:
            raise SpecError(f"layers: at least 1, got {layers}")
        self.model = model
        self.n_layers = layers
        self.n_experts = model.n_experts if experts is None else int(experts)
        if not 1 <= self.n_experts <= model.n_experts:
            raise SpecError(f"experts: must be in [1, {model.n_experts}], got {experts}")
        # sizes: given outright (as `moelab ep` and `moelab offload` shrink them), else scaled
        self.hidden = hidden or max(1, round(model.hidden * scale))
        self.intermediate = intermediate or max(1, round(model.expert_intermediate * scale))
        d, i = self.hidden, self.intermediate
        shapes = [("gate", (i, d)), ("up", (i, d)), ("down", (d, i))]
        if not model.gated:
            shapes = shapes[1:]
        # Byte layout of one block: (name, shape, byte offset, bytes).
        self.parts, offset = [], 0
        for name, shape in shapes:
            nbytes = math.ceil(shape[0] * shape[1] * model.f_e)
            self.parts.append((name, shape, offset, nbytes))
            offset += nbytes
        self.expert_bytes = offset  # what one expert costs to move (S_E f_E at scale 1)
        self.block_bytes = -(-offset // ALIGN) * ALIGN
        self.pinned = torch.cuda.is_available() if pin is None else bool(pin)
        # Random bits would hold NaNs and infinities: clearing each float's top exponent bit
        # keeps every value finite (|w| < 2), so the weights feed a real GEMM.
        mask = _FINITE_MASK.get(model.expert_dtype, -1)
        g = torch.Generator().manual_seed(seed)
        self.blocks: list[torch.Tensor] = []
        for layer in range(layers):
            words = torch.empty((self.n_experts, self.block_bytes // 4), dtype=torch.int32,
                                pin_memory=self.pinned)
            base = torch.randint(-(2**31), 2**31 - 1, (self.block_bytes // 4,),
                                 dtype=torch.int32, generator=g)
            for e in range(self.n_experts):
                torch.bitwise_xor(base, _signature(layer, e), out=words[e])
                words[e].bitwise_and_(mask)
            self.blocks.append(words.view(torch.uint8))

    @property
    def nbytes(self) -> int:
        return self.n_layers * self.n_experts * self.block_bytes

    def block(self, layer: int, expert: int) -> torch.Tensor:
        """`[block_bytes]` uint8: the expert's block in host memory."""
        return self.blocks[layer][expert]

    def words(self, layer: int) -> torch.Tensor:
        """`[E, block_bytes / 4]` int32: the layer's blocks as the gather kernel reads them."""
        return self.blocks[layer].view(torch.int32)

    def views(self, block: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed weight matrices inside one block (host or device): name -> `[rows, cols]`.

        4-bit block-scaled dtypes have no torch dtype: their raw bytes are returned.
        """
        dtype = _TORCH_DTYPE.get(self.model.expert_dtype)
        out = {}
        for name, shape, offset, nbytes in self.parts:
            raw = block[offset : offset + nbytes]
            out[name] = raw.view(getattr(torch, dtype)).view(shape) if dtype else raw
        return out
