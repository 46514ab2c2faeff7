"""Frozen specs of the three things gamma depends on: the model, the system, the workload.

All validation lives here (`SpecError` names the offending field); everything
downstream may assume valid specs. Units are SI: bytes, seconds, B/s, FLOP/s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

# Bytes per element. Block-scaled formats include their scales:
# mxfp4 = 4-bit values + one 8-bit scale per 32 (4.25 bits, OCP MX spec);
# nvfp4 = 4-bit values + one fp8 scale per 16 (4.5 bits).
DTYPE_BYTES: dict[str, float] = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "mxfp4": 4.25 / 8,
    "nvfp4": 4.5 / 8,
}


# --- Limits on every size a user can type ------------------------------------------------------
# Each is checked here (or in api.py for the Monte Carlo's) before anything is allocated, and
# each message states it. They sit far above any model or machine of today (published MoE
# models: <= 384 routed experts, <= 100 layers, hidden <= 2^14; the largest clusters ~2^17
# GPUs), and low enough that what moelab allocates or loops over per unit stays bounded.
MAX_EXPERTS = 2**12  # routed experts per layer (and replica slots): the busiest-rank model keeps an
#                      [E, E + replicas] int64 table (128 MiB at 2^12, 32 GiB at 2^16), plan and
#                      routing [L, E] arrays, the Monte Carlo [tokens, E] scores
MAX_LAYERS = 2**12  # decoder layers: config layouts, the planner and the Monte Carlo loop per layer
MAX_WIDTH = 2**24  # hidden, intermediate, heads, head and LoRA dims: 3 d I <= 2^50 stays exact
#                    in float64 and int64 (16M, a thousand times today's widest, 2^14)
MAX_TOKENS = 2**40  # tokens per pass, decode batch, steps, context (1.1e12): k N <= 2^56 fits
#                     int64; the closed form holds nothing per token
MAX_GPUS = 2**14  # EP ranks, GPUs of a plan, GPUs per node: the busiest-rank model's work grows
#                   with the ranks (`gamma --ep-ranks 16384` ~15 s, 65536 ~45 s on 2 cores)
GPUS_WHY = ", the most GPUs moelab models"
TOKENS_WHY = ", the most tokens moelab counts exactly"
MAX_PLACEMENT_STEPS = 2**22  # (E + replicas) x R: the replica placement's greedy loop (Python)
MAX_SAMPLES = 10**6  # Monte Carlo samples (check_monte_carlo also bounds samples x layers,
#                      kept as [samples, L] float64 arrays, and the draws of the whole run)
MAX_DRAW_ELEMENTS = 2**28  # elements one Monte Carlo layer-sample holds: tokens x E scores
#                            (1 GiB of float32); past it a sampled pass does not fit in memory


class SpecError(ValueError):
    """Bad input. The message names the field; the CLI prints it and exits with code 2."""


def dtype_bytes(name: str, field_name: str = "dtype") -> float:
    try:
        return DTYPE_BYTES[name]
    except KeyError:
        known = ", ".join(DTYPE_BYTES)
        raise SpecError(f"{field_name}: unknown dtype {name!r} (known: {known})") from None


def _check(name: str, value, *, positive=False, integer=False, at_least=None, at_most=None,
           why: str = ""):
    """A number in range; `why` says, after the limit, what the upper limit protects."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(f"{name}: expected a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):  # (an int of any size is finite)
        raise SpecError(f"{name}: must be finite, got {value!r}")
    if integer and value != int(value):
        raise SpecError(f"{name}: must be an integer, got {value!r}")
    if positive and value <= 0:
        raise SpecError(f"{name}: must be > 0, got {value!r}")
    if at_least is not None and value < at_least:
        raise SpecError(f"{name}: must be >= {at_least}, got {value!r}")
    if value < 0:
        raise SpecError(f"{name}: must be >= 0, got {value!r}")
    if at_most is not None and value > at_most:
        if not why:
            raise SpecError(f"{name}: must be <= {at_most}, got {value!r}")
        raise SpecError(f"{name}: {value!r} > {at_most:,}{why}")


