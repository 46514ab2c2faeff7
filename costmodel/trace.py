"""Recorded routing traces: the format, windows of them, their exact statistics, fits.

A trace (docs/traces.md) is a JSON or .npz file with
    num_experts (E), top_k (k), layers (the model's MoE layer indices recorded),
    ids[layer][token] = [k expert ids] (-1: no expert, e.g. a dropped or padded slot),
    optional model, source, dataset, batch_sizes (tokens of each recorded forward pass).
Tokens are in the order they were processed; every recorded layer has the same tokens.

`windows(trace, N)` cuts it into non-overlapping windows of N consecutive tokens from
token 0 (an incomplete tail is dropped); `window_stats` gives, per window and layer, the
exact N_ue, the remote EP ranks summed over tokens (fan-out) and the max-rank load, the
first two from the JAX reference's per-layer statistics (`reference.layer_stats`,
`reference.token_fanout`). `fit_zipf` and `fit_dirichlet` fit the generators of
`routing.py` to a trace's histogram by maximum likelihood.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moelab.costmodel.jsonfile import read_json
from moelab.costmodel.specs import SpecError


@dataclass(frozen=True)
class Trace:
    num_experts: int
    top_k: int
    layers: tuple[int, ...]
    ids: np.ndarray = field(repr=False)  # [L_rec, T, k] int32, -1 allowed
    model: str = ""
    source: str = ""
    dataset: str = ""
    batch_sizes: tuple[int, ...] | None = None
    path: str = ""

    @property
    def tokens(self) -> int:
        return int(self.ids.shape[1])


def _fail(path: str, what: str):
    raise SpecError(f"routing: trace {path!r}: {what}")


def load(path: str) -> Trace:
    """Read and validate a trace (.json or .npz); every defect is a SpecError naming it."""
    p = Path(path)
    if not p.is_file():
        _fail(path, "no such file")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                raw = {name: z[name] for name in z.files}
            raw = {n: (v.item() if v.ndim == 0 else v) for n, v in raw.items()}
        else:  # size, encoding, depth and truncation: one line
            raw = read_json(p, "routing: trace")
    except (OSError, ValueError) as e:
        _fail(path, f"cannot read it: {e}")
    if not isinstance(raw, dict):
        _fail(path, "must be an object with num_experts, top_k, layers and ids")
    return from_dict(raw, path)


def from_dict(raw: dict, path: str = "<trace>") -> Trace:
    for name in ("num_experts", "top_k", "layers", "ids"):
        if name not in raw:
            _fail(path, f"missing field {name!r}")
    E, k = raw["num_experts"], raw["top_k"]
    for name, v in (("num_experts", E), ("top_k", k)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            _fail(path, f"{name} must be an integer >= 1, got {v!r}")
    E, k = int(E), int(k)
    if k > E:
        _fail(path, f"top_k {k} exceeds num_experts {E}")
    layers = np.asarray(raw["layers"]).reshape(-1)
    if layers.size == 0 or layers.dtype.kind not in "iu" or np.any(layers < 0):
        _fail(path, f"layers must be a non-empty list of layer indices >= 0, got {raw['layers']!r}")
    if len(set(layers.tolist())) != layers.size:
        _fail(path, "layers has repeated indices")
    try:
        ids = np.asarray(raw["ids"])
    except ValueError:
        _fail(path, "ids must be [layer][token][k]: layers of different token counts or "
                    "tokens of different id counts")
    if ids.ndim == 2 and ids.shape[0] == 0:
        ids = ids.reshape(0, 0, k)
    if ids.ndim != 3 or ids.dtype.kind not in "iu":
        _fail(path, f"ids must be integers [layer][token][k], got shape {ids.shape} ({ids.dtype}); "
                    "every layer needs the same tokens")
    if ids.shape[0] != layers.size:
        _fail(path, f"ids has {ids.shape[0]} layers, layers lists {layers.size}")
    if ids.shape[2] != k:
        _fail(path, f"ids has {ids.shape[2]} ids per token, top_k is {k}")
    if ids.size and (ids.min() < -1 or ids.max() >= E):
        _fail(path, f"expert ids must lie in [0, {E}) or be -1, found {ids.min()}..{ids.max()}")
    valid = ids >= 0
    s = np.sort(np.where(valid, ids, -1 - np.arange(k)), axis=-1)  # -1s made distinct
    if ids.size and np.any(s[..., 1:] == s[..., :-1]):
        _fail(path, "a token lists the same expert twice")
    batch = raw.get("batch_sizes")
    if batch is not None:
        batch = np.asarray(batch).reshape(-1)
        if batch.dtype.kind not in "iu" or np.any(batch < 1) or batch.sum() != ids.shape[1]:
            _fail(path, f"batch_sizes must be integers >= 1 summing to the {ids.shape[1]} tokens")
        batch = tuple(int(b) for b in batch)
    text = {n: str(raw.get(n, "") or "") for n in ("model", "source", "dataset")}
    return Trace(E, k, tuple(int(x) for x in layers), ids.astype(np.int32), batch_sizes=batch,
                 path=path, **text)


def to_dict(tr: Trace) -> dict:
    out = {"model": tr.model, "source": tr.source, "dataset": tr.dataset,
           "num_experts": tr.num_experts, "top_k": tr.top_k, "layers": list(tr.layers),
           "tokens": tr.tokens, "ids": tr.ids.tolist()}
    if tr.batch_sizes is not None:
        out["batch_sizes"] = list(tr.batch_sizes)
    return out


def check_model(tr: Trace, n_experts: int, top_k: int, n_layers: int) -> None:
    """A trace must come from a model with this E and k, and at most its L layers."""
    if tr.num_experts != n_experts or tr.top_k != top_k:
        raise SpecError(f"routing: trace {tr.path!r} has E={tr.num_experts}, k={tr.top_k}; "
                        f"the model has E={n_experts}, k={top_k}")
    if len(tr.layers) > n_layers or max(tr.layers) >= n_layers:
        raise SpecError(f"routing: trace {tr.path!r} records layers {min(tr.layers)}.."
                        f"{max(tr.layers)}; the model has {n_layers} MoE layers")


def windows(tr: Trace, size: int) -> np.ndarray:
    """[W, L_rec, size, k]: non-overlapping windows of `size` consecutive tokens from token
    0; an incomplete tail is dropped."""
    if size < 1:
        raise SpecError(f"tokens: a window needs >= 1 token, got {size}")
    W = tr.tokens // size
    if W == 0:
        raise SpecError(f"tokens: the trace {tr.path!r} has {tr.tokens} tokens, fewer than "
                        f"one window of {size}")
    ids = tr.ids[:, :W * size].reshape(len(tr.layers), W, size, tr.top_k)
    return ids.transpose(1, 0, 2, 3)


def batch_windows(tr: Trace) -> list[np.ndarray]:
    """The recorded forward passes ([L_rec, n_b, k] each), from batch_sizes."""
    if tr.batch_sizes is None:
        raise SpecError(f"tokens: the trace {tr.path!r} has no batch_sizes to use as windows")
    edges = np.cumsum((0, *tr.batch_sizes))
    return [tr.ids[:, a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)]


def window_stats(win: np.ndarray, n_experts: int, ranks: int = 0,
                 gpus_per_node: int = 8) -> dict[str, np.ndarray]:
    """Exact counts of windows [W, L, N, k] (ids -1 allowed), each [W, L]:
    n_used, remote_ranks (summed over tokens; 0 without ranks), max_rank_load (the most
    (token, expert) pairs any EP rank serves; per expert without ranks).

    -1 ids: for N_ue they become a dummy expert E that is not counted; for the fan-out
    they are `filled` (the same ranks, and none for a token without experts).
    """
    import jax
    import jax.numpy as jnp

    from moelab.costmodel.reference import layer_stats, token_fanout

    W, L, N, k = win.shape
    E = n_experts
    flat = np.asarray(win, np.int32).reshape(W * L, N, k)
    missing = flat < 0
    dummy = np.where(missing, E, flat)
    n_used = np.asarray(jax.jit(jax.vmap(lambda ids: layer_stats(ids, E + 1)["n_used"]))(
        jnp.asarray(dummy)))
    n_used = n_used - missing.reshape(W * L, -1).any(-1)  # the dummy expert is not one
    remote = nodes = np.zeros(W * L, np.int64)
    if ranks:
        filled = np.stack([fill_missing(ids, E, ranks) for ids in flat])
        remote, nodes = (np.asarray(a).sum(-1) for a in jax.jit(jax.vmap(
            lambda ids: token_fanout(ids, E, ranks, gpus_per_node)))(jnp.asarray(filled)))
    groups = ranks or E
    owner = np.where(missing, groups, flat.astype(np.int64) * groups // E)
    load = np.zeros((W * L, groups + 1), np.int64)
    np.add.at(load, (np.arange(W * L)[:, None, None], owner), 1)
    return {"n_used": n_used.reshape(W, L), "remote_ranks": remote.reshape(W, L),
            "remote_nodes": nodes.reshape(W, L),
            "max_rank_load": load[:, :groups].max(-1).reshape(W, L)}


def fill_missing(ids: np.ndarray, n_experts: int, ranks: int) -> np.ndarray:
    """ids [T, k] without -1s and with the same EP traffic: a token's -1s repeat its first
    real id (the same set of ranks); a token with none gets an expert of its own home rank
    (t R // T), which sends no row. For the reference's rank counts, which need ids >= 0."""
    ids = np.asarray(ids)
    T = ids.shape[0]
    if T == 0:
        return ids
    real = ids >= 0
    first = ids[np.arange(T), np.argmax(real, -1)]
    home = np.arange(T) * ranks // T
    first = np.where(real.any(-1), first, -(-home * n_experts // ranks))
    return np.where(real, ids, first[:, None]).astype(np.int32)


def histogram(tr: Trace) -> np.ndarray:
    """[L_rec, E] how often each expert was chosen, per recorded layer."""
    h = np.zeros((len(tr.layers), tr.num_experts + 1), np.int64)
    np.add.at(h, (np.arange(len(tr.layers))[:, None, None], np.where(tr.ids < 0, tr.num_experts,
                                                                      tr.ids)), 1)
    return h[:, :tr.num_experts]


# --- maximum-likelihood fits to the histogram --------------------------------------------------


def _argmax(f, lo: float, hi: float) -> float:
    """argmax of a unimodal f on [lo, hi] (Brent's bounded search). The log-likelihoods
    below are flat to rounding near their argmax: this search and a golden-section one
    agreed to 8e-7 relative on Dirichlet fits, as far as rounding lets any two agree."""
    from scipy.optimize import minimize_scalar

    return float(minimize_scalar(lambda x: -f(x), bounds=(lo, hi), method="bounded",
                                 options={"xatol": 1e-10}).x)


def zipf_loglik(hist: np.ndarray, s: float) -> float:
    """log-likelihood of counts [L, E] as draws from p_r ~ r^-s, r the expert's rank by
    count in its layer (the ranking that maximizes the likelihood for s >= 0)."""
    from scipy.special import logsumexp

    h = -np.sort(-np.asarray(hist, np.float64), axis=-1)
    E = h.shape[-1]
    logp = -s * np.log(np.arange(1, E + 1))
    logp -= logsumexp(logp)
    return float((h * logp).sum())


def fit_zipf(hist: np.ndarray) -> float:
    """Maximum-likelihood Zipf exponent s in [0, 10] for the histogram [L, E]."""
    return _argmax(lambda s: zipf_loglik(hist, s), 0.0, 10.0)


def dirichlet_loglik(hist: np.ndarray, a: float) -> float:
    """log-likelihood of counts [L, E] under a Dirichlet(a)-multinomial per layer:
    sum_l lgamma(E a) - lgamma(n_l + E a) + sum_e lgamma(c_le + a) - lgamma(a)."""
    from scipy.special import gammaln as lg

    h = np.asarray(hist, np.float64)
    E, n = h.shape[-1], h.sum(-1)
    return float((lg(E * a) - lg(n + E * a)).sum() + (lg(h + a) - lg(a)).sum())


def fit_dirichlet(hist: np.ndarray) -> float:
    """Maximum-likelihood Dirichlet concentration a in [1e-3, 1e4] (searched in log a)."""
    return math.exp(_argmax(lambda x: dirichlet_loglik(hist, math.exp(x)),
                            math.log(1e-3), math.log(1e4)))


# --- how well the generators reproduce a trace (`moelab trace fit`) -------------------------------

FIT_TOKENS = (4, 16, 64, 256)


def _generator_stats(routing: str, E: int, k: int, N: int, ranks: int, samples: int,
                     seed: int) -> tuple[float, float]:
    """(mean N_ue, mean max-rank load) over `samples` layers of N tokens drawn by `routing`."""
    import jax

    from moelab.costmodel import routing as rt
    from moelab.costmodel.specs import parse_routing

    gen = rt.layer_generator(parse_routing(routing), 1, N, E, k)
    ids = jax.jit(lambda key: rt.layers(gen, key, samples))(jax.random.key(seed))
    st = window_stats(jax.device_get(ids)[:, None], E, ranks)
    return float(st["n_used"].mean()), float(st["max_rank_load"].mean())


def fit(path: str, ranks: int | None = None, samples: int = 200, seed: int = 0) -> dict:
    """The fitted parameters and, per N_t, the trace's N_ue and max-rank load against
    uniform (N_ue in closed form), fitted Zipf and fitted Dirichlet, with relative errors."""
    from moelab.costmodel import closed_form as cf

    t = load(path)
    E, k = t.num_experts, t.top_k
    R = min(8, E) if ranks is None else ranks
    if R < 1 or R > E:
        raise SpecError(f"ep_ranks: must be in [1, E={E}], got {R}")
    if samples < 1:
        raise SpecError(f"samples: must be >= 1, got {samples}")
    h = histogram(t)
    s, a = fit_zipf(h), fit_dirichlet(h)
    gens = {"uniform": "uniform", "zipf": f"zipf:{s:.6g}", "dirichlet": f"dirichlet:{a:.6g}"}
    rows = []
    for N in FIT_TOKENS:
        if t.tokens < N:
            rows.append({"tokens": N, "windows": 0})
            continue
        st = window_stats(windows(t, N), E, R)
        row = {"tokens": N, "windows": int(st["n_used"].shape[0]),
               "trace_n_ue": float(st["n_used"].mean()),
               "trace_max_rank_load": float(st["max_rank_load"].mean())}
        for name, routing in gens.items():
            n_ue, rank_load = _generator_stats(routing, E, k, N, R, samples, seed)
            if name == "uniform":
                n_ue = float(cf.n_used_uniform(N, k, E))  # exact expectation
            row[f"{name}_n_ue"] = n_ue
            row[f"{name}_n_ue_error"] = n_ue / row["trace_n_ue"] - 1
            row[f"{name}_max_rank_load"] = rank_load
            row[f"{name}_max_rank_load_error"] = rank_load / row["trace_max_rank_load"] - 1
        rows.append(row)
    return {"file": path, "model": t.model, "num_experts": E, "top_k": k,
            "layers": len(t.layers), "tokens": t.tokens, "ep_ranks": R,
            "zipf_s": s, "dirichlet_a": a, "samples": samples, "rows": rows}


# --- gamma from a trace ------------------------------------------------------------------------


def _pass_stats(tr: Trace, ranks: int, gpus_per_node: int) -> tuple[dict, np.ndarray]:
    """window_stats of the recorded passes (batch_sizes), and each pass's tokens [W]."""
    passes = batch_windows(tr)
    sizes = np.array([b.shape[1] for b in passes])
    out = {n: np.zeros((len(passes), len(tr.layers)), np.int64)
           for n in ("n_used", "remote_ranks", "remote_nodes", "max_rank_load")}
    for n in np.unique(sizes):  # one count per pass size
        at = np.flatnonzero(sizes == n)
        st = window_stats(np.stack([passes[i] for i in at]), tr.num_experts, ranks, gpus_per_node)
        for name, v in st.items():
            out[name][at] = v
    return out, sizes


# Windows (x layers) on which the busiest rank is measured, as the Monte Carlo's BUSIEST_SAMPLES.
BUSIEST_WINDOWS = 16


def _busiest(tr: Trace, ranks: int, tokens: int, options) -> dict:
    """The busiest EP rank from the trace itself: windows of R N_t consecutive tokens (every
    rank holds N_t of them), max over ranks of rows received / mean, averaged over up to
    BUSIEST_WINDOWS window-layers. A trace shorter than R N_t tokens measures none (then
    the ranks count as balanced, and `imbalance_note` says so)."""
    from moelab.costmodel.reference import busiest_rank

    W = tr.tokens // (ranks * tokens)
    if W == 0:
        return {"imbalance_note": f"the trace's {tr.tokens} tokens are fewer than {ranks} ranks "
                                  f"x {tokens}: no busiest rank measured, ranks taken as balanced"}
    found = []
    for i in range(min(W * len(tr.layers), BUSIEST_WINDOWS)):
        w, l = divmod(i, len(tr.layers))
        ids = fill_missing(tr.ids[l, w * ranks * tokens:(w + 1) * ranks * tokens],
                           tr.num_experts, ranks)
        found.append(busiest_rank(ids, tr.num_experts, ranks, options.redundant_experts))
    out = {"imbalance_mean": float(np.mean([f["imbalance"] for f in found])),
           "imbalance_samples": len(found)}
    if options.redundant_experts:
        out["imbalance_redundant_mean"] = float(np.mean([f["imbalance_redundant"] for f in found]))
    return out


def trace_distribution(model, system, workload, options, path: str,
                       recorded_passes: bool = False) -> dict:
    """gamma over a trace's windows, as `reference.gamma_distribution` reports a Monte
    Carlo: each window of N_t tokens (prefill) or of the batch (decode) is one forward
    pass, its recorded layers counted exactly. With recorded_passes, the windows are the
    passes the trace recorded (batch_sizes), each with its own token count. A trace with
    fewer layers than the model stands for all L: the overheads are those of its layers
    scaled by L / L_rec (gamma, a ratio, is theirs), and the result says so
    (`trace_layers_note`)."""
    from moelab.costmodel.reference import gamma_spread, rank_overheads
    from moelab.costmodel.sweep import params_of

    tr = load(path)
    L = model.n_moe_layers
    check_model(tr, model.n_experts, model.top_k, L)
    R = options.ep_ranks or 0
    if recorded_passes:
        st, sizes = _pass_stats(tr, R, system.gpus_per_node)
    else:
        st = window_stats(windows(tr, workload.tokens_per_pass), model.n_experts, R,
                          system.gpus_per_node)
        sizes = np.full(st["n_used"].shape[0], workload.tokens_per_pass)
    N = sizes[:, None].astype(np.float64)  # tokens of each window
    n_used = st["n_used"].astype(np.float64)  # [W, L_rec]
    dest = st["remote_ranks"].astype(np.float64) if R else np.broadcast_to(N, n_used.shape)
    p = {name: np.float64(v) for name, v in params_of(model, system, workload, options).items()}
    busiest = {}
    imb = 1.0
    if R > 1:  # as the Monte Carlo: the two EP legs, paced by the busiest rank
        busiest = _busiest(tr, R, workload.tokens_per_pass, options)
        if options.imbalance and "imbalance_mean" in busiest:
            imb = busiest.get("imbalance_redundant_mean", busiest["imbalance_mean"])
    res = rank_overheads(n_used, dest, st["remote_nodes"], p, options, system, imb)
    scale = L / len(tr.layers)
    gamma = np.asarray(res["gamma"], np.float64)
    W = n_used.shape[0]
    out = {
        **gamma_spread(gamma),
        "n_ue_mean": float(n_used.mean()),
        "n_ue_p05": float(np.percentile(n_used, 5)),
        "n_ue_p95": float(np.percentile(n_used, 95)),
        "n_ue_std": float(n_used.std(ddof=1)) if n_used.size > 1 else 0.0,
        "max_rank_load_mean": float(st["max_rank_load"].mean()),
        "t_p_overhead_mean": float(np.mean(res["t_p_overhead"]) * scale),
        "t_ep_overhead_mean": float(np.mean(res["t_ep_overhead"]) * scale),
        "offload_win_fraction": float(np.mean(gamma < 1)),
        "ep_win_fraction": float(np.mean(gamma > 1)),
        "samples": int(W),
        "trace": {"path": path, "model": tr.model, "source": tr.source, "dataset": tr.dataset,
                  "tokens": tr.tokens, "windows": int(W),
                  "window_tokens": int(sizes[0]) if not recorded_passes else "recorded passes",
                  "dropped_tokens": int(tr.tokens - sizes.sum()), "layers": len(tr.layers),
                  "model_layers": L},
    }
    if len(tr.layers) < L:
        out["trace_layers_note"] = (f"the trace records {len(tr.layers)} of the model's {L} MoE "
                                    f"layers; their statistics stand for all {L}")
    if R:
        out["fanout_mean"] = float(dest.sum() / (N.sum() * dest.shape[1]))
        out["fanout_nodes_mean"] = float(st["remote_nodes"].sum() / (N.sum() * dest.shape[1]))
    out.update(busiest)
    return out


def window_means(tr: Trace, tokens: int, ranks: int = 0, gpus_per_node: int = 8) -> dict:
    """A trace's means at windows of `tokens`, as `trace_distribution` counts them: n_ue
    (N_ue over windows and recorded layers), fanout and fanout_nodes (remote ranks and
    nodes per token; 0 without ranks), imbalance (the busiest rank, `_busiest`; 1 with
    fewer than two ranks or where the trace is shorter than R N_t tokens, then with a
    `note`). What `moelab sweep --routing trace:` feeds its formula at each N_t."""
    from moelab.costmodel.specs import Options

    st = window_stats(windows(tr, tokens), tr.num_experts, ranks, gpus_per_node)
    pairs = tokens * st["n_used"].size  # tokens x windows x layers
    out = {"n_ue": float(st["n_used"].mean()),
           "fanout": float(st["remote_ranks"].sum() / pairs) if ranks else 0.0,
           "fanout_nodes": float(st["remote_nodes"].sum() / pairs) if ranks else 0.0,
           "imbalance": 1.0}
    if ranks > 1:
        busiest = _busiest(tr, ranks, tokens, Options(ep_ranks=ranks))
        out["imbalance"] = busiest.get("imbalance_mean", 1.0)
        if "imbalance_note" in busiest:
            out["note"] = f"trace {tr.path!r}: {busiest['imbalance_note']}"
    return out
