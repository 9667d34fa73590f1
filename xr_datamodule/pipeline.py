"""DataPipeline: the stages ``setup`` builds from a spec, wired one way; usable without Lightning.

Each stage is one small object built by one function, from the stages before it:

1. :func:`~xr_datamodule.layout.source_layout`: the opened source, variables, windowed dims
   and channel order;
2. :func:`~xr_datamodule.plan.window_geometry` and :func:`~xr_datamodule.plan.plan_samples`:
   window sizes, split bounds, checked time axes, the sample index of every split;
3. :func:`~xr_datamodule.channels.channels_of`: shapes and channel names;
4. :func:`~xr_datamodule.resources.choose_resources`: in memory or not, workers, threads;
5. :func:`~xr_datamodule.cells.cell_grid` (out of core): the cells and what a sample touches;
6. :class:`~xr_datamodule.sampling.Sampling`: what the training order draws from, which
   sizes the reader's cache;
7. :func:`~xr_datamodule.normalize.normalisation_of`: statistics and affines;
8. the reader (:mod:`~xr_datamodule.gather`, with the decoder of
   :func:`~xr_datamodule.resources.choose_decoder`) and a dataset per split
   (:mod:`~xr_datamodule.datasets`).

Every stage is built when first asked for, so shapes are known before anything is read.
What a checkpoint keeps comes from :meth:`DataPipeline.state_dict`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

import xarray as xr

from xr_datamodule.cells import CellGrid, cell_grid
from xr_datamodule.channels import Channels, channels_of, with_families
from xr_datamodule.datasets import XarrayWindowDataset
from xr_datamodule.extras import ExtraChannels
from xr_datamodule.families import FamilyStages, family_reads, merged_statistics
from xr_datamodule.familyread import GridRead
from xr_datamodule.gather import ChunkedReader, Preparation, WindowReader
from xr_datamodule.grids import GridPlan, check_grid_options, grid_plan, primary_spec
from xr_datamodule.layout import SourceLayout, open_checked, source_layout, static_dim_of
from xr_datamodule.missing import StaticMask
from xr_datamodule.normalize import Normalisation, Statistics, normalisation_of
from xr_datamodule.order import TrainingOrder
from xr_datamodule.outputs import PipelineOutputs
from xr_datamodule.plan import SamplePlan, plan_samples, window_geometry
from xr_datamodule.reading import extra_channels, read_by_cell, read_in_memory
from xr_datamodule.resources import (
    Backend,
    Resources,
    batch_bytes,
    choose_decoder,
    choose_resources,
)
from xr_datamodule.sampling import Sampling
from xr_datamodule.sources import is_remote
from xr_datamodule.spec import DataSpec
from xr_datamodule.windows import WindowGeometry

__all__ = ["DataPipeline", "training_order"]


def training_order(spec: DataSpec) -> TrainingOrder:
    """A new training order with the spec's settings."""
    return TrainingOrder(
        spec.seed,
        spec.batch_size,
        spec.drop_last,
        spec.shuffle_chunks,
        spec.samples_per_epoch,
        spec.replacement,
    )


