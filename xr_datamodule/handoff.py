"""Batch memory: reused buffers in the main process, shared-memory rings in workers.

Where a batch is gathered decides what it costs to hand over.

* **In the main process** (no DataLoader workers) a batch is gathered into a buffer of a
  small pool (:func:`allocate`). A fresh allocation of a large batch pays a page fault per
  4 KiB page when it is first written, several times the cost of the gather itself. The
  buffer goes back to the pool when the
  last tensor or array viewing it is freed (a finalizer on the lease), never before, so a
  batch kept by the user is never overwritten.
* **In a DataLoader worker** a batch is gathered straight into a slot of the worker's ring
  of shared-memory slots (allocated once) and the worker returns a :class:`Ticket` (slot
  number and layout, a few dozen bytes). torch's own path allocates a new shared-memory
  segment per batch and passes its file descriptor over a socket with a handshake, which
  limits small batches to a fraction of what a ring delivers. Unpickling the ticket in the
  main process, which the DataLoader does as it receives the result, gives tensors that
  view the slot (no copy); the slot is released when the last of them is freed, and the
  worker writes a slot only after it was released (a flag per slot in shared memory). When
  no slot is free the batch takes torch's normal path.

The ring's flags, and each slot's memory on its first use, travel attached to tickets until
the main process confirms it has mapped them.
"""

from __future__ import annotations

import contextvars
import multiprocessing
import os
import secrets
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import get_worker_info

__all__ = [
    "DEFAULT_RING_SLOTS",
    "Ticket",
    "aligned",
    "allocate",
    "release_memory",
    "send",
    "waiting_for_buffers",
]

DEFAULT_RING_SLOTS = 4  # torch's default prefetch_factor (2) plus two

_ALIGN = 64  # byte alignment of each array within a buffer (any dtype can view it)
_POOL_BUFFERS = 4  # buffers the main process keeps for reuse
_POOL_MIN_BYTES = 2**20  # smaller batches are cheap to allocate afresh
_EAGER_RING_BYTES = 256 * 2**20  # a worker's ring up to this size is made whole at once
_FREE, _BUSY = 0, 1  # a slot's flag
_ATTACHED = -1  # index of the state entry that holds the token the main process mapped

# A lock taken and released is a full memory barrier: it keeps the writes into a slot
# before the store that hands it over (and the flag check before the writes), also on CPUs
# with weaker memory ordering than x86.
_barrier = threading.Lock()


def _fence() -> None:
    with _barrier:
        pass


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to the alignment of arrays within a batch buffer."""
    return -(-nbytes // _ALIGN) * _ALIGN


def _lease(region: np.ndarray, release: Any, *args: Any) -> np.ndarray:
    """A fresh uint8 array over ``region`` that calls ``release(*args)`` once it is freed.

    Views of the lease (numpy or torch) keep the lease itself alive, not only the memory
    under it, because the lease does not own its memory: the finalizer runs only when the
    last of them is gone.
    """
    lease = np.frombuffer(memoryview(region), dtype=np.uint8)
    weakref.finalize(lease, release, *args)
    return lease


# ----------------------------------------------------------------------- main process pool


# Set while a batch is read ahead in the background (:func:`waiting_for_buffers`): the event
# that ends its wait for a buffer to come back.
_waiting: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "xr_datamodule_waiting_for_buffers", default=None
)
_MOST_WAIT_S = 1.0  # a loop that keeps its batches gets a new buffer after this long


@contextmanager
def waiting_for_buffers(until: threading.Event) -> Iterator[None]:
    """In this block, the main process's pool waits for a lent buffer to come back.

    It waits rather than make another buffer, until ``until`` is set or a second has
    passed. A batch read ahead in the background so waits for the buffer the training loop
    lets go of once it moves on to the next batch: two buffers in turn, not three.
    """
    token = _waiting.set(until)
    try:
        yield
    finally:
        _waiting.reset(token)


class _Pool:
    """Buffers of the main process, lent out and given back when their lease is freed."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.free: list[np.ndarray] = []
        self.lent = 0
        # Reentrant: a lease's finalizer (give_back) may run in a thread that holds it.
        self.lock = threading.RLock()
        self.returned = threading.Condition(self.lock)

    def take(self, nbytes: int) -> np.ndarray:
        with self.lock:
            until = _waiting.get()
            if until is not None:
                deadline = time.monotonic() + _MOST_WAIT_S
                while (
                    self.lent
                    and not any(b.nbytes >= nbytes for b in self.free)
                    and not until.is_set()
                    and time.monotonic() < deadline
                ):
                    self.returned.wait(0.01)
            fitting = [b for b in self.free if b.nbytes >= nbytes]
            if fitting:
                buffer = min(fitting, key=len)
                self.free.remove(buffer)
            elif self.lent + len(self.free) < _POOL_BUFFERS or self.free:
                if self.free:  # all too small: replace the smallest
                    self.free.remove(min(self.free, key=len))
                buffer = np.empty(aligned(nbytes), dtype=np.uint8)
            else:
                return np.empty(nbytes, dtype=np.uint8)  # the pool is out: plain memory
            self.lent += 1
        return _lease(buffer[:nbytes], self.give_back, buffer)

    def give_back(self, buffer: np.ndarray) -> None:
        with self.lock:
            self.lent -= 1
            self.free.append(buffer)
            self.returned.notify_all()


