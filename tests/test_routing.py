"""Routing generators: shapes, distinct ids per token, the distributions they claim."""

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.costmodel import routing as rt
from moelab.costmodel.specs import SpecError, parse_routing


def _distinct_rows(ids: np.ndarray) -> bool:
    s = np.sort(ids, axis=-1)
    return bool(np.all(s[..., 1:] != s[..., :-1]))


@settings(max_examples=12)
@given(E=st.integers(1, 300), data=st.data(), tokens=st.integers(0, 40), seed=st.integers(0, 99))
def test_uniform_ids_distinct_and_in_range(E, data, tokens, seed):
    k = data.draw(st.integers(1, min(E, 16)))
    ids = np.asarray(rt.uniform(jax.random.key(seed), tokens, E, k))
    assert ids.shape == (tokens, k) and ids.dtype == np.int32
    assert ids.size == 0 or (ids.min() >= 0 and ids.max() < E)
    assert _distinct_rows(ids)


@pytest.mark.parametrize("E,k", [(5, 2), (6, 3), (4, 4)])  # small; k = E/2; k == E
def test_uniform_every_subset_equally_likely(E, k):
    n = 60_000
    ids = np.sort(np.asarray(rt.uniform(jax.random.key(1), n, E, k)), axis=-1)
    subsets = list(itertools.combinations(range(E), k))
    index = {s: i for i, s in enumerate(subsets)}
    counts = np.bincount([index[tuple(r)] for r in ids.tolist()], minlength=len(subsets))
    expected = n / len(subsets)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = len(subsets) - 1
    # chi-square with dof degrees of freedom: mean dof, sd sqrt(2 dof); 5 sd is far out.
    assert chi2 < dof + 5 * math.sqrt(2 * max(dof, 1)), (chi2, dof)


def test_uniform_marginals_are_k_over_e():
    E, k, n = 256, 8, 40_000  # DeepSeek-R1's E and k
    ids = np.asarray(rt.uniform(jax.random.key(2), n, E, k))
    freq = np.bincount(ids.ravel(), minlength=E) / n
    se = math.sqrt(k / E * (1 - k / E) / n)
    assert np.max(np.abs(freq - k / E)) < 5 * se


def test_popular_first_choice_follows_p_and_zeros_never_drawn():
    p = np.array([0.5, 0.25, 0.125, 0.125, 0.0, 0.0])
    n = 40_000
    with np.errstate(divide="ignore"):
        logp = jnp.asarray(np.log(p), jnp.float32)
    ids = np.asarray(rt.popular(jax.random.key(3), n, logp, 3))
    assert _distinct_rows(ids) and not np.isin(ids, [4, 5]).any()
    first = np.bincount(ids[:, 0], minlength=6) / n
    se = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(first - p) <= 5 * se + 1e-12)


@pytest.mark.parametrize("n_group,topk_group,E,k", [
    (8, 4, 256, 8),  # DeepSeek-V3
    (4, 1, 16, 4),  # one group holds exactly k experts
    (1, 1, 12, 3),  # no groups: plain top-k
    (6, 6, 12, 12),  # k == E
])
def test_group_limited_stays_in_topk_groups(n_group, topk_group, E, k):
    ids = np.asarray(rt.group_limited(jax.random.key(4), 500, E, k, n_group, topk_group))
    assert ids.shape == (500, k) and _distinct_rows(ids)
    groups = ids // (E // n_group)
    per_token = [len(set(g)) for g in groups.tolist()]
    assert max(per_token) <= topk_group


def test_group_limited_rejects_too_few_experts():
    with pytest.raises(SpecError, match="topk_group"):
        rt.group_limited(jax.random.key(0), 4, 16, 8, 8, 2)  # 2 groups x 2 experts < 8


def test_from_logits_is_top_k():
    logits = np.random.default_rng(0).normal(size=(3, 50, 20)).astype(np.float32)
    ids = np.asarray(rt.from_logits(logits, 4))
    expected = np.argsort(-logits, axis=-1)[..., :4]
    np.testing.assert_array_equal(ids, expected)