class DataPipeline(PipelineOutputs):
    """The stages of a spec, and the reader and datasets they lead to.

    Args:
        spec: What to read and how (validated).
        order: The training order (seed, chunk layout, resume point); a new one by default.
        world: Returns (world size, global rank) when asked; default a single process.
        opened: The source, already opened (without ``select``), if it was.

    Example:
        >>> import numpy as np
        >>> spec = DataSpec("synthetic://weather", input_vars=["t2m"],
        ...                 input_dims={"time": 1, "lat": 32, "lon": 32}, batch_size=8)
        >>> pipeline = DataPipeline(spec)
        >>> dataset = pipeline.dataset("val")
        >>> batch = dataset.__getitems__(np.arange(8))  # one vectorised read of 8 samples
        >>> tuple(batch.inputs.shape)
        (8, 1, 1, 32, 32)
    """

    def __init__(
        self,
        spec: DataSpec,
        order: TrainingOrder | None = None,
        world: Callable[[], tuple[int, int]] = lambda: (1, 0),
        opened: xr.Dataset | None = None,
    ) -> None:
        self.given = spec
        self.opened = opened
        self.order = order or training_order(spec)
        self.world = world
        self.datasets: dict[str, XarrayWindowDataset] = {}
        self._normalisation: Normalisation | None = None
        self._reader: WindowReader | None = None
        self._backend: Backend | None = None
        self._grid_reads: list[GridRead] = []

    # ------------------------------------------------------------------ the stages

    @cached_property
    def source(self) -> xr.Dataset:
        """The source, opened lazily with ``select`` applied; variable names checked."""
        return open_checked(self.given, self.opened)

    @cached_property
    def grids(self) -> GridPlan:
        """Which variables lie on the windowed grid and which on other grids (families)."""
        plan = grid_plan(self.given, self.source, static_dim_of(self.given))
        if plan.families:
            check_grid_options(self.given, plan)
        return plan

    @cached_property
    def spec(self) -> DataSpec:
        """The spec of the windowed (primary) grid's variables: the given one with one grid."""
        return primary_spec(self.given, self.grids)  # type: ignore[return-value]

    @cached_property
    def layout(self) -> SourceLayout:
        """The opened source, its variables, windowed dims and channel order."""
        return source_layout(self.spec, self.source)

    @cached_property
    def families(self) -> list[FamilyStages]:
        """The stages of every other grid's family (none with one grid)."""
        return [
            FamilyStages(family, self.given, self.source, self.geometry)
            for family in self.grids.families
        ]

    @cached_property
    def geometry(self) -> WindowGeometry:
        """Window sizes, strides and offsets in the layout's dim order."""
        return window_geometry(self.spec, self.layout)

    @cached_property
    def plan(self) -> SamplePlan:
        """Split bounds, checked time axes and the sample index of every split."""
        restrict = self.grids.restrict if self.grids.families else None
        return plan_samples(self.spec, self.layout, self.geometry, restrict)

    @cached_property
    def channels(self) -> Channels:
        """Shapes and channel names of ``X`` and ``y``."""
        first = lambda: next(iter(self.plan.indices.values())).starts([0])[0]  # noqa: E731
        channels = channels_of(self.spec, self.layout, self.geometry, first)
        return with_families(channels, self.families, self.spec.nan_mask, self.spec.series_as)

    @cached_property
    def resources(self) -> Resources:
        """In memory or out of core, workers, threads, hand-off slots and prefetch."""
        spec, layout = self.spec, self.layout
        return choose_resources(spec, layout, batch_bytes(spec, layout, self.geometry))

    @cached_property
    def cells(self) -> CellGrid | None:
        """The cell grid out of core (None in memory)."""
        if self.resources.loads_into_memory:
            return None
        layout = self.layout
        names = layout.reader_vars
        itemsize = self.spec.array_dtype.itemsize
        return cell_grid(
            layout.source,
            names,
            layout.window_dims,
            self.geometry.extent,
            layout.n_channels(names),
            itemsize,
        )

    @cached_property
    def sampling(self) -> Sampling:
        """What the training order draws from."""
        workers = self.resources.num_workers
        return Sampling(self.spec, self.layout, self.plan, self.order, workers, self.cells)

    @property
    def normalisation(self) -> Normalisation:
        """Statistics and affines: given, restored from a checkpoint, or computed once."""
        if self._normalisation is None:
            train = self.plan.split_bounds.get("train")
            layout = self.layout
            self._normalisation = normalisation_of(
                self.spec, layout.source, layout.window_dims, train
            )
        return self._normalisation

    @property
    def statistics(self) -> Statistics:
        """Per-channel statistics (see :attr:`normalisation`), other grids' variables too."""
        train = self.plan.split_bounds.get("train")
        return merged_statistics(self.normalisation.statistics, self.families, train)

    # ------------------------------------------------------------------ reading

    @property
    def backend(self) -> Backend:
        """How cells are decoded out of core (chosen once; logged when a fast path is declined)."""
        if self._backend is None:
            self._backend = choose_decoder(self.spec, self.layout, self.resources)
        return self._backend

    @property
    def backend_chosen(self) -> Backend | None:
        """The backend once chosen (when the reader was built), else None."""
        return self._backend

    @property
    def statistics_origin(self) -> str | None:
        """Where the statistics in use came from (computed, given, checkpoint), or None yet."""
        return None if self._normalisation is None else self._normalisation.origin

    @property
    def reader(self) -> WindowReader:
        """The one reader of all splits: in-memory data are stacked once, not once per split."""
        if self._reader is None:
            self._reader = self._build_reader()
        return self._reader

    def _build_reader(self) -> WindowReader:
        spec, layout = self.spec, self.layout
        normalised = spec.normalize is not None and spec.normalize_on == "gather"
        prepare = Preparation(
            mask_of=layout.reader_channels(spec.input_vars) if spec.nan_mask else None,
            missing_of=layout.reader_channels(spec.targets) if self.keeps_target_mask else None,
            affine=self.normalisation.affine(layout.reader_vars) if normalised else None,
            fill_value=spec.fill_value if spec.nan_policy == "fill" else None,
            find_nan=spec.nan_policy == "check",
        )
        self._grid_reads = self._family_reads()
        if self.cells is None:
            return read_in_memory(spec, layout, prepare)
        kept, ahead, whole = self.sampling.reader_cells(self.world()[0], is_remote(spec.data))
        threads, decoder = self.resources.decode_threads, self.backend.decoder
        return read_by_cell(spec, layout, prepare, self.cells, kept, threads, decoder, ahead, whole)

    def _family_reads(self) -> list[GridRead]:
        """Every family's reads, their readers built (sized like the primary reader's cache)."""
        if not self.families:
            return []
        world_size = self.world()[0]
        split = self.sampling.train_split() if self.sampling.has_train else None

        def cache(per_sample: int, cell_bytes: int) -> int:
            return self.order.cache_cells(split, per_sample, cell_bytes, world_size)

        first = self.channels.input_shape[0] - self.spec.nan_mask - self.channels.broadcast
        train = self.plan.split_bounds.get("train")
        threads, series_as = self.resources.decode_threads, self.spec.series_as
        return family_reads(self.families, train, cache, threads, self.cells, series_as, first)

    @property
    def keeps_target_mask(self) -> bool:
        """Whether the reader keeps the targets' missing-value masks (dict batches, filled)."""
        return self.spec.batch_format == "dict" and self.spec.nan_policy == "fill"

    def dataset(self, split: str) -> XarrayWindowDataset:
        """The dataset of ``split`` (built once): batches by ``__getitems__(sample numbers)``."""
        index = self.plan.index(split)
        split = self.plan.split_for(split)
        if split not in self.datasets:
            spec, layout = self.spec, self.layout
            dict_batches = spec.batch_format == "dict"
            self.datasets[split] = XarrayWindowDataset(
                self.reader,
                index,
                self.geometry,
                layout.dynamic(spec.input_vars),
                layout.dynamic(spec.targets),
                spec.transform,
                spec.target_transform,
                ring_slots=self.resources.ring_slots,
                transform_on=spec.transform_on,
                input_extras=self._extras(spec.input_vars, spec.forcings or []),
                target_extras=self._extras(spec.targets, []),
                labels=layout.window_labels if dict_batches else None,
                offsets=self.sampling.random_offsets if split == "train" else None,
                targets_may_hold_nan=spec.nan_policy == "keep",
                valid=self.static_mask,
                grids=self._grid_reads,  # set with the reader (an argument before)
                latitude_weights=layout.latitude_weights() if dict_batches else None,
            )
        return self.datasets[split]

    def _extras(self, names: Sequence[str], forcings: Sequence[str]) -> ExtraChannels | None:
        """Static fields of ``names`` and ``forcings``, as channels after the read ones."""
        spec, statics = self.spec, self.layout.statics(names)
        normalised = spec.normalize is not None and spec.normalize_on == "gather" and statics
        affine = self.normalisation.affine(statics) if normalised else None
        return extra_channels(spec, self.layout, statics, forcings, affine)

    @cached_property
    def static_mask(self) -> StaticMask | None:
        """Where targets count (``mask``), or None."""
        return self.layout.static_mask(self.spec.mask)

    # ------------------------------------------------------------------ state and lifecycle

    def state_dict(self, batches_done: int | None, epoch: int | None) -> dict[str, Any]:
        """What a checkpoint keeps: the order's position and, once known, the statistics."""
        kept = {} if self._normalisation is None else self._normalisation.state_dict()
        grids = {
            stages.family.name: stages.normalisation.state_dict()["statistics"]
            for stages in self.__dict__.get("families", [])
            if stages.normalisation is not None
        }
        kept = {**kept, "grid_statistics": grids} if grids else kept
        return {**self.order.state_dict(batches_done, epoch), **kept}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's statistics and the order's position (checked)."""
        for stages in self.families if state.get("grid_statistics") else []:
            if stages.family.name in state["grid_statistics"]:
                stages.restore(state["grid_statistics"][stages.family.name])
        if "statistics" in state:
            self.restore_statistics(Statistics.from_dict(state["statistics"]))
        sampling, world_size = self.sampling, self.world()[0]
        chunked = "chunk_layout" in state and sampling.shuffle == "chunks"
        order_now = None
        if "order" in state and sampling.has_train:
            order_now = type(self.order.epoch_sampler(sampling.train_split(), world_size))
        restored = self.order.load_state_dict(
            state,
            sampling.chunk_layout(world_size) if chunked else None,
            world_size,
            None if order_now is None else order_now.__name__,
            len(self.plan.indices["train"]) if sampling.has_train and "epoch" in state else None,
        )
        if restored and isinstance(self._reader, ChunkedReader):
            self._drop_readers()  # its cache was sized for the order's old layout

    def restore_statistics(self, statistics: Statistics) -> None:
        """Use a checkpoint's statistics; the reader and datasets are built anew with them."""
        self._normalisation = Normalisation(self.spec, statistics, "checkpoint")
        self._drop_readers()

    def _drop_readers(self) -> None:
        """Build the reader and the datasets built so far anew (nothing was read with them)."""
        built = list(self.datasets)
        self.close()
        self._reader = None
        self.datasets.clear()
        for split in built:
            self.dataset(split)

    def close(self) -> None:
        """Stop the reader's threads and free its cache; the stages stay (cheap to reuse)."""
        aheads = [dataset.ahead for dataset in self.datasets.values() if dataset.ahead]
        reader = [] if self._reader is None else [self._reader]
        for part in [*aheads, *reader, *self.__dict__.get("families", [])]:
            part.close()  # a batch read ahead first: it uses the reader

    def close_source(self) -> None:
        """Close the source's file handles, if it was opened (xarray reopens them on use)."""
        layout = self.__dict__.get("layout")  # a teardown after a failed setup opens nothing
        if layout is not None:
            layout.source.close()