def check_placement(n_experts: int, ranks: int | None, redundant: int) -> None:
    """Replica slots are placed one by one over every rank: (E + N) R steps in Python."""
    steps = (n_experts + redundant) * (ranks or 0) if redundant else 0
    if steps > MAX_PLACEMENT_STEPS:
        raise SpecError(f"redundant_experts: ({n_experts} experts + {redundant} replicas) x {ranks} ranks = "
                        f"{steps:,} placement steps > {MAX_PLACEMENT_STEPS:,}, the most moelab runs")


def check_count(name: str, value, limit: int, why: str, *, at_least: int = 1) -> None:
    """An integer count from the user (a flag or API argument) in [at_least, limit]."""
    _check(name, value, integer=True, at_least=at_least, at_most=limit, why=why)


# The Monte Carlo's and the timeline's sizes (moelab gamma), checked before jax is imported or
# anything drawn.
MAX_SAMPLE_LAYERS = 2**24  # samples x L: kept as several [samples, L] float64 arrays (128 MiB each)
MAX_MONTE_CARLO_DRAWS = 2**34  # samples x L x N_t x k expert picks: a few minutes on 2 cores
#                                (deepseek-r1 at 4096 tokens: 9,000 samples; ~23 ms each, zipf)
MAX_TIMELINE_EVENTS = 2**22  # transfers and computes the overlap timeline schedules (Python)


def check_seed(seed) -> None:
    """A random seed jax and numpy both take: an integer in [0, 2^32)."""
    check_count("seed", seed, 2**32 - 1, ", the largest seed (32 bits)", at_least=0)


def check_monte_carlo(m: ModelSpec, w: Workload, samples: int, ep_ranks: int | None) -> None:
    """Samples, and what one sampled layer holds: N_t tokens (R N_t for the busiest rank) of
    up to E scores each."""
    check_count("samples", samples, MAX_SAMPLES, ", the most Monte Carlo samples moelab draws")
    if samples * m.n_moe_layers > MAX_SAMPLE_LAYERS:
        raise SpecError(f"samples: {samples:,} x {m.n_moe_layers} MoE layers > {MAX_SAMPLE_LAYERS:,} "
                        "sampled layers, the most the Monte Carlo keeps")
    draws = samples * m.n_moe_layers * w.tokens_per_pass * m.top_k
    if draws > MAX_MONTE_CARLO_DRAWS:
        raise SpecError(f"samples: {samples:,} x {m.n_moe_layers} layers x {w.tokens_per_pass:,} tokens "
                        f"x k={m.top_k} = {draws:,} expert picks > {MAX_MONTE_CARLO_DRAWS:,}, the most "
                        "the Monte Carlo draws in one run")
    tokens = w.tokens_per_pass * max(ep_ranks or 1, 1)
    if tokens * m.n_experts > MAX_DRAW_ELEMENTS:
        what = f"{w.tokens_per_pass:,} tokens" + (f" x {ep_ranks} EP ranks" if (ep_ranks or 1) > 1 else "")
        raise SpecError(f"samples: a sampled layer of {what} x {m.n_experts} experts = "
                        f"{tokens * m.n_experts:,} scores > {MAX_DRAW_ELEMENTS:,}, the most the "
                        "Monte Carlo holds at once; give fewer tokens (or ranks)")


def check_timeline(m: ModelSpec, microbatches) -> None:
    """--overlap schedules every expert copy and micro-batch of every layer, one by one."""
    check_count("microbatches", microbatches, 2**10, ", the most micro-batches the timeline splits")
    events = m.n_moe_layers * (m.n_experts + 2 * microbatches)
    if events > MAX_TIMELINE_EVENTS:
        raise SpecError(f"overlap: {m.n_moe_layers} layers x ({m.n_experts} experts + "
                        f"{2 * microbatches} micro-batch steps) = {events:,} events > "
                        f"{MAX_TIMELINE_EVENTS:,}, the most the timeline schedules")


