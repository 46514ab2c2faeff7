"""Expert offload done properly: a host expert store, a device expert cache and a prefetcher.

The offload side of gamma (T_P) assumes every used expert crosses the host link and that
nothing overlaps. This module builds the real path and measures it:

- `HostExpertStore`: each layer's routed experts in (pinned) host memory, one contiguous,
  256-byte aligned block per expert (gate, up, down back to back), from a `ModelSpec`.
- `ExpertCache`: C device slots and the slot table (layer, expert) -> slot. Pure
  bookkeeping: LRU eviction, or Belady (evict the expert used farthest in the future,
  optimal given the routing: the bound LRU is measured against). Slots in use by an
  in-flight compute are pinned and never chosen as victims. Hits, misses, evictions exact.
- `Prefetcher`: given a layer's used experts (dispatch's `used_experts`), acquires their
  slots and issues the misses on a side stream, one event per expert, so that each
  expert's GEMM waits only for its own weights. Two transfer paths: the copy engine
  (`copy_(non_blocking=True)` from pinned memory) and the Triton gather kernel that reads
  pinned host memory straight from the SMs (zero-copy over the host link,
  `_gather_triton.py`). A slot is overwritten only after the compute that last read it
  has finished (the copy stream waits on that compute's event).
  Without a GPU, a worker thread plays the side stream and `threading.Event`s play the
  CUDA events: the very same scheduler code runs (`_ThreadLanes` vs `_CudaLanes`).
- Lookahead (optional): while layer l computes, start copying layer l+1's *predicted*
  experts, predicted from layer l's routing by a per-layer transition histogram learned
  online; the prediction's hit rate is counted.
"""

from __future__ import annotations

import collections
import math
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moelab.costmodel.specs import ModelSpec, SpecError

Key = tuple[int, int]  # (layer, expert)

# Each expert block starts 256-byte aligned: its stride in int32 words is a multiple of 16,
# which lets Triton prove 128-bit alignment and vectorize the gather's loads and stores.
ALIGN = 256


# ---------------------------------------------------------------------------------------
# Device expert cache: bookkeeping only (which expert lives in which slot)
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# Host expert store: every routed expert of the chosen layers, in pinned host memory
# ---------------------------------------------------------------------------------------

# Storage of one expert dtype: (torch dtype of a typed view or None, bytes per parameter).
# Block-scaled 4-bit formats are kept as raw bytes (values and scales): what crosses the
# link is their byte count, DTYPE_BYTES (4.25 bits for mxfp4).
_TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "float8_e4m3fn"}


# Per int32 word: 0xBFFFFFFF (fp32), 0xBFFFBFFF (two 16-bit floats), 0xBFBFBFBF (four fp8).
_FINITE_MASK = {"fp32": -0x40000001, "bf16": -0x40004001, "fp16": -0x40004001,
                "fp8": -0x40404041}


def _signature(layer: int, expert: int) -> int:
    """A distinct int32 per (layer, expert): XORed into the layer's random base block."""
    return ((layer * 1_000_003 + expert + 1) * 2654435761) % (2**31 - 1) + 1


