"""DeepSeek's group-limited router: the exact expected remote nodes (costmodel/group_limited.py)
against Monte Carlo of the router itself (routing.group_limited), its bounds and identities."""

import math

import jax
import numpy as np
import pytest

from moelab.costmodel import closed_form as cf
from moelab.costmodel import group_limited as gl
from moelab.costmodel import reference as ref
from moelab.costmodel import routing as rt
from moelab.costmodel.specs import SpecError

CHUNK = 100_000  # tokens per router call (R1: 100 MB of scores)


def router_ids(E, k, n_group, topk_group, tokens, seed) -> np.ndarray:
    """[tokens, k] expert ids from routing.group_limited, drawn in chunks."""
    draw = jax.jit(lambda key, n: rt.group_limited(key, n, E, k, n_group, topk_group),
                   static_argnums=1)
    key = jax.random.key(seed)
    return np.concatenate([np.asarray(draw(jax.random.fold_in(key, i), min(CHUNK, tokens - i)))
                           for i in range(0, tokens, CHUNK)])


def contributing(ids, E, n_group) -> np.ndarray:
    """[tokens]: distinct groups among each token's experts."""
    groups = np.sort(ids // (E // n_group), axis=1)
    return 1 + (np.diff(groups, axis=1) != 0).sum(1)


@pytest.mark.parametrize("E,k,n_group,topk_group,nodes,tokens", [
    (256, 8, 8, 4, 8, 400_000),  # DeepSeek-R1 on EP64 (8 nodes of 8 GPUs): one group per node
    (256, 8, 8, 4, 4, 400_000),  # R1 on EP32: two groups per node, the whole law of J counts
    (12, 3, 4, 2, 2, 1_000_000),  # 3 experts per group, two groups per node
    (8, 2, 4, 2, 4, 1_000_000),  # 2 experts per group: the group score is both scores
    (24, 4, 6, 3, 3, 1_000_000),  # 4 experts per group, two groups per node
])
def test_exact_value_matches_router_monte_carlo(E, k, n_group, topk_group, nodes, tokens):
    ids = router_ids(E, k, n_group, topk_group, tokens, seed=E + k + nodes)
    x = ref.token_tiers(ids, E, nodes, 1)["nodes"]  # one rank per node: ranks are nodes
    se = x.std(ddof=1) / math.sqrt(tokens)
    exact = cf.fanout_nodes_group_limited(nodes, n_group, topk_group, E, k)
    assert abs(x.mean() - exact) < 3 * se, (x.mean(), se, exact)
    # the law of J, each probability within 4 of its standard errors (t + 1 comparisons)
    law = np.array(gl.contributing_groups(E, k, n_group, topk_group))
    freq = np.bincount(contributing(ids, E, n_group), minlength=topk_group + 1) / tokens
    se_j = np.sqrt(np.maximum(law * (1 - law), 1 / tokens) / tokens)
    assert np.all(np.abs(freq - law) < 4 * se_j), (freq, law)
    if E == 256:  # the router sits measurably below the every-kept-group-hit bound
        high = cf.fanout_nodes_group_limited_upper_bound(nodes, n_group, topk_group)
        assert high - x.mean() > 5 * se


def test_one_expert_per_group_is_plain_top_k():
    """m = 1: a group is an expert, so the kept groups are the t best experts and the token's
    k are the k best overall: J = k always and the picks a uniform k-subset. By hand for
    E = 6, k = 2 on 3 nodes of 2 experts: 2 (1 - C(4, 2) / C(6, 2)) = 2 (1 - 6/15) = 1.2."""
    E, k, n_group, topk_group, nodes, tokens = 6, 2, 6, 3, 3, 200_000
    assert gl.contributing_groups(E, k, n_group, topk_group) == (0.0, 0.0, 1.0, 0.0)
    exact = cf.fanout_nodes_group_limited(nodes, n_group, topk_group, E, k)
    assert exact == pytest.approx(1.2, rel=1e-12)
    assert exact == pytest.approx(cf.fanout_tiers(nodes, E, k, 1).nodes, rel=1e-12)
    ids = router_ids(E, k, n_group, topk_group, tokens, seed=1)
    assert np.all(contributing(ids, E, n_group) == k)
    x = ref.token_tiers(ids, E, nodes, 1)["nodes"]
    assert abs(x.mean() - exact) < 3 * x.std(ddof=1) / math.sqrt(tokens)


@pytest.mark.parametrize("E,k,n_group", [(256, 8, 8), (12, 3, 4), (32, 5, 8)])
def test_keeping_every_group_is_plain_top_k(E, k, n_group):
    """topk_group = n_group: the router is plain top-k of iid scores, a uniform k-subset,
    whose remote nodes fanout_tiers gives in closed form (checked there by enumeration)."""
    for nodes in (M for M in (2, 4, 8) if n_group % M == 0):
        want = cf.fanout_tiers(nodes, E, k, 1).nodes
        assert cf.fanout_nodes_group_limited(nodes, n_group, n_group, E, k) == pytest.approx(
            want, abs=1e-8)


def test_one_expert_or_every_kept_expert():
    """k = 1: one group, J = 1; a given node is hit with probability g / n_group = 1/M, so
    remote nodes = (M - 1)/M. k = topk_group x m: every kept group is hit, the upper bound."""
    assert cf.fanout_nodes_group_limited(4, 8, 4, 256, 1) == pytest.approx(3 / 4, rel=1e-12)
    assert gl.contributing_groups(256, 1, 8, 4) == (0.0, 1.0, 0.0, 0.0, 0.0)
    for nodes in (2, 4, 8):
        assert cf.fanout_nodes_group_limited(nodes, 8, 2, 64, 16) == pytest.approx(
            cf.fanout_nodes_group_limited_upper_bound(nodes, 8, 2), rel=1e-12)


@pytest.mark.parametrize("E,k,n_group,topk_group", [
    (256, 8, 8, 4), (256, 8, 8, 2), (256, 6, 8, 3), (12, 3, 4, 2), (8, 2, 4, 2), (64, 7, 8, 4)])
def test_exact_value_lies_between_the_bounds(E, k, n_group, topk_group):
    for nodes in (M for M in (2, 4, 8) if n_group % M == 0):
        exact = cf.fanout_nodes_group_limited(nodes, n_group, topk_group, E, k)
        low = cf.fanout_nodes_group_limited_lower_bound(nodes, n_group, topk_group, E, k)
        high = cf.fanout_nodes_group_limited_upper_bound(nodes, n_group, topk_group)
        assert low < exact < high, (nodes, low, exact, high)


def test_upper_bound_by_hand():
    """A node holds g = 8/M groups and is kept-free with probability C(8 - g, 4) / C(8, 4):
    8 nodes: 1 - 35/70 = 1/2, times 7 = 3.5; 4 nodes: 1 - 15/70, times 3 = 2.357..."""
    assert cf.fanout_nodes_group_limited_upper_bound(8, 8, 4) == pytest.approx(3.5, rel=1e-12)
    assert cf.fanout_nodes_group_limited_upper_bound(4, 8, 4) == pytest.approx(3 * (1 - 15 / 70),
                                                                             rel=1e-12)


@pytest.mark.parametrize("E,k,n_group,topk_group", [(256, 8, 8, 4), (12, 3, 4, 2), (24, 4, 6, 3)])
def test_quadrature_is_converged(E, k, n_group, topk_group):
    """The law sums to 1 and does not move when the quadrature is refined (1.5x the nodes
    per panel, 4/3 the panels)."""
    law = np.array(gl.contributing_groups(E, k, n_group, topk_group))
    fine = np.array(gl.contributing_groups(E, k, n_group, topk_group, nodes=12, panels=16))
    assert law.sum() == pytest.approx(1.0, abs=1e-8)
    assert np.all(np.abs(law - fine) < 1e-8)
    assert np.all(law >= -1e-12)


def test_bad_shapes_are_named():
    with pytest.raises(SpecError, match="^nodes:"):
        cf.fanout_nodes_group_limited(3, 8, 4, 256, 8)
    with pytest.raises(SpecError, match="^top_k:"):
        cf.fanout_nodes_group_limited(4, 8, 2, 16, 5)  # 2 groups of 2 experts < 5
    with pytest.raises(SpecError, match="^topk_group:"):
        gl.contributing_groups(256, 8, 8, 9)
    with pytest.raises(SpecError, match="^n_group:"):
        gl.contributing_groups(256, 8, 7, 4)


R1_TABLE = {8: "| 8 (EP64), one group per node |", 4: "| 4 (EP32), two groups per node |"}


def _model_md() -> str:
    from pathlib import Path

    return (Path(__file__).resolve().parent.parent / "docs" / "model.md").read_text()


def test_model_md_states_the_computed_figures():
    """docs/model.md's R1 table and percentages: exact value and bounds as the code gives them."""
    text = _model_md()
    for nodes, row in R1_TABLE.items():
        exact = cf.fanout_nodes_group_limited(nodes, 8, 4, 256, 8)
        low = cf.fanout_nodes_group_limited_lower_bound(nodes, 8, 4, 256, 8)
        high = cf.fanout_nodes_group_limited_upper_bound(nodes, 8, 4)
        line = next(line for line in text.splitlines() if line.startswith(row))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == f"{exact:.4f}" and cells[3] == f"{low:.4f}" and cells[4] == f"{high:.4f}"
        ep = f"EP{nodes * 8}"
        assert f"{(high - exact) / high:.1%} below it on {ep}" in text.replace("\n", " ") or \
            f"{(high - exact) / high:.1%} on {ep}" in text.replace("\n", " "), ep


@pytest.mark.slow
def test_model_md_monte_carlo_figures():
    """The Monte Carlo column of docs/model.md's R1 table: 1.6 M tokens of the router, seed 123."""
    text, tokens = _model_md(), 1_600_000
    for nodes, row in R1_TABLE.items():
        ids = router_ids(256, 8, 8, 4, tokens, seed=123)
        x = ref.token_tiers(ids, 256, nodes, 1)["nodes"]
        line = next(line for line in text.splitlines() if line.startswith(row))
        cell = [c.strip() for c in line.strip("|").split("|")][2]
        assert cell == f"{x.mean():.4f} ± {x.std(ddof=1) / math.sqrt(tokens):.4f}"


def test_gamma_reports_the_exact_value_beside_its_monte_carlo():
    """`moelab gamma --routing groups --ep-ranks 32`: the exact remote nodes sit within 4
    standard errors of the same call's sampled mean (58 layers x 2 x 256 tokens); nodes that
    split a group (EP24: 3 nodes, 8 groups) and other routings get no such key."""
    from moelab import api

    out = api.gamma("deepseek-r1", tokens=256, routing="groups", samples=2, ep_ranks=32)
    per_token_sd = 0.7  # remote nodes per token lie in [0, 3]; their sd is 0.57 (20k tokens)
    se = per_token_sd / math.sqrt(58 * 2 * 256)
    assert abs(out["fanout_nodes_group_limited"] - out["fanout_nodes_mean"]) < 4 * se
    assert out["fanout_nodes_group_limited"] < out["fanout_nodes"]  # uniform routing's is 2.71
    assert "fanout_nodes_group_limited" not in api.gamma("deepseek-r1", tokens=64, routing="groups",
                                                         samples=1, ep_ranks=24)
    assert "fanout_nodes_group_limited" not in api.gamma("deepseek-r1", tokens=64, routing="uniform",
                                                         samples=1, ep_ranks=32)
