"""The device expert cache: C slots and which (layer, expert) lives in which. Bookkeeping only.

LRU eviction, or Belady (evict the expert used farthest in the future: optimal given the
routing, the bound LRU is measured against). Slots in use by an in-flight compute are
pinned and never chosen as victims. Hits, misses and evictions are counted exactly.
`simulate_cache` runs a whole routing through it (no weights move): what the offload
model's cache-hit terms and `moelab plan` use.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass

from moelab.costmodel.specs import SpecError

Key = tuple[int, int]  # (layer, expert)


class CacheFull(RuntimeError):
    """Every slot is pinned by an in-flight compute: nothing may be evicted."""


@dataclass(frozen=True)
class Access:
    """The outcome of one `ExpertCache.acquire`."""

    key: Key  # (layer, expert) asked for
    slot: int  # device slot that holds (or will hold) its weights
    hit: bool  # already resident: no copy needed
    evicted: Key | None  # expert whose slot was taken (None: a free slot or a hit)


class ExpertCache:
    """C device slots, LRU or Belady eviction, pinned slots never evicted.

    `acquire(key)` pins the key's slot (loading it on a miss) until `release(key)`.
    Belady needs the whole future access sequence (`future`, the keys in the order they
    will be acquired); the cache checks that the accesses follow it.
    """

    POLICIES = ("lru", "belady")

    def __init__(self, n_slots: int, policy: str = "lru", future: Sequence[Key] | None = None):
        if n_slots < 1:
            raise SpecError(f"n_slots: the cache needs at least one slot, got {n_slots}")
        if policy not in self.POLICIES:
            raise SpecError(f"policy: unknown eviction policy {policy!r} (known: lru, belady)")
        if policy == "belady" and future is None:
            raise SpecError("future: Belady eviction needs the future access sequence")
        self.n_slots = n_slots
        self.policy = policy
        self.slot_of: dict[Key, int] = {}  # resident key -> slot
        self.key_in: list[Key | None] = [None] * n_slots  # slot -> resident key
        self.pins: list[int] = [0] * n_slots  # slot -> in-flight users
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._recency: collections.OrderedDict[Key, None] = collections.OrderedDict()  # LRU first
        self._t = 0  # accesses so far (position in `future`)
        self._future = list(future) if future is not None else None
        self._uses: dict[Key, collections.deque[int]] = collections.defaultdict(collections.deque)
        for i, key in enumerate(self._future or ()):
            self._uses[key].append(i)

    def __contains__(self, key: Key) -> bool:
        return key in self.slot_of

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    def pinned(self, key: Key) -> bool:
        return key in self.slot_of and self.pins[self.slot_of[key]] > 0

    def acquire(self, key: Key) -> Access:
        """Pin `key`'s slot; on a miss, take a free slot or evict a victim (not pinned)."""
        key = (int(key[0]), int(key[1]))
        if self._future is not None:
            if self._t >= len(self._future) or self._future[self._t] != key:
                expected = self._future[self._t] if self._t < len(self._future) else "end"
                raise SpecError(f"future: access {self._t} is {key}, the sequence says {expected}")
            self._uses[key].popleft()
        self._t += 1
        evicted = None
        if key in self.slot_of:
            slot, hit = self.slot_of[key], True
            self.hits += 1
        else:
            slot, hit = self._victim(), False
            evicted = self.key_in[slot]
            if evicted is not None:
                del self.slot_of[evicted]
                del self._recency[evicted]
                self.evictions += 1
            self.slot_of[key] = slot
            self.key_in[slot] = key
            self.misses += 1
        self._recency[key] = None
        self._recency.move_to_end(key)
        self.pins[slot] += 1
        return Access(key, slot, hit, evicted)

    def release(self, key: Key) -> None:
        slot = self.slot_of.get((int(key[0]), int(key[1])))
        if slot is None or self.pins[slot] == 0:
            raise RuntimeError(f"release of {key}: not acquired")
        self.pins[slot] -= 1

    def _victim(self) -> int:
        free = [s for s, k in enumerate(self.key_in) if k is None]
        if free:
            return free[0]
        # Candidates in LRU order (oldest first), so that Belady breaks ties by recency.
        candidates = [k for k in self._recency if self.pins[self.slot_of[k]] == 0]
        if not candidates:
            raise CacheFull(f"all {self.n_slots} slots are in use by in-flight computes")
        if self.policy == "lru":
            return self.slot_of[candidates[0]]
        # Belady: the expert whose next use is farthest away (never again: infinitely far).
        def next_use(k: Key) -> float:
            uses = self._uses.get(k)
            return uses[0] if uses else math.inf

        return self.slot_of[max(candidates, key=next_use)]

    def stats(self) -> dict:
        return {
            "policy": self.policy,
            "slots": self.n_slots,
            "accesses": self.accesses,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "hit_rate": self.hits / self.accesses if self.accesses else float("nan"),
        }


def simulate_cache(steps: Sequence[tuple[int, Sequence[int]]], n_slots: int,
                   policy: str = "lru") -> dict:
    """Run a routing through a cache: `steps` lists (layer, used experts) in execution order.

    A layer's experts stay pinned until its compute ends (the grouped GEMM reads them
    together), so a layer with more used experts than slots runs in chunks of C experts.
    """
    keys = [(layer, int(e)) for layer, experts in steps for e in experts]
    cache = ExpertCache(n_slots, policy, future=keys if policy == "belady" else None)
    for layer, experts in steps:
        experts = [int(e) for e in experts]
        for j in range(0, len(experts), n_slots):
            chunk = [(layer, e) for e in experts[j : j + n_slots]]
            for key in chunk:
                cache.acquire(key)
            for key in chunk:
                cache.release(key)
    return cache.stats()
