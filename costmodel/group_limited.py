"""Exact expected fan-out over nodes under DeepSeek's group-limited routing.

The router (`routing.group_limited`) draws iid standard Gumbel scores for the E experts,
split into n contiguous groups of m = E / n. A group's score S is the sum of its two best
scores (its one score when m = 1); a token keeps the t = topk_group best groups and takes
its top k experts among their t m experts. Experts are placed contiguously, M nodes
holding n / M whole groups each.

The reduction. Call a group *contributing* when it holds one of the token's k experts, and
J the number of them (1 <= J <= t). The routing is exchangeable over groups, so given J the
contributing set is a uniformly random J-subset of the n groups; a node holding g = n / M
groups is missed with probability P(miss) = sum_j P(J = j) C(n - g, j) / C(n, j), and

    fanout_nodes = (M - 1) (1 - P(miss))          (the home node drawn uniformly).

With one group per node (R1 on EP64) only E[J] matters; with several (EP32: 2 groups per
node) the whole law of J does, which is why it is computed, not only E[J].

The law of J, by conditioning on two thresholds: s, the t-th best group score (the
weakest kept group), and z, the k-th best expert score among the kept groups. Given s the
t kept groups are independent: one has S = s, t - 1 have S > s. Given z, a kept group
contributes iff it has an expert >= z; exactly one expert sits at z and k - 1 kept experts
lie above it. With, for one group and thresholds (s, z), N = #experts above z and
    A_U[a] = P(S > s, N = a)           A_T[a] = P(S in ds, N = a) / ds
    D_U[a] = P(S > s, one expert in dz, a others above z) / dz        (D_T alike, S = s)
and the generating functions G(u, w) = sum_a A[a] u^a w^[a >= 1], H(u, w) = w sum_a D[a] u^a
(w counts contributing groups, u experts above z):

    P(J = j) = n C(n-1, t-1) ∫∫ F_S(s)^(n-t) [u^(k-1) w^j] (H_T G_U^(t-1) + (t-1) G_T H_U G_U^(t-2)) ds dz

where F_S(s) = P(S < s) is the n - t groups left out. Each A, D is a one-dimensional
integral over the group's second-best score x2, with its best x1 in closed form and its
other m - 2 scores iid below x2 (Binomial counts above z): for the Gumbel cdf F,
P(x1 > y) = 1 - F(y) and P(another score > z | x2) = 1 - F(z) / F(x2). All three integrals
are Gauss-Legendre on panels split where the integrands have kinks (x2 = z, s/2, s - z;
z = s/2), over ranges that hold all but 1e-13 of each variable's mass (order statistics of
Gumbel samples). The result sums to 1 within 1e-9 and moves by < 1e-8 when the quadrature
is refined (tests/test_group_limited.py); DeepSeek-R1 takes about 0.5 s, cached.
"""

from __future__ import annotations

import math
from functools import lru_cache
from math import comb

import numpy as np

from moelab.costmodel.specs import SpecError

NODES = 8  # Gauss-Legendre nodes per panel
PANELS = 12  # panels over each variable's range (plus the kinks)
TAIL = 1e-13  # probability mass left outside each range


def _cdf(x):
    return np.exp(-np.exp(-x))


def _sf(x):  # 1 - F(x), accurate in the right tail
    return -np.expm1(-np.exp(-x))


def _pdf(x):
    return np.exp(-x - np.exp(-x))


