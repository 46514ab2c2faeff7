"""Host expert store, gather kernel and prefetcher: every compute reads the right weights.

On a CPU the gather kernel runs in Triton's interpreter and the prefetcher's transfer lane
is a worker thread; with MOELAB_GPU_TESTS=1 on a GPU the same tests run with CUDA streams,
pinned host memory and the compiled kernel (zero-copy reads over the host link).
"""

import os
import time

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from moelab.costmodel import presets
from moelab.costmodel.specs import DTYPE_BYTES, SpecError
from moelab.kernels import expert_store, prefetch
from moelab.kernels._gather_triton import gather_blocks, gather_blocks_reference
from moelab.kernels.expert_cache import CacheFull, simulate_cache
from moelab.kernels.expert_store import HostExpertStore
from moelab.kernels.prefetch import Prefetcher

GPU = bool(os.environ.get("MOELAB_GPU_TESTS")) and torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
POISON = -7777


def used_experts_of(topk_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Dispatch's used-expert list (ids of -1 are not routed here)."""
    ids = topk_ids[topk_ids >= 0].long()
    counts = torch.bincount(ids, minlength=n_experts)
    try:
        from moelab.kernels.dispatch import used_experts
    except ImportError:  # the dispatch kernel not built: the same list by hand
        return torch.nonzero(counts > 0).flatten()
    return used_experts(counts)


def tiny(name="qwen3-30b-a3b", **kw):
    """A preset's store shrunk for tests: few layers, few experts, small blocks."""
    model = presets.load_model(name)
    kw = {"layers": 3, "experts": 8, "scale": 1 / 64, **kw}
    return HostExpertStore(model, **kw)


# --- host expert store ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["deepseek-r1", "mixtral-8x7b", "qwen3-30b-a3b", "gpt-oss-20b"])
def test_store_block_is_one_expert(name):
    model = presets.load_model(name)
    store = HostExpertStore(model, layers=1, experts=2, scale=1 / 32, pin=False)
    d, i = store.hidden, store.intermediate
    n_mats = 3 if model.gated else 2
    import math

    assert store.expert_bytes == n_mats * math.ceil(d * i * DTYPE_BYTES[model.expert_dtype])
    assert store.block_bytes % expert_store.ALIGN == 0 and store.block_bytes >= store.expert_bytes
    views = store.views(store.block(0, 1))
    assert [v.shape if v.dim() == 2 else None for v in views.values()][0] in (
        (i, d), None)  # 4-bit formats: raw bytes
    assert not torch.equal(store.block(0, 0), store.block(0, 1))


def test_store_full_size_expert_is_the_models():
    # Scale 1: one block holds exactly S_E f_E bytes (44 MB for DeepSeek-R1 in fp8).
    model = presets.load_model("deepseek-r1")
    store = HostExpertStore(model, layers=1, experts=1, scale=1.0, pin=False)
    assert store.expert_bytes == model.expert_bytes == 3 * 7168 * 2048
    assert store.views(store.block(0, 0))["down"].dtype == torch.float8_e4m3fn


def test_store_bad_input():
    model = presets.load_model("mixtral-8x7b")
    with pytest.raises(SpecError):
        HostExpertStore(model, scale=0)
    with pytest.raises(SpecError):
        HostExpertStore(model, experts=9, scale=1 / 64)


# --- gather kernel against its reference ---------------------------------------------------


@pytest.mark.parametrize(
    "n_src, n_dst, n_words, pairs",
    [
        (4, 3, 100, [(3, 2), (0, 0)]),  # n_words not a multiple of BLOCK
        (4, 3, 64, []),  # no experts used
        (1, 1, 1, [(0, 0)]),  # one word
        (5, 5, 300, [(i, 4 - i) for i in range(5)]),  # every slot, reversed
        (3, 4, 257, [(1, 0), (1, 3)]),  # one block into two slots
    ],
)
def test_gather_matches_reference(n_src, n_dst, n_words, pairs):
    g = torch.Generator().manual_seed(n_words)
    src = torch.randint(-(2**31), 2**31 - 1, (n_src, n_words), dtype=torch.int32, generator=g)
    if GPU:
        src = src.pin_memory()  # zero-copy: the kernel reads host memory
    src_idx = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    dst_idx = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    out = torch.full((n_dst, n_words), POISON, dtype=torch.int32, device=DEVICE)
    ref = out.clone()
    route = gather_blocks(src, src_idx.to(DEVICE), out, dst_idx.to(DEVICE), block=64)
    gather_blocks_reference(src, src_idx, ref, dst_idx)
    if GPU:
        torch.cuda.synchronize()
        assert route in ("tensor", "data_ptr", "cuda_view") or not pairs
    assert torch.equal(out.cpu(), ref.cpu())
    untouched = set(range(n_dst)) - {p[1] for p in pairs}
    for r in untouched:
        assert (out[r] == POISON).all()


def test_gather_bad_input():
    src = torch.zeros((2, 8), dtype=torch.int32)
    idx = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(TypeError):
        gather_blocks(src.float(), idx, src.float(), idx)
    with pytest.raises(ValueError):
        gather_blocks(src, idx, torch.zeros((2, 9), dtype=torch.int32), idx)
    with pytest.raises(TypeError):
        gather_blocks(src, idx.int(), src.clone(), idx.int())


# --- prefetcher: the scheduler on threads (CPU) or streams (GPU) ---------------------------


def _routing(store, passes, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    k = min(store.model.top_k, store.n_experts)
    steps = []
    for _ in range(passes):
        for layer in range(store.n_layers):
            scores = torch.rand((tokens, store.n_experts), generator=g)
            topk = torch.topk(scores, k, dim=1).indices
            topk[torch.rand((tokens, k), generator=g) < 0.2] = -1  # some pairs routed elsewhere
            steps.append((layer, used_experts_of(topk, store.n_experts)))
    return steps


def _run(pf, steps, check=True):
    """Fetch each layer, 'compute' with every expert's weights, release. A layer with more
    used experts than slots runs in chunks of C experts (as `simulate_cache`)."""
    n_slots = pf.cache.n_slots
    for layer, experts in steps:
        experts = [int(e) for e in experts]
        for j in range(0, len(experts), n_slots):
            fetch = pf.fetch(layer, experts[j : j + n_slots])
            for e in fetch.experts:
                block = fetch.block(e)
                if check:  # the compute reads the right expert's weights
                    assert torch.equal(block.cpu(), pf.store.block(layer, e)), (layer, e)
            fetch.release()
    pf.synchronize()


@pytest.mark.parametrize("path", ["copy", "gather"])
@pytest.mark.parametrize("policy", ["lru", "belady"])
def test_prefetcher_counts_match_the_cache_model(path, policy):
    store = tiny()
    steps = _routing(store, passes=3, tokens=2, seed=1)
    n_slots = 6
    future = [(layer, int(e)) for layer, ex in steps for e in ex] if policy == "belady" else None
    pf = Prefetcher(store, n_slots, device=DEVICE, path=path, policy=policy, future=future)
    _run(pf, steps)
    expected = simulate_cache([(layer, ex.tolist()) for layer, ex in steps], n_slots, policy)
    s = pf.stats()
    assert (s["hits"], s["misses"], s["evictions"]) == (
        expected["hits"], expected["misses"], expected["evictions"])
    assert s["copies"] == s["misses"]
    assert s["lanes"] == ("cuda streams" if GPU else "cpu threads")
    if path == "gather" and s["copies"]:
        assert s["gather_route"] in (("tensor", "data_ptr", "cuda_view") if GPU else ("interpreter",))


def test_prefetcher_weights_feed_a_gemm():
    # bf16 experts: the gated MLP computed from the fetched slot equals the host weights'.
    store = tiny("mixtral-8x7b", layers=1, experts=4)
    pf = Prefetcher(store, 2, device=DEVICE)
    x = torch.randn((3, store.hidden), dtype=torch.float32)
    fetch = pf.fetch(0, [1, 3])
    for e in (1, 3):
        w = {k: v.float() for k, v in fetch.weights(e).items()}
        h = store.views(store.block(0, e))
        ref = (torch.nn.functional.silu(x @ h["gate"].float().T) * (x @ h["up"].float().T)) @ \
            h["down"].float().T
        dev = x.to(DEVICE)
        out = (torch.nn.functional.silu(dev @ w["gate"].T) * (dev @ w["up"].T)) @ w["down"].T
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4, equal_nan=False)
    fetch.release()


def test_prefetcher_refuses_when_all_slots_in_use():
    store = tiny()
    pf = Prefetcher(store, 2, device=DEVICE)
    held = pf.fetch(0, [0, 1])
    with pytest.raises(CacheFull):
        pf.fetch(1, [2])
    held.release()
    _run(pf, [(1, [2, 3])])  # the slots are free again
    assert pf.stats()["misses"] == 4


def test_prefetcher_bad_input():
    store = tiny()
    pf = Prefetcher(store, 2, device=DEVICE)
    with pytest.raises(SpecError):
        pf.fetch(0, [1, 1])
    with pytest.raises(SpecError):
        pf.fetch(5, [0])
    with pytest.raises(SpecError):
        pf.fetch(0, [8])
    with pytest.raises(SpecError):
        Prefetcher(store, 2, path="dma")


def test_lookahead_learns_transitions():
    # Layer 1 uses expert (e + 3) mod 8 for layer 0's e. Round one (pairs {0,1}..{6,7})
    # has no history: the guess (the same ids) is always wrong. Round two: the transition
    # histogram predicts layer 1 exactly.
    store = tiny(layers=2)
    pf = Prefetcher(store, 8, device=DEVICE, lookahead=True)
    for _ in range(2):
        for c in (0, 2, 4, 6):
            first = torch.tensor([c, c + 1])
            _run(pf, [(0, first), (1, ((first + 3) % 8).sort().values)])
    s = pf.stats()
    assert s["lookahead_predicted"] == 16  # 2 per pass
    assert s["lookahead_used"] == 8  # all of round two, none of round one
    assert s["lookahead_hit_rate"] == 0.5
    assert s["lookahead_coverage"] == 0.5
    # Correct weights were read throughout (checked in _run), mispredicted slots released.
    assert sum(pf.cache.pins) == 0


# --- the scheduler as a state machine, with a slow transfer lane ---------------------------


class _SlowThreadLanes(prefetch._ThreadLanes):
    """Copies take a while: a compute that did not wait for its event would read stale data."""

    def side_run(self, fn):
        def slow():
            time.sleep(0.0005)
            fn()

        super().side_run(slow)


class SchedulerMachine(RuleBasedStateMachine):
    """Layers fetched, computed and released in any interleaving over few slots."""

    def __init__(self):
        super().__init__()
        self.store = _STORE
        self.pf = Prefetcher(self.store, 5, device=DEVICE, path="copy")
        if not GPU:
            self.pf.lanes = _SlowThreadLanes()
        self.open: list = []
        self.accesses = 0

    @rule(layer=st.integers(0, 2), experts=st.sets(st.integers(0, 7), max_size=4))
    def fetch(self, layer, experts):
        experts = sorted(experts)
        keys = {(layer, e) for e in experts}
        pinned = {(f.layer, e) for f in self.open for e in f.experts}
        if len(pinned | keys) > self.pf.cache.n_slots:
            with pytest.raises(CacheFull):
                self.pf.fetch(layer, experts)
            self.accesses = self.pf.cache.accesses  # refused acquires were counted
            return
        self.open.append(self.pf.fetch(layer, experts))
        self.accesses += len(experts)

    @rule(data=st.data())
    def compute_and_release(self, data):
        if not self.open:
            return
        fetch = self.open.pop(data.draw(st.integers(0, len(self.open) - 1)))
        for e in fetch.experts:
            assert torch.equal(fetch.block(e).cpu(), self.store.block(fetch.layer, e))
        fetch.release()

    @invariant()
    def counts_exact(self):
        c = self.pf.cache
        assert c.hits + c.misses == self.accesses
        assert self.pf.copies == c.misses
        # Pinned slots are exactly those of the open fetches.
        pinned = sorted(f.slots[e] for f in self.open for e in f.experts)
        assert pinned == sorted(s for s, n in enumerate(c.pins) for _ in range(n))

    def teardown(self):
        for fetch in self.open:
            fetch.release()
        self.pf.synchronize()
        self.pf.close()


_STORE = tiny(scale=1 / 128)
SchedulerMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=20,
                                              deadline=None)
