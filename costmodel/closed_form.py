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
from functools import cache, lru_cache

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


def fanout_nodes_group_limited(nodes: int, n_group: int, topk_group: int, n_experts: int = 0,
                               k: int = 0, every_kept_group_hit: bool = False) -> float:
    """Expected remote nodes per token under DeepSeek's group-limited top-k.

    A token keeps topk_group of the n_group groups (each subset alike, by symmetry), then
    picks its k experts among the kept groups' experts. Experts are contiguous and n_group a
    multiple of the node count M, so each node holds g = n_group / M whole groups; given c
    of a node's groups are kept (hypergeometric P(c)), the node is missed with probability
    m(c), and nodes = (M - 1)(1 - sum_c P(c) m(c)) (the home node drawn uniformly).

    - every_kept_group_hit=False: picks uniform among the kept experts (s per group,
      pool = topk_group s): m(c) = C(pool - c s, k) / C(pool, k). Exact for that model.
    - every_kept_group_hit=True: m(c) = [c = 0]. DeepSeek's router keeps groups for the sum
      of their two best scores, so a kept group's best expert is nearly always among the
      token's top k: this is the upper bound the router approaches (R1 on 4 and 8 nodes:
      Monte Carlo within 1% below it, tests/test_tiers.py), the uniform model a lower one.
    """
    from math import comb

    M = int(nodes)
    if M < 2:
        return 0.0
    if n_group % M:
        raise ValueError(f"nodes: {M} nodes must divide n_group={n_group}")
    g = n_group // M
    s = n_experts // n_group if n_experts else 0
    miss = 0.0
    for c in range(0, min(g, topk_group) + 1):
        p_c = comb(g, c) * comb(n_group - g, topk_group - c) / comb(n_group, topk_group)
        if every_kept_group_hit:
            miss += p_c * (c == 0)
        else:
            miss += p_c * float(miss_probability(c * s, topk_group * s, k))
    return (M - 1) * (1 - miss)


# --- the busiest rank -----------------------------------------------------------------------
#
# Every rank holds N tokens and sends each once to every remote rank it hits (hit[r] = P(a
# token hits rank r)); X_r = rows rank r receives from the other ranks' M = (R - 1) N tokens,
# so E[X_r] = M hit[r] and Var X_r = M hit[r] (1 - hit[r]) exactly. The X_r are dependent:
# a token's k picks compete for ranks, so receivers are negatively correlated and the busiest
# is busier than among independent ones (1.5-6% at 1-2 tokens per rank). What fixes the
# spread between ranks is exact and cheap: the total S = sum_r X_r is a sum over tokens of D'
# (the remote ranks a token hits), and with D the ranks a token hits, home included,
#     Var S = N sum_r h_r (1 - h_r) + N (R-2) (Var D - sum_r h_r (1 - h_r)),
# which with the marginal variances fixes sum_{r != s} Cov(X_r, X_s) = Var S - sum_r Var X_r.
# The model keeps these exact: receivers Y_r independent beta-binomials (M trials, mean
# M h_r, variance f M h_r (1 - h_r)) conditioned on their sum, the sum drawn from a
# discretized normal with the exact mean and Var S, and f fitted so that the receivers'
# marginal variances come out exact. Then, with G_r the pgf of Y_r and G_r,c its terms up to z^c,
#     P(max_r X_r <= c) = sum_s P(S = s) [z^s] prod_r G_r,c(z) / [z^s] prod_r G_r(z),
#     E[max] = sum_{c >= 0} (1 - P(max <= c)).
# For large counts the conditioning is dropped: independent receivers with the dispersion
# f0 = (R sum_r Var X_r - Var S) / ((R - 1) sum_r Var X_r), which gives every pair of ranks
# its exact mean spread Var(X_r - X_s) / 2 (exact in the normal limit). Checked against
# Monte Carlo of concrete routings in tests/test_imbalance.py (docs/model.md: the grid and
# the worst error).

_CONDITIONED_MAX_LENGTH = 2**13  # R * top above this: independent receivers (they agree to 1e-4)