@dataclass(frozen=True)
class ModelSpec:
    """One MoE model as the cost model sees it (seed symbols in brackets)."""

    name: str
    n_moe_layers: int  # [L] layers with routed experts; dense layers don't count
    n_experts: int  # [E] routed experts per MoE layer (shared experts excluded)
    top_k: int  # [k] routed experts chosen per token
    hidden: int  # [d] activations per token
    expert_intermediate: int  # [I] intermediate size of one routed expert
    n_layers: int = 0  # all decoder layers (0: same as n_moe_layers)
    n_shared_experts: int = 0  # always resident, never moved by either strategy
    shared_intermediate: int = 0  # intermediate size of the shared expert(s) in total
    expert_dtype: str = "bf16"  # [f_E] storage dtype of routed expert weights
    act_dtype: str = "bf16"  # [f_a] activation dtype
    n_group: int = 1  # DeepSeek group-limited routing: expert groups per layer
    topk_group: int = 1  # ... groups a token may pick from
    gated: bool = True  # gated MLP (3 matrices) or plain (2)
    # Attention and dense layers (for T_B only; 0: unknown, counted as free). GQA: n_heads,
    # n_kv_heads, head_dim; MLA (DeepSeek, Kimi): q_lora_rank, kv_lora_rank, qk_nope_head_dim,
    # qk_rope_head_dim, v_head_dim (kv_lora_rank > 0 says MLA).
    n_heads: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    dense_intermediate: int = 0  # intermediate size of the dense layers' MLP
    source: str = ""

    def __post_init__(self):
        per_layer = ", the most moelab allocates per layer"
        _check("n_experts", self.n_experts, positive=True, integer=True, at_most=MAX_EXPERTS,
               why=per_layer)
        _check("top_k", self.top_k, positive=True, integer=True)
        for f in ("n_moe_layers", "n_layers"):
            _check(f, getattr(self, f), positive=f == "n_moe_layers", integer=True,
                   at_most=MAX_LAYERS, why=", the most layers moelab loops over")
        _check("n_shared_experts", self.n_shared_experts, integer=True, at_most=MAX_EXPERTS,
               why=per_layer)
        wide = ", the widest moelab computes exactly"
        for f in ("hidden", "expert_intermediate"):
            _check(f, getattr(self, f), positive=True, integer=True, at_most=MAX_WIDTH, why=wide)
        for f in ("shared_intermediate", "n_heads", "n_kv_heads",
                  "head_dim", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                  "qk_rope_head_dim", "v_head_dim", "dense_intermediate"):
            limit = MAX_WIDTH * (MAX_EXPERTS if f == "shared_intermediate" else 1)
            _check(f, getattr(self, f), integer=True, at_most=limit, why=wide)
        if self.top_k > self.n_experts:
            raise SpecError(f"top_k: k={self.top_k} exceeds the {self.n_experts} experts (E)")
        if self.n_layers and self.n_layers < self.n_moe_layers:
            raise SpecError(f"n_layers: {self.n_layers} < n_moe_layers {self.n_moe_layers}")
        _check("n_group", self.n_group, positive=True, integer=True)
        _check("topk_group", self.topk_group, positive=True, integer=True, at_most=self.n_group)
        if self.n_experts % self.n_group:
            raise SpecError(f"n_group: {self.n_group} does not divide E={self.n_experts}")
        dtype_bytes(self.expert_dtype, "expert_dtype")
        dtype_bytes(self.act_dtype, "act_dtype")

    @property
    def expert_params(self) -> int:
        """[S_E] parameters of one routed expert: gate, up and down projections."""
        return (3 if self.gated else 2) * self.hidden * self.expert_intermediate

    @property
    def f_e(self) -> float:
        return DTYPE_BYTES[self.expert_dtype]

    @property
    def f_a(self) -> float:
        return DTYPE_BYTES[self.act_dtype]

    @property
    def expert_bytes(self) -> float:
        """S_E * f_E: what one expert costs to move over the host link."""
        return self.expert_params * self.f_e

    @property
    def n_dense_layers(self) -> int:
        """Decoder layers without routed experts (DeepSeek's first_k_dense_replace)."""
        return max(self.n_layers - self.n_moe_layers, 0)

    def with_(self, **changes) -> ModelSpec:
        return replace(self, **changes)


