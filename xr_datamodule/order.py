"""TrainingOrder: which training samples each batch holds, epoch after epoch, and resumes.

The order is a function of ``(seed, epoch)`` and the settings. In memory it is a uniform
shuffle; out of core, by default, the chunk-aware order of
:class:`~xr_datamodule.samplers.ChunkShuffleSampler`, whose layout (parts x streams) also
decides how many cells a reader caches. The resume state (the epoch and how many of its
batches were trained on) lives here too, so that a checkpoint restores exactly the samples
that remained.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from xr_datamodule.samplers import (
    ChunkedDrawSampler,
    ChunkShuffleSampler,
    EpochSampler,
    EpochShuffleSampler,
    FixedLengthSampler,
    ShardedBatchSampler,
    UserOrderSampler,
    WeightedEpochSampler,
    chunk_layout_of,
)

__all__ = ["TrainSplit", "TrainingOrder"]

logger = logging.getLogger(__name__)

MIN_STREAMS = 4  # chunk-aware streams per rank at least (shuffle_chunks="auto")
FULL_SHUFFLE_CACHE_BYTES = 2**30  # most a full shuffle out of core caches per process
STREAM_CACHE_BYTES = 256 * 2**20  # shuffle_chunks="auto": cells of the streams, per process
STREAM_MIN_CELLS = 10  # shuffle_chunks="auto": a stream spans this many samples' cells at least
# A remote store's reader (in each process) keeps this many bytes of the batches to come in
# flight (at most REMOTE_BATCHES_AHEAD batches): each request waits 20-100 ms on the network,
# one batch's requests at a time leave the store idle most of the time.
REMOTE_AHEAD_BYTES = 256 * 2**20
REMOTE_BATCHES_AHEAD = 8


@dataclass(frozen=True)
class TrainSplit:
    """What the training order needs to know of the training split and how it is read.

    Attributes:
        n_samples: Samples in the split.
        shuffle: ``"full"`` (uniform) or ``"chunks"`` (chunk-aware, out of core).
        workers: DataLoader worker processes (0: the main process reads).
        cells: Out of core: the cell each sample's span starts in.
        cells_per_sample: The most cells one sample touches.
        cell_bytes: Bytes of one cached cell.
        walk: Position of every cell in the reader's neighbour-first walk (or None).
        weights: Sampling weights of the samples (``sample_weights``), or None.
        sampler: The user's sampler (a torch Sampler or a callable ``f(index, rng)``), or None.
        index: The split's sample index (given to a callable sampler).
    """

    n_samples: int
    shuffle: str = "full"
    workers: int = 0
    cells: np.ndarray | None = None
    cells_per_sample: int = 1
    cell_bytes: int = 0
    walk: np.ndarray | None = None
    weights: np.ndarray | None = None
    sampler: Any = None
    index: Any = None

    @property
    def samples_per_cell(self) -> float:
        """Mean samples per cell that holds any (infinite in memory)."""
        if self.cells is None:
            return math.inf
        return len(self.cells) / max(1, len(np.unique(self.cells)))


class TrainingOrder:
    """The training order's settings and state: seed, chunk layout, resume point.

    Args:
        seed: Seed of the order.
        batch_size: Samples per batch.
        drop_last: Drop each rank's last, smaller batch.
        shuffle_chunks: Chunk-aware streams per rank, or ``"auto"``.
        samples_per_epoch: Samples per epoch (default: the whole split).
        replacement: Weighted draws with replacement.

    Example:
        >>> order = TrainingOrder(seed=0, batch_size=4)
        >>> batches = order.epoch_batches(TrainSplit(n_samples=10), epoch=0)
        >>> sorted(np.concatenate(batches).tolist()) == list(range(10))
        True
    """

    def __init__(
        self,
        seed: int = 0,
        batch_size: int = 32,
        drop_last: bool = False,
        shuffle_chunks: int | str = "auto",
        samples_per_epoch: int | None = None,
        replacement: bool = True,
    ) -> None:
        self.seed = int(seed)
        self.samples_per_epoch = samples_per_epoch
        self.replacement = replacement
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.shuffle_chunks = shuffle_chunks
        self.epoch_offset = 0  # data epoch = trainer epoch - offset (a resume after max_steps)
        # (epoch, samples done, batches the trainer counts as done) to skip once
        self.resume: tuple[int, int, int] | None = None
        self.resumed_layout: tuple[int, int] | None = None  # a checkpoint's (parts, streams)
        self._sampler: EpochSampler | None = None
        self._sampler_of = -1  # the split size the sampler was made for
        self.serving: ShardedBatchSampler | None = None  # the training loader's sampler

    # ------------------------------------------------------------------ layout

    def chunk_layout(self, split: TrainSplit, world_size: int = 1) -> tuple[int, int]:
        """Chunk-aware order: (parts, streams per part); a part per DataLoader worker.

        Each DataLoader worker (or the main process) reads its own part of every epoch,
        and each batch mixes the part's streams. ``shuffle_chunks="auto"`` gives at least 4
        streams per rank and, where a cell holds fewer samples than a batch (full-field
        samples), one per sample of a batch as long as their cells fit in 256 MiB per
        process and each stream is long enough: where a stream ends, the cells its last
        samples reach into are decoded by the next stream too, so a stream spans at least
        ``STREAM_MIN_CELLS`` times the cells a sample touches (on the benchmark's store of 183
        cells of 4 steps, 16 streams over 2 workers decoded 1.16 chunks per chunk, 8 decoded
        about 1.08). A checkpoint's layout is kept on resume.
        """
        if self.resumed_layout is not None:
            return self.resumed_layout
        processes = max(1, split.workers)
        if self.shuffle_chunks != "auto":
            return processes, max(1, int(self.shuffle_chunks) // processes)
        least = -(-MIN_STREAMS // processes)
        stream_bytes = split.cells_per_sample * split.cell_bytes
        if split.cells is not None:
            # Big samples (a 0.25 deg global state): the floor of streams would keep several
            # samples' cells decoded at once; fewer streams, not more memory.
            least = max(1, min(least, STREAM_CACHE_BYTES // max(stream_bytes, 1)))
        if split.cells is None or split.samples_per_cell >= self.batch_size:
            return processes, least
        affordable = STREAM_CACHE_BYTES // max(stream_bytes, 1)
        cells = len(np.unique(split.cells)) // world_size
        long_enough = cells // (processes * STREAM_MIN_CELLS * split.cells_per_sample)
        return processes, max(least, min(self.batch_size, affordable, long_enough))

    def cache_cells(
        self,
        split: TrainSplit | None,
        per_sample: int,
        cell_bytes: int,
        world_size: int = 1,
        whole_batches: bool = False,
    ) -> int:
        """Cells each process caches: what its share of the training order keeps in use.

        ``whole_batches``: the main process reads each next batch whole in the background
        (:func:`whole_batches_ahead`), not the next batch's cells.
        """
        if split is None:  # no training split: evaluation reads in order
            return per_sample + 1
        if split.shuffle == "full":
            wanted = self.batch_size * per_sample + 1
            return max(per_sample, min(wanted, FULL_SHUFFLE_CACHE_BYTES // max(cell_bytes, 1)))
        parts, streams = self.chunk_layout(split, world_size)
        processes = max(1, split.workers)
        # A process reads one part, unless a checkpoint's layout does not match the workers.
        parts_read = parts // math.gcd(parts, processes)
        per_cell = split.samples_per_cell
        if streams == 1 and (split.workers > 0 or whole_batches):
            return parts_read * _one_stream_cells(self.batch_size, per_sample, per_cell, cell_bytes)
        # Each stream keeps the cells of its current sample; within a batch, streams move on
        # to their next cell about batch_size / samples-per-cell times. Where streams move
        # every batch (full-field samples), one cell more keeps a stream's cells while it
        # sits out a batch of the random merge (on the benchmark's store of 4 steps per
        # chunk: 1.12 decodes per chunk without it, 1.07-1.08 with it).
        moves = math.ceil(self.batch_size / per_cell)
        return parts_read * (streams * per_sample + moves) + int(per_cell < self.batch_size)

    # ------------------------------------------------------------------ samplers

    def epoch_sampler(self, split: TrainSplit, world_size: int = 1) -> EpochSampler:
        """The per-epoch order of the split's samples (kept while the split is the same)."""
        sampler = self._sampler
        if sampler is None or self._sampler_of != split.n_samples:
            sampler = self._sampler = self._make_sampler(split, world_size)
            self._sampler_of = split.n_samples
        return sampler

    def _make_sampler(self, split: TrainSplit, world_size: int) -> EpochSampler:
        """The split's per-epoch order: the user's, weighted, chunk-aware or uniform.

        Then cut into epochs of ``samples_per_epoch`` (weighted draws draw that many).
        """
        base: EpochSampler
        if split.sampler is not None:
            base = UserOrderSampler(split.sampler, split.n_samples, self.seed, split.index)
        elif split.weights is not None:
            draws = WeightedEpochSampler(
                split.weights, self.seed, self.samples_per_epoch, self.replacement
            )
            if split.shuffle != "chunks" or split.cells is None:
                return draws
            # Out of core: the epoch's draws in the chunk-aware order (same draws, read
            # chunk by chunk: each drawn cell decoded about once an epoch).
            parts, streams = self.chunk_layout(split, world_size)
            return ChunkedDrawSampler(
                draws, split.cells, streams, self.batch_size, parts, split.walk
            )
        elif split.shuffle == "chunks" and split.cells is not None:
            parts, streams = self.chunk_layout(split, world_size)
            base = ChunkShuffleSampler(
                split.cells,
                seed=self.seed,
                streams=streams,
                batch_size=self.batch_size,
                processes=parts,
                walk=split.walk,
            )
        else:
            base = EpochShuffleSampler(split.n_samples, self.seed)
        if self.samples_per_epoch is None:
            return base
        return FixedLengthSampler(base, self.samples_per_epoch)

    def batch_sampler(
        self,
        split: TrainSplit,
        world: tuple[int, int],
        epoch: int | None,
        lookahead: int = 0,
        plans: bool = False,
        lookahead_stride: int = 1,
    ) -> ShardedBatchSampler:
        """The training loader's batch sampler for this rank; applies a pending resume once.

        Args:
            split: The training split.
            world: (world size, global rank).
            epoch: The trainer's current epoch, if a trainer is attached: Lightning may start
                the loader's iterator (and workers' prefetching) before it calls
                ``set_epoch``, e.g. when resuming.
            lookahead: Batches whose sample numbers each batch carries along (without
                workers the reader decodes their cells in the background).
            plans: Yield :class:`~xr_datamodule.samplers.BatchPlan` items (with the epoch).
            lookahead_stride: Batches between two of the hint's (the number of workers).
        """
        world_size, rank = world
        sampler = ShardedBatchSampler(
            self.epoch_sampler(split, world_size),
            self.batch_size,
            self.drop_last,
            world_size,
            rank,
            resume=self.resume,
            epoch_offset=self.epoch_offset,
            lookahead=lookahead,
            plans=plans,
            lookahead_stride=lookahead_stride,
        )
        if epoch is not None:
            sampler.set_epoch(epoch)
        self.resume = None  # handed over: the sampler applies it once
        self.serving = sampler
        return sampler

    def epoch_batches(
        self, split: TrainSplit, epoch: int = 0, world: tuple[int, int] = (1, 0)
    ) -> list[np.ndarray]:
        """Sample numbers of every training batch of a data epoch on this rank, in order."""
        order = self._make_sampler(split, world[0])
        sampler = ShardedBatchSampler(order, self.batch_size, self.drop_last, *world)
        sampler.set_epoch(epoch - self.epoch_offset)
        return sampler.epoch_batches()

    # ------------------------------------------------------------------ resume state

    def state_dict(self, batches_done: int | None, trainer_epoch: int | None) -> dict[str, Any]:
        """The order's part of a checkpoint.

        Args:
            batches_done: Batches of the current epoch the trainer has processed (None when
                not fitting).
            trainer_epoch: The trainer's current epoch (None without a trainer).
        """
        state: dict[str, Any] = {"seed": self.seed, "epoch_offset": self.epoch_offset}
        layout = None if self._sampler is None else chunk_layout_of(self._sampler)
        if layout is not None:
            # The order depends on them: a resume with other workers keeps them.
            state["chunk_layout"] = list(layout)
        sampler = self.serving
        if batches_done is not None and trainer_epoch is not None and sampler is not None:
            state["epoch"] = sampler.serving
            state["batches_done"] = batches_done
            # What decides which samples those batches held (checked on resume).
            state["samples_done"] = min(batches_done * self.batch_size, sampler.num_samples)
            state["batch_size"] = self.batch_size
            state["world_size"] = sampler.num_replicas
            state["order"] = type(sampler.order).__name__
            if 0 < batches_done < len(sampler):
                # Lightning may already count this epoch as finished (fit stopped by
                # max_steps); it will then resume in its next epoch, which must continue
                # this data epoch.
                state["epoch_offset"] = trainer_epoch - sampler.serving
        return state

    def load_state_dict(
        self,
        state: dict[str, Any],
        layout_now: tuple[int, int] | None,
        world_size: int = 1,
        order_now: str | None = None,
        n_samples: int | None = None,
    ) -> bool:
        """Restore the seed, the resume point and the chunk layout of a checkpoint.

        A checkpoint written mid-epoch continues exactly by samples: the samples its
        batches held are skipped, the rest are batched with the current ``batch_size``.
        Where the current settings would give another order of samples (a chunk-aware order
        with another batch size, another world size, another kind of order) it is refused:
        resume with the checkpoint's settings, or from an end-of-epoch checkpoint.

        Args:
            state: What :meth:`state_dict` returned.
            layout_now: The chunk layout the current settings give (None: not chunk-aware).
            world_size: The world size now.
            order_now: The class name of the epoch order the current settings give.
            n_samples: Samples of the training split now (a resume point past its end is
                refused).

        Returns:
            Whether the chunk layout changed (a reader's cache must then be resized).

        Raises:
            ValueError: A mid-epoch checkpoint whose remaining samples the current settings
                cannot continue exactly.
        """
        _check_state(state)
        if int(state.get("seed", self.seed)) != self.seed:
            self.seed = int(state["seed"])
            self._sampler = None
        self.epoch_offset = int(state.get("epoch_offset", 0))
        if "epoch" in state and state.get("batches_done"):
            batch_size = int(state.get("batch_size", self.batch_size))
            _check_resumable(state, batch_size, self.batch_size, world_size, order_now)
            done = state.get("samples_done", int(state["batches_done"]) * batch_size)
            if n_samples is not None and done > n_samples // max(1, world_size):
                raise ValueError(
                    f"the checkpoint says {state['batches_done']} batches ({done} samples) of "
                    f"data epoch {state['epoch']} were done, more than an epoch holds "
                    f"({n_samples // max(1, world_size)} samples per rank): it belongs to "
                    "other data or is damaged"
                )
            self.resume = (int(state["epoch"]), int(done), int(state["batches_done"]))
        layout = state.get("chunk_layout")
        if layout is None or layout_now is None:
            return False
        layout = (int(layout[0]), int(layout[1]))
        if layout == layout_now:
            return False
        logger.warning(
            "the checkpoint's chunk-aware order has %d parts of %d streams (one part per "
            "DataLoader worker then); keeping it with the current workers so that every "
            "sample still comes exactly once (some cells may be decoded by more than one "
            "worker)",
            *layout,
        )
        self.resumed_layout = layout
        self._sampler = None
        return True


