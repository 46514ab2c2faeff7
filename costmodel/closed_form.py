"""The seed's gamma model in closed form, and its extensions (DESIGN.md §1-2).

Seed notation, per forward pass (a prefill of N_t tokens, or one decode step of B tokens):

    N_ue  = min(k N_t, E)                                   experts used per layer
    T_P   = T_B + L S_E f_E N_ue / B_pcie                   offload over the host link
    T_EP  = T_B + 2 L N_t d f_a / B_net                     tokens to remote experts and back
    gamma = (T_P - T_B) / (T_EP - T_B)
          = 1/2 * (S_E f_E)/(d f_a) * B_net/B_pcie * N_ue/N_t     (the seed's boxed formula)

Extensions, each defaulting to the seed's value:

    overhead_P  = L * (1 - h) * N_ue * (alpha_pcie + S_E f_E / B_pcie)
    overhead_EP = L * (2 alpha_net + phi * N_t * d * (f_dispatch + f_combine) / B_net)

h: resident fraction (cache hits), phi: fan-out (remote destinations per token and
direction), alpha: latency per expert copy / per collective. Decode multiplies both
overheads by N_OS, which cancels in gamma.

Every function broadcasts over numpy arrays, so a sweep is one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.costmodel.specs import DTYPE_BYTES, ModelSpec, Options, SystemSpec, Workload

# --- used experts -------------------------------------------------------------------


def n_used_worst(tokens, k, n_experts):
    """Seed: N_ue = min(k N_t, E); no two tokens share an expert until all E are used."""
    return np.minimum(np.multiply(k, tokens), n_experts)


def n_used_uniform(tokens, k, n_experts):
    """Expected N_ue under uniform top-k: E (1 - (1 - k/E)^N_t).

    Each expert is chosen by a token with probability k/E, independently across tokens.
    """
    E = np.asarray(n_experts, dtype=np.float64)
    return E * _hit_probability(tokens, np.divide(k, E))


def _hit_probability(tokens, q):
    """1 - (1 - q)^N_t, accurate for small q (expm1/log1p), exact at q = 1 and N_t = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        p = -np.expm1(np.multiply(tokens, np.log1p(-q)))
    return np.where(np.asarray(tokens) == 0, 0.0, np.where(q >= 1, 1.0, p))


def n_used_marginals(tokens, q):
    """Expected N_ue with per-expert marginals q_e (sum_e q_e = k): sum_e 1 - (1 - q_e)^N_t.

    `q` has experts on its last axis; `tokens` broadcasts against the other axes.
    """
    q = np.asarray(q, dtype=np.float64)
    if np.any(q < 0) or np.any(q > 1):
        from moelab.costmodel.specs import SpecError

        raise SpecError("marginals: each per-expert probability must lie in [0, 1]")
    t = np.asarray(tokens, dtype=np.float64)[..., None]
    return np.sum(_hit_probability(t, q), axis=-1)


# --- fan-out ------------------------------------------------------------------------


def fanout_uniform(ranks, n_experts, k):
    """Expected remote EP ranks a token's activations go to, per direction.

    Experts spread evenly over R ranks (E/R each), top-k uniform without replacement.
    A given rank is missed with probability C(E - E/R, k) / C(E, k), so
        phi = (R - 1) * (1 - C(E - E/R, k) / C(E, k)).
    The ratio of binomials is the product over i < k of (E - E/R - i) / (E - i).
    """
    R, E, k = np.broadcast_arrays(
        np.asarray(ranks, float), np.asarray(n_experts, float), np.asarray(k, float)
    )
    per_rank = E / R
    miss = np.ones(R.shape)
    for i in range(int(np.max(k, initial=0))):
        factor = np.clip((E - per_rank - i) / (E - i), 0.0, 1.0)
        miss = np.where(i < k, miss * factor, miss)
    return (R - 1) * (1 - miss)


# --- overheads and gamma --------------------------------------------------------------


def offload_overhead(n_ue, expert_bytes, b_pcie, n_layers=1, alpha_pcie=0.0, resident=0.0):
    """T_P - T_B = L (1-h) N_ue (alpha_pcie + S_E f_E / B_pcie)."""
    return n_layers * (1 - resident) * n_ue * (alpha_pcie + np.divide(expert_bytes, b_pcie))


def ep_overhead(tokens, hidden, f_dispatch, f_combine, b_net, n_layers=1, alpha_net=0.0, fanout=1.0):
    """T_EP - T_B = L (2 alpha_net + phi N_t d (f_dispatch + f_combine) / B_net).

    Seed: phi = 1, f_dispatch = f_combine = f_a, alpha = 0 -> 2 L N_t d f_a / B_net.
    """
    payload = np.multiply(fanout, tokens) * np.multiply(hidden, np.add(f_dispatch, f_combine))
    return n_layers * (2 * np.asarray(alpha_net) + payload / b_net)


