"""Worker → main process hand-off of batches through a small shared-memory ring per worker.

A DataLoader worker normally returns tensors; torch moves each one into a fresh
shared-memory segment (allocated, copied into, page-faulted, its file descriptor passed over a
socket with an authentication handshake) and the main process maps it. On the benchmark's
1 MB batches that costs more CPU than gathering the batch: a DataLoader whose two workers only
returned ready 1 MB tensors delivered ~720 MB/s on a 2-core machine, and the same workers
writing into a ring delivered 1.4-2.0 GB/s.

Here each worker allocates, once, a ring of ``slots`` shared-memory slots. A batch is copied
into the next free slot and the worker returns a :class:`Ticket` (slot number and layout, a
few dozen bytes). Unpickling the ticket in the main process, which the DataLoader does as it
receives the result, copies the slot into fresh tensors and marks the slot free. The main
process therefore owns ordinary tensors that nothing will overwrite, however long it keeps
them.

Safety does not depend on how the DataLoader schedules work: the worker writes a slot only
after the main process has released it (a shared counter), and returns ordinary tensors, the
normal torch path, whenever no slot is free. The DataLoader keeps at most ``prefetch_factor``
results per worker in flight, so ``prefetch_factor + 2`` slots are free whenever needed.

The ring travels once, attached to tickets until the main process confirms it has mapped it.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["Ticket", "send"]

_ALIGN = 64  # byte alignment of each array within a slot (any dtype can view it)
_CONSUMED, _ATTACHED, _PRODUCED = 0, 1, 2  # fields of a ring's shared state

# A lock taken and released is a full memory barrier: it keeps the copy out of a slot
# before the store that frees it (and the check before the write into it), also on CPUs
# with weaker memory ordering than x86.
_barrier = threading.Lock()


def _fence() -> None:
    with _barrier:
        pass


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


# Where one array lies in a slot: (byte offset, byte count, dtype, shape).
_Part = tuple[int, int, np.dtype, tuple[int, ...]]


class _Ring:
    """The sending side, in one worker process: slots and the shared counters."""

    def __init__(self, slots: int, slot_bytes: int) -> None:
        self.slots = slots
        self.slot_bytes = slot_bytes
        # Identifies the ring in the main process even if a later worker reuses the pid.
        self.token = secrets.randbits(62) + 1
        self.data = torch.empty(slots * slot_bytes, dtype=torch.uint8).share_memory_()
        self.state = torch.zeros(3, dtype=torch.int64).share_memory_()
        self.data_view, self.state_view = self.data.numpy(), self.state.numpy()
        self.produced = 0

    def free_slot(self) -> int | None:
        """The slot for the next batch, if the main process has released it."""
        if self.produced - int(self.state_view[_CONSUMED]) >= self.slots:
            return None
        _fence()
        return self.produced % self.slots


class _Sender:
    """Per-process holder of the worker's ring (a new process starts without one)."""

    def __init__(self) -> None:
        self.pid = -1
        self.ring: _Ring | None = None

    def ring_for(self, slots: int, nbytes: int) -> _Ring:
        if self.pid != os.getpid():  # forked: the parent's ring (if any) is not ours
            self.pid, self.ring = os.getpid(), None
        ring = self.ring
        if ring is None or ring.slots != slots or ring.slot_bytes < nbytes:
            ring = self.ring = _Ring(slots, nbytes)
        return ring


_sender = _Sender()


class Ticket:
    """A batch waiting in a worker's ring; unpickled in the main process, it becomes tensors.

    Outside a DataLoader worker nothing creates tickets; :func:`send` returns them.
    """

    def __init__(self, ring: _Ring, slot: int, layout: list[_Part]) -> None:
        self.ring = ring
        self.slot = slot
        self.sequence = ring.produced
        self.layout = layout

    def __reduce__(self) -> tuple[Any, tuple]:
        ring = self.ring
        attach = None if ring.state_view[_ATTACHED] == ring.token else (ring.data, ring.state)
        return _receive, (
            os.getpid(),
            ring.token,
            ring.slot_bytes,
            self.slot,
            self.sequence,
            self.layout,
            attach,
        )


def send(arrays: Sequence[np.ndarray], slots: int) -> Ticket | None:
    """In a DataLoader worker: copy arrays into the next ring slot and return its ticket.

    Args:
        arrays: C-contiguous arrays (e.g. inputs and targets of one batch).
        slots: Ring slots (at least the worker's prefetch depth plus two).

    Returns:
        The ticket, or ``None`` when no slot is free (return the tensors the usual way).
    """
    offsets, total = [], 0
    for array in arrays:
        offsets.append(total)
        total += _aligned(array.nbytes)
    ring = _sender.ring_for(max(2, int(slots)), max(total, _ALIGN))
    slot = ring.free_slot()
    if slot is None:
        return None
    base = slot * ring.slot_bytes
    target = ring.data_view
    layout = []
    for array, offset in zip(arrays, offsets, strict=True):
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        target[base + offset : base + offset + flat.size] = flat
        layout.append((offset, flat.size, array.dtype, array.shape))
    ticket = Ticket(ring, slot, layout)
    ring.produced += 1
    ring.state_view[_PRODUCED] = ring.produced
    return ticket


# ----------------------------------------------------------------------- main process side

# Rings of this process's workers, by token: (worker pid, data, state), the last two as numpy
# views (a numpy store costs ~0.1 us, a torch one ~5 us) kept beside the mapped tensors.
_rings: dict[int, tuple[int, np.ndarray, np.ndarray, tuple[torch.Tensor, torch.Tensor]]] = {}


def _attach(pid: int, token: int, data: torch.Tensor, state: torch.Tensor) -> None:
    """Map a worker's new ring; forget rings that nothing will be read from any more.

    Those are the rings of finished workers, and rings a worker replaced by a larger one,
    once every batch sent through them was received.
    """
    alive = {child.pid for child in multiprocessing.active_children()}
    for other, (other_pid, _, other_state, _) in list(_rings.items()):
        done = other_state[_CONSUMED] == other_state[_PRODUCED]
        if done and (other_pid == pid or other_pid not in alive):
            del _rings[other]
    _rings[token] = (pid, data.numpy(), state.numpy(), (data, state))
    _rings[token][2][_ATTACHED] = token


def _receive(
    pid: int,
    token: int,
    slot_bytes: int,
    slot: int,
    sequence: int,
    layout: list[_Part],
    attach: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, ...]:
    """Copy a ticket's slot into fresh tensors and release the slot."""
    if attach is not None and token not in _rings:
        _attach(pid, token, *attach)
    known = _rings.get(token)
    if known is None:
        raise RuntimeError(
            f"a batch from DataLoader worker {pid} refers to shared memory this process never "
            "received; was the worker's first result dropped? Please report this."
        )
    _, data, state, _ = known
    end = layout[-1][0] + layout[-1][1]
    base = slot * slot_bytes
    # numpy's copy, not torch's: torch parallelises it with OpenMP threads that then spin,
    # taking a core from the workers (main process CPU rose from 1.2 to 2.9 s per 1.5 GB).
    copied = data[base : base + end].copy()
    _fence()
    state[_CONSUMED] = sequence + 1
    return tuple(
        torch.from_numpy(copied[offset : offset + nbytes].view(dtype).reshape(shape))
        for offset, nbytes, dtype, shape in layout
    )
