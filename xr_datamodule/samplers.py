"""Seeded, epoch-aware sample orders and a batch sampler that hands out index arrays.

The DataLoader's own ``BatchSampler`` collects a Python list of ints per batch; ours slices
one numpy permutation per epoch, so the dataset's ``__getitems__`` receives an int64 array
and no per-sample object is built.

Two orders, both functions of ``(seed, epoch)`` (and the settings they were built with):

* :class:`EpochShuffleSampler`: a uniform permutation (in-memory data).
* :class:`ChunkShuffleSampler`: chunk-aware, for data decoded chunk by chunk. Cells (groups of
  storage chunks, see :class:`~xr_datamodule.gather.ChunkedReader`) are put in a random
  order and taken ``cells_per_window`` at a time; the samples of those cells are shuffled
  together. Each rank takes a contiguous block of that order and deals its windows to
  ``streams`` streams (one per DataLoader worker) whose whole batches alternate. Since the
  DataLoader deals batch ``i`` to worker ``i % num_workers``, each worker reads only its
  own stream's cells: each cell is decoded about once per epoch per rank, and a batch draws
  from at most ``cells_per_window`` cells (twice that where it spans two windows; more only
  when a cell holds fewer samples than a batch).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Iterator

import numpy as np
from torch.utils.data import BatchSampler, DistributedSampler, Sampler, SequentialSampler

__all__ = [
    "ArrayBatchSampler",
    "BlockInterleavedSampler",
    "ChunkShuffleSampler",
    "EpochSampler",
    "EpochShuffleSampler",
    "ShardedBatchSampler",
    "sample_order",
]


class EpochSampler(Sampler[int]):
    """A sample order that is a function of ``(seed, epoch)``; subclasses define :meth:`order`.

    Lightning calls :meth:`set_epoch` before each training epoch. When nobody does (a plain
    ``for`` loop over the loader), each new iteration moves to the next epoch by itself, so
    the order still changes from epoch to epoch.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n = int(n)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        self.epoch = int(epoch)

    @abstractmethod
    def order(self) -> np.ndarray:
        """The order of the current epoch (int64), a permutation of ``range(n)``."""

    def rank_order(self, rank: int, world: int) -> np.ndarray:
        """Rank ``rank``'s share of the current epoch: a contiguous block of ``n // world``.

        At most ``world - 1`` samples are left out, the same for every rank.
        """
        size = self.n // world
        return self.order()[rank * size : (rank + 1) * size]

    def take_order(self) -> np.ndarray:
        """The current epoch's order; the next call gives the next epoch's."""
        order = self.order()
        self.epoch += 1
        return order

    def __iter__(self) -> Iterator[int]:
        # A generator: the epoch is taken when iteration starts, not when iter() is called
        # (torch's worker iterator calls iter() on its sampler twice before using it).
        yield from self.take_order().tolist()

    def __len__(self) -> int:
        return self.n


class EpochShuffleSampler(EpochSampler):
    """A uniform random permutation of ``range(n)`` per ``(seed, epoch)``.

    Args:
        n: Number of samples.
        seed: Base seed.

    Example:
        >>> sampler = EpochShuffleSampler(5, seed=0)
        >>> sampler.set_epoch(3)
        >>> sorted(sampler.order().tolist())
        [0, 1, 2, 3, 4]
    """

    def order(self) -> np.ndarray:
        """The permutation of the current epoch."""
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)


