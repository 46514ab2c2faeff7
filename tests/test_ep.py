"""The executed EP layer (shard_map + all_to_all on 8 simulated CPU devices) against a dense
single-device layer with the same drops, and its bytes against the model's count."""

import argparse

import jax
import numpy as np
import pytest

from moelab.costmodel import ep
from moelab.costmodel import routing as rt
from moelab.costmodel.specs import SpecError

ATOL = 1e-4  # float32 layer vs float64 reference, outputs of order 1


def _weights(rng, E, d, I):
    wg = (rng.normal(size=(E, d, I)) / np.sqrt(d)).astype(np.float32)
    wu = (rng.normal(size=(E, d, I)) / np.sqrt(d)).astype(np.float32)
    wd = (rng.normal(size=(E, I, d)) / np.sqrt(I)).astype(np.float32)
    return wg, wu, wd


def _case(R, E, k, N, ids=None, d=16, I=24, seed=0):
    rng = np.random.default_rng(seed)
    if ids is None:
        ids = np.asarray(rt.uniform(jax.random.key(seed), N, E, k))
    w = rng.random((N, ids.shape[1])).astype(np.float32)
    x = rng.normal(size=(N, d)).astype(np.float32)
    return x, np.asarray(ids, np.int32), w, *_weights(rng, E, d, I)


def _check(R, E, capacity, x, ids, w, wg, wu, wd):
    out, st = ep.ep_layer(x, ids, w, wg, wu, wd, ranks=R, capacity=capacity)
    C = st.capacity
    keep = ep.kept_mask(ids, E, R, C)
    want = ep.dense_reference(x, ids, w, wg, wu, wd, keep)
    np.testing.assert_allclose(out, want, atol=ATOL, rtol=0)
    # bytes: filled rows in the send buffers = the model's rows for the routing as kept
    np.testing.assert_array_equal(st.rows_sent, ep.expected_rows(ids, E, R, keep))
    from moelab.costmodel.reference import rank_traffic

    traffic = rank_traffic(np.where(keep, ids, -1), E, R)
    np.testing.assert_array_equal(st.rows_returned, traffic.sum(0) - np.diag(traffic))
    np.testing.assert_array_equal(st.rows_local, np.diag(traffic))
    assert st.dropped_assignments.sum() == np.sum(~keep & (ids >= 0))
    return st, keep


@pytest.mark.parametrize("R,E,k,N", [
    (8, 16, 3, 64),  # 2 experts per device
    (8, 8, 2, 256),  # Mixtral: one expert per device
    (8, 8, 8, 16),  # k == E: every token to every rank
    (4, 12, 1, 8),  # k = 1, two tokens per device
    (1, 4, 2, 5),  # one device: nothing leaves it
    (8, 32, 4, 8),  # one token per device
])
def test_dropless_matches_dense_and_model_bytes(R, E, k, N):
    x, ids, w, wg, wu, wd = _case(R, E, k, N)
    st, keep = _check(R, E, None, x, ids, w, wg, wu, wd)
    assert keep.all() and st.dropped_rows.sum() == 0
    assert st.capacity == N // R
    # undropped: exactly the reference's rank traffic for this routing
    np.testing.assert_array_equal(st.rows_sent, ep.expected_rows(ids, E, R))


@pytest.mark.parametrize("capacity", [1, 2, 5])
def test_capacity_drops_match_dense_with_same_drops(capacity):
    R, E, k, N = 8, 16, 3, 96
    x, ids, w, wg, wu, wd = _case(R, E, k, N, seed=capacity)
    st, keep = _check(R, E, capacity, x, ids, w, wg, wu, wd)
    assert st.dropped_rows.sum() > 0 and not keep.all()