_STATE_INTEGERS = ("seed", "epoch", "batches_done", "samples_done", "batch_size", "world_size")


def _check_state(state: Any) -> None:
    """A checkpoint's order state holds what :meth:`TrainingOrder.state_dict` writes."""
    if not isinstance(state, dict):
        raise TypeError(f"the datamodule's checkpoint state must be a dict, got {state!r}")
    for key in _STATE_INTEGERS:
        value = state.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(
                f"the checkpoint's {key} must be a non-negative integer, got {value!r}: "
                "the checkpoint is damaged or not this datamodule's"
            )
    if "epoch_offset" in state and not isinstance(state["epoch_offset"], (int, np.integer)):
        raise ValueError(f"the checkpoint's epoch_offset must be an integer, got {state!r}")


def _check_resumable(
    state: dict[str, Any],
    batch_size: int,
    batch_size_now: int,
    world_size: int,
    order_now: str | None,
) -> None:
    """Refuse a mid-epoch resume whose remaining samples would not be the same ones."""
    saved_world = int(state.get("world_size", world_size))
    saved_order = state.get("order", order_now)
    reasons = []
    if saved_world != world_size:
        reasons.append(f"world size {saved_world} then, {world_size} now")
    if order_now is not None and saved_order != order_now:
        reasons.append(f"order {saved_order} then, {order_now} now")
    chunk_aware = "chunk_layout" in state or saved_order == ChunkShuffleSampler.__name__
    if batch_size != batch_size_now and chunk_aware:
        reasons.append(
            f"batch_size {batch_size} then, {batch_size_now} now (the chunk-aware order "
            "mixes its streams by batch)"
        )
    if reasons:
        raise ValueError(
            f"this checkpoint was written in the middle of data epoch {state['epoch']} "
            f"({state['batches_done']} batches done) and the current settings would "
            f"give another order of samples: {'; '.join(reasons)}. Resume with the "
            "checkpoint's settings, or from a checkpoint written at the end of an epoch"
        )