class ChunkShuffleSampler(EpochSampler):
    """Chunk-aware shuffling: random windows of cells, samples shuffled within each window.

    Args:
        cells: Cell number of every sample (the cell its span starts in).
        seed: Base seed.
        cells_per_window: Cells whose samples are mixed together.
        batch_size: Batch size, to deal whole batches to streams.
        streams: Interleaved streams per rank; use the number of DataLoader workers (or 1),
            so that each worker decodes only its own cells.

    Example:
        >>> cells = np.repeat(np.arange(6), 10)     # 6 cells of 10 samples
        >>> sampler = ChunkShuffleSampler(cells, seed=0, cells_per_window=2, batch_size=5)
        >>> order = sampler.order()
        >>> sorted(order.tolist()) == list(range(60))
        True
        >>> len(set(cells[order[:20]].tolist()))   # the first window mixes two cells
        2
    """

    def __init__(
        self,
        cells: np.ndarray,
        seed: int = 0,
        cells_per_window: int = 4,
        batch_size: int = 1,
        streams: int = 1,
    ) -> None:
        super().__init__(len(cells), seed)
        # Dense cell numbers, so ranks can be looked up with plain indexing.
        self._unique_cells, self.cells = np.unique(np.asarray(cells), return_inverse=True)
        self.cells_per_window = max(1, int(cells_per_window))
        self.batch_size = max(1, int(batch_size))
        self.streams = max(1, int(streams))

    def _windows(self) -> tuple[np.ndarray, np.ndarray]:
        """This epoch's window of every sample, and the order (windows in turn, shuffled)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        rank = rng.permutation(len(self._unique_cells))
        window = rank[self.cells] // self.cells_per_window
        return window, np.lexsort((rng.random(self.n), window))

    def order(self) -> np.ndarray:
        """This epoch's order for a single rank, its windows dealt to the streams."""
        return self.rank_order(0, 1)

    def rank_order(self, rank: int, world: int) -> np.ndarray:
        """A rank's contiguous block of the windowed order, dealt to its streams."""
        window, order = self._windows()
        size = self.n // world
        block = order[rank * size : (rank + 1) * size]
        if self.streams == 1 or not block.size:
            return block
        # Windows in the order they come in the block, numbered 0, 1, ...: dealt round-robin.
        window_of = window[block]
        turn = np.cumsum(np.r_[0, window_of[1:] != window_of[:-1]])
        return self._interleave(block, turn % self.streams)

    def _interleave(self, order: np.ndarray, stream_of: np.ndarray) -> np.ndarray:
        """Deal whole batches of each stream round-robin; leftovers go last."""
        full, tails = [], []
        for stream in range(self.streams):
            mine = order[stream_of == stream]
            cut = len(mine) - len(mine) % self.batch_size
            full.append(mine[:cut].reshape(-1, self.batch_size))
            tails.append(mine[cut:])
        rounds = max(len(batches) for batches in full)
        dealt = [batches[i] for i in range(rounds) for batches in full if i < len(batches)]
        return np.concatenate([*dealt, *tails]) if dealt else np.concatenate(tails)


class BlockInterleavedSampler(Sampler[int]):
    """A fixed evaluation order that keeps each DataLoader worker on its own run of data.

    The batches of a sequential pass are cut into ``blocks`` contiguous runs (one per
    worker) and dealt round-robin: batch ``i`` comes from run ``i % blocks``, so the worker
    that the DataLoader deals it to reads only its own run, and out of core each cell is
    decoded once instead of once per worker. A last, smaller batch comes last.

    Args:
        n: Number of samples.
        batch_size: Samples per batch.
        blocks: Contiguous runs (the number of workers).

    Example:
        >>> BlockInterleavedSampler(10, batch_size=2, blocks=2).order().tolist()
        [0, 1, 6, 7, 2, 3, 8, 9, 4, 5]
    """

    def __init__(self, n: int, batch_size: int, blocks: int) -> None:
        self.n = int(n)
        self.batch_size = max(1, int(batch_size))
        self.blocks = max(1, int(blocks))

    def order(self) -> np.ndarray:
        """The order (int64): whole batches interleaved from the runs, then the rest."""
        full = self.n // self.batch_size
        batch = np.arange(full)
        run = batch * self.blocks // max(full, 1)
        first_of_run = np.searchsorted(run, run)  # the first batch number of each batch's run
        dealt = batch[np.lexsort((run, batch - first_of_run))]
        starts = dealt * self.batch_size
        rows = (starts[:, None] + np.arange(self.batch_size)).reshape(-1)
        return np.concatenate([rows, np.arange(full * self.batch_size, self.n)]).astype(np.int64)

    def __iter__(self) -> Iterator[int]:
        yield from self.order().tolist()

    def __len__(self) -> int:
        return self.n


