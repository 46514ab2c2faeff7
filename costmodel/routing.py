"""Concrete routings for the JAX reference: int32 expert ids `[L, N_t, k]`, seeded, jit-able.

Every generator draws one layer, `[N_t, k]` ids from a `jax.random` key; `layers()` stacks
L independent layers. Within a token the k ids are distinct (top-k without replacement).

- `uniform`: every k-subset of the E experts equally likely (Floyd's algorithm, k draws
  per token instead of E Gumbel scores, from a counter hash that fuses into its
  consumer: what makes R1-scale Monte Carlo affordable).
- `popular`: successive sampling without replacement from a popularity vector p over
  experts, from a stream of alias-method draws per token (`popular_gumbel`, Gumbel top-k
  of log p, is the same distribution from E scores per token). `zipf_logp`,
  `dirichlet_logp`, `hist_logp` make p. The Monte Carlo without EP ranks counts the
  experts used straight from the draws (`popular_used`: one fused pass, no ids stored).
- `group_limited`: DeepSeek-V3's node-limited top-k: a token scores every expert,
  keeps the `topk_group` of `n_group` groups with the best top-2 score sum, then takes
  its top-k inside them; drawn from order statistics (about 2 G + 2 k numbers per token),
  `group_limited_gumbel` from E scores.

What a sampler costs on XLA CPU decides its shape: elementwise chains fuse into one
vectorized loop with their consumer, while a table lookup (a gather) in that loop makes it
scalar, and an array materialized per pick makes XLA recompute the chain once per array.
`layer_generator` gives each routing a generator `gen(key, l) -> [N_t, k]`; the skewed
ones also carry `gen.used(key, l)`, the experts one layer uses.
- `from_logits`: top-k of router logits the user supplies (a .npy file).

`parse(spec)` reads the CLI's routing strings: uniform | zipf:S | dirichlet:A | groups |
logits:PATH.npy | hist:PATH.npy/.json.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

from moelab.costmodel.specs import RoutingSpec, SpecError

Generator = Callable[[jax.Array, int], jax.Array]  # (key, layer index) -> [N_t, k] int32


# --- one layer ------------------------------------------------------------------------


def _lowbias32(x: jax.Array) -> jax.Array:
    """A 32-bit integer hash with low bias (`lowbias32`, C. Wellons' hash-prospector)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def counter_bits(key: jax.Array, counter: jax.Array) -> jax.Array:
    """uint32 random bits for uint32 counters: a hash of (counter, key), no state.

    Two words from the key (one threefry call) seed a twice-hashed counter. It costs a
    few integer ops per draw and fuses into whatever consumes it, where
    jax.random.bits materializes its output (10-30x slower per id on CPU, measured). The
    quality is what Monte Carlo needs; the tests check the distributions it produces.
    """
    w = jax.random.bits(key, (2,), jnp.uint32)
    return _lowbias32(_lowbias32(counter ^ w[0]) + w[1])


def uniform(key: jax.Array, tokens: int, n_experts: int, k: int) -> jax.Array:
    """[tokens, k] int32: each token a uniformly random k-subset of range(n_experts).

    Floyd's algorithm: for j = E-k .. E-1 draw t uniform in [0, j]; take t, or j when t
    was already taken. Every k-subset comes out with probability 1/C(E, k) (the order of
    the ids within a token is not uniform, and nothing downstream depends on it).
    A draw in [0, n) is (u * n) >> b from the top b = 32 - bits(E) bits u of a
    `counter_bits` word: exact integer arithmetic; each value's probability is off by at
    most n / 2^b (3e-5 relative at E = 256), far below what Monte Carlo here resolves.
    Draw j of token t uses counter t k + j: a token's experts do not depend on N_t.
    """
    E = int(n_experts)
    if not 0 < k <= E:
        raise SpecError(f"top_k: need 0 < k <= E, got k={k}, E={E}")
    if tokens * k >= 2**32:
        raise SpecError(f"tokens: {tokens} x k={k} draws exceed the 32-bit counter")
    b = 32 - max(E, 2).bit_length()
    t = jnp.arange(tokens, dtype=jnp.uint32)
    out = []
    for j in range(k):
        n = E - k + j + 1  # draw in [0, n)
        u = counter_bits(key, t * jnp.uint32(k) + jnp.uint32(j)) >> (32 - b)
        d = ((u * jnp.uint32(n)) >> b).astype(jnp.int32)
        if out:
            taken = out[0] == d
            for prev in out[1:]:
                taken = taken | (prev == d)
            d = jnp.where(taken, jnp.int32(n - 1), d)
        out.append(d)
    return jnp.stack(out, axis=-1)


def gumbel(key: jax.Array, tokens: int, n: int) -> jax.Array:
    """[tokens, n] float32 standard Gumbel noise -log(-log u) from `counter_bits`
    (u = (24 random bits + 1/2) / 2^24, the resolution jax.random.gumbel has too)."""
    if tokens * n >= 2**32:
        raise SpecError(f"tokens: {tokens} x {n} draws exceed the 32-bit counter")
    c = (jnp.arange(tokens, dtype=jnp.uint32)[:, None] * jnp.uint32(n)
         + jnp.arange(n, dtype=jnp.uint32)[None, :])
    u = ((counter_bits(key, c) >> 8).astype(jnp.float32) + 0.5) * (1.0 / 2**24)
    return -jnp.log(-jnp.log(u))


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(values, int32 indices) of the k largest along the last axis, largest first.

    k passes of max/argmax, each masking its winner: for the small k of a router this
    is about 10x faster on CPU than lax.top_k (which sorts; measured on [4096, 256]).
    Ties go to the lower index. Rows need k entries above -inf.
    """
    ids = jnp.arange(x.shape[-1], dtype=jnp.int32)
    values, indices = [], []
    for _ in range(k):
        i = jnp.argmax(x, axis=-1).astype(jnp.int32)
        values.append(jnp.take_along_axis(x, i[..., None], -1)[..., 0])
        indices.append(i)
        x = jnp.where(ids == i[..., None], -jnp.inf, x)
    return jnp.stack(values, -1), jnp.stack(indices, -1)


def popular_gumbel(key: jax.Array, tokens: int, logp: jax.Array, k: int) -> jax.Array:
    """[tokens, k]: successive sampling of k distinct experts with popularity exp(logp),
    from E Gumbel scores per token (the reference `popular` is tested against).

    Top-k of log p + Gumbel noise draws the first expert with probability p_e, the next
    from the rest renormalized, and so on (the Gumbel top-k trick). Experts with
    p = 0 (logp = -inf) are never drawn; at least k must have p > 0.
    """
    g = gumbel(key, tokens, logp.shape[-1])
    return top_k(g + logp.astype(jnp.float32), k)[1]


def group_limited(key: jax.Array, tokens: int, n_experts: int, k: int, n_group: int,
                  topk_group: int) -> jax.Array:
    """[tokens, k] ids of `group_ids`, materialized in one pass: XLA CPU computes k
    elementwise outputs as k loops, each recomputing the whole chain, but the k outputs
    of one reduction in one loop; so each token is computed beside a padding lane that
    a sum over the two lanes drops."""
    lane0 = jnp.arange(2) == 0
    ids = group_ids(key, tokens, n_experts, k, n_group, topk_group, lanes=2)
    red = jax.lax.reduce(tuple(jnp.where(lane0, c, 0) for c in ids),
                         tuple(jnp.int32(0) for _ in ids),
                         lambda a, b: tuple(x + y for x, y in zip(a, b, strict=True)), (1,))
    return jnp.stack(red, -1)


def group_ids(key: jax.Array, tokens: int, n_experts: int, k: int, n_group: int,
              topk_group: int, lanes: int = 0) -> list[jax.Array]:
    """k arrays [tokens] (or [tokens, lanes], every lane the same token): the experts of
    DeepSeek-V3 group-limited top-k on iid Gumbel scores, the law of
    `group_limited_gumbel` from about 2 G + 2 k random numbers per token instead of E.

    A Gumbel score is -log X with X ~ Exp(1), so a group's best scores are its smallest
    X, whose order statistics are drawn directly (Renyi): X_(1) = Z_1 / m and
    X_(j+1) = X_(j) + Z_(j+1) / (m - j), Z iid Exp(1), m = E / G experts per group.
    1. Each group draws X_(1), X_(2); its score, the sum of its two best, is
       -log(X_(1) X_(2)), so the token keeps the `topk_group` groups of smallest product
       (X_(1) alone when a group has one expert).
    2. Its top-k among the kept groups' experts are the k smallest X there: a merge of
       the kept groups' ascending lists, each extended one Renyi step (a fresh Z per
       step) when the merge takes its head.
    3. Which experts hold a group's c best scores is, the scores being iid, a uniformly
       random c-subset of the group, independent of the values: Floyd's algorithm per
       group, as `uniform`.
    Output order: by group in merge order, not by score (nothing downstream uses it).
    """
    G, tg = int(n_group), int(topk_group)
    m = n_experts // G
    if G * m != n_experts:
        raise SpecError(f"n_group: {G} groups do not divide E={n_experts}")
    if not 0 < tg <= G or tg * m < k:
        raise SpecError(f"topk_group: {tg} groups of {m} experts hold fewer than k={k} "
                        "experts")
    words = 2 * G + 2 * k  # random words per token
    if tokens * words >= 2**32:
        raise SpecError(f"tokens: {tokens} x {words} draws exceed the 32-bit counter")
    t = jnp.arange(tokens, dtype=jnp.uint32) * jnp.uint32(words)
    if lanes:
        t = jnp.broadcast_to(t[:, None], (tokens, lanes))
    bits = [counter_bits(key, t + jnp.uint32(j)) for j in range(words)]

    def expo(u):  # Exp(1) from 24 random bits, the resolution of `gumbel`
        return -jnp.log(((u >> 8).astype(jnp.float32) + 0.5) * (1.0 / 2**24))

    x1 = [expo(bits[2 * g]) / m for g in range(G)]
    x2 = [x1[g] + expo(bits[2 * g + 1]) / max(m - 1, 1) if m > 1 else jnp.inf for g in range(G)]
    score = [x1[g] * x2[g] if m > 1 else x1[g] for g in range(G)]  # smaller: better group
    inf = jnp.float32(jnp.inf)
    head, used = [], []  # per group: the next X to merge, how many the merge took
    for g in range(G):
        better = sum(((score[h] < score[g]) | ((score[h] == score[g]) & (h < g))).astype(jnp.int32)
                     for h in range(G) if h != g)
        head.append(jnp.where(better < tg, x1[g], inf))
        used.append(jnp.zeros(t.shape, jnp.int32))
    pick_group, pick_rank = [], []  # per merge step: its group, its rank within the group
    for i in range(k):
        best, gi = head[0], jnp.zeros(t.shape, jnp.int32)
        for g in range(1, G):
            take = head[g] < best
            best, gi = jnp.where(take, head[g], best), jnp.where(take, g, gi)
        z = expo(bits[2 * G + i])
        for g in range(G):  # X_(c) of group gi was just taken; the next is X_(c+1)
            c = used[g] + 1
            nxt = jnp.where(c == 1, x2[g], head[g] + z / jnp.maximum(m - c, 1).astype(jnp.float32))
            head[g] = jnp.where(gi == g, jnp.where(c < m, nxt, inf), head[g])
            used[g] = jnp.where(gi == g, c, used[g])
        pick_group.append(gi)
        pick_rank.append(functools.reduce(jnp.add, [jnp.where(gi == g, used[g] - 1, 0)
                                                     for g in range(G)]))
    ids = []
    for i, gi in enumerate(pick_group):  # Floyd in the group: j = m - c_g + rank, draw in [0, j]
        total = functools.reduce(jnp.add, [jnp.where(gi == g, used[g], 0) for g in range(G)])
        n = (m - total + pick_rank[i] + 1).astype(jnp.uint32)
        # (24 random bits x n) >> 24: exact integers, each value off by at most n / 2^24
        d = (((bits[2 * G + k + i] >> 8) * n) >> 24).astype(jnp.int32) + gi * m
        if ids:
            d = jnp.where(functools.reduce(jnp.logical_or, [p == d for p in ids]),
                          gi * m + n.astype(jnp.int32) - 1, d)
        ids.append(d)
    return ids


def group_limited_gumbel(key: jax.Array, tokens: int, n_experts: int, k: int, n_group: int,
                  topk_group: int, logp: jax.Array | None = None) -> jax.Array:
    """[tokens, k]: DeepSeek-V3 group-limited top-k on E Gumbel scores per token (the
    reference `group_limited` is tested against).

    Scores are Gumbel noise (+ log p when given), so without groups this is `popular`.
    As in DeepSeek-V3's router: a group's score is the sum of its two best expert
    scores (the best one when a group has one expert); a token keeps its `topk_group`
    best groups and picks its top-k experts among theirs. Groups are contiguous blocks
    of E / n_group experts, which is what lets a placement map a group onto a node.
    """
    per_group = n_experts // n_group
    if topk_group * per_group < k:
        raise SpecError(f"topk_group: {topk_group} groups of {per_group} experts hold fewer "
                        f"than k={k} experts")
    s = gumbel(key, tokens, n_experts)
    if logp is not None:
        s = s + logp.astype(jnp.float32)
    grouped = s.reshape(tokens, n_group, per_group)
    group_score = top_k(grouped, min(2, per_group))[0].sum(-1)  # [N, G]
    keep = top_k(group_score, topk_group)[1]  # [N, topk_group]
    in_kept = (jnp.arange(n_group)[None, :, None] == keep[:, None, :]).any(-1)  # [N, G]
    masked = jnp.where(in_kept[:, :, None], grouped, -jnp.inf).reshape(tokens, n_experts)
    return top_k(masked, k)[1]


# --- successive sampling from a few draws per token -----------------------------------------


def _mulhi(a: jax.Array, b) -> jax.Array:
    """High 32 bits of the 64-bit product of uint32 a and b (from 16-bit halves: no x64)."""
    b = jnp.asarray(b, jnp.uint32)
    a0, a1, b0, b1 = a & 0xFFFF, a >> 16, b & 0xFFFF, b >> 16
    mid = a1 * b0 + ((a0 * b0) >> 16)
    return a1 * b1 + (mid >> 16) + ((a0 * b1 + (mid & 0xFFFF)) >> 16)


def _alias_bits(n_experts: int) -> tuple[int, int]:
    """(b, t): b bits hold a position in [0, E), t = 30 - b bits a bucket's own share of T = 2^t."""
    b = max(n_experts - 1, 1).bit_length()
    return b, 30 - b