TestSchedulerMachine = SchedulerMachine.TestCase


# --- the benchmark and calibrate run end to end (CPU fallback here, CUDA on a GPU) --------


def test_bench_prefetch_rows(tmp_path):
    import argparse

    from moelab.kernels.bench_prefetch import bench as bench_prefetch

    rows = bench_prefetch(argparse.Namespace(quick=True, out=str(tmp_path), json=False))
    paths = {r["path"] for r in rows}
    assert {"memcpy", "copy", "gather", "gather_kernel", "overlap_copy", "cache_lru"} <= paths
    # Every transfer was checked byte for byte before it was timed.
    assert all(r["correct"] for r in rows if "correct" in r)
    for r in rows:
        if r["path"] in ("copy", "gather", "gather_kernel"):
            assert r["bandwidth_Bps"] > 0 and r["ratio_to_memcpy"] > 0
    lru = {r["slots"]: r for r in rows if r["path"] == "cache_lru"}
    belady = {r["slots"]: r for r in rows if r["path"] == "cache_belady"}
    assert all(belady[s]["misses"] <= lru[s]["misses"] for s in lru)
    goals = rows[-1]
    assert goals["path"] == "goals" and goals["hidden_fraction_worst"] is not None
    best_gather = max(r["ratio_to_memcpy"] for r in rows if r["path"] == "gather_kernel")
    assert goals["gather_ratio_worst"] <= best_gather
    if not GPU:  # no verdict from a CPU
        assert goals["goal_gather_ratio_met"] is None and goals["goal_hidden_fraction_met"] is None