def sample_order(sampler: Iterable[int]) -> np.ndarray:
    """The order a sampler yields, as an int64 array (vectorised for the known samplers).

    Reading the order of an :class:`EpochSampler` also advances its epoch, exactly as
    iterating it would.
    """
    if isinstance(sampler, EpochSampler):
        return sampler.take_order()
    if isinstance(sampler, BlockInterleavedSampler):
        return sampler.order()
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

    def __init__(self, sampler: Iterable[int], batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[np.ndarray]:  # type: ignore[override]
        order = sample_order(self.sampler)
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        for begin in range(0, stop, self.batch_size):
            yield order[begin : begin + self.batch_size]


class ShardedBatchSampler(DistributedSampler):
    """Training batches of one DDP rank, exactly once per epoch, resumable mid-epoch.

    Each epoch the ``order`` sampler gives a permutation (a function of ``(seed, epoch)``).
    It is cut to a multiple of the world size (at most ``num_replicas - 1`` samples left out,
    the same for every rank) and rank ``r`` takes the ``r``-th contiguous block, so ranks
    never share a sample and all have the same number of batches (DDP never waits on a rank
    that ran out). Contiguous blocks keep chunk-aware orders chunk-aware: each rank reads its
    own run of cells, dealt to its workers' streams (see :meth:`EpochSampler.rank_order`).
    Each item is a whole batch of sample numbers (an int64 array), for a DataLoader with
    ``batch_size=None``.

    It is a ``DistributedSampler``, so Lightning leaves it in place instead of injecting one
    that pads with repeated samples; Lightning's ``set_epoch`` reaches the order.

    Args:
        order: The per-epoch sample order.
        batch_size: Samples per batch.
        drop_last: Drop the rank's last batch when it is smaller than ``batch_size``.
        num_replicas: World size (number of DDP ranks).
        rank: This process's global rank.
        resume: ``(epoch, batches)``: in that data epoch, skip the first ``batches`` batches
            (they were trained on before the checkpoint); other epochs are whole.
        epoch_offset: Trainer epoch minus data epoch. Lightning counts an epoch cut short by
            ``max_steps`` as finished; after resuming such a run the data epochs lag the
            trainer's by one, so that the data continue exactly where they stopped.

    Example:
        >>> order = EpochShuffleSampler(10, seed=0)
        >>> ranks = [ShardedBatchSampler(EpochShuffleSampler(10, seed=0), 2, False, 3, r)
        ...          for r in range(3)]
        >>> seen = np.concatenate([b for s in ranks for b in s])
        >>> len(seen), len(set(seen.tolist()))           # 10 - 10 % 3 samples, each once
        (9, 9)
    """

    def __init__(
        self,
        order: EpochSampler,
        batch_size: int,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        resume: tuple[int, int] | None = None,
        epoch_offset: int = 0,
    ) -> None:
        # DistributedSampler.__init__ would ask torch.distributed for the world; the
        # datamodule knows it from the trainer (and tests simulate ranks).
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.order = order
        self.batch_size = int(batch_size)
        self.drop_last = bool(drop_last)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = order.seed
        self.shuffle = True
        self.resume = resume
        self.epoch_offset = int(epoch_offset)
        self.serving = order.epoch  # data epoch of the pass under way (or the next one)
        self.num_samples = order.n // self.num_replicas
        self.total_size = self.num_samples * self.num_replicas

    @property
    def epoch(self) -> int:  # type: ignore[override]
        """The epoch the next iteration yields (kept by the order sampler)."""
        return self.order.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.order.epoch = int(value)

    def set_epoch(self, epoch: int) -> None:
        """Select the (trainer) epoch whose batches the next iteration yields."""
        self.order.set_epoch(epoch - self.epoch_offset)
        self.serving = self.order.epoch

    def __len__(self) -> int:
        whole, part = divmod(self.num_samples, self.batch_size)
        return whole + (1 if part and not self.drop_last else 0)

    def epoch_batches(self) -> list[np.ndarray]:
        """This rank's batches of the current epoch (the epoch is not advanced)."""
        block = self.order.rank_order(self.rank, self.num_replicas)
        stop = len(block) - len(block) % self.batch_size if self.drop_last else len(block)
        return [block[begin : begin + self.batch_size] for begin in range(0, stop, self.batch_size)]

    def __iter__(self) -> Iterator[np.ndarray]:  # type: ignore[override]
        # A generator: the epoch is taken when iteration starts, not when iter() is called
        # (torch's worker iterator calls iter() on its sampler twice before using it).
        epoch = self.serving = self.order.epoch
        batches = self.epoch_batches()
        self.order.epoch += 1
        if self.resume is not None and self.resume[0] == epoch:
            batches = batches[self.resume[1] :]
            self.resume = None
        yield from batches
