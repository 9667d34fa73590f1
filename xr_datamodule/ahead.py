"""The next batch, read whole in a background thread while the current one is used.

Without DataLoader workers, a reader out of core normally decodes the next batch's *cells*
in the background and copies the batch out of them when it is asked for. Where a sample's
cells are big (a 0.25 deg global state: 100 MB a step), that keeps three batches' worth of
data at once: the batch the training loop holds, the next batch's cells, and the batch being
copied out of them. :class:`BatchAhead` instead reads the whole next batch in the background,
into the buffer the loop gave back last (it waits for it, see
:func:`~xr_datamodule.handoff.waiting_for_buffers`), through an arena that keeps only the
cells the batch after reuses: the loop's batch, the next one and those cells.

Example:
    >>> import numpy as np
    >>> ahead = BatchAhead(lambda ids, epoch, seed: np.asarray(ids) * 10)
    >>> ahead.read([1, 2], upcoming=np.array([3, 4])).tolist()  # read now; [3, 4] started
    [10, 20]
    >>> ahead.read([3, 4]).tolist()  # the batch read in the background
    [30, 40]
    >>> ahead.close()
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

import numpy as np

from xr_datamodule import handoff
from xr_datamodule.perprocess import thread_pool

__all__ = ["BatchAhead"]

B = TypeVar("B")


class _Pending(Generic[B]):
    """A batch being read in the background, and what it was asked for with."""

    def __init__(self, key: tuple[np.ndarray, int | None, int | None]) -> None:
        self.key = key
        self.hurry = threading.Event()  # set when the loop waits for it: stop waiting for memory
        self.future: Future[B] | None = None

    def matches(self, key: tuple[np.ndarray, int | None, int | None]) -> bool:
        ids, epoch, seed = key
        return (epoch, seed) == self.key[1:] and np.array_equal(ids, self.key[0])


class BatchAhead(Generic[B]):
    """Reads each batch's successor in one background thread (one batch ahead).

    Args:
        read: Reads a batch: ``read(ids, epoch, seed)``.

    A batch read ahead is used only when it is the one asked for next (same sample numbers,
    epoch and seed); otherwise, and when its read failed, the batch is read again in the
    caller's thread (where an error then shows). Pickles without its thread or batch.
    """

    def __init__(self, read: Callable[[np.ndarray, int | None, int | None], B]) -> None:
        self._read = read
        self._thread = thread_pool(1)
        self._pending: _Pending[B] | None = None

    def __getstate__(self) -> dict[str, Any]:
        self.settle()
        return {"_read": self._read, "_thread": self._thread, "_pending": None}

    def read(
        self,
        ids: Sequence[int] | np.ndarray,
        upcoming: np.ndarray | None = None,
        epoch: int | None = None,
        seed: int | None = None,
    ) -> B:
        """The batch ``ids`` (read ahead if it was the one hinted); then start ``upcoming``."""
        key = (np.asarray(ids, dtype=np.int64), epoch, seed)
        batch = self._take(key)
        if batch is None:
            batch = self._read(key[0], epoch, seed)
        if upcoming is not None and len(upcoming):
            pending = self._pending = _Pending((np.asarray(upcoming, np.int64), epoch, seed))
            pending.future = self._thread.get().submit(self._read_ahead, pending)
        return batch

    def _read_ahead(self, pending: _Pending[B]) -> B:
        with handoff.waiting_for_buffers(pending.hurry):
            return self._read(*pending.key)

    def _take(self, key: tuple[np.ndarray, int | None, int | None]) -> B | None:
        pending, self._pending = self._pending, None
        if pending is None or pending.future is None:
            return None
        pending.hurry.set()
        if pending.future.exception() is not None:
            return None  # read again by the caller, which raises then
        return pending.future.result() if pending.matches(key) else None

    def settle(self) -> None:
        """Wait for the batch being read ahead and drop it."""
        self._take((np.empty(0, np.int64), None, None))

    def close(self) -> None:
        """Drop the batch read ahead and stop the thread."""
        self.settle()
        self._thread.close()
