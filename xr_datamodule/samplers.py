"""Seeded, epoch-aware sample orders and a batch sampler that hands out index arrays.

The DataLoader's own ``BatchSampler`` collects a Python list of ints per batch; ours slices
one numpy permutation per epoch, so the dataset's ``__getitems__`` receives an int64 array
and no per-sample object is built.

Two orders, both functions of ``(seed, epoch)`` (and the settings they were built with):

* :class:`EpochShuffleSampler`: a uniform permutation (in-memory data, or ``shuffle="full"``).
* :class:`ChunkShuffleSampler`: chunk-aware, for data decoded chunk by chunk. Streams walk the
  cells (storage chunks, see :class:`~xr_datamodule.gather.ChunkedReader`) in a random or a
  rotated neighbour-first order, and each batch mixes several streams; each rank takes a
  contiguous block and each DataLoader worker its own part of it, so each chunk is decoded
  about once per epoch.

:class:`ShardedBatchSampler` cuts either order into DDP ranks and whole batches, resumable
mid-epoch, and can hint each batch's successor (:class:`BatchPlan`) so that a reader decodes
ahead.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from torch.utils.data import BatchSampler, DistributedSampler, Sampler, SequentialSampler

__all__ = [
    "ArrayBatchSampler",
    "BatchPlan",
    "BlockInterleavedSampler",
    "ChunkShuffleSampler",
    "ChunkedDrawSampler",
    "EpochSampler",
    "EpochShuffleSampler",
    "FixedLengthSampler",
    "RandomOffsets",
    "ShardedBatchSampler",
    "UserOrderSampler",
    "WeightedEpochSampler",
    "batch_spread",
    "build_sampler",
    "chunk_layout_of",
    "sample_order",
]


class BatchPlan(NamedTuple):
    """A batch of sample numbers and, as a hint, the batches the same process reads next.

    The hint (the next batch's sample numbers, or the next few batches' one after the other)
    lets a reader decode their chunks in the background while the current batch is used
    (see :meth:`~xr_datamodule.gather.ChunkedReader`).
    """

    ids: np.ndarray
    upcoming: np.ndarray | None = None
    epoch: int | None = None  # the data epoch (random offsets depend on it)
    seed: int | None = None  # the order's seed (a checkpoint's, after a resume)


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
    """Chunk-aware shuffling: streams walk the cells, batches mix the streams.

    Each epoch the cells are put in an order: a random permutation, or, when samples reach
    into neighbouring cells (``walk`` given, e.g. a full-field sample of 3 time steps in a
    store of one step per chunk), the walk rotated by a random offset, so that consecutive
    cells share samples. The samples follow their cells, shuffled within each cell. Each
    rank takes a contiguous block of that sequence (at most ``world - 1`` samples left
    out); the block is cut into one contiguous part per process (DataLoader worker, or the
    main process without workers) and each part into ``streams`` contiguous streams, which
    are merged at random in proportion to their lengths. Whole batches of the processes are
    then dealt round-robin: the DataLoader deals batch ``i`` to worker ``i % workers``, so
    each worker reads only its own part.

    What that gives: each chunk is decoded about once per epoch (a stream moves from a cell
    to the next, and the cells a sample reaches into are the ones the stream reads next);
    a batch draws from up to ``streams`` places of the sequence at once, e.g. 8 different
    dates for 8 full-field samples; consecutive batches of a process come from the same
    streams, a little further on. The order is a function of ``(seed, epoch)`` and the
    settings.

    Args:
        cells: Cell number of every sample (the cell its span starts in).
        seed: Base seed.
        streams: Streams per process, i.e. places a batch draws from.
        batch_size: Batch size, to deal whole batches to processes.
        processes: DataLoader workers (or 1): each reads its own part of the rank's block.
        walk: Position of every cell number in a walk over neighbouring cells (see
            :meth:`~xr_datamodule.gather.ChunkedReader.cell_walk`), or None when samples
            stay inside their cell (cells then come in a random order).

    Example:
        >>> cells = np.repeat(np.arange(6), 10)     # 6 cells of 10 samples
        >>> sampler = ChunkShuffleSampler(cells, seed=0, streams=2, batch_size=5)
        >>> order = sampler.order()
        >>> sorted(order.tolist()) == list(range(60))
        True
        >>> [len(set(cells[b].tolist())) for b in order.reshape(-1, 5)][:4]  # cells per batch
        [2, 2, 2, 2]
    """

    def __init__(
        self,
        cells: np.ndarray,
        seed: int = 0,
        streams: int = 4,
        batch_size: int = 1,
        processes: int = 1,
        walk: np.ndarray | None = None,
    ) -> None:
        super().__init__(len(cells), seed)
        # Dense cell numbers, so cells can be looked up with plain indexing.
        self._unique_cells, self.cells = np.unique(np.asarray(cells), return_inverse=True)
        self.streams = max(1, int(streams))
        self.batch_size = max(1, int(batch_size))
        self.processes = max(1, int(processes))
        # Rank of every (dense) cell along the walk, or None for a random cell order.
        self._walk_rank = (
            None
            if walk is None
            else np.argsort(np.argsort(np.asarray(walk)[self._unique_cells], kind="stable"))
        )

    def _sequence(self, rng: np.random.Generator) -> np.ndarray:
        """This epoch's samples, cell by cell in the epoch's cell order."""
        n_cells = len(self._unique_cells)
        if self._walk_rank is None:
            position = rng.permutation(n_cells)
        else:
            position = (self._walk_rank - rng.integers(max(n_cells, 1))) % max(n_cells, 1)
        return np.lexsort((rng.random(self.n), position[self.cells]))

    def order(self) -> np.ndarray:
        """This epoch's order for a single rank."""
        return self.rank_order(0, 1)

    def rank_order(self, rank: int, world: int) -> np.ndarray:
        """A rank's contiguous block of the sequence, its processes' batches dealt in turn."""
        rng = np.random.default_rng([self.seed, self.epoch])
        sequence = self._sequence(rng)
        size = self.n // world
        block = sequence[rank * size : (rank + 1) * size]
        merge_rng = np.random.default_rng([self.seed, self.epoch, rank])
        return self._deal(block, merge_rng)

    def _deal(self, block: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Cut the block into the processes' streams, merge each process's, deal batches.

        Batch ``i`` belongs to process ``i % processes``, so each process's share is fixed
        in whole batches (the last, smaller batch comes last). With one process the block
        is cut into streams where the cell changes; with several, into ``streams`` bands cut
        where the cell changes and each band into one stretch per process, so that each
        process's streams lie all over the block (its batches are as varied as the whole
        order's) while each stretch is read by one process only.
        """
        n_batches = -(-len(block) // self.batch_size)
        if n_batches == 0:
            return block
        sizes = np.full(n_batches, self.batch_size)
        sizes[-1] = len(block) - (n_batches - 1) * self.batch_size
        owner = np.arange(n_batches) % self.processes
        shares = np.bincount(owner, weights=sizes, minlength=self.processes).astype(int)
        if self.processes == 1:
            merged = [self._merge(self._cut_at_cells(block), rng)]
        else:
            merged = self._merge_stretches(block, shares, rng)
        taken = np.zeros(self.processes, dtype=np.int64)
        dealt = []
        for batch, process in enumerate(owner.tolist()):
            begin = taken[process]
            dealt.append(merged[process][begin : begin + sizes[batch]])
            taken[process] += sizes[batch]
        return np.concatenate(dealt)

    def _merge_stretches(
        self, block: np.ndarray, shares: np.ndarray, rng: np.random.Generator
    ) -> list[np.ndarray]:
        """Each process's streams: a stretch of each of ``streams`` bands of the block, merged.

        The block is cut into bands where the cell changes, and each band into one stretch
        per process, of the process's share of it (exact over all bands, as the batches
        are dealt): only those cuts may split a cell between two processes.
        """
        bands = self._cut_at_cells(block)
        ends = np.cumsum([len(band) for band in bands])
        sizes = np.empty((len(bands), self.processes), dtype=np.int64)
        for process, share in enumerate(shares.tolist()):
            reached = ends * share // max(len(block), 1)  # exact at the last band
            sizes[:, process] = np.diff(reached, prepend=0)
        stretches = np.split(block, np.cumsum(sizes.reshape(-1))[:-1])
        return [
            self._merge(stretches[process :: self.processes], rng)
            for process in range(self.processes)
        ]

    def _cut_at_cells(self, part: np.ndarray) -> list[np.ndarray]:
        """``streams`` about equal streams of a part, cut where the cell changes.

        A cell split between two streams would be decoded by each.
        """
        length = len(part)
        if length == 0 or self.streams == 1:
            return [part]
        changes = np.flatnonzero(np.diff(self.cells[part])) + 1  # first sample of each cell
        if not len(changes):
            return [part]
        ideal = np.arange(1, self.streams) * length // self.streams
        nearest = np.searchsorted(changes, ideal).clip(0, len(changes) - 1)
        below = changes[np.maximum(nearest - 1, 0)]
        above = changes[nearest]
        cuts = np.where(np.abs(below - ideal) < np.abs(above - ideal), below, above)
        return np.split(part, np.unique(cuts))

    @staticmethod
    def _merge(streams: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        """Merge streams at random, keeping each one's order.

        Each sample's key is its place in its stream plus a uniform jitter, over the
        stream's length: streams advance together, in proportion to their lengths.
        """
        streams = [stream for stream in streams if len(stream)]
        if len(streams) <= 1:
            return streams[0] if streams else np.empty(0, dtype=np.int64)
        keys = np.concatenate(
            [(np.arange(len(stream)) + rng.random(len(stream))) / len(stream) for stream in streams]
        )
        return np.concatenate(streams)[np.argsort(keys, kind="stable")]


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


def batch_spread(batches: Sequence[np.ndarray], positions: np.ndarray, seed: int = 0) -> float:
    """How spread out the samples of a batch are, against a uniform shuffle (1.0).

    The mean over full batches of the standard deviation of their samples' positions (e.g.
    time steps), divided by the same for a uniform shuffle of the same samples into batches
    of the same size. About 1.0 means batches as varied as a full shuffle's; a batch of
    consecutive steps gives about ``batch_size / n``.

    Args:
        batches: Sample numbers of each batch.
        positions: Position of every sample (indexed by sample number).
        seed: Seed of the uniform shuffle compared against.

    Example:
        >>> positions = np.arange(100)
        >>> consecutive = [np.arange(i, i + 10) for i in range(0, 100, 10)]
        >>> round(batch_spread(consecutive, positions), 1)   # ten consecutive steps of 100
        0.1
    """
    sizes = [len(batch) for batch in batches]
    size = max(sizes, default=0)
    full = [batch for batch in batches if len(batch) == size and size > 1]
    if not full:
        return 1.0
    uniform = np.random.default_rng(seed).permutation(len(positions))
    reference = uniform[: len(uniform) - len(uniform) % size].reshape(-1, size)
    spread = float(np.mean([positions[batch].std() for batch in full]))
    expected = float(positions[reference].std(axis=1).mean())
    return spread / expected if expected > 0 else 1.0


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
        resume: ``(epoch, samples)`` or ``(epoch, samples, counted)``: in that data epoch,
            skip the first ``samples`` samples of this rank's block (they were trained on
            before the checkpoint, possibly in batches of another size) and batch the rest;
            other epochs are whole. ``counted`` is how many batches the trainer counts as
            done in that epoch: while the resume is pending, the length is those plus the
            batches that remain (Lightning ends an epoch at the length it was given).
        epoch_offset: Trainer epoch minus data epoch. Lightning counts an epoch cut short by
            ``max_steps`` as finished; after resuming such a run the data epochs lag the
            trainer's by one, so that the data continue exactly where they stopped.
        lookahead: When positive, yield :class:`BatchPlan` items whose hint holds the
            sample numbers of the next ``lookahead`` batches, in order (what a reader
            without workers decodes in the background: 1 batch from local stores, several
            from remote ones).
        plans: Always yield :class:`BatchPlan` items (they carry the data epoch, which
            random offsets depend on).
        lookahead_stride: Batches between two of the hint's: with ``W`` DataLoader
            workers, which take the batches in turn, ``W`` (a worker's own next batches).

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
        resume: tuple[int, ...] | None = None,
        epoch_offset: int = 0,
        lookahead: int = 0,
        plans: bool = False,
        lookahead_stride: int = 1,
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
        self._resumed: tuple[int, ...] | None = None  # the resume of the epoch being served
        self.epoch_offset = int(epoch_offset)
        self.lookahead = max(0, int(lookahead))
        self.lookahead_stride = max(1, int(lookahead_stride))
        self.plans = bool(plans)
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
        # A resumed epoch keeps its length while it is served (torch and Lightning may ask
        # again once iteration has begun and the resume is used up).
        resume = self.resume if self.resume is not None else self._resumed
        skip = counted = 0
        if resume is not None and resume[0] == (
            self.order.epoch if resume is self.resume else self.serving
        ):
            skip, counted = resume[1], (resume[2] if len(resume) > 2 else 0)
        whole, part = divmod(max(0, self.num_samples - skip), self.batch_size)
        return counted + whole + (1 if part and not self.drop_last else 0)

    def epoch_batches(self, skip: int = 0) -> list[np.ndarray]:
        """This rank's batches of the current epoch (the epoch is not advanced).

        Args:
            skip: Samples at the start of the rank's block left out (a resume).
        """
        block = self.order.rank_order(self.rank, self.num_replicas)[skip:]
        stop = len(block) - len(block) % self.batch_size if self.drop_last else len(block)
        return [block[begin : begin + self.batch_size] for begin in range(0, stop, self.batch_size)]

    def __iter__(self) -> Iterator[np.ndarray | BatchPlan]:  # type: ignore[override]
        # A generator: the epoch is taken when iteration starts, not when iter() is called
        # (torch's worker iterator calls iter() on its sampler twice before using it).
        epoch = self.serving = self.order.epoch
        skip = 0
        if self.resume is not None and self.resume[0] == epoch:
            skip, self._resumed, self.resume = self.resume[1], self.resume, None
        batches = self.epoch_batches(skip)
        self.order.epoch += 1
        if not self.lookahead and not self.plans:
            yield from batches
            return
        depth, stride = self.lookahead, self.lookahead_stride
        for number, batch in enumerate(batches):
            ahead = number + stride
            coming = batches[ahead : ahead + depth * stride : stride] if depth else []
            upcoming = np.concatenate(coming) if len(coming) else None
            yield BatchPlan(batch, upcoming, epoch, self.seed)


# ----------------------------------------------------------------------------- user sampling


class WeightedEpochSampler(EpochSampler):
    """Weighted draws per ``(seed, epoch)``: rare samples oversampled by their weights.

    Args:
        weights: Non-negative weight of every sample (drawn with probability proportional).
        seed: Base seed.
        num_samples: Draws per epoch (default: one per sample).
        replacement: Draw with replacement (a sample may come several times an epoch) or
            without (each at most once; ``num_samples`` at most the samples of weight > 0).

    Example:
        >>> sampler = WeightedEpochSampler(np.array([0.0, 1.0, 3.0]), seed=0, num_samples=4)
        >>> draws = sampler.order()
        >>> len(draws), bool((draws != 0).all())   # weight 0 is never drawn
        (4, True)
    """

    def __init__(
        self,
        weights: np.ndarray,
        seed: int = 0,
        num_samples: int | None = None,
        replacement: bool = True,
    ) -> None:
        weights = np.asarray(weights, dtype=np.float64)
        self.probabilities = weights / weights.sum()
        self.replacement = bool(replacement)
        super().__init__(len(weights) if num_samples is None else int(num_samples), seed)
        drawable = int(np.count_nonzero(weights))
        if not self.replacement and self.n > drawable:
            raise ValueError(
                f"samples_per_epoch = {self.n} draws without replacement, but only {drawable} "
                "samples have a weight above 0; draw with replacement or fewer per epoch"
            )

    def order(self) -> np.ndarray:
        """This epoch's draws."""
        rng = np.random.default_rng([self.seed, self.epoch])
        size = len(self.probabilities)
        return rng.choice(size, self.n, replace=self.replacement, p=self.probabilities)