def batches_ahead(
    order: TrainingOrder,
    split: TrainSplit | None,
    per_sample: int,
    cell_bytes: int,
    world_size: int = 1,
) -> tuple[int, int]:
    """A remote store's reader: batches it fetches ahead, and the slots they add.

    As many batches as :data:`REMOTE_AHEAD_BYTES` of their new cells allow (1 to
    :data:`REMOTE_BATCHES_AHEAD`); the arena grows by the cells of the batches beyond the
    first (which :meth:`TrainingOrder.cache_cells` already holds).
    """
    if split is None:
        return 1, 0
    if split.shuffle == "full" or split.cells is None:
        new_cells = order.batch_size * per_sample
    else:
        parts, _ = order.chunk_layout(split, world_size)
        processes = max(1, split.workers)
        moves = math.ceil(order.batch_size / split.samples_per_cell)
        new_cells = parts // math.gcd(parts, processes) * moves
    batch_bytes = max(1, new_cells * cell_bytes)
    depth = max(1, min(REMOTE_BATCHES_AHEAD, REMOTE_AHEAD_BYTES // batch_bytes))
    return depth, (depth - 1) * new_cells


def _one_stream_batch(batch_size: int, per_sample: int, per_cell: int) -> int:
    """Cells a batch of one stream touches: its first sample's and those its last moved to."""
    return per_sample + math.ceil((batch_size - 1) / per_cell)


def _one_stream_cells(batch_size: int, per_sample: int, per_cell: int, cell_bytes: int) -> int:
    """Cells of one stream read with nothing decoded ahead in the background.

    A worker decodes nothing in the background, and neither does a main process that reads
    whole batches ahead: a batch's cells, no slot for a prefetch or a stream sitting out.
    Where they are more than ``STREAM_CACHE_BYTES`` (0.25 deg global fields), only the
    cells the next batch reuses are kept: the batch's other cells are decoded once the
    oldest were copied out (the reader reads a batch cell by cell when a sample does not
    fit), a sample less per process without decoding more.
    """
    batch = _one_stream_batch(batch_size, per_sample, per_cell)
    if batch * cell_bytes < STREAM_CACHE_BYTES:
        return batch
    return max(1, batch - math.ceil(batch_size / per_cell))


def whole_batches_ahead(
    order: TrainingOrder,
    split: TrainSplit | None,
    per_sample: int,
    cell_bytes: int,
    world_size: int = 1,
) -> bool:
    """Whether the main process should read each next batch whole in the background.

    So it does without workers where one stream's batch touches more than
    ``STREAM_CACHE_BYTES`` of cells (big samples): decoding only the next batch's cells
    ahead would hold them beside the batch copied out of them and the batch in use
    (:mod:`xr_datamodule.ahead`).
    """
    if split is None or split.workers > 0 or split.shuffle == "full" or split.cells is None:
        return False
    _, streams = order.chunk_layout(split, world_size)
    batch = _one_stream_batch(order.batch_size, per_sample, split.samples_per_cell)
    return streams == 1 and batch * cell_bytes >= STREAM_CACHE_BYTES
