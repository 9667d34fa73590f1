"""Seeded, epoch-aware sample orders and a batch sampler that hands out index arrays.

The DataLoader's own ``BatchSampler`` collects a Python list of ints per batch; ours slices
one numpy permutation per epoch, so the dataset's ``__getitems__`` receives an int64 array
and no per-sample object is built.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sized

import numpy as np
from torch.utils.data import BatchSampler, Sampler, SequentialSampler

__all__ = ["ArrayBatchSampler", "EpochShuffleSampler", "sample_order"]


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` that is a function of ``(seed, epoch)`` only.

    Lightning calls :meth:`set_epoch` before each training epoch. When nobody does (a plain
    ``for`` loop over the loader), each new iteration moves to the next epoch by itself, so
    the order still changes from epoch to epoch.

    Args:
        n: Number of samples.
        seed: Base seed.

    Example:
        >>> sampler = EpochShuffleSampler(5, seed=0)
        >>> sampler.set_epoch(3)
        >>> sorted(sampler.order().tolist())
        [0, 1, 2, 3, 4]
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n = int(n)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        self.epoch = int(epoch)

    def order(self) -> np.ndarray:
        """The permutation of the current epoch (int64)."""
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        self.epoch += 1
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.n


def sample_order(sampler: Iterable[int]) -> np.ndarray:
    """The order a sampler yields, as an int64 array (vectorised for the known samplers).

    Reading the order of an :class:`EpochShuffleSampler` also advances its epoch, exactly as
    iterating it would.
    """
    if isinstance(sampler, EpochShuffleSampler):
        order = sampler.order()
        sampler.epoch += 1
        return order
    if isinstance(sampler, SequentialSampler):
        return np.arange(len(sampler.data_source), dtype=np.int64)
    return np.fromiter(iter(sampler), dtype=np.int64)


class ArrayBatchSampler(BatchSampler):
    """Yields batches of sample numbers as int64 numpy arrays.

    Same signature as torch's ``BatchSampler``, so Lightning can rebuild it around another
    sampler (it does so for prediction, and in DDP around a distributed sampler).

    Args:
        sampler: Gives the sample order (its whole order is read at the start of an epoch).
        batch_size: Samples per batch.
        drop_last: Drop the last batch when it is smaller than ``batch_size``.

    Example:
        >>> from torch.utils.data import SequentialSampler
        >>> [b.tolist() for b in ArrayBatchSampler(SequentialSampler(range(5)), 2, False)]
        [[0, 1], [2, 3], [4]]
    """

    def __init__(self, sampler: Sampler | Sized, batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[np.ndarray]:  # type: ignore[override]
        order = sample_order(self.sampler)
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        for begin in range(0, stop, self.batch_size):
            yield order[begin : begin + self.batch_size]