class ChunkedDrawSampler(EpochSampler):
    """Weighted draws read chunk by chunk: each epoch's draws in the chunk-aware order.

    The draws of an epoch (``draws``, a :class:`WeightedEpochSampler`) are put in the order
    of a :class:`ChunkShuffleSampler` over their cells, so that out of core each cell drawn
    is decoded about once per epoch instead of once per draw. The same draws, the same
    rates; only their order within the epoch changes.

    Args:
        draws: The weighted draws.
        cells: Cell number of every sample of the split.
        streams: Streams per process (see :class:`ChunkShuffleSampler`).
        batch_size: Batch size.
        processes: DataLoader workers (or 1).
        walk: The reader's neighbour-first walk over cells, or None.

    Example:
        >>> cells = np.repeat(np.arange(5), 4)            # 5 cells of 4 samples
        >>> draws = WeightedEpochSampler(np.ones(20), seed=0, num_samples=8)
        >>> order = ChunkedDrawSampler(draws, cells, streams=1, batch_size=4).order()
        >>> bool((np.diff(cells[order]) != 0).sum() <= 4)  # consecutive draws share cells
        True
    """

    def __init__(
        self,
        draws: WeightedEpochSampler,
        cells: np.ndarray,
        streams: int = 4,
        batch_size: int = 1,
        processes: int = 1,
        walk: np.ndarray | None = None,
    ) -> None:
        self.draws = draws
        self.cells = np.asarray(cells)
        self.streams, self.batch_size, self.processes, self.walk = (
            streams,
            batch_size,
            processes,
            walk,
        )
        super().__init__(draws.n, draws.seed)

    def _arranged(self) -> tuple[np.ndarray, ChunkShuffleSampler]:
        self.draws.set_epoch(self.epoch)
        drawn = self.draws.order()
        inner = ChunkShuffleSampler(
            self.cells[drawn], self.seed, self.streams, self.batch_size, self.processes, self.walk
        )
        inner.set_epoch(self.epoch)
        return drawn, inner

    def order(self) -> np.ndarray:
        """This epoch's draws, chunk by chunk."""
        drawn, inner = self._arranged()
        return drawn[inner.order()]

    def rank_order(self, rank: int, world: int) -> np.ndarray:
        """A rank's block of this epoch's draws, its processes' batches dealt in turn."""
        drawn, inner = self._arranged()
        return drawn[inner.rank_order(rank, world)]