@dataclass(frozen=True)
class SystemSpec:
    """One GPU in its machine: host link, network, and the roofline for T_B."""

    name: str
    b_pcie: float  # [B_pcie] host-to-device bandwidth, B/s
    b_net: float  # [B_net] per-GPU scale-out bandwidth, B/s per direction
    b_nvlink: float = 450e9  # per-GPU scale-up (NVLink) bandwidth inside a node, B/s per direction
    alpha_pcie: float = 0.0  # latency of one expert copy, s
    alpha_net: float = 0.0  # latency of one collective (dispatch or combine), s
    hbm_bw: float = 3.35e12  # HBM bandwidth, B/s (roofline for T_B)
    peak_flops: float = 989e12  # dense bf16 FLOP/s (roofline for T_B)
    peak_flops_fp8: float = 1979e12  # dense fp8 FLOP/s
    # dense fp4 FLOP/s (NVFP4 experts); 0: no fp4 tensor path, NVFP4 runs weight-only at bf16
    # (plan.expert_lane)
    peak_flops_fp4: float = 0.0
    hbm_bytes: float = 80e9  # HBM capacity per GPU, B (memory fit)
    gpus_per_node: int = 8
    host_link: str = ""
    network: str = ""
    source: str = ""

    def __post_init__(self):
        for f in ("b_pcie", "b_net", "b_nvlink", "hbm_bw", "peak_flops", "peak_flops_fp8", "hbm_bytes"):
            _check(f, getattr(self, f), positive=True)
        for f in ("alpha_pcie", "alpha_net", "peak_flops_fp4"):
            _check(f, getattr(self, f))
        _check("gpus_per_node", self.gpus_per_node, positive=True, integer=True, at_most=MAX_GPUS,
               why=GPUS_WHY)

    def with_(self, **changes) -> SystemSpec:
        return replace(self, **changes)


@dataclass(frozen=True)
class Workload:
    """Prefill of `tokens` tokens, or decode of a batch of `batch` for `steps` steps.

    The seed: for decode, replace N_t by N_OS. Per step a batch of B tokens uses
    min(k B, E) experts, and both overheads are paid once per step.
    """

    tokens: int = 0  # [N_t] prefill tokens
    decode: bool = False
    batch: int = 1  # [B] decode batch (tokens per step)
    steps: int = 1  # [N_OS] decode steps (output sequence length)

    def __post_init__(self):
        # A prefill needs a token; a decode workload carries no prefill tokens (0).
        _check("tokens", self.tokens, integer=True, at_least=0 if self.decode else 1,
               at_most=MAX_TOKENS, why=TOKENS_WHY)
        _check("batch", self.batch, positive=True, integer=True, at_most=MAX_TOKENS, why=TOKENS_WHY)
        _check("steps", self.steps, positive=True, integer=True, at_most=MAX_TOKENS, why=TOKENS_WHY)

    @property
    def tokens_per_pass(self) -> int:
        """Tokens in one forward pass: N_t for prefill, B for a decode step."""
        return self.batch if self.decode else self.tokens

    @property
    def passes(self) -> int:
        """Forward passes that each pay the overheads: 1 for prefill, N_OS for decode."""
        return self.steps if self.decode else 1


DISPATCH_MODES = ("per-node", "per-rank", "flat")


