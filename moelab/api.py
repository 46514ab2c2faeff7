"""The Python API: what `moelab gamma` answers, as a function (SI units in and out).

    import moelab
    r = moelab.gamma("deepseek-r1", tokens=4096, b_pcie=64e9, b_net=50e9,
                     expert_dtype="fp8", act_dtype="bf16")
    r.gamma, r.t_p_overhead_s, r["tipping_tokens"]      # 75.0, 10.2..., 307200

The CLI parses its flags (GB/s, µs) into these arguments and prints what this returns, so
the command and the function cannot disagree. Bad input raises `SpecError` naming the
argument.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

from moelab.costmodel.specs import (
    GPUS_WHY,
    MAX_GPUS,
    MAX_TOKENS,
    TOKENS_WHY,
    ModelSpec,
    Options,
    SpecError,
    SystemSpec,
    Workload,
    check_count,
    check_monte_carlo,
    check_placement,
    check_seed,
    check_timeline,
    parse_routing,
)

CLOSED_FORM_ROUTINGS = ("worst", "uniform")
DEFAULT_PREFILL_TOKENS = 4096


class Report(dict):
    """A JSON-ready dict in SI units whose keys also read as attributes (`r.gamma`)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_json(self, indent: int | None = 1) -> str:
        """Strict JSON: an infinite or undefined number is null (e.g. gamma with no EP cost)."""
        return json.dumps(finite_or_null(self), indent=indent, allow_nan=False)


def model_spec(model: str | ModelSpec, expert_dtype: str | None = None,
               act_dtype: str | None = None) -> ModelSpec:
    """A ModelSpec from a preset name, a path to a config.json, or a ModelSpec; dtypes overridden."""
    from moelab.costmodel.presets import load_model

    spec = model if isinstance(model, ModelSpec) else load_model(model)
    changes = {k: v for k, v in (("expert_dtype", expert_dtype), ("act_dtype", act_dtype)) if v}
    return spec.with_(**changes) if changes else spec


def system_spec(system: str | SystemSpec = "h100-sxm", *, host_link: str | None = None,
                network: str | None = None, measured_links: bool = False, latencies: bool = False,
                b_pcie: float | None = None, b_net: float | None = None,
                alpha_pcie: float | None = None, alpha_net: float | None = None,
                gpus_per_node: int | None = None) -> SystemSpec:
    """A SystemSpec from a GPU preset, a system file or a SystemSpec, with links swapped or set.

    b_pcie, b_net in B/s; alpha_pcie, alpha_net in seconds.
    """
    from moelab.costmodel.presets import load_system

    if isinstance(system, SystemSpec):
        if host_link or network or measured_links or latencies:
            raise SpecError("system: host_link, network, measured_links and latencies apply to a "
                            "preset name, not to a SystemSpec")
        spec = system
    else:
        spec = load_system(system, host_link=host_link, network=network,
                           measured=measured_links, latencies=latencies)
    overrides = {k: v for k, v in (("b_pcie", b_pcie), ("b_net", b_net), ("alpha_pcie", alpha_pcie),
                                   ("alpha_net", alpha_net), ("gpus_per_node", gpus_per_node))
                 if v is not None}
    return spec.with_(**overrides) if overrides else spec


def workload(tokens: int | None = None, decode: bool = False, batch: int = 1,
             steps: int = 1) -> Workload:
    """Prefill of `tokens` (default 4096), or decode of `batch` tokens per step for `steps` steps."""
    if decode:
        if tokens is not None:
            raise SpecError("tokens: give tokens for a prefill, or decode with a batch, not both")
        return Workload(decode=True, batch=batch, steps=steps)
    return Workload(tokens=DEFAULT_PREFILL_TOKENS if tokens is None else tokens)


