"""The whole gamma model computed from concrete routings, in JAX (docs/model.md).

A routing is int32 expert ids `[L, N_t, k]` (one forward pass; `routing.py` draws them).
From it, per layer, exact counts (no expectation formula anywhere):

    N_ue      experts used: the union of the tokens' expert sets, as bit words, popcounted
    n_e       tokens per expert: a scatter-add into [E]
    phi_t     remote EP ranks token t sends to: distinct ranks among its k experts, minus
              its own; experts e live on rank e R // E (contiguous blocks of E/R),
              token t on rank t R // N_t, rank r on node r // gpus_per_node
    nodes_t   remote nodes likewise (what per-node deduplication would send)

then the bytes each strategy moves and its time, with the closed form's structure:

    offload: (1 - h) N_ue,l experts of S_E f_E bytes each, + alpha_pcie per copy
    EP:      sum_t phi_t rows of d (f_dispatch + f_combine) bytes, + 2 alpha_net
    T_P - T_B  = passes sum_l (1-h) N_ue,l (alpha_pcie + S_E f_E / B_pcie)
    T_EP - T_B = passes sum_l (2 alpha_net + sum_t phi_t,l d (f_dispatch + f_combine) / B_net)
    gamma      = (T_P - T_B) / (T_EP - T_B)

Without EP ranks every token goes to `fanout` destinations (1: the seed). Each Monte Carlo
sample is one forward pass of L layers; decode's N_OS steps scale both overheads alike.

Public: `route_counts`, `rank_traffic`, `overheads`, `evaluate_routes`,
`gamma_distribution` (what `moelab gamma --samples` reports), `sensitivities`
(d ln gamma / d ln theta by jax.grad, for `moelab gamma --sensitivities`).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np

from moelab.costmodel import routing as rt
from moelab.costmodel.specs import ModelSpec, Options, SpecError, SystemSpec, Workload, parse_routing
from moelab.costmodel.sweep import formula, params_of

# --- counts of one layer -------------------------------------------------------------------


def home_ranks(tokens: int, ranks: int) -> jax.Array:
    """[N_t] rank holding each token: contiguous blocks, as shard_map splits a batch."""
    return (jnp.arange(tokens, dtype=jnp.int32) * ranks) // tokens


def expert_ranks(ids: jax.Array, n_experts: int, ranks: int) -> jax.Array:
    """Rank holding each expert id: contiguous blocks of E/R experts."""
    return (ids * ranks) // n_experts


def token_fanout(ids: jax.Array, n_experts: int, ranks: int,
                 gpus_per_node: int = 8) -> tuple[jax.Array, jax.Array]:
    """([N_t], [N_t]) remote ranks and remote nodes each token of ids [N_t, k] sends to."""
    cols = [ids[:, j] for j in range(ids.shape[1])]
    home = home_ranks(ids.shape[0], ranks)
    home_node = home // gpus_per_node
    r = [expert_ranks(c, n_experts, ranks) for c in cols]
    nodes = [c // gpus_per_node for c in r]
    hit_home = functools.reduce(jnp.logical_or, [c == home for c in r])
    hit_home_node = functools.reduce(jnp.logical_or, [c == home_node for c in nodes])
    remote = rt.count_set(rt.set_words(r, ranks)) - hit_home.astype(jnp.int32)
    n_nodes = -(-ranks // gpus_per_node)
    remote_nodes = rt.count_set(rt.set_words(nodes, n_nodes)) - hit_home_node.astype(jnp.int32)
    return remote, remote_nodes


def layer_stats(ids: jax.Array, n_experts: int, ranks: int = 0,
                gpus_per_node: int = 8) -> dict[str, jax.Array]:
    """Exact counts of one layer's routing ids [N_t, k] (ids in [0, E)), as scalars:

    n_used (experts used), remote_ranks and remote_nodes (summed over tokens; 0 without
    ranks). One variadic reduce over tokens ORs the used-expert words and adds the
    fan-outs: one pass, fused with the producer of the ids.
    """
    cols = [ids[:, j] for j in range(ids.shape[1])]
    ops = rt.set_words(cols, n_experts)
    W = len(ops)
    if ranks:
        ops += list(token_fanout(ids, n_experts, ranks, gpus_per_node))

    def combine(a, b):
        return (*(x | y for x, y in zip(a[:W], b[:W], strict=True)),
                *(x + y for x, y in zip(a[W:], b[W:], strict=True)))

    red = jax.lax.reduce(tuple(ops), tuple(jnp.zeros((), o.dtype) for o in ops), combine, (0,))
    zero = jnp.zeros((), jnp.int32)
    return {"n_used": rt.count_set(list(red[:W])),
            "remote_ranks": red[W] if ranks else zero,
            "remote_nodes": red[W + 1] if ranks else zero}


@partial(jax.jit, static_argnames=("n_experts", "ranks", "gpus_per_node"))
def route_counts(routes: jax.Array, n_experts: int, ranks: int = 0,
                 gpus_per_node: int = 8) -> dict[str, jax.Array]:
    """Counts of a routing [L, N_t, k]: n_used [L], tokens_per_expert [L, E],
    remote_ranks [L, N_t], remote_nodes [L, N_t] (zeros without ranks)."""
    L, N, _ = routes.shape
    out = {"n_used": jax.vmap(lambda ids: layer_stats(ids, n_experts)["n_used"])(routes)}
    if ranks:
        fan = jax.vmap(lambda ids: token_fanout(ids, n_experts, ranks, gpus_per_node))(routes)
        out["remote_ranks"], out["remote_nodes"] = fan
    else:
        out["remote_ranks"] = out["remote_nodes"] = jnp.zeros((L, N), jnp.int32)
    layer = jnp.broadcast_to(jnp.arange(L)[:, None, None], routes.shape)
    out["tokens_per_expert"] = jnp.zeros((L, n_experts), jnp.int32).at[layer, routes].add(1)
    return out


def token_tiers(ids, n_experts: int, ranks: int, gpus_per_node: int = 8) -> dict[str, np.ndarray]:
    """[N] per token of ids [N, k] (numpy): remote ranks on its own node (intra), remote ranks
    on other nodes (ranks_inter), remote nodes (nodes); homes and placement as token_fanout."""
    ids = np.asarray(ids, np.int64)
    N = ids.shape[0]
    home = np.arange(N) * ranks // max(N, 1)
    G = max(1, min(int(gpus_per_node), int(ranks)))
    dest = ids * ranks // n_experts
    hit = np.zeros((N, ranks), bool)
    hit[np.arange(N)[:, None], dest] = True
    hit[np.arange(N), home] = False
    same_node = (np.arange(ranks)[None, :] // G) == (home[:, None] // G)
    nodes = np.zeros((N, -(-ranks // G)), bool)
    nodes[np.arange(N)[:, None], dest // G] = True
    nodes[np.arange(N), home // G] = False
    return {"intra": (hit & same_node).sum(1), "ranks_inter": (hit & ~same_node).sum(1),
            "nodes": nodes.sum(1)}


def rank_loads(ids, n_experts: int, ranks: int, held: list[list[int]] | None = None) -> np.ndarray:
    """[R] token rows each rank receives from the other ranks, for ids [T, k] of all ranks'
    tokens (token t on rank t R // T, contiguous blocks: with T = R N_t every rank holds N_t).

    held: per rank the experts it holds (closed_form.eplb_placement, with replicas); default
    contiguous blocks. A replicated expert's tokens go to its replicas in turn (token t to
    replica t mod copies). A token sends one row to every remote rank it hits.
    """
    ids = jnp.asarray(ids, jnp.int32)
    T = ids.shape[0]
    if held is None:
        dest = (ids * ranks) // n_experts
    else:
        copies = np.zeros(n_experts, np.int32)
        table = np.zeros((n_experts, max(len(h) for h in held) * ranks), np.int32)
        for r, h in enumerate(held):
            for e in h:
                table[e, copies[e]] = r
                copies[e] += 1
        t = jnp.arange(T, dtype=jnp.int32)[:, None]
        dest = jnp.asarray(table)[ids, t % jnp.asarray(copies)[ids]]
    home = (jnp.arange(T, dtype=jnp.int32) * ranks) // T
    hit = jnp.zeros((T, ranks), jnp.int32).at[jnp.arange(T)[:, None], dest].max(1)
    hit = hit.at[jnp.arange(T), home].set(0)
    return np.asarray(hit.sum(0))


def busiest_rank(ids, n_experts: int, ranks: int, redundant: int = 0) -> dict[str, float]:
    """max / mean of `rank_loads` for one routing ids [T, k] of all ranks' tokens, with
    contiguous placement and (redundant > 0) with EPLB-like replicas placed from this
    routing's own expert counts (an oracle: the statistics EPLB would collect)."""
    from moelab.costmodel.closed_form import eplb_placement

    loads = rank_loads(ids, n_experts, ranks)
    out = {"imbalance": float(loads.max() / loads.mean()) if loads.mean() > 0 else 1.0}
    if redundant:
        counts = np.bincount(np.asarray(ids).reshape(-1), minlength=n_experts)
        held = eplb_placement(counts, ranks, redundant)
        rep = rank_loads(ids, n_experts, ranks, held)
        out["imbalance_redundant"] = float(rep.max() / rep.mean()) if rep.mean() > 0 else 1.0
        out["held"] = held
    return out