class FixedLengthSampler(EpochSampler):
    """Epochs of ``samples_per_epoch`` taken in turn from passes over the whole index.

    Pass ``k`` is the ``base`` order of its epoch ``k`` (a permutation); epoch ``e`` is the
    stretch ``[e * N, (e + 1) * N)`` of the passes laid end to end. So no sample repeats
    until every one has come; the next pass is a new shuffle. Where an epoch straddles two
    passes, the samples the earlier pass gave it move back in the later one (out of that
    epoch's part), so an epoch never holds a sample twice (with ``N`` at most the index). A
    chunk-aware ``base`` stays chunk-aware.

    Args:
        base: The order of each pass over the index.
        samples_per_epoch: ``N``.

    Example:
        >>> sampler = FixedLengthSampler(EpochShuffleSampler(10, seed=0), 4)
        >>> epochs = [sampler.take_order() for _ in range(5)]       # 20 draws: two passes
        >>> sorted(np.concatenate(epochs[:2] + [epochs[2][:2]]).tolist()) == list(range(10))
        True
    """

    def __init__(self, base: EpochSampler, samples_per_epoch: int) -> None:
        self.base = base
        self._passes: dict[int, np.ndarray] = {}  # the latest passes, rearranged
        super().__init__(int(samples_per_epoch), base.seed)

    def order(self) -> np.ndarray:
        """This epoch's stretch of the passes."""
        total = self.base.n
        begin = self.epoch * self.n
        parts, taken = [], 0
        while taken < self.n:
            number, offset = divmod(begin + taken, total)
            part = self._pass(number)[offset : offset + self.n - taken]
            parts.append(part)
            taken += len(part)
        return np.concatenate(parts).astype(np.int64, copy=False)

    def _raw_pass(self, number: int) -> np.ndarray:
        self.base.set_epoch(number)
        return self.base.order()

    def _pass(self, number: int) -> np.ndarray:
        """Pass ``number``, its head cleared of what the epoch it starts in already has."""
        if number in self._passes:
            return self._passes[number]
        total, size = self.base.n, self.n
        # The rearrangement touches only a pass's first 2N places: where a pass is 3N long
        # its tail is the raw order's, else the chain goes back to the first pass.
        if total >= 3 * size:
            first = number
        else:
            first = max((k for k in self._passes if k <= number), default=0)
        for k in range(first, number + 1):
            if k in self._passes:
                continue
            raw = self._raw_pass(k)
            carried = (k * total) % size  # samples the straddling epoch took from pass k - 1
            if k == 0 or size > total or carried == 0:
                self._passes[k] = raw
                continue
            previous = self._passes.get(k - 1)
            if previous is None:
                previous = self._raw_pass(k - 1)
            head = raw[~np.isin(raw, previous[total - carried :])][: size - carried]
            self._passes[k] = np.concatenate([head, raw[~np.isin(raw, head)]])
        for old in [k for k in self._passes if k < number - 1]:
            del self._passes[old]  # keep the latest two
        return self._passes[number]