def gamma_seed(expert_params, f_e, hidden, f_a, b_net, b_pcie, n_ue, tokens):
    """The seed's boxed formula: 1/2 (S_E f_E)/(d f_a) (B_net/B_pcie) (N_ue/N_t)."""
    model = np.divide(np.multiply(expert_params, f_e), np.multiply(hidden, f_a))
    system = np.divide(b_net, b_pcie)
    query = np.divide(n_ue, tokens)
    return 0.5 * model * system * query


def tipping_tokens_worst(k, n_experts, expert_bytes, b_pcie, hidden, f_dispatch, f_combine, b_net,
                         alpha_pcie=0.0, alpha_net=0.0, fanout=1.0, resident=0.0):
    """N_t* where gamma crosses 1 under worst-case routing; NaN where offload always wins.

    Past saturation (k N_t >= E) the offload overhead is constant, P = (1-h) E (alpha_pcie +
    S_E f_E / B_pcie) per layer, while EP grows linearly: 2 alpha_net + phi N_t c, with
    c = d (f_dispatch + f_combine) / B_net. So gamma = 1 at N_t* = (P - 2 alpha_net) / (phi c).
    Below saturation gamma is constant (alpha_net = 0) or rising, so a crossing exists iff
    gamma at saturation (N_t = E/k) exceeds 1. Seed: N_t* = C E with C = gamma / k.
    """
    per_expert = alpha_pcie + np.divide(expert_bytes, b_pcie)
    saturated_p = (1 - np.asarray(resident)) * n_experts * per_expert
    per_token = np.multiply(fanout, hidden) * np.add(f_dispatch, f_combine) / b_net
    n_sat = np.divide(n_experts, k)
    # A zero EP cost (phi = 0: nothing is remote) never crosses: inf/NaN, masked below.
    with np.errstate(divide="ignore", invalid="ignore"):
        gamma_at_sat = saturated_p / (2 * np.asarray(alpha_net) + per_token * n_sat)
        crossing = (saturated_p - 2 * np.asarray(alpha_net)) / per_token
    return np.where(gamma_at_sat > 1, crossing, np.nan)


# --- the whole model for specs ------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """gamma and its parts for one (model, system, workload, options). SI units."""

    gamma: float  # t_p_overhead / t_ep_overhead: < 1 offload wins, > 1 EP wins
    gamma_seed: float  # the seed's boxed formula with this n_ue (equal to gamma at defaults)
    n_ue: float  # used experts per layer per pass
    tokens: int  # tokens per pass (N_t, or B in decode)
    fanout: float  # phi
    f_e: float  # bytes per expert parameter
    f_a: float  # bytes per activation (seed)
    f_dispatch: float
    f_combine: float
    b_pcie: float
    b_net: float
    expert_bytes: float  # S_E f_E
    model_term: float  # (S_E f_E) / (d f_a)
    system_term: float  # B_net / B_pcie
    query_term: float  # N_ue / N_t
    t_b: float  # baseline: MoE-layer roofline time for all passes
    t_p_overhead: float  # T_P - T_B
    t_ep_overhead: float  # T_EP - T_B
    tipping_tokens: float | None  # N_t* (prefill, worst case); None: offload wins at every N_t
    passes: int

    @property
    def decision(self) -> str:
        return "offload" if self.gamma < 1 else "ep"

    @property
    def t_p(self) -> float:
        return self.t_b + self.t_p_overhead

    @property
    def t_ep(self) -> float:
        return self.t_b + self.t_ep_overhead

    @property
    def c_seed(self) -> float:
        """C = 1/2 model system: the seed's gamma is C k below saturation, C E / N_t above."""
        return 0.5 * self.model_term * self.system_term

    @property
    def deciding_factor(self) -> str:
        """The factor of the seed's three that is furthest from 1 on a log scale."""
        terms = {
            "model": 0.5 * self.model_term,
            "system": self.system_term,
            "query": self.query_term,
        }
        return max(terms, key=lambda name: abs(np.log(terms[name])))


def resolve_fanout(model: ModelSpec, options: Options) -> float:
    if options.fanout is not None:
        return float(options.fanout)
    if options.ep_ranks is not None:
        return float(fanout_uniform(options.ep_ranks, model.n_experts, model.top_k))
    return 1.0


