"""Expert parallelism executed: a `jax.shard_map` MoE layer whose dispatch and combine are
`lax.all_to_all` collectives, and the bytes it sends counted against the model.

Layout on R devices (mesh axis "ep"): tokens in contiguous blocks of N_t/R per device
(as `reference.home_ranks`), experts in contiguous blocks of E/R (`reference.expert_ranks`).
Per device:

1. dispatch: a token goes once to every rank holding one of its k experts (never twice to
   one rank: the model's fan-out phi_t counts distinct ranks). The send buffer has a block
   of `capacity` rows per destination; a token takes the next free row of each block it
   needs, in token order. Past the capacity it is dropped for that rank (counted).
   The rows travel with their metadata (local expert ids and gate weights), and
   `all_to_all` swaps block b of device a with block a of device b.
2. experts: every received row goes through the gated MLPs (silu(x W_g) * (x W_u)) W_d of
   the local experts it chose, summed with its gate weights: one row back per row in.
3. combine: the second `all_to_all` returns the rows to their slots; each token sums the
   rows of its ranks.

`capacity=None` is dropless: the worst case, every local token to every rank. The
padding (empty rows) still crosses the wire: `bytes_on_wire` counts it; the payload
(`bytes_sent`) counts only filled rows, read from the send buffers' valid flags.
`dense_reference` is the same layer on one device with the same drop rule, in numpy.

Lax.ragged_all_to_all (no padding) exists on GPUs but not on CPU; fixed-capacity
all_to_all runs everywhere.

On GPUs and across hosts: nothing in this module is CPU-specific. One host with R GPUs:
`moelab ep --model deepseek-r1 --devices 8 --tokens 4096 --json` uses the first R of
`jax.devices()` (the CPU device-count flag `moelab ep` sets touches only the CPU
platform). Several hosts: start the same command on every host, with the coordinator's
address, the number of processes and this process's id in the environment:

    MOELAB_COORDINATOR=host0:12355 MOELAB_NUM_PROCESSES=2 MOELAB_PROCESS_ID=0 \
        moelab ep --model deepseek-r1 --devices 16 --tokens 4096 --json     # on host0
    MOELAB_COORDINATOR=host0:12355 MOELAB_NUM_PROCESSES=2 MOELAB_PROCESS_ID=1 \
        moelab ep --model deepseek-r1 --devices 16 --tokens 4096 --json     # on host1

`moelab ep` then calls `jax.distributed.initialize(coordinator, num_processes,
process_id)` before anything else touches jax, so `jax.devices()` lists the devices of
all processes and one shard_map spans them (the all_to_all crosses the network between
hosts). Every process builds the same routing and weights from the seed, hands its own
devices their blocks (`jax.make_array_from_callback`) and gathers the result
(`multihost_utils.process_allgather`). Checked on one machine as two processes of four
simulated CPU devices each (add `JAX_PLATFORMS=cpu
XLA_FLAGS=--xla_force_host_platform_device_count=4` to both commands above, with
`--devices 8`): both report the single-process error and byte counts. On CPU the
collectives go through Gloo, which prints its connection lines on stdout.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

AXIS = "ep"


@dataclass(frozen=True)
class EPStats:
    """What one run of the EP layer moved, per device (arrays [R]) and in total."""

    rows_sent: np.ndarray  # [R] payload rows each device dispatched to other devices
    rows_returned: np.ndarray  # [R] rows each device sent back in the combine
    rows_local: np.ndarray  # [R] rows a device kept for its own experts (no network)
    dropped_rows: np.ndarray  # [R] (token, rank) pairs past the capacity
    dropped_assignments: np.ndarray  # [R] (token, expert) pairs lost with them
    capacity: int  # rows per (source, destination) block
    ranks: int


def default_capacity(tokens_per_device: int, n_experts: int, k: int, ranks: int,
                     factor: float | None) -> int:
    """Rows per destination block. None: dropless (every token to every rank).

    Otherwise ceil(factor * n * p), at least 1 and at most n, where p is the chance that a
    uniformly routed token needs a given rank, 1 - C(E - E/R, k) / C(E, k)
    (closed_form.fanout_uniform / (R - 1)): `factor` 1 is the mean load of a block.
    """
    from moelab.costmodel.closed_form import fanout_uniform

    n = tokens_per_device
    if factor is None:
        return max(n, 1)
    p = fanout_uniform(ranks, n_experts, k) / (ranks - 1) if ranks > 1 else 1.0
    return int(min(n, max(1, np.ceil(factor * n * p))))


def _device_layer(x, ids, w, wg, wu, wd, *, n_experts: int, ranks: int, capacity: int):
    """One device's part of the layer (inside shard_map). Shapes per device:

    x [n, d], ids [n, k] int32 (-1: no expert), w [n, k]; wg, wu [E/R, d, I]; wd [E/R, I, d].
    """
    import jax
    import jax.numpy as jnp

    R, C = ranks, capacity
    n, d = x.shape
    per = n_experts // R
    me = jax.lax.axis_index(AXIS)
    b = jnp.arange(R, dtype=jnp.int32)

    dest = jnp.where(ids >= 0, ids // per, -1)  # [n, k] rank of each chosen expert
    on_b = dest[:, None, :] == b[None, :, None]  # [n, R, k]
    need = on_b.any(-1)  # [n, R] token t needs rank b
    pos = jnp.cumsum(need, axis=0) - 1  # [n, R] its row in block b, in token order
    sent = need & (pos < C)
    slot = jnp.where(sent, b[None, :] * C + pos, R * C)  # R*C: out of range, dropped
    flat = slot.reshape(-1)

    # Send buffers: activations, and per row the local expert ids (-1: none) and weights.
    rows = jnp.zeros((R * C, d), x.dtype).at[flat].set(
        jnp.broadcast_to(x[:, None, :], (n, R, d)).reshape(-1, d), mode="drop")
    local_ids = jnp.where(on_b, ids[:, None, :] - b[None, :, None] * per, -1)  # [n, R, k]
    meta_ids = jnp.full((R * C, ids.shape[1]), -1, jnp.int32).at[flat].set(
        local_ids.reshape(n * R, -1), mode="drop")
    meta_w = jnp.zeros((R * C, ids.shape[1]), w.dtype).at[flat].set(
        jnp.where(on_b, w[:, None, :], 0).reshape(n * R, -1), mode="drop")
    valid = jnp.zeros(R * C, jnp.bool_).at[flat].set(True, mode="drop")

    def a2a(v):
        return jax.lax.all_to_all(v.reshape(R, C, *v.shape[1:]), AXIS, 0, 0, tiled=True)

    recv, r_ids, r_w, r_valid = (a2a(v).reshape(R * C, *v.shape[1:])
                                 for v in (rows, meta_ids, meta_w, valid))

    # Gate of each local expert for each received row: sum of the weights choosing it.
    gate = jnp.einsum("rk,rke->re", r_w, (r_ids[:, :, None] == jnp.arange(per)).astype(w.dtype))
    h = jax.nn.silu(jnp.einsum("rd,edi->eri", recv, wg)) * jnp.einsum("rd,edi->eri", recv, wu)
    y = jnp.einsum("re,erd->rd", gate, jnp.einsum("eri,eid->erd", h, wd))
    y = jnp.where(r_valid[:, None], y, 0)

    back = a2a(y).reshape(R * C, d)
    out = jnp.where(sent[:, :, None], back[jnp.minimum(slot, R * C - 1)], 0).sum(1)  # [n, d]

    # Counts from the buffers themselves: filled rows per destination block.
    filled = valid.reshape(R, C).sum(-1)  # [R] rows this device sends to each device
    returned = r_valid.reshape(R, C).sum(-1)  # [R] rows it sends back to each device
    remote = b != me
    kept = jnp.take_along_axis(sent, jnp.maximum(dest, 0), axis=1) | (ids < 0)
    stats = jnp.stack([
        jnp.sum(jnp.where(remote, filled, 0)),
        jnp.sum(jnp.where(remote, returned, 0)),
        filled[me],
        jnp.sum(need & ~sent),
        jnp.sum(~kept),
    ])
    return out, stats[None]


def ep_layer(x, ids, w, wg, wu, wd, *, ranks: int, capacity: int | None = None, devices=None):
    """Run the EP layer on `ranks` devices. Returns (out [N, d], EPStats).

    x [N, d] float, ids [N, k] int32 in [-1, E) (-1: no expert), w [N, k] gate weights,
    wg, wu [E, d, I], wd [E, I, d]. N and E must be multiples of `ranks`.
    """
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from moelab.costmodel.specs import SpecError

    N, k = ids.shape
    E = wg.shape[0]
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) < ranks:
        raise SpecError(f"devices: {ranks} ranks asked, {len(devices)} devices available")
    if N % ranks or E % ranks:
        raise SpecError(f"devices: N_t={N} and E={E} must be multiples of R={ranks}")
    n = N // ranks
    C = max(n, 1) if capacity is None else int(capacity)
    if C < 1:
        raise SpecError(f"capacity: must be >= 1, got {capacity}")
    mesh = Mesh(np.array(devices[:ranks]), (AXIS,))
    fn = jax.jit(jax.shard_map(
        partial(_device_layer, n_experts=E, ranks=ranks, capacity=C), mesh=mesh,
        in_specs=(P(AXIS), P(AXIS), P(AXIS), P(AXIS), P(AXIS), P(AXIS)),
        out_specs=(P(AXIS), P(AXIS))))
    sharding = NamedSharding(mesh, P(AXIS))

    def put(a):
        # Every process holds the whole (same) host array and hands each of its devices
        # that device's block: works on one host and across hosts (jax.distributed).
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    out, st = fn(*(put(a) for a in (x, ids.astype(np.int32), w, wg, wu, wd)))
    if jax.process_count() > 1:  # blocks on other hosts: gather them to every process
        from jax.experimental import multihost_utils

        out, st = multihost_utils.process_allgather((out, st), tiled=True)
    st = np.asarray(st)
    return np.asarray(out), EPStats(st[:, 0], st[:, 1], st[:, 2], st[:, 3], st[:, 4], C, ranks)


def kept_mask(ids, n_experts: int, ranks: int, capacity: int) -> np.ndarray:
    """[N, k] bool: (token, expert) pairs that survive the capacity, by the layer's rule
    (plain loops: on each source device, a token takes the next row of each rank it needs;
    past `capacity` rows that rank is dropped for it). -1 ids are never kept."""
    ids = np.asarray(ids)
    N, k = ids.shape
    n, per = N // ranks, n_experts // ranks
    keep = np.zeros((N, k), bool)
    for a in range(ranks):
        used = [0] * ranks
        for t in range(a * n, (a + 1) * n):
            for r in sorted({int(e) // per for e in ids[t] if e >= 0}):
                ok = used[r] < capacity
                used[r] += 1
                keep[t] |= ok & (ids[t] >= 0) & (ids[t] // per == r)
    return keep


def dense_reference(x, ids, w, wg, wu, wd, keep=None) -> np.ndarray:
    """The same MoE layer on one device (numpy, float64):
    out[t] = sum_j keep[t,j] w[t,j] (silu(x_t W_g[e]) * (x_t W_u[e])) W_d[e], e = ids[t,j]."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    wg, wu, wd = (np.asarray(a, np.float64) for a in (wg, wu, wd))
    ids = np.asarray(ids)
    keep = (ids >= 0) if keep is None else (keep & (ids >= 0))
    out = np.zeros_like(x)
    for e in np.unique(ids[keep]):
        t, j = np.nonzero(keep & (ids == e))
        g, u = x[t] @ wg[e], x[t] @ wu[e]
        h = g / (1 + np.exp(-g)) * u
        np.add.at(out, t, w[t, j][:, None] * (h @ wd[e]))
    return out


def expected_rows(ids, n_experts: int, ranks: int, keep=None) -> np.ndarray:
    """[R] remote rows each device sends per direction, from the routing (the model's count:
    reference.rank_traffic, off-diagonal row sums), after drops when `keep` is given."""
    from moelab.costmodel.reference import rank_traffic

    ids = np.asarray(ids)
    if keep is not None:
        ids = np.where(keep, ids, -1)
    traffic = rank_traffic(ids, n_experts, ranks)
    return traffic.sum(1) - np.diag(traffic)