@jax.jit  # one compiled program: run eagerly, its ~60 ops compiled one by one (2.8 s, measured)
def alias_table(logp: jax.Array) -> jax.Array:
    """[E] uint32: a Walker alias table of popularity exp(logp) over the experts.

    p is quantized to integer weights summing to E T (T = 2^t; 2^30 units in all, the
    rounding remainder to the largest), so a weight is exact to 2^-30 of the total.
    Bucket i keeps its own position for `own_i` of its T units and sends the rest to
    `alias_i`, packed as own << b | alias. Built in integers from prefix sums, without a
    sort or a loop (Vose's pairing in closed form): the light experts (w < T) lay their
    deficits T - w end to end in expert order, the heavy ones their excesses w - T in
    reverse expert order. A light bucket takes its deficit from the heavy one whose
    excess interval holds the start of its deficit; where the last light one a heavy one
    serves runs past that heavy one's excess, the heavy one keeps T minus the overrun and
    takes it from the next heavy one, whose light ones start that much later. Each heavy
    one so gives exactly its excess plus its own overrun, and every bucket holds T.
    """
    E = logp.shape[-1]
    b, t = _alias_bits(E)
    T = 1 << t
    w = jnp.floor(jnp.exp(logp - jax.nn.logsumexp(logp)) * float(E * T)).astype(jnp.int32)
    w = w.at[jnp.argmax(w)].add(E * T - w.sum())
    pos = jnp.arange(E, dtype=jnp.int32)
    light = w < T
    deficit = jnp.where(light, T - w, 0)
    deficit_end = jnp.cumsum(deficit)  # [E], by expert; heavy ones add nothing
    deficit_start = deficit_end - deficit
    rev_heavy = ~light[::-1]  # reverse expert order: index i is expert E-1-i
    excess_end = jnp.cumsum(jnp.where(rev_heavy, w[::-1] - T, 0))  # X, by reverse index
    # A light expert: the first heavy one whose excess interval ends past its start.
    light_alias = E - 1 - jnp.minimum(jnp.searchsorted(excess_end, deficit_start, side="right"),
                                      E - 1)
    # A heavy one: its overrun is how far the last light one starting before its excess
    # ends runs past that end; the next heavy one (in reverse order) fills it.
    before = jnp.searchsorted(deficit_start, excess_end, side="left")
    last_end = jnp.where(before > 0, deficit_end[jnp.maximum(before - 1, 0)], 0)
    overrun = jnp.maximum(last_end - excess_end, 0)[::-1]  # by expert
    rank = jnp.cumsum(rev_heavy)  # heavy ones counted in reverse order
    after = jnp.searchsorted(rank, rank + 1, side="left")[::-1]  # next heavy's reverse index
    own = jnp.where(light, w, T - overrun)
    alias = jnp.where(light, light_alias, E - 1 - jnp.minimum(after, E - 1))
    # A full bucket (own = T) is its own alias, so storing T - 1 in t bits changes nothing.
    alias = jnp.where(own >= T, pos, alias)
    own = jnp.minimum(own, T - 1)
    return (own.astype(jnp.uint32) << b) | alias.astype(jnp.uint32)