def _beta_binomial(n: int, p: float, dispersion: float, top: int) -> np.ndarray:
    """pmf on 0..top (top <= n) of the beta-binomial with n trials, mean n p and variance
    dispersion * n p (1 - p) (1: the binomial). Its terms are the binomial's times
    prod_{i<x} (1 + i/a) prod_{i<n-x} (1 + i/b) / prod_{i<n} (1 + i/(a+b)), summed as log1p
    so that a dispersion near 1 (a + b huge) keeps full precision."""
    pmf = np.zeros(top + 1)
    if p <= 0 or p >= 1:
        pmf[0 if p <= 0 else n] = 1.0
        return pmf
    x = np.arange(top + 1, dtype=float)
    lg = np.frompyfunc(math.lgamma, 1, 1)
    log_pmf = (math.lgamma(n + 1) - lg(x + 1).astype(float) - lg(n - x + 1).astype(float)
               + x * math.log(p) + (n - x) * math.log1p(-p))
    if dispersion > 1 + 1e-12:
        s = (n - dispersion) / (dispersion - 1)  # a + b
        i = np.arange(n, dtype=float)
        rise_a = np.concatenate([[0.0], np.cumsum(np.log1p(i / (p * s)))])
        rise_b = np.concatenate([[0.0], np.cumsum(np.log1p(i / ((1 - p) * s)))])
        log_pmf += rise_a[: top + 1] + rise_b[n - np.arange(top + 1)] - np.sum(np.log1p(i / s))
    return np.exp(log_pmf)


class _Receivers:
    """Rank kinds (hit h_j, count n_j) with M trials each, and the law of their total S."""

    def __init__(self, M: int, hit, count, total_mean: float, total_var: float):
        self.M, self.hit, self.count = M, np.asarray(hit, float), np.asarray(count, np.int64)
        self.R = int(self.count.sum())
        mean, var = M * self.hit, M * self.hit * (1 - self.hit)
        spread = math.sqrt(2.5 * float(var.max())) + 1  # the fitted f stays below 2.5
        self.top = int(min(M, math.ceil(float(mean.max()) + 12 * spread + 4)))
        self.length = 1 << int(self.R * self.top).bit_length()
        s = np.arange(self.R * self.top + 1)
        z2 = (s - total_mean) ** 2 / (2 * max(total_var, 1e-9))
        law = np.exp(-(z2 - z2.min()))
        self.total = law / law.sum()  # P(S = s), a discretized normal
        self.var_sum = float(np.sum(self.count * var))

    def _product(self, pmfs, extra=None):
        """Coefficients of prod_j (pgf_j)^{n_j} (with one factor of kind j replaced by
        extra[j], summed over j with weight n_j, when extra is given)."""
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

    def pmfs(self, dispersion):
        return [_beta_binomial(self.M, h, min(dispersion, self.M), self.top) for h in self.hit]

    def _ratio(self, num, den):
        ok = den > 1e-14 * den.max()
        return np.where(ok, num / np.where(ok, den, 1.0), 0.0)

    def variance_sum(self, dispersion) -> float:
        """sum_r Var X_r under the conditioned model (means taken as exact, M h_r)."""
        pmfs = self.pmfs(dispersion)
        x = np.arange(self.top + 1, dtype=float)
        den = self._product(pmfs)
        second = self._ratio(self._product(pmfs, [x * x * p for p in pmfs]), den)
        return float(np.sum(self.total * np.clip(second, 0, None))
                     - np.sum(self.count * (self.M * self.hit) ** 2))

    def fit_dispersion(self, guess: float) -> float:
        """f with the model's sum_r Var X_r equal to the exact one: regula falsi on f in
        [1, M], from the normal-limit guess (the variance grows with f)."""
        def gap(f):
            return self.variance_sum(f) - self.var_sum

        lo, g_lo = 1.0, gap(1.0)
        if g_lo >= 0 or self.M <= 1:
            return 1.0
        hi = min(float(self.M), max(guess, 1.0 + 1e-3))
        g_hi = gap(hi)
        while g_hi < 0 and hi < self.M:
            lo, g_lo, hi = hi, g_hi, min(float(self.M), 1 + 2 * (hi - 1))
            g_hi = gap(hi)
        if g_hi <= 0:
            return hi
        side = 0
        for _ in range(40):  # Illinois variant: halve the weight of a side kept twice
            mid = (lo * g_hi - hi * g_lo) / (g_hi - g_lo)
            g_mid = gap(mid)
            if abs(g_mid) < 1e-7 * self.var_sum or hi - lo < 1e-9:
                return mid
            if g_mid < 0:
                lo, g_lo = mid, g_mid
                g_hi = g_hi / 2 if side == -1 else g_hi
                side = -1
            else:
                hi, g_hi = mid, g_mid
                g_lo = g_lo / 2 if side == 1 else g_lo
                side = 1
        return mid

    def expected_max(self, dispersion) -> float:
        pmfs = self.pmfs(dispersion)
        den = self._product(pmfs)
        with np.errstate(divide="ignore"):
            log_cdf = [np.log(np.cumsum(p)) for p in pmfs]
        out = 0.0
        for c in range(self.top):
            # below 1e-20 for independent receivers: no correlation lifts it to matter
            if sum(n * lc[c] for n, lc in zip(self.count, log_cdf, strict=True)) < -46:
                out += 1.0
                continue
            p_all = float(np.sum(self.total * np.clip(self._ratio(
                self._product([p[: c + 1] for p in pmfs]), den), 0, 1)))
            out += 1 - p_all
            if 1 - p_all < 1e-10:
                break
        return out