def rank_traffic(ids, n_experts: int, ranks: int) -> np.ndarray:
    """[R, R] token rows rank a sends to rank b for one layer's ids [N_t, k] (numpy): a token
    goes once to every rank holding one of its experts (experts on one rank share the row);
    ids of -1 (no expert: dropped or padding) go nowhere. The diagonal is what stays
    local; the off-diagonal sum is sum_t phi_t."""
    ids = np.asarray(ids, np.int64)
    N = ids.shape[0]
    hit = np.zeros((N, ranks + 1), np.int64)  # column R collects the -1 ids
    hit[np.arange(N)[:, None], np.where(ids >= 0, ids * ranks // n_experts, ranks)] = 1
    traffic = np.zeros((ranks, ranks), np.int64)
    np.add.at(traffic, np.arange(N) * ranks // max(N, 1), hit[:, :ranks])
    return traffic


# --- bytes and times ---------------------------------------------------------------------------


def overheads(n_used, destinations, p, nvlink_destinations=None, imbalance=1.0,
              b_nvlink=None) -> dict:
    """Bytes and times of both strategies from per-layer counts (jnp, broadcasts, vmaps).

    n_used [..., L] experts used per layer; destinations [..., L] token rows sent per layer
    and direction over the network (sum_t phi_t; N_t per layer in the seed); p:
    `sweep.params_of` fields. With EP tiers: nvlink_destinations [..., L] rows over NVLink
    at b_nvlink; each layer pays the slower leg, times `imbalance` (the busiest rank).
    """
    expert_bytes = p["matrices"] * p["hidden"] * p["expert_intermediate"] * p["f_e"]
    moved = (1 - p["resident_fraction"]) * n_used  # experts copied over the host link
    row = p["hidden"] * (p["f_dispatch"] + p["f_combine"])
    rows = p["fanout"] * destinations
    # .sum, not jnp.sum: numpy float64 inputs stay float64 (jax would make them float32).
    bytes_p = p["passes"] * (moved * expert_bytes).sum(-1)
    bytes_ep = p["passes"] * (rows * row).sum(-1)
    L = np.shape(n_used)[-1]
    t_p = p["passes"] * (moved * p["alpha_pcie"]).sum(-1) + bytes_p / p["b_pcie"]
    if nvlink_destinations is None:
        t_ep = p["passes"] * L * 2 * p["alpha_net"] + imbalance * bytes_ep / p["b_net"]
    else:
        per_layer = np.maximum(rows * row / p["b_net"], nvlink_destinations * row / b_nvlink)
        t_ep = p["passes"] * (L * 2 * p["alpha_net"] + imbalance * per_layer.sum(-1))
    return {"bytes_offload": bytes_p, "bytes_ep": bytes_ep, "t_p_overhead": t_p,
            "t_ep_overhead": t_ep, "gamma": _ratio(t_p, t_ep)}


def _ratio(a, b):
    """a / b where b may be 0 (one EP rank: nothing remote, gamma infinite): no warning."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return a / b


def gamma_spread(gamma: np.ndarray) -> dict[str, float]:
    """Mean, 5th and 95th percentiles and standard deviation of sampled gammas. Infinite
    gammas (one EP rank) give an infinite mean and NaN spread, quietly (null in JSON)."""
    with np.errstate(invalid="ignore"):
        return {"gamma_mean": float(gamma.mean()),
                "gamma_p05": float(np.percentile(gamma, 5)),
                "gamma_p95": float(np.percentile(gamma, 95)),
                "gamma_std": float(gamma.std(ddof=1)) if gamma.size > 1 else 0.0}


def _ep_rows(options: Options, remote_ranks, remote_nodes):
    """(network rows, NVLink rows) per layer from the exact per-layer sums, by dispatch mode."""
    if options.dispatch_mode == "flat":
        return remote_ranks, np.zeros_like(remote_ranks)
    if options.dispatch_mode == "per-node":
        return remote_nodes, remote_ranks  # each remote rank's copy crosses NVLink once
    raise SpecError("dispatch_mode: per-rank needs the inter-node rank count per token: "
                    "in the Monte Carlo only per-node and flat (the closed form has all three)")


def evaluate_routes(model: ModelSpec, system: SystemSpec, workload: Workload,
                    options: Options | None, routes, imbalance: float | None = None) -> dict:
    """The whole model for one concrete routing [L, N_t, k] of one forward pass.

    With EP ranks the EP overhead pays the busiest rank: `imbalance` if given (the Monte
    Carlo passes the one it measured with every rank holding N_t tokens), else measured on
    this routing with its N_t tokens spread over the R ranks (`busiest_rank`).
    """
    options = options or Options()
    routes = check_routes(routes, model, workload)
    R = options.ep_ranks or 0
    c = route_counts(routes, model.n_experts, R, system.gpus_per_node)
    N = routes.shape[1]
    # Exact integer counts; bytes and times in float64 on the host.
    n_used = np.asarray(c["n_used"], np.float64)
    dest = np.asarray(c["remote_ranks"], np.float64).sum(-1) if R else np.full(len(n_used), N, float)
    p = {name: np.float64(v) for name, v in params_of(model, system, workload, options).items()}
    if R > 1:
        p["fanout"] = np.float64(1.0)
        imb = 1.0 if not options.imbalance else imbalance if imbalance is not None else float(
            np.mean([busiest_rank(layer, model.n_experts, R)["imbalance"]
                     for layer in np.asarray(routes)]))
        net, nvl = _ep_rows(options, dest, np.asarray(c["remote_nodes"], np.float64).sum(-1))
        res = {name: float(v) for name, v in
               overheads(n_used, net, p, nvl, imb, system.b_nvlink).items()}
        res["imbalance"] = float(imb)
    elif R == 1:
        res = {name: float(v) for name, v in overheads(n_used, dest, p).items()}
        res.update(t_ep_overhead=0.0, gamma=float("inf"))
    else:
        res = {name: float(v) for name, v in overheads(n_used, dest, p).items()}
    res.update(
        n_ue=float(n_used.mean()),
        n_ue_per_layer=np.asarray(c["n_used"]),
        tokens_per_expert=np.asarray(c["tokens_per_expert"]),
        fanout=float(p["fanout"] * dest.mean() / N),
    )
    if R:
        res["fanout_nodes"] = float(np.asarray(c["remote_nodes"]).mean())
        tiers = [token_tiers(np.asarray(layer), model.n_experts, R, system.gpus_per_node)
                 for layer in np.asarray(routes)]
        res["fanout_intra"] = float(np.mean([t["intra"].mean() for t in tiers]))
        res["fanout_ranks_inter"] = float(np.mean([t["ranks_inter"].mean() for t in tiers]))
    return res


def check_routes(routes, model: ModelSpec, workload: Workload) -> jax.Array:
    routes = np.asarray(routes)
    L, N, k = model.n_moe_layers, workload.tokens_per_pass, model.top_k
    if routes.shape != (L, N, k):
        raise SpecError(f"routing: expected ids of shape [L={L}, N_t={N}, k={k}], "
                        f"got {routes.shape}")
    if routes.size and (routes.min() < 0 or routes.max() >= model.n_experts):
        raise SpecError(f"routing: expert ids must lie in [0, {model.n_experts})")
    return jnp.asarray(routes, jnp.int32)


# --- Monte Carlo -------------------------------------------------------------------------------

# Ids (or Gumbel scores) per compiled call: bounds memory whatever the sample count.
_CHUNK_ELEMENTS = 1 << 24


def sample_stats(gen: rt.Generator, key: jax.Array, samples: int, n_layers: int, tokens: int,
                 width: int, n_experts: int, ranks: int = 0,
                 gpus_per_node: int = 8, progress=None) -> dict[str, np.ndarray]:
    """Per-layer counts of `samples` forward passes: n_used, remote_ranks and remote_nodes
    (summed over tokens), each [samples, L].

    Sample s is the routing `routing.layers(gen, fold_in(key, s), L)`: layer-samples are
    independent, so they are flattened into one index m = s L + l and run in chunks of
    fixed size (one compilation) whose ids fit in `_CHUNK_ELEMENTS` (`width`: elements
    per token the generator touches, k for ids, E for scores; 1 without ranks for a
    generator that counts the experts used itself, `gen.used`).
    `progress(done, total)` in samples, after each chunk (which then waits for its result).
    """
    total = samples * n_layers
    if not ranks and hasattr(gen, "used"):
        width = 1  # counted straight from the draws: nothing per token is stored
    chunk = int(min(total, max(1, _CHUNK_ELEMENTS // max(1, tokens * width))))
    run = _stats_runner(gen, n_layers, n_experts, ranks, gpus_per_node)
    parts = []
    for start in range(0, total, chunk):
        m = jnp.minimum(jnp.arange(start, start + chunk, dtype=jnp.int32), total - 1)
        parts.append(run(key, m))
        if progress is not None:
            jax.block_until_ready(parts[-1])
            progress(min(start + chunk, total) // n_layers, samples)
    cols = [np.concatenate([np.asarray(p[i]) for p in parts])[:total] for i in range(3)]
    return {name: col.reshape(samples, n_layers)
            for name, col in zip(("n_used", "remote_ranks", "remote_nodes"), cols, strict=True)}


@lru_cache(maxsize=32)
def _stats_runner(gen: rt.Generator, n_layers: int, n_experts: int, ranks: int,
                  gpus_per_node: int):
    """The compiled Monte Carlo chunk, cached: one compilation per generator and shape."""

    # Without ranks only the experts used count: a generator may count them straight
    # from its draws (`used`, as routing.popular_used), never materializing the ids.
    used = getattr(gen, "used", None) if not ranks else None

    @jax.jit
    def run(key, m):
        def one(m):
            s, l = m // n_layers, m % n_layers
            key_l = jax.random.fold_in(jax.random.fold_in(key, s), l)
            if used is not None:
                zero = jnp.zeros((), jnp.int32)
                return used(key_l, l), zero, zero
            ids = gen(key_l, l)
            st = layer_stats(ids, n_experts, ranks, gpus_per_node)
            return st["n_used"], st["remote_ranks"], st["remote_nodes"]

        return jax.vmap(one)(m)

    return run


def rank_overheads(n_used, dest, remote_nodes, p: dict, options: Options, system: SystemSpec,
                   imbalance=1.0) -> dict:
    """The overheads of concrete per-layer counts, as the Monte Carlo and traces both use them.

    With R > 1 EP ranks: the two EP legs (network and NVLink, from the remote ranks and
    nodes per token) paced by the busiest rank (`imbalance`); with one rank nothing is
    remote (EP costs 0, gamma is infinite); without ranks, one destination per token as in
    the seed (`dest` then holds the tokens).
    """
    R = options.ep_ranks or 0
    if R > 1:
        net, nvl = _ep_rows(options, dest, np.asarray(remote_nodes, np.float64))
        return overheads(n_used, net, {**p, "fanout": np.float64(1.0)}, nvl, imbalance,
                         system.b_nvlink)
    res = overheads(n_used, dest, p)
    if R == 1:
        res = {**res, "t_ep_overhead": np.zeros(n_used.shape[:-1]),
               "gamma": np.full(n_used.shape[:-1], np.inf)}
    return res


def gamma_distribution(model: ModelSpec, system: SystemSpec, workload: Workload,
                       options: Options | None, routing: str, samples: int,
                       seed: int = 0, progress=None) -> dict:
    """gamma over `samples` sampled routings of one forward pass (Monte Carlo).

    routing: uniform | zipf:S | dirichlet:A | groups (model.n_group / topk_group) |
    logits:PATH.npy | hist:PATH.npy or .json. A logits file with exactly N_t tokens is
    evaluated as it is (one sample); otherwise its tokens are resampled.
    `progress(done, total)` is called as samples finish.
    """
    options = options or Options()
    spec = parse_routing(routing)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise SpecError(f"samples: must be an integer >= 1, got {samples!r}")
    L, N, E, k = model.n_moe_layers, workload.tokens_per_pass, model.n_experts, model.top_k
    R = options.ep_ranks or 0
    key = jax.random.key(seed)

    routes = rt.logits_routes(spec.path, L, E, k) if spec.kind == "logits" else None
    if routes is not None and routes.shape[1] == N:
        c = route_counts(jnp.asarray(routes), E, R, system.gpus_per_node)
        stats = {n: np.asarray(c[n]).reshape(1, L, -1).sum(-1)
                 for n in ("remote_ranks", "remote_nodes")}
        stats["n_used"] = np.asarray(c["n_used"]).reshape(1, L)
    else:
        gen = rt.layer_generator(spec, L, N, E, k, model.n_group, model.topk_group)
        # elements per token a chunk holds: ids; the skewed samplers' loop of draw rounds
        # keeps k arrays of ids and runs faster on small chunks (sample_stats: not when
        # they count straight from the draws)
        width = E if spec.kind in ("zipf", "dirichlet", "hist") else k
        stats = sample_stats(gen, key, samples, L, N, width, E, R, system.gpus_per_node,
                             progress)

    n_used = stats["n_used"].astype(np.float64)
    dest = stats["remote_ranks"].astype(np.float64) if R else np.full(n_used.shape, float(N))
    p = {name: np.float64(v) for name, v in params_of(model, system, workload, options).items()}
    busiest = {}
    if R > 1:
        busiest = _busiest_sampled(spec, model, workload, options, key, samples, routes)
        imb = busiest["imbalance_mean"] if options.imbalance else 1.0
        if options.redundant_experts and options.imbalance:
            imb = busiest["imbalance_redundant_mean"]
    else:
        imb = 1.0
    res = rank_overheads(n_used, dest, stats["remote_nodes"], p, options, system, imb)
    gamma = np.asarray(res["gamma"], np.float64)
    out = {
        **gamma_spread(gamma),
        "n_ue_mean": float(n_used.mean()),
        "n_ue_std": float(n_used.std(ddof=1)) if n_used.size > 1 else 0.0,
        "t_p_overhead_mean": float(np.mean(res["t_p_overhead"])),
        "t_ep_overhead_mean": float(np.mean(res["t_ep_overhead"])),
        "offload_win_fraction": float(np.mean(gamma < 1)),
        "ep_win_fraction": float(np.mean(gamma > 1)),
        "samples": int(gamma.size),
        "routing": str(spec),
    }
    if R:
        out["fanout_mean"] = float(dest.mean() / N)
        out["fanout_nodes_mean"] = float(stats["remote_nodes"].mean() / N)
    out.update(busiest)
    return out


# Sample-layers on which the busiest rank is measured (each draws R N_t tokens).
BUSIEST_SAMPLES = 16


@lru_cache(maxsize=32)
def _compiled(gen: rt.Generator):
    """gen compiled once, the layer index traced: run op by op, a skewed generator's loops
    over R N_t tokens cost ~0.8 s a layer (13 s of `gamma --routing zipf:1.2 --ep-ranks 32`)."""
    return jax.jit(gen)


def _busiest_sampled(spec, model: ModelSpec, workload: Workload, options: Options, key,
                     samples: int, routes=None) -> dict:
    """The busiest rank from concrete routings: every rank holds N_t tokens (R N_t drawn
    from the same layer distribution), max over ranks of rows received / mean, averaged over
    up to BUSIEST_SAMPLES sample-layers; with redundant experts also with EPLB-like replicas
    placed from each routing's own counts. A logits file evaluated as it is: its tokens
    are all ranks' tokens."""
    R, N, L, E, k = options.ep_ranks, workload.tokens_per_pass, model.n_moe_layers, \
        model.n_experts, model.top_k
    if routes is not None and routes.shape[1] == N:
        draws = [np.asarray(routes[l]) for l in range(min(L, BUSIEST_SAMPLES))]
    else:
        gen = rt.layer_generator(spec, L, R * N, E, k, model.n_group, model.topk_group)
        m = min(samples * L, BUSIEST_SAMPLES)
        draw = _compiled(gen)
        draws = [np.asarray(draw(jax.random.fold_in(jax.random.fold_in(key, i // L), i % L),
                                 i % L)) for i in range(m)]
    found = [busiest_rank(ids, E, R, options.redundant_experts) for ids in draws]
    out = {"imbalance_mean": float(np.mean([f["imbalance"] for f in found])),
           "imbalance_samples": len(found)}
    if options.redundant_experts:
        out["imbalance_redundant_mean"] = float(np.mean([f["imbalance_redundant"] for f in found]))
    return out


# --- sensitivities -----------------------------------------------------------------------------

# Parameters of `sweep.formula`, in the order they are reported; RANK_ONLY only with EP ranks.
SENSITIVITY_PARAMS = ("tokens", "b_pcie", "b_net", "alpha_pcie", "alpha_net", "hidden",
                      "expert_intermediate", "f_e", "f_dispatch", "f_combine", "fanout",
                      "resident_fraction", "n_experts", "top_k", "ep_ranks", "b_nvlink",
                      "gpus_per_node")
RANK_ONLY = ("ep_ranks", "b_nvlink", "gpus_per_node")
COUNTS = ("n_experts", "top_k", "ep_ranks", "gpus_per_node")  # whole numbers: differences
# Relative step of the forward difference of the host terms in N_t (float64 on the host).
TOKENS_STEP = 1e-4


def sensitivities(model: ModelSpec, system: SystemSpec, workload: Workload,
                  options: Options | None = None) -> dict[str, float]:
    """Elasticities d ln(gamma) / d ln(theta) of the model `moelab gamma` computes.

    Through `sweep.formula` (with EP ranks: the two tiers, the slower leg deciding, the
    busiest rank), N_ue by options.routing, every input's whole effect included:
    - continuous inputs by jax.grad (float32): links, latencies, sizes, dtypes, residency,
      fan-out and N_t. N_t also moves the busiest rank's imbalance, a host term (numpy,
      `sweep.HOST_TERMS`): it enters the differentiated formula to first order, with the
      slope of a forward difference at N_t (1 + 1e-4) (the imbalance is a sum over whole
      row counts: it steps where (R - 1) N_t crosses an integer and is smooth just above);
    - counts (E, k, R, G: expert placement is defined for whole ones) by a central
      difference of ln gamma over the neighbouring counts theta - 1 and theta + 1 (E +- R
      where R divides E, so that both neighbours keep an even placement), the whole
      model (N_ue, the tiers, the imbalance) recomputed at each; one-sided at a bound
      (k <= E, k >= 1, R >= 2: one rank moves nothing, G >= 1). Without ranks, E and k
      move only N_ue.
    A parameter at 0 (latencies, residency) has elasticity 0. `f_a` is the elasticity of
    the activation dtype: the sum over dispatch and combine of those that default to it.
    `fanout` is d ln gamma / d ln phi, also when phi is derived from EP ranks; `ep_ranks`,
    `b_nvlink` and `gpus_per_node` only with ranks. L, passes and T_B cancel in gamma and
    are not listed. Where gamma is 0 or infinite (h = 1, one EP rank) they are NaN.
    """
    from math import log, log1p

    from moelab.costmodel.sweep import HOST_TERMS, ep_host_terms

    options = options or Options()
    p = params_of(model, system, workload, options)
    names = [n for n in SENSITIVITY_PARAMS if n not in RANK_ONLY or options.ep_ranks]
    x = {n: jnp.float32(p[n]) for n in names if n not in COUNTS}
    fixed = {n: jnp.float32(v) for n, v in p.items() if n not in x}
    N = workload.tokens_per_pass
    ranks = bool(options.ep_ranks and options.ep_ranks > 1)
    up = ep_host_terms(model, system, options, N * (1 + TOKENS_STEP)) if ranks else p
    slope = {t: (up[t] - p[t]) / log1p(TOKENS_STEP) for t in HOST_TERMS}  # d term / d ln N_t

    def log_gamma(x):
        q = {**fixed, **x}
        step = jnp.log(x["tokens"]) - jnp.log(jnp.float32(p["tokens"]))  # 0 here, d/dN = 1/N
        q.update({t: q[t] + jnp.float32(slope[t]) * step for t in HOST_TERMS})
        return jnp.log(formula(q)["gamma"])

    grads = jax.grad(log_gamma)(x)
    # float32 gradients: six decimals are what they resolve (d cancels to 2e-7, not 0).
    out = {n: round(float(x[n] * grads[n]), 6) for n in x}

    def log_gamma_at(m=model, s=system, o=options) -> float:
        q = {n: jnp.float32(v) for n, v in params_of(m, s, workload, o).items()}
        return float(jnp.log(formula(q)["gamma"]))

    E, k = model.n_experts, model.top_k
    neighbours = {  # count -> (value, lowest, highest, log gamma at a count)
        "n_experts": (E, k, None, lambda e: log_gamma_at(  # groups need not divide E +- 1
            m=model.with_(n_experts=e, n_group=1, topk_group=1))),
        "top_k": (k, 1, E, lambda c: log_gamma_at(m=model.with_(top_k=c))),
        "ep_ranks": (options.ep_ranks, 2, None, lambda r: log_gamma_at(
            o=replace(options, ep_ranks=r))),
        "gpus_per_node": (system.gpus_per_node, 1, None, lambda g: log_gamma_at(
            s=system.with_(gpus_per_node=g))),
    }
    # E steps by R where R divides it: E +- 1 would split unevenly over the ranks, and the
    # busiest rank's one extra expert would swamp the trend (R1 on 32 ranks: -10 against -1).
    R = options.ep_ranks or 0
    e_step = R if R > 1 and E % R == 0 else 1
    for n in names:
        if n in COUNTS:
            value, lo, hi, at = neighbours[n]
            step = e_step if n == "n_experts" else 1
            a, b = max(value - step, lo), value + step if hi is None else min(value + step, hi)
            out[n] = round((at(b) - at(a)) / (log(b) - log(a)), 6) if b > a else float("nan")
    out = {n: out[n] for n in names}  # the documented order
    out["f_a"] = (out["f_dispatch"] * (options.dispatch_dtype is None)
                  + out["f_combine"] * (options.combine_dtype is None))
    return out