def test_popularity_vectors_are_normalized():
    key = jax.random.key(5)
    z = np.exp(np.asarray(rt.zipf_logp(key, 64, 1.2)))
    d = np.exp(np.asarray(rt.dirichlet_logp(key, 64, 0.05)))  # small a: very skewed
    for p in (z, d):
        assert p.shape == (64,) and abs(p.sum() - 1) < 1e-5 and np.all(p >= 0)
    # Zipf: sorted popularity is 1/rank^s
    zs = np.sort(z)[::-1]
    np.testing.assert_allclose(zs[0] / zs[1], 2**1.2, rtol=1e-4)


@given(L=st.integers(1, 4), N=st.integers(0, 50), E=st.integers(1, 40), data=st.data())
def test_worst_case_uses_min_kn_e(L, N, E, data):
    k = data.draw(st.integers(1, E))
    ids = rt.worst_case(L, N, E, k)
    assert ids.shape == (L, N, k) and _distinct_rows(ids)
    for layer in ids:
        assert len(np.unique(layer)) == min(k * N, E)


def test_layers_are_independent_and_reproducible():
    gen = lambda key, l: rt.uniform(key, 30, 64, 4)
    a = np.asarray(rt.layers(gen, jax.random.key(7), 3))
    b = np.asarray(rt.layers(gen, jax.random.key(7), 3))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 30, 4) and not np.array_equal(a[0], a[1])


@pytest.mark.parametrize("spec,kind,param", [
    ("uniform", "uniform", 0.0), ("zipf:1.5", "zipf", 1.5), ("dirichlet:0.3", "dirichlet", 0.3),
    ("groups", "groups", 0.0), ("zipf:0", "zipf", 0.0),
])
def test_parse(spec, kind, param):
    r = parse_routing(spec)
    assert (r.kind, r.param) == (kind, param)


@pytest.mark.parametrize("spec", ["worst", "zipf", "zipf:x", "dirichlet:0", "dirichlet:-1",
                                  "zipf:nan", "logits:/nonexistent.npy", "hist:", "uniform:2", ""])
def test_parse_rejects(spec):
    with pytest.raises(SpecError, match="^routing: "):
        parse_routing(spec)


def test_hist_and_logits_files(tmp_path):
    E, k, L = 16, 2, 3
    hist = [0] * 8 + [5] * 8  # only the upper half is ever used
    (tmp_path / "h.json").write_text(json.dumps(hist))
    gen = rt.layer_generator(parse_routing(f"hist:{tmp_path / 'h.json'}"), L, 100, E, k)
    ids = np.asarray(rt.layers(gen, jax.random.key(0), L))
    assert ids.min() >= 8 and _distinct_rows(ids)

    logits = np.random.default_rng(1).normal(size=(L, 10, E)).astype(np.float32)
    np.save(tmp_path / "l.npy", logits)
    routes = rt.logits_routes(str(tmp_path / "l.npy"), L, E, k)
    np.testing.assert_array_equal(routes, np.argsort(-logits, -1)[..., :k])
    gen = rt.layer_generator(parse_routing(f"logits:{tmp_path / 'l.npy'}"), L, 25, E, k)
    boot = np.asarray(rt.layers(gen, jax.random.key(0), L))
    for l in range(L):  # every resampled token is one of the file's tokens of that layer
        rows = {tuple(r) for r in routes[l].tolist()}
        assert all(tuple(r) in rows for r in boot[l].tolist())


def test_bad_files(tmp_path):
    (tmp_path / "few.json").write_text(json.dumps([1, 0, 0, 0]))
    with pytest.raises(SpecError, match="fewer than k"):
        rt.layer_generator(parse_routing(f"hist:{tmp_path / 'few.json'}"), 1, 4, 4, 2)
    np.save(tmp_path / "bad.npy", np.zeros((5, 7)))
    with pytest.raises(SpecError, match="logits must be"):
        rt.logits_routes(str(tmp_path / "bad.npy"), 1, 8, 2)