def _alias_draw(table: jax.Array, u: jax.Array) -> jax.Array:
    """int32 positions drawn from an alias table by uint32 random words u: bucket
    i = floor(u E / 2^32), then the next t bits v of u E against own_i (exact for E a
    power of 2; otherwise each bucket is off by at most E / 2^32).

    The entry is read once (XLA CPU fuses a gather only into a single consumer): with
    entry = own << b | alias and mask = 2^b - 1, d = (v << b | mask) - entry is negative
    exactly when v < own, and otherwise its low b bits are mask - alias (no borrow).
    """
    E = table.shape[-1]
    b, t = _alias_bits(E)
    mask = (1 << b) - 1
    if E & (E - 1) == 0:  # a power of 2: the bucket is the top b bits (E == 2^b)
        i = (u >> (32 - b)).astype(jnp.int32) if b else jnp.zeros(u.shape, jnp.int32)
    else:
        i = _mulhi(u, E).astype(jnp.int32)
    v = (u * jnp.uint32(E)) >> (32 - t)
    d = ((v << b) | jnp.uint32(mask)).astype(jnp.int32) - table[i].astype(jnp.int32)
    return jnp.where(d < 0, i, mask - (d & mask))


def _keep(kept: list[jax.Array], have: jax.Array, c: jax.Array, k: int):
    """Offer draw c to each token's picks: kept (k arrays, newest first, -1 empty) takes
    it, shifting the older ones down, unless it is a repeat or the token has k."""
    new = (have < k) & ~functools.reduce(jnp.logical_or, [s == c for s in kept])
    kept = [jnp.where(new, c, kept[0])] + [jnp.where(new, kept[m - 1], kept[m])
                                            for m in range(1, k)]
    return kept, have + new.astype(jnp.int32)