def _power(f: np.ndarray, n) -> np.ndarray:
    """f ** n for a non-negative integer n by repeated squaring (numpy's complex power is
    several times slower)."""
    n, out = int(n), np.ones_like(f)
    while n:
        if n & 1:
            out = out * f
        n >>= 1
        if n:
            f = f * f
    return out


def _expected_max_independent(M: int, hit, count, dispersion: float) -> float:
    """E[max_r Y_r] for independent beta-binomial receivers (M trials, mean M h_j, variance
    dispersion * M h_j (1 - h_j), count[j] of kind j): sum_c (1 - prod_r P(Y_r <= c)), per
    integer on a window of +-14 standard deviations, or for large counts (M > 1e5 or a window
    over 4000) with normal receivers integrated on a fine grid."""
    hit, count = np.asarray(hit, float), np.asarray(count, float)
    mean, sd = M * hit, np.sqrt(dispersion * M * hit * (1 - hit))
    lo = int(max(0.0, np.floor(np.min(mean - 14 * sd - 2))))
    hi = int(min(M, np.ceil(np.max(mean + 14 * sd + 2))))
    if M <= 100_000 and hi - lo <= 4000:
        x = np.arange(hi + 1)
        log_cdf = np.zeros(hi + 1)
        for h, c in zip(hit, count, strict=True):
            cdf = np.minimum(np.cumsum(_beta_binomial(M, h, dispersion, hi)), 1.0)
            with np.errstate(divide="ignore"):
                log_cdf += c * np.log(np.where(x >= M, 1.0, cdf))
        return float(lo + np.sum(1 - np.exp(log_cdf[lo:-1])))
    x = np.linspace(lo, hi, 4001)
    erf = np.frompyfunc(math.erf, 1, 1)
    log_prod = np.zeros_like(x)
    for m, s, c in zip(mean, sd, count, strict=True):
        z = (x + 0.5 - m) / (s * math.sqrt(2)) if s > 0 else np.where(x + 0.5 >= m, 1e9, -1e9)
        with np.errstate(divide="ignore"):
            log_prod += c * np.log(np.maximum(0.5 * (1 + erf(z).astype(float)), 0.0))
    return float(lo + np.trapezoid(1 - np.exp(log_prod), x))


def _expected_max_received(tokens: int, hit, hits_variance: float) -> float:
    """E[max_r X_r] for an integer number of tokens per rank (the model above)."""
    R = hit.size
    M = (R - 1) * tokens
    values, counts = np.unique(np.round(hit, 12), return_counts=True)
    keep = values > 0
    var_each = float(np.sum(hit * (1 - hit)))
    total_var = tokens * (R - 1) * var_each + tokens * (R - 2) * (hits_variance - var_each)
    receivers = _Receivers(M, values[keep], counts[keep], M * float(hit.sum()), total_var)
    f0 = (R * M * var_each - total_var) / ((R - 1) * M * var_each) if var_each > 0 else 1.0
    if R * receivers.top <= _CONDITIONED_MAX_LENGTH and receivers.R == R:
        return receivers.expected_max(receivers.fit_dispersion(f0))
    return _expected_max_independent(M, values[keep], counts[keep], max(1.0, f0))


def imbalance_from_probabilities(tokens_per_rank, hit, hits_variance=None) -> float:
    """E[max over ranks of rows received] / their mean (the model above).

    Every rank holds `tokens_per_rank` tokens and sends each to the remote ranks it hits;
    rank r is hit by a token with probability hit[r]. hits_variance: Var of the number of
    ranks one token hits (home included), which carries the receivers' correlation; None
    treats the ranks as hit independently (sum_r h_r (1 - h_r)). A fractional N
    interpolates E[max] linearly between the neighbouring integers (E[max] = 0 at N = 0).
    """
    hit = np.asarray(hit, float)
    R, N = hit.size, float(tokens_per_rank)
    mean = (R - 1) * N * hit.mean()
    if R < 2 or mean <= 0:
        return 1.0
    var_d = float(np.sum(hit * (1 - hit))) if hits_variance is None else float(hits_variance)
    below = math.floor(N)
    expected_max = _expected_max_received(below, hit, var_d) if below > 0 else 0.0
    if below < N:
        expected_max = ((below + 1 - N) * expected_max
                        + (N - below) * _expected_max_received(below + 1, hit, var_d))
    # E[max_r X_r] >= max_r E[X_r] for any joint law: hold the bound.
    return float(max(expected_max, (R - 1) * N * hit.max()) / mean)


