"""Which deployment to pick: EP, offload, CPU experts or a hybrid, each with memory and step time.

The traffic is the deployment's: `tokens` tokens per forward pass (a prefill chunk, or a
decode batch of `sequences` sequences at `context` tokens each). Each strategy spreads it:

- **ep**: one instance over R GPUs in nodes of G. Routed experts sharded E/R per GPU;
  attention data-parallel (weights replicated, tokens split) or tensor-parallel inside a
  node (weights split, one all-reduce per layer), whichever fits and is faster.
      step = compute(busiest rank) + L [dispatch + combine]          (overlapped: max)
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
from moelab.costmodel.specs import ModelSpec, Options, SpecError, SystemSpec

# Bytes per weight of the CPU expert formats: llama.cpp's Q8_0 and Q4_0 blocks hold 32
# values and one fp16 scale (8.5 and 4.5 bits); bf16 plain.
CPU_DTYPE_BYTES = {"bf16": 2.0, "int8": 8.5 / 8, "int4": 4.5 / 8}
# int4 is unpacked to int8 for the matrix units (AMX/VNNI have no int4 multiply).
CPU_COMPUTE_DTYPE = {"bf16": "bf16", "int8": "int8", "int4": "int8"}
STRATEGIES = ("ep", "offload", "cpu-experts", "hybrid")
SKEWED = "zipf:1.2"  # what --routing skewed means
HBM_UTILIZATION = 0.9  # share of HBM an engine may fill (vLLM's --gpu-memory-utilization default)



@dataclass(frozen=True)
class CpuSpec:
    """The CPUs of one node (all sockets): DRAM bandwidth and matrix throughput per dtype."""

    name: str
    sockets: int
    dram_bw: float  # nominal, B/s, all sockets
    dram_bw_measured: float  # published measurement (STREAM-like), B/s; 0 if none
    matmul_flops: dict = field(default_factory=dict)  # dtype -> FLOP/s (ops/s for int8), all sockets
    source: str = ""
    isa: str = ""  # the matrix instruction set matmul_flops is for (amx, avx512, sve2)

    def __post_init__(self):
        if isinstance(self.sockets, bool) or not isinstance(self.sockets, int) or self.sockets < 1:
            raise SpecError(f"cpu: sockets must be an integer >= 1, got {self.sockets!r}")
        for f in ("dram_bw", "dram_bw_measured"):
            v = getattr(self, f)
            if not isinstance(v, int | float) or not math.isfinite(v) or v < 0 or (f == "dram_bw" and v == 0):
                raise SpecError(f"cpu: {f} must be a finite number {'> 0' if f == 'dram_bw' else '>= 0'}, "
                                f"got {v!r}")
        for dtype in ("bf16", "int8"):
            v = self.matmul_flops.get(dtype)
            if not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise SpecError(f"cpu: matmul_flops[{dtype!r}] must be a finite number > 0, got {v!r}")

    def bandwidth(self, nominal: bool) -> float:
        return self.dram_bw if nominal or not self.dram_bw_measured else self.dram_bw_measured


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


# --- GPU compute --------------------------------------------------------------------------


@dataclass(frozen=True)
class Work:
    """FLOPs and HBM bytes of one pass on one GPU, split into the parts the report names."""

    flops: float = 0.0
    flops_fp8: float = 0.0  # FLOPs that run at the fp8 peak (fp8 weights)
    bytes: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.flops_fp8 + other.flops_fp8, self.bytes + other.bytes)

    def time(self, system: SystemSpec) -> float:
        """Roofline: the FLOPs at their peaks, or the HBM bytes, whichever is slower."""
        return max(self.flops / system.peak_flops + self.flops_fp8 / system.peak_flops_fp8,
                   self.bytes / system.hbm_bw)

    def bound(self, system: SystemSpec) -> str:
        compute = self.flops / system.peak_flops + self.flops_fp8 / system.peak_flops_fp8
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
    return Work(flops=core + (0 if fp8 else linear), flops_fp8=linear if fp8 else 0.0,
                bytes=weight_bytes + kv_bytes + act)


def expert_work(p: Plan, rows: float, used_experts: float) -> Work:
    """Routed experts on a GPU: `rows` token-expert pairs and `used_experts` experts read, all layers."""
    m = p.model
    flops = 2 * rows * m.expert_params * m.n_moe_layers
    fp8 = m.expert_dtype == "fp8"
    bytes_ = m.n_moe_layers * (used_experts * m.expert_bytes + 2 * rows * m.hidden * m.f_a)
    return Work(flops=0 if fp8 else flops, flops_fp8=flops if fp8 else 0.0, bytes=bytes_)


# --- EP communication (the one place issue 10's two-tier terms will replace) ---------------


def ep_comm_time(p: Plan, tokens_per_rank: float, ranks: int, imbalance: float | None = None) -> dict:
    """Dispatch and combine of one pass, all MoE layers, on the busiest rank: the two-tier
    legs of the closed form (`closed_form.ep_legs`, the same as `moelab gamma --ep-ranks R`).

    Per layer: 2 alpha_net + the slower of the network leg (remote nodes at B_net, DeepEP's
    per-node dispatch) and the NVLink leg (ranks in the node, and the forwarded copies), both
    scaled by the busiest rank's share. `imbalance` None: the closed form's, for uniform
    routing; a number (a skewed routing's, `Routing.imbalance`) replaces it.
    """
    m = p.model
    if ranks <= 1:
        return {"network_s": 0.0, "nvlink_s": 0.0, "latency_s": 0.0, "comm_s": 0.0,
                "fanout": 0.0, "imbalance": 1.0}
    system = p.system.with_(gpus_per_node=min(ranks, p.gpus_per_node), b_nvlink=p.b_up)
    legs = ep_legs(m, system, Options(ep_ranks=ranks), tokens_per_rank)
    scale = 1.0 if imbalance is None else imbalance / legs.imbalance
    L = m.n_moe_layers
    net, up, latency = L * scale * legs.t_net, L * scale * legs.t_nvlink, L * 2 * system.alpha_net
    return {"network_s": net, "nvlink_s": up, "latency_s": latency, "comm_s": latency + max(net, up),
            "fanout": legs.tiers.ranks, "imbalance": legs.imbalance * scale}


# --- the four strategies -----------------------------------------------------------------------


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
    buffers = 2 * _share(p.tokens, R) * m.top_k * m.hidden * m.f_a  # send + receive rows
    # The busiest rank's share: the closed form's for uniform (and the seed's worst-case)
    # routing, the routing's own for a skewed one (its experts round-robin over the ranks).
    skewed = p.routing.q is not None and p.routing.name != "uniform"
    comm = ep_comm_time(p, n, R, p.routing.imbalance(R, m.top_k, m.n_experts) if skewed else None)
    imb = comm["imbalance"]
    used, _ = p.routing.used(p.tokens, m.top_k, m.n_experts)
    rows = p.tokens * m.top_k / R * imb
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
        work = non_expert_work(p, n * split, non_expert / split, kv_gpu * kv_copies, split)
        tp = 0.0
        if split > 1:  # one ring all-reduce of the node's activations per layer, over NVLink
            L_all = m.n_layers or m.n_moe_layers
            tp = L_all * (p.alpha_scale_up
                          + 2 * (split - 1) / split * n * split * m.hidden * m.f_a / p.b_up)
        ex = expert_work(p, rows, local_used)
        compute = work.time(p.system) + ex.time(p.system) + tp
        options.append((mode, need, total, (compute, work + ex, tp)))
    fits = [o for o in options if o[3] is not None]

    def mem_for(need, total):
        return {"gpu_each": {**need, "needed": total, "available": p.usable_hbm},
                "gpu_total_needed": total * R, "weights_total": w_all}
    if not fits:
        mode, need, total, _ = min(options, key=lambda o: o[2])
        why = (f"does not fit: needs {_gb(total)} per GPU (experts {_gb(need['experts'])} + "
               f"non-expert {_gb(need['non_expert'])} + KV {_gb(need['kv'])} + buffers "
               f"{_gb(need['a2a_buffers'])}, {mode}) > {_gb(p.usable_hbm)} usable "
               f"({p.hbm_utilization:g} x {_gb(p.system.hbm_bytes)})")
        if w_all + p.kv_total() > R * p.usable_hbm:
            why += (f"; weights {_gb(w_all)} + KV {_gb(p.kv_total())} exceed all {R} GPUs' "
                    f"{_gb(R * p.usable_hbm)}")
        return _result("ep", R, False, why, mem=mem_for(need, total))
    mode, need, total, (compute, work, tp) = min(fits, key=lambda o: o[3][0])
    step = compute + comm["comm_s"]
    overlap = max(compute, comm["comm_s"])
    terms = {"compute_s": compute - tp, "tp_allreduce_s": tp, "network_s": comm["network_s"],
             "nvlink_s": comm["nvlink_s"], "ep_latency_s": comm["latency_s"]}
    bound = _bound(terms, work.bound(p.system))
    return _slo(p, _result("ep", R, True, f"{mode}, {m.n_experts} experts over {R} GPUs "
                                          f"({_share(m.n_experts, R)} per GPU), busiest rank x{imb:.3g}",
                           step, overlap, bound, mem_for(need, total), p.tokens, terms=terms,
                           attention=mode, imbalance=imb, fanout=comm["fanout"],
                           ep_comm_s=comm["comm_s"]))


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
    work = non_expert_work(p, n, non_expert, kv) + expert_work(p, n * m.top_k, used)
    compute = work.time(p.system)
    terms = {"compute_s": compute, "stream_s": stream}
    bound = _bound(terms, work.bound(p.system))
    if bound == "host link":
        bound = link_kind
    hit = 1 - misses / used if used else 1.0
    return _slo(p, _result(
        "offload", g, True,
        f"{r} of {m.n_experts} experts per layer resident, hit rate {hit:.1%}; "
        f"{misses:,.3g} experts per layer stream at {bw / 1e9:,.3g} GB/s ({link_kind})",
        compute + stream, max(compute, stream), bound, mem, p.tokens, terms=terms,
        resident_per_layer=r, resident_fraction=r / m.n_experts, hit_rate=hit,
        stream_bandwidth=bw, misses_per_layer=misses, used_per_layer=used))


def _cpu_expert_time(p: Plan, n: float, used: float, per_node: int) -> tuple[float, str]:
    """CPU time for one MoE layer: roofline of the used experts' bytes from DRAM and the
    matrix FLOPs, on this GPU's share of the node's CPUs."""
    m = p.model
    f = CPU_DTYPE_BYTES[p.cpu_expert_dtype]
    flops = p.cpu.matmul_flops.get(CPU_COMPUTE_DTYPE[p.cpu_expert_dtype], 0.0) / per_node
    bw = p.cpu.bandwidth(p.nominal) / per_node
    t_mem = used * m.expert_params * f / bw
    t_flop = 2 * n * m.top_k * m.expert_params / flops if flops else math.inf
    return max(t_mem, t_flop), ("CPU DRAM bandwidth" if t_mem >= t_flop else "CPU matrix throughput")


def _link_round_trip(p: Plan, n: float) -> float:
    """Activations to the CPU and results back, one MoE layer: two transfers, each with latency."""
    b = p.system.b_pcie / p.gpus_per_host_link
    return 2 * (p.system.alpha_pcie + n * p.model.hidden * p.model.f_a / b)


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
    t_gpu = gpu_part.time(p.system)
    best = None
    for r in range(r_max + 1):  # every split: the step need not be monotone in r
        used, cpu_used = p.routing.used(n, m.top_k, m.n_experts, r)
        gpu_used = used - cpu_used
        share = p.routing.pairs_beyond(r, m.n_experts)  # token-expert pairs the CPU takes
        t_cpu, cpu_kind = _cpu_expert_time(p, n * share, cpu_used, per_node)
        link = _link_round_trip(p, n) if cpu_used > 1e-12 else 0.0
        t_gexp = expert_work(p, n * m.top_k * (1 - share), gpu_used).time(p.system) / m.n_moe_layers
        per_layer_cpu = link + t_cpu
        layer = max(t_gexp, per_layer_cpu)
        step = t_gpu + m.n_moe_layers * layer
        if best is None or step < best[0] - 1e-15:
            best = (step, r, t_cpu, link, t_gexp, cpu_kind, used, cpu_used)
    step, r, t_cpu, link, t_gexp, cpu_kind, used, cpu_used = best
    L = m.n_moe_layers
    terms = {"compute_s": t_gpu, "cpu_s": L * t_cpu, "link_s": L * link, "gpu_experts_s": L * t_gexp}
    bound = _bound(terms, gpu_part.bound(p.system))
    if bound == "CPU":
        bound = cpu_kind
    mem["gpu_each"]["experts_on_gpu"] = r * L * m.expert_bytes
    mem["gpu_each"]["needed"] = gpu_need + r * L * m.expert_bytes
    overlap = max(t_gpu, L * max(t_gexp, link + t_cpu))
    on = f"{p.cpu.name} ({p.cpu_expert_dtype}{', ' + p.cpu.isa if p.cpu.isa else ''})"
    what = (f"hottest {r} of {m.n_experts} experts per layer on the GPU, the rest on {on}"
            if name == "hybrid" else f"routed experts on {on}")
    return _slo(p, _result(name, g, True, f"{what}: the CPU computes {cpu_used:,.3g} of the "
                                          f"{used:,.3g} experts used per layer",
                           step, overlap, bound, mem, p.tokens, terms=terms, gpu_experts_per_layer=r,
                           cpu_used_per_layer=cpu_used))


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


def plan_all(p: Plan) -> dict:
    """The four strategies, ranked: feasible first, then by tokens/s per GPU."""
    strategies = [plan_ep(p), best_replicas(p, plan_offload), best_replicas(p, plan_cpu_experts),
                  best_replicas(p, plan_hybrid)]
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
