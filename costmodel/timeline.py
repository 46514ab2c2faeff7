"""Overlap timeline: T_P and T_EP when transfers hide behind compute, layer by layer.

The seed adds the transfer time to T_B (nothing overlaps). Real systems overlap: the
copy of an expert runs while other experts compute; dispatch and combine of one
micro-batch run while another computes. The truth lies between the seed's sum and the
lanes' bound `max(sum compute, sum transfer)` (equal to `sum_l max(compute_l,
transfer_l)` when the layers are alike, as in the closed form).

The simulation is the one a GPU runs: *lanes* are in-order queues (CUDA streams: the
compute lane, the host-link lane = the copy stream, the network lane), each task starts
when its lane is free and its dependencies (events) have finished. Tasks are issued in
program order, so a task's start is known when it is issued (`Timeline.add`).

Offload schedule (`simulate_offload`), per layer l with n expert copies:
- The router of layer l runs when layer l-1's compute ends; only then are layer l's
  used experts known, and their copies are issued, one task per expert (the
  prefetcher's per-expert events). The expert GEMMs of layer l run in the same order,
  each waiting only for its own copy: copies and GEMMs of one layer pipeline.
- Resident experts (fraction h, cache hits) need no copy and compute first.
- lookahead=1: while layer l computes, the copies of layer l+1's *predicted* experts
  start as soon as layer l's routing is known (the end of layer l-1), so they overlap
  layer l's compute. `hit_rate` of the predicted copies are right; the wrong ones
  still cost link time, and the missed experts are copied on demand. hit_rate=1 is an
  oracle (pre-gated routing): the best any predictor can do.
Expert parallelism schedule (`simulate_ep`), m micro-batches (DeepSeek's two-micro-batch
overlap at m=2): per layer and micro-batch, attention -> dispatch (network) -> expert
compute -> combine (network) -> the next layer's attention of that micro-batch. Per layer
the compute lane runs every micro-batch's attention, then every micro-batch's experts;
the network lane every dispatch, then every combine: micro-batch 0's dispatch runs while
micro-batch 1's attention computes, its combine while micro-batch 1's experts compute.
m=1 is the seed (everything in sequence).

Compute and transfer split evenly over experts and micro-batches (a model: in the
memory-bound regime a micro-batch re-reads the weights and splitting costs more).
Decode: one pass is simulated and multiplied by the number of passes (no prefetch
across steps). Per-layer times come from the closed form (`closed_form.evaluate`):
compute = T_B / (L * passes), transfer = overhead / (L * passes); nothing is re-derived.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Task:
    lane: str  # "compute", "host_link" or "network"
    name: str  # e.g. "copy L3 e5", "gemm L3 e5", "dispatch L3 mb1"
    start: float  # s
    end: float  # s


@dataclass
class Timeline:
    """In-order lanes; `add` issues a task after its dependencies, in program order."""

    tasks: list[Task] = field(default_factory=list)
    _free: dict[str, float] = field(default_factory=dict)  # lane -> time it is free

    def add(self, lane: str, name: str, duration: float, after: Sequence[Task] = ()) -> Task:
        if duration < 0 or not math.isfinite(duration):
            raise ValueError(f"{name}: duration must be finite and >= 0, got {duration}")
        start = max([self._free.get(lane, 0.0), *(t.end for t in after)])
        task = Task(lane, name, start, start + duration)
        self._free[lane] = task.end
        self.tasks.append(task)
        return task

    @property
    def makespan(self) -> float:
        return max((t.end for t in self.tasks), default=0.0)

    def busy(self, lane: str) -> float:
        return sum(t.end - t.start for t in self.tasks if t.lane == lane)


def _per_layer(values, n_layers: int) -> list[float]:
    if isinstance(values, int | float):
        return [float(values)] * n_layers
    values = [float(v) for v in values]
    if len(values) != n_layers:
        raise ValueError(f"expected {n_layers} per-layer values, got {len(values)}")
    return values


def simulate_offload(
    compute: Sequence[float],
    transfer: Sequence[float] | float,
    *,
    copies: int = 1,
    resident: int = 0,
    lookahead: int = 0,
    hit_rate: float = 1.0,
    attention: Sequence[float] | float = 0.0,
) -> Timeline:
    """T_P with overlap. compute[l]: layer l's expert compute (s), transfer[l]: its copies (s).

    copies: experts copied per layer (the transfer splits evenly over them); resident:
    used experts already on the GPU (their share of compute needs no copy). attention[l]:
    compute before layer l's router (attention): copies of layer l cannot start before it
    ends, but prefetched copies of layer l run during it.
    """
    if lookahead not in (0, 1):
        raise ValueError(f"lookahead: 0 or 1, got {lookahead}")
    if not 0.0 <= hit_rate <= 1.0:
        raise ValueError(f"hit_rate: must be in [0, 1], got {hit_rate}")
    n_layers = len(compute)
    compute = _per_layer(compute, n_layers)
    transfer = _per_layer(transfer, n_layers)
    attention = _per_layer(attention, n_layers)
    copies = max(int(copies), 1)
    n_used = copies + max(int(resident), 0)
    # Copies of each layer: (predicted early, of which right) and on demand.
    n_early = round(copies * hit_rate) if lookahead else 0
    n_wrong = copies - n_early if lookahead else 0
    tl = Timeline()
    early: dict[int, list[Task]] = {}  # layer -> its predicted, right copies (issued early)
    prev_end: list[Task] = []  # the last GEMM of the previous layer (its router follows)
    for l in range(n_layers):
        if attention[l] > 0:
            prev_end = [tl.add("compute", f"attention L{l}", attention[l], prev_end)]
        x = transfer[l] / copies  # one expert's copy
        c = compute[l] / n_used  # one expert's GEMM
        # Layer l's routing is known: copy what was not prefetched, then (lookahead)
        # predict layer l+1 from it: the wrong guesses cost link time, the right ones
        # are ready early.
        demand_n = copies - len(early.get(l, ()))
        demand = [tl.add("host_link", f"copy L{l} e{j}", x, prev_end) for j in range(demand_n)]
        if lookahead and l + 1 < n_layers:
            xn = transfer[l + 1] / copies
            early[l + 1] = [
                tl.add("host_link", f"prefetch L{l + 1} e{j}", xn, prev_end) for j in range(n_early)
            ]
            for j in range(n_wrong):
                tl.add("host_link", f"mispredicted L{l + 1} #{j}", xn, prev_end)
        # GEMMs: resident experts first, then the prefetched ones, then in copy order.
        last = prev_end
        for j in range(int(resident)):
            last = [tl.add("compute", f"gemm L{l} resident {j}", c, prev_end)]
        for copy in early.get(l, []) + demand:
            last = [tl.add("compute", f"gemm L{l} {copy.name.split()[-1]}", c, [copy, *prev_end])]
        prev_end = last
    return tl


def simulate_ep(
    compute: Sequence[float], network: Sequence[float] | float, *, microbatches: int = 2,
    attention: Sequence[float] | float = 0.0,
) -> Timeline:
    """T_EP with overlap. network[l]: layer l's dispatch + combine time (s), split in halves.

    attention[l]: compute of layer l before its dispatch (a micro-batch's attention runs
    while another micro-batch's tokens travel: DeepSeek's two-micro-batch overlap)."""
    m = max(int(microbatches), 1)
    n_layers = len(compute)
    compute = _per_layer(compute, n_layers)
    network = _per_layer(network, n_layers)
    attention = _per_layer(attention, n_layers)
    tl = Timeline()
    combine_prev: list[Task | None] = [None] * m  # previous layer's combine of each micro-batch
    for l in range(n_layers):
        half = network[l] / 2 / m  # dispatch (or combine) of one micro-batch
        c = compute[l] / m
        dispatches = []
        for b in range(m):
            # Micro-batch b's attention needs its tokens back (the previous combine); its
            # dispatch then runs while the next micro-batch's attention computes.
            after = [combine_prev[b]] if combine_prev[b] is not None else []
            if attention[l] > 0:
                after = [tl.add("compute", f"attention L{l} mb{b}", attention[l] / m, after)]
            dispatches.append(tl.add("network", f"dispatch L{l} mb{b}", half, after))
        for b in range(m):
            gemm = tl.add("compute", f"gemm L{l} mb{b}", c, [dispatches[b]])
            combine_prev[b] = tl.add("network", f"combine L{l} mb{b}", half, [gemm])
    return tl


def _steady(makespan_of, n: int = 8) -> tuple[float, float]:
    """(period, fill): a schedule of alike layers takes fill + L * period once it is steady;
    period from 2n and n layers, fill the rest at n layers."""
    short, long = makespan_of(n), makespan_of(2 * n)
    period = (long - short) / n
    return period, max(short - n * period, 0.0)


def overlap_times(model, system, workload, options=None, *, lookahead: int = 0,
                  hit_rate: float = 1.0, microbatches: int = 2) -> dict:
    """Whole-step times with transfers overlapped with compute, and what stays exposed.

    Per-layer compute comes from `closed_form.layer_compute` (attention with MLA or GQA,
    the dense layers' MLP, the MoE experts at the expert dtype's roofline; under EP the
    busiest rank's share), transfers from `closed_form.evaluate`'s overheads. Each strategy
    is simulated on alike MoE layers; its steady per-layer period times L, plus the dense
    layers (no transfers), is its step time, so the ratio does not depend on L:

        speedup_ep_overlap = t_p_overlap_s / t_ep_overlap_s   (> 1: EP is faster)

    Pipeline fill and drain (a constant per step) are reported apart (t_*_fill_s). The
    exposed overheads are what each strategy adds to its own compute; 0: fully hidden.
    `t_p_overlap_oracle_s` is offload with lookahead=1 and a perfect predictor.
    """
    from moelab.costmodel import closed_form
    from moelab.costmodel.specs import Options

    options = options if options is not None else Options()
    r = closed_form.evaluate(model, system, workload, options)
    c = closed_form.layer_compute(model, system, workload, options)
    L, passes = model.n_moe_layers, workload.passes
    per = L * passes
    seed_p, seed_ep, n_ue = r.t_p_overhead, r.t_ep_overhead, r.n_ue
    h = options.resident_fraction
    # Experts copied per layer and pass: the used ones not already resident (at least 1,
    # a zero-copy layer has zero transfer time anyway).
    copies = max(round(n_ue * (1 - h)), 1)
    resident = max(round(n_ue) - copies, 0)
    # A micro-batch holds at least one token (decode at batch 1 cannot be split).
    mb = max(1, min(int(microbatches), int(workload.tokens_per_pass)))

    def offload(la: int, hr: float):
        return _steady(lambda n: simulate_offload(
            [c["moe_offload"]] * n, seed_p / per, copies=copies, resident=resident,
            lookahead=la, hit_rate=hr, attention=c["attention"]).makespan)

    def step(period: float, moe: float) -> tuple[float, float]:
        """(with overlap, compute alone) for the whole step, all passes."""
        dense = model.n_dense_layers * (c["attention"] + c["dense"])
        return passes * (L * period + dense), passes * (L * (c["attention"] + moe) + dense)

    (p_period, p_fill), (o_period, _) = offload(lookahead, hit_rate), offload(1, 1.0)
    ep_period, ep_fill = _steady(lambda n: simulate_ep(
        [c["moe_ep"]] * n, seed_ep / per, microbatches=mb, attention=c["attention"]).makespan)
    t_p, t_b_p = step(p_period, c["moe_offload"])
    t_ep, t_b_ep = step(ep_period, c["moe_ep"])
    t_oracle, _ = step(o_period, c["moe_offload"])
    eps = 1e-9 * max(t_b_p, t_b_ep, 1e-30)

    def exposed(t: float, base: float) -> float:
        return 0.0 if t - base < eps else t - base

    exp_p, exp_ep = exposed(t_p, t_b_p), exposed(t_ep, t_b_ep)
    return {
        "speedup_ep_overlap": t_p / t_ep if t_ep > 0 else math.inf,
        "speedup_ep_overlap_oracle": t_oracle / t_ep if t_ep > 0 else math.inf,
        "t_p_overlap_s": t_p,
        "t_ep_overlap_s": t_ep,
        "t_p_overlap_oracle_s": t_oracle,
        "t_b_step_offload_s": t_b_p,
        "t_b_step_ep_s": t_b_ep,
        "t_p_exposed_s": exp_p,
        "t_ep_exposed_s": exp_ep,
        "t_p_oracle_exposed_s": exposed(t_oracle, t_b_p),
        "offload_transfer_hidden": exp_p == 0.0,
        "ep_transfer_hidden": exp_ep == 0.0,
        "t_p_fill_s": passes * p_fill,
        "t_ep_fill_s": passes * ep_fill,
        "layer_compute_s": c,
        "schedule": {
            "copies_per_layer": copies,
            "resident_per_layer": resident,
            "lookahead": lookahead,
            "hit_rate": hit_rate,
            "microbatches": mb,
        },
    }