@settings(max_examples=10)
@given(n=st.integers(1, 70), data=st.data())
def test_top_k_matches_sorting(n, data):
    k = data.draw(st.integers(1, n))
    x = np.random.default_rng(n).normal(size=(3, 5, n)).astype(np.float32)
    values, ids = rt.top_k(jnp.asarray(x), k)
    order = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    np.testing.assert_array_equal(np.asarray(ids), order)
    np.testing.assert_array_equal(np.asarray(values), np.take_along_axis(x, order, -1))


def test_gumbel_noise_moments():
    g = np.asarray(rt.gumbel(jax.random.key(0), 4000, 100), np.float64).ravel()
    se = math.pi / math.sqrt(6) / math.sqrt(g.size)
    assert abs(g.mean() - 0.5772156649) < 5 * se  # Euler's gamma
    assert abs(g.var() - math.pi**2 / 6) < 0.01
    assert np.isfinite(g).all()


# --- popular: the alias-stream sampler against Gumbel top-k (the same distribution) ----------


@pytest.mark.parametrize("E,seed", [(6, 0), (64, 1), (256, 2), (60, 3)])
def test_alias_table_holds_the_quantized_popularity_exactly(E, seed):
    rng = np.random.default_rng(seed)
    logp = np.log(rng.dirichlet(np.full(E, 0.5))).astype(np.float32)
    logp[rng.integers(E)] = -np.inf  # an expert that is never chosen
    table = np.asarray(rt.alias_table(jnp.asarray(logp)))
    b = max(E - 1, 1).bit_length()
    T = 1 << (30 - b)
    own, alias = (table >> b).astype(np.int64), (table & ((1 << b) - 1)).astype(np.int64)
    own = np.where(alias == np.arange(E), T, own)  # a self-aliased bucket is all its own
    mass = own.copy()
    np.add.at(mass, alias, T - own)  # units each position receives, over all buckets
    p = np.exp(logp.astype(np.float64) - np.logaddexp.reduce(logp.astype(np.float64)))
    # by hand: E T units shared as floor(p E T) (p E T in float32: 24 bits), the remainder
    # to the largest; so within 16 E units (1e-6 of the total at E = 64) of p E T
    np.testing.assert_allclose(mass, p * E * T, atol=16 * E)
    assert mass.sum() == E * T and mass[np.argmin(logp)] == 0


def _pairs(ids: np.ndarray, E: int) -> np.ndarray:
    return np.bincount(ids[:, 0] * E + ids[:, 1], minlength=E * E) / len(ids)


@pytest.mark.parametrize("logp", [
    np.log([0.4, 0.3, 0.15, 0.1, 0.05]),  # mild skew
    np.array([0.0, -3.0, -3.5, -9.0, -12.0]),  # heavy: the first expert takes ~93%
    np.array([0.0, -40.0, -41.0, -45.0, -60.0]),  # a few hold all but 1e-17: Gumbel finishes
])
def test_popular_is_successive_sampling_like_gumbel_top_k(logp):
    # The ordered pair (first, second draw) has probability p_a p_b / (1 - p_a): compare
    # both samplers with it, each within 5 standard errors.
    n, E = 40_000, len(logp)
    p = np.exp(logp - np.logaddexp.reduce(logp))
    rest = [np.delete(p, a).sum() for a in range(E)]  # 1 - p_a, without cancellation
    expect = np.array([p[a] * p[b] / rest[a] if a != b else 0.0
                       for a in range(E) for b in range(E)])
    se = np.sqrt(expect * (1 - expect) / n) + 1 / n
    for sampler, seed in ((rt.popular, 5), (rt.popular_gumbel, 6)):
        ids = np.asarray(sampler(jax.random.key(seed), n, jnp.asarray(logp, jnp.float32), 3))
        assert _distinct_rows(ids) and ids.min() >= 0 and ids.max() < E
        assert np.all(np.abs(_pairs(ids, E) - expect) <= 5 * se), sampler.__name__