@dataclass(frozen=True)
class Options:
    """The extensions past the seed (docs/model.md). Defaults reproduce the seed exactly."""

    fanout: float | None = None  # [phi] remote destinations per token and direction
    ep_ranks: int | None = None  # R: derive phi from R ranks with uniform placement
    dispatch_dtype: str | None = None  # activations sent to experts (default: act dtype)
    combine_dtype: str | None = None  # expert outputs sent back (default: act dtype)
    resident_fraction: float = 0.0  # [h] share of used experts already on the GPU
    routing: str = "worst"  # worst: min(kN, E) (the seed); uniform: E(1-(1-k/E)^N)
    # With ep_ranks: how a token crosses the network. per-node: one copy per remote node,
    # forwarded over NVLink inside it (DeepEP's normal kernels); per-rank: one copy per
    # remote rank (DeepEP's low-latency kernels, a plain all-to-all); flat: every remote
    # rank at B_net, no NVLink tier (the model before two tiers; sweep --dispatch-mode flat).
    dispatch_mode: str = "per-node"
    redundant_experts: int = 0  # extra expert slots over the ranks, filled with hot experts
    imbalance: bool = True  # with ep_ranks: the busiest rank sets the pace (False: the mean)

    def __post_init__(self):
        if self.fanout is not None and self.ep_ranks is not None:
            raise SpecError("fanout: give either a fan-out or a number of EP ranks, not both")
        if self.fanout is not None:
            _check("fanout", self.fanout, positive=True)
        if self.ep_ranks is not None:
            _check("ep_ranks", self.ep_ranks, positive=True, integer=True, at_most=MAX_GPUS,
               why=GPUS_WHY)
        _check("resident_fraction", self.resident_fraction, at_most=1.0)
        for f in ("dispatch_dtype", "combine_dtype"):
            if getattr(self, f) is not None:
                dtype_bytes(getattr(self, f), f)
        if self.dispatch_mode not in DISPATCH_MODES:
            raise SpecError(f"dispatch_mode: {self.dispatch_mode!r} is not one of "
                            f"{', '.join(DISPATCH_MODES)}")
        _check("redundant_experts", self.redundant_experts, integer=True, at_most=MAX_EXPERTS,
               why=", the most replica slots moelab places")
        if self.redundant_experts and not self.ep_ranks:
            raise SpecError("redundant_experts: needs EP ranks (--ep-ranks R)")
        if self.routing not in ("worst", "uniform"):
            raise SpecError(f"routing: unknown routing {self.routing!r} (closed form: worst, uniform)")


@dataclass(frozen=True)
class RoutingSpec:
    """A parsed --routing string."""

    kind: str  # uniform | zipf | dirichlet | groups | logits | hist | trace
    param: float = 0.0  # Zipf exponent s or Dirichlet concentration a
    path: str = ""  # logits or histogram file

    def __str__(self) -> str:
        if self.kind in ("zipf", "dirichlet"):
            return f"{self.kind}:{self.param:g}"
        return f"{self.kind}:{self.path}" if self.path else self.kind


def parse_routing(spec: str) -> RoutingSpec:
    """A --routing string: uniform | zipf:S | dirichlet:A | groups | logits:PATH | hist:PATH |
    trace:PATH (a recorded routing, costmodel/trace.py)."""
    kind, _, arg = spec.partition(":")
    if kind in ("uniform", "groups") and not arg:
        return RoutingSpec(kind)
    if kind in ("zipf", "dirichlet"):
        try:
            value = float(arg)
        except ValueError:
            raise SpecError(f"routing: {kind} needs a number, as in {kind}:1.0, got {spec!r}") from None
        if not math.isfinite(value) or value < 0 or (kind == "dirichlet" and value == 0):
            raise SpecError(f"routing: {kind} parameter must be finite and "
                            f"{'> 0' if kind == 'dirichlet' else '>= 0'}, got {arg}")
        return RoutingSpec(kind, value)
    if kind in ("logits", "hist", "trace") and arg:
        if not Path(arg).is_file():
            raise SpecError(f"routing: no such file {arg!r}")
        return RoutingSpec(kind, path=arg)
    raise SpecError(f"routing: unknown routing {spec!r} (uniform | zipf:S | dirichlet:A | groups "
                    "| logits:PATH.npy | hist:PATH.npy|.json | trace:PATH.json|.npz)")


def as_dict(spec) -> dict:
    return {f.name: getattr(spec, f.name) for f in fields(spec)}