def test_hot_expert_and_padding_tokens():
    """Every token picks expert 0 (one hot rank), and some tokens route nowhere (-1)."""
    R, E, k, N = 8, 16, 2, 32
    ids = np.stack([np.zeros(N, np.int32), np.arange(N, dtype=np.int32) % (E - 1) + 1], -1)
    ids[::5] = -1  # padding: no expert at all
    ids[3, 1] = -1  # one expert only
    x, ids, w, wg, wu, wd = _case(R, E, k, N, ids=ids)
    out, _ = ep.ep_layer(x, ids, w, wg, wu, wd, ranks=R)
    assert np.all(out[::5] == 0)  # a token with no experts gets exactly nothing
    st, keep = _check(R, E, 1, x, ids, w, wg, wu, wd)
    assert st.dropped_rows.sum() > 0


def test_rejects_bad_shapes():
    x, ids, w, wg, wu, wd = _case(8, 16, 2, 12)
    with pytest.raises(SpecError, match="multiples"):
        ep.ep_layer(x, ids, w, wg, wu, wd, ranks=8)
    with pytest.raises(SpecError, match="devices"):
        ep.ep_layer(x, ids, w, wg, wu, wd, ranks=len(jax.devices()) + 8)


def test_default_capacity():
    assert ep.default_capacity(32, 8, 2, 8, None) == 32  # dropless: every token
    assert ep.default_capacity(32, 8, 2, 8, 1.0) == 8  # Mixtral: 1/4 of tokens per rank
    assert ep.default_capacity(32, 8, 2, 8, 100.0) == 32  # never above n
    assert ep.default_capacity(32, 8, 2, 1, 1.0) == 32  # one rank: all tokens


def _cli_args(**kw):
    base = dict(model="mixtral-8x7b", devices=8, tokens=256, routing="uniform",
                capacity_factor=None, hidden=64, intermediate=128, seed=0, json=True)
    base.update(kw)
    return argparse.Namespace(**base)


def test_cli_mixtral_issue_figures():
    """The issue's check: max_abs_err <= 1e-3 and measured bytes equal modelled bytes."""
    from moelab.commands.ep import compute

    out = compute(_cli_args())
    assert out["max_abs_err"] <= 1e-3
    assert out["bytes_match"] and out["bytes_sent_measured"] == out["bytes_sent_model"] > 0
    assert out["dropped"] == 0
    assert out["bytes_on_wire"] >= out["bytes_sent_measured"]
    assert out["padding_overhead"] == out["bytes_on_wire"] / out["bytes_sent_measured"]


def test_cli_capacity_and_padding_to_devices():
    from moelab.commands.ep import compute

    out = compute(_cli_args(model="qwen3-30b-a3b", tokens=90, capacity_factor=0.8,
                            routing="zipf:1.2", hidden=16, intermediate=16))
    assert out["tokens_padded"] == 96 and out["dropped"] > 0
    assert out["bytes_match"] and out["max_abs_err"] <= 1e-3
    assert out["bytes_sent_model"] < out["bytes_sent_model_undropped"]


@pytest.mark.parametrize("kw,match", [
    (dict(devices=3), "--devices"),  # E = 8 does not split over 3
    (dict(tokens=0), "--tokens"),
    (dict(capacity_factor=0.0), "--capacity-factor"),
    (dict(routing="bogus"), "routing"),
])
def test_cli_rejects(kw, match):
    from moelab.commands.ep import compute

    with pytest.raises(SpecError, match=match):
        compute(_cli_args(**kw))


@pytest.mark.slow
def test_two_processes_like_two_hosts():
    """jax.distributed: two processes of 4 simulated CPU devices run one 8-rank layer."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "moelab", "ep", "--model", "mixtral-8x7b", "--devices", "8",
           "--tokens", "64", "--json"]
    procs = []
    for pid in (0, 1):
        env = {**os.environ, "MOELAB_COORDINATOR": f"127.0.0.1:{port}",
               "MOELAB_NUM_PROCESSES": "2", "MOELAB_PROCESS_ID": str(pid),
               "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
        # Gloo prints its connection lines on stdout: keep the JSON
        outs.append(json.loads(out[out.index("{"):]))
    for o in outs:
        assert o["devices"] == 8 and o["max_abs_err"] <= 1e-3 and o["bytes_match"]
    assert outs[0]["bytes_sent_measured"] == outs[1]["bytes_sent_measured"]
