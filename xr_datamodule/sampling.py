"""Sampling: what the training order draws from, sized before any reader exists.

One :class:`Sampling` per pipeline gathers what the training order
(:class:`~xr_datamodule.order.TrainingOrder`, a function of ``(seed, epoch)``) needs to know
of the ``train`` split: its size, the shuffle in use, the user's sampler and weights (from
one out-of-core pass of per-window statistics), random window offsets, and out of core the
cell grid (the cell each sample starts in, a walk over the cells). The reader's cache is
sized from it (:meth:`Sampling.reader_cells`) before the reader is built.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cached_property, partial
from typing import Any

import numpy as np

from xr_datamodule.cells import CellGrid
from xr_datamodule.layout import SourceLayout
from xr_datamodule.order import TrainingOrder, TrainSplit, batches_ahead, whole_batches_ahead
from xr_datamodule.plan import SamplePlan
from xr_datamodule.progress import scan_progress
from xr_datamodule.samplers import RandomOffsets, batch_spread, build_sampler
from xr_datamodule.spec import DataSpec
from xr_datamodule.weights import WindowStatistics, box_reduce, point_field, weights_from
from xr_datamodule.windows import SampleIndex, reduce_windows

__all__ = ["Sampling"]

logger = logging.getLogger(__name__)


class Sampling:
    """The training split as the training order sees it.

    Args:
        spec: The spec (sampler, weights, shuffle, random offsets).
        layout: The source's layout.
        plan: The sample plan.
        order: The training order (seed, chunk layout, resume point).
        workers: DataLoader worker processes.
        cells: The cell grid out of core, None in memory.
    """

    def __init__(
        self,
        spec: DataSpec,
        layout: SourceLayout,
        plan: SamplePlan,
        order: TrainingOrder,
        workers: int,
        cells: CellGrid | None,
    ) -> None:
        self.spec, self.layout, self.plan, self.order = spec, layout, plan, order
        self.workers, self.cells = workers, cells
        self._window_statistics: dict[str, WindowStatistics] = {}

    @property
    def has_train(self) -> bool:
        """Whether there is a ``train`` split."""
        return "train" in self.plan.indices

    @property
    def shuffle(self) -> str:
        """The training order in use: ``"full"`` (uniform) or ``"chunks"`` (chunk-aware)."""
        if self.spec.shuffle == "full" or self.cells is None or self.spec.sampler is not None:
            return "full"  # in memory, asked for, or the user's order (not grouped by cell)
        return "chunks"

    def window_statistics(self, split: str = "train") -> WindowStatistics:
        """Per-sample statistics of ``split``'s windows (one out-of-core pass each, kept)."""
        if split not in self._window_statistics:
            index = self.plan.indices[split]
            self._window_statistics[split] = WindowStatistics(partial(self._statistic, index))
        return self._window_statistics[split]

    def _statistic(self, index: SampleIndex, side: str, stat: str) -> np.ndarray:
        geometry, spec, layout = self.plan.geometry, self.spec, self.layout
        names = layout.dynamic(spec.input_vars if side == "input" else spec.targets)
        size = geometry.input_size if side == "input" else geometry.target_size
        offset = (0,) * len(size) if side == "input" else geometry.target_offset
        dims, source = geometry.dims, layout.source

        def field_of(lo: int, hi: int) -> np.ndarray:
            return point_field(source.isel({dims[0]: slice(lo, hi)}), names, dims, stat)

        def reduce(field: np.ndarray, box: Sequence[int]) -> np.ndarray:
            return box_reduce(field, box, stat)

        # float64 per point and variable, their counts for a mean, the box sums' arrays
        step_bytes = layout.points_per_step() * 8 * (2 * len(names) + 4)
        with scan_progress(f"window statistics ({side}_{stat}) for weighted draws"):
            return reduce_windows(index, offset, size, field_of, reduce, step_bytes)

    @cached_property
    def sample_weights(self) -> np.ndarray | None:
        """Sampling weight of every training sample (``sample_weights``), or None."""
        setting = self.spec.sample_weights
        if setting is None or not self.has_train:
            return None
        n = len(self.plan.indices["train"])
        weights = weights_from(setting, self.window_statistics("train"), n)
        boosted = float((weights > weights.min()).mean()) if len(weights) else 0.0
        logger.info(
            "sample_weights: %d training samples, %.1f %% above the smallest weight",
            n,
            100 * boosted,
        )
        return weights

    @cached_property
    def user_sampler(self) -> Any:
        """The user's sampler for the training split (built once), or None."""
        setting = self.spec.sampler
        if setting is None or not self.has_train:
            return None
        return build_sampler(setting, len(self.plan.indices["train"]), self.sample_weights)

    @cached_property
    def random_offsets(self) -> RandomOffsets | None:
        """Random window starts of the training split (``random_offsets=True``), or None."""
        if not self.spec.random_offsets:
            return None
        geometry = self.plan.geometry
        bounds = self.plan.split_bounds["train"]
        last = [
            bounds[dim][1] - extent + below
            for dim, extent, below in zip(
                geometry.dims, geometry.extent, geometry.reach_below, strict=True
            )
        ]
        stride = np.asarray(geometry.stride)
        return RandomOffsets(self.order.seed, stride, np.asarray(last, dtype=np.int64))

    @cached_property
    def _home_cells(self) -> np.ndarray | None:
        """The cell each training sample's span starts in (out of core)."""
        if self.cells is None:
            return None
        index = self.plan.indices["train"]
        below = self.plan.geometry.reach_below
        starts = [axis - low for axis, low in zip(index.axis_starts, below, strict=True)]
        return self.cells.home_cells(starts)[index.grid_ids()]

    def train_split(self) -> TrainSplit:
        """What the training order needs to know of the ``train`` split."""
        if not self.has_train:
            raise ValueError(f"there is no 'train' split; splits are {tuple(self.plan.indices)}")
        index = self.plan.indices["train"]
        sampling = dict(weights=self.sample_weights, sampler=self.user_sampler, index=index)
        if self.cells is None:
            return TrainSplit(len(index), self.shuffle, self.workers, **sampling)
        return TrainSplit(
            len(index),
            self.shuffle,
            self.workers,
            cells=self._home_cells,
            cells_per_sample=self.cells.cells_per_sample,
            cell_bytes=self.cells.cell_bytes,
            walk=self.cells.cell_walk(),
            **sampling,
        )

    def reader_cells(self, world_size: int, remote: bool) -> tuple[int, int, bool]:
        """Cells each reading process caches, batches it fetches ahead, whole batches or not.

        Whether the training batches are read whole ahead: :meth:`whole_batches_ahead`.
        A remote store's reader fetches several batches ahead (its requests wait on the
        network), and caches their cells too (:func:`~xr_datamodule.order.batches_ahead`).
        """
        assert self.cells is not None
        split = self.train_split() if self.has_train else None
        per_sample, cell_bytes = self.cells.cells_per_sample, self.cells.cell_bytes
        whole = self.whole_batches_ahead(world_size, remote)
        cache = self.order.cache_cells(split, per_sample, cell_bytes, world_size, whole)
        if not remote:
            return cache, 1, whole
        ahead, more = batches_ahead(self.order, split, per_sample, cell_bytes, world_size)
        return cache + more, ahead, whole

    def whole_batches_ahead(self, world_size: int, remote: bool) -> bool:
        """Whether the training batches are read whole ahead, in the background (big samples).

        Not from a remote store, whose reader fetches several batches' cells ahead.
        """
        if remote or self.cells is None or not self.has_train:
            return False
        split, cells = self.train_split(), self.cells
        return whole_batches_ahead(
            self.order, split, cells.cells_per_sample, cells.cell_bytes, world_size
        )

    def chunk_layout(self, world_size: int) -> tuple[int, int]:
        """Chunk-aware order: (parts, streams per part); see ``TrainingOrder.chunk_layout``."""
        return self.order.chunk_layout(self.train_split(), world_size)

    def train_batches(self, epoch: int, world: tuple[int, int]) -> list[np.ndarray]:
        """Sample numbers of every training batch of a data epoch on a rank, in order."""
        return self.order.epoch_batches(self.train_split(), epoch, world)

    def batch_spread(self, dim: str | None, epoch: int, world: tuple[int, int]) -> float:
        """How varied training batches are along ``dim``, against a full shuffle (1.0)."""
        dims = self.plan.geometry.dims
        dim = dim or self.plan.split_dim
        if dim not in dims:
            raise KeyError(f"batch_spread: {dim!r} is not a windowed dim. Valid: {dims}")
        index = self.plan.indices["train"]
        positions = index.starts(np.arange(len(index)))[:, dims.index(dim)]
        return batch_spread(self.train_batches(epoch, world), positions)
