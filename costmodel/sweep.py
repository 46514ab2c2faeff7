"""Sweeps of the closed form inside jit, sharded over the available devices.

`formula(p)` is closed_form's model written in jax.numpy: the same formulas, term for
term (tests check it against `closed_form.evaluate` on random points), so that a grid
of 10^7 configurations runs as one compiled program and `jax.grad` can differentiate
it (`reference.sensitivities`). Every entry of `p` broadcasts against the others.

A grid is never materialized parameter by parameter: each axis enters the jitted kernel
as a small column shaped to broadcast along its own dimension, so only the outputs take
memory. The output grid is sharded along its longest axis over a 1-D mesh of all devices
(`jax.sharding.NamedSharding`), which splits the work across GPUs, or across the
simulated CPU devices in tests.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from moelab.costmodel.closed_form import activation_bytes
from moelab.costmodel.specs import (
    ModelSpec,
    Options,
    SpecError,
    SystemSpec,
    Workload,
    dtype_bytes,
)

# Parameters of `formula`, each a float array (SI units). `ep_ranks` = 0 means "no
# ranks": phi = fanout (1 in the seed); otherwise phi = fanout * phi_uniform(R, E, k),
# so `fanout` then scales the derived fan-out (its elasticity is d ln gamma / d ln phi).
# With ranks the sweep is one tier: every remote rank at B_net, the mean rank (closed_form
# with Options(dispatch_mode="flat", imbalance=False)); `moelab gamma` gives the two tiers
# and the busiest rank at one point.
PARAMS = (
    "tokens",  # [N_t] tokens per pass
    "n_experts",  # [E]
    "top_k",  # [k]
    "hidden",  # [d]
    "expert_intermediate",  # [I]
    "matrices",  # 3 for gated experts, 2 otherwise: S_E = matrices * d * I
    "f_e",  # bytes per expert parameter
    "f_dispatch",  # bytes per activation sent to experts
    "f_combine",  # bytes per activation returned
    "b_pcie",  # B/s
    "b_net",  # B/s
    "alpha_pcie",  # s per expert copy
    "alpha_net",  # s per collective
    "resident_fraction",  # [h]
    "fanout",  # [phi] or its multiplier when ep_ranks > 0
    "ep_ranks",  # [R] 0: none
    "uniform",  # 1: N_ue = E (1 - (1 - k/E)^N_t); 0: the seed's min(k N_t, E)
    "n_layers",  # [L]
    "passes",  # 1 for prefill, N_OS for decode
)

# The largest top-k `formula` handles when it derives a fan-out from ranks (a static bound).
K_MAX = 64


def formula(p: Mapping, k_max: int = K_MAX) -> dict:
    """The closed-form model in jax.numpy (closed_form.py's formulas). Returns arrays:

    n_ue, fanout, t_p_overhead, t_ep_overhead, gamma. `k_max` bounds top_k where a fan-out
    is derived from ranks; 0 says no configuration has ranks.
    """
    import jax.numpy as jnp

    N, E, k = p["tokens"], p["n_experts"], p["top_k"]
    worst = jnp.minimum(k * N, E)
    # E (1 - (1 - k/E)^N) as -expm1(N log1p(-k/E)), exact at N = 0 and at k = E (q = 1).
    # q_safe keeps log1p finite where q = 1, so that gradients stay finite there too.
    q = k / E
    q_safe = jnp.where(q >= 1, 0.5, q)
    hit = jnp.where(q >= 1, 1.0, -jnp.expm1(N * jnp.log1p(-q_safe)))
    uniform = jnp.where(N == 0, 0.0, E * hit)
    n_ue = jnp.where(p["uniform"] > 0, uniform, worst)

    R = p["ep_ranks"]
    phi = p["fanout"]
    if k_max:  # 0: no configuration has ranks, skip the product statically
        phi = phi * jnp.where(R > 0, fanout_uniform(R, E, k, k_max), 1.0)

    expert_bytes = p["matrices"] * p["hidden"] * p["expert_intermediate"] * p["f_e"]
    per_layer_p = (1 - p["resident_fraction"]) * n_ue * (p["alpha_pcie"] + expert_bytes / p["b_pcie"])
    payload = phi * N * p["hidden"] * (p["f_dispatch"] + p["f_combine"])
    # One EP rank: nothing is remote, no collective, no latency.
    per_layer_ep = jnp.where(R == 1, 0.0, 2 * p["alpha_net"] + payload / p["b_net"])
    scale = p["passes"] * p["n_layers"]
    t_p, t_ep = scale * per_layer_p, scale * per_layer_ep
    return {"n_ue": n_ue, "fanout": phi, "t_p_overhead": t_p, "t_ep_overhead": t_ep,
            "gamma": t_p / t_ep}


def fanout_uniform(R, E, k, k_max: int = K_MAX):
    """closed_form.fanout_uniform in jnp: (R-1)/R [(R - E mod R) hit(a) + (E mod R) hit(a+1)],
    a = floor(E/R), hit(m) = 1 - prod_{i<k} (E - m - i) / (E - i); exact when R does not divide E."""
    import jax.numpy as jnp

    R = jnp.maximum(R, 1.0)
    a = jnp.floor(E / R)
    big = E - a * R
    shape = jnp.broadcast_shapes(jnp.shape(R), jnp.shape(E), jnp.shape(k))
    miss_a, miss_b = jnp.ones(shape), jnp.ones(shape)
    for i in range(k_max):
        fa = jnp.clip((E - a - i) / (E - i), 0.0, 1.0)
        fb = jnp.clip((E - a - 1 - i) / (E - i), 0.0, 1.0)
        miss_a = jnp.where(i < k, miss_a * fa, miss_a)
        miss_b = jnp.where(i < k, miss_b * fb, miss_b)
    return (R - 1) / R * ((R - big) * (1 - miss_a) + big * (1 - miss_b))


def params_of(model: ModelSpec, system: SystemSpec, workload: Workload,
              options: Options | None = None) -> dict[str, float]:
    """`formula`'s parameters for one set of specs (what closed_form.evaluate sees)."""
    options = options or Options()
    f_dispatch, f_combine = activation_bytes(model, options)
    return {
        "tokens": float(workload.tokens_per_pass),
        "n_experts": float(model.n_experts),
        "top_k": float(model.top_k),
        "hidden": float(model.hidden),
        "expert_intermediate": float(model.expert_intermediate),
        "matrices": 3.0 if model.gated else 2.0,
        "f_e": model.f_e,
        "f_dispatch": f_dispatch,
        "f_combine": f_combine,
        "b_pcie": system.b_pcie,
        "b_net": system.b_net,
        "alpha_pcie": system.alpha_pcie,
        "alpha_net": system.alpha_net,
        "resident_fraction": options.resident_fraction,
        "fanout": float(options.fanout) if options.fanout is not None else 1.0,
        "ep_ranks": float(options.ep_ranks or 0),
        "uniform": 1.0 if options.routing == "uniform" else 0.0,
        "n_layers": float(model.n_moe_layers),
        "passes": float(workload.passes),
    }


# --- grids -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """One swept quantity: its name (a CSV column), the values it takes, and the formula
    parameters each value sets (a model sets E, k, d, I, ...; a dtype one byte count)."""

    name: str
    labels: tuple  # what the CSV shows for each value
    columns: dict  # formula parameter -> np.ndarray [len(labels)]

    def __len__(self) -> int:
        return len(self.labels)


def number_axis(name: str, param: str, values: Sequence[float], scale: float = 1.0) -> Axis:
    """A plain number; `scale` turns flag units into SI (GB/s -> B/s: 1e9)."""
    values = np.asarray(values, dtype=np.float64)
    labels = tuple(int(v) if v == int(v) and abs(v) < 2**53 else v.item() for v in values)
    return Axis(name, labels, {param: values * scale})


def dtype_axis(name: str, params: Sequence[str], dtypes: Sequence[str]) -> Axis:
    """A dtype setting one or more byte counts (act dtype: dispatch and combine)."""
    b = np.array([dtype_bytes(t, name) for t in dtypes])
    return Axis(name, tuple(dtypes), {p: b for p in params})


def model_axis(models: Sequence[ModelSpec]) -> Axis:
    col = lambda f: np.array([f(m) for m in models], dtype=np.float64)
    return Axis("model", tuple(m.name for m in models), {
        "n_experts": col(lambda m: m.n_experts), "top_k": col(lambda m: m.top_k),
        "hidden": col(lambda m: m.hidden), "expert_intermediate": col(lambda m: m.expert_intermediate),
        "matrices": col(lambda m: 3 if m.gated else 2), "f_e": col(lambda m: m.f_e),
        "f_dispatch": col(lambda m: m.f_a), "f_combine": col(lambda m: m.f_a),
        "n_layers": col(lambda m: m.n_moe_layers),
    })


def system_axis(systems: Sequence[SystemSpec]) -> Axis:
    col = lambda f: np.array([getattr(s, f) for s in systems], dtype=np.float64)
    return Axis("system", tuple(s.name for s in systems),
                {f: col(f) for f in ("b_pcie", "b_net", "alpha_pcie", "alpha_net")})


def grid_size(axes: Sequence[Axis]) -> int:
    return int(np.prod([len(a) for a in axes], dtype=np.int64))


def grid_labels(axes: Sequence[Axis]):
    """Rows of axis labels in the grid's flat order (last axis fastest)."""
    return itertools.product(*(a.labels for a in axes))


def evaluate_grid(base: Mapping[str, float], axes: Sequence[Axis],
                  outputs: Sequence[str] = ("gamma", "n_ue", "fanout", "t_p_overhead",
                                            "t_ep_overhead"),
                  devices=None) -> dict[str, np.ndarray]:
    """`formula` on the Cartesian product of `axes` over `base`, inside one jit.

    Returns each output as a flat array [n] in row-major order of the axes (the last
    varies fastest, as `grid_labels`). Where two axes set the same parameter, the later
    axis wins. The grid is split over a 1-D mesh of `devices` (default: all) along its
    longest axis.
    """
    return grid_kernel(base, axes, outputs, devices)()


def grid_kernel(base: Mapping[str, float], axes: Sequence[Axis], outputs: Sequence[str],
                devices=None):
    """A function () -> outputs over the grid, flat (compiled on the first call).

    Each axis's columns are shaped [1, .., n_i, .., 1] and `formula` broadcasts them
    into the grid: XLA fuses the whole model into one loop over the output, with no
    per-configuration index arithmetic or gathers. The longest axis is padded to a
    multiple of the device count and sharded (NamedSharding over a 1-D mesh), so each
    device computes its slab of the grid.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    missing = set(PARAMS) - set(base)
    if missing:
        raise SpecError(f"sweep: base parameters lack {sorted(missing)}")
    for a in axes:
        if not len(a):
            raise SpecError(f"sweep: {a.name} has no values")
        unknown = set(a.columns) - set(PARAMS)
        if unknown:
            raise SpecError(f"sweep: {a.name} sets unknown parameters {sorted(unknown)}")
    devices = list(devices if devices is not None else jax.devices())
    sizes = [len(a) for a in axes] or [1]
    split = int(np.argmax(sizes))
    padded = list(sizes)
    padded[split] = -(-sizes[split] // len(devices)) * len(devices)
    spec = [None] * len(padded)
    spec[split] = "grid"
    sharded = NamedSharding(Mesh(np.array(devices), ("grid",)), PartitionSpec(*spec))

    tables = []
    for i, a in enumerate(axes):
        shape = [1] * len(padded)
        shape[i] = padded[i]
        # Padding repeats the last value: valid configurations, trimmed afterwards.
        tables.append({c: np.pad(np.asarray(v, np.float32), (0, padded[i] - len(a)),
                                 mode="edge").reshape(shape) for c, v in a.columns.items()})
    consts = {c: np.float32(base[c]) for c in PARAMS}
    has_ranks = base["ep_ranks"] > 0 or any(np.any(a.columns.get("ep_ranks", 0) > 0) for a in axes)
    k_max = int(max([base["top_k"]] + [np.max(a.columns["top_k"]) for a in axes
                                      if "top_k" in a.columns])) if has_ranks else 0

    @partial(jax.jit, out_shardings=sharded)
    def kernel():
        p = {c: jnp.asarray(v) for c, v in consts.items()}
        for table in tables:  # a later axis overrides an earlier one
            p.update({c: jnp.asarray(v) for c, v in table.items()})
        res = formula(p, k_max)
        return {o: jnp.broadcast_to(res[o], padded) for o in outputs}

    def run() -> dict[str, np.ndarray]:
        res = kernel()
        trim = tuple(slice(0, n) for n in sizes)
        return {o: np.asarray(v)[trim].reshape(-1) for o, v in res.items()}

    run.sharding = sharded  # where the grid lives: tests check it spans the devices
    return run
