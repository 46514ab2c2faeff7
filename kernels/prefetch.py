"""Expert offload done properly: the prefetcher that fills the device expert cache from the host store.

The offload side of gamma (T_P) assumes every used expert crosses the host link and that
nothing overlaps. This module builds the real path and measures it:

- `HostExpertStore` (`expert_store.py`): each layer's routed experts in pinned host memory.
- `ExpertCache` (`expert_cache.py`): C device slots and the slot table (layer, expert) ->
  slot, LRU or Belady; pure bookkeeping.
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

import contextlib
import queue
import threading
import weakref
from collections.abc import Sequence

import torch

from moelab.costmodel.specs import SpecError
from moelab.kernels.expert_cache import CacheFull, ExpertCache, Key
from moelab.kernels.expert_store import HostExpertStore

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


def _finish_lanes(lanes, slots) -> None:
    """The prefetcher's finaliser: wait for in-flight copies into `slots`, then let go.
    A transfer's error cannot be raised from a finaliser: it is dropped here."""
    with contextlib.suppress(Exception):
        lanes.close()


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
        # Dropped without close(): wait for the copies in flight before the slots' memory
        # goes back to the allocator (the copy engine may still be writing it). The
        # finaliser holds the slots, not the prefetcher, so it never keeps it alive.
        self._finalizer = weakref.finalize(self, _finish_lanes, self.lanes, self.slots)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
        """Wait for the issued transfers and stop the transfer lane (its thread on a CPU);
        raises a transfer's error. Also what `with Prefetcher(...)` does on exit."""
        if self._finalizer.detach() is not None:  # only once
            self.lanes.close()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

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
