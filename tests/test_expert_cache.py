"""The device expert cache as a state machine: right weights, pinned slots safe, counts exact."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from moelab.costmodel.specs import SpecError
from moelab.kernels.expert_cache import CacheFull, ExpertCache, simulate_cache

N_LAYERS, N_EXPERTS = 3, 6


def _value(key):
    """What the host store holds for an expert: unique per (layer, expert)."""
    return 1000 * key[0] + key[1]


class CacheMachine(RuleBasedStateMachine):
    """Layers start (acquire their used experts, copy the misses into device memory) and
    finish (their compute reads the slots) in any interleaving, as with in-flight GEMMs."""

    computes = Bundle("computes")

    @initialize(n_slots=st.integers(1, 8))
    def setup(self, n_slots):
        self.cache = ExpertCache(n_slots, "lru")
        self.memory = [None] * n_slots  # device slots: what was last copied in
        self.in_flight: dict[int, list] = {}  # compute id -> its keys
        self.ids = itertools.count()
        self.hits = self.misses = self.evictions = 0
        self.partial: list = []  # keys acquired by the start in progress
        self.recency: list = []  # the model's own LRU order (oldest first)

    def _pinned_keys(self):
        return {k for keys in self.in_flight.values() for k in keys}

    @rule(target=computes, layer=st.integers(0, N_LAYERS - 1),
          experts=st.sets(st.integers(0, N_EXPERTS - 1), min_size=1, max_size=N_EXPERTS))
    def start(self, layer, experts):
        keys = [(layer, e) for e in sorted(experts)]
        self.partial = []
        free = self.cache.n_slots - len(self._pinned_keys() - set(keys))
        needed = len(set(keys))
        if needed > free:
            # Not enough unpinned slots: the cache must refuse, and stay consistent.
            with pytest.raises(CacheFull):
                for key in keys:
                    self._acquire(key)
            self._undo_partial(keys)
            return None
        for key in keys:
            self._acquire(key)
        cid = next(self.ids)
        self.in_flight[cid] = keys
        return cid

    def _acquire(self, key):
        resident = key in self.cache
        pinned_before = self._pinned_keys()
        unpinned = [k for k in self.recency if k not in pinned_before and k in self.cache]
        full = all(k is not None for k in self.cache.key_in)
        acc = self.cache.acquire(key)
        self.partial.append(key)
        assert acc.hit == resident
        if acc.hit:
            self.hits += 1
            assert self.memory[acc.slot] == _value(key)
        else:
            self.misses += 1
            # Never a slot in use: the victim was not pinned by any in-flight compute.
            assert acc.evicted not in pinned_before
            if full:
                # LRU: the least recently used unpinned expert goes.
                assert acc.evicted == unpinned[0]
            else:
                assert acc.evicted is None
            self.evictions += acc.evicted is not None
            self.memory[acc.slot] = _value(key)  # the copy
        if key in self.recency:
            self.recency.remove(key)
        self.recency.append(key)
        if acc.evicted is not None:
            self.recency.remove(acc.evicted)

    def _undo_partial(self, keys):
        # The layer cannot start: give back what it had pinned.
        for key in self.partial:
            self.cache.release(key)
        self.partial = []

    @rule(cid=consumes(computes))
    def finish(self, cid):
        if cid is None:
            return
        for key in self.in_flight.pop(cid):
            # The compute reads the right expert's weights.
            assert self.memory[self.cache.slot_of[key]] == _value(key)
            self.cache.release(key)

    @precondition(lambda self: hasattr(self, "cache"))
    @invariant()
    def consistent(self):
        c = self.cache
        for key, slot in c.slot_of.items():
            assert c.key_in[slot] == key
        assert sum(k is not None for k in c.key_in) == len(c.slot_of)
        pinned = self._pinned_keys()
        for slot, key in enumerate(c.key_in):
            expected = sum(keys.count(key) for keys in self.in_flight.values())
            assert c.pins[slot] == (expected if key is not None else 0)
        assert pinned <= set(c.slot_of)
        assert (c.hits, c.misses, c.evictions) == (self.hits, self.misses, self.evictions)


CacheMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestCacheMachine = CacheMachine.TestCase


# --- Belady: the bound LRU is measured against ------------------------------------------

routings = st.lists(
    st.tuples(st.integers(0, 2), st.sets(st.integers(0, 7), max_size=8).map(sorted)),
    min_size=1, max_size=12,
)


@given(routings, st.integers(1, 6))
def test_belady_never_misses_more_than_lru(steps, n_slots):
    lru = simulate_cache(steps, n_slots, "lru")
    belady = simulate_cache(steps, n_slots, "belady")
    n = sum(len(e) for _, e in steps)
    for s in (lru, belady):
        assert s["hits"] + s["misses"] == n
    assert belady["misses"] <= lru["misses"]
    # Compulsory misses: the first access of each distinct expert always misses.
    distinct = len({(layer, e) for layer, experts in steps for e in experts})
    assert belady["misses"] >= distinct


def _optimal_misses(seq, n_slots):
    """Fewest misses over every eviction choice (brute force, tiny inputs only)."""
    best = [len(seq)]

    def go(i, resident, misses):
        if misses >= best[0]:
            return
        if i == len(seq):
            best[0] = misses
            return
        key = seq[i]
        if key in resident:
            go(i + 1, resident, misses)
        elif len(resident) < n_slots:
            go(i + 1, resident | {key}, misses + 1)
        else:
            for victim in resident:
                go(i + 1, (resident - {victim}) | {key}, misses + 1)

    go(0, frozenset(), 0)
    return best[0]


@settings(max_examples=40)
@given(st.lists(st.integers(0, 4), max_size=10), st.integers(1, 3))
def test_belady_is_optimal_one_expert_at_a_time(seq, n_slots):
    steps = [(0, [e]) for e in seq]
    assert simulate_cache(steps, n_slots, "belady")["misses"] == _optimal_misses(seq, n_slots)


def test_lru_by_hand():
    # 2 slots; A B A C: C evicts B (A was used more recently); then B misses again.
    steps = [(0, [0]), (0, [1]), (0, [0]), (0, [2]), (0, [1])]
    s = simulate_cache(steps, 2, "lru")
    assert (s["hits"], s["misses"], s["evictions"]) == (1, 4, 2)
    b = simulate_cache(steps, 2, "belady")  # C evicts A (never used again): B hits
    assert (b["hits"], b["misses"]) == (2, 3)


def test_pinned_slots_are_never_victims():
    cache = ExpertCache(2)
    cache.acquire((0, 0))
    cache.acquire((0, 1))
    with pytest.raises(CacheFull):
        cache.acquire((0, 2))
    cache.release((0, 1))
    acc = cache.acquire((0, 2))
    assert acc.evicted == (0, 1) and not acc.hit
    with pytest.raises(RuntimeError):
        cache.release((0, 1))


def test_bad_input():
    with pytest.raises(SpecError):
        ExpertCache(0)
    with pytest.raises(SpecError):
        ExpertCache(2, "fifo")
    with pytest.raises(SpecError):
        ExpertCache(2, "belady")
    c = ExpertCache(2, "belady", future=[(0, 1)])
    with pytest.raises(SpecError):
        c.acquire((0, 2))  # not what the future said