def _stream(draw, shape, draws: int, k: int, rolled: bool = False):
    """(kept, have) after draws 0 .. draws-1 (draw(j): positions of the given shape), each
    offered to the token's picks (`_keep`). Unrolled: elementwise, so XLA fuses it into the
    pass that consumes it; `rolled`, a loop over the draws (for the few tokens of the last
    stages: a smaller program, compiled faster)."""
    kept = [jnp.full(shape, -1, jnp.int32)] * k
    have = jnp.zeros(shape, jnp.int32)
    if rolled:
        def step(j, state):
            kept, have = _keep(list(state[0]), state[1], draw(j), k)
            return tuple(kept), have
        kept, have = jax.lax.fori_loop(0, draws, step, (tuple(kept), have))
        return list(kept), have
    for j in range(draws):
        kept, have = _keep(kept, have, draw(j), k)
    return kept, have


def alias_draws(key, table, token, tokens: int):
    """draw(j) -> alias draw j of the tokens `token` (uint32, any shape): counter j N + t."""
    return lambda j: _alias_draw(table, counter_bits(key, jnp.uint32(j * tokens) + token))


# Draws per token the plan's simulation follows a token for (past them it counts as "more").
SIMULATED_DRAWS_PER_K = 4


def draws_needed(p: np.ndarray, k: int, per_row: int = 512) -> np.ndarray:
    """[M, per_row] int: draws with replacement from popularity p ([E] or [M, E], at most 64
    rows) that simulated tokens need to hold k distinct experts (SIMULATED_DRAWS_PER_K k + 1
    for more). Numpy, fixed seed: what sizes `popular_used`'s passes, and what the benchmark's
    floor for a table sampler counts."""
    p = np.atleast_2d(np.asarray(p, np.float64))[:64]
    p = p / p.sum(-1, keepdims=True)
    most = SIMULATED_DRAWS_PER_K * k
    n = per_row * len(p)
    rng = np.random.default_rng(0)
    row = np.arange(n) // per_row
    cdf = np.cumsum(p, -1)
    u = rng.random((n, most))
    draws = np.stack([np.searchsorted(cdf[r], u[row == r], side="right") for r in range(len(p))])
    draws = np.minimum(draws.reshape(n, most), p.shape[-1] - 1)
    seen = np.zeros((n, p.shape[-1]), bool)
    count = np.zeros(n, np.int64)
    need = np.full(n, most + 1)
    for j in range(most):
        c = draws[:, j]
        count += ~seen[np.arange(n), c]
        seen[np.arange(n), c] = True
        need = np.where((count >= k) & (need > most), j + 1, need)
    return need.reshape(len(p), per_row)


def stream_plan(p: np.ndarray, k: int) -> tuple[int, float]:
    """(draws, short): how `popular_used` splits its work for popularity p [E] or [M, E].
    draws: the first pass's draws per token, the 99th percentile of what a token needs for
    k distinct experts (`draws_needed`), at most `chain_draws(k)`; short: the fraction of
    tokens still short of k after them in the worst row of p, plus 3 standard errors (it
    sizes the second pass, which every layer of a batch pays for; a layer with more short
    tokens sends the rest on to the slower stages). Speed only: the later passes finish
    every token exactly, whatever these are."""
    need = draws_needed(p, k)
    most = SIMULATED_DRAWS_PER_K * k
    first = int(np.clip(np.quantile(need, QUANTILE), k, max(k, min(most, chain_draws(k)))))
    short = (need > first).mean(-1)
    per_row = need.shape[1]
    return first, float(np.max(short + 3 * np.sqrt(short * (1 - short) / per_row)))


QUANTILE = 0.99

# Draws per token before the rest of a short token is finished by Gumbel top-k.
STREAM_DRAWS_PER_K = 8

# Draws x k that one fused pass of the alias stream takes at full speed: past it XLA
# CPU's code for the pass gets ~3x slower per draw (k = 8, E = 256, on this project's
# 2-core AMD EPYC: 1.9 ns per draw at 14 draws, 6.7 ns at 18, first pass alone), so the
# first pass stops there and the few tokens still short go on compacted (`popular_used`).
CHAIN_SLOTS = 112


