"""Which deployment to pick: EP, expert TP, offload, CPU experts or a hybrid, each with memory and step time.

The traffic is the deployment's: `tokens` tokens per forward pass (a prefill chunk, or a
decode batch of `sequences` sequences at `context` tokens each). Each strategy spreads it:

- **ep**: one instance over R GPUs in nodes of G. Routed experts sharded E/R per GPU;
  attention data-parallel (weights replicated, tokens split) or tensor-parallel inside a
  node (weights split, one all-reduce per layer), whichever fits and is faster.
      step = compute(busiest rank) + L [dispatch + combine]          (overlapped: max)
- **tp**: one instance over R GPUs of one node, each GPU holding 1/R of every expert (the
  SGLang default `--tp 8` without EP); attention tensor- or data-parallel.
      step = compute(attention, experts / R) + all-reduces over NVLink (plan_tp)
- **offload**: one instance per GPU (tokens split); non-expert weights and KV resident,
  the HBM left caches the hottest experts; missing used experts stream from host DRAM.
      step = compute + L misses (alpha_pcie + S_E f_E / b_stream)
      b_stream = min(B_pcie, B_pcie / GPUs per host link, node DRAM bandwidth / GPUs in node)
- **cpu-experts** (Fiddler, KTransformers, llama.cpp --n-cpu-moe): attention and shared
  experts on the GPU; routed experts on the CPU from host DRAM at --cpu-expert-dtype.
      step = compute_gpu + L [2 (alpha_pcie + n d f_a / B_link) + t_cpu]
      t_cpu = max(used experts' bytes / DRAM share, 2 n k S_E / CPU matrix FLOP/s share)
- **hybrid**: the hottest r experts of each layer on the GPU, the rest on the CPU, both
  working at once; r chosen to maximise throughput.

Every transfer pays its latency as well as its bytes. A deployment that does not fit is
infeasible with the figures (needed vs available), never a slow number. Units SI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from moelab.costmodel import memory
from moelab.costmodel.closed_form import ep_legs
from moelab.costmodel.predict import cpu as cpu_achieved
from moelab.costmodel.predict import efficiency
from moelab.costmodel.predict.profile import ENGINES, TERMS, Profile
from moelab.costmodel.specs import ModelSpec, Options, SpecError, SystemSpec

# Bytes per weight of the CPU expert formats: llama.cpp's Q8_0 and Q4_0 blocks hold 32
# values and one fp16 scale (8.5 and 4.5 bits); bf16 plain.
CPU_DTYPE_BYTES = {"bf16": 2.0, "int8": 8.5 / 8, "int4": 4.5 / 8}
# int4 is unpacked to int8 for the matrix units (AMX/VNNI have no int4 multiply).
CPU_COMPUTE_DTYPE = {"bf16": "bf16", "int8": "int8", "int4": "int8"}
STRATEGIES = ("ep", "tp", "offload", "cpu-experts", "hybrid")
SKEWED = "zipf:1.2"  # what --routing skewed means
PREFILL_ATTENTION = ("fused", "eager")
# Eager attention (scores materialised in HBM), bytes per head and query-key pair: KTransformers'
# forward_chunck (ktransformers/operators/attention.py, before V0.2.1's Triton MLA) writes the
# two score matmuls (2 + 2 B, bf16), adds them (reads 4, writes 2), scales (2 + 2), adds the
# mask (2 + 2), softmax in fp32 (reads 2, writes 4), casts back (4 + 2) and the PV einsum reads 2.
EAGER_SCORE_BYTES = 2 + 2 + (4 + 2) + (2 + 2) + (2 + 2) + (2 + 4) + (4 + 2) + 2
MICRO_BATCHES = (1, 2)  # EP micro-batches: serial, or two-batch overlap (no source runs more)
# Two-batch overlap in prefill: DeepEP's normal (high-throughput) kernels run on SMs of their
# own while the other micro-batch computes, so the computation gets the rest. DeepSeek's
# prefill overlap diagram labels them "Computation (108 SMs)" and "Communication (24 SMs)"
# on its H800s (open-infra-index 202502OpenSourceWeek/day_6 ... inference_system_overview.md,
# "Prefilling Phase" figure; its labels as transcribed at
# timkellogg.me/threads/2025-03-01-deepseek-did-the-one-more-thing-but-guys-che); SGLang does
# the same (operations_strategy.py, _compute_moe_deepseek_blog_prefill: deep_gemm_num_sms =
# SMs - DeepEP's num_sms). Decode's low-latency kernels hold no SMs while in flight (DeepSeek
# profile-data README, Decoding), so decode keeps them all.
TBO_PREFILL_COMPUTE_SMS, TBO_PREFILL_TOTAL_SMS = 108, 108 + 24
HBM_UTILIZATION = 0.9  # share of HBM an engine may fill (vLLM's --gpu-memory-utilization default)



@dataclass(frozen=True)
class CpuSpec:
    """The CPUs of one node (all sockets): DRAM bandwidth and matrix throughput per dtype.

    Peaks (nominal DRAM, matrix rate at the base clock) and measured figures (STREAM-like
    triad, the achieved rates of torch's CPU kernels from `moelab calibrate --cpu`) side by
    side: a measured figure beats a peak (`matmul_rate`, `weight_bandwidth`)."""

    name: str
    sockets: int
    dram_bw: float  # nominal, B/s, all sockets; 0: unknown (a measured-only file)
    dram_bw_measured: float  # measurement (STREAM-like), B/s; 0 if none
    matmul_flops: dict = field(default_factory=dict)  # dtype -> FLOP/s (ops/s for int8), all sockets
    source: str = ""
    isa: str = ""  # the matrix instruction set matmul_flops is for (amx, avx512, avx2, sve2)
    # Measured, all sockets: dtype (bf16, int8, int4 as stored) -> ops/s of a prefill-sized
    # batch, and -> B/s of weight bytes through a one-token product (GEMV).
    matmul_measured: dict = field(default_factory=dict)
    gemv_measured: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.sockets, bool) or not isinstance(self.sockets, int) or self.sockets < 1:
            raise SpecError(f"cpu: sockets must be an integer >= 1, got {self.sockets!r}")
        for f in ("dram_bw", "dram_bw_measured"):
            v = getattr(self, f)
            if not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise SpecError(f"cpu: {f} must be a finite number >= 0, got {v!r}")
        if not self.dram_bw and not self.dram_bw_measured:
            raise SpecError("cpu: no DRAM bandwidth: dram_bw or dram_bw_measured must be > 0")
        for name, table in (("matmul_flops", self.matmul_flops), ("matmul_measured", self.matmul_measured),
                            ("gemv_measured", self.gemv_measured)):
            for dtype, v in table.items():
                if not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                    raise SpecError(f"cpu: {name}[{dtype!r}] must be a finite number > 0, got {v!r}")
        for dtype in ("bf16", "int8"):
            if dtype not in self.matmul_flops and dtype not in self.matmul_measured:
                raise SpecError(f"cpu: no {dtype} matrix rate (matmul_flops or matmul_measured)")

    def bandwidth(self, nominal: bool) -> float:
        if nominal and self.dram_bw or not self.dram_bw_measured:
            return self.dram_bw
        return self.dram_bw_measured

    def matmul_rate(self, dtype: str, nominal: bool = False) -> tuple[float, bool]:
        """(ops/s, measured?) for experts stored at `dtype`: the measured kernel rate where
        there is one (unless `nominal`), else the peak of the dtype it computes in."""
        measured = self.matmul_measured.get(dtype)
        peak = self.matmul_flops.get(CPU_COMPUTE_DTYPE[dtype])
        if measured and not (nominal and peak):
            return measured, True
        if peak:
            return peak, False
        return self.matmul_measured[CPU_COMPUTE_DTYPE[dtype]], True

    def weight_bandwidth(self, dtype: str, nominal: bool = False) -> tuple[float, bool]:
        """(B/s, measured?) at which experts stored at `dtype` stream through a one-token
        product: the measured GEMV rate where there is one (unless `nominal`), else DRAM's."""
        gemv = self.gemv_measured.get(dtype)
        if gemv and not (nominal and self.dram_bw):
            return gemv, True
        return self.bandwidth(nominal), bool(self.dram_bw_measured and not (nominal and self.dram_bw))


@dataclass(frozen=True)
class Routing:
    """Per-layer marginals q[l, e] = P(a token picks expert e), sum_e q = k; or the worst case."""

    name: str
    q: np.ndarray | None  # [L or 1, E]; None: worst case (the seed: min(k n, E) used, no sharing)
    ids: list | None = None  # a recorded trace: ids[layer][token] = k expert ids, in order

    def used(self, n, k: int, E: int, resident: int = 0):
        """(used experts, used and not resident) per layer, for n tokens and the r hottest resident."""
        if self.q is None:
            used = np.minimum(np.multiply(k, n), E) * 1.0
            return used, used * (1 - resident / E)
        q = np.sort(self.q, axis=-1)[..., ::-1]  # hottest first
        p_used = -np.expm1(np.multiply(n, np.log1p(-np.minimum(q, 1 - 1e-15))))
        p_used = np.where(q >= 1, 1.0, p_used)
        used = p_used.sum(-1).mean()
        return used, p_used[..., resident:].sum(-1).mean()

    def pairs_beyond(self, resident: int, E: int) -> float:
        """Share of token-expert pairs that go to experts outside the r hottest."""
        if self.q is None:
            return 1 - resident / E
        q = np.sort(self.q, axis=-1)[..., ::-1]
        return float(np.mean(q[..., resident:].sum(-1) / q.sum(-1)))

    def imbalance(self, ranks: int, k: int, E: int) -> float:
        """Busiest rank's share of the expert work over the mean (experts round-robin over ranks)."""
        if ranks <= 1:
            return 1.0
        if self.q is None:
            return 1.0
        loads = np.stack([self.q[..., r::ranks].sum(-1) for r in range(min(ranks, E))], -1)
        return float(np.mean(loads.max(-1) / (self.q.sum(-1) / min(ranks, E))))


def make_routing(spec: str, n_layers: int, n_experts: int, k: int) -> Routing:
    """worst | uniform | skewed (= zipf:1.2) | zipf:S | hist:PATH (.npy or .json counts, [E] or
    [L, E]) | trace:PATH (a recorded routing: JSON with num_experts, top_k, ids[layer][token])."""
    name = SKEWED if spec == "skewed" else spec
    if name == "worst":
        return Routing("worst", None)
    if name == "uniform":
        return Routing("uniform", np.full((1, n_experts), k / n_experts))
    kind, _, arg = name.partition(":")
    if kind == "zipf":
        try:
            s = float(arg)
        except ValueError:
            raise SpecError(f"routing: zipf needs a number, as in zipf:1.2, got {spec!r}") from None
        if not math.isfinite(s) or s < 0:
            raise SpecError(f"routing: zipf exponent must be finite and >= 0, got {arg}")
        p = np.arange(1, n_experts + 1, dtype=float) ** -s
        return Routing(spec, _marginals(p[None] / p.sum(), k))
    if kind == "trace" and arg:
        return _trace_routing(spec, arg, n_layers, n_experts, k)
    if kind == "hist" and arg:
        counts = _load_hist(arg)
        shape_ok = counts.ndim == 1 or (counts.ndim == 2 and counts.shape[0] == n_layers)
        if counts.shape[-1] != n_experts or not shape_ok:
            raise SpecError(f"routing: {arg} holds counts of shape {counts.shape}; the model needs "
                            f"[{n_experts}] or [{n_layers}, {n_experts}]")
        if np.any(counts < 0) or not np.all(np.isfinite(counts)) or np.any(counts.sum(-1) <= 0):
            raise SpecError(f"routing: {arg}: counts must be finite, >= 0, and not all zero")
        counts = counts.reshape(-1, n_experts).astype(float)
        return Routing(spec, _marginals(counts / counts.sum(-1, keepdims=True), k))
    raise SpecError(f"routing: unknown routing {spec!r} "
                    "(worst | uniform | skewed | zipf:S | hist:PATH | trace:PATH)")


def _marginals(p: np.ndarray, k: int) -> np.ndarray:
    """Per-token pick probabilities from a popularity p (sum 1): min(1, k p) (top-k caps each at 1)."""
    return np.minimum(1.0, k * p)


def _load_hist(path: str) -> np.ndarray:
    """Counts per expert from a .npy, a JSON list, or a trace's `histogram` (JSON)."""
    if path.endswith(".npy"):
        from pathlib import Path

        if not Path(path).is_file():
            raise SpecError(f"routing: no such file {path!r}")
        try:
            return np.asarray(np.load(path), dtype=float)
        except (ValueError, OSError) as e:
            raise SpecError(f"routing: cannot read counts from {path}: {e}") from None
    data = _load_json(path)
    try:
        return np.asarray(data["histogram"] if isinstance(data, dict) else data, dtype=float)
    except (KeyError, ValueError, TypeError) as e:
        raise SpecError(f"routing: {path} holds no counts per expert ({e})") from None


def _load_json(path: str):
    from pathlib import Path

    from moelab.costmodel.jsonfile import read_json

    if not Path(path).is_file():
        raise SpecError(f"routing: no such file {path!r}")
    return read_json(path, "routing")  # size, encoding, depth and truncation: one line


def _trace_routing(spec: str, path: str, n_layers: int, n_experts: int, k: int) -> Routing:
    """A recorded routing (costmodel/trace.py's format, docs/traces.md): its per-layer
    histogram gives the marginals, its ids the order of accesses for cache simulations."""
    from moelab.costmodel import trace

    tr = trace.load(path)
    trace.check_model(tr, n_experts, k, n_layers)
    counts = trace.histogram(tr).astype(float)
    if np.any(counts.sum(-1) <= 0):
        raise SpecError(f"routing: trace {path!r} has a layer without any expert chosen")
    q = _marginals(counts / counts.sum(-1, keepdims=True), k)
    ids = [[[int(e) for e in token if e >= 0] for token in layer] for layer in np.asarray(tr.ids)]
    return Routing(spec, q, ids=ids)


@dataclass(frozen=True)
class Plan:
    """Everything one plan depends on."""

    model: ModelSpec
    cfg: dict  # the model's config.json (memory is counted from it)
    system: SystemSpec
    cpu: CpuSpec
    gpus: int
    gpus_per_node: int
    tokens: int  # tokens per forward pass of the deployment (decode: the batch)
    sequences: int  # sequences whose KV the deployment holds (prefill: ceil(tokens / context))
    context: int  # tokens of context per sequence
    decode: bool
    routing: Routing
    host_mem: float  # host DRAM per node, B
    gpus_per_host_link: int = 1
    kv_dtype: str = "bf16"
    cpu_expert_dtype: str = "int8"
    slo_s: float | None = None
    nominal: bool = False
    b_scale_up: float = 0.0  # NVLink per GPU and direction; 0: the system's b_nvlink
    alpha_scale_up: float = 0.0  # latency of one tensor-parallel all-reduce inside a node
    hbm_utilization: float = HBM_UTILIZATION
    replicas: int | None = None  # single-GPU strategies: instances (GPUs used); None: all
    engine: str = "ideal"  # whose achieved efficiencies (costmodel/predict); ideal: the roofline
    profile: Profile | None = None  # a user's fitted factors (predict/profile.py), on top of the engine's
    prefill_attention: str = "fused"  # fused (flash) kernels | eager (scores in HBM; _eager_attention_s)
    micro_batches: int = 1  # EP: 2 = two-batch overlap (SGLang --enable-two-batch-overlap; tbo_step)

    def __post_init__(self):
        for f in ("gpus", "gpus_per_node", "tokens", "sequences", "gpus_per_host_link"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SpecError(f"{f}: must be an integer >= 1, got {v!r}")
        if isinstance(self.context, bool) or not isinstance(self.context, int) or self.context < 0:
            raise SpecError(f"context: must be an integer >= 0, got {self.context!r}")
        if not self.host_mem > 0 or not math.isfinite(self.host_mem):
            raise SpecError(f"host_mem: must be > 0, got {self.host_mem!r}")
        if self.cpu_expert_dtype not in CPU_DTYPE_BYTES:
            raise SpecError(f"cpu_expert_dtype: unknown {self.cpu_expert_dtype!r} "
                            f"(known: {', '.join(CPU_DTYPE_BYTES)})")
        if self.slo_s is not None and not self.slo_s > 0:
            raise SpecError(f"slo: must be > 0, got {self.slo_s!r}")
        if not 0 < self.hbm_utilization <= 1:
            raise SpecError(f"hbm_utilization: must be in (0, 1], got {self.hbm_utilization!r}")
        memory.dtype_bytes(self.kv_dtype, "kv_dtype")
        if self.engine not in ENGINES:
            raise SpecError(f"engine: unknown {self.engine!r} (known: {', '.join(ENGINES)})")
        mb = self.micro_batches
        if isinstance(mb, bool) or not isinstance(mb, int) or mb not in MICRO_BATCHES:
            raise SpecError(f"micro_batches: must be 1 (serial) or 2 (two-batch overlap), got "
                            f"{self.micro_batches!r}")
        if self.prefill_attention not in PREFILL_ATTENTION:
            raise SpecError(f"prefill_attention: unknown {self.prefill_attention!r} "
                            f"(known: {', '.join(PREFILL_ATTENTION)})")

    # --- shared quantities ----------------------------------------------------------------

    @property
    def usable_hbm(self) -> float:
        return self.hbm_utilization * self.system.hbm_bytes

    @property
    def b_up(self) -> float:
        return self.b_scale_up or self.system.b_nvlink

    def kv_total(self) -> float:
        return self.sequences * memory.kv_bytes(self.cfg, self.context, self.kv_dtype)


def _share(total: int, parts: int) -> int:
    return -(-total // parts)


def _combine(p: Plan, terms: dict, combine) -> tuple[float, float, dict]:
    """(step, overlapped step, terms) of a strategy: the profile's factors scale each term
    before `combine(terms) -> (step, overlap)` joins them; its fixed costs are added after."""
    if p.profile is not None:
        terms = {k: v * p.profile.factor(k) for k, v in terms.items()}
    step, overlap = combine(terms)
    fixed = p.profile.fixed_s(p.model.n_layers or p.model.n_moe_layers) if p.profile is not None else 0.0
    return step + fixed, overlap + fixed, terms


def strategy_step(name: str, terms: dict, micro_batches: int = 1, layers: int = 1) -> tuple[float, float]:
    """(step, overlapped step) of strategy `name` from its terms (seconds; a term it lacks is 0):
    the one place each strategy joins them (the planner, and `moelab fit` trying scales).
    ep: compute + all-reduce, then latency + the slower all-to-all leg (two-batch overlap:
    tbo_step); tp: compute + all-reduces, no overlap; offload: compute + stream; cpu-experts
    and hybrid: the GPU's own work, then the slowest of the GPU's experts, the CPU's with its
    round trip, and a layerwise prefill's stream."""
    t = dict.fromkeys(TERMS, 0.0) | terms
    if name == "ep":
        return _ep_step(t, micro_batches, layers)
    if name == "tp":
        step = t["compute_s"] + t["tp_allreduce_s"]
        return step, step
    if name == "offload":
        return t["compute_s"] + t["stream_s"], max(t["compute_s"], t["stream_s"])
    if name in ("cpu-experts", "hybrid"):
        return _hybrid_step(t)
    raise SpecError(f"strategy: unknown {name!r} (known: {', '.join(STRATEGIES)})")


# --- GPU compute --------------------------------------------------------------------------


# Expert dtypes the engines run on the fp4 tensor cores (both operands fp4, the fp4 peak) where the
# GPU has them: NVFP4 experts with activations quantized to NVFP4 too (TRT-LLM's Sm100 block-scaled
# grouped GEMMs, SGLang's and vLLM's cutlass_moe_fp4). Without an fp4 path (Hopper, Ada, Ampere)
# engines run NVFP4 weight-only, dequantized into bf16 MMAs (Marlin W4A16: SGLang PR #19652,
# TRT-LLM PR #13476), so those stay in the bf16 lane, as MXFP4 experts do everywhere (gpt-oss runs
# with bf16 or mxfp8 activations: at most the fp8 rate).
FP4_EXPERTS = ("nvfp4",)


def compute_s(system: SystemSpec, flops: float, flops_fp8: float = 0.0, flops_fp4: float = 0.0) -> float:
    """Seconds for FLOPs at their peaks, one lane per dtype. No fp4 tensor path (peak 0): fp4 at
    the bf16 peak, as the weight-only kernels run it (expert_lane puts nothing there then)."""
    return (flops / system.peak_flops + flops_fp8 / system.peak_flops_fp8
            + flops_fp4 / (system.peak_flops_fp4 or system.peak_flops))


def expert_lane(p: Plan) -> tuple[str, str]:
    """(FLOP lane, efficiency class) of the routed experts: fp8 at the fp8 peak; NVFP4 at the fp4
    peak where the GPU has one; all else (bf16, MXFP4, NVFP4 without an fp4 path) at bf16."""
    dt = p.model.expert_dtype
    fp4 = dt in FP4_EXPERTS and p.system.peak_flops_fp4 > 0
    return ("fp8" if dt == "fp8" else "fp4" if fp4 else "bf16"), efficiency.dtype_class(dt, fp4)


@dataclass(frozen=True)
class Part:
    """One operation class of a Work, with the shape its efficiency curve is read at."""

    cls: str  # gemm | moe | attn_decode | mla_decode | attn_prefill (costmodel/predict/efficiency.py)
    dtype: str  # bf16 | fp8 | int4 (weights; the KV cache for attention)
    x: float  # the shape: GEMM rows M, tokens per expert, batch x context, prompt tokens
    flops: float = 0.0
    flops_fp8: float = 0.0
    bytes: float = 0.0
    nk: float = 0.0  # a GEMM's weight elements N x K on this GPU (its curve's size bin); 0: any
    flops_fp4: float = 0.0  # FLOPs at the fp4 peak (FP4_EXPERTS)

    def curve(self, p: Plan):
        if self.cls == "gemm":
            return efficiency.gemm_curve(p.system.name, p.engine, self.dtype, self.nk)
        return efficiency.curve(p.system.name, p.engine, self.cls, self.dtype)

    def roofline(self, system: SystemSpec) -> float:
        return max(compute_s(system, self.flops, self.flops_fp8, self.flops_fp4), self.bytes / system.hbm_bw)


@dataclass(frozen=True)
class Work:
    """FLOPs and HBM bytes of one pass on one GPU, split into the parts the report names."""

    flops: float = 0.0
    flops_fp8: float = 0.0  # FLOPs that run at the fp8 peak (fp8 weights)
    bytes: float = 0.0
    parts: tuple = ()  # the same FLOPs and bytes by operation class (Part), for the prediction
    flops_fp4: float = 0.0  # FLOPs that run at the fp4 peak (FP4_EXPERTS)

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.flops_fp8 + other.flops_fp8, self.bytes + other.bytes,
                    self.parts + other.parts, self.flops_fp4 + other.flops_fp4)

    @staticmethod
    def of(*parts: Part) -> Work:
        return Work(sum(q.flops for q in parts), sum(q.flops_fp8 for q in parts),
                    sum(q.bytes for q in parts), tuple(parts), sum(q.flops_fp4 for q in parts))

    def time(self, system: SystemSpec) -> float:
        """Roofline: the FLOPs at their peaks, or the HBM bytes, whichever is slower."""
        return max(compute_s(system, self.flops, self.flops_fp8, self.flops_fp4), self.bytes / system.hbm_bw)

    def predict(self, p: Plan) -> float:
        """The engine's prediction: each part's roofline / its achieved efficiency at its shape,
        summed (kernels run one after another). The ideal engine keeps the roofline above; any
        other is >= it, since sum max(f_i, b_i) >= max(sum f_i, sum b_i) and efficiency <= 1."""
        if p.engine == "ideal":
            return self.time(p.system)
        return sum(q.roofline(p.system) / efficiency.at(q.curve(p)[0], q.x) for q in self.parts)

    def bound(self, system: SystemSpec) -> str:
        compute = compute_s(system, self.flops, self.flops_fp8, self.flops_fp4)
        return "GPU compute" if compute >= self.bytes / system.hbm_bw else "HBM bandwidth"


def _linear_params_active(p: Plan) -> tuple[float, str]:
    """Non-expert parameters every token multiplies (all but embeddings), and their dtype."""
    groups = memory.param_groups(p.cfg, p.model)
    skip = ("routed experts", "embeddings", "expert biases")
    params = sum(g.params for g in groups if g.name not in skip)
    return params, memory._linear_dtype(memory._flatten(p.cfg), "self_attn")


def attention_core_flops(p: Plan, tokens: float) -> float:
    """Scores and weighted sums: 4 x heads x (qk head dim) x tokens attended, per token and layer.

    Decode: each token attends to its whole context. Prefill of chunks of min(T, C) tokens
    ending at context C (causal): on average C - min(T, C)/2 tokens. Windowed layers attend to at most
    their window. MLA attends in its latent (kv_lora_rank + rope) width, as absorbed
    kernels do (an approximation for prefill, which may run unabsorbed).
    """
    cfg = memory._flatten(p.cfg)
    h, _, hd = memory._heads(cfg)
    if memory.is_mla(cfg):
        hd = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    seen = p.context if p.decode else max(1.0, p.context - min(p.tokens, p.context) / 2)
    held = sum(g.layers * (seen if g.window is None else min(seen, g.window))
               for g in memory.kv_layout(p.cfg))
    return 4 * h * hd * held * tokens


def non_expert_work(p: Plan, tokens: float, weight_bytes: float, kv_bytes: float,
                    split: int = 1) -> Work:
    """Attention, dense and shared layers for `tokens` tokens, reading `weight_bytes` of weights
    and `kv_bytes` of KV cache; `split` GPUs share the FLOPs (tensor parallel)."""
    params, dtype = _linear_params_active(p)
    linear = 2 * tokens * params / split
    core = attention_core_flops(p, tokens) / split
    act = 2 * tokens * p.model.hidden * p.model.f_a * (p.model.n_layers or p.model.n_moe_layers) / split
    fp8 = dtype == "fp8"
    # one part per weight matrix shape, each at the curve of its size on this GPU; the FLOPs
    # and bytes shared out by the matrices' parameters
    shapes = gemm_shapes(p)
    total = sum(count * nk for count, nk in shapes)
    gemms = [Part("gemm", "fp8" if fp8 else "bf16", tokens, flops=0 if fp8 else linear * w,
                  flops_fp8=linear * w if fp8 else 0.0, bytes=(weight_bytes + act) * w, nk=nk / split)
             for count, nk in shapes for w in (count * nk / total,)]
    mla = memory.is_mla(memory._flatten(p.cfg))
    # a decode kernel's shape: the KV bytes it reads per layer; a prefill kernel's: its tokens
    layers = p.model.n_layers or p.model.n_moe_layers
    attn = Part(("mla_decode" if mla else "attn_decode") if p.decode else "attn_prefill",
                "fp8" if p.kv_dtype == "fp8" else "bf16",
                kv_bytes / layers if p.decode else tokens, flops=core, bytes=kv_bytes)
    return Work.of(*gemms, attn)


def gemm_shapes(p: Plan) -> list[tuple[int, int]]:
    """(matrices per pass, N x K elements) of the non-expert weight matrices, as the checkpoint
    holds them (the config's shapes; engines that fuse q/k/v or gate/up run fewer, larger
    GEMMs): attention (MLA: q_a, q_b or q, kv_a, kv_b, o; else q, k, v, o), shared-expert and
    dense-MLP matrices, routers and lm_head."""
    cfg = memory._flatten(p.cfg)
    m = p.model
    d, layers, L = m.hidden, m.n_layers or m.n_moe_layers, m.n_moe_layers
    h, kv, hd = memory._heads(cfg)
    if memory.is_mla(cfg):
        nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
        r_kv, r_q = cfg["kv_lora_rank"], cfg.get("q_lora_rank")
        q = [d * r_q, r_q * h * (nope + rope)] if r_q else [d * h * (nope + rope)]
        attn = q + [d * (r_kv + rope), r_kv * h * (nope + v), h * v * d]
    else:
        attn = [d * h * hd, d * kv * hd, d * kv * hd, h * hd * d]
    mats = 3 if m.gated else 2
    n_dense, width = memory.dense_mlp_layers(cfg, m)
    vocab = memory._get(cfg, "vocab_size", "padded_vocab_size", default=0)
    shapes = [(layers, nk) for nk in attn]
    shapes += [(L * mats, d * m.shared_intermediate), (n_dense * mats, d * width),
               (L, m.n_experts * d), (1, vocab * d)]
    return [(c, nk) for c, nk in shapes if c and nk]


def expert_work(p: Plan, rows: float, used_experts: float, held_experts: float | None = None) -> Work:
    """Routed experts on a GPU: `rows` token-expert pairs and `used_experts` experts read, all
    layers; `held_experts` experts per layer on this GPU (default all), for the tokens per
    expert the grouped GEMM runs at."""
    m = p.model
    flops = 2 * rows * m.expert_params * m.n_moe_layers
    lane, cls = expert_lane(p)
    bytes_ = m.n_moe_layers * (used_experts * m.expert_bytes + 2 * rows * m.hidden * m.f_a)
    x = rows / (held_experts or m.n_experts)
    return Work.of(Part("moe", cls, x,
                        flops=flops if lane == "bf16" else 0.0, flops_fp8=flops if lane == "fp8" else 0.0,
                        flops_fp4=flops if lane == "fp4" else 0.0, bytes=bytes_))


# --- EP communication (the one place issue 10's two-tier terms will replace) ---------------


def ep_comm_time(p: Plan, tokens_per_rank: float, ranks: int, imbalance: float | None = None) -> dict:
    """Dispatch and combine of one pass, all MoE layers, on the busiest rank: the two-tier
    legs of the closed form (`closed_form.ep_legs`, the same as `moelab gamma --ep-ranks R`).

    Per layer: 2 latencies + the slower of the network leg (remote nodes at B_net, DeepEP's
    per-node dispatch) and the NVLink leg (ranks in the node, and the forwarded copies), both
    scaled by the busiest rank's share. `imbalance` None: the closed form's, for uniform
    routing; a number (a skewed routing's, `Routing.imbalance`) replaces it.

    The latency is the network's (alpha_net, fitted on DeepEP's internode kernels) only when
    the ranks span nodes; inside one NVLink domain it is NVLink's (alpha_scale_up; no figure
    is published: 0 in the roofline). An engine's prediction inside one domain replaces it by
    the measured floor of its all-to-all (dispatch + combine at the smallest shapes) and runs
    the NVLink leg at the measured efficiency for its bytes; across nodes it keeps alpha_net
    and the network leg as they are (no internode table is derived).
    """
    m = p.model
    if ranks <= 1:
        return {"network_s": 0.0, "nvlink_s": 0.0, "latency_s": 0.0, "comm_s": 0.0,
                "fanout": 0.0, "imbalance": 1.0}
    one_domain = ranks <= p.gpus_per_node
    system = p.system.with_(gpus_per_node=min(ranks, p.gpus_per_node), b_nvlink=p.b_up)
    legs = ep_legs(m, system, Options(ep_ranks=ranks), tokens_per_rank)
    scale = 1.0 if imbalance is None else imbalance / legs.imbalance
    L = m.n_moe_layers
    alpha = p.alpha_scale_up if one_domain else system.alpha_net
    net, up, latency = L * scale * legs.t_net, L * scale * legs.t_nvlink, L * 2 * alpha
    if p.engine != "ideal":
        c, _ = _a2a_curve(p)
        if one_domain:
            latency = L * max(2 * alpha, efficiency.floor_s(c))
        up = up / efficiency.at(c, up / L * p.b_up)  # x: bytes per rank and layer over NVLink
    return {"network_s": net, "nvlink_s": up, "latency_s": latency, "comm_s": latency + max(net, up),
            "fanout": legs.tiers.ranks, "imbalance": legs.imbalance * scale}


def _a2a_curve(p: Plan):
    """The engine's all-to-all: low-latency kernels for decode, high-throughput for prefill."""
    cls = efficiency.engine(p.engine)["a2a"]["decode" if p.decode else "prefill"]
    return efficiency.curve(p.system.name, p.engine, cls, "bf16")


def tp_allreduce_time(p: Plan, tokens: float, split: int, count: float | None = None) -> float:
    """`count` all-reduces (default: one per layer) of `tokens` tokens' activations over `split`
    GPUs of one node: each the ring roofline 2 (s-1)/s bytes / B_nvlink + NVLink's latency; an
    engine's prediction pays its custom all-reduce's measured floor and runs the bytes at its
    measured efficiency."""
    if split <= 1:
        return 0.0
    m = p.model
    count = (m.n_layers or m.n_moe_layers) if count is None else count
    nbytes = tokens * m.hidden * m.f_a
    ring = 2 * (split - 1) / split * nbytes / p.b_up
    if p.engine == "ideal":
        return count * (allreduce_latency(p) + ring)
    c, _ = efficiency.curve(p.system.name, p.engine, "allreduce", "bf16")
    return count * (allreduce_latency(p) + ring / efficiency.at(c, nbytes))


def allreduce_latency(p: Plan) -> float:
    """One all-reduce's latency inside a node: NVLink's (the roofline's), or the engine's
    custom all-reduce's measured floor where that is longer."""
    if p.engine == "ideal":
        return p.alpha_scale_up
    c, _ = efficiency.curve(p.system.name, p.engine, "allreduce", "bf16")
    return max(p.alpha_scale_up, efficiency.floor_s(c))


# --- the strategies ---------------------------------------------------------------------------


def _result(name, gpus, feasible, reason, step=None, overlap=None, bound="", mem=None,
            tokens=0, **extra) -> dict:
    tps = tokens / step if feasible and step else None
    step = None if step is None else float(step)
    overlap = None if overlap is None else float(overlap)
    extra = {k: (float(v) if isinstance(v, np.floating) else v) for k, v in extra.items()}
    if "terms" in extra:
        extra["terms"] = {k: float(v) for k, v in extra["terms"].items()}
    return {"name": name, "feasible": feasible, "reason": reason, "gpus": gpus,
            "step_s": step, "step_overlap_s": overlap, "tokens_per_s": tps,
            "tokens_per_s_per_gpu": tps / gpus if tps else None, "memory": mem or {},
            "bound": bound, **extra}


def _gb(x: float) -> str:
    return f"{x / 1e9:,.1f} GB" if x >= 1e8 else f"{x / 1e6:,.3g} MB"


def _time(x: float) -> str:
    return f"{x * 1e3:,.3g} ms" if x < 1 else f"{x:,.3g} s"


def _slo(p: Plan, r: dict) -> dict:
    """A deployment slower than the latency budget is not an answer: say so, with the figures."""
    if r["feasible"] and p.slo_s is not None and r["step_s"] > p.slo_s:
        r.update(feasible=False, tokens_per_s=None, tokens_per_s_per_gpu=None,
                 reason=f"misses the latency budget: step {_time(r['step_s'])} > {_time(p.slo_s)}")
    return r


def plan_ep(p: Plan) -> dict:
    m, R, G = p.model, p.gpus, min(p.gpus, p.gpus_per_node)
    w_all = memory.weights_bytes(p.cfg, m)
    experts = memory.expert_weights_bytes(m)
    non_expert = w_all - experts
    experts_gpu = m.n_moe_layers * _share(m.n_experts, R) * m.expert_bytes
    # The busiest rank: ceil(N / R) tokens and, in decode, ceil(B / R) sequences' KV cache.
    n = _share(p.tokens, R)
    kv_gpu = (_share(p.sequences, R) * memory.kv_bytes(p.cfg, p.context, p.kv_dtype) if p.decode
              else p.kv_total() / R)
    # send + receive rows of the all-to-all; one GPU has none
    buffers = 2 * _share(p.tokens, R) * m.top_k * m.hidden * m.f_a if R > 1 else 0.0
    # The busiest rank's share: the closed form's for uniform (and the seed's worst-case)
    # routing, the routing's own for a skewed one (its experts round-robin over the ranks).
    skewed = p.routing.q is not None and p.routing.name != "uniform"
    # Two-batch overlap: each micro-batch carries half the tokens (and sequences) through its
    # own compute and dispatch/combine; the terms below are both halves' sum (tbo_step).
    mb = p.micro_batches
    comm = ep_comm_time(p, n / mb, R, p.routing.imbalance(R, m.top_k, m.n_experts) if skewed else None)
    comm = {**comm, **{k: mb * comm[k] for k in ("network_s", "nvlink_s", "latency_s", "comm_s")}}
    imb = comm["imbalance"]
    used, _ = p.routing.used(p.tokens / mb, m.top_k, m.n_experts)
    rows = p.tokens / mb * m.top_k / R * imb
    local_used = min(used / R * imb, _share(m.n_experts, R))
    options = []
    modes = [("data-parallel attention", 1)] + ([("tensor-parallel attention", G)] if G > 1 else [])
    for mode, split in modes:
        # Tensor parallelism splits the KV cache by KV head; MLA's one latent per token and
        # GQA heads fewer than the GPUs are replicated (DP attention never replicates it).
        kv_copies = split / kv_head_split(p.cfg, split)
        need = {"experts": experts_gpu, "non_expert": non_expert / split,
                "kv": kv_gpu * kv_copies, "a2a_buffers": buffers}
        total = sum(need.values())
        if total > p.usable_hbm:
            options.append((mode, need, total, None))
            continue
        # one micro-batch: its tokens and its sequences' KV; every micro-batch reads the weights
        work = non_expert_work(p, n * split / mb, non_expert / split, kv_gpu * kv_copies / mb, split)
        tp = mb * tp_allreduce_time(p, n * split / mb, split)  # the node's activations, once per layer
        ex = expert_work(p, rows, local_used, m.n_experts / R)
        compute = mb * (work.predict(p) + ex.predict(p)) * _tbo_sm_slowdown(p) + tp
        options.append((mode, need, total, (compute, work + ex, tp)))
    fits = [o for o in options if o[3] is not None]

    def mem_for(need, total):
        return _instance_memory(p, need, total, R, w_all)
    if not fits:
        mode, need, total, _ = min(options, key=lambda o: o[2])
        why = _does_not_fit(p, need, total, mode)
        if w_all + p.kv_total() > R * p.usable_hbm:
            why += (f"; weights {_gb(w_all)} + KV {_gb(p.kv_total())} exceed all {R} GPUs' "
                    f"{_gb(R * p.usable_hbm)}")
        return _result("ep", R, False, why, mem=mem_for(need, total))
    mode, need, total, (compute, work, tp) = min(fits, key=lambda o: o[3][0])
    terms = {"compute_s": compute - tp, "tp_allreduce_s": tp, "network_s": comm["network_s"],
             "nvlink_s": comm["nvlink_s"], "ep_latency_s": comm["latency_s"]}
    step, overlap, terms = _combine(p, terms, lambda t: strategy_step("ep", t, mb, m.n_moe_layers))
    bound = _bound(terms, work.bound(p.system))
    return _slo(p, _result("ep", R, True, f"{mode}, {m.n_experts} experts over {R} GPUs "
                                          f"({_share(m.n_experts, R)} per GPU), busiest rank x{imb:.3g}"
                                          + (", two-batch overlap" if mb == 2 else ""),
                           step, overlap, bound, mem_for(need, total), p.tokens, terms=terms,
                           attention=mode, imbalance=imb, fanout=comm["fanout"],
                           ep_comm_s=comm["comm_s"], micro_batches=mb))


def _ep_step(t: dict, micro_batches: int = 1, layers: int = 1) -> tuple[float, float]:
    """EP: compute and all-reduce, then dispatch and combine (their latency + the slower leg);
    with two micro-batches, the two-batch-overlap pipeline of both halves' terms (tbo_step)."""
    comm = t["ep_latency_s"] + max(t["network_s"], t["nvlink_s"])
    compute = t["compute_s"] + t["tp_allreduce_s"]
    if micro_batches == 1:
        return compute + comm, max(compute, comm)
    return tbo_step(compute, comm, layers), max(compute, comm)


def tbo_step(compute: float, comm: float, layers: int) -> float:
    """Step of two-batch overlap (TBO), from both micro-batches' totals over all layers.

    The schedule is SGLang's (python/sglang/srt/operations_strategy.py: each MoE layer of a
    micro-batch runs its computation, then its dispatch and combine, with yield points between
    them; the executor alternates the two micro-batches, so one's computation runs while the
    other's communication is in flight), after DeepSeek's dual micro-batch overlap
    (profile-data README). With c and m one micro-batch's computation and communication per
    MoE layer (c = compute / 2L, m = comm / 2L: each half evaluated at its own shape before),
    the compute stream runs A1 | B1 A2 | B2 A3 ... and the communication stream A1 | B1 ...
    one slot behind: the first slot is A's computation alone, the last B's communication
    alone, and each of the 2L - 1 slots between holds one computation and the other
    micro-batch's communication, the slower deciding:

        step = c + m + (2L - 1) max(c, m)

    One layer: c + max(c, m) + m. It lies between max(compute, comm) and compute + comm when
    each half costs half of the whole; it is more when halving the batch costs efficiency
    (the weights are read once per micro-batch). Coarse: the source's finer stages (attention
    split from the experts, dispatch from combine) can balance a little better; the dense
    layers' computation is spread over the MoE layers."""
    L = max(1, layers)
    c, m = compute / (2 * L), comm / (2 * L)
    return c + m + (2 * L - 1) * max(c, m)


def _tbo_sm_slowdown(p: Plan) -> float:
    """How much slower computation runs under two-batch overlap in prefill: DeepEP's normal
    kernels hold their SMs (TBO_PREFILL_*); 1 for decode and without overlap."""
    if p.micro_batches == 1 or p.decode:
        return 1.0
    return TBO_PREFILL_TOTAL_SMS / TBO_PREFILL_COMPUTE_SMS


def plan_tp(p: Plan) -> dict:
    """Expert tensor parallelism: one instance over R GPUs of one node, each GPU holding 1/R of
    every expert (gate/up by columns, down by rows), so every GPU sees every token.

    Attention tensor-parallel (weights and KV heads split, 2 all-reduces per layer: after
    o_proj and after the MoE/MLP down projection, as vLLM's and SGLang's TP models do) or
    data-parallel (weights replicated, tokens split; the MoE layers gather all tokens and
    scatter the partial sums back: the bytes of one all-reduce, two latencies), whichever fits
    and is faster.
        step = attention work + expert work / R + all-reduces       (no overlap: each
        all-reduce's result is the next operation's input)
    """
    m, R = p.model, p.gpus
    if p.gpus_per_node < R:
        return _result("tp", R, False, f"expert tensor parallelism over {R} GPUs spans nodes of "
                       f"{p.gpus_per_node}: not modelled (TP runs inside one NVLink domain)")
    w_all = memory.weights_bytes(p.cfg, m)
    experts = memory.expert_weights_bytes(m)
    non_expert = w_all - experts
    used, _ = p.routing.used(p.tokens, m.top_k, m.n_experts)
    rows = p.tokens * m.top_k
    # 1/R of each used expert's weights and FLOPs; the activations are read and written
    # whole on every GPU (input rows in, partial output rows out), hence the second term.
    held = m.n_experts / R  # the grouped GEMM runs at rows / E tokens per (sliced) expert
    ex = (expert_work(p, rows / R, used / R, held)
          + Work.of(Part("moe", expert_lane(p)[1], rows / R / held,
                         bytes=m.n_moe_layers * 2 * rows * (1 - 1 / R) * m.hidden * m.f_a)))
    L_all = m.n_layers or m.n_moe_layers
    kv_seq = memory.kv_bytes(p.cfg, p.context, p.kv_dtype)
    options = []
    modes = [("tensor-parallel attention", R)] + ([("data-parallel attention", 1)] if R > 1 else [])
    for mode, split in modes:
        if split > 1:
            kv = p.kv_total() / kv_head_split(p.cfg, split)  # split by KV head; MLA's replicated
            work = non_expert_work(p, p.tokens, non_expert / split, kv, split)
            tp = tp_allreduce_time(p, p.tokens, R, 2 * L_all)
        else:
            n = _share(p.tokens, R)
            kv = _share(p.sequences, R) * kv_seq if p.decode else p.kv_total() / R
            work = non_expert_work(p, n, non_expert, kv)
            # gather + scatter: one all-reduce's bytes and its latency, plus one more latency
            tp = (tp_allreduce_time(p, p.tokens, R, m.n_moe_layers)
                  + (m.n_moe_layers * allreduce_latency(p) if R > 1 else 0.0))
        need = {"experts": experts / R, "non_expert": non_expert / split, "kv": kv}
        total = sum(need.values())
        fit = total <= p.usable_hbm
        compute = work.predict(p) + ex.predict(p)
        options.append((mode, need, total, (compute, work + ex, tp) if fit else None))
    fits = [o for o in options if o[3] is not None]

    def mem_for(need, total):
        return _instance_memory(p, need, total, R, w_all)
    if not fits:
        mode, need, total, _ = min(options, key=lambda o: o[2])
        return _result("tp", R, False, _does_not_fit(p, need, total, mode), mem=mem_for(need, total))
    mode, need, total, (compute, work, tp) = min(fits, key=lambda o: o[3][0] + o[3][2])
    terms = {"compute_s": compute, "tp_allreduce_s": tp}
    step, overlap, terms = _combine(p, terms, lambda t: strategy_step("tp", t))
    return _slo(p, _result("tp", R, True, f"{mode}, each of {m.n_experts} experts split over {R} GPUs "
                                          f"(1/{R} of every expert per GPU)",
                           step, overlap, _bound(terms, work.bound(p.system)), mem_for(need, total),
                           p.tokens, terms=terms, attention=mode, imbalance=1.0))


def _instance_memory(p: Plan, need: dict, total: float, gpus: int, weights: float) -> dict:
    """The memory of one instance over `gpus` GPUs: each GPU's parts, what it needs and can use."""
    return {"gpu_each": {**need, "needed": total, "available": p.usable_hbm},
            "gpu_total_needed": total * gpus, "weights_total": weights}


def _does_not_fit(p: Plan, need: dict, total: float, mode: str) -> str:
    """Why an instance does not fit one GPU, with its parts (ep's all-to-all buffers where it has them)."""
    labels = (("experts", "experts"), ("non_expert", "non-expert"), ("kv", "KV"), ("a2a_buffers", "buffers"))
    parts = " + ".join(f"{label} {_gb(need[key])}" for key, label in labels if key in need)
    return (f"does not fit: needs {_gb(total)} per GPU ({parts}, {mode}) > {_gb(p.usable_hbm)} usable "
            f"({p.hbm_utilization:g} x {_gb(p.system.hbm_bytes)})")


def kv_head_split(cfg: dict, tp: int) -> int:
    """Over how many of `tp` tensor-parallel GPUs the KV cache is split: by KV head, up to
    the number of KV heads; MLA's latent cache is not split at all."""
    flat = memory._flatten(cfg)
    if memory.is_mla(flat):
        return 1
    _, kv_heads, _ = memory._heads(flat)
    return max(1, min(tp, kv_heads))


def _bound(terms: dict, compute_kind: str) -> str:
    names = {"compute_s": compute_kind, "tp_allreduce_s": "NVLink (TP all-reduce)",
             "network_s": "network (EP all-to-all)", "nvlink_s": "NVLink (EP all-to-all)",
             "stream_s": "host link", "link_s": "host link (activations)",
             "cpu_s": "CPU", "gpu_experts_s": "GPU experts", "ep_latency_s": "latency (EP collectives)"}
    key = max(terms, key=terms.get)
    return names.get(key, key)


def _replicas(p: Plan) -> tuple[int, int, int, float]:
    """Single-GPU strategies: (replicas, tokens per replica, sequences per replica, GPUs per node)."""
    g = min(p.replicas or p.gpus, p.gpus, p.tokens)
    per_node = min(g, p.gpus_per_node)
    return g, _share(p.tokens, g), _share(p.sequences, g), per_node


def _host_stream_bw(p: Plan, per_node: int) -> tuple[float, str]:
    """Bandwidth one GPU streams from host DRAM at: its link's share, or the node DRAM's share."""
    link = p.system.b_pcie / p.gpus_per_host_link
    dram = p.cpu.bandwidth(p.nominal) / per_node
    return (link, "host link") if link <= dram else (dram, "host DRAM bandwidth")


def plan_offload(p: Plan) -> dict:
    m = p.model
    g, n, seqs, per_node = _replicas(p)
    non_expert = memory.non_expert_weights_bytes(p.cfg, m)
    kv = seqs * memory.kv_bytes(p.cfg, p.context, p.kv_dtype)
    staging = 2 * m.expert_bytes  # double buffer: one expert arriving while one computes
    resident_need = non_expert + kv + staging
    experts_all = memory.expert_weights_bytes(m)
    host_need = experts_all
    mem = {"gpu_each": {"non_expert": non_expert, "kv": kv, "staging": staging,
                        "needed": resident_need, "available": p.usable_hbm},
           "host_node": {"experts": experts_all, "needed": host_need, "available": p.host_mem}}
    if resident_need > p.usable_hbm:
        return _result("offload", g, False,
                       f"does not fit: non-expert weights {_gb(non_expert)} + KV {_gb(kv)} + "
                       f"staging {_gb(staging)} = {_gb(resident_need)} > {_gb(p.usable_hbm)} usable HBM",
                       mem=mem)
    if host_need > p.host_mem:
        return _result("offload", g, False, f"host cannot hold the experts: {_gb(host_need)} > "
                       f"{_gb(p.host_mem)} host memory", mem=mem)
    slots = int((p.usable_hbm - resident_need) // m.expert_bytes)
    r = min(m.n_experts, slots // m.n_moe_layers)  # resident experts per layer (the hottest)
    mem["gpu_each"]["expert_cache"] = r * m.n_moe_layers * m.expert_bytes
    used, misses = p.routing.used(n, m.top_k, m.n_experts, r)
    bw, link_kind = _host_stream_bw(p, per_node)
    stream = m.n_moe_layers * misses * (p.system.alpha_pcie + m.expert_bytes / bw)
    if p.engine != "ideal" and misses > 1e-12:
        # Beyond the roofline: per layer that streams, the host reads the routing back (a
        # device-to-host round trip) before it can launch the copies (measured, predict/cpu.json).
        stream += m.n_moe_layers * _cpu_factors(p).sync_s
    work = non_expert_work(p, n, non_expert, kv) + expert_work(p, n * m.top_k, used)
    compute = work.predict(p)
    terms = {"compute_s": compute, "stream_s": stream}
    step, overlap, terms = _combine(p, terms, lambda t: strategy_step("offload", t))
    bound = _bound(terms, work.bound(p.system))
    if bound == "host link":
        bound = link_kind
    hit = 1 - misses / used if used else 1.0
    return _slo(p, _result(
        "offload", g, True,
        f"{r} of {m.n_experts} experts per layer resident, hit rate {hit:.1%}; "
        f"{misses:,.3g} experts per layer stream at {bw / 1e9:,.3g} GB/s ({link_kind})",
        step, overlap, bound, mem, p.tokens, terms=terms,
        resident_per_layer=r, resident_fraction=r / m.n_experts, hit_rate=hit,
        stream_bandwidth=bw, misses_per_layer=misses, used_per_layer=used))


def _cpu_expert_time(p: Plan, n: float, used: float, per_node: int) -> tuple[float, str]:
    """CPU time for one MoE layer: roofline of the used experts' bytes from DRAM and the
    matrix FLOPs, on this GPU's share of the node's CPUs. A measured rate (calibrate --cpu:
    GEMV GB/s of weights, prefill-batch ops/s) beats a peak. An engine other than "ideal" gets
    its achieved rates (costmodel/predict/cpu.json) where nothing is measured: the matrix
    units at its kernels' efficiency, DRAM at its fraction per socket times its NUMA scaling
    over the sockets."""
    m = p.model
    f = CPU_DTYPE_BYTES[p.cpu_expert_dtype]
    flops, flops_measured = p.cpu.matmul_rate(p.cpu_expert_dtype, p.nominal)
    bw, bw_measured = p.cpu.weight_bandwidth(p.cpu_expert_dtype, p.nominal)
    flops, bw = flops / per_node, bw / per_node
    serial = False
    if p.engine != "ideal":
        a = _cpu_factors(p)
        if not flops_measured:
            flops *= a.matmul_efficiency
            # a kernel rate on cached data (KTransformers' AMX): its blocks come from DRAM first
            serial = a.serial_dram
        if not bw_measured:
            bw *= a.dram_fraction * a.numa_scale / p.cpu.sockets
    t_mem = used * m.expert_params * f / bw
    t_flop = 2 * n * m.top_k * m.expert_params / flops
    kind = "CPU DRAM bandwidth" if t_mem >= t_flop else "CPU matrix throughput"
    return (t_mem + t_flop if serial else max(t_mem, t_flop)), kind


def _cpu_factors(p: Plan) -> cpu_achieved.Achieved:
    """The engine's achieved CPU figures for this CPU, instruction set, expert format and sockets."""
    return cpu_achieved.achieved(p.engine, p.cpu.isa, CPU_COMPUTE_DTYPE[p.cpu_expert_dtype],
                                 p.cpu.sockets, CPU_DTYPE_BYTES)


def _link_round_trip(p: Plan, n: float) -> float:
    """Activations to the CPU and results back, one MoE layer: two transfers, each with latency;
    beyond the roofline, the CPU-GPU synchronisation each hand-over costs (measured)."""
    b = p.system.b_pcie / p.gpus_per_host_link
    sync = _cpu_factors(p).sync_s if p.engine != "ideal" else 0.0
    return 2 * (p.system.alpha_pcie + n * p.model.hidden * p.model.f_a / b) + sync


def plan_hybrid(p: Plan, name: str = "hybrid") -> dict:
    """cpu-experts is the hybrid with no expert on the GPU."""
    m = p.model
    g, n, seqs, per_node = _replicas(p)
    non_expert = memory.non_expert_weights_bytes(p.cfg, m)
    kv = seqs * memory.kv_bytes(p.cfg, p.context, p.kv_dtype)
    f_cpu = CPU_DTYPE_BYTES[p.cpu_expert_dtype]
    host_need = m.n_moe_layers * m.n_experts * m.expert_params * f_cpu
    gpu_need = non_expert + kv
    mem = {"gpu_each": {"non_expert": non_expert, "kv": kv, "needed": gpu_need,
                        "available": p.usable_hbm},
           "host_node": {"experts": host_need, "needed": host_need, "available": p.host_mem,
                         "dtype": p.cpu_expert_dtype}}
    if gpu_need > p.usable_hbm:
        return _result(name, g, False, f"does not fit: non-expert weights {_gb(non_expert)} + KV "
                       f"{_gb(kv)} = {_gb(gpu_need)} > {_gb(p.usable_hbm)} usable HBM", mem=mem)
    if host_need > p.host_mem:
        return _result(name, g, False, f"host cannot hold the experts at {p.cpu_expert_dtype}: "
                       f"{_gb(host_need)} > {_gb(p.host_mem)} host memory", mem=mem)
    r_max = 0
    if name == "hybrid":
        r_max = min(m.n_experts, int((p.usable_hbm - gpu_need) // m.expert_bytes) // m.n_moe_layers)
    gpu_part = non_expert_work(p, n, non_expert, kv)
    t_gpu = gpu_part.predict(p)
    eager = _eager_attention_s(p, gpu_part)
    if eager is not None:  # eager attention replaces the fused kernels' part
        t_gpu = Work.of(*(q for q in gpu_part.parts if q.cls != "attn_prefill")).predict(p)
    best = None
    for r in range(r_max + 1):  # every split: the step need not be monotone in r
        used, cpu_used = p.routing.used(n, m.top_k, m.n_experts, r)
        gpu_used = used - cpu_used
        share = p.routing.pairs_beyond(r, m.n_experts)  # token-expert pairs the CPU takes
        t_cpu, cpu_kind = _cpu_expert_time(p, n * share, cpu_used, per_node)
        link = _link_round_trip(p, n) if cpu_used > 1e-12 else 0.0
        t_gexp = expert_work(p, n * m.top_k * (1 - share), gpu_used, r).predict(p) / m.n_moe_layers
        L = m.n_moe_layers
        terms = {"compute_s": t_gpu, "cpu_s": L * t_cpu, "link_s": L * link, "gpu_experts_s": L * t_gexp}
        lw = _layerwise_prefill(p, n, r, used, cpu_used, per_node, gpu_need)
        if lw is not None and max(lw) < max(t_gexp, link + t_cpu):  # the GPU computes all, streamed
            terms = {"compute_s": t_gpu, "cpu_s": 0.0, "link_s": 0.0, "gpu_experts_s": L * lw[1],
                     "stream_s": L * lw[0]}
        if eager is not None:
            terms["eager_attention_s"] = eager
        step, overlap, terms = _combine(p, terms, lambda t: strategy_step(name, t))
        if best is None or step < best[0] - 1e-15:
            best = (step, overlap, terms, r, cpu_kind, used, cpu_used)
    step, overlap, terms, r, cpu_kind, used, cpu_used = best
    L = m.n_moe_layers
    bound = _bound(terms, gpu_part.bound(p.system))
    if bound == "CPU":
        bound = cpu_kind
    mem["gpu_each"]["experts_on_gpu"] = r * L * m.expert_bytes
    mem["gpu_each"]["needed"] = gpu_need + r * L * m.expert_bytes
    on = f"{p.cpu.name} ({p.cpu_expert_dtype}{', ' + p.cpu.isa if p.cpu.isa else ''})"
    what = (f"hottest {r} of {m.n_experts} experts per layer on the GPU, the rest on {on}"
            if name == "hybrid" else f"routed experts on {on}")
    if r == m.n_experts:  # no split with CPU experts is faster: this is all on the GPU
        what = f"all {r} experts per layer on the GPU (no split with {on} is faster)"
    if "stream_s" in terms:
        mem["gpu_each"]["layerwise_staging"] = (m.n_experts - r) * m.expert_bytes
        mem["gpu_each"]["needed"] += mem["gpu_each"]["layerwise_staging"]
        what = (f"layerwise GPU prefill (KTransformers' prefill above --kt-gpu-prefill-token-threshold): "
                f"the {cpu_used:,.3g} used experts per layer not on the GPU stream to it layer by layer, "
                f"faster than {on} for this prefill; {r} of {m.n_experts} resident")
        cpu_used = 0.0
    extra = {}
    if p.engine != "ideal":  # the achieved CPU figures used, with their sources
        extra["cpu_efficiency"] = _cpu_factors(p).as_dict()
        what += f", {p.engine} ({'; '.join(_cpu_rate_notes(p))})"
    return _slo(p, _result(name, g, True, f"{what}: the CPU computes {cpu_used:,.3g} of the "
                                          f"{used:,.3g} experts used per layer",
                           step, overlap, bound, mem, p.tokens, terms=terms, gpu_experts_per_layer=r,
                           cpu_used_per_layer=cpu_used, **extra))


def _cpu_rate_notes(p: Plan) -> list[str]:
    """What the CPU's rates in the reason are: a measured figure (a calibrated file) named as
    such, an engine factor quoted only where `_cpu_expert_time` applies it (not over a
    measured rate), and the per-layer sync, which always applies."""
    dtype, c = p.cpu_expert_dtype, p.cpu
    flops, flops_measured = c.matmul_rate(dtype, p.nominal)
    bw, bw_measured = c.weight_bandwidth(dtype, p.nominal)
    notes = []
    if flops_measured:
        of = dtype if dtype in c.matmul_measured else CPU_COMPUTE_DTYPE[dtype]
        notes.append(f"{of} matrix rate {flops / 1e12:.3g} T ops/s measured in {c.name} (all sockets)")
    else:
        notes.append(cpu_achieved.matmul_efficiency(p.engine, c.isa, CPU_COMPUTE_DTYPE[dtype])[1])
        a = _cpu_factors(p)
        if a.serial_dram:  # its note comes last
            notes.append(a.notes[-1])
    if bw_measured:
        what = f"{dtype} one-token GEMV" if dtype in c.gemv_measured else "DRAM triad"
        notes.append(f"{what} {bw / 1e9:.3g} GB/s measured in {c.name} (all sockets)")
    else:
        notes.append(cpu_achieved.dram_fraction(p.engine, CPU_DTYPE_BYTES)[1])
        notes.append(cpu_achieved.numa_scale(p.engine, c.sockets)[1])
    notes.append(cpu_achieved.sync_per_layer()[1])
    return [n for n in notes if n]


def _layerwise_prefill(p: Plan, n: int, r: int, used: float, cpu_used: float, per_node: int,
                       gpu_need: float) -> tuple[float, float] | None:
    """KTransformers' layerwise GPU prefill (kt-kernel: above --kt-gpu-prefill-token-threshold the
    prefill streams each layer's experts to the GPU instead of computing them on the CPU), for
    one MoE layer: (stream time of the used experts not resident, GPU time of all used experts),
    overlapped layer by layer. None where it does not apply: decode, the roofline engine
    ("ideal" keeps today's strategies), nothing to stream, or no HBM for one layer's experts."""
    m = p.model
    staging = (m.n_experts - r) * m.expert_bytes
    if p.decode or p.engine == "ideal" or cpu_used <= 1e-12 or \
            gpu_need + r * m.n_moe_layers * m.expert_bytes + staging > p.usable_hbm:
        return None
    bw, _ = _host_stream_bw(p, per_node)
    t_stream = cpu_used * (p.system.alpha_pcie + m.expert_bytes / bw)
    t_gpu = expert_work(p, n * m.top_k, used).predict(p) / m.n_moe_layers
    return t_stream, t_gpu


def _hybrid_step(t: dict) -> tuple[float, float]:
    """Hybrid: the GPU's own work, then per MoE layer the slower of its experts and the CPU's
    (round trip + compute), summed over the layers (L max(a, b) = max(L a, L b)). With
    KTransformers' layerwise prefill the CPU's share is 0 and each layer's expert copies
    (stream_s) overlap the GPU's expert work."""
    experts = max(t["gpu_experts_s"], t["link_s"] + t["cpu_s"], t.get("stream_s", 0.0))
    gpu = t["compute_s"] + t.get("eager_attention_s", 0.0)
    return gpu + experts, max(gpu, experts)


def _eager_attention_s(p: Plan, gpu_part: Work) -> float | None:
    """Eager prefill attention, all layers (None for fused kernels or decode): the scores of
    every query-key pair of the prompt are computed as batched GEMMs, the masked half included
    (the fused count in `gpu_part` is causal: tokens x (context - tokens / 2) pairs), at the
    engine's GEMM efficiency, and written to and read from HBM, EAGER_SCORE_BYTES per head and
    pair, at the GPU's HBM bandwidth. It replaces the fused attention part of `gpu_part`."""
    if p.decode or p.prefill_attention != "eager":
        return None
    heads, _, _ = memory._heads(memory._flatten(p.cfg))
    held = max(1.0, p.context - min(p.tokens, p.context) / 2)
    flops = sum(q.flops for q in gpu_part.parts if q.cls == "attn_prefill") * p.context / held
    gemm = Work.of(Part("gemm", "bf16", p.tokens, flops=flops)).predict(p)
    pairs = p.tokens * p.context  # each prompt token against its whole prompt
    layers = p.model.n_layers or p.model.n_moe_layers
    return gemm + layers * heads * pairs * EAGER_SCORE_BYTES / p.system.hbm_bw


def plan_cpu_experts(p: Plan) -> dict:
    return plan_hybrid(p, "cpu-experts")


def best_replicas(p: Plan, strategy) -> dict:
    """A single-GPU strategy on 1, 2, 4, ... up to all GPUs (one instance each, the traffic
    split evenly): the count with the most tokens/s per GPU. Fewer instances share the
    host's DRAM and cores among fewer GPUs and read each expert for more tokens."""
    counts = sorted({min(2**i, p.gpus) for i in range(p.gpus.bit_length() + 1)})
    results = [strategy(replace(p, replicas=g)) for g in counts]
    feasible = [r for r in results if r["feasible"]]
    if not feasible:
        return results[-1]
    return max(feasible, key=lambda r: r["tokens_per_s_per_gpu"])


def with_bound(p: Plan, strategy, result: dict) -> dict:
    """The result with its roofline beside it: `bound_step_s` and `bound_terms` are the
    strategy's at the same GPU count under the ideal engine and no profile (its best attention
    mode or split there, so bound <= prediction whenever the engine's efficiencies are <= 1)."""
    result["engine"] = p.engine
    result["efficiency_sources"] = efficiency_sources(p, result)
    if p.profile is not None:
        result["profile"] = p.profile.path or "(dict)"
    if p.engine == "ideal" and p.profile is None:
        b = result
    else:
        ideal = replace(p, engine="ideal", profile=None, slo_s=None,
                        replicas=None if strategy is plan_ep else result["gpus"])
        b = strategy(ideal)
    result["bound_step_s"] = b["step_s"]
    result["bound_terms"] = dict(b.get("terms", {}))
    return result


def efficiency_sources(p: Plan, result: dict) -> list:
    """Where each op class's efficiency came from, for the classes this strategy runs."""
    if p.engine == "ideal":
        return [{"op": "all", "dtype": "", "source": "ideal: the roofline"}]
    _, dtype = _linear_params_active(p)
    mla = memory.is_mla(memory._flatten(p.cfg))
    used = [("gemm", "fp8" if dtype == "fp8" else "bf16"),
            (("mla_decode" if mla else "attn_decode") if p.decode else "attn_prefill",
             "fp8" if p.kv_dtype == "fp8" else "bf16"),
            ("moe", expert_lane(p)[1])]
    if result["name"] == "ep" and result["gpus"] > 1:
        used.append((efficiency.engine(p.engine)["a2a"]["decode" if p.decode else "prefill"], "bf16"))
    # all-reduces: ep's tensor-parallel attention, and every expert-TP instance over GPUs
    if result["gpus"] > 1 and (result["name"] == "tp"
                               or result.get("attention") == "tensor-parallel attention"):
        used.append(("allreduce", "bf16"))
    out = [{"op": cls, "dtype": dt, "source": (efficiency.gemm_curve(p.system.name, p.engine, dt, 0)
                                                if cls == "gemm" else
                                                efficiency.curve(p.system.name, p.engine, cls, dt))[1]}
           for cls, dt in used]
    if expert_lane(p)[0] == "fp4":  # the moe entry: its curve stands in for a missing nvfp4 one
        out[2]["source"] += f"; {efficiency.NVFP4_NOTE}"
    return out


def plan_all(p: Plan) -> dict:
    """The five strategies, ranked: feasible first, then by tokens/s per GPU."""
    strategies = [with_bound(p, plan_tp, plan_tp(p)), with_bound(p, plan_ep, plan_ep(p))] + [
        with_bound(p, s, best_replicas(p, s)) for s in (plan_offload, plan_cpu_experts, plan_hybrid)]
    ranked = sorted(strategies, key=lambda s: (not s["feasible"], -(s["tokens_per_s_per_gpu"] or 0)))
    best = ranked[0]["name"] if ranked[0]["feasible"] else None
    return {"strategies": ranked, "best": best}



def sample_steps(routing: Routing, n_layers: int, n_experts: int, k: int, tokens: int,
                 steps: int, seed: int = 0) -> list[tuple[int, list[int]]]:
    """A concrete routing for cache simulations: (layer, used experts) in execution order, for
    `steps` passes of `tokens` tokens. Each token draws k distinct experts by popularity (the
    Gumbel top-k of log p); the worst case gives every pass the first min(k n, E) experts,
    shifted each pass so that no expert is reused while others wait."""
    rng = np.random.default_rng(seed)
    out = []
    if routing.ids is not None:  # the recorded tokens in order, `tokens` per pass, while they last
        recorded = min(len(t) for t in routing.ids)
        steps = min(steps, recorded // tokens)
    for step in range(steps):
        for layer in range(n_layers):
            if routing.ids is not None:
                rec = routing.ids[layer % len(routing.ids)][step * tokens:(step + 1) * tokens]
                used = sorted({e for token in rec for e in token})
            elif routing.q is None:
                m = min(k * tokens, n_experts)
                used = [(step * m + i) % n_experts for i in range(m)]
            else:
                q = routing.q[layer % routing.q.shape[0]]
                logp = np.log(np.maximum(q, 1e-300))
                scores = logp + rng.gumbel(size=(tokens, n_experts))
                picks = np.argpartition(-scores, k - 1, axis=1)[:, :k]
                used = np.unique(picks).tolist()
            out.append((layer, used))
    return out