_pool = _Pool()


def _main_pool() -> _Pool:
    global _pool
    if _pool.pid != os.getpid():  # forked: the parent's buffers are not ours to lend
        _pool = _Pool()
    return _pool


# ----------------------------------------------------------------------- worker rings


class _Ring:
    """The sending side, in one worker process: slots and their shared flags.

    Each slot is its own shared-memory segment. torch shares a tensor's memory by copying
    it into a new segment, which writes every page: a ring made whole holds all its slots
    resident from the start, also the ones a worker rarely needs (slots are taken lowest
    first). A ring of up to ``_EAGER_RING_BYTES`` is made whole at once, so that a worker's
    memory is what it stays from the first batch on; a larger one gets each slot when it
    is first taken (at 299 MB a batch, the four slots of a whole ring were 1.2 GB per
    worker before a single batch was read).
    """

    def __init__(self, slots: int, slot_bytes: int) -> None:
        self.slots = slots
        self.slot_bytes = slot_bytes
        # Identifies the ring in the main process even if a later worker reuses the pid.
        self.token = secrets.randbits(62) + 1
        self.data: list[torch.Tensor | None] = [None] * slots
        self.data_views: list[np.ndarray | None] = [None] * slots
        # A flag per slot, then per slot whether the main process has mapped it, then the
        # token of the ring the main process mapped (_ATTACHED).
        self.state = torch.zeros(2 * slots + 1, dtype=torch.int64).share_memory_()
        self.state_view = self.state.numpy()
        if slots * slot_bytes <= _EAGER_RING_BYTES:
            for slot in range(slots):
                self._make(slot)

    def take(self) -> int | None:
        """A free slot, marked busy (the lowest, so rarely needed slots stay untouched)."""
        free = np.flatnonzero(self.state_view[: self.slots] == _FREE)
        if not free.size:
            return None
        slot = int(free[0])
        if self.data[slot] is None:
            self._make(slot)
        _fence()
        self.state_view[slot] = _BUSY
        return slot

    def _make(self, slot: int) -> None:
        tensor = torch.empty(self.slot_bytes, dtype=torch.uint8).share_memory_()
        self.data[slot], self.data_views[slot] = tensor, tensor.numpy()

    def region(self, slot: int, nbytes: int) -> np.ndarray:
        view = self.data_views[slot]
        assert view is not None  # taken slots have their memory
        return view[:nbytes]

    def mapped(self, slot: int) -> bool:
        """Whether the main process has mapped the slot's memory (it then needs no copy)."""
        return bool(self.state_view[self.slots + slot])