def chain_draws(k: int) -> int:
    """Draws per token in one fused pass of the alias stream (`CHAIN_SLOTS`), at least k."""
    return max(k, CHAIN_SLOTS // k)


def _check_counters(tokens: int, k: int, n_experts: int) -> None:
    if tokens * max(STREAM_DRAWS_PER_K * k, n_experts) >= 2**32:
        raise SpecError(f"tokens: {tokens} x {max(STREAM_DRAWS_PER_K * k, n_experts)} draws "
                        "exceed the 32-bit counter")


def _finish(gkey, rows, taken, have, logp, k: int) -> jax.Array:
    """[n, k] positions, -1 past k - have: the rest of tokens `rows` (taken [n, E]: the
    positions they have kept; have [n] how many), by Gumbel top-k of log p over the
    positions not taken, from fresh noise (counter row E + position, of gkey)."""
    E = logp.shape[-1]
    pos = jnp.arange(E, dtype=jnp.uint32)
    g = counter_bits(gkey, rows.astype(jnp.uint32)[:, None] * jnp.uint32(E) + pos)
    noise = -jnp.log(-jnp.log(((g >> 8).astype(jnp.float32) + 0.5) * (1.0 / 2**24)))
    best = top_k(jnp.where(taken, -jnp.inf, logp.astype(jnp.float32) + noise), k)[1]
    return jnp.where(jnp.arange(k) < (k - have)[:, None], best, -1)


def popular_alias(key: jax.Array, tokens: int, table: jax.Array, logp: jax.Array,
                   k: int, token: jax.Array | None = None) -> jax.Array:
    """[tokens, k] positions in an alias table (`alias_table`; logp: log p by
    position) of k distinct experts per token by successive sampling (or [n, k] for the
    tokens `token` [n] only: their rows of the same routing).

    Each token draws positions independently from p (alias method: a hash and a lookup)
    and keeps the first k distinct ones. Skipping a repeat makes the next kept one p
    renormalized over those not kept yet: successive sampling exactly (p to 2^-30 of its
    total, `alias_table`). A loop draws once per token per round (round j of token t:
    counter j N + t) until every token has k; a token still short after 8 k draws (a
    few experts hold nearly all of p) is finished exactly by Gumbel top-k over the
    experts it has not kept (successive sampling is memoryless: what a token keeps next
    depends only on what it has), 1/16 of the tokens at a time.
    """
    t = jnp.arange(tokens, dtype=jnp.uint32) if token is None else token.astype(jnp.uint32)
    n = t.shape[0]
    if n == 0:
        return jnp.zeros((0, k), jnp.int32)
    rounds = STREAM_DRAWS_PER_K * k

    def draw(state):
        i, kept, have = state
        c = _alias_draw(table, counter_bits(key, i.astype(jnp.uint32) * jnp.uint32(tokens) + t))
        new = (have < k) & ~functools.reduce(jnp.logical_or, [s == c for s in kept])
        # Materialized once: XLA CPU would recompute the draw in each of the k + 1 updates.
        c, new = jax.lax.optimization_barrier((c, new))
        kept = tuple(jnp.where(new & (have == j), c, s) for j, s in enumerate(kept))
        return i + 1, kept, have + new.astype(jnp.int32)

    start = (jnp.int32(0), tuple(jnp.full((n,), -1, jnp.int32) for _ in range(k)),
             jnp.zeros(n, jnp.int32))
    _, kept, have = jax.lax.while_loop(lambda s: (s[0] < rounds) & (s[2] < k).any(), draw, start)
    kept = jnp.stack(kept, -1)
    batch = -(-n // 16)
    gkey = jax.random.fold_in(key, 1)

    def finish(state):  # the next `batch` short tokens
        kept, have = state
        rows = jnp.nonzero(have < k, size=batch, fill_value=n)[0]
        r = jnp.minimum(rows, n - 1)
        mine, got = kept[r], have[r]
        taken = (mine[:, :, None] == jnp.arange(logp.shape[-1])).any(1)
        rest = _finish(gkey, t[r], taken, got, logp, k)
        slot = jnp.arange(k)
        mine = jnp.where(slot >= got[:, None], jnp.take_along_axis(
            rest, jnp.maximum(slot - got[:, None], 0), -1), mine)
        return kept.at[rows].set(mine, mode="drop"), have.at[rows].set(k, mode="drop")

    kept, _ = jax.lax.while_loop(lambda s: (s[1] < k).any(), finish, (kept, have))
    return kept


def popular(key: jax.Array, tokens: int, logp: jax.Array, k: int) -> jax.Array:
    """[tokens, k]: successive sampling of k distinct experts with popularity exp(logp),
    the distribution of `popular_gumbel` from a few draws per token instead of E scores
    (`popular_alias`). Experts with p = 0 are never drawn; at least k must have p > 0."""
    E = logp.shape[-1]
    if not 0 < k <= E:
        raise SpecError(f"top_k: need 0 < k <= E, got k={k}, E={E}")
    _check_counters(tokens, k, E)
    return popular_alias(key, tokens, alias_table(logp), logp, k)


def _lane_words(kept, have, real, E: int, k: int):
    """Tokens [G, 32] with their picks (kept, have; real: which are tokens, not padding):
    one reduction over the 32 lanes ORs their sets into bit words ([W] words [G]) and gives
    a word [G] whose bit i marks lane i still short of k."""
    lane = jnp.arange(32, dtype=jnp.uint32)
    red = or_reduce([*set_words([jnp.where(real, c, -1) for c in kept], E, empty=True),
                     jnp.where(real & (have < k), jnp.uint32(1) << lane, jnp.uint32(0))], 1)
    return list(or_reduce(red[:-1], 0)), red[-1]


def compact(flags: jax.Array, size: int, fill: int) -> jax.Array:
    """int32 [size]: the indices of the first `size` set bits of flags [G] (bit i of word g
    is index 32 g + i), in order, then `fill`. What jnp.nonzero(size=) gives, in O(G) plus
    O(size log G) work where jnp.nonzero's cumulative sum costs XLA CPU O(n^2) (42 us for
    4096 flags, against about 10 us here for 576 of them, measured).

    The result is written by a scatter: computed elementwise, XLA fuses it into each
    consumer, and a replay recomputed it once per draw (6 ms of 20 per R1 sample of
    Zipf(1.2), measured). A scatter of all N flags to their ranks costs 3x more."""
    count = jax.lax.population_count(flags).astype(jnp.int32)
    start = jnp.cumsum(count) - count
    s = jnp.arange(size, dtype=jnp.int32)
    g = jnp.clip(jnp.searchsorted(start, s, side="right") - 1, 0, flags.shape[0] - 1)
    word, r = flags[g], (s - start[g]).astype(jnp.uint32)
    pos = jnp.zeros(size, jnp.uint32)
    for half in (16, 8, 4, 2, 1):  # the r-th set bit of the word, by halving
        low = jax.lax.population_count((word >> pos) & jnp.uint32((1 << half) - 1))
        go = r >= low
        pos, r = jnp.where(go, pos + half, pos), jnp.where(go, r - low, r)
    rows = jnp.where(s < count.sum(), g * 32 + pos.astype(jnp.int32), fill)
    return jnp.zeros(size, jnp.int32).at[s].set(rows, unique_indices=True)


def _settle(flags: jax.Array, still: jax.Array) -> jax.Array:
    """flags [G] after the tokens `compact(flags, n)` gave were worked on: the i-th of
    them stays set iff still[i] ([n] bool); the rest are unchanged."""
    lane = jnp.arange(32, dtype=jnp.uint32)
    count = jax.lax.population_count(flags).astype(jnp.int32)
    rank = ((jnp.cumsum(count) - count)[:, None]
            + jax.lax.population_count(flags[:, None] & ((jnp.uint32(1) << lane) - 1)))
    n = still.shape[0]
    stays = jnp.where(rank < n, still[jnp.minimum(rank, n - 1)], True)
    on = (((flags[:, None] >> lane) & 1) == 1) & stays
    return jax.lax.reduce(jnp.where(on, jnp.uint32(1) << lane, jnp.uint32(0)), jnp.uint32(0),
                          jnp.bitwise_or, (1,))


def _replay(key, table, rows, tokens: int, draws: int, k: int, lanes: int = 32,
            rolled: bool = False):
    """(kept, have) of the tokens `rows` [n] (n a multiple of `lanes`), as [n / lanes, lanes],
    after their draws 0 .. draws-1: the draws materialized first ([draws, ...], counter
    j N + t), so that the pass over them has no gathers."""
    r = jnp.minimum(rows, tokens - 1).astype(jnp.uint32).reshape(-1, lanes)
    j = jnp.arange(draws, dtype=jnp.uint32).reshape(-1, 1, 1)
    drawn = jax.lax.optimization_barrier(
        _alias_draw(table, counter_bits(key, j * jnp.uint32(tokens) + r)))
    return _stream(lambda j: drawn[j], r.shape, draws, k, rolled)


def popular_used(key: jax.Array, tokens: int, table: jax.Array, logp: jax.Array,
                 k: int, plan: tuple[int, float]) -> jax.Array:
    """int32: the experts one layer uses (the union of its tokens' expert sets) under
    successive sampling from an alias table, counted straight from the draws: what the
    Monte Carlo needs without EP ranks.

    Every token's set is the one `popular_alias` gives it (the same random numbers): the
    first k distinct of its first `most` = STREAM_DRAWS_PER_K k alias draws (draw j of
    token t from counter j N + t), completed if short by Gumbel top-k over the experts it
    has not kept (`_finish`, noise of row t). The stages below only decide how much of
    that work is done for which tokens: a token leaves a stage when its set is complete,
    its partial sets are parts of its final set, so ORing all into the union is exact.
    1. every token makes `first` draws (`stream_plan`: ~99% of tokens get k, within the
       length a fused pass runs at full speed); one reduction ORs their sets into bit
       words and marks the short ones. Unrolled and elementwise, it is one fused pass
       (materialized, each of the k picks would cost XLA CPU a recomputation of the whole
       chain, and a loop a pass per round);
    2. the short tokens, compacted (room for the `short` fraction of `stream_plan`, with
       its margin, and 32 more), replay 2 `first` draws; then the first 32 still short
       (or past the room) replay all `most` draws. The draws are materialized first
       (`_replay`);
    3. any still short (nearly all mass on fewer than k experts, or past the rooms), 8 at
       a time, replay their `most` draws and are completed by Gumbel top-k.
    Tokens are tracked as bit flags [N / 32] (`compact`, `_settle`): jnp.nonzero over N
    flags costs XLA CPU more than a stage.
    """
    E = table.shape[-1]
    if tokens == 0:
        return jnp.int32(0)
    first, short_fraction = plan
    most = STREAM_DRAWS_PER_K * k
    lane = jnp.arange(32, dtype=jnp.uint32)
    groups = -(-tokens // 32)
    t = jnp.arange(groups, dtype=jnp.uint32)[:, None] * jnp.uint32(32) + lane
    kept, have = _stream(alias_draws(key, table, t, tokens), t.shape, first, k)
    words, short = _lane_words(kept, have, t < tokens, E, k)

    def stage(words, short, room, draws, rolled=False):  # the first `room` short tokens
        rows = compact(short, room, tokens)
        kept, have = _replay(key, table, rows, tokens, draws, k, rolled=rolled)
        more, still = _lane_words(kept, have, (rows < tokens).reshape(-1, 32), E, k)
        still = ((still[:, None] >> lane) & 1).reshape(-1) == 1
        return [w | m for w, m in zip(words, more, strict=True)], _settle(short, still)

    room = min(32 * groups, 32 * -(-int(short_fraction * tokens + 32) // 32))
    words, short = stage(words, short, room, min(2 * first, most))
    words, short = stage(words, short, 32, most, rolled=True)
    gkey = jax.random.fold_in(key, 1)

    def finish(state):  # 8 short tokens: replay their draws, then Gumbel top-k
        short, words = state
        rows = compact(short, 8, tokens)
        kept, have = _replay(key, table, rows, tokens, most, k, lanes=8, rolled=True)
        kept, have = [c[0] for c in kept], have[0]
        taken = (jnp.stack(kept, -1)[:, :, None] == jnp.arange(E)).any(1)
        rest = _finish(gkey, jnp.minimum(rows, tokens - 1), taken, have, logp, k)
        new = or_reduce(set_words([jnp.where(rows < tokens, c, -1)
                                   for c in (*kept, *(rest[:, j] for j in range(k)))],
                                  E, empty=True), 0)
        return (_settle(short, jnp.zeros(8, bool)),
                tuple(w | n for w, n in zip(words, new, strict=True)))

    _, words = jax.lax.while_loop(lambda s: (s[0] != 0).any(), finish, (short, tuple(words)))
    return count_set(words)


def set_words(cols: list[jax.Array], n: int, empty: bool = False) -> list[jax.Array]:
    """Per row, the set of values in cols (arrays of one shape, values in [0, n); with
    `empty`, -1 for none) as ceil(n/32) uint32 words. A set, not a one-hot [..., n]: k
    selects and ORs per word, all elementwise, so XLA fuses it with whatever produced
    the ids."""
    bits = [jnp.left_shift(jnp.uint32(1), (c & 31).astype(jnp.uint32)) for c in cols]
    words = []
    for w in range((n + 31) // 32):
        word = jnp.uint32(0)
        for c, b in zip(cols, bits, strict=True):
            hit = (c >> 5) == w if n > 32 else c >= 0 if empty else None
            word = word | (b if hit is None else jnp.where(hit, b, jnp.uint32(0)))
        words.append(word)
    return words


def or_reduce(words, axis: int) -> tuple[jax.Array, ...]:
    """Each array of words ORed over `axis`, all in one variadic reduction (one pass)."""
    return jax.lax.reduce(tuple(words), tuple(jnp.uint32(0) for _ in words),
                          lambda a, b: tuple(x | y for x, y in zip(a, b, strict=True)), (axis,))


def count_set(words) -> jax.Array:
    """int32: the set bits of a set's words (`set_words`): its size."""
    return sum(jax.lax.population_count(w).astype(jnp.int32) for w in words)


def from_logits(logits: jax.Array, k: int) -> jax.Array:
    """[..., N_t, k]: the top-k experts of router logits [..., N_t, E]."""
    return jax.lax.top_k(jnp.asarray(logits, jnp.float32), k)[1].astype(jnp.int32)


# --- popularity vectors ---------------------------------------------------------------------


def zipf_logp(key: jax.Array, n_experts: int, s: float) -> jax.Array:
    """[E] log-popularity p_e ~ 1 / rank_e^s, the ranks a random permutation of 1..E.

    The permutation matters for placement: popular experts land on random ranks.
    """
    ranks = jax.random.permutation(key, n_experts) + 1
    logp = -s * jnp.log(ranks.astype(jnp.float32))
    return logp - jax.nn.logsumexp(logp)


def log_gamma(key: jax.Array, n: int, a: float, tries: int = 4) -> jax.Array:
    """[n] log of Gamma(a) variates (float32), by Marsaglia and Tsang's exact rejection
    method, from `counter_bits`: `tries` proposals per variate in one elementwise pass,
    then a loop (rarely entered: a proposal is rejected with probability < 5% for shape
    >= 1) over those all rejected. Shape a < 1: log G(a) = log G(a + 1) + log(U) / a
    (Marsaglia and Tsang's boost), which keeps tiny variates from underflowing.

    Each try: x ~ N(0, 1) (Box-Muller), v = (1 + c x)^3 with d = shape - 1/3,
    c = 1 / sqrt(9 d); accept d v when v > 0 and log U < x^2/2 + d - d v + d log v.
    """
    shape = a + 1.0 if a < 1 else a
    d = shape - 1.0 / 3.0
    c = 1.0 / np.sqrt(9.0 * d)
    i = jnp.arange(n, dtype=jnp.uint32)

    def unit(u):  # (0, 1) from 24 random bits
        return ((u >> 8).astype(jnp.float32) + 0.5) * (1.0 / 2**24)

    def propose(t):  # try t of every variate: (accepted, log of d v)
        u = [unit(counter_bits(key, (i * jnp.uint32(tries + 64) + t) * jnp.uint32(3) + j))
             for j in range(3)]
        x = jnp.sqrt(-2.0 * jnp.log(u[0])) * jnp.cos(2.0 * np.pi * u[1])
        v = (1.0 + c * x) ** 3
        logv = jnp.log(jnp.maximum(v, 1e-30))
        ok = (v > 0) & (jnp.log(u[2]) < 0.5 * x * x + d - d * v + d * logv)
        return ok, np.log(d) + logv

    done, logg = jnp.zeros(n, bool), jnp.zeros(n, jnp.float32)
    for t in range(tries):
        ok, val = propose(jnp.uint32(t))
        logg, done = jnp.where(~done & ok, val, logg), done | ok

    def again(state):  # the few all rejected: fresh tries, one at a time
        t, done, logg = state
        ok, val = propose(t.astype(jnp.uint32))
        return t + 1, done | ok, jnp.where(~done & ok, val, logg)

    _, _, logg = jax.lax.while_loop(lambda s: ~s[1].all() & (s[0] < tries + 64), again,
                                    (jnp.int32(tries), done, logg))
    if a < 1:
        logg = logg + jnp.log(unit(counter_bits(key, i + jnp.uint32(n * 3 * (tries + 64))))) / a
    return logg


def dirichlet_logp(key: jax.Array, n_experts: int, a: float) -> jax.Array:
    """[E] log-popularity p ~ Dirichlet(a, ..., a): a -> inf is uniform, small a is skewed.

    Drawn as normalized Gamma(a) variates in log space (`log_gamma`), so that a small a
    does not underflow p to exact zeros.
    """
    logg = log_gamma(key, n_experts, a)
    return logg - jax.nn.logsumexp(logg)


def hist_logp(hist) -> np.ndarray:
    """[E] or [L, E] log-popularity from measured per-expert counts (zeros stay -inf)."""
    h = np.asarray(hist, dtype=np.float64)
    if h.ndim not in (1, 2) or h.shape[-1] < 1:
        raise SpecError(f"routing: a histogram must be [E] or [L, E], got shape {h.shape}")
    if not np.all(np.isfinite(h)) or np.any(h < 0):
        raise SpecError("routing: histogram counts must be finite and >= 0")
    total = h.sum(-1, keepdims=True)
    if np.any(total <= 0):
        raise SpecError("routing: a histogram layer has no counts")
    with np.errstate(divide="ignore"):
        return np.log(h / total).astype(np.float32)


# --- L layers ---------------------------------------------------------------------------------


def layers(gen: Generator, key: jax.Array, n_layers: int) -> jax.Array:
    """[L, N_t, k]: L independent layers, layer l drawn from fold_in(key, l)."""
    keys = jax.vmap(lambda l: jax.random.fold_in(key, l))(jnp.arange(n_layers))
    return jax.vmap(gen)(keys, jnp.arange(n_layers))


def worst_case(n_layers: int, tokens: int, n_experts: int, k: int) -> np.ndarray:
    """[L, N_t, k]: the seed's worst case, no two tokens share an expert until E is used.

    Pair (t, j) goes to expert (t k + j) mod E: k distinct ids per token (k <= E), and the
    first ceil(E / k) tokens cover every expert, so N_ue = min(k N_t, E) in every layer.
    """
    ids = (np.arange(tokens)[:, None] * k + np.arange(k)[None, :]) % n_experts
    return np.broadcast_to(ids.astype(np.int32), (n_layers, tokens, k)).copy()


def load_array(path: str) -> np.ndarray:
    """A .npy array, or a JSON list (of lists) of numbers."""
    import os

    from moelab.costmodel.jsonfile import MAX_BYTES, read_json

    if path.endswith(".json"):  # size, encoding, depth and truncation: one line
        data = read_json(path, "routing")
    elif os.path.isfile(path) and os.path.getsize(path) > MAX_BYTES:
        raise SpecError(f"routing: {path} is {os.path.getsize(path):,} bytes; the limit is {MAX_BYTES:,}")
    try:
        if path.endswith(".json"):
            return np.asarray(data, dtype=np.float64)
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, TypeError) as e:
        raise SpecError(f"routing: cannot read {path!r}: {e}") from None


def _popular_generator(tokens: int, k: int, popularity: np.ndarray, layer_table) -> Generator:
    """gen(key, l) -> ids by successive sampling, with `gen.used(key, l)`: the experts the
    layer uses, counted straight from the draws (`popular_used`, for the Monte Carlo).
    layer_table(key, l) -> (expert [E] of each table position, alias table [E], log p [E]
    by position). popularity: p [E] or some layers' [M, E] in numpy, which size the passes
    (`stream_plan`); kept as `gen.popularity`."""
    plan = stream_plan(popularity, k)
    def gen(key, l):
        expert, table, logp = layer_table(jax.random.fold_in(key, 2), l)
        return expert[popular_alias(jax.random.fold_in(key, 1), tokens, table, logp, k)]

    def used(key, l):  # which expert holds a position is not needed: XLA drops it
        _, table, logp = layer_table(jax.random.fold_in(key, 2), l)
        return popular_used(jax.random.fold_in(key, 1), tokens, table, logp, k, plan)

    gen.used = used
    gen.popularity = popularity
    return gen


def _groups_generator(tokens: int, E: int, k: int, n_group: int, topk_group: int) -> Generator:
    """Group-limited ids; `gen.used` counts the experts used in the same fused pass."""
    def gen(key, l):
        return group_limited(key, tokens, E, k, n_group, topk_group)

    def used(key, l):
        return count_set(or_reduce(set_words(group_ids(key, tokens, E, k, n_group, topk_group),
                                             E), 0))

    gen.used = used
    return gen


def _zipf_generator(tokens: int, E: int, k: int, s: float) -> Generator:
    """Zipf: slot j has popularity 1/(j+1)^s, so one alias table serves every layer; each
    layer draws which expert holds each slot (a uniform random permutation, as the
    random ranks of `zipf_logp`)."""
    logq = -s * np.log(np.arange(1, E + 1, dtype=np.float64))
    logq = (logq - np.logaddexp.reduce(logq)).astype(np.float32)
    table = np.asarray(alias_table(jnp.asarray(logq)))

    def layer_table(key, l):
        return jax.random.permutation(key, E), jnp.asarray(table), jnp.asarray(logq)

    return _popular_generator(tokens, k, np.exp(logq), layer_table)


def _dirichlet_generator(tokens: int, E: int, k: int, a: float) -> Generator:
    """Dirichlet: each layer its own popularity and alias table (the passes sized from 64
    popularity vectors drawn in numpy)."""
    def layer_table(key, l):
        logp = dirichlet_logp(key, E, a)
        return jnp.arange(E), alias_table(logp), logp

    return _popular_generator(tokens, k, np.random.default_rng(0).dirichlet(np.full(E, a), 64),
                              layer_table)


def _hist_generator(tokens: int, k: int, logp: np.ndarray) -> Generator:
    """Measured histograms [L, E]: every layer's alias table built once."""
    table = jax.vmap(alias_table)(jnp.asarray(logp))
    logp, expert = jnp.asarray(logp), jnp.arange(logp.shape[-1])
    return _popular_generator(tokens, k, np.exp(logp),
                              lambda key, l: (expert, table[l], logp[l]))


@lru_cache(maxsize=32)
def layer_generator(spec: RoutingSpec, n_layers: int, tokens: int, n_experts: int, k: int,
                    n_group: int = 1, topk_group: int = 1) -> Generator:
    """gen(key, layer) -> [tokens, k] for a parsed routing; layers are drawn independently.

    Popularity (Zipf, Dirichlet) is drawn afresh per layer from the layer's key. A
    histogram `[L, E]` gives each layer its own; `[E]` serves every layer. Router logits
    `[L, N, E]` or `[N, E]` are resampled: each layer's N_t tokens are rows drawn with
    replacement from the file's tokens of that layer (a bootstrap; with exactly N_t rows,
    use `logits_routes` for the file's routing itself). Cached, so that the same routing
    reuses its compiled Monte Carlo (files are read once per process).
    """
    E = n_experts
    if spec.kind == "uniform":
        return lambda key, l: uniform(key, tokens, E, k)
    if spec.kind in ("zipf", "dirichlet", "hist"):
        _check_counters(tokens, k, E)
    if spec.kind == "zipf":
        return _zipf_generator(tokens, E, k, spec.param)
    if spec.kind == "dirichlet":
        return _dirichlet_generator(tokens, E, k, spec.param)
    if spec.kind == "groups":
        return _groups_generator(tokens, E, k, n_group, topk_group)
    if spec.kind == "hist":
        logp = hist_logp(load_array(spec.path))
        if logp.shape[-1] != E:
            raise SpecError(f"routing: histogram has {logp.shape[-1]} experts, the model {E}")
        if np.any(np.isfinite(logp).sum(-1) < k):
            raise SpecError(f"routing: histogram has fewer than k={k} experts with counts")
        logp = np.broadcast_to(logp, (n_layers, E)) if logp.ndim == 1 else logp
        if logp.shape[0] != n_layers:
            raise SpecError(f"routing: histogram has {logp.shape[0]} layers, the model {n_layers}")
        return _hist_generator(tokens, k, logp)
    if spec.kind == "logits":
        ids = jnp.asarray(logits_routes(spec.path, n_layers, E, k))  # [L, N_file, k]
        n_file = ids.shape[1]

        def resample(key, l):
            rows = jax.random.randint(key, (tokens,), 0, n_file)
            return ids[l][rows]

        return resample
    raise SpecError(f"routing: {spec} has no generator")


def logits_routes(path: str, n_layers: int, n_experts: int, k: int) -> np.ndarray:
    """[L, N_file, k] top-k routes of a logits file [L, N, E] or [N, E] (used for every layer)."""
    logits = load_array(path)
    if logits.ndim == 2:
        logits = np.broadcast_to(logits, (n_layers, *logits.shape))
    if logits.ndim != 3 or logits.shape[-1] != n_experts or logits.shape[1] < 1:
        raise SpecError(f"routing: logits must be [L, N_t, E={n_experts}] or [N_t, E], "
                        f"got shape {logits.shape}")
    if logits.shape[0] != n_layers:
        raise SpecError(f"routing: logits have {logits.shape[0]} layers, the model {n_layers}")
    if not np.all(np.isfinite(logits)):
        raise SpecError("routing: logits must be finite")
    return np.asarray(from_logits(logits, k))