class UserOrderSampler(EpochSampler):
    """A user's sampler as a per-``(seed, epoch)`` order that ranks, workers and resumes share.

    ``sampler`` is either a torch :class:`~torch.utils.data.Sampler` (its ``generator``, when
    it has one, is seeded from ``(seed, epoch)`` before each epoch, and ``set_epoch`` is
    called when it has one) or a callable ``f(index, rng) -> sample numbers`` given the
    split's :class:`~xr_datamodule.windows.SampleIndex` and a numpy generator seeded from
    ``(seed, epoch)``. Every epoch's order must have the same length; its numbers must lie in
    ``[0, n_samples)``.

    Example:
        >>> from torch.utils.data import RandomSampler
        >>> sampler = UserOrderSampler(RandomSampler(range(6)), n_samples=6, seed=1)
        >>> sorted(sampler.order().tolist())
        [0, 1, 2, 3, 4, 5]
    """

    def __init__(self, sampler: object, n_samples: int, seed: int = 0, index: object = None):
        self.sampler = sampler
        self.n_samples = int(n_samples)
        self.index = index
        super().__init__(0, seed)
        self.n = len(self.order())

    def order(self) -> np.ndarray:
        """This epoch's order, checked."""
        import torch

        sampler = self.sampler
        if isinstance(sampler, Sampler):
            if hasattr(sampler, "generator"):
                sampler.generator = torch.Generator().manual_seed(
                    int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
                )
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
            drawn = np.fromiter((int(i) for i in sampler), dtype=np.int64)
        else:
            rng = np.random.default_rng([self.seed, self.epoch])
            drawn = np.asarray(sampler(self.index, rng), dtype=np.int64).reshape(-1)  # type: ignore[operator]
        if self.n and len(drawn) != self.n:
            raise ValueError(
                f"sampler: epoch {self.epoch} has {len(drawn)} samples, epoch 0 had {self.n}; "
                "every epoch must have the same length (ranks must agree on it)"
            )
        if len(drawn) and (drawn.min() < 0 or drawn.max() >= self.n_samples):
            raise ValueError(
                f"sampler: sample numbers must lie in [0, {self.n_samples}), got "
                f"{int(drawn.min())} … {int(drawn.max())}"
            )
        return drawn