def hits_uniform(ranks: int, n_experts: int, k: int, held=None) -> tuple[np.ndarray, float]:
    """(hit[r], Var D) for uniform top-k routing, exact: D the ranks one token hits.

    held: per rank its experts (eplb_placement), a replicated expert's tokens split evenly
    over its copies (each pick goes to one copy at random); default contiguous blocks. A
    token misses a set A of ranks with probability E[prod_{e picked} x_e] = e_k(x) / C(E, k),
    x_e = 1 - (copies of e in A) / copies_e, e_k the k-th elementary symmetric polynomial
    (only the experts in A have x_e < 1). Then P(hit r and s) = 1 - miss(r) - miss(s) +
    miss(r, s) and Var D = sum_r h_r + sum_{r != s} P(hit r and s) - (sum_r h_r)^2. Ranks
    and pairs with the same multiset of x are computed once.
    """
    E, R, k = int(n_experts), int(ranks), int(k)
    held = contiguous_placement(E, R) if held is None else [list(h) for h in held]
    copies = np.bincount(np.concatenate([np.asarray(h, np.int64) for h in held]), minlength=E)

    @cache
    def miss(xs: tuple) -> float:  # P(all k picks avoid the set; the set's x < 1 given)
        e = np.zeros(k + 1)
        e[0] = 1.0
        for x in xs:
            e[1:] = e[1:] + e[:-1] * x
        rest = E - len(xs)
        return float(sum(e[i] * math.comb(rest, k - i) for i in range(k + 1)) / math.comb(E, k))

    def x_of(ranks_in_set) -> tuple:
        inside = {}
        for r in ranks_in_set:
            for e in held[r]:
                inside[e] = inside.get(e, 0) + 1
        return tuple(sorted(round(1 - n / copies[e], 12) for e, n in inside.items()))

    sig = [x_of([r]) for r in range(R)]
    hit = np.array([1 - miss(s) for s in sig])
    kinds: dict[tuple, int] = {}
    for s in sig:
        kinds[s] = kinds.get(s, 0) + 1
    names = list(kinds)
    both_sum = 0.0  # sum over unordered pairs r < s of miss(r, s), first as if none shared
    for a, sa in enumerate(names):
        for sb in names[a:]:
            pairs = kinds[sa] * (kinds[sa] - 1) // 2 if sb == sa else kinds[sa] * kinds[sb]
            both_sum += pairs * miss(tuple(sorted(sa + sb)))
    holders: dict[int, list[int]] = {}
    for r, h in enumerate(held):
        for e in h:
            holders.setdefault(e, []).append(r)
    shared = {(r, s) for rs in holders.values() if len(rs) > 1
              for i, r in enumerate(rs) for s in rs[i + 1:]}
    for r, s in shared:  # pairs holding copies of one expert: the joint x differs
        both_sum += miss(x_of([r, s])) - miss(tuple(sorted(sig[r] + sig[s])))
    pairs_total = R * (R - 1) // 2
    miss_sum = float(np.sum(1 - hit))
    both = pairs_total - (R - 1) * miss_sum + both_sum  # sum_{r<s} P(hit r and s)
    var_d = float(hit.sum() + 2 * both - hit.sum() ** 2)
    return hit, max(var_d, 0.0)


@lru_cache(maxsize=4096)
def imbalance_uniform(tokens_per_rank: float, ranks: int, n_experts: int, k: int) -> float:
    """imbalance under uniform top-k and contiguous placement (imbalance_from_probabilities
    with the exact hit probabilities and Var D of hits_uniform)."""
    if int(ranks) < 2:
        return 1.0
    hit, var_d = _hits_contiguous(int(ranks), int(n_experts), int(k))
    return imbalance_from_probabilities(tokens_per_rank, hit, var_d)


@lru_cache(maxsize=256)
def _hits_contiguous(ranks: int, n_experts: int, k: int) -> tuple[np.ndarray, float]:
    return hits_uniform(ranks, n_experts, k)


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
        held = eplb_placement(np.full(E, k / E), R, options.redundant_experts)
        imb = imbalance_from_probabilities(tokens, placement_hit_probabilities(np.full(E, k / E), held))
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
