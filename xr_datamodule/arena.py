"""The cell arena: decoded cells in a bounded set of slots, shared by two threads.

Out of core, :class:`~xr_datamodule.gather.ChunkedReader` decodes the cells a batch needs
into slots of one preallocated array (``cache_cells`` slots, each as large as the largest
cell) and gathers the batch from there. The slots are reused least recently used first.
Threads that use an arena: the *consumer* (the thread that reads a batch) and background
*prefetches* that decode the cells of the batches to come meanwhile (one batch ahead, or
several for a remote store, whose reads wait mostly on the network).

The protocol, all under one lock:

* a cell is *busy* while a thread decodes it into its slot, *pinned* while a consumer
  holds it (from the moment :meth:`CellArena.slots_for` finds or assigns its slot, inside
  that same critical section, until the consumer calls :meth:`CellArena.unpin`), and
  *ready* otherwise;
* **a busy or pinned cell is never evicted**: only ready cells (least recently used first)
  and free slots are given to other cells. A consumer that waits for a cell another thread
  decodes releases the lock while waiting, so it pins what it asked for *before* waiting;
  nothing it was given can be taken while it waits;
* a prefetch never waits and never pins: it decodes what fits beside busy and pinned cells
  and skips the rest. The cells of the batches to come are *reserved* (:meth:`reserve`)
  until the consumer has read the batch that needs them: another prefetch never replaces a
  reserved cell, a consumer only when nothing else is left. Without this,
  least-recently-used order would let a prefetch several batches ahead replace the cells
  fetched for the very next batch (they were fetched before that batch was read).

An arena pickles empty: each DataLoader worker starts with its own.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

from xr_datamodule.cells import CellGrid
from xr_datamodule.decode import DecodeJob

__all__ = ["CellArena"]


class CellArena:
    """Slots of decoded cells, least recently used first, with the protocol above.

    Args:
        grid: The cells.
        window_dims: The windowed dims (cell regions are given by dim).
        n_channels: Channels of a cell (every read variable's).
        dtype: Dtype of the decoded values.
        cache_cells: Slots (fewer than a sample touches: its cells are read in waves).
        fill: Decodes jobs into their views (and prepares them); raises on failure.
    """

    def __init__(
        self,
        grid: CellGrid,
        window_dims: Sequence[str],
        n_channels: int,
        dtype: np.dtype,
        cache_cells: int,
        fill: Callable[[Sequence[DecodeJob]], None],
    ) -> None:
        self.grid, self.window_dims = grid, tuple(window_dims)
        self.n_channels, self.dtype, self.fill = n_channels, dtype, fill
        self.cache_cells = max(1, int(cache_cells))
        self.block: np.ndarray | None = None  # (slot, channel, *cell), on first use
        self.slots: OrderedDict[int, int] = OrderedDict()  # cell -> slot, LRU
        self.free: list[int] = []  # slots holding no cell
        self.busy: set[int] = set()  # cells being decoded (by another thread)
        self.pinned: Counter[int] = Counter()  # cells a consumer is copying from
        self.reserved: dict[int, int] = {}  # cell -> consumer reads it is reserved through
        self.reads = 0  # consumer reads so far
        self.lock = threading.Lock()  # the bookkeeping above
        self.ready = threading.Condition(self.lock)  # a decoding finished
        self.cells_read = 0

    def __getstate__(self) -> dict:
        return {
            key: self.__dict__[key]
            for key in ("grid", "window_dims", "n_channels", "dtype", "cache_cells", "fill")
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def reset(self, cache_cells: int | None = None) -> None:
        """Drop every cell (and the memory); ``cache_cells`` slots from now on if given."""
        if cache_cells is not None:
            self.cache_cells = max(1, int(cache_cells))
        with self.lock:
            self.block, self.slots, self.free = None, OrderedDict(), []
            self.reserved = {}

    def held_blocks(self) -> list[np.ndarray]:
        """The ``(channel, *cell)`` block of every slot (empty before the first read)."""
        return [] if self.block is None else list(self.block)

    def slots_for(self, keys: Sequence[int], wait: bool = True) -> list[int]:
        """Slots holding the cells ``keys``, decoding the missing ones.

        The cached ones are marked recent first, so that the missing ones replace other
        cells; busy and pinned cells are never replaced. A consumer (``wait``) pins
        ``keys`` (it calls :meth:`unpin` once it has copied) and waits for the cells another
        thread is decoding; a prefetch (not ``wait``) does neither. When no slot can be
        replaced the remaining keys are skipped (their slot is -1): a consumer's batch
        always fits (the reader reads in waves otherwise), a prefetch may not.
        """
        with self.lock:
            self._ensure_block()
            # A background decode may hold the slots this read needs (a prefetch for a batch
            # that does not come next: a validation batch in between, a resume): wait for it.
            while wait and self.busy and not self._fits(keys):
                self.ready.wait()
            if wait:  # pinned before the lock is ever released below
                self.pinned.update(keys)
                self.reads += 1
            for key in keys:
                if key in self.slots:
                    self.slots.move_to_end(key)
            others = [key for key in keys if key in self.busy]  # decoded by another thread
            missing = []
            avoid = set(keys) | self.busy | set(self.pinned)
            kept = self._live_reservations()
            for key in keys:
                if key in self.slots:
                    continue
                slot = self._replaceable(avoid | kept)
                if slot is None and wait:  # a consumer's batch comes first
                    slot = self._replaceable(avoid)
                if slot is None:
                    break
                self.slots[key] = slot
                self.busy.add(key)
                missing.append((key, slot))
            jobs = [self._job(key, slot) for key, slot in missing]
        try:
            if jobs:
                self.fill(jobs)
        except BaseException:
            with self.ready:
                for key, slot in missing:  # these slots hold no valid cell now
                    del self.slots[key]
                    self.reserved.pop(key, None)
                    self.free.append(slot)
                    self.busy.discard(key)
                if wait:
                    self._unpin_locked(keys)
                self.ready.notify_all()
            raise
        with self.ready:
            self.busy.difference_update(key for key, _ in missing)
            self.cells_read += len(missing)
            self.ready.notify_all()
            while wait and any(key in self.busy for key in others):
                self.ready.wait()
            if not wait or all(key in self.slots for key in others):
                return [self.slots.get(key, -1) for key in keys]
            self._unpin_locked(keys)  # another thread's decoding of one failed: again
        return self.slots_for(keys)

    def touch(self, keys: Sequence[int]) -> None:
        """Mark the cached ones of ``keys`` used now, in the order given (the last newest)."""
        with self.lock:
            for key in keys:
                if key in self.slots:
                    self.slots.move_to_end(key)

    def _ensure_block(self) -> None:
        """Allocate the slots on first use (under the lock)."""
        if self.block is None:
            shape = (self.cache_cells, self.n_channels, *self.grid.cell_shape)
            self.block = np.empty(shape, dtype=self.dtype)
            self.free = list(range(self.cache_cells - 1, -1, -1))

    def unpin(self, keys: Sequence[int]) -> None:
        """A consumer is done with the cells ``keys`` (pinned by :meth:`slots_for`)."""
        with self.lock:
            self._unpin_locked(keys)

    def _unpin_locked(self, keys: Sequence[int]) -> None:
        self.pinned.subtract(keys)
        self.pinned += Counter()  # drop the cells no consumer holds any more

    def _fits(self, keys: Sequence[int]) -> bool:
        """Whether the cells ``keys`` lack fit in slots no other thread is using."""
        wanted = set(keys)
        missing = sum(1 for key in wanted if key not in self.slots)
        held = wanted | self.busy | set(self.pinned)
        spare = sum(1 for key in self.slots if key not in held)
        return missing <= len(self.free) + spare

    def reserve(self, batches: Sequence[Sequence[int]]) -> None:
        """Keep the cells of each batch to come (the next first) until it has been read.

        Cells not cached yet are reserved too: a prefetch then fetches them into slots no
        other prefetch takes back.
        """
        with self.lock:
            for ahead, keys in enumerate(batches):
                # Through its read: one read later the cells of the batch after it need
                # the slots (an arena sized for two batches has no slot to spare).
                until = self.reads + ahead + 1
                for key in keys:
                    self.reserved[key] = max(until, self.reserved.get(key, 0))

    def _live_reservations(self) -> set[int]:
        """Reserved cells whose reservation still lasts."""
        expired = [key for key, until in self.reserved.items() if until < self.reads]
        for key in expired:
            del self.reserved[key]
        return set(self.reserved)

    def _replaceable(self, avoid: set[int]) -> int | None:
        """A free slot, or the slot of the least recently used cell not to be avoided."""
        if self.free:
            return self.free.pop()
        for key in self.slots:  # oldest first
            if key not in avoid:
                return self.slots.pop(key)
        return None

    def region(self, key: int) -> dict[str, slice]:
        """Where cell ``key`` lies, per windowed dim."""
        cell = np.unravel_index(key, self.grid.grid_shape)
        return {
            dim: slice(int(edges[i]), int(edges[i + 1]))
            for dim, edges, i in zip(self.window_dims, self.grid.edges, cell, strict=True)
        }

    def _job(self, key: int, slot: int) -> DecodeJob:
        return DecodeJob(self.region(key), self.cell_view(slot, key))

    def adopt(
        self,
        key: int,
        values: np.ndarray,
        keep: bool = True,
        copy: Callable[[np.ndarray, np.ndarray], object] = np.copyto,
    ) -> None:
        """Count cell ``key`` as read, decoded elsewhere (straight into a batch); ``keep`` a copy.

        A copy (``copy(slot, values)``) is kept only if a slot can be had without replacing
        a busy, pinned or reserved cell (the least recently used other cell is replaced).
        """
        with self.lock:
            self.cells_read += 1
            self._ensure_block()
            if not keep or key in self.slots or key in self.busy:
                return
            slot = self._replaceable(self.busy | set(self.pinned) | self._live_reservations())
            if slot is None:
                return
            self.slots[key] = slot
            self.busy.add(key)
        copy(self.cell_view(slot, key), values)
        with self.ready:
            self.busy.discard(key)
            self.ready.notify_all()

    def cell_view(self, slot: int, key: int) -> np.ndarray:
        """The ``(channel, *cell)`` view of cell ``key`` in ``slot``."""
        assert self.block is not None
        cell = np.unravel_index(key, self.grid.grid_shape)
        edges = self.grid.edges
        lengths = [int(e[i + 1] - e[i]) for e, i in zip(edges, cell, strict=True)]
        region: tuple[int | slice, ...] = (slot, slice(None), *(slice(0, n) for n in lengths))
        return self.block[region]
