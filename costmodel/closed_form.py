"""The seed's gamma model in closed form, and its extensions (docs/model.md).

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

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from moelab.costmodel import group_limited
from moelab.costmodel.specs import DTYPE_BYTES, ModelSpec, Options, SpecError, SystemSpec, Workload

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


# --- fan-out: two tiers ---------------------------------------------------------------
#
# Placement (docs/model.md, as the JAX reference places them): expert e lives on rank
# floor(e R / E) (contiguous blocks; when R does not divide E the blocks differ by one, and
# with R > E some ranks hold none); rank r lives on node floor(r / G) (G GPUs per node, the
# last node partial when G does not divide R). A token lives on a rank drawn uniformly (the
# reference spreads tokens in contiguous blocks: the same average when R divides N_t). It
# picks k of the E experts uniformly without replacement, so a set of m experts is missed
# with probability C(E - m, k) / C(E, k) = prod_{i<k} (E - m - i) / (E - i): every
# expectation below is exact, a sum over ranks or nodes of such hit probabilities.


def miss_probability(m, n_experts, k):
    """P(a uniform top-k token picks none of a given m experts) = C(E-m, k) / C(E, k)."""
    m, E, k = np.broadcast_arrays(np.asarray(m, float), np.asarray(n_experts, float),
                                  np.asarray(k, float))
    miss = np.ones(m.shape)
    for i in range(int(np.max(k, initial=0))):
        with np.errstate(divide="ignore", invalid="ignore"):
            factor = np.clip((E - m - i) / (E - i), 0.0, 1.0)
        miss = np.where(i < k, miss * factor, miss)
    return miss


def experts_per_rank(n_experts: int, ranks: int) -> np.ndarray:
    """[R] experts on each rank under contiguous placement e -> floor(e R / E)."""
    r = np.arange(int(ranks) + 1, dtype=np.int64)
    bounds = -((-r * int(n_experts)) // int(ranks))  # ceil(r E / R): first expert of rank r
    return np.diff(bounds)


def fanout_uniform(ranks, n_experts, k):
    """Expected remote EP ranks a token goes to, per direction (both tiers together).

    With a = floor(E/R) and E mod R ranks holding a + 1 experts (the rest a):
        phi = (R - 1)/R * [(R - E mod R)(1 - miss(a)) + (E mod R)(1 - miss(a + 1))],
    exact also when R does not divide E (R=16, E=8, k=2: 15/16 * 8 * (1 - 21/28) = 1.875).
    Broadcasts over arrays.
    """
    R, E, k = np.broadcast_arrays(np.asarray(ranks, float), np.asarray(n_experts, float),
                                  np.asarray(k, float))
    a = np.floor(E / R)
    big = E - a * R  # ranks with a + 1 experts
    hits = (R - big) * (1 - miss_probability(a, E, k)) + big * (1 - miss_probability(a + 1, E, k))
    return (R - 1) / R * hits


@dataclass(frozen=True)
class Tiers:
    """Expected remote destinations of one token per direction, by tier (uniform top-k)."""

    intra: float  # remote ranks on the token's own node (NVLink)
    nodes: float  # remote nodes (one network copy each, deduplicated per node)
    ranks_inter: float  # remote ranks on other nodes (one network copy each, per rank)

    @property
    def ranks(self) -> float:
        """All remote ranks: fanout_uniform."""
        return self.intra + self.ranks_inter


@lru_cache(maxsize=4096)  # sweeps and ep_legs ask for the same few (R, E, k, G) often
def fanout_tiers(ranks: int, n_experts: int, k: int, gpus_per_node: int) -> Tiers:
    """Exact two-tier fan-out for contiguous placement over R ranks in nodes of G.

    With h_r = 1 - miss(n_r) (rank r hit), H_j = sum of h_r over node j of g_j ranks, and
    u_j = 1 - miss(m_j) (node j, holding m_j experts, hit), averaged over the home rank:
        intra       = 1/R sum_j (g_j - 1) H_j
        ranks_inter = 1/R sum_j g_j (sum_j' H_j' - H_j)
        nodes       = 1/R sum_j g_j (sum_j' u_j' - u_j)
    """
    R, G = int(ranks), max(1, min(int(gpus_per_node), int(ranks)))
    n_r = experts_per_rank(n_experts, R)
    node = np.arange(R) // G
    g = np.bincount(node).astype(float)
    H = np.bincount(node, 1 - miss_probability(n_r, n_experts, k))
    u = 1 - miss_probability(np.bincount(node, n_r), n_experts, k)
    return Tiers(intra=float(np.sum((g - 1) * H) / R),
                 nodes=float(np.sum(g * (u.sum() - u)) / R),
                 ranks_inter=float(np.sum(g * (H.sum() - H)) / R))


def fanout_nodes_group_limited(nodes: int, n_group: int, topk_group: int, n_experts: int,
                               k: int) -> float:
    """Expected remote nodes per token under DeepSeek's group-limited router, exactly.

    The router of routing.group_limited (groups kept for the sum of their two best Gumbel
    scores, top-k among the kept groups' experts), contiguous placement, n_group a multiple
    of the node count: costmodel/group_limited.py integrates the law of the number of
    groups the k experts fall in (R1's figures against Monte Carlo: docs/model.md). The two
    bounds below bracket it.
    """
    return group_limited.fanout_nodes(nodes, n_experts, k, n_group, topk_group)


def _group_node_miss(nodes: int, n_group: int, topk_group: int, miss_given_kept) -> float:
    """(M - 1)(1 - sum_c P(c) m(c)): c of a node's g = n_group / M groups kept
    (hypergeometric: the kept groups are any topk_group-subset alike, by symmetry), m(c)
    the probability that the token's experts miss all c."""
    from math import comb

    M = int(nodes)
    if M < 2:
        return 0.0
    if n_group % M:
        raise SpecError(f"nodes: {M} nodes must divide n_group={n_group}")
    g = n_group // M
    miss = sum(comb(g, c) * comb(n_group - g, topk_group - c) / comb(n_group, topk_group)
               * miss_given_kept(c) for c in range(0, min(g, topk_group) + 1))
    return (M - 1) * (1 - miss)


def fanout_nodes_group_limited_lower_bound(nodes: int, n_group: int, topk_group: int,
                                           n_experts: int, k: int) -> float:
    """Remote nodes when the k experts are uniform among the kept groups' experts (s per
    group, pool = topk_group s): m(c) = C(pool - c s, k) / C(pool, k), exact for that model.
    DeepSeek's router spreads its picks over the kept groups more than uniform picks do
    (a group is kept for its best scores), so it lies above: a bound checked against the
    exact value (tests/test_group_limited.py), not proven in general."""
    s = n_experts // n_group
    return _group_node_miss(nodes, n_group, topk_group,
                            lambda c: float(miss_probability(c * s, topk_group * s, k)))


def fanout_nodes_group_limited_upper_bound(nodes: int, n_group: int, topk_group: int) -> float:
    """Remote nodes if every kept group held one of the token's experts: m(c) = [c = 0].
    A node with no kept group is never reached, so no router reaches more (equality when
    k = topk_group x experts per group: every kept expert is picked)."""
    return _group_node_miss(nodes, n_group, topk_group, lambda c: float(c == 0))


# --- the busiest rank -----------------------------------------------------------------------
#
# Every rank holds N tokens and sends each once to every remote rank it hits; X_r = rows
# rank r receives from the other ranks' M = (R - 1) N tokens. Exact and cheap: each X_r's
# mean and variance, and the variance of the total S = sum_r X_r, a sum over tokens of the
# remote ranks each hits. A token's k picks compete for ranks, so receivers are negatively
# correlated: with the marginal variances, Var S fixes sum_{r != s} Cov(X_r, X_s) and so the
# mean spread between two ranks,
#     W = mean over r != s of Var(X_r - X_s) / 2 = (R sum_r Var X_r - Var S) / (R (R - 1)),
# which in the normal limit sets E[max] (equicorrelated normals: mu + sqrt(W) E[max Z]).
# Independent receivers with the exact means miss it (1.5-6% low at 1-2 tokens per rank).
# The model: receivers Y_r independent, each with the exact mean and f times the exact
# variance (beta-binomial over M trials; a binomial with fewer trials when f Var X_r is
# below the binomial's), where
#     f0 = W / mean_r Var X_r = (R sum_r Var X_r - Var S) / ((R - 1) sum_r Var X_r)
# gives every pair of ranks its exact mean spread. For small counts (R * top <= 2^13) the
# receivers are also conditioned on their sum, drawn from a discretized normal with the
# exact mean and Var S, with f refitted so that the marginal variances come out exact:
#     P(max_r X_r <= c) = sum_s P(S = s) [z^s] prod_r G_r,c(z) / [z^s] prod_r G_r(z),
# G_r the pgf of Y_r, G_r,c its terms up to z^c; E[max] = sum_{c >= 0} (1 - P(max <= c)).
# An approximation, checked against Monte Carlo of concrete routings (tests/test_imbalance.py;
# docs/model.md gives the grid and the worst error) and against exact enumeration on tiny cases.

_CONDITIONED_MAX_LENGTH = 2**13  # beyond: unconditioned (they agree to 1e-4 there)


@dataclass(frozen=True)
class RankLoads:
    """Exact moments of the rows each rank receives (X_r) with N tokens per rank."""

    mean: np.ndarray  # [R] E[X_r]
    var: np.ndarray  # [R] Var X_r
    total_var: float  # Var sum_r X_r
    trials: int  # (R - 1) N: the most rows one rank can receive
    # the exact law of sum_r X_r as (pmf of one token's remote ranks hit, tokens alike);
    # empty: a discretized normal with total_var
    token_laws: object = None  # () -> ((pmf, tokens alike), ...), built when needed
    independent: bool = False  # the X_r are independent (ranks hit independently)


def loads_from_probabilities(tokens: int, hit, hits_variance: float | None = None) -> RankLoads:
    """Every token hits rank r with probability hit[r]; hits_variance = Var D, D the ranks a
    token hits (home included; None: ranks hit independently, sum_r h_r (1 - h_r)).
    Var S = N (R-1) sum_r h_r (1 - h_r) + N (R-2) (Var D - sum_r h_r (1 - h_r)): a token's
    covariances sum to Var D - sum_r h_r (1 - h_r), and R - 2 ranks' tokens reach a pair."""
    hit = np.asarray(hit, float)
    R, N = hit.size, int(tokens)
    spread = hit * (1 - hit)
    var_d = float(spread.sum()) if hits_variance is None else float(hits_variance)
    total_var = N * (R - 1) * spread.sum() + N * (R - 2) * (var_d - spread.sum())
    return RankLoads((R - 1) * N * hit, (R - 1) * N * spread, float(total_var), (R - 1) * N,
                     independent=hits_variance is None)


def loads_uniform(tokens: int, n_experts: int, k: int, held) -> RankLoads:
    """Uniform top-k routing over a placement (per rank its experts), as reference.rank_loads
    counts it: token t on rank t // N; a replicated expert's token t goes to its copy
    t mod copies. Exact: for one token every expert has one destination, a_r experts on
    rank r, so rank r is missed with probability miss(a_r) = C(E - a_r, k) / C(E, k) and
    Cov(hit r, hit s) = miss(a_r + a_s) - miss(a_r) miss(a_s); tokens with the same copy
    pattern (t mod lcm(copies)) share them."""
    E, R, N, k = int(n_experts), len(held), int(tokens), int(k)
    held = tuple(tuple(int(e) for e in h) for h in held)
    count = _token_counts(N, held)
    a, hit, row = _pattern_moments(E, k, held, count.shape[1])
    spread = hit * (1 - hit)
    foreign = count.sum(0)[None, :] - count  # [r, c]: tokens of pattern c not on rank r
    mean = np.sum(foreign * hit.T, axis=1)
    var = np.sum(foreign * spread.T, axis=1)
    per_token = spread.sum(1)[None, :] - spread.T + row.sum(1)[None, :] - 2 * row.T  # [home, c]

    def token_laws():  # one token's law depends on its pattern and home block
        laws: dict[tuple, list] = {}
        for h, c in zip(*np.nonzero(count), strict=True):
            key = (int(c), int(a[c, h]))
            if key not in laws:
                laws[key] = [_remote_ranks_law(np.delete(a[c], h), int(a[c, h]), E, k), 0]
            laws[key][1] += int(count[h, c])
        return tuple((law, n) for law, n in laws.values())

    return RankLoads(mean, var, float(np.sum(count * per_token)), (R - 1) * N, token_laws)


def _copies(held: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(copies [E], table [E, J]: the rank of each expert's copy j, in rank order)."""
    E = 1 + max((e for h in held for e in h), default=-1)
    copies = np.zeros(E, np.int64)
    table = np.zeros((E, sum(len(h) for h in held)), np.int64)
    for r, h in enumerate(held):
        for e in h:
            table[e, copies[e]] = r
            copies[e] += 1
    return copies, table


def _token_counts(tokens: int, held: tuple) -> np.ndarray:
    """[R, C] tokens by home rank and copy pattern. Token t lives on rank t // N and uses
    copy t mod copies_e of expert e, so its pattern is t mod lcm(copies) (t itself when
    that period exceeds the R N tokens); counted without listing the tokens."""
    R, N = len(held), int(tokens)
    period = _period(held)
    classes = min(period, R * N)
    if classes > 2**16:
        raise ValueError(f"held: {period} copy patterns (lcm of the replica counts)")
    start, c = (np.arange(R) * N)[:, None], np.arange(classes)[None, :]
    return ((c - start) % classes < N % classes).astype(float) + N // classes


@lru_cache(maxsize=256)
def _period(held: tuple) -> int:
    return math.lcm(*(int(c) for c in _copies(held)[0]))


@lru_cache(maxsize=256)
def _pattern_moments(n_experts: int, k: int, held: tuple, classes: int):
    """Per copy pattern c: a [C, R] experts whose copy is on each rank, hit [C, R] and
    row [C, R] = sum_{s != r} Cov(hit r, hit s), over the distinct a values."""
    E, R = n_experts, len(held)
    copies, table = _copies(held)
    dest = table[np.arange(E)[None, :], np.arange(classes)[:, None] % copies[None, :]]
    a = np.stack([np.bincount(d, minlength=R) for d in dest]).astype(float)
    miss = miss_probability(a, E, k)
    row = np.stack([
        sum(n * (miss_probability(a[c] + u, E, k) - miss[c] * miss_probability(u, E, k))
            for u, n in zip(*np.unique(a[c], return_counts=True), strict=True))
        - (miss_probability(2 * a[c], E, k) - miss[c] ** 2)
        for c in range(classes)])
    return a, 1 - miss, row


_EXACT_MAX_STATES = 50_000  # joint count vectors (M + 1)^R: below, E[max] is summed exactly


def expected_max_exact(tokens: int, n_experts: int, k: int, held) -> float | None:
    """E[max_r X_r] exactly for small cases ((M + 1)^R <= _EXACT_MAX_STATES, else None):
    the joint law of (X_0, ..., X_{R-1}) built token by token. A token of pattern c hits
    exactly the rank set A (then its home is dropped) with probability
    sum_{B in A} (-1)^{|A| - |B|} C(a_B, k) / C(E, k), a_B its experts on the ranks of B."""
    E, R, N, k = int(n_experts), len(held), int(tokens), int(k)
    M = (R - 1) * N
    if R > 16 or (M + 1) ** R > _EXACT_MAX_STATES:
        return None
    held = tuple(tuple(int(e) for e in h) for h in held)
    count = _token_counts(N, held)
    a = _pattern_moments(E, k, held, count.shape[1])[0]
    masks = np.arange(1 << R)
    members = (masks[:, None] >> np.arange(R)[None, :]) & 1  # [2^R, R]
    joint = np.zeros((M + 1,) * R)
    joint[(0,) * R] = 1.0
    for c in range(a.shape[0]):
        within = np.array([math.comb(int(n), k) for n in members @ a[c]], float) / math.comb(E, k)
        exactly = within.copy()  # Moebius inversion over subsets, one rank at a time
        for r in range(R):
            has = members[:, r] == 1
            exactly[has] -= exactly[masks[has] ^ (1 << r)]
        for h in np.nonzero(count[:, c])[0]:
            remote = np.bincount(masks & ~(1 << int(h)), weights=exactly, minlength=1 << R)
            for _ in range(int(count[h, c])):
                new = np.zeros_like(joint)
                for mask in np.nonzero(remote > 0)[0]:
                    src = tuple(slice(0, M) if mask >> r & 1 else slice(None) for r in range(R))
                    dst = tuple(slice(1, None) if mask >> r & 1 else slice(None) for r in range(R))
                    new[dst] += remote[mask] * joint[src]
                joint = new
    busiest = np.max(np.indices(joint.shape), axis=0)
    return float(np.sum(joint * busiest))


def _remote_ranks_law(foreign, home: int, n_experts: int, k: int) -> np.ndarray:
    """pmf of the number of remote ranks one token hits: blocks of foreign[r] experts on
    the other ranks, `home` on its own, k of E picked uniformly. Counts k-subsets by the
    generating function (1 + x)^home prod_r [1 + y ((1 + x)^a_r - 1)], [x^k y^d]."""
    width = min(k, len(foreign)) + 1
    P = np.zeros((width, k + 1))  # P[d, j]: ways to pick j experts hitting d remote ranks
    P[0] = [math.comb(home, j) for j in range(k + 1)]
    for size in foreign:
        some = np.array([math.comb(int(size), j) for j in range(k + 1)], float)
        some[0] = 0.0  # at least one expert of this rank
        shift = np.zeros((k + 1, k + 1))  # row i: x^i times `some`, truncated at x^k
        for i in range(k + 1):
            shift[i, i:] = some[: k + 1 - i]
        P[1:] = P[1:] + P[:-1] @ shift
    law = P[:, k] / math.comb(n_experts, k)
    return law / law.sum()


def _beta_binomial(n: int, p: float, dispersion: float, top: int, low: int = 0) -> np.ndarray:
    """pmf on low..top of the beta-binomial with n trials, mean n p and variance
    dispersion * n p (1 - p) (1: the binomial; at most n). Its terms are the binomial's
    times prod_{i<x} (1 + i/a) prod_{i<n-x} (1 + i/b) / prod_{i<n} (1 + i/(a+b)): summed as
    log1p up to 1e5 trials, so that a dispersion near 1 (a + b huge) keeps full precision,
    as lgamma differences beyond (a + b over 1e12: the binomial). scipy.stats.betabinom
    takes betaln differences, which lose that precision (4e-5 relative at a + b = 1e10,
    against mpmath), and scipy.stats would add ~0.5 s to `moelab plan`'s start."""
    from scipy.special import gammaln  # here, not at the top: `moelab gamma` starts light

    pmf = np.zeros(top + 1 - low)
    if p <= 0 or p >= 1:
        at = 0 if p <= 0 else n
        if low <= at <= top:
            pmf[at - low] = 1.0
        return pmf
    x = np.arange(low, min(top, n) + 1, dtype=float)
    log_pmf = (gammaln(n + 1) - gammaln(x + 1) - gammaln(n - x + 1)
               + x * math.log(p) + (n - x) * math.log1p(-p))
    dispersion = min(dispersion, n * (1 - 1e-9))
    s = (n - dispersion) / (dispersion - 1) if dispersion > 1 + 1e-12 else math.inf  # a + b
    if n <= 100_000 and s < math.inf:
        i = np.arange(n, dtype=float)
        rise_a = np.concatenate([[0.0], np.cumsum(np.log1p(i / (p * s)))])
        rise_b = np.concatenate([[0.0], np.cumsum(np.log1p(i / ((1 - p) * s)))])
        xi = x.astype(np.int64)
        log_pmf += rise_a[xi] + rise_b[n - xi] - np.sum(np.log1p(i / s))
    elif s < 1e12:
        def rise(c, m):  # sum_{i<m} log1p(i / c)
            return gammaln(c + m) - gammaln(c) - m * math.log(c)
        a, b = p * s, (1 - p) * s
        log_pmf += rise(a, x) + rise(b, n - x) - rise(s, n)
    pmf[: x.size] = np.exp(log_pmf)
    return pmf


def _receiver_pmf(trials: int, mean: float, var: float, top: int, low: int = 0) -> np.ndarray:
    """pmf on low..top of a count of at most `trials` with this mean and variance: the
    beta-binomial over all trials when var is at least the binomial's, else binomials over
    n = mean^2 / (mean - var) trials (a mixture of the two integers around n)."""
    if mean <= 0:
        return _beta_binomial(trials, 0.0, 1.0, top, low)
    binomial_var = mean * (1 - mean / trials)
    if var >= binomial_var:
        return _beta_binomial(trials, mean / trials, var / binomial_var if binomial_var > 0
                              else 1.0, top, low)
    n = mean * mean / (mean - var)
    n0 = max(math.floor(n), math.ceil(mean))
    if n0 >= n:
        return _beta_binomial(n0, mean / n0, 1.0, top, low)
    v0, v1 = mean * (1 - mean / n0), mean * (1 - mean / (n0 + 1))
    w = (v1 - var) / (v1 - v0)
    return w * _beta_binomial(n0, mean / n0, 1.0, top, low) + (1 - w) * _beta_binomial(
        n0 + 1, mean / (n0 + 1), 1.0, top, low)


def _power(f: np.ndarray, n) -> np.ndarray:
    """f ** n for an integer n >= 0 by repeated squaring (numpy's complex power is slower)."""
    n, out = int(n), np.ones_like(f)
    while n:
        if n & 1:
            out = out * f
        n >>= 1
        if n:
            f = f * f
    return out


class _Receivers:
    """Rank kinds j (mean, variance, count n_j) with the law of their total; builds the
    receivers' pmfs for a variance factor f and evaluates the conditioned model."""

    def __init__(self, loads: RankLoads, mean, var, count, top: int):
        self.trials, self.mean, self.var = loads.trials, mean, var
        self.count = np.asarray(count, np.int64)
        self.top, self.R = top, int(self.count.sum())
        self.length = 1 << int(self.R * top).bit_length()
        s = np.arange(self.R * top + 1)
        if loads.token_laws is not None:  # P(S = s) exactly: the tokens' laws convolved
            law = np.fft.irfft(np.prod([_power(np.fft.rfft(p, self.length), n)
                                        for p, n in loads.token_laws()], axis=0), self.length)
            law = np.clip(law[: s.size], 0, None)
        else:  # a discretized normal with the exact mean and Var S
            z2 = (s - float(np.sum(self.count * mean))) ** 2 / (2 * max(loads.total_var, 1e-9))
            law = np.exp(-(z2 - z2.min()))
        self.total = law / law.sum()
        self.var_sum = float(np.sum(self.count * var))

    def pmfs(self, f):
        return [_receiver_pmf(self.trials, m, f * v, self.top)
                for m, v in zip(self.mean, self.var, strict=True)]

    def _product(self, pmfs, extra=None):
        """Coefficients of prod_j pgf_j^{n_j}; with extra, sum_j n_j extra_j pgf_j^{n_j - 1}
        prod_{i != j} pgf_i^{n_i}."""
        F = [np.fft.rfft(p, self.length) for p in pmfs]
        if extra is None:
            out = np.prod([_power(f, n) for f, n in zip(F, self.count, strict=True)], axis=0)
        else:
            out = 0
            for j, (g, n) in enumerate(zip(extra, self.count, strict=True)):
                rest = np.prod([_power(f, c - (i == j)) for i, (f, c) in
                                enumerate(zip(F, self.count, strict=True))], axis=0)
                out = out + n * np.fft.rfft(g, self.length) * rest
        return np.fft.irfft(out, self.length)[: self.total.size]

    @staticmethod
    def _ratio(num, den):
        ok = den > 1e-14 * den.max()
        return np.where(ok, num / np.where(ok, den, 1.0), 0.0)

    def variance_sum(self, f) -> float:
        """sum_r Var X_r in the conditioned model (means taken as the exact ones)."""
        pmfs = self.pmfs(f)
        x2 = np.arange(self.top + 1, dtype=float) ** 2
        second = self._ratio(self._product(pmfs, [x2 * p for p in pmfs]), self._product(pmfs))
        return float(np.sum(self.total * np.clip(second, 0, None))
                     - np.sum(self.count * self.mean ** 2))

    def fit(self, guess: float) -> float:
        """f with the conditioned model's sum_r Var X_r equal to the exact one (regula falsi,
        Illinois variant; the variance grows with f)."""
        def gap(f):
            return self.variance_sum(f) - self.var_sum

        lo, g_lo = 1.0, gap(1.0)
        if g_lo >= 0:
            return 1.0
        hi = max(guess, 1.0 + 1e-3)
        g_hi = gap(hi)
        while g_hi < 0 and hi < self.trials:
            lo, g_lo, hi = hi, g_hi, min(float(self.trials), 1 + 2 * (hi - 1))
            g_hi = gap(hi)
        if g_hi <= 0:
            return hi
        side, mid = 0, hi
        for _ in range(40):
            mid = (lo * g_hi - hi * g_lo) / (g_hi - g_lo)
            g_mid = gap(mid)
            if abs(g_mid) < 1e-7 * self.var_sum or hi - lo < 1e-9:
                break
            if g_mid < 0:
                lo, g_lo, g_hi, side = mid, g_mid, g_hi / 2 if side == -1 else g_hi, -1
            else:
                hi, g_hi, g_lo, side = mid, g_mid, g_lo / 2 if side == 1 else g_lo, 1
        return mid

    def expected_max(self, f) -> float:
        pmfs = self.pmfs(f)
        den = self._product(pmfs)
        with np.errstate(divide="ignore"):
            log_cdf = np.array([np.log(np.minimum(np.cumsum(p), 1.0)) for p in pmfs])
        out = 0.0
        for c in range(self.top):
            if self.count @ log_cdf[:, c] < -46:  # < 1e-20 independent: ~0 for any coupling
                out += 1.0
                continue
            p_all = float(np.sum(self.total * np.clip(self._ratio(
                self._product([p[: c + 1] for p in pmfs]), den), 0, 1)))
            out += 1 - p_all
            if 1 - p_all < 1e-10:
                break
        return out


def _expected_max_independent(trials: int, mean, var, count) -> float:
    """E[max] of independent receivers (count[j] of kind j with this mean and variance):
    sum_c (1 - prod_r P(Y_r <= c)) per integer on a window of +-14 standard deviations
    (below it P(Y_r <= c) < 1e-40), or for windows over 4000 integers (standard deviations
    over 140, skewness below 0.01) normal receivers integrated on a fine grid."""
    sd = np.sqrt(var)
    lo = int(max(0.0, np.floor(np.min(mean - 14 * sd - 2))))
    hi = int(min(trials, np.ceil(np.max(mean + 14 * sd + 2))))
    if hi - lo <= 4000:
        log_cdf = np.zeros(hi + 1 - lo)
        for m, v, c in zip(mean, var, count, strict=True):
            cdf = np.minimum(np.cumsum(_receiver_pmf(trials, m, v, hi, lo)), 1.0)
            with np.errstate(divide="ignore"):
                log_cdf += c * np.log(cdf)
        return float(lo + np.sum(1 - np.exp(log_cdf[:-1])))
    from scipy.special import log_ndtr  # log of the standard normal cdf, exact in the tail

    x = np.linspace(lo, hi, 4001)
    log_prod = np.zeros_like(x)
    for m, s, c in zip(mean, sd, count, strict=True):
        z = (x + 0.5 - m) / s if s > 0 else np.where(x + 0.5 >= m, np.inf, -np.inf)
        log_prod += c * log_ndtr(z)
    # sum_{c >= lo} g(c) = integral of g from lo - 1/2 (midpoint rule), g = 1 below lo
    return float(lo + 0.5 + np.trapezoid(1 - np.exp(log_prod), x))


def expected_max_load(loads: RankLoads) -> float:
    """E[max_r X_r] under the model above."""
    active = loads.mean > 0
    mean, var = loads.mean[active], loads.var[active]
    R = int(active.sum())
    if R == 0:
        return 0.0
    if R == 1:
        return float(mean[0])
    kinds, count = np.unique(np.round(np.stack([mean, var], 1), 9), axis=0, return_counts=True)
    spread = float(var.sum())
    f0 = max(1.0, (R * spread - loads.total_var) / ((R - 1) * spread)) if spread > 0 else 1.0
    top = int(min(loads.trials, math.ceil(mean.max() + 12 * math.sqrt(2.5 * var.max()) + 16)))
    if loads.independent:
        return _expected_max_independent(loads.trials, kinds[:, 0], kinds[:, 1], count)
    if R * top <= _CONDITIONED_MAX_LENGTH and spread > 0:
        receivers = _Receivers(loads, kinds[:, 0], kinds[:, 1], count, top)
        return receivers.expected_max(receivers.fit(f0))
    return _expected_max_independent(loads.trials, kinds[:, 0], f0 * kinds[:, 1], count)


def _imbalance(loads_at, tokens) -> float:
    """max(E[max], max_r E[X_r]) / mean_r E[X_r] from (E[max], mean, max mean) at integer
    token counts (loads_at); a fractional N interpolates all three linearly between the
    neighbouring integers (0 at N = 0), as the tipping solver's fractional N_t needs a
    continuous answer."""
    N = float(tokens)
    if N <= 0:
        return 1.0
    below = math.floor(N)
    at = np.array(loads_at(below) if below > 0 else (0.0, 0.0, 0.0))
    if below < N:
        at = (below + 1 - N) * at + (N - below) * np.array(loads_at(below + 1))
    expected_max, mean, max_mean = at
    if mean <= 0:
        return 1.0
    # E[max_r X_r] >= max_r E[X_r] for any joint law: hold the bound.
    return float(max(expected_max, max_mean) / mean)


def _summary(loads: RankLoads) -> tuple[float, float, float]:
    return expected_max_load(loads), float(loads.mean.mean()), float(loads.mean.max())


def imbalance_from_probabilities(tokens_per_rank, hit, hits_variance=None) -> float:
    """E[max over ranks of rows received] / their mean, every token hitting rank r with
    probability hit[r] (loads_from_probabilities; hits_variance None: independent ranks)."""
    hit = np.asarray(hit, float)
    if hit.size < 2:
        return 1.0
    return _imbalance(lambda n: _summary(loads_from_probabilities(n, hit, hits_variance)),
                      tokens_per_rank)


@lru_cache(maxsize=4096)
def _summary_uniform(tokens: int, n_experts: int, k: int, held: tuple):
    loads = loads_uniform(tokens, n_experts, k, held)
    exact = expected_max_exact(tokens, n_experts, k, held)
    if exact is None:
        return _summary(loads)
    return exact, float(loads.mean.mean()), float(loads.mean.max())


def imbalance_placement(tokens_per_rank, n_experts: int, k: int, held) -> float:
    """E[max over ranks of rows received] / their mean for uniform top-k routing over a
    placement (per rank its experts; replicas as reference.rank_loads uses them)."""
    held = tuple(tuple(int(e) for e in h) for h in held)
    if len(held) < 2:
        return 1.0
    return _imbalance(lambda n: _summary_uniform(n, int(n_experts), int(k), held),
                      tokens_per_rank)


@lru_cache(maxsize=4096)
def imbalance_uniform(tokens_per_rank: float, ranks: int, n_experts: int, k: int,
                      redundant: int = 0) -> float:
    """imbalance under uniform top-k, contiguous placement, or with `redundant` replica
    slots placed by eplb_placement from uniform loads (imbalance_placement)."""
    if int(ranks) < 2:
        return 1.0
    return imbalance_placement(tokens_per_rank, n_experts, k,
                               _uniform_placement(int(n_experts), int(ranks), int(k), int(redundant)))


@lru_cache(maxsize=256)
def _uniform_placement(n_experts: int, ranks: int, k: int, redundant: int) -> tuple:
    held = (eplb_placement(np.full(n_experts, k / n_experts), ranks, redundant) if redundant
            else contiguous_placement(n_experts, ranks))
    return tuple(tuple(int(e) for e in h) for h in held)


def eplb_placement(load, ranks: int, redundant: int) -> list[list[int]]:
    """EPLB-like placement: `redundant` extra slots replicate the hottest experts, then all
    E + N slots are packed greedily onto R ranks of equal capacity ceil((E + N) / R).

    load[e]: expected tokens (or marginal probability) of expert e. Replicas go one at a
    time to the expert with the largest load per replica (at most R copies); slots are placed heaviest first
    on the least loaded rank with room that does not already hold that expert.
    Returns per rank the list of expert ids it holds.
    """
    load = np.asarray(load, float)
    E, R = load.size, int(ranks)
    copies = np.ones(E, np.int64)
    for _ in range(int(redundant)):
        # at most one copy per rank: a full expert takes no more replicas
        per_replica = np.where(copies < R, load / copies, -np.inf)
        copies[np.argmax(per_replica)] += 1
    capacity = -(-(E + int(redundant)) // R)
    slots = sorted(((load[e] / copies[e], e) for e in range(E) for _ in range(copies[e])),
                   key=lambda t: (-t[0], t[1]))
    held: list[list[int]] = [[] for _ in range(R)]
    rank_load = np.zeros(R)
    for w, e in slots:
        free = [r for r in range(R) if len(held[r]) < capacity and e not in held[r]]
        free = free or [r for r in range(R) if len(held[r]) < capacity]
        r = min(free, key=lambda r: (rank_load[r], r))
        held[r].append(e)
        rank_load[r] += w
    return held


def placement_hit_probabilities(marginals, held) -> np.ndarray:
    """[R] P(a token sends a row to rank r) from per-expert marginals q_e (sum q_e = k) and
    a placement (per rank, its expert ids; a replicated expert's tokens split evenly over
    its replicas). A token's picks are treated as independent across experts:
    1 - prod_{slots s on r} (1 - q_e(s) / c_e(s)), an approximation (exact: miss_probability
    for contiguous placement of uniform routing)."""
    q = np.asarray(marginals, float)
    copies = np.bincount(np.concatenate([np.asarray(h, np.int64) for h in held]),
                         minlength=q.size).astype(float)
    return np.array([1 - np.prod([1 - q[e] / copies[e] for e in h]) for h in held])


def contiguous_placement(n_experts: int, ranks: int) -> list[list[int]]:
    """The default placement: expert e on rank floor(e R / E)."""
    bounds = np.concatenate([[0], np.cumsum(experts_per_rank(n_experts, ranks))])
    return [list(range(bounds[r], bounds[r + 1])) for r in range(int(ranks))]


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


def tipping_tokens_low(gamma_of, max_tokens: float = 1e12) -> float:
    """The smallest N_t with gamma(N_t) = 1 when gamma starts below 1 and rises above it.

    With alpha_net > 0 the EP overhead has a floor (2 L alpha_net) that a few tokens'
    offload does not reach: gamma < 1 at small N_t, > 1 in the middle, < 1 again past the
    upper crossing (tipping_tokens). NaN when gamma(1) >= 1 or gamma never reaches 1.
    """
    grid = np.geomspace(1, max_tokens, 241)
    g = gamma_of(grid)
    above = np.nonzero(g >= 1)[0]
    if above.size == 0 or above[0] == 0:
        return float("nan")
    lo, hi = grid[above[0] - 1], grid[above[0]]
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if gamma_of(np.array(mid)) >= 1 else (mid, hi)
    return float(0.5 * (lo + hi))


# --- the whole model for specs ------------------------------------------------------------

# fp8 activations travel with one float32 scale per 128 values (DeepEP, the dispatch kernel).
FP8_SCALE_BYTES = 4 / 128


@dataclass(frozen=True)
class Result:
    """gamma and its parts for one (model, system, workload, options). SI units."""

    gamma: float  # t_p_overhead / t_ep_overhead: < 1 offload wins, > 1 EP wins
    gamma_seed: float  # the seed's boxed formula with this n_ue (equal to gamma at defaults)
    n_ue: float  # used experts per layer per pass
    tokens: int  # tokens per pass (N_t, or B in decode)
    fanout: float  # phi: remote ranks per token and direction (both tiers)
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
    ep: EPLegs | None = None  # with EP ranks: the two tiers, the busiest rank, the legs
    tipping_tokens_low: float | None = None  # the lower crossing (alpha_net > 0), if any

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


@dataclass(frozen=True)
class EPLegs:
    """Per layer and pass, the EP transfer by tier (expected, uniform top-k), SI units."""

    ranks: int
    gpus_per_node: int
    dispatch_mode: str
    tiers: Tiers
    imbalance: float  # E[max rank's received rows] / mean, the factor the legs pay
    imbalance_no_redundancy: float  # the same with contiguous placement (no replicas)
    redundant_experts: int
    redundant_bytes_per_rank: float  # replica weights per rank, all MoE layers
    t_net: float  # network leg of one layer (both directions), busiest rank
    t_nvlink: float  # NVLink leg of one layer (both directions), busiest rank
    net_copies: float  # network copies per token and direction
    nvlink_copies: float  # NVLink copies per token and direction

    @property
    def deciding_leg(self) -> str:
        return "network" if self.t_net >= self.t_nvlink else "nvlink"


def resolve_fanout(model: ModelSpec, options: Options) -> float:
    if options.fanout is not None:
        return float(options.fanout)
    if options.ep_ranks is not None:
        return float(fanout_uniform(options.ep_ranks, model.n_experts, model.top_k))
    return 1.0


def ep_legs(model: ModelSpec, system: SystemSpec, options: Options, tokens) -> EPLegs:
    """The two tiers of EP traffic for `tokens` per rank (scalar), with `options.ep_ranks`.

    Network leg: per-node dispatch sends fanout_nodes copies per token over B_net and the
    receiving node forwards them over NVLink (each inter-node copy crosses NVLink once more:
    DeepEP's normal kernels); per-rank dispatch sends fanout_ranks_inter copies over B_net.
    NVLink leg: fanout_intra copies (+ the forwarded ones, per-node) at B_nvlink. The legs
    run at the same time on different links: the slower decides. Both pay the busiest
    rank's share (imbalance). flat: all remote ranks over B_net, no NVLink tier.
    """
    R, E, k = int(options.ep_ranks), model.n_experts, model.top_k
    G = system.gpus_per_node
    tiers = fanout_tiers(R, E, k, G)
    per_node, flat = options.dispatch_mode == "per-node", options.dispatch_mode == "flat"
    net_copies = tiers.ranks if flat else tiers.nodes if per_node else tiers.ranks_inter
    nvl_copies = 0.0 if flat else tiers.intra + (tiers.ranks_inter if per_node else 0.0)
    base = imbalance_uniform(float(tokens), R, E, k) if options.imbalance else 1.0
    imb = base
    if options.redundant_experts and options.imbalance:
        imb = imbalance_uniform(float(tokens), R, E, k, options.redundant_experts)
    f_d, f_c = activation_bytes(model, options)
    row = float(tokens) * model.hidden * (f_d + f_c)
    return EPLegs(
        ranks=R, gpus_per_node=G, dispatch_mode=options.dispatch_mode, tiers=tiers,
        imbalance=imb, imbalance_no_redundancy=base,
        redundant_experts=options.redundant_experts,
        redundant_bytes_per_rank=(-(-options.redundant_experts // R)) * model.expert_bytes
        * model.n_moe_layers,
        t_net=imb * net_copies * row / system.b_net,
        t_nvlink=imb * nvl_copies * row / system.b_nvlink,
        net_copies=net_copies, nvlink_copies=nvl_copies)


def baseline_time(model: ModelSpec, system: SystemSpec, tokens, n_ue):
    """T_B per pass: a roofline of the routed and shared experts of every MoE layer.

    FLOPs: 2 S_E per token and chosen expert, at the expert dtype's peak (fp8 for fp8
    experts); bytes: the used experts' weights plus the activations in and out. Attention
    and dense layers cost the same under both strategies, so gamma never depends on T_B;
    they matter for overlap (`step_compute`).
    """
    return model.n_moe_layers * moe_layer_time(model, system, tokens, n_ue)


def expert_peak_flops(model: ModelSpec, system: SystemSpec) -> float:
    """fp8 experts run at the fp8 peak; others (bf16, and fp4 formats dequantized on a GPU
    without fp4 units) at the bf16 peak."""
    return system.peak_flops_fp8 if model.expert_dtype == "fp8" else system.peak_flops


def moe_layer_time(model: ModelSpec, system: SystemSpec, tokens, n_ue, pairs_factor=1.0):
    """One MoE layer's routed and shared experts on one GPU: max(FLOPs / peak, bytes / HBM).

    tokens: the GPU's tokens (shared expert); pairs_factor scales the routed (token, expert)
    pairs (the busiest EP rank's imbalance); n_ue: routed experts whose weights are read.
    """
    shared_params = (3 if model.gated else 2) * model.hidden * model.shared_intermediate
    flops = 2 * np.multiply(tokens, pairs_factor * model.top_k * model.expert_params + shared_params)
    weight_bytes = (np.multiply(n_ue, model.expert_params) + shared_params) * model.f_e
    act_bytes = 2 * np.multiply(tokens, model.hidden * model.f_a)
    return np.maximum(flops / expert_peak_flops(model, system), (weight_bytes + act_bytes) / system.hbm_bw)


def attention_time(model: ModelSpec, system: SystemSpec, tokens, context=None):
    """One attention layer on one GPU: roofline of its FLOPs and HBM bytes (bf16 weights
    and KV at the bf16 peak; 0 when the config has no attention shape).

    Prefill (context None): `tokens` tokens of one sequence, causal. Decode: `tokens`
    sequences of one new token each over `context` cached tokens.
    GQA (n_heads h, n_kv_heads g, head_dim a): weights d a (2h + 2g); scores and values
    4 h a per (query, key) pair. MLA (DeepSeek, Kimi; kv_lora_rank c, rope r, nope n, v):
    weights d q_lora + q_lora h (n + r) + d (c + r) + c h (n + v) + h v d; prefill
    2 h (n + r + v) per pair; decode in absorbed form 2 h (2c + r) per pair, KV cache
    (c + r) values per token.
    """
    d, h = model.hidden, model.n_heads
    if not h:
        return np.zeros(np.shape(tokens))
    f = model.f_a
    if model.kv_lora_rank:
        c, r, n, v = (model.kv_lora_rank, model.qk_rope_head_dim, model.qk_nope_head_dim,
                      model.v_head_dim)
        q_in = model.q_lora_rank
        q_params = d * q_in + q_in * h * (n + r) if q_in else d * h * (n + r)
        params = q_params + d * (c + r) + c * h * (n + v) + h * v * d
        kv_per_token = c + r
        per_pair_prefill, per_pair_decode = 2 * h * (n + r + v), 2 * h * (2 * c + r)
    else:
        a, g = model.head_dim, model.n_kv_heads
        params = d * a * (2 * h + 2 * g)
        kv_per_token = 2 * g * a
        per_pair_prefill = per_pair_decode = 4 * h * a
    N = np.asarray(tokens, float)
    if context is None:  # causal prefill: N^2 / 2 (query, key) pairs
        flops = 2 * N * params + per_pair_prefill * N * N / 2
        nbytes = params * f + N * kv_per_token * f + 2 * N * d * f
    else:
        flops = 2 * N * params + per_pair_decode * N * context
        nbytes = params * f + N * context * kv_per_token * f + 2 * N * d * f
    return np.maximum(flops / system.peak_flops, nbytes / system.hbm_bw)


def dense_layer_time(model: ModelSpec, system: SystemSpec, tokens):
    """One dense layer's MLP (gated, bf16) on one GPU: roofline."""
    params = (3 if model.gated else 2) * model.hidden * model.dense_intermediate
    N = np.asarray(tokens, float)
    flops = 2 * N * params
    nbytes = params * model.f_a + 2 * N * model.hidden * model.f_a
    return np.maximum(flops / system.peak_flops, nbytes / system.hbm_bw)


DECODE_CONTEXT = 4096  # cached tokens per sequence assumed for decode attention


def layer_compute(model: ModelSpec, system: SystemSpec, workload: Workload,
                  options: Options | None = None) -> dict:
    """Per-layer compute of one pass on one GPU, SI seconds, what transfers can hide behind:

    attention (every layer), dense (a dense layer's MLP), moe_offload (a MoE layer's
    experts: all used ones, on the offloading GPU), moe_ep (the same on the busiest EP rank:
    its share of experts, imbalance times the mean (token, expert) pairs).
    """
    options = options or Options()
    N = workload.tokens_per_pass
    context = DECODE_CONTEXT if workload.decode else None
    used = n_used_uniform if options.routing == "uniform" else n_used_worst
    n_ue = float(used(N, model.top_k, model.n_experts))
    R = options.ep_ranks or 1
    if R > 1:
        imb = ep_legs(model, system, options, N).imbalance
        ep_used = float(used(R * N, model.top_k, model.n_experts)) / R
    else:
        imb, ep_used = 1.0, n_ue
    return {
        "attention": float(attention_time(model, system, N, context)),
        "dense": float(dense_layer_time(model, system, N)),
        "moe_offload": float(moe_layer_time(model, system, N, n_ue)),
        "moe_ep": float(moe_layer_time(model, system, N, ep_used, imb)),
    }


def activation_bytes(model: ModelSpec, options: Options) -> tuple[float, float]:
    """(f_dispatch, f_combine): bytes per activation sent to the experts and sent back.

    An fp8 dispatch or combine (--dispatch-dtype / --combine-dtype fp8) carries one float32
    scale per 128 values: 1 + 4/128 = 1.03125 bytes. Left at the activation dtype they are
    the seed's f_a (an fp8 act dtype counts 1 byte, as the seed's formula does).
    """
    def nbytes(dtype: str | None) -> float:
        if dtype is None:
            return DTYPE_BYTES[model.act_dtype]
        return DTYPE_BYTES[dtype] + (FP8_SCALE_BYTES if dtype == "fp8" else 0.0)

    return nbytes(options.dispatch_dtype), nbytes(options.combine_dtype)


def ep_layer_overhead(model: ModelSpec, system: SystemSpec, options: Options, tokens):
    """T_EP - T_B of one layer and pass (arrays of tokens welcome).

    Without EP ranks: 2 alpha_net + phi N_t d (f_dispatch + f_combine) / B_net (the seed's
    at phi = 1). With R ranks: 2 alpha_net + the slower of the two legs (`ep_legs`), on the
    busiest rank; one rank moves nothing (no latency either).
    """
    if options.ep_ranks is None:
        return ep_overhead(tokens, model.hidden, *activation_bytes(model, options), system.b_net,
                           1, system.alpha_net, resolve_fanout(model, options))
    if options.ep_ranks == 1:
        return np.zeros(np.shape(tokens))

    def one(n):
        legs = ep_legs(model, system, options, n)
        return 2 * system.alpha_net + max(legs.t_net, legs.t_nvlink)

    return np.vectorize(one, otypes=[float])(tokens)


def pass_overheads(model: ModelSpec, system: SystemSpec, options: Options, tokens):
    """(N_ue, T_P - T_B, T_EP - T_B) of one forward pass of `tokens` tokens (arrays welcome)."""
    used = n_used_uniform if options.routing == "uniform" else n_used_worst
    n_ue = used(tokens, model.top_k, model.n_experts)
    t_p = offload_overhead(n_ue, model.expert_bytes, system.b_pcie, model.n_moe_layers,
                           system.alpha_pcie, options.resident_fraction)
    t_ep = model.n_moe_layers * ep_layer_overhead(model, system, options, tokens)
    return n_ue, t_p, t_ep


def gamma_of_tokens(model: ModelSpec, system: SystemSpec, options: Options, tokens):
    """gamma for one forward pass of `tokens` tokens (an array), with all the options."""
    _, t_p, t_ep = pass_overheads(model, system, options, tokens)
    with np.errstate(divide="ignore", invalid="ignore"):
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
        if hi - lo <= 1e-12 * hi:
            break
    return float(0.5 * (lo + hi))


def evaluate(model: ModelSpec, system: SystemSpec, workload: Workload,
             options: Options | None = None) -> Result:
    options = options or Options()
    tokens, passes = workload.tokens_per_pass, workload.passes
    f_d, f_c = activation_bytes(model, options)
    phi = resolve_fanout(model, options)
    n_ue, t_p, t_ep = (float(x) for x in pass_overheads(model, system, options, tokens))
    t_p, t_ep = passes * t_p, passes * t_ep  # decode: every step pays both again
    ranks = options.ep_ranks
    gamma_of = lambda n: gamma_of_tokens(model, system, options, n)  # noqa: E731
    if options.routing == "uniform" or (ranks and ranks > 1):
        tipping = tipping_tokens_numeric(gamma_of)
    else:
        tipping = float(tipping_tokens_worst(
            model.top_k, model.n_experts, model.expert_bytes, system.b_pcie, model.hidden,
            f_d, f_c, system.b_net, system.alpha_pcie, system.alpha_net, phi,
            options.resident_fraction))
    low = tipping_tokens_low(gamma_of) if system.alpha_net > 0 and not np.isnan(tipping) \
        else float("nan")
    return Result(
        # One EP rank (nothing remote) moves nothing: EP is free, gamma infinite.
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
        ep=ep_legs(model, system, options, tokens) if ranks and ranks > 1 else None,
        tipping_tokens_low=None if np.isnan(low) else low,
    )