class _Sender:
    """Per-process holder of the worker's ring and of the slot being filled."""

    def __init__(self) -> None:
        self.pid = -1
        self.ring: _Ring | None = None
        self.filling: tuple[_Ring, int, np.ndarray] | None = None  # ring, slot, its region

    def ring_for(self, slots: int, nbytes: int) -> _Ring:
        if self.pid != os.getpid():  # forked: the parent's ring (if any) is not ours
            self.pid, self.ring, self.filling = os.getpid(), None, None
        ring = self.ring
        if ring is None or ring.slots != slots or ring.slot_bytes < nbytes:
            ring = self.ring = _Ring(slots, aligned(nbytes))
        return ring

    def abandon(self) -> None:
        """Free the slot being filled if no ticket was made for it (its batch failed)."""
        if self.filling is not None and self.pid == os.getpid():
            ring, slot, _ = self.filling
            ring.state_view[slot] = _FREE
        self.filling = None


_sender = _Sender()


def allocate(nbytes: int, ring_slots: int = DEFAULT_RING_SLOTS) -> np.ndarray:
    """Memory for one batch: a uint8 array of ``nbytes``, where handing it over is cheapest.

    In a DataLoader worker, a free slot of the worker's shared-memory ring (``ring_slots``
    slots; :func:`send` then makes a ticket without copying); in the main process, a buffer
    of the reuse pool, given back when every view of it is freed; otherwise fresh memory.

    Example:
        >>> buffer = allocate(3 * 2**20)
        >>> buffer.nbytes, buffer.dtype
        (3145728, dtype('uint8'))
    """
    if get_worker_info() is None:
        if nbytes < _POOL_MIN_BYTES:
            return np.empty(nbytes, dtype=np.uint8)
        return _main_pool().take(nbytes)
    _sender.abandon()
    ring = _sender.ring_for(max(2, int(ring_slots)), max(nbytes, _ALIGN))
    slot = ring.take()
    if slot is None:
        return np.empty(nbytes, dtype=np.uint8)
    region = ring.region(slot, nbytes)
    _sender.filling = (ring, slot, region)
    return region


# ----------------------------------------------------------------------- tickets


# Where one array lies in a slot: (byte offset, byte count, dtype, shape).
_Part = tuple[int, int, np.dtype, tuple[int, ...]]


class Ticket:
    """A batch waiting in a worker's ring; unpickled in the main process, it becomes tensors.

    Outside a DataLoader worker nothing creates tickets; :func:`send` returns them.
    """

    def __init__(self, ring: _Ring, slot: int, layout: list[_Part]) -> None:
        self.ring = ring
        self.slot = slot
        self.layout = layout

    def __reduce__(self) -> tuple[Any, tuple]:
        ring = self.ring
        state = None if ring.state_view[_ATTACHED] == ring.token else ring.state
        data = None if ring.mapped(self.slot) else ring.data[self.slot]
        return _receive, (os.getpid(), ring.token, self.slot, self.layout, state, data)


def _within(array: np.ndarray, region: np.ndarray) -> int | None:
    """Byte offset of a C-contiguous ``array`` inside ``region``, or None if it is not there."""
    if not array.flags.c_contiguous:
        return None
    start = array.__array_interface__["data"][0] - region.__array_interface__["data"][0]
    return start if 0 <= start and start + array.nbytes <= region.nbytes else None