def _gauss_legendre(edges: np.ndarray, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights [..., P q] for the P panels between sorted edges [..., P + 1]."""
    y, w = np.polynomial.legendre.leggauss(q)
    a, b = edges[..., :-1, None], edges[..., 1:, None]
    shape = edges.shape[:-1] + (-1,)
    return (0.5 * (b - a) * y + 0.5 * (b + a)).reshape(shape), (0.5 * (b - a) * w).reshape(shape)


def _binomial_pmf(trials: int, p: np.ndarray, top: int) -> np.ndarray:
    """[..., top + 1]: P(Binomial(trials, p) = a) for a = 0..top (0 past trials). Written
    out: with scipy.stats.binom.pmf, contributing_groups ran 3.5x slower (measured)."""
    a = np.arange(top + 1)
    c = np.array([comb(trials, int(i)) for i in a], float)
    p = np.asarray(p)[..., None]
    return c * p**a * (1 - p) ** np.maximum(trials - a, 0)


def _shifted(pmf: np.ndarray, by: int, top: int) -> np.ndarray:
    """pmf of X + by, truncated to 0..top."""
    out = np.zeros(pmf.shape[:-1] + (top + 1,))
    if by <= top:
        out[..., by:] = pmf[..., : top + 1 - by]
    return out


def _order_stat_range(count: int, upper_rank: int, lower_rank: int) -> tuple[float, float]:
    """An x range holding the upper_rank-th largest of `count` iid Gumbel scores from above
    and the lower_rank-th largest from below, each but TAIL of its mass: P(r-th largest > x)
    = P(Binomial(count, 1 - F(x)) >= r)."""
    from scipy.stats import binom

    x = np.linspace(-8.0, math.log(count) + 40.0, 4801)
    above = lambda r: binom.sf(r - 1, count, _sf(x))  # P(r-th largest > x)
    hi = x[np.nonzero(above(upper_rank) > TAIL)[0][-1]]
    lo = x[np.nonzero(above(lower_rank) < 1 - TAIL)[0][0]]
    return lo - 0.5, hi + 0.5


def _p_score_above(s: np.ndarray, m: int, x2_edges: np.ndarray, q: int) -> np.ndarray:
    """P(S > s) for one group, S the sum of its two best scores (m >= 2)."""
    kink = np.clip(np.asarray(s, float)[:, None] / 2, x2_edges[0], x2_edges[-1])
    x2, wq = _gauss_legendre(np.sort(np.concatenate(
        [np.broadcast_to(x2_edges, kink.shape[:1] + x2_edges.shape), kink], -1), -1), q)
    w = m * (m - 1) * _pdf(x2) * _cdf(x2) ** (m - 2) * wq
    return (w * _sf(np.maximum(x2, s[:, None] - x2))).sum(-1)


def _group_terms(s: float, z: np.ndarray, m: int, top: int, x2_edges: np.ndarray, q: int):
    """One group's A_U, A_T, D_U, D_T ([len(z), top + 1], counts a = 0..top) and P(S > s).

    Integrals over the second-best score x2, whose density with the best one x1 > x2 is
    m (m - 1) f(x1) f(x2) F(x2)^(m-2); the other m - 2 scores are iid below x2.
    """
    z = np.asarray(z, float)
    kinks = np.clip(np.stack([z, np.full_like(z, s / 2), s - z], -1), x2_edges[0], x2_edges[-1])
    edges = np.sort(np.concatenate([np.broadcast_to(x2_edges, z.shape + x2_edges.shape), kinks],
                                   -1), -1)
    x2, wq = _gauss_legendre(edges, q)
    zc = z[:, None]
    w = m * (m - 1) * _pdf(x2) * _cdf(x2) ** (m - 2) * wq
    x1_min = np.maximum(x2, s - x2)  # S > s and x1 > x2
    above = x2 > zc  # x2, so x1 too, above z
    # others above z: Binomial(m - 2, 1 - F(z)/F(x2)) when x2 > z
    p_other = np.where(above, -np.expm1(np.exp(-x2) - np.exp(-zc)), 0.0)
    n_above = _shifted(_binomial_pmf(m - 2, p_other, top), 2, top)  # N = 2 + others
    low = ~above  # x2 <= z: N = [x1 > z]

    p_s_above = (w * _sf(x1_min)).sum(-1)
    A_U = ((w * _sf(x1_min) * above)[..., None] * n_above).sum(-2)
    A_U[:, 0] += (w * low * (_cdf(np.maximum(x1_min, zc)) - _cdf(x1_min))).sum(-1)
    dens = w * _pdf(s - x2) * (x2 < s / 2)  # x1 = s - x2 > x2
    A_T = ((dens * above)[..., None] * n_above).sum(-2)
    A_T[:, 0] += (dens * low * (s - x2 <= zc)).sum(-1)
    if top >= 1:
        A_U[:, 1] += (w * low * _sf(np.maximum(x1_min, zc))).sum(-1)
        A_T[:, 1] += (dens * low * (s - x2 > zc)).sum(-1)

    # The expert at z is x1 (x2 < z, none above), x2 (x1 above), or one of the others.
    D_U, D_T = np.zeros_like(A_U), np.zeros_like(A_T)
    D_U[:, 0] = m * _pdf(z) * np.maximum(_cdf(z) ** (m - 1) - _cdf(s - z) ** (m - 1), 0.0)
    D_T[:, 0] = m * (m - 1) * _pdf(z) * _pdf(s - z) * _cdf(s - z) ** (m - 2) * (s - z < z)
    if top >= 1:
        at_x2 = m * (m - 1) * _pdf(z) * _cdf(z) ** (m - 2)
        D_U[:, 1] = at_x2 * _sf(np.maximum(z, s - z))
        D_T[:, 1] = at_x2 * _pdf(s - z) * (s - z > z)
    if m >= 3 and top >= 2:
        one_at_z = (m - 2) * _pdf(zc) / _cdf(x2) * above  # density of one other at z
        rest = _shifted(_binomial_pmf(m - 3, p_other, top), 2, top)
        D_U += ((w * _sf(x1_min) * one_at_z)[..., None] * rest).sum(-2)
        D_T += ((dens * one_at_z)[..., None] * rest).sum(-2)
    return A_U, A_T, D_U, D_T, p_s_above


def _times_g(P: np.ndarray, A: np.ndarray) -> np.ndarray:
    """P(u, w) G(u, w), G = A[0] + w sum_{a >= 1} A[a] u^a; P [..., top + 1, t + 1] truncated."""
    top = P.shape[-2] - 1
    R = A[..., 0, None, None] * P
    for a in range(1, top + 1):
        R[..., a:, 1:] += A[..., a, None, None] * P[..., : top + 1 - a, :-1]
    return R


def _times_h(P: np.ndarray, D: np.ndarray) -> np.ndarray:
    """P(u, w) H(u, w), H = w sum_a D[a] u^a."""
    top = P.shape[-2] - 1
    R = np.zeros_like(P)
    for a in range(top + 1):
        R[..., a:, 1:] += D[..., a, None, None] * P[..., : top + 1 - a, :-1]
    return R


def _check(n_experts: int, k: int, n_group: int, topk_group: int) -> int:
    if not 0 < n_group <= n_experts or n_experts % n_group:
        raise SpecError(f"n_group: {n_group} groups do not divide E={n_experts}")
    if not 0 < topk_group <= n_group:
        raise SpecError(f"topk_group: need 0 < topk_group <= n_group={n_group}, got {topk_group}")
    m = n_experts // n_group
    if not 0 < k <= topk_group * m:
        raise SpecError(f"top_k: need 0 < k <= topk_group x {m} experts = {topk_group * m}, "
                        f"got {k}")
    return m


@lru_cache(maxsize=64)
def contributing_groups(n_experts: int, k: int, n_group: int, topk_group: int,
                        nodes: int = NODES, panels: int = PANELS) -> tuple[float, ...]:
    """(P(J = 0), ..., P(J = topk_group)): J = groups holding one of a token's k experts.

    nodes, panels: the quadrature (Gauss-Legendre nodes per panel, panels per variable).
    """
    from scipy.stats import binom

    m = _check(n_experts, k, n_group, topk_group)
    n, t, top = n_group, topk_group, k - 1
    exact = {k: 1} if m == 1 else {}  # m = 1: every expert its own group, J = k
    if not exact and (t == 1 or k == 1):
        exact = {1: 1}
    if not exact and k == t * m:  # every kept expert picked
        exact = {t: 1}
    if exact:
        return tuple(float(exact.get(j, 0)) for j in range(t + 1))

    x2_lo, x2_hi = _order_stat_range(m, 2, 2)
    x2_edges = np.linspace(x2_lo, x2_hi, panels + 1)
    # z is at most the k-th and at least the (E - t m + k)-th best of all E scores
    z_lo, z_hi = _order_stat_range(n_experts, k, n_experts - t * m + k)
    # s, the t-th best of n group scores: P(s > x) = P(Binomial(n, P(S > x)) >= t)
    xs = np.linspace(2 * x2_lo, 2 * x2_hi, 1201)
    p_above = _p_score_above(xs, m, x2_edges, nodes)
    s_above = binom.sf(t - 1, n, p_above)
    s_lo = xs[np.nonzero(s_above < 1 - TAIL)[0][0]] - 0.5
    s_hi = xs[np.nonzero(s_above > TAIL)[0][-1]] + 0.5

    z_edges = np.linspace(z_lo, z_hi, panels + 1)
    s_nodes, s_weights = _gauss_legendre(np.linspace(s_lo, s_hi, panels + 1), nodes)
    law = np.zeros(t + 1)
    for s, ws in zip(s_nodes, s_weights, strict=True):
        z, wz = _gauss_legendre(np.sort(np.append(z_edges, np.clip(s / 2, z_lo, z_hi))), nodes)
        A_U, A_T, D_U, D_T, p_s_above = _group_terms(s, z, m, top, x2_edges, nodes)
        g_rest = np.zeros(z.shape + (top + 1, t + 1))
        g_rest[..., 0, 0] = 1.0
        for _ in range(t - 2):
            g_rest = _times_g(g_rest, A_U)  # G_U^(t-2)
        both = (_times_h(_times_g(g_rest, A_U), D_T)
                + (t - 1) * _times_h(_times_g(g_rest, A_T), D_U))
        out = (1 - p_s_above[0]) ** (n - t)
        law += n * comb(n - 1, t - 1) * out * ws * (wz[:, None] * both[:, top, :]).sum(0)
    return tuple(float(p) for p in law)


def fanout_nodes(nodes: int, n_experts: int, k: int, n_group: int, topk_group: int) -> float:
    """Expected remote nodes per token (the home node uniform), M nodes holding n/M groups."""
    M = int(nodes)
    if M < 1 or n_group % M:
        raise SpecError(f"nodes: {M} nodes must divide n_group={n_group}")
    if M == 1:
        return 0.0
    law = contributing_groups(n_experts, k, n_group, topk_group)
    g = n_group // M
    miss = sum(p * comb(n_group - g, j) / comb(n_group, j) for j, p in enumerate(law))
    return (M - 1) * (1 - miss)