def baseline_time(model: ModelSpec, system: SystemSpec, tokens, n_ue):
    """T_B per pass: a roofline of the routed and shared experts of every MoE layer.

    FLOPs: 2 S_E per token and chosen expert; bytes: the used experts' weights plus the
    activations in and out. Attention and dense layers are outside the model: they cost
    the same under both strategies, so gamma never depends on T_B.
    """
    shared_params = (3 if model.gated else 2) * model.hidden * model.shared_intermediate
    flops = 2 * np.multiply(tokens, model.top_k * model.expert_params + shared_params)
    weight_bytes = (np.multiply(n_ue, model.expert_params) + shared_params) * model.f_e
    act_bytes = 2 * np.multiply(tokens, model.hidden * model.f_a)
    per_layer = np.maximum(flops / system.peak_flops, (weight_bytes + act_bytes) / system.hbm_bw)
    return model.n_moe_layers * per_layer


def activation_bytes(model: ModelSpec, options: Options) -> tuple[float, float]:
    """(f_dispatch, f_combine): bytes per activation sent to the experts and sent back."""
    return (DTYPE_BYTES[options.dispatch_dtype or model.act_dtype],
            DTYPE_BYTES[options.combine_dtype or model.act_dtype])


def pass_overheads(model: ModelSpec, system: SystemSpec, options: Options, tokens):
    """(N_ue, T_P - T_B, T_EP - T_B) of one forward pass of `tokens` tokens (arrays welcome)."""
    used = n_used_uniform if options.routing == "uniform" else n_used_worst
    n_ue = used(tokens, model.top_k, model.n_experts)
    t_p = offload_overhead(n_ue, model.expert_bytes, system.b_pcie, model.n_moe_layers,
                           system.alpha_pcie, options.resident_fraction)
    t_ep = ep_overhead(tokens, model.hidden, *activation_bytes(model, options), system.b_net,
                       model.n_moe_layers, system.alpha_net, resolve_fanout(model, options))
    return n_ue, t_p, t_ep


def gamma_of_tokens(model: ModelSpec, system: SystemSpec, options: Options, tokens):
    """gamma for one forward pass of `tokens` tokens (an array), with all the options."""
    _, t_p, t_ep = pass_overheads(model, system, options, tokens)
    return t_p / t_ep


def tipping_tokens_numeric(gamma_of, max_tokens: float = 1e12) -> float:
    """The largest N_t with gamma(N_t) = 1, for any gamma(N_t) that ends below 1.

    Scans a log grid for the last point with gamma >= 1, then bisects to the crossing.
    NaN when gamma < 1 everywhere on the grid (offload wins at every N_t).
    """
    grid = np.geomspace(1, max_tokens, 241)
    above = np.nonzero(gamma_of(grid) >= 1)[0]
    if above.size == 0 or above[-1] == grid.size - 1:
        return float("nan")
    lo, hi = grid[above[-1]], grid[above[-1] + 1]
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if gamma_of(np.array(mid)) >= 1 else (lo, mid)
    return float(0.5 * (lo + hi))


def evaluate(model: ModelSpec, system: SystemSpec, workload: Workload,
             options: Options | None = None) -> Result:
    options = options or Options()
    tokens, passes = workload.tokens_per_pass, workload.passes
    f_d, f_c = activation_bytes(model, options)
    phi = resolve_fanout(model, options)
    n_ue, t_p, t_ep = (float(x) for x in pass_overheads(model, system, options, tokens))
    t_p, t_ep = passes * t_p, passes * t_ep  # decode: every step pays both again
    if options.routing == "uniform":
        tipping = tipping_tokens_numeric(lambda n: gamma_of_tokens(model, system, options, n))
    else:
        tipping = float(tipping_tokens_worst(
            model.top_k, model.n_experts, model.expert_bytes, system.b_pcie, model.hidden,
            f_d, f_c, system.b_net, system.alpha_pcie, system.alpha_net, phi,
            options.resident_fraction))
    return Result(
        # One EP rank (phi = 0) without latency moves nothing: EP is free, gamma infinite.
        gamma=t_p / t_ep if t_ep > 0 else float("inf"),
        gamma_seed=float(gamma_seed(model.expert_params, model.f_e, model.hidden, model.f_a,
                                    system.b_net, system.b_pcie, n_ue, tokens)),
        n_ue=n_ue,
        tokens=tokens,
        fanout=phi,
        f_e=model.f_e,
        f_a=model.f_a,
        f_dispatch=f_d,
        f_combine=f_c,
        b_pcie=system.b_pcie,
        b_net=system.b_net,
        expert_bytes=model.expert_bytes,
        model_term=model.expert_bytes / (model.hidden * model.f_a),
        system_term=system.b_net / system.b_pcie,
        query_term=n_ue / tokens,
        t_b=passes * float(baseline_time(model, system, tokens, n_ue)),
        t_p_overhead=t_p,
        t_ep_overhead=t_ep,
        tipping_tokens=None if np.isnan(tipping) else tipping,
        passes=passes,
    )