def group_limited_terms(m: ModelSpec, s: SystemSpec, options: Options, routing: str) -> dict:
    """With --routing groups and EP ranks: the exact remote nodes per token under the model's
    group-limited router (costmodel/group_limited.py), beside the Monte Carlo's
    fanout_nodes_mean; the closed-form fanout_nodes above is uniform routing's. Only where
    the placement puts whole groups on nodes (the node count divides n_group)."""
    R, G = options.ep_ranks or 0, s.gpus_per_node
    if routing != "groups" or R < 2 or m.n_group < 2 or R % G or m.n_group % max(R // G, 1):
        return {}
    from moelab.costmodel.closed_form import fanout_nodes_group_limited

    return {"fanout_nodes_group_limited": fanout_nodes_group_limited(
        R // G, m.n_group, m.topk_group, m.n_experts, m.top_k)}


def gamma(model: str | ModelSpec = "deepseek-r1", system: str | SystemSpec = "h100-sxm", *,
          tokens: int | None = None, decode: bool = False, batch: int = 1, steps: int = 1,
          expert_dtype: str | None = None, act_dtype: str | None = None,
          host_link: str | None = None, network: str | None = None,
          measured_links: bool = False, latencies: bool = False,
          b_pcie: float | None = None, b_net: float | None = None,
          alpha_pcie: float | None = None, alpha_net: float | None = None,
          fanout: float | None = None, ep_ranks: int | None = None,
          dispatch_dtype: str | None = None, combine_dtype: str | None = None,
          resident_fraction: float = 0.0, routing: str = "worst", samples: int = 0, seed: int = 0,
          sensitivities: bool = False, overlap: bool = False, lookahead: bool = False,
          hit_rate: float = 1.0, microbatches: int = 2,
          gpus_per_node: int | None = None, dispatch_mode: str = "per-node",
          redundant_experts: int = 0,
          progress: Callable[[int, int], None] | None = None) -> Report:
    """gamma = offload overhead / EP overhead, its parts and N_t*, as `moelab gamma --json`.

    model: preset name, path to a HF config.json, or a ModelSpec. system: GPU preset, path
    to a system file (`moelab calibrate`), or a SystemSpec. Bandwidths in B/s, latencies
    in s. routing: "worst" (the seed) or "uniform" in closed form; with samples > 0 also a
    Monte Carlo routing (zipf:S, dirichlet:A, groups, logits:FILE.npy, hist:FILE) through
    the JAX reference. `progress(done, total)` is called during long Monte Carlo runs.
    With ep_ranks: gpus_per_node (default: the system's) splits the ranks into nodes,
    dispatch_mode "per-node" (default, DeepEP's normal kernels) or "per-rank" says how a
    token crosses the network, redundant_experts adds replica slots of the hottest experts.
    """
    from moelab.costmodel.closed_form import evaluate

    m = model_spec(model, expert_dtype, act_dtype)
    s = system_spec(system, host_link=host_link, network=network, measured_links=measured_links,
                    latencies=latencies, b_pcie=b_pcie, b_net=b_net, alpha_pcie=alpha_pcie,
                    alpha_net=alpha_net, gpus_per_node=gpus_per_node)
    is_trace = routing.startswith("trace:")
    recorded_passes = tokens == "trace"
    if recorded_passes:  # the trace's own forward passes; the closed form gets their mean size
        from moelab.costmodel.trace import load as load_trace

        if not is_trace or decode:
            raise SpecError("tokens: 'trace' uses the passes of a prefill --routing trace:FILE")
        sizes = load_trace(parse_routing(routing).path).batch_sizes
        if sizes is None:
            raise SpecError(f"tokens: the trace {parse_routing(routing).path!r} has no "
                            "batch_sizes: give --tokens N for windows of N tokens")
        tokens = max(1, round(sum(sizes) / len(sizes)))
    w = workload(tokens, decode, batch, steps)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise SpecError(f"samples: must be an integer >= 0, got {samples!r}")
    check_seed(seed)
    check_placement(m.n_experts, ep_ranks, redundant_experts)
    if samples and not is_trace:
        check_monte_carlo(m, w, samples, ep_ranks)
    if overlap:
        check_timeline(m, microbatches)
    if routing not in CLOSED_FORM_ROUTINGS:
        parse_routing(routing)  # an unknown name is an error before anything else is said
        if samples == 0 and not is_trace:
            raise SpecError(f"routing: {routing} is drawn by Monte Carlo: add samples (--samples N); "
                            f"in closed form: {', '.join(CLOSED_FORM_ROUTINGS)}")
    options = Options(fanout=fanout, ep_ranks=ep_ranks, dispatch_dtype=dispatch_dtype,
                      combine_dtype=combine_dtype, resident_fraction=resident_fraction,
                      routing=routing if routing in CLOSED_FORM_ROUTINGS else "worst",
                      dispatch_mode=dispatch_mode, redundant_experts=redundant_experts)
    r = evaluate(m, s, w, options)
    out = Report(
        gamma=r.gamma,
        gamma_seed_formula=r.gamma_seed,
        decision=r.decision,
        n_ue=r.n_ue,
        tokens=r.tokens,
        tipping_tokens=plain_number(r.tipping_tokens) if not w.decode else None,
        tipping_tokens_low=plain_number(r.tipping_tokens_low) if not w.decode else None,
        t_b_s=r.t_b,
        t_p_s=r.t_p,
        t_ep_s=r.t_ep,
        t_p_overhead_s=r.t_p_overhead,
        t_ep_overhead_s=r.t_ep_overhead,
        model_term=r.model_term,
        system_term=r.system_term,
        query_term=r.query_term,
        fanout=r.fanout,
        f_e=r.f_e,
        f_a=r.f_a,
        f_dispatch=r.f_dispatch,
        f_combine=r.f_combine,
        b_pcie=r.b_pcie,
        b_net=r.b_net,
        alpha_pcie_s=s.alpha_pcie,
        alpha_net_s=s.alpha_net,
        resident_fraction=options.resident_fraction,
        routing=options.routing,
        model={"name": m.name, "L": m.n_moe_layers, "E": m.n_experts, "k": m.top_k,
               "d": m.hidden, "I": m.expert_intermediate, "S_E": m.expert_params,
               "n_shared_experts": m.n_shared_experts, "expert_dtype": m.expert_dtype,
               "act_dtype": m.act_dtype},
        system={"name": s.name, "host_link": s.host_link, "network": s.network,
                "swapped": bool(host_link or network)},
        workload={"decode": w.decode, "tokens": w.tokens, "batch": w.batch, "steps": w.steps},
    )
    out.update(ep_terms(r, m))
    if w.decode:
        out.update(decode_terms(r, m, s))
    if isinstance(system, str):
        out.update(measured_terms(m, system, w, options, host_link, network, gpus_per_node))
    if is_trace:  # a recorded routing: its windows are the samples
        from moelab.costmodel.trace import trace_distribution

        out.update(trace_distribution(m, s, w, options, routing.partition(":")[2],
                                      recorded_passes=recorded_passes))
    elif samples:
        from moelab.costmodel.reference import gamma_distribution

        out.update(gamma_distribution(m, s, w, options, routing=routing, samples=samples,
                                      seed=seed, progress=progress))
        out.update(group_limited_terms(m, s, options, routing))
    if is_trace or samples:  # the closed-form rows above used worst or uniform
        out["routing"] = routing
        out["routing_closed_form"] = options.routing
    if overlap:
        from moelab.costmodel.timeline import overlap_times

        if not 0 <= hit_rate <= 1:
            raise SpecError(f"hit_rate: must be in [0, 1], got {hit_rate}")
        if microbatches < 1:
            raise SpecError(f"microbatches: must be >= 1, got {microbatches}")
        out.update(overlap_times(m, s, w, options, lookahead=int(lookahead), hit_rate=hit_rate,
                                 microbatches=microbatches))
    if sensitivities:
        from moelab.costmodel.reference import sensitivities as elasticities

        # + 0.0 turns a -0.0 (a zero elasticity reached from below) into 0.0
        out["sensitivities"] = {k: v + 0.0 for k, v in elasticities(m, s, w, options).items()}
    return out


def ep_terms(r, m) -> dict:
    """With EP ranks: both tiers, the busiest rank, the two legs and which one decides."""
    if r.ep is None:
        return {}
    e = r.ep
    return {
        "ep_ranks": e.ranks, "gpus_per_node": e.gpus_per_node, "dispatch_mode": e.dispatch_mode,
        "fanout_intra": e.tiers.intra, "fanout_nodes": e.tiers.nodes,
        "fanout_ranks_inter": e.tiers.ranks_inter,
        "net_copies": e.net_copies, "nvlink_copies": e.nvlink_copies,
        "imbalance": e.imbalance, "imbalance_no_redundancy": e.imbalance_no_redundancy,
        "redundant_experts": e.redundant_experts,
        "redundant_expert_bytes_per_rank": e.redundant_bytes_per_rank,
        # whole pass, all MoE layers and passes: what each leg costs alone (latency apart)
        "t_ep_net_s": r.passes * m.n_moe_layers * e.t_net,
        "t_ep_nvlink_s": r.passes * m.n_moe_layers * e.t_nvlink,
        "ep_deciding_leg": e.deciding_leg,
    }


def decode_terms(r, m, s) -> dict:
    """Decode re-fetches the used experts every step; the seed's literal N_t -> N_OS differs."""
    from moelab.costmodel.closed_form import gamma_seed, n_used_worst

    steps = r.passes
    literal = float(gamma_seed(m.expert_params, m.f_e, m.hidden, m.f_a, s.b_net, s.b_pcie,
                               n_used_worst(steps, m.top_k, m.n_experts), steps))
    return {
        "decode_refetch": True,
        "gamma_seed_literal_nos": literal,
        "decode_note": (f"decode re-fetches the {r.n_ue:g} used experts of every MoE layer at "
                        f"every step (no cache across steps: --resident-fraction models one); "
                        f"the seed's literal 'replace N_t by N_OS' over N_OS = {steps:,} steps "
                        f"would give gamma = {literal:.4g}"),
    }


def measured_terms(m, system: str, w, options, host_link, network, gpus_per_node) -> dict:
    """gamma with measured links and published or fitted latencies, each input's source named."""
    from moelab.costmodel.closed_form import evaluate
    from moelab.costmodel.presets import is_path, link_inputs, load_system

    if is_path(system):  # a system file: its links are what was measured
        return {}
    inputs = link_inputs(system, host_link, network)
    spec = load_system(system, host_link=host_link, network=network).with_(
        **{k: v for k, (v, _) in inputs.items()},
        **({"gpus_per_node": gpus_per_node} if gpus_per_node else {}))
    r = evaluate(m, spec, w, options)
    return {"gamma_measured": r.gamma,
            "gamma_measured_inputs": {k: {"value": v, "source": src} for k, (v, src) in inputs.items()}}


def plain_number(x):
    """JSON-friendly number: integers print as integers; NaN (undefined) is None."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    if math.isinf(x):
        return x
    return int(round(x)) if abs(x - round(x)) < 1e-6 * max(1.0, abs(x)) else x


def finite_or_null(obj):
    """Strict JSON has no inf or NaN: such a number becomes null, at any depth."""
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_null(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --- plan: which deployment to pick (issue 11) ----------------------------------------------

DEFAULT_HOST_MEM = 2e12  # bytes of host DRAM per node when not given (assumed; set host_mem)
DEFAULT_CONTEXT = 4096


def plan(model: str = "deepseek-r1", system: str | SystemSpec = "h100-sxm", *, gpus: int = 8,
         gpus_per_node: int | None = None, cpu="xeon-8470", cpu_isa: str | None = None,
         cpu_sockets: int | None = None, host_mem: float = DEFAULT_HOST_MEM,
         gpus_per_host_link: int = 1, tokens: int | None = None, decode_batch: int | None = None,
         context: int | None = None, routing: str = "uniform", slo: float | None = None,
         kv_dtype: str = "bf16", cpu_expert_dtype: str = "int8", expert_dtype: str | None = None,
         nominal: bool = False, host_link: str | None = None, network: str | None = None,
         hbm_utilization: float = 0.9, host_dram_bw: float | None = None,
         cache_steps: int = 0, seed: int = 0, engine: str | None = None,
         profile=None, prefill_attention: str = "fused", phase: str | None = None,
         prompt: int | None = None, output: int | None = None, micro_batches: int = 1) -> Report:
    """Which deployment gives the most tokens/s per GPU: EP, offload, CPU experts or a hybrid.

    model: preset name or path to a HF config.json (memory is counted from the config).
    system: GPU preset or system file; gpus GPUs in nodes of gpus_per_node (default: the
    preset's). cpu: CPU preset of each node (`moelab presets cpus`), a CPU file in the presets'
    schema (one cpus.json entry with "name"; `moelab calibrate --cpu` writes one with measured
    rates, which plan prefers to peaks) or a CpuSpec (all sockets of a node, SI units);
    cpu_isa: the CPU's matrix instruction set for the experts (amx | avx512 | avx2 | sve2, as
    the entry lists; default its best); cpu_sockets: sockets per node (default the entry's; 1
    for a run pinned to one socket); host_mem: host DRAM per node
    in bytes; gpus_per_host_link: GPUs sharing one host link / PCIe switch.
    Workload, one of: tokens = prefill tokens per forward pass (a chunked prefill's chunk),
    or decode_batch = sequences per decode step; context = tokens of context per sequence
    (default: tokens for prefill, 4096 for decode). routing: worst | uniform | skewed
    (zipf:1.2) | zipf:S | hist:PATH | trace:PATH (a recorded routing: its histogram for the
    marginals, its token order for cache_steps). slo: step-time budget in seconds. nominal=True takes
    datasheet bandwidths instead of measured ones. host_dram_bw (B/s, the whole node)
    replaces the CPU's DRAM bandwidth (measured and GEMV figures included). cache_steps > 0
    also runs the offload strategy's expert cache (LRU and the Belady bound,
    kernels/expert_cache.py) over that many passes of a concrete routing drawn from
    `routing`. engine: whose achieved
    efficiencies predict the step (vllm | sglang | trtllm | ktransformers | llama.cpp | ideal,
    ideal = the roofline; default: the profile's engine, else the best supported for the GPU);
    profile: a user profile (path or dict, costmodel/predict/profile.py) whose factors scale
    the predicted terms. prefill_attention: fused (flash kernels) | eager (the CPU-expert
    strategies' GPU materialises the prompt's attention scores in HBM, as KTransformers before
    V0.2.1). micro_batches: 2 runs EP with two-batch overlap (SGLang's
    --enable-two-batch-overlap, DeepSeek's dual micro-batch overlap: plan.tbo_step); 1 (the
    default, as in SGLang) runs it serially. Each strategy reports step_s (the prediction) and
    bound_step_s (the roofline). Returns a Report with the keys of `moelab plan --json`.

    phase: None (one pass as above), or a workload of requests of `prompt` tokens (default
    4096) and `output` tokens each: "prefill" (passes of `tokens` prompt tokens, default the
    prompt, at context prompt), "decode" (steps of decode_batch sequences, default 1, at the
    mean context prompt + output // 2), or "both": the two rankings under `phases` and, under
    `combined`, every way to serve both (one strategy, a per-phase switch, disaggregated
    pools) per request (costmodel/phases.py).
    """
    # the arguments of one pass (everything but the phase workload), passed on as they are
    one = {k: v for k, v in locals().items() if k not in ("phase", "prompt", "output")}
    if phase is None:
        for name, v in (("prompt", prompt), ("output", output)):
            if v is not None:
                raise SpecError(f"{name}: a request's {name} length goes with phase "
                                "(prefill, decode or both)")
        return _plan_one(**one)[0]
    return _plan_phases(one, phase, prompt, output)


def _plan_phases(one: dict, phase: str, prompt: int | None, output: int | None) -> Report:
    """plan(phase=...): the requests' prefill, decode, or both joined (costmodel/phases.py)."""
    from moelab.costmodel import phases

    if phase not in ("prefill", "decode", "both"):
        raise SpecError(f"phase: unknown {phase!r} (prefill | decode | both)")
    if one["context"] is not None:
        raise SpecError(f"context: with phase, the context follows from the prompt and output "
                        f"(prefill: prompt; decode: prompt + output // 2), got context={one['context']}")
    if phase == "prefill" and (one["decode_batch"] is not None or output is not None):
        raise SpecError("phase: prefill takes prompt and tokens, not "
                        f"{'decode_batch' if one['decode_batch'] is not None else 'output'}")
    if phase == "decode" and one["tokens"] is not None:
        raise SpecError("tokens: prefill tokens per pass go with phase prefill or both, not decode")
    if phase != "prefill" and output is None:
        raise SpecError(f"output: phase {phase} needs the output tokens per request")
    if phase == "both" and one["slo"] is not None:
        raise SpecError("slo: a step budget is per phase (TTFT or TPOT): not yet with phase both")
    prompt = DEFAULT_PREFILL_TOKENS if prompt is None else prompt
    req = phases.Requests(prompt=prompt, output=1 if output is None else output,
                          decode_batch=1 if one["decode_batch"] is None else one["decode_batch"],
                          tokens=prompt if one["tokens"] is None else one["tokens"])
    pre = {**one, "tokens": req.tokens, "decode_batch": None, "context": req.prompt}
    dec = {**one, "tokens": None, "decode_batch": req.decode_batch, "context": req.decode_context}
    if phase == "prefill":
        return _plan_one(**pre)[0]
    if phase == "decode":
        return _plan_one(**dec)[0]
    r_pre, p_pre = _plan_one(**pre)
    r_dec, p_dec = _plan_one(**dec)
    return Report(
        model=r_pre["model"], engine=r_pre["engine"], engine_note=r_pre["engine_note"],
        system=r_pre["system"], host=r_pre["host"],
        workload={"phase": "both", "prompt": req.prompt, "output": req.output,
                  "decode_batch": req.decode_batch, "prefill_tokens_per_pass": req.tokens,
                  "decode_context": req.decode_context},
        phases={"prefill": r_pre, "decode": r_dec},
        combined=phases.combine(p_pre, p_dec, req))


def _plan_one(model, system, *, gpus, gpus_per_node, cpu, cpu_isa, cpu_sockets, host_mem,
              gpus_per_host_link, tokens, decode_batch, context, routing, slo, kv_dtype,
              cpu_expert_dtype, expert_dtype, nominal, host_link, network, hbm_utilization,
              host_dram_bw, cache_steps, seed, engine, profile, prefill_attention="fused",
              micro_batches=1):
    """One pass (prefill or decode): the Report of `plan` and the Plan it ranked."""
    from moelab.costmodel import memory
    from moelab.costmodel import plan as planner
    from moelab.costmodel.closed_form import pass_overheads
    from moelab.costmodel.hf_config import check_memory_fields
    from moelab.costmodel.presets import load_cpu, model_config

    if isinstance(model, ModelSpec):
        raise SpecError("model: plan counts memory from the config.json: give a preset name or a path")
    # Every count before anything is built: the planner keeps arrays and loops per GPU.
    check_count("gpus", gpus, MAX_GPUS, GPUS_WHY)
    for name, value in (("gpus_per_node", gpus_per_node), ("cpu_sockets", cpu_sockets),
                        ("gpus_per_host_link", gpus_per_host_link)):
        if value is not None:
            check_count(name, value, MAX_GPUS, GPUS_WHY if "gpus" in name else ", the most moelab models")
    for name, value in (("tokens", tokens), ("decode_batch", decode_batch)):
        if value is not None:
            check_count(name, value, MAX_TOKENS, TOKENS_WHY)
    if context is not None:
        check_count("context", context, MAX_TOKENS, TOKENS_WHY, at_least=0)
    check_seed(seed)
    for name, value in (("host_mem", host_mem), ("hbm_utilization", hbm_utilization),
                        ("host_dram_bw", host_dram_bw), ("slo", slo)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value) or value <= 0):
            raise SpecError(f"{name}: must be a finite number > 0, got {value!r}")
    if tokens is not None and decode_batch is not None:
        raise SpecError("tokens: give prefill tokens per pass or a decode batch, not both")
    m = model_spec(model, expert_dtype)
    cfg = model_config(model)
    check_memory_fields(cfg)
    if isinstance(cpu, planner.CpuSpec) and (cpu_isa, cpu_sockets) != (None, None):
        raise SpecError(f"{'cpu_isa' if cpu_isa is not None else 'cpu_sockets'}: only with a CPU "
                        "preset name (a CpuSpec carries its own figures)")
    host_cpu = cpu if isinstance(cpu, planner.CpuSpec) else load_cpu(cpu, cpu_isa, cpu_sockets)
    if host_dram_bw is not None:
        if not host_dram_bw > 0:
            raise SpecError(f"host_dram_bw: must be > 0, got {host_dram_bw!r}")
        from dataclasses import replace as _replace

        host_cpu = _replace(host_cpu, dram_bw=host_dram_bw, dram_bw_measured=0.0, gemv_measured={})
    if cpu_expert_dtype in planner.CPU_DTYPE_BYTES:  # else Plan below names the bad dtype
        matrix_rate, matrix_measured = host_cpu.matmul_rate(cpu_expert_dtype, nominal)
        weight_bw, weight_measured = host_cpu.weight_bandwidth(cpu_expert_dtype, nominal)
    decode = decode_batch is not None
    n = decode_batch if decode else (DEFAULT_PREFILL_TOKENS if tokens is None else tokens)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SpecError(f"{'decode_batch' if decode else 'tokens'}: must be an integer >= 1, got {n!r}")
    ctx = context if context is not None else (DEFAULT_CONTEXT if decode else n)
    if not decode and isinstance(ctx, int) and not isinstance(ctx, bool) and ctx < 1:
        raise SpecError(f"context: a prefill pass needs a context of at least 1 token, got {ctx}")
    # A prefill pass of n tokens holds one chunk of a longer prompt (context >= n) or whole
    # prompts of `context` tokens, ceil(n / context) of them.
    sequences = n if decode else (-(-n // ctx) if isinstance(ctx, int) else 1)
    from moelab.costmodel.predict.profile import load_profile

    prof = load_profile(profile) if profile is not None else None
    from moelab.costmodel.predict import efficiency as eff

    s = system_spec(system, host_link=host_link, network=network, measured_links=not nominal,
                    latencies=True)
    if engine is None and prof is not None:
        engine, engine_note = prof.engine, "the profile's"
    elif engine is None:
        engine, engine_note = eff.default_engine(s.name)
    else:
        eff.engine(engine)  # an unknown name: one error line
        engine_note = "as asked"
    no_tables = s.name not in eff.data()["gpus"]
    if engine != "ideal" and no_tables and "no per-operation tables" not in engine_note:
        engine_note += (f"; no per-operation tables for {s.name}: default efficiencies (the median "
                        f"across {', '.join(sorted(eff.data()['gpus']))})")
    p = planner.Plan(
        model=m, cfg=cfg, system=s, cpu=host_cpu, gpus=gpus,
        gpus_per_node=gpus_per_node if gpus_per_node is not None else s.gpus_per_node,
        tokens=n, sequences=sequences, context=ctx, decode=decode,
        routing=planner.make_routing(routing, m.n_moe_layers, m.n_experts, m.top_k),
        host_mem=host_mem, gpus_per_host_link=gpus_per_host_link, kv_dtype=kv_dtype,
        cpu_expert_dtype=cpu_expert_dtype, slo_s=slo, nominal=nominal,
        # NVLink's latency inside a node: no published figure (systems.json latency_us null), 0
        alpha_scale_up=0.0, hbm_utilization=hbm_utilization, engine=engine, profile=prof,
        prefill_attention=prefill_attention, micro_batches=micro_batches)
    result = planner.plan_all(p)
    offload = next(x for x in result["strategies"] if x["name"] == "offload")
    if isinstance(cache_steps, bool) or not isinstance(cache_steps, int) or cache_steps < 0:
        raise SpecError(f"cache_steps: must be an integer >= 0, got {cache_steps!r}")
    if cache_steps and offload["feasible"]:
        offload["cache_simulation"] = _simulate_offload_cache(p, offload, cache_steps, seed)
    # The seed's gamma for this pass: only its two overheads (evaluate's tipping-point
    # searches, which plan never shows, cost most of a plan's time).
    w = Workload(decode=True, batch=n) if decode else Workload(tokens=n)
    _, t_p, t_ep = (w.passes * float(x) for x in pass_overheads(
        m, s.with_(gpus_per_node=p.gpus_per_node),
        Options(ep_ranks=gpus if gpus > 1 else None, resident_fraction=offload.get("resident_fraction", 0.0),
                routing="uniform" if routing == "uniform" else "worst"), w.tokens_per_pass))
    g_gamma = t_p / t_ep if t_ep > 0 else float("inf")
    return Report(
        model=m.name,
        weights_bytes=memory.weights_bytes(cfg, m),
        kv_bytes_per_token=memory.kv_bytes_per_token(cfg, kv_dtype, ctx),
        kv_bytes_per_token_full_attention=memory.kv_bytes_per_token(cfg, kv_dtype),
        kv_bytes_total=p.kv_total(),
        memory_groups=[{"name": grp.name, "params": grp.params, "dtype": grp.dtype, "bytes": grp.bytes}
                       for grp in memory.param_groups(cfg, m)],
        assumptions=memory.assumptions(cfg, m) + [
            f"usable HBM = {hbm_utilization:g} x capacity", f"routing {routing}"
            + (f" = {planner.SKEWED}" if routing == "skewed" else ""),
            f"host DRAM {host_mem / 1e9:,.0f} GB per node"
            + (" (default; set host_mem)" if host_mem == DEFAULT_HOST_MEM else ""),
            "offload, cpu-experts and hybrid run one instance per GPU, the traffic split evenly"],
        kv_dtype=kv_dtype,
        model_layers=m.n_layers or m.n_moe_layers, model_moe_layers=m.n_moe_layers,
        model_experts=m.n_experts,
        workload={"decode": decode, "tokens_per_pass": n, "sequences": p.sequences, "context": ctx},
        system={"name": s.name, "gpus": gpus, "gpus_per_node": p.gpus_per_node,
                "hbm_bytes": s.hbm_bytes, "b_pcie": s.b_pcie, "b_net": s.b_net,
                "b_nvlink": p.b_up, "alpha_pcie_s": s.alpha_pcie, "alpha_net_s": s.alpha_net,
                "hbm_utilization": hbm_utilization, "nominal": nominal},
        host={"cpu": host_cpu.name, "cpu_isa": host_cpu.isa, "cpu_sockets": host_cpu.sockets,
              "dram_bw": p.cpu.bandwidth(nominal), "host_mem": host_mem,
              "gpus_per_host_link": gpus_per_host_link, "cpu_expert_dtype": cpu_expert_dtype,
              # What the CPU experts run at, the node's: a measured rate (calibrate --cpu) or a peak.
              "cpu_matrix_rate": matrix_rate, "cpu_matrix_rate_measured": matrix_measured,
              "cpu_weight_bw": weight_bw, "cpu_weight_bw_measured": weight_measured},
        engine=engine,
        engine_note=engine_note,
        profile=prof.to_dict() if prof is not None else None,
        strategies=result["strategies"],
        best=result["best"],
        gamma={"gamma": g_gamma, "decision": "offload" if g_gamma < 1 else "ep", "t_p_overhead_s": t_p,
               "t_ep_overhead_s": t_ep, "ep_ranks": gpus,
               "resident_fraction": offload.get("resident_fraction", 0.0)},
    ), p


# The cache simulation (Python, one access at a time, each eviction a scan of the slots) and
# the routing it draws (numpy Gumbel scores, tokens x E per layer of every pass): each bound
# keeps it to about half a minute on one core (~0.4 ms a layer, ~0.1 µs a slot scanned).
MAX_CACHE_LAYERS = 2**16  # layers of all passes
MAX_CACHE_WORK = 2**28  # accesses x slots
MAX_CACHE_DRAWS = 2**30  # Gumbel scores


def check_cache_simulation(m: ModelSpec, tokens: int, steps: int, slots: int) -> None:
    """cache_steps passes of `tokens` tokens (one offload GPU's share) through `slots` slots:
    every layer of every pass touches up to min(k N, E) experts and draws N x E scores."""
    passes = f"{steps:,} passes x {m.n_moe_layers} layers"
    if steps * m.n_moe_layers > MAX_CACHE_LAYERS:
        raise SpecError(f"cache_steps: {passes} = {steps * m.n_moe_layers:,} > {MAX_CACHE_LAYERS:,}, "
                        "the most layers the cache simulation runs")
    used = min(m.top_k * tokens, m.n_experts)
    work = steps * m.n_moe_layers * used * slots
    if work > MAX_CACHE_WORK:
        raise SpecError(f"cache_steps: {passes} x {used:,} experts x {slots:,} slots = {work:,} "
                        f"> {MAX_CACHE_WORK:,}, the most the cache simulation runs")
    draws = steps * m.n_moe_layers * tokens * m.n_experts
    if draws > MAX_CACHE_DRAWS:
        raise SpecError(f"cache_steps: {passes} x {tokens:,} tokens x {m.n_experts} experts = "
                        f"{draws:,} draws > {MAX_CACHE_DRAWS:,}, the most the cache simulation draws")


def _simulate_offload_cache(p, offload: dict, steps: int, seed: int) -> dict:
    """LRU and Belady hit rates of the offload GPU's expert slots over a concrete routing, and
    the stream time each would give (the planner itself pins the hottest experts)."""
    from moelab.costmodel import plan as planner
    from moelab.kernels.expert_cache import simulate_cache

    m = p.model
    n = -(-p.tokens // offload["gpus"])
    slots = offload["resident_per_layer"] * m.n_moe_layers + 2  # cache + the staging pair
    check_cache_simulation(m, n, steps, slots)
    trace = planner.sample_steps(p.routing, m.n_moe_layers, m.n_experts, m.top_k, n, steps, seed)
    steps = len(trace) // m.n_moe_layers  # a recorded trace may hold fewer passes
    if steps == 0:
        return {"steps": 0, "note": f"the trace holds fewer than {n} tokens: no pass to simulate"}
    out = {"steps": steps, "slots": slots, "tokens_per_pass": n,
           "pinned_hit_rate": offload["hit_rate"]}
    per_miss = offload["terms"]["stream_s"] / offload["misses_per_layer"] / m.n_moe_layers \
        if offload["misses_per_layer"] else 0.0
    accesses = sum(len(used) for _, used in trace)
    for policy in ("lru", "belady"):
        stats = simulate_cache(trace, slots, policy)
        out[f"{policy}_hit_rate"] = stats["hit_rate"]
        out[f"{policy}_stream_s"] = stats["misses"] / steps * per_miss
    out["accesses"] = accesses
    return out