def test_calibrate_writes_a_system_file_gamma_accepts(tmp_path, capsys):
    import json

    from moelab.cli import main

    out = tmp_path / "system.json"
    assert main(["calibrate", "--quick", "--out", str(out)]) == 0
    data = json.loads(out.read_text())  # one systems.json "gpus" entry, the host link inline
    sys_ = presets.load_system(str(out), latencies=True)
    link = data["host_link"]
    assert link["bandwidth_GBps"] is None  # no datasheet figure: the measured one is the link
    assert sys_.b_pcie == link["measured_GBps"] * 1e9 > 0
    assert sys_.alpha_pcie == link["latency_us"] * 1e-6
    assert sys_.hbm_bw == data["hbm_TBps"] * 1e12 > 0 and sys_.peak_flops == data["bf16_dense_TFLOPs"] * 1e12
    assert {"hbm_TBps", "bf16_dense_TFLOPs", "host_link.measured_GBps"} <= set(data["measured"])
    assert "not measurable on one GPU" in data["source"]
    if not GPU:
        assert data["name"] == "cpu-standin" and "STAND-IN" in data["source"]
    text = capsys.readouterr().out
    assert "measured fields: hbm_TBps, bf16_dense_TFLOPs" in text
    assert main(["gamma", "--system", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["b_pcie"] == link["measured_GBps"] * 1e9


def test_calibrate_reads_kernel_rows_and_never_reruns_them(tmp_path, monkeypatch, capsys):
    """--kernels-from DIR: dispatch/combine GB/s come from the rows a benchmark run left
    in DIR; the benchmarks themselves are not run again (they would raise here)."""
    import json

    from moelab.cli import main
    from moelab.kernels import bench_combine, bench_dispatch

    def no_rerun(args):
        raise AssertionError("calibrate reran a kernel benchmark")

    monkeypatch.setattr(bench_dispatch, "bench", no_rerun)
    monkeypatch.setattr(bench_combine, "bench", no_rerun)
    (tmp_path / "bench_dispatch.json").write_text(json.dumps(
        [{"shape": "a", "bandwidth_Bps": 2e12}, {"shape": "b", "bandwidth_Bps": 3e12},
         {"shape": "c", "error": "failed"}]))  # fmt: skip
    assert main(["calibrate", "--quick", "--kernels-from", str(tmp_path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["measurements"]["dispatch_combine"]
    assert got["dispatch"] == {"bandwidth_Bps": {"a": 2e12, "b": 3e12}, "max_Bps": 3e12}
    assert "bench_combine.json" in got["combine"]["skipped"]  # missing: said, not fatal


def test_calibrate_latency_fit():
    from moelab.commands.calibrate import _fit_latency

    sizes = [4096, 65536, 1 << 20, 1 << 24]
    alpha, bw = _fit_latency(sizes, [5e-6 + s / 50e9 for s in sizes])
    assert alpha == pytest.approx(5e-6, rel=1e-6) and bw == pytest.approx(50e9, rel=1e-6)


# --- lifetime ------------------------------------------------------------------------


def test_prefetcher_is_a_context_manager():
    with Prefetcher(tiny(), 4, device=DEVICE) as pf:
        fetch = pf.fetch(0, [1, 2])
        got = fetch.weights(2)
        want = pf.store.views(pf.store.block(0, 2).to(DEVICE))
        assert all(torch.equal(got[n].view(torch.uint8), want[n].view(torch.uint8)) for n in got)
        fetch.release()
        assert not pf.closed
    assert pf.closed
    pf.close()  # a second close is harmless
    if not GPU:
        assert not pf.lanes._worker.is_alive()


def test_dropped_prefetcher_waits_for_copies_in_flight():
    """Dropped without close(): its finaliser waits for the transfer lane before the slots
    can be freed. A slow transfer (0.3 s) is queued; dropping the prefetcher must not
    return before it has run."""
    import gc

    pf = Prefetcher(tiny(), 4, device=DEVICE)
    finished = []
    t0 = time.perf_counter()

    def slow():
        time.sleep(0.3)
        finished.append(time.perf_counter() - t0)

    if GPU:  # a long kernel on the side stream stands for the copy
        pf.lanes.side_run(lambda: torch.cuda._sleep(300_000_000))
        pf.lanes.side_run(lambda: finished.append(0.0))
        event = pf.lanes.side_record()
    else:
        pf.lanes.side_run(slow)
    lanes = pf.lanes
    del pf
    gc.collect()
    if GPU:
        assert event.query()  # the side stream had finished when the drop returned
    else:
        assert finished and finished[0] >= 0.3
        assert not lanes._worker.is_alive()