class HostExpertStore:
    """Routed-expert weights of `layers` MoE layers: `[E, block_bytes]` uint8 per layer.

    One contiguous block per expert (gate, up, down back to back, each `[rows, cols]` in the
    expert dtype), 256-byte aligned. `scale` shrinks hidden and intermediate sizes (1.0 is
    the model's true expert size); `experts` limits how many experts per layer are stored
    (default: all E). Memory is pinned when CUDA is available (zero-copy and async copies
    need page-locked memory). Contents are random (a random base block per layer XORed
    with a per-expert signature), so that a wrong block or a wrong offset is detected.
    """

    def __init__(self, model: ModelSpec, *, layers: int = 1, experts: int | None = None,
                 scale: float = 1.0, pin: bool | None = None, seed: int = 0):
        if not 0 < scale <= 1:
            raise SpecError(f"scale: must be in (0, 1], got {scale}")
        if layers < 1:
            raise SpecError(f"layers: at least 1, got {layers}")
        self.model = model
        self.n_layers = layers
        self.n_experts = model.n_experts if experts is None else int(experts)
        if not 1 <= self.n_experts <= model.n_experts:
            raise SpecError(f"experts: must be in [1, {model.n_experts}], got {experts}")
        self.hidden = max(1, round(model.hidden * scale))
        self.intermediate = max(1, round(model.expert_intermediate * scale))
        d, i = self.hidden, self.intermediate
        shapes = [("gate", (i, d)), ("up", (i, d)), ("down", (d, i))]
        if not model.gated:
            shapes = shapes[1:]
        # Byte layout of one block: (name, shape, byte offset, bytes).
        self.parts, offset = [], 0
        for name, shape in shapes:
            nbytes = math.ceil(shape[0] * shape[1] * model.f_e)
            self.parts.append((name, shape, offset, nbytes))
            offset += nbytes
        self.expert_bytes = offset  # what one expert costs to move (S_E f_E at scale 1)
        self.block_bytes = -(-offset // ALIGN) * ALIGN
        self.pinned = torch.cuda.is_available() if pin is None else bool(pin)
        # Random bits would hold NaNs and infinities: clearing each float's top exponent bit
        # keeps every value finite (|w| < 2), so the weights feed a real GEMM.
        mask = _FINITE_MASK.get(model.expert_dtype, -1)
        g = torch.Generator().manual_seed(seed)
        self.blocks: list[torch.Tensor] = []
        for layer in range(layers):
            words = torch.empty((self.n_experts, self.block_bytes // 4), dtype=torch.int32,
                                pin_memory=self.pinned)
            base = torch.randint(-(2**31), 2**31 - 1, (self.block_bytes // 4,),
                                 dtype=torch.int32, generator=g)
            for e in range(self.n_experts):
                torch.bitwise_xor(base, _signature(layer, e), out=words[e])
                words[e].bitwise_and_(mask)
            self.blocks.append(words.view(torch.uint8))

    @property
    def nbytes(self) -> int:
        return self.n_layers * self.n_experts * self.block_bytes

    def block(self, layer: int, expert: int) -> torch.Tensor:
        """`[block_bytes]` uint8: the expert's block in host memory."""
        return self.blocks[layer][expert]

    def words(self, layer: int) -> torch.Tensor:
        """`[E, block_bytes / 4]` int32: the layer's blocks as the gather kernel reads them."""
        return self.blocks[layer].view(torch.int32)

    def views(self, block: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed weight matrices inside one block (host or device): name -> `[rows, cols]`.

        4-bit block-scaled dtypes have no torch dtype: their raw bytes are returned.
        """
        dtype = _TORCH_DTYPE.get(self.model.expert_dtype)
        out = {}
        for name, shape, offset, nbytes in self.parts:
            raw = block[offset : offset + nbytes]
            out[name] = raw.view(getattr(torch, dtype)).view(shape) if dtype else raw
        return out


# ---------------------------------------------------------------------------------------
# Lanes: CUDA streams and events, or a worker thread and threading.Events on a CPU
# ---------------------------------------------------------------------------------------


class _CudaLanes:
    """The compute lane is the current stream; the transfer lane a side stream."""

    name = "cuda streams"

    def __init__(self, device):
        self.device = torch.device(device)
        self.side = torch.cuda.Stream(device=self.device)

    def side_wait(self, event) -> None:
        if event is not None:
            self.side.wait_event(event)

    def side_run(self, fn) -> None:
        with torch.cuda.stream(self.side):
            fn()

    def side_record(self):
        event = torch.cuda.Event()
        event.record(self.side)
        return event

    def compute_wait(self, event) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def compute_record(self):
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def synchronize(self) -> None:
        self.side.synchronize()  # host synchronization: waits for every issued transfer

    def close(self) -> None:
        self.synchronize()


class _ThreadLanes:
    """CPU stand-in for streams: a worker thread runs the transfer lane's queue in order;
    `threading.Event`s stand for CUDA events. The compute lane is the caller's thread,
    so its work is finished when issued and its events are set at once."""

    name = "cpu threads"

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._worker = threading.Thread(target=self._run, name="moelab-transfer", daemon=True)
        self._worker.start()

    def _run(self):
        while True:
            fn = self._queue.get()
            if fn is None:  # close()
                return
            try:
                if self._error is None or isinstance(fn, _SetEvent):
                    fn()  # after a failure only events are set, so that nobody waits forever
            except BaseException as e:  # reported on the compute lane's next wait
                self._error = e

    def _check(self):
        if self._error is not None:
            raise RuntimeError("transfer lane failed") from self._error

    def side_wait(self, event) -> None:
        if event is not None:
            self._queue.put(event.wait)

    def side_run(self, fn) -> None:
        self._queue.put(fn)

    def side_record(self):
        event = threading.Event()
        self._queue.put(_SetEvent(event))
        return event

    def compute_wait(self, event) -> None:
        if event is not None:
            event.wait()
        self._check()

    def compute_record(self):
        event = threading.Event()
        event.set()
        return event

    def synchronize(self) -> None:
        self.side_record().wait()
        self._check()

    def close(self) -> None:
        """Finish the queued transfers, end the worker thread, raise a transfer's error."""
        self._queue.put(None)
        self._worker.join()
        self._check()


class _SetEvent:
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self):
        self.event.set()


# ---------------------------------------------------------------------------------------
# Prefetcher
# ---------------------------------------------------------------------------------------

PATHS = ("copy", "gather")


class LayerFetch:
    """A layer's used experts, each with its slot and its own ready event.

    `weights(e)` makes the compute lane wait for expert e's copy only; `release()` after
    the layer's GEMMs have been issued frees the slots (once those GEMMs finish).
    """

    def __init__(self, prefetcher: Prefetcher, layer: int, experts: list[int],
                 slots: dict[int, int], ready: dict[int, object]):
        self.prefetcher = prefetcher
        self.layer = layer
        self.experts = experts  # ascending, as dispatch's used_experts
        self.slots = slots  # expert -> device slot
        self.ready = ready  # expert -> event: its weights are in the slot
        self.released = False

    def block(self, expert: int) -> torch.Tensor:
        """`[block_bytes]` uint8 device slot of `expert`, once its copy has finished."""
        self.prefetcher.lanes.compute_wait(self.ready[expert])
        return self.prefetcher.slots[self.slots[expert]]

    def weights(self, expert: int) -> dict[str, torch.Tensor]:
        return self.prefetcher.store.views(self.block(expert))

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.prefetcher._release(self)


class Prefetcher:
    """Brings a layer's used experts into the device cache over the host link.

    path "copy": one `copy_(non_blocking=True)` per missed expert (the copy engine);
    path "gather": one Triton gather launch per missed expert (the SMs read pinned host
    memory directly). Both run on the transfer lane and record one event per expert.
    lookahead=True: after each fetch of layer l, the predicted experts of layer l+1 are
    copied at once (see `predict`); `stats()` reports the prediction's hit rate.
    """

    def __init__(self, store: HostExpertStore, n_slots: int, *, device=None, path: str = "copy",
                 policy: str = "lru", future: Sequence[Key] | None = None,
                 lookahead: bool = False):
        # Every check before the lanes start: a refused prefetcher leaves no thread behind.
        if path not in PATHS:
            raise SpecError(f"path: unknown transfer path {path!r} (known: copy, gather)")
        if lookahead and policy == "belady":
            raise SpecError("lookahead: Belady needs the exact access sequence; use LRU")
        self.store = store
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.path = path
        self.cache = ExpertCache(n_slots, policy, future)
        self.slots = torch.empty((n_slots, store.block_bytes), dtype=torch.uint8,
                                 device=self.device)
        cuda = self.device.type == "cuda"
        self.lanes = _CudaLanes(self.device) if cuda else _ThreadLanes()
        self.slot_free: list = [None] * n_slots  # event: the last compute reading the slot ended
        self.slot_ready: list = [None] * n_slots  # event: the last copy into the slot ended
        self.lookahead = lookahead
        self.gather_route: str | None = None  # how the gather kernel reached host memory
        self.copies = 0
        self.bytes_copied = 0
        # Lookahead: layer -> {expert: (slot, ready event)} reserved ahead of its fetch.
        self._ahead: dict[int, dict[int, tuple[int, object]]] = {}
        self._transitions: dict[int, torch.Tensor] = {}  # layer l -> [E, E] counts l -> l+1
        self._last: tuple[int, list[int]] | None = None  # the previous fetch (layer, experts)
        self._predicted_layers: set[int] = set()  # layers whose fetch had a prediction
        self.predicted = 0
        self.predicted_used = 0
        self.used_after_prediction = 0
        # Gather path: one launch per expert on row views, so the index tensors are a
        # constant [0] made once (making them per launch would be a host copy each).
        self._zero = torch.zeros(1, dtype=torch.int64, device=self.device)
        if cuda:
            # Host synchronization, once: the side stream must not read the slots' or the
            # index's memory before the kernels that made them have run.
            torch.cuda.synchronize(self.device)

    # --- transfers ---
    def _issue_copy(self, layer: int, expert: int, slot: int):
        # Never overwrite a slot that a compute may still read: wait for its last reader.
        self.lanes.side_wait(self.slot_free[slot])
        if self.path == "copy":
            src = self.store.block(layer, expert)
            dst = self.slots[slot]
            self.lanes.side_run(lambda: dst.copy_(src, non_blocking=True))
        else:
            src = self.store.words(layer)[expert : expert + 1]
            dst = self.slots.view(torch.int32)[slot : slot + 1]

            def gather():
                from moelab.kernels._gather_triton import gather_blocks

                self.gather_route = gather_blocks(src, self._zero, dst, self._zero)

            self.lanes.side_run(gather)
        self.slot_ready[slot] = self.lanes.side_record()
        self.copies += 1
        self.bytes_copied += self.store.block_bytes

    def fetch(self, layer: int, experts) -> LayerFetch:
        """Acquire slots for a layer's used experts (a list, or dispatch's int64 tensor)
        and issue the misses; raises CacheFull when the slots not in use are too few."""
        if isinstance(experts, torch.Tensor):
            experts = experts.tolist()  # host synchronization when on a device (a few ints)
        experts = [int(e) for e in experts]
        if len(set(experts)) != len(experts):
            raise SpecError("experts: a layer's used experts must be distinct")
        if not 0 <= layer < self.store.n_layers:
            raise SpecError(f"layer: {layer} outside the store's {self.store.n_layers} layers")
        bad = [e for e in experts if not 0 <= e < self.store.n_experts]
        if bad:
            raise SpecError(f"experts: {bad} outside [0, {self.store.n_experts})")
        self._learn(layer, experts)
        ahead = self._ahead.pop(layer, {})
        slots, ready, acquired = {}, {}, []
        try:
            for e in experts:
                if e in ahead:  # reserved (and pinned) by the lookahead: its copy is issued
                    slots[e], ready[e] = ahead.pop(e)
                    acquired.append((layer, e))
                    self.predicted_used += 1
                    continue
                acc = self.cache.acquire((layer, e))
                acquired.append(acc.key)
                if not acc.hit:
                    self._issue_copy(layer, e, acc.slot)
                slots[e], ready[e] = acc.slot, self.slot_ready[acc.slot]
        except CacheFull:
            for key in acquired:
                self.cache.release(key)
            raise
        finally:
            # Mispredicted experts: their slots go back (the copy was wasted).
            for e in ahead:
                self.cache.release((layer, e))
        if layer in self._predicted_layers:
            self._predicted_layers.discard(layer)
            self.used_after_prediction += len(experts)
        fetch = LayerFetch(self, layer, experts, slots, ready)
        if self.lookahead and layer + 1 < self.store.n_layers:
            self._prefetch_ahead(layer + 1, self.predict(layer, experts, len(experts)))
        return fetch

    def _release(self, fetch: LayerFetch) -> None:
        done = self.lanes.compute_record()  # after the layer's GEMMs (issued before release)
        for e in fetch.experts:
            self.slot_free[fetch.slots[e]] = done
            self.cache.release((fetch.layer, e))

    def synchronize(self) -> None:
        self.lanes.synchronize()

    def close(self) -> None:
        """Wait for the issued transfers and stop the transfer lane (its thread on a CPU)."""
        self.lanes.close()

    # --- lookahead ---
    def _learn(self, layer: int, experts: list[int]) -> None:
        if self._last is not None and self._last[0] == layer - 1:
            counts = self._transitions.setdefault(
                layer - 1, torch.zeros((self.store.n_experts, self.store.n_experts)))
            prev = torch.tensor(self._last[1], dtype=torch.int64)
            cur = torch.tensor(experts, dtype=torch.int64)
            if prev.numel() and cur.numel():
                counts[prev.unsqueeze(1), cur.unsqueeze(0)] += 1
        self._last = (layer, experts)

    def predict(self, layer: int, experts: list[int], n: int) -> list[int]:
        """Layer l+1's likely experts from layer l's: the n with most co-occurrences in the
        transition histogram seen so far; before any history, the same expert ids."""
        counts = self._transitions.get(layer)
        if counts is None or not experts or counts[experts].sum() == 0:
            return sorted(experts)[:n]
        score = counts[torch.tensor(experts)].sum(0)
        top = torch.argsort(score, descending=True, stable=True)[:n]
        return sorted(int(e) for e in top if score[e] > 0)

    def _prefetch_ahead(self, layer: int, experts: list[int]) -> None:
        reserved = {}
        for e in experts:
            try:
                acc = self.cache.acquire((layer, e))
            except CacheFull:
                break  # the slots not in use are taken: predict no further
            if not acc.hit:
                self._issue_copy(layer, e, acc.slot)
            reserved[e] = (acc.slot, self.slot_ready[acc.slot])
        self._ahead[layer] = reserved
        self.predicted += len(reserved)
        self._predicted_layers.add(layer)

    def stats(self) -> dict:
        out = self.cache.stats()
        out.update(
            path=self.path,
            lanes=self.lanes.name,
            gather_route=self.gather_route,
            copies=self.copies,
            bytes_copied=self.bytes_copied,
        )
        if self.lookahead:
            out.update(
                lookahead_predicted=self.predicted,
                lookahead_used=self.predicted_used,
                # precision: predicted experts that the layer then used
                lookahead_hit_rate=self.predicted_used / self.predicted if self.predicted else
                float("nan"),
                # recall: used experts that had been predicted
                lookahead_coverage=(self.predicted_used / self.used_after_prediction
                                    if self.used_after_prediction else float("nan")),
            )
        return out