def test_popular_marginals_at_r1_scale():
    # Zipf(1.2) over R1's 256 experts, k = 8: each expert's share of tokens, both samplers
    # against each other, within 5 standard errors of their difference.
    E, k, n = 256, 8, 20_000
    logp = rt.zipf_logp(jax.random.key(0), E, 1.2)
    a = np.asarray(rt.popular(jax.random.key(1), n, logp, k))
    g = np.asarray(rt.popular_gumbel(jax.random.key(2), n, logp, k))
    assert _distinct_rows(a)
    fa, fg = (np.bincount(x.ravel(), minlength=E) / n for x in (a, g))
    se = np.sqrt((fa * (1 - fa) + fg * (1 - fg)) / n) + 1 / n
    assert np.all(np.abs(fa - fg) <= 5 * se)


def test_popular_with_no_tokens_and_k_equal_e():
    logp = jnp.log(jnp.array([0.7, 0.2, 0.1]))
    assert rt.popular(jax.random.key(0), 0, logp, 2).shape == (0, 2)
    ids = np.asarray(rt.popular(jax.random.key(0), 50, logp, 3))
    assert np.all(np.sort(ids, 1) == np.arange(3))


# --- popular_used: the experts used, straight from the draws (the Monte Carlo's path) ---------


def _used_both_ways(gen, key, n, E):
    """(experts used by gen.used, distinct ids gen draws) on n layer-samples, same keys."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
    used = np.asarray(jax.jit(jax.vmap(lambda kk: gen.used(kk, 0)))(keys))
    ids = np.asarray(jax.jit(jax.vmap(lambda kk: gen(kk, 0)))(keys))
    assert _distinct_rows(ids) and ids.min() >= 0 and ids.max() < E
    return used, np.array([len(np.unique(x)) for x in ids])


@pytest.mark.parametrize("spec,E,k,tokens", [
    ("zipf:1.2", 64, 4, 24),  # N_ue well below E, so it varies
    ("dirichlet:0.3", 64, 4, 24),
    ("zipf:0", 40, 6, 10),  # uniform popularity; E not a power of 2
])
def test_popular_used_counts_the_same_routing(spec, E, k, tokens):
    # Every token gets the same set both ways (the same counters, the same Gumbel noise
    # for the few finished by it), whichever stage of popular_used completes it: so every
    # layer-sample's count equals the distinct ids of popular_alias.
    gen = rt.layer_generator(parse_routing(spec), 1, tokens, E, k)
    used, counted = _used_both_ways(gen, jax.random.key(8), 200, E)
    np.testing.assert_array_equal(used, counted)


@pytest.mark.parametrize("plan", [(4, 0.0), (6, 1.0)])
def test_popular_used_is_exact_whatever_its_plan(plan):
    # The plan only splits the work: a first pass too short for most tokens, a room far
    # too small (the second stage's tokens overflow to the third and the Gumbel
    # finisher), or a room for all; the count is the distinct ids of popular_alias each
    # time. p: two experts with most of the mass, so many tokens repeat and go on.
    E, k, tokens = 24, 4, 300
    p = np.r_[40.0, 30.0, np.linspace(1, 0.05, E - 2)]
    logp = jnp.asarray(np.log(p / p.sum()), jnp.float32)
    table = rt.alias_table(logp)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(4), i))(jnp.arange(6))
    used = np.asarray(jax.jit(jax.vmap(lambda kk: rt.popular_used(
        kk, tokens, table, logp, k, plan)))(keys))
    ids = np.asarray(jax.jit(jax.vmap(lambda kk: rt.popular_alias(
        kk, tokens, table, logp, k)))(keys))
    np.testing.assert_array_equal(used, [len(np.unique(x)) for x in ids])
    assert used.min() < E  # the count varies: an equality that could fail


def test_draws_needed_is_the_coupon_collector_for_uniform_popularity():
    # Uniform p over E: after j distinct, a draw is new with probability (E - j) / E, so the
    # draws to k distinct average sum_j E / (E - j) (the coupon collector, by hand).
    E, k = 16, 6
    need = rt.draws_needed(np.ones(E), k, per_row=20000)
    expected = sum(E / (E - j) for j in range(k))
    variance = sum((j / E) / ((E - j) / E) ** 2 for j in range(k))  # geometric waits
    assert abs(need.mean() - expected) < 5 * np.sqrt(variance / need.size)
    assert need.min() == k  # never fewer than k
    # p = (0.99, 0.01), k = 2: past 4 k = 8 draws a token counts 9; it gets there when its
    # 8 draws are all one expert: probability 0.99^8 + 0.01^8.
    skew = rt.draws_needed(np.array([99.0, 1.0]), 2, per_row=4000)
    p9 = 0.99**8 + 0.01**8
    assert abs((skew == 9).mean() - p9) < 5 * np.sqrt(p9 * (1 - p9) / skew.size)
    assert skew.min() >= 2 and skew.max() == 9


@pytest.mark.parametrize("count,size", [(0, 8), (1, 8), (37, 8), (37, 64), (4096, 576), (300, 576)])
def test_compact_and_settle_against_numpy(count, size):
    n = 4096
    rng = np.random.default_rng(count + size)
    flags = np.zeros(n, bool)
    flags[rng.choice(n, count, replace=False)] = True
    words = jnp.asarray(np.packbits(flags.reshape(-1, 32)[:, ::-1], axis=1, bitorder="big")
                        .view(">u4").ravel().astype(np.uint32))
    rows = np.asarray(rt.compact(words, size, n))
    expect = np.flatnonzero(flags)[:size]
    np.testing.assert_array_equal(rows, np.r_[expect, np.full(size - len(expect), n)])
    still = rng.random(size) < 0.5
    after = np.asarray(rt._settle(words, jnp.asarray(still)))
    bits = ((after[:, None] >> np.arange(32)) & 1).astype(bool).ravel()
    flags[expect] = still[:len(expect)]
    np.testing.assert_array_equal(bits, flags)


def test_popular_used_finishes_heavy_skew_exactly(tmp_path):
    # Two experts hold all but 1e-12 of p, k = 4: nearly every token needs the Gumbel
    # finisher (stage 3) for its last two. Its last two experts are then drawn from the
    # rest in proportion to p: with p of experts 2..5 as 8:4:2:1 (and 6, 7 zero), compare
    # the number of experts used by 1 token with the exact law: the set is {0, 1} plus two
    # of {2..5} by successive sampling, so 4 always; with 3 tokens the union's size law
    # is checked against popular_gumbel (E scores per token) within standard errors.
    E, k = 8, 4
    hist = np.array([1.0, 1.0, 8e-12, 4e-12, 2e-12, 1e-12, 0.0, 0.0])
    np.save(tmp_path / "h.npy", hist)
    gen = rt.layer_generator(parse_routing(f"hist:{tmp_path / 'h.npy'}"), 1, 1, E, k)
    used, counted = _used_both_ways(gen, jax.random.key(1), 50, E)
    assert np.all(used == 4) and np.all(counted == 4)
    tokens, n = 3, 3000
    gen = rt.layer_generator(parse_routing(f"hist:{tmp_path / 'h.npy'}"), 1, tokens, E, k)
    used = np.asarray(jax.jit(jax.vmap(lambda kk: gen.used(kk, 0)))(
        jax.vmap(lambda i: jax.random.fold_in(jax.random.key(2), i))(jnp.arange(n))))
    with np.errstate(divide="ignore"):
        logp = jnp.asarray(np.log(hist / hist.sum()), jnp.float32)
    ref_ids = np.asarray(rt.popular_gumbel(jax.random.key(3), tokens * n, logp, k))
    ref_used = np.array([len(np.unique(x)) for x in ref_ids.reshape(n, tokens, k)])
    for v in range(4, 7):  # the union's size: 4, 5 or 6
        a, b = np.mean(used == v), np.mean(ref_used == v)
        assert abs(a - b) < 5 * math.sqrt((a * (1 - a) + b * (1 - b)) / n) + 1e-9, v


@pytest.mark.parametrize("E,n_group,topk_group,k", [
    (12, 4, 2, 3),  # groups of 3, two kept
    (8, 4, 1, 2),  # one group kept: both picks in it
    (6, 6, 3, 3),  # groups of one expert: a group's score is its one score
    (8, 2, 2, 4),  # every group kept: plain top-k
    (9, 3, 2, 5),  # k > a group: the merge takes a group to its end
])
def test_group_limited_is_the_gumbel_router(E, n_group, topk_group, k):
    # Order statistics (group_limited) against E Gumbel scores (group_limited_gumbel):
    # the frequency of every k-subset of experts, each within 5 standard errors of the
    # difference, and a chi-square over all subsets seen.
    n = 30_000
    a = np.sort(np.asarray(rt.group_limited(jax.random.key(1), n, E, k, n_group, topk_group)), -1)
    b = np.sort(np.asarray(rt.group_limited_gumbel(jax.random.key(2), n, E, k, n_group,
                                                   topk_group)), -1)
    assert _distinct_rows(a) and a.min() >= 0 and a.max() < E
    codes = lambda x: (x * E ** np.arange(k)).sum(-1)  # noqa: E731
    cells, ca = np.unique(codes(a), return_counts=True)
    fa = dict(zip(cells.tolist(), ca.tolist(), strict=True))
    cells, cb = np.unique(codes(b), return_counts=True)
    fb = dict(zip(cells.tolist(), cb.tolist(), strict=True))
    z = [(fa.get(c, 0) - fb.get(c, 0)) / math.sqrt(fa.get(c, 0) + fb.get(c, 0))
         for c in set(fa) | set(fb)]
    assert max(abs(x) for x in z) < 5
    chi2, dof = sum(x * x for x in z), len(z)  # mean dof, sd sqrt(2 dof)
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)


def test_group_limited_marginals_at_deepseek_scale():
    # DeepSeek-V3/R1: 8 groups of 32, 4 kept, top-8. Per expert its share of tokens and
    # per token the number of groups hit, both samplers within 5 standard errors.
    E, k, n = 256, 8, 20_000
    a = np.asarray(rt.group_limited(jax.random.key(5), n, E, k, 8, 4))
    g = np.asarray(rt.group_limited_gumbel(jax.random.key(6), n, E, k, 8, 4))
    assert _distinct_rows(a)
    fa, fg = (np.bincount(x.ravel(), minlength=E) / n for x in (a, g))
    se = np.sqrt((fa * (1 - fa) + fg * (1 - fg)) / n) + 1 / n
    assert np.all(np.abs(fa - fg) <= 5 * se)
    ha, hg = (np.array([len(set(r)) for r in (x // 32).tolist()]) for x in (a, g))
    assert abs(ha.mean() - hg.mean()) < 5 * math.sqrt((ha.var() + hg.var()) / n)


@pytest.mark.parametrize("a", [0.05, 0.3, 1.0, 2.5])  # boosted (a < 1) and not
def test_log_gamma_is_gamma(a):
    # Against numpy's Gamma sampler: the fraction below each of numpy's deciles, within 5
    # standard errors of the difference; mean a and variance a (Gamma(a, 1)).
    n = 100_000
    g = np.exp(np.asarray(rt.log_gamma(jax.random.key(1), n, a), np.float64))
    ref = np.random.default_rng(0).gamma(a, size=n)
    for q in np.quantile(ref, np.linspace(0.1, 0.9, 9)):
        fa, fr = np.mean(g < q), np.mean(ref < q)
        assert abs(fa - fr) < 5 * math.sqrt((fa * (1 - fa) + fr * (1 - fr)) / n), (a, q)
    assert abs(g.mean() - a) < 5 * math.sqrt(a / n)
    assert np.all(np.isfinite(np.asarray(rt.log_gamma(jax.random.key(2), 1000, a))))
