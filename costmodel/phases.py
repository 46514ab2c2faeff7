"""Prefill and decode, each with its own strategy: requests of P prompt and O output tokens.

`moelab plan --phase both` plans the prefill (passes of N prompt tokens, context P) and the
decode (steps of a batch of B sequences) on the same hardware, then joins them per request:

    request_s = prefill passes x prefill step + O x decode step      (one request's latency;
                the decode's stall while the same GPUs prefill others apart: decode_stall_s)
    gpu_s     = g_p x t_p x P / N + g_d x t_d x O / B                (GPU-seconds per request:
                its share of the prefill passes and of the decode steps)
    output tokens/s per GPU = O / gpu_s;  tokens/s per GPU = (P + O) / gpu_s

Three ways to serve both phases:

- **same**: one deployment, one strategy for both phases (on the same GPUs, time-shared).
- **switch**: one deployment whose single-GPU instances change strategy between the phases,
  the experts in host DRAM either way (offload, cpu-experts, hybrid: KTransformers streams
  experts to the GPU for long prefills and computes them on the CPU for decode). The layerwise
  prefill of cpu-experts and hybrid is already a per-phase switch inside one strategy (`mode`).
- **disaggregated**: a prefill pool and a decode pool of the --gpus, each its own best plan;
  the prompt's KV cache crosses the network (alpha_net + bytes / B_net per request).

One deployment holds both phases' memory at once: each phase is planned with the other's
per-request state (KV cache, staging and all-to-all buffers) taken off its HBM, and the union
(the larger of each weight part, both states) must fit. Units SI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from moelab.costmodel import memory
from moelab.costmodel import plan as planner
from moelab.costmodel.specs import SpecError

STRATEGY = {"tp": planner.plan_tp, "ep": planner.plan_ep, "offload": planner.plan_offload,
            "cpu-experts": planner.plan_cpu_experts, "hybrid": planner.plan_hybrid}
# One instance per GPU with the experts in host DRAM: these can change strategy between the
# phases without moving weights between GPUs (ep and tp would reshard every expert).
SWITCHABLE = ("offload", "cpu-experts", "hybrid")
STATE_PARTS = ("kv", "staging", "a2a_buffers", "layerwise_staging")  # per-phase, summed
EXPERT_PARTS = ("experts", "experts_on_gpu", "expert_cache")  # resident experts: the larger


@dataclass(frozen=True)
class Requests:
    """What a deployer knows: prompt and output tokens per request, the decode batch, and the
    prefill tokens per forward pass (default the prompt: one request per pass)."""

    prompt: int
    output: int
    decode_batch: int
    tokens: int

    def __post_init__(self):
        for f in ("prompt", "output", "decode_batch", "tokens"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SpecError(f"{f}: must be an integer >= 1, got {v!r}")

    @property
    def prefill_passes(self) -> int:
        """Passes one prompt waits for: 1 when a pass holds it whole, else its chunks."""
        return -(-self.prompt // self.tokens)

    @property
    def decode_context(self) -> int:
        """Mean context of a decode step in steady state: the batch's sequences sit evenly
        over their outputs, so their KV cache (step and memory) is P + O/2 on average."""
        return self.prompt + self.output // 2


def request_figures(req: Requests, a: dict, b: dict, gpus: int | None = None,
                    rate_cap: float = math.inf, kv_transfer_s: float = 0.0) -> dict:
    """Per request, from a prefill result `a` and a decode result `b` (planner dicts, feasible).

    One deployment (`gpus` None): both phases time-share its GPUs (the larger count). Pools
    (`gpus` given, the two pools' total): the request rate is the slower pool's, capped by
    `rate_cap` (the KV link's), and every GPU of both pools counts."""
    prefill_s = req.prefill_passes * a["step_s"]
    decode_s = req.output * b["step_s"]
    stall = 0.0
    if gpus is None:  # the deployment's GPUs (a small decode batch may keep some idle)
        gpus = max(a["gpus"], b["gpus"])
        gpu_s = gpus * (a["step_s"] * req.prompt / req.tokens + b["step_s"] * req.output / req.decode_batch)
        # While a request decodes, its B batch-mates are replaced once on average (Little's
        # law), and the same GPUs prefill those B prompts: its decode waits that long.
        stall = req.decode_batch * req.prompt / req.tokens * a["step_s"]
    else:
        rate = min(a["pool_gpus"] * a["tokens_per_s_per_gpu"] / req.prompt,
                   b["pool_gpus"] * b["tokens_per_s_per_gpu"] / req.output, rate_cap)
        gpu_s = gpus / rate
    return {"prefill_s": prefill_s, "kv_transfer_s": kv_transfer_s, "decode_s": decode_s,
            "request_s": prefill_s + kv_transfer_s + decode_s, "decode_stall_s": stall,
            "gpu_s_per_request": gpu_s,
            "output_tokens_per_s_per_gpu": req.output / gpu_s,
            "tokens_per_s_per_gpu": (req.prompt + req.output) / gpu_s}


def mode(r: dict) -> str:
    """How a strategy runs its experts in this phase, in a few words."""
    name = r["name"]
    if name in ("ep", "tp"):
        return r.get("attention", "")
    if name == "offload":
        if r.get("resident_fraction") == 1:
            return "all experts resident, none streamed"
        return f"{r.get('resident_per_layer', 0)} experts per layer resident, the rest streamed"
    if "stream_s" in r.get("terms", {}):
        return "layerwise GPU prefill: experts streamed to the GPU"
    on_gpu = r.get("gpu_experts_per_layer", 0)
    if not on_gpu:
        return "experts on the CPU"
    if r.get("cpu_used_per_layer", 1) == 0:
        return "all experts on the GPU"
    return f"{on_gpu} experts per layer on the GPU, the rest on the CPU"


def _phase(r: dict) -> dict:
    keep = ("name", "gpus", "feasible", "step_s", "bound_step_s", "tokens_per_s_per_gpu", "bound", "reason")
    return {**{k: r.get(k) for k in keep}, "mode": mode(r) if r["feasible"] else ""}


def _counts(p: planner.Plan, name: str) -> list[int]:
    """GPU counts a strategy runs at: all for ep and tp; 1, 2, 4, ... for one instance per GPU."""
    if name in ("ep", "tp"):
        return [p.gpus]
    return sorted({min(2**i, p.gpus) for i in range(p.gpus.bit_length() + 1)})


def _state(r: dict) -> float:
    each = r["memory"].get("gpu_each", {})
    return sum(each.get(k, 0.0) for k in STATE_PARTS)


def _union(a: dict, b: dict) -> float:
    """HBM per GPU holding both phases: the larger non-expert and resident-expert weights
    (both pin the hottest experts, so the smaller set is inside the larger), both states."""
    ea, eb = a["memory"]["gpu_each"], b["memory"]["gpu_each"]
    return (max(ea.get("non_expert", 0.0), eb.get("non_expert", 0.0))
            + max(sum(ea.get(k, 0.0) for k in EXPERT_PARTS), sum(eb.get(k, 0.0) for k in EXPERT_PARTS))
            + _state(a) + _state(b))


def _host(a: dict, b: dict) -> float:
    """Host DRAM of both phases: one copy of the experts if both keep the same format (the
    CPU's dtype, or offload's GPU format), else both copies."""
    ha, hb = a["memory"].get("host_node", {}), b["memory"].get("host_node", {})
    na, nb = ha.get("needed", 0.0), hb.get("needed", 0.0)
    return max(na, nb) if ha.get("dtype") == hb.get("dtype") else na + nb


def _reserve(p: planner.Plan, nbytes: float) -> planner.Plan | None:
    """The plan with `nbytes` of its usable HBM taken by the other phase; None if none is left."""
    left = p.usable_hbm - nbytes
    return replace(p, hbm_utilization=left / p.system.hbm_bytes) if left > 0 else None


class _Runs:
    """Each (phase, strategy, GPUs, HBM taken by the other phase) planned once: the options
    share them."""

    def __init__(self, pp: planner.Plan, pd: planner.Plan):
        self.plans, self.done = {"prefill": pp, "decode": pd}, {}

    def __call__(self, phase: str, name: str, gpus: int, reserve: float = 0.0) -> dict | None:
        key = (phase, name, gpus, reserve)
        if key not in self.done:
            p = _reserve(self.plans[phase], reserve) if reserve else self.plans[phase]
            self.done[key] = None if p is None else STRATEGY[name](replace(p, replicas=gpus))
        return self.done[key]

    def bound(self, phase: str, name: str, gpus: int, reserve: float) -> float:
        """The roofline of a run (planner.with_bound), computed for the options kept only."""
        r = self.done[(phase, name, gpus, reserve)]
        if "bound_step_s" not in r:
            planner.with_bound(_reserve(self.plans[phase], reserve) if reserve else self.plans[phase],
                               STRATEGY[name], r)
        return r["bound_step_s"]


def one_deployment(run: _Runs, req: Requests, a_name: str, b_name: str, gpus: int) -> dict:
    """Prefill with `a_name`, decode with `b_name`, on the same `gpus` GPUs, both memories at once."""
    pp = run.plans["prefill"]
    kind = "same" if a_name == b_name else "switch"
    a0, b0 = run("prefill", a_name, gpus), run("decode", b_name, gpus)
    out = {"kind": kind, "gpus": gpus}
    for phase, r in (("prefill", a0), ("decode", b0)):
        if not r["feasible"]:
            return {**out, "feasible": False, "reason": f"{phase} with {r['name']}: {r['reason']}",
                    "prefill": _phase(a0), "decode": _phase(b0)}
    # Each phase planned with the other's state off its HBM, so that their resident experts
    # leave room for both states (W_a + S_a + S_b <= U and W_b + S_b + S_a <= U).
    keys = (("prefill", a_name, gpus, _state(b0)), ("decode", b_name, gpus, _state(a0)))
    a, b = run(*keys[0]), run(*keys[1])
    if a is None or b is None or not a["feasible"] or not b["feasible"]:
        return {**out, "feasible": False, "prefill": _phase(a0), "decode": _phase(b0),
                "reason": f"both phases at once do not fit: prefill state {planner._gb(_state(a0))} "
                          f"+ decode state {planner._gb(_state(b0))} leave too little of "
                          f"{planner._gb(pp.usable_hbm)} usable HBM"}
    need, host = _union(a, b), _host(a, b)
    mem = {"gpu_each_needed": need, "gpu_each_available": pp.usable_hbm, "host_node_needed": host,
           "host_node_available": pp.host_mem}
    if need > pp.usable_hbm or host > pp.host_mem:
        what = (f"{planner._gb(need)} HBM per GPU > {planner._gb(pp.usable_hbm)}" if need > pp.usable_hbm
                else f"{planner._gb(host)} host memory > {planner._gb(pp.host_mem)}")
        return {**out, "feasible": False, "reason": f"both phases at once do not fit: {what}",
                "prefill": _phase(a), "decode": _phase(b), "memory": mem}
    return {**out, "gpus": max(a["gpus"], b["gpus"]), "feasible": True, "reason": "", "prefill": _phase(a),
            "decode": _phase(b), "memory": mem, **request_figures(req, a, b), "_keys": keys}


def disaggregated(pp: planner.Plan, pd: planner.Plan, req: Requests, kv_bytes: float) -> dict:
    """Prefill and decode pools splitting the GPUs, each its own best plan (copies of it fill
    the pool); the split with the most output tokens/s per GPU. Each prompt's KV cache
    (`kv_bytes`) goes to the decode pool over the prefill GPUs' network links."""
    G = pp.gpus
    out = {"kind": "disaggregated", "gpus": G}
    if G < 2:
        return {**out, "feasible": False, "reason": "a prefill pool and a decode pool need 2 GPUs or more"}
    step = max(1, G // 8)  # every split below 16 GPUs, then about 8 of them (steps of G // 8)
    s = pp.system
    kv_s = s.alpha_net + kv_bytes / s.b_net
    best = None
    for gp in range(step, G, step):
        a = _pool_best(replace(pp, gpus=gp, replicas=None))
        b = _pool_best(replace(pd, gpus=G - gp, replicas=None))
        if a is None or b is None:
            continue
        a, b = {**a, "pool_gpus": gp}, {**b, "pool_gpus": G - gp}
        cap = gp * s.b_net / kv_bytes  # requests/s the prefill pool's links carry
        fig = request_figures(req, a, b, gpus=G, rate_cap=cap, kv_transfer_s=kv_s)
        if best is None or fig["output_tokens_per_s_per_gpu"] > best[2]["output_tokens_per_s_per_gpu"]:
            best = (a, b, fig, cap)
    if best is None:
        return {**out, "feasible": False, "reason": "no split of the GPUs fits both pools"}
    a, b, fig, cap = best
    return {**out, "feasible": True, "reason": "", "prefill": {**_phase(a), "pool_gpus": a["pool_gpus"]},
            "decode": {**_phase(b), "pool_gpus": b["pool_gpus"]}, "kv_bytes_per_request": kv_bytes,
            "kv_rate_cap_per_s": cap, **fig}


def _pool_best(p: planner.Plan) -> dict | None:
    """plan_all's first feasible strategy, its roofline computed for it alone (a pool's)."""
    results = {name: (fn(p) if name in ("ep", "tp") else planner.best_replicas(p, fn))
               for name, fn in STRATEGY.items()}
    fits = [(name, r) for name, r in results.items() if r["feasible"]]
    if not fits:
        return None
    name, r = max(fits, key=lambda x: x[1]["tokens_per_s_per_gpu"])
    return planner.with_bound(p, STRATEGY[name], r)


def combine(pp: planner.Plan, pd: planner.Plan, req: Requests) -> dict:
    """Every way to serve both phases, ranked by output tokens/s per GPU: each strategy for
    both (`same`), each switch between the single-GPU strategies, and disaggregated pools."""
    pairs = [(n, n) for n in STRATEGY] + [(a, b) for a in SWITCHABLE for b in SWITCHABLE if a != b]
    options, run = [], _Runs(pp, pd)
    for a_name, b_name in pairs:
        tries = [one_deployment(run, req, a_name, b_name, g) for g in _counts(pp, a_name)]
        fits = [t for t in tries if t["feasible"]]
        kept = max(fits, key=lambda t: t["output_tokens_per_s_per_gpu"]) if fits else tries[-1]
        for key in kept.get("_keys", ()):
            kept[key[0]]["bound_step_s"] = run.bound(*key)
        options.append(kept)
    for o in options:
        o.pop("_keys", None)
    kv_bytes = memory.kv_bytes(pp.cfg, req.prompt, pp.kv_dtype)
    options.append(disaggregated(pp, pd, req, kv_bytes))
    options.sort(key=lambda o: (not o["feasible"], -(o.get("output_tokens_per_s_per_gpu") or 0)))
    same = [o for o in options if o["kind"] == "same" and o["feasible"]]
    return {"prompt_tokens": req.prompt, "output_tokens": req.output, "decode_batch": req.decode_batch,
            "prefill_tokens_per_pass": req.tokens, "prefill_passes": req.prefill_passes,
            "decode_context": req.decode_context,
            "options": options,
            "best": options[0] if options[0]["feasible"] else None,
            "best_single": same[0] if same else None}


# --- a serving benchmark's time to first token ----------------------------------------------


def mean_burst_ttft(step, requests: int, prompt: int, budget: int | None) -> float:
    """Mean time to first token of `requests` prompts of `prompt` tokens that arrive together,
    when the engine prefills at most `budget` tokens per step, first come first served
    (chunked prefill); `step(tokens)` is one step's time. Request i (1-based) completes with
    step s_i = ceil(i prompt / budget); every step is full (`budget` tokens) but the last, of
    T - (S - 1) budget tokens, S = ceil(T / budget), T = requests x prompt. So TTFT_i =
    s_i step(budget), or (S - 1) step(budget) + step(last) for the requests the last step
    completes; the mean is over i. budget None: one pass of all T tokens, which every request
    waits for (about twice the mean at large T / budget). The decode steps of requests already
    prefilled, which share later steps, are left out."""
    total = requests * prompt
    if budget is None or total <= budget:
        return step(total)
    S = -(-total // budget)
    full, last = step(budget), step(total - (S - 1) * budget)
    done = [-(-i * prompt // budget) for i in range(1, requests + 1)]
    return sum((s - 1) * full + last if s == S else s * full for s in done) / requests


def mean_serving_ttft(step, requests: int, prompt: int, budget: int | None, waves: int = 1,
                      decode_s: float = 0.0) -> float:
    """Mean TTFT of a closed-loop benchmark at concurrency `requests` that sends `waves` x
    `requests` prompts of equal length and equal output length: the first wave arrives
    together (`mean_burst_ttft`); a request of a later wave arrives when one of the previous
    wave finishes, and those finish in the groups their prefill steps made (the requests one
    budget completes together, min(requests, budget // prompt), at least 1), so each later
    group is a burst of its own, which also waits for the decode step in flight (on average
    half of one, `decode_s`). The mean is over all waves x requests."""
    burst = mean_burst_ttft(step, requests, prompt, budget)
    if waves <= 1:
        return burst
    group = requests if budget is None else min(requests, max(1, budget // prompt))
    steady = mean_burst_ttft(step, group, prompt, budget) + decode_s / 2
    return (burst + (waves - 1) * steady) / waves