def send(arrays: Sequence[np.ndarray], slots: int = DEFAULT_RING_SLOTS) -> Ticket | None:
    """In a DataLoader worker: the ticket for arrays (e.g. inputs and targets of a batch).

    Arrays gathered into the slot :func:`allocate` gave are sent as they lie; others are
    copied into a free slot.

    Args:
        arrays: The batch's arrays.
        slots: Ring slots (at least the worker's prefetch depth plus two).

    Returns:
        The ticket, or ``None`` when no slot is free (return the tensors the usual way).
    """
    filling, _sender.filling = _sender.filling, None
    if filling is not None and _sender.pid == os.getpid():
        ring, slot, region = filling
        offsets = [_within(array, region) for array in arrays]
        if all(offset is not None for offset in offsets):
            layout = [
                (int(offset), array.nbytes, array.dtype, array.shape)
                for array, offset in zip(arrays, offsets, strict=True)
            ]
            _fence()
            return Ticket(ring, slot, layout)
        ring.state_view[slot] = _FREE  # the batch lies elsewhere: copy it below
    total, offsets = 0, []
    for array in arrays:
        offsets.append(total)
        total += aligned(array.nbytes)
    ring = _sender.ring_for(max(2, int(slots)), max(total, _ALIGN))
    slot = ring.take()
    if slot is None:
        return None
    region = ring.region(slot, total)
    layout = []
    for array, offset in zip(arrays, offsets, strict=True):
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        region[offset : offset + flat.size] = flat
        layout.append((offset, flat.size, array.dtype, array.shape))
    _fence()
    return Ticket(ring, slot, layout)


# ----------------------------------------------------------------------- main process side


class _Mapped(NamedTuple):
    """A worker's ring as the main process maps it."""

    pid: int
    state: np.ndarray  # numpy views: a numpy store costs ~0.1 us, a torch one ~5 us
    slots: dict[int, np.ndarray]  # the slots mapped so far, by number
    tensors: list[torch.Tensor]  # the mapped tensors, which keep the memory mapped


# Rings of this process's workers, by token.
_rings: dict[int, _Mapped] = {}


def _attach(pid: int, token: int, state: torch.Tensor) -> None:
    """Map a worker's new ring; forget rings that nothing will be read from any more.

    Those are the rings of finished workers, and rings a worker replaced by a larger one.
    Batches still held keep their ring's memory mapped through their own references.
    """
    alive = {child.pid for child in multiprocessing.active_children()}
    for other, mapped in list(_rings.items()):
        if mapped.pid == pid or mapped.pid not in alive:
            del _rings[other]
    _rings[token] = _Mapped(pid, state.numpy(), {}, [state])
    _rings[token].state[_ATTACHED] = token


def release_memory() -> None:
    """Unmap the rings of finished workers and drop the reuse pool's idle buffers.

    Batches still held keep their memory through their own references; new batches get
    new memory. Called when a stage ends (``teardown``).
    """
    alive = {child.pid for child in multiprocessing.active_children()}
    for token, mapped in list(_rings.items()):
        if mapped.pid not in alive:
            del _rings[token]
    pool = _main_pool()
    with pool.lock:
        pool.free.clear()


def _release(state: np.ndarray, slot: int) -> None:
    _fence()
    state[slot] = _FREE


def _receive(
    pid: int,
    token: int,
    slot: int,
    layout: list[_Part],
    state: torch.Tensor | None,
    data: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """Tensors that view a ticket's slot; the slot is released when the last one is freed."""
    if state is not None and token not in _rings:
        _attach(pid, token, state)
    mapped = _rings.get(token)
    if mapped is None or (data is None and slot not in mapped.slots):
        raise RuntimeError(
            f"a batch from DataLoader worker {pid} refers to shared memory this process never "
            "received; was the worker's first result dropped? Please report this."
        )
    if data is not None and slot not in mapped.slots:
        mapped.slots[slot] = data.numpy()
        mapped.tensors.append(data)
        mapped.state[len(mapped.state) // 2 + slot] = 1  # the worker stops sending it
    end = max(offset + nbytes for offset, nbytes, _, _ in layout)
    whole = torch.from_numpy(_lease(mapped.slots[slot][:end], _release, mapped.state, slot))
    return tuple(
        whole[offset : offset + nbytes].view(_torch_dtype(dtype)).view(shape)
        for offset, nbytes, dtype, shape in layout
    )


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