def chunk_layout_of(sampler: EpochSampler) -> tuple[int, int] | None:
    """``(processes, streams)`` of a chunk-aware order, also inside a wrapper; else None.

    The order depends on them: a checkpoint keeps them so that a resume with other workers
    still yields the rest of the epoch exactly.
    """
    if isinstance(sampler, FixedLengthSampler):
        sampler = sampler.base
    if isinstance(sampler, ChunkShuffleSampler | ChunkedDrawSampler):
        return sampler.processes, sampler.streams
    return None


def offsets_hash(seed: int, epoch: int, ids: np.ndarray, axis: int) -> np.ndarray:
    """A uint64 hash of ``(seed, epoch, sample, axis)`` per sample (splitmix64), vectorised.

    It does not depend on which batch or process a sample is read in: random offsets come
    out the same with any number of workers, ranks or resumes.
    """
    with np.errstate(over="ignore"):
        key = np.uint64((seed * 0x9E3779B1 + epoch * 0x85EBCA77 + axis * 0xC2B2AE3D) % 2**64)
        x = np.asarray(ids, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + key
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class RandomOffsets(NamedTuple):
    """Training windows moved off the stride grid, per ``(seed, epoch)``, inside the split.

    A sample at grid start ``p`` along a dim of stride ``s`` starts at ``p + u`` with ``u``
    uniform in ``[0, s)``, cut so that its span stays in the split (``last`` is the last
    start whose span does). Every position a window may start at is then reachable.
    """

    seed: int
    strides: np.ndarray  # (ndim,)
    last: np.ndarray  # (ndim,) the last valid start along each dim

    def apply(
        self, starts: np.ndarray, ids: np.ndarray, epoch: int, seed: int | None = None
    ) -> np.ndarray:
        """The moved starts of samples ``ids`` (grid starts ``starts``) in ``epoch``.

        ``seed`` (the training order's, which a checkpoint restores) replaces :attr:`seed`.
        """
        seed = self.seed if seed is None else seed
        moved = np.array(starts, dtype=np.int64, copy=True)
        for axis in range(moved.shape[1]):
            room = np.minimum(self.strides[axis], self.last[axis] - moved[:, axis] + 1)
            if int(room.max(initial=1)) <= 1:
                continue
            draw = offsets_hash(seed, epoch, ids, axis) % room.astype(np.uint64)
            moved[:, axis] += draw.astype(np.int64)
        return moved


def build_sampler(setting: Any, n_samples: int, weights: np.ndarray | None) -> Any:
    """The user's ``sampler`` setting as a torch Sampler (or the callable it is).

    A class (given as such, by import path or as ``{"class_path", "init_args"}``) is built
    with its ``init_args`` plus, when its constructor takes them and they are not given,
    ``data_source=range(n_samples)``, ``weights=`` the sample weights and
    ``num_samples=n_samples``.

    Raises:
        ValueError: The class cannot be imported, is not a Sampler, or cannot be built.
    """
    import importlib
    import inspect

    if not isinstance(setting, dict) and not inspect.isclass(setting):
        return setting  # a callable f(index, rng)
    init_args: dict[str, Any] = {}
    cls = setting
    if isinstance(setting, dict):
        path, init_args = setting["class_path"], dict(setting["init_args"])
        module, _, name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as error:
            raise ValueError(f"sampler: cannot import {path!r}: {error}") from error
    if not (inspect.isclass(cls) and issubclass(cls, Sampler)):
        raise ValueError(f"sampler: {cls!r} is not a torch.utils.data.Sampler class")
    parameters = inspect.signature(cls.__init__).parameters
    offered = {"data_source": range(n_samples), "num_samples": n_samples}
    if weights is not None:
        offered["weights"] = weights.tolist()
    for key, value in offered.items():
        if key in parameters and key not in init_args:
            init_args[key] = value
    try:
        return cls(**init_args)
    except (TypeError, ValueError) as error:
        raise ValueError(f"sampler: cannot build {cls.__name__}({init_args!r}): {error}") from error
