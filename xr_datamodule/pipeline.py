"""DataPipeline: what ``setup`` builds from a spec, usable without Lightning.

source (:mod:`~xr_datamodule.sources`, lazy) → geometry and splits
(:mod:`~xr_datamodule.windows`, :mod:`~xr_datamodule.splits`) → sample index per split
(integer start grids, NaN policy applied) → one reader for all splits
(:mod:`~xr_datamodule.gather`: in memory, or cell by cell through
:mod:`~xr_datamodule.decode`) with statistics folded in (:mod:`~xr_datamodule.normalize`) →
a dataset per split (:mod:`~xr_datamodule.datasets`). Every step is computed once, when first
asked for, so the shapes are known before anything is read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property, partial
from typing import Any

import numpy as np
import xarray as xr

from xr_datamodule.chunkfiles import ChunkFileDecoder, chunk_files
from xr_datamodule.collate import DEFAULT_RING_SLOTS
from xr_datamodule.datasets import XarrayWindowDataset
from xr_datamodule.decode import (
    CellDecoder,
    TensorStoreDecoder,
    ZarrDecoder,
    tensorstore_available,
    zarr_decoding,
)
from xr_datamodule.extras import ExtraChannels, check_forcings, coordinate_dims
from xr_datamodule.gather import ChunkedReader, InMemoryReader, Preparation, WindowReader
from xr_datamodule.missing import (
    MISSING_ADVICE,
    MissingValueError,
    StaticMask,
    absent_chunks,
    box_any,
    first_missing,
    missing_mask,
)
from xr_datamodule.normalize import Statistics, zscore_statistics
from xr_datamodule.order import TrainingOrder, TrainSplit
from xr_datamodule.samplers import RandomOffsets, batch_spread, build_sampler
from xr_datamodule.sources import (
    channel_layouts,
    check_store_tree,
    check_variables,
    is_in_memory,
    is_remote,
    local_zarr_group,
    open_selected,
    static_variables,
    window_dim_order,
    zarr_opener,
)
from xr_datamodule.spec import DataSpec
from xr_datamodule.splits import resolve_splits
from xr_datamodule.stitch import masked_like, stitch_forecasts, stitch_windows, truth_at
from xr_datamodule.timeaxis import AxisCheck, apply_gap_policy, check_axis, is_datetime_labels
from xr_datamodule.transforms import (
    Transform,
    batch_dataset,
    batch_to_channels,
    window_channels,
    window_to_channels,
)
from xr_datamodule.weights import WindowStatistics, box_reduce, point_field, weights_from
from xr_datamodule.windows import SampleIndex, WindowGeometry, build_index, reduce_windows

__all__ = ["DataPipeline", "available_memory"]

LAYOUTS = ("auto", "grid", "forecast")  # of predictions put back by to_xarray
TENSORSTORE_MAX_CHUNK_BYTES_IN_WORKERS = 2 * 2**20  # see DataPipeline._tensorstore_pays

logger = logging.getLogger(__name__)

LOAD_BUDGET_SHARE = 0.25  # load="auto" loads when the data take at most this share of free RAM
DECODE_THREADS_MAX = 4  # threads decoding cells in parallel without workers
AUTO_WORKERS_MAX = 4  # most decoding workers num_workers="auto" picks for out-of-core data


def available_memory() -> int:
    """Bytes of memory available to new allocations (``MemAvailable`` on Linux)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class DataPipeline:
    """Source, geometry, splits, sample indices, reader, statistics and datasets of a spec.

    Args:
        spec: What to read and how (validated).
        order: The training order (seed, chunk layout, resume point); a new one by default.
        world: Returns (world size, global rank) when asked; default a single process.

    Example:
        >>> from torch.utils.data import DataLoader
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
    ) -> None:
        self.spec = spec
        self.order = order or TrainingOrder(
            spec.seed,
            spec.batch_size,
            spec.drop_last,
            spec.shuffle_chunks,
            spec.samples_per_epoch,
            spec.replacement,
        )
        self.world = world
        self.dropped_samples: dict[str, int] = {}
        self.gap_samples: dict[str, int] = {}  # samples left out for crossing a time gap
        self.datasets: dict[str, XarrayWindowDataset] = {}
        self._window_statistics: dict[str, WindowStatistics] = {}

    # ------------------------------------------------------------------ metadata (lazy)

    @cached_property
    def source(self) -> xr.Dataset:
        """The opened source, lazy (nothing loaded), restricted to ``select``'s labels."""
        spec = self.spec
        if spec.strict_store and isinstance(spec.data, (str, os.PathLike)):
            path = os.fspath(spec.data)
            if os.path.isdir(path):
                check_store_tree(path)
        return open_selected(spec.data, spec.open_kwargs, spec.select)

    @property
    def static_dim(self) -> str | None:
        """The dim static fields may lack (and are broadcast along): the split dim or time."""
        spec = self.spec
        dim = spec.split_dim or ("time" if "time" in spec.input_dims else None)
        return dim if dim in spec.input_dims else None

    @cached_property
    def window_dims(self) -> tuple[str, ...]:
        """Windowed dims in the order of the window axes of ``X`` and ``y``."""
        spec = self.spec
        check_variables(self.source, spec.input_vars, "input_vars")
        check_variables(self.source, spec.targets, "target_vars")
        dims = window_dim_order(
            self.source, spec.all_vars, tuple(spec.input_dims), static_dim=self.static_dim
        )
        check_forcings(spec.forcings or [], self.source, dims)
        for role, names in (("input_vars", spec.input_vars), ("target_vars", spec.targets)):
            if names and not self.dynamic(names):
                raise ValueError(
                    f"{role}: {list(names)} are all static fields (they lack "
                    f"{self.static_dim!r}); at least one must vary along it, the static "
                    "fields are broadcast beside it"
                )
        if self.statics(spec.all_vars) and (spec.transform or spec.target_transform):
            raise ValueError(
                f"static variables {self.statics(spec.all_vars)} cannot be combined with a "
                "transform yet: add them inside the transform instead"
            )
        return dims

    def statics(self, names: Sequence[str]) -> list[str]:
        """The static fields among ``names`` (variables without the time dim)."""
        return static_variables(self.source, names, self.static_dim)

    def dynamic(self, names: Sequence[str]) -> list[str]:
        """The variables among ``names`` that vary along every windowed dim."""
        static = set(self.statics(names))
        return [name for name in names if name not in static]

    @property
    def input_order(self) -> list[str]:
        """The variables of ``X``'s channels in order: time-varying ones, then static ones."""
        names = self.spec.input_vars
        return self.dynamic(names) + self.statics(names)

    @property
    def target_order(self) -> list[str]:
        """The variables of ``y``'s channels in order: time-varying ones, then static ones."""
        names = self.spec.targets
        return self.dynamic(names) + self.statics(names)

    @cached_property
    def geometry(self) -> WindowGeometry:
        """Window sizes, strides and offsets in :attr:`window_dims` order."""
        spec, dims = self.spec, self.window_dims
        assert spec.input_overlap is not None and spec.target_dims is not None
        overlap, offset = spec.input_overlap, spec.target_offset or {}
        geometry = WindowGeometry(
            dims=dims,
            input_size=tuple(spec.input_dims[d] for d in dims),
            stride=tuple(spec.input_dims[d] - overlap.get(d, 0) for d in dims),
            target_size=tuple(spec.target_dims[d] for d in dims),
            target_offset=tuple(offset.get(d, 0) for d in dims),
        )
        for axis, dim in enumerate(dims):
            length = self.source.sizes[dim]
            if geometry.input_size[axis] > length:
                raise ValueError(
                    f"input_dims[{dim!r}] = {geometry.input_size[axis]} is larger than the "
                    f"dim {dim!r} ({length})"
                )
            if geometry.extent[axis] > length:
                raise ValueError(
                    f"the target window (target_offset[{dim!r}] = "
                    f"{geometry.target_offset[axis]}, target_dims[{dim!r}] = "
                    f"{geometry.target_size[axis]}) lies outside the data: one sample spans "
                    f"{geometry.extent[axis]} positions along {dim!r}, which has {length}"
                )
        return geometry

    @property
    def split_dim(self) -> str:
        """The dim fractions split (and :meth:`batch_spread` measures by default)."""
        dims = self.geometry.dims
        return self.spec.split_dim or ("time" if "time" in dims else dims[0])

    @cached_property
    def split_bounds(self) -> dict[str, dict[str, tuple[int, int]]]:
        """Position range ``[lower, upper)`` of every split along every windowed dim."""
        assert self.spec.splits is not None
        return resolve_splits(self.spec.splits, self.split_dim, self.source, self.geometry.dims)

    @cached_property
    def indices(self) -> dict[str, SampleIndex]:
        """Sample index of every split (integer start grids; cheap, built once)."""
        geometry = self.geometry
        self.axes  # noqa: B018  (a disordered time axis is the first thing to report)
        indices = {}
        for name, split_bounds in self.split_bounds.items():
            index = build_index(geometry, split_bounds)
            if len(index) == 0:
                axis = index.grid_shape.index(0)
                dim = geometry.dims[axis]
                lo, hi = split_bounds[dim]
                raise ValueError(
                    f"split {name!r} has no full window: it spans {hi - lo} positions along "
                    f"{dim!r} but one sample needs {geometry.extent[axis]} (input window "
                    f"{geometry.input_size[axis]}, target window {geometry.target_size[axis]} "
                    f"at offset {geometry.target_offset[axis]})"
                )
            indices[name] = index
        indices = self._without_gaps(indices)
        if self.spec.nan_policy == "error":
            self._fail_on_missing()
        if self.spec.nan_policy == "drop":
            indices = self._drop_missing(indices)
        return indices

    @cached_property
    def axes(self) -> dict[str, AxisCheck]:
        """The checked labels of every windowed dim with a coordinate: order, step, gaps.

        Raises:
            TimeAxisError: A time axis that repeats a label or runs backwards; a numeric
                axis that is not monotonic.
        """
        source, given = self.source, self.spec.time_step
        if given is not None and not isinstance(given, Mapping):
            given = {self.time_dim or self.split_dim: given}  # one step: the time axis's
        steps = dict(given or {})
        unknown = [dim for dim in steps if dim not in self.window_dims]
        if unknown:
            raise KeyError(f"time_step: {unknown} are not windowed dims. Valid: {self.window_dims}")
        return {
            dim: check_axis(dim, source[dim].values, steps.get(dim))
            for dim in self.window_dims
            if dim in source.indexes
        }

    def _without_gaps(self, indices: dict[str, SampleIndex]) -> dict[str, SampleIndex]:
        """Apply ``gaps``: leave out (or refuse) samples whose span crosses an irregular step."""
        spec = self.spec
        kept, self.gap_samples = apply_gap_policy(
            indices, self.geometry, self.axes, spec.gaps, spec.random_offsets
        )
        return kept

    def _fail_on_missing(self) -> None:
        found = first_missing(self.source, self.dynamic(self.spec.all_vars), self.geometry.dims)
        if found is not None:
            name, where = found
            place = ", ".join(f"{dim}={label}" for dim, label in where.items())
            raise MissingValueError(
                f"variable {name!r} has a missing or non-finite value (NaN or ±Inf) at {place}; "
                f"{MISSING_ADVICE}"
            )

    def _drop_missing(self, indices: dict[str, SampleIndex]) -> dict[str, SampleIndex]:
        """Leave out every sample whose input or target window holds a NaN (vectorised)."""
        geometry, spec = self.geometry, self.spec
        zero = (0,) * len(geometry.dims)
        kept = {}
        for name, index in indices.items():
            # X sees only the input variables, y only the target ones: a mask for each.
            bad = self._windows_with_nan(spec.input_vars, index, zero, geometry.input_size)
            bad |= self._windows_with_nan(
                spec.targets, index, geometry.target_offset, geometry.target_size
            )
            kept[name] = index.keep(~bad)
            self.dropped_samples[name] = int(bad.sum())
            if len(kept[name]) == 0:
                raise ValueError(
                    f"split {name!r}: every one of its {len(index)} windows holds a missing "
                    "value (nan_policy='drop'); use nan_policy='fill' or other windows"
                )
            logger.info(
                "nan_policy='drop': left out %d of %d samples of split %r (missing values)",
                self.dropped_samples[name],
                len(index),
                name,
            )
        return kept

    def _windows_with_nan(
        self, names: Sequence[str], index: SampleIndex, offset: Sequence[int], size: Sequence[int]
    ) -> np.ndarray:
        """Per sample of ``index``: whether its window of ``names`` holds a NaN (in slabs)."""
        names, dims = self.dynamic(names), self.geometry.dims

        def mask_of(lo: int, hi: int) -> np.ndarray:
            return missing_mask(self.source.isel({dims[0]: slice(lo, hi)}), names, dims)

        step_bytes = self._points_per_step * (len(names) + 3)  # one byte per point and name
        return reduce_windows(index, offset, size, mask_of, box_any, step_bytes).astype(bool)

    @property
    def _points_per_step(self) -> int:
        """Grid points of the windowed dims at one position of the first."""
        return int(np.prod([self.source.sizes[dim] for dim in self.geometry.dims[1:]]))

    @property
    def split_sizes(self) -> dict[str, int]:
        """Number of samples per split."""
        return {name: len(index) for name, index in self.indices.items()}

    def split_for(self, split: str) -> str:
        """The split a stage reads: without a ``predict`` split, prediction reads ``test``."""
        return "test" if split == "predict" and "predict" not in self.indices else split

    # ------------------------------------------------------------------ shapes and names

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one ``X`` sample, ``(channel, *window)``, known before any read."""
        spec = self.spec
        channels = self._n_channels(inputs=True) + len(spec.forcings or []) + spec.nan_mask
        return (channels, *self.geometry.input_size)

    @property
    def target_shape(self) -> tuple[int, ...]:
        """Shape of one ``y`` sample, ``(channel, *window)``, known before any read."""
        return (self._n_channels(inputs=False), *self.geometry.target_size)

    @property
    def input_channel_names(self) -> list[str]:
        """Readable name of each channel of ``X``, e.g. ``u[level=200]``.

        With a ``transform``, the channels of its output variables (found by running it on
        the first window).
        """
        spec = self.spec
        channels = self._channel_names(inputs=True) + list(spec.forcings or [])
        return [*channels, "nan_mask"] if spec.nan_mask else channels

    @property
    def target_channel_names(self) -> list[str]:
        """Readable name of each channel of ``y`` (a target transform's own, if any)."""
        return self._channel_names(inputs=False)

    @property
    def input_variables(self) -> list[str]:
        """The variables ``X`` is made of: ``input_vars``, or the transform's output."""
        window = self._transformed_first(inputs=True)
        if window is None:
            return self.input_order + list(self.spec.forcings or [])
        return list(map(str, window.data_vars))

    @property
    def target_variables(self) -> list[str]:
        """The variables ``y`` is made of: ``target_vars``, or the target transform's output."""
        window = self._transformed_first(inputs=False)
        return self.target_order if window is None else list(map(str, window.data_vars))

    def _channel_names(self, inputs: bool) -> list[str]:
        window = self._transformed_first(inputs)
        data = self.source if window is None else window
        order = self.input_order if inputs else self.target_order
        names = order if window is None else list(map(str, window.data_vars))
        layouts = channel_layouts(data, names, self.window_dims)
        return [name for layout in layouts for name in layout.channel_names(data)]

    def _n_channels(self, inputs: bool) -> int:
        window = self._transformed_first(inputs)
        if window is None:
            names = self.spec.input_vars if inputs else self.spec.targets
            return sum(
                layout.n_channels
                for layout in channel_layouts(self.source, names, self.window_dims)
            )
        return window_to_channels(window, self.window_dims, self.spec.array_dtype).shape[0]

    def _transformed_first(self, inputs: bool) -> xr.Dataset | None:
        """A side's transform run once on the first window (None without a transform).

        A transform may add or drop variables: its output gives the channels. Run once per
        side and kept (shapes, names and the summary all ask for it).
        """
        probes = self.__dict__.setdefault("_probes", {})
        if inputs not in probes:
            spec, geometry = self.spec, self.geometry
            if inputs:
                names, transform, size = spec.input_vars, spec.transform, geometry.input_size
            else:
                names, transform, size = spec.targets, spec.target_transform, geometry.target_size
            probes[inputs] = None if transform is None else self._run_first(names, transform, size)
        return probes[inputs]

    def _run_first(self, names: list[str], transform: Transform, size: tuple) -> xr.Dataset:
        first = next(iter(self.indices.values())).starts([0])
        if self.spec.transform_on == "batch":
            values = window_channels(self.source, names, self.window_dims, first[0], size)
            batch = transform(
                batch_dataset(self.source, names, self.window_dims, first, values[None])
            )
            batch_to_channels(batch, self.window_dims, size, self.spec.array_dtype)  # checks dims
            return batch.isel(sample=0)
        window = self.source[names].isel(
            {
                dim: slice(int(s), int(s) + n)
                for dim, s, n in zip(self.window_dims, first[0], size, strict=True)
            }
        )
        return transform(window)

    @property
    def area_weights(self) -> np.ndarray:
        """Cosine of latitude over its mean, shaped ``(1, 1, *target window)`` to weight ``y``.

        For a latitude-weighted loss, e.g. ``((pred - y) ** 2 * w).mean()``. Needs a latitude
        dim that the target window spans whole (a global field), so that every sample has
        the same weights.
        """
        dims = coordinate_dims(self.source, self.window_dims)
        if "lat" not in dims:
            raise ValueError(
                f"area_weights needs a latitude dim among the windowed dims {self.window_dims}"
            )
        dim = dims["lat"]
        axis = self.window_dims.index(dim)
        if self.geometry.target_size[axis] != self.source.sizes[dim]:
            raise ValueError(
                f"area_weights: the target window spans {self.geometry.target_size[axis]} of "
                f"the {self.source.sizes[dim]} latitudes; weights differ from sample to sample "
                "then: take np.cos(np.radians(latitudes)) of each sample's window instead"
            )
        weights = np.cos(np.radians(np.asarray(self.source[dim].values, dtype=np.float64)))
        shape = [1] * (2 + len(self.window_dims))
        shape[2 + axis] = len(weights)
        return (weights / weights.mean()).reshape(shape).astype(self.spec.array_dtype)

    # ------------------------------------------------------------------ how data are read

    @cached_property
    def loads_into_memory(self) -> bool:
        """Whether the selected variables are (or will be) held in memory (see ``load``).

        Decided once: ``"auto"`` compares the selected variables in the output dtype with a
        quarter of the memory available at the first call.
        """
        load, names = self.spec.load, self.reader_vars
        if load is True or load is False:
            return load
        if is_in_memory(self.source, names):
            return True
        layouts = channel_layouts(self.source, names, self.window_dims)
        space = int(np.prod([self.source.sizes[d] for d in self.window_dims]))
        itemsize = self.spec.array_dtype.itemsize
        nbytes = sum(layout.n_channels for layout in layouts) * space * itemsize
        return nbytes <= LOAD_BUDGET_SHARE * available_memory()

    @property
    def num_workers(self) -> int:
        """DataLoader workers: the given number, or the ``"auto"`` choice for this data."""
        if self.spec.num_workers != "auto":
            return int(self.spec.num_workers)
        if self.loads_into_memory:
            return 0
        cores = os.cpu_count() or 1
        return min(AUTO_WORKERS_MAX, max(2, cores // 2)) if cores >= 2 else 0

    @property
    def decode_threads(self) -> int:
        """Threads a process decodes cells with.

        Without workers the main process decodes a batch's cells in parallel threads, and
        the next batch's in the background; workers already decode in parallel with each
        other (and share the cores).
        """
        if self.num_workers > 0:
            return 1
        return min(DECODE_THREADS_MAX, os.cpu_count() or 1)

    @property
    def ring_slots(self) -> int:
        """Hand-off slots per worker.

        One per batch of ``prefetch_factor`` plus two held by the training loop (see
        :mod:`xr_datamodule.handoff`).
        """
        return (self.spec.prefetch_factor or DEFAULT_RING_SLOTS - 2) + 2

    @cached_property
    def reader(self) -> WindowReader:
        """The one reader of all splits: in-memory data are stacked once, not once per split."""
        spec = self.spec
        prepare = Preparation(
            mask_of=self._input_channel_range() if spec.nan_mask else None,
            missing_of=self._target_channels() if self.keeps_target_mask else None,
            affine=(
                self.affine(self.reader_vars)
                if spec.normalize is not None and spec.normalize_on == "gather"
                else None
            ),
            fill_value=spec.fill_value if spec.nan_policy == "fill" else None,
            find_nan=spec.nan_policy == "check",
        )
        if self.loads_into_memory:
            return InMemoryReader(
                self.source,
                self.reader_vars,
                self.window_dims,
                spec.array_dtype,
                prepare,
                origin=self.origin,
            )
        reader = ChunkedReader(
            self.source,
            self.reader_vars,
            self.window_dims,
            spec.array_dtype,
            extent=self.geometry.extent,
            cache_cells=1,  # sized below, once the cells are known
            prepare=prepare,
            decode_threads=self.decode_threads,
            decoder=self._zarr_decoder(),
            origin=self.origin,
        )
        if is_remote(spec.data):  # each DataLoader worker opens the store anew
            reader.reopen = partial(open_selected, spec.data, spec.open_kwargs, spec.select)
        self._size_cache(reader)
        return reader

    def _size_cache(self, reader: ChunkedReader) -> None:
        split = self._train_split(reader) if "train" in self.split_bounds else None
        cells = self.order.cache_cells(
            split, reader.cells_per_sample, reader.cell_bytes, self.world()[0]
        )
        reader.resize_cache(cells)

    def resize_cache(self) -> None:
        """Size the reader's cache anew (after the training order's layout changed)."""
        reader = self.__dict__.get("reader")
        if isinstance(reader, ChunkedReader):
            self._size_cache(reader)

    def _zarr_decoder(self) -> CellDecoder | None:
        """The fastest exact reader of a zarr store, or None (read through xarray).

        A local store is read from its chunk files (:class:`ChunkFileDecoder`) when zarr
        describes every variable's chunks as plain compressed arrays (sharded or not), else
        with TensorStore where it pays (codec chains); a remote store, or one TensorStore cannot
        read here, through zarr-python's asynchronous API.
        """
        spec, names = self.spec, self.reader_vars
        if spec.select:  # the store's positions are not the selection's: read through xarray
            return None
        opener = zarr_opener(spec.data, spec.open_kwargs, names)
        if opener is None:
            return None
        try:
            arrays = opener()
        except Exception as error:  # xarray opened it; read through xarray then
            logger.info("reading through xarray: zarr could not open the store (%s)", error)
            return None
        decodings = {}
        for name in names:
            decoding = zarr_decoding(self.source[name], arrays[name], spec.array_dtype)
            if decoding is None:
                logger.info(
                    "reading through xarray: variable %r has an encoding zarr reads differently",
                    name,
                )
                return None
            decodings[name] = decoding
        layouts = channel_layouts(self.source, names, self.window_dims)
        dims = {name: tuple(map(str, self.source[name].dims)) for name in names}
        decoder = ZarrDecoder(opener, layouts, self.window_dims, dims, decodings)
        decoder._arrays = (os.getpid(), arrays)  # opened already in this process
        folder = local_zarr_group(spec.data, spec.open_kwargs)
        if folder is None:
            return decoder
        if spec.nan_policy != "keep":
            self._report_absent_chunks(arrays)
        files = {name: chunk_files(arrays[name], os.path.join(folder, name)) for name in names}
        if all(files.values()):
            return ChunkFileDecoder(
                files, layouts, self.window_dims, dims, decodings, self.decode_threads
            )
        if not tensorstore_available() or not self._tensorstore_pays(arrays):
            return decoder
        specs = {
            name: {
                "driver": "zarr3" if arrays[name].metadata.zarr_format == 3 else "zarr",
                "kvstore": {"driver": "file", "path": os.path.join(folder, name)},
            }
            for name in names
        }
        return TensorStoreDecoder(
            specs, layouts, self.window_dims, dims, decodings, self.decode_threads, decoder
        )

    def _tensorstore_pays(self, arrays: Mapping[str, Any]) -> bool:
        """Whether TensorStore's speed is worth its memory here.

        Each process that reads loads its own TensorStore: ~30 MB (library, threads and
        their malloc arenas) per DataLoader worker, whatever the size of the store. Its
        gain over zarr-python is the per-chunk overhead it saves, which shrinks as chunks
        grow: 2.2 against 0.6-0.85 GB/s per thread on the global benchmark's chunks of
        32-425 KB, 1.4x on chunks of 1.07 MB, ~15 % on 4 MB chunks, where decompression
        dominates. With workers it is used for chunks under 2 MiB on average.
        """
        if self.num_workers == 0:
            return True
        sizes = [int(np.prod(array.chunks)) * array.dtype.itemsize for array in arrays.values()]
        return float(np.mean(sizes)) < TENSORSTORE_MAX_CHUNK_BYTES_IN_WORKERS

    def _report_absent_chunks(self, arrays: Mapping[str, Any]) -> None:
        """Warn of chunks a local store lacks (they read as the fill value)."""
        for name, (absent, total, fill) in absent_chunks(arrays).items():
            logger.warning(
                "%s lacks %d of the %d chunks of variable %r: they read as its fill value "
                "(%s)%s; an interrupted write or copy, or chunks left out because they held "
                "only the fill value",
                self.origin,
                absent,
                total,
                name,
                fill,
                ", and the first batch that touches one fails under nan_policy='check'"
                if np.asarray(fill).dtype.kind == "f" and np.isnan(fill)
                else "",
            )

    @property
    def origin(self) -> str:
        """The source as errors name it: its path or URL, or "the xr.Dataset"."""
        data = self.spec.data
        return "the xr.Dataset" if isinstance(data, xr.Dataset) else repr(os.fspath(data))

    @property
    def reader_vars(self) -> list[str]:
        """The variables read window by window: every selected one but the static fields."""
        return self.dynamic(self.spec.all_vars)

    def _extras(self, names: Sequence[str], forcings: Sequence[str]) -> ExtraChannels | None:
        """Static fields of ``names`` and ``forcings``, as channels after the read ones."""
        statics = self.statics(names)
        if not statics and not forcings:
            return None
        spec = self.spec
        normalised = spec.normalize is not None and spec.normalize_on == "gather"
        extras = ExtraChannels(
            self.source,
            self.window_dims,
            statics,
            self.static_dim,
            forcings,
            spec.array_dtype,
            affine=self.affine(statics) if normalised and statics else None,
        )
        if spec.nan_policy in ("check", "error"):
            extras.fail_on_nan(self.source)
        return extras

    @property
    def keeps_target_mask(self) -> bool:
        """Whether the reader keeps the targets' missing-value masks (dict batches, filled)."""
        spec = self.spec
        return spec.batch_format == "dict" and spec.nan_policy == "fill"

    def _target_channels(self) -> np.ndarray:
        """The reader's channels of the (time-varying) target variables, in their order."""
        layouts = channel_layouts(self.source, self.reader_vars, self.window_dims)
        ends = np.cumsum([layout.n_channels for layout in layouts])
        where = {layout.name: end for layout, end in zip(layouts, ends, strict=True)}
        sizes = {layout.name: layout.n_channels for layout in layouts}
        names = self.dynamic(self.spec.targets)
        return np.concatenate([np.arange(where[n] - sizes[n], where[n]) for n in names])

    def _input_channel_range(self) -> np.ndarray:
        # The input variables come first among the reader's channels.
        layouts = channel_layouts(self.source, self.dynamic(self.spec.input_vars), self.window_dims)
        return np.arange(sum(layout.n_channels for layout in layouts))

    # ------------------------------------------------------------------ statistics

    @cached_property
    def statistics(self) -> Statistics:
        """Per-channel z-score statistics.

        Given (``stats``), restored from a checkpoint, or computed once from the training
        split (out of core, with dask).
        """
        spec = self.spec
        if spec.stats is not None:
            return Statistics.from_value(spec.stats, self.source, spec.all_vars, self.window_dims)
        if "train" not in self.split_bounds:
            raise ValueError("normalize='zscore' needs a 'train' split (or explicit stats)")
        return zscore_statistics(
            self.source, spec.all_vars, self.window_dims, self.split_bounds["train"]
        )

    def affine(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(offset, scale)`` per channel of the named variables, by their methods."""
        spec, key = self.spec, tuple(names)
        known = self.__dict__.setdefault("_affines", {})  # per batch with normalize_on="device"
        if key not in known:
            if isinstance(spec.normalize, dict):
                unknown = [k for k in spec.normalize if k != "default" and k not in spec.all_vars]
                if unknown:
                    raise KeyError(
                        f"normalize: {unknown} are not selected variables. Valid: "
                        f"{tuple(spec.all_vars)} and 'default'"
                    )
            methods = {name: spec.method_of(name) for name in names}
            known[key] = self.statistics.affine(names, methods)
        return known[key]

    def restore_statistics(self, statistics: Statistics) -> None:
        """Use a checkpoint's statistics; what was read with others is built anew."""
        self.__dict__["statistics"] = statistics
        self.__dict__.pop("_affines", None)
        self.__dict__.pop("reader", None)
        self.datasets.clear()

    def scale(
        self, values: Any, names: Sequence[str], inverse: bool = False, unscaled: int = 0
    ) -> Any:
        """Normalise (or, ``inverse``, denormalise) ``(batch, channel, ...)`` values.

        Works on tensors (on their device) and numpy arrays alike; identity without
        normalisation. ``unscaled`` last channels (forcings, the mask) are left as they are.
        """
        if self.spec.normalize is None:
            return values
        mean, std = self.affine(names)
        mean = np.concatenate([mean, np.zeros(unscaled)])
        std = np.concatenate([std, np.ones(unscaled)])
        shape = (1, -1) + (1,) * (values.ndim - 2)
        if hasattr(values, "new_tensor"):
            mean, std = values.new_tensor(mean), values.new_tensor(std)
        mean, std = mean.reshape(shape), std.reshape(shape)
        return values * std + mean if inverse else (values - mean) / std

    def scale_batch(self, inputs: Any, targets: Any) -> tuple[Any, Any]:
        """Normalise a batch ``(X, y)`` (``normalize_on="device"``); forcings stay as they are."""
        unscaled = len(self.spec.forcings or []) + self.spec.nan_mask
        x = self.scale(inputs, self.input_order, unscaled=unscaled)
        return x, self.scale(targets, self.target_order)

    # ------------------------------------------------------------------ datasets

    def dataset(self, split: str) -> XarrayWindowDataset:
        """The dataset of ``split`` (built once): batches by ``__getitems__(sample numbers)``."""
        split = self.split_for(split)
        if split not in self.indices:
            raise ValueError(f"unknown split {split!r}. Valid: {tuple(self.indices)}")
        if split not in self.datasets:
            spec = self.spec
            self.datasets[split] = XarrayWindowDataset(
                self.reader,
                self.indices[split],
                self.geometry,
                self.dynamic(spec.input_vars),
                self.dynamic(spec.targets),
                spec.transform,
                spec.target_transform,
                ring_slots=self.ring_slots,
                transform_on=spec.transform_on,
                input_extras=self._extras(spec.input_vars, spec.forcings or []),
                target_extras=self._extras(spec.targets, []),
                labels=self.window_labels if spec.batch_format == "dict" else None,
                offsets=self.random_offsets if split == "train" else None,
                targets_may_hold_nan=spec.nan_policy == "keep",
                valid=self.static_mask,
            )
        return self.datasets[split]

    # ------------------------------------------------------------------ user sampling

    @cached_property
    def random_offsets(self) -> RandomOffsets | None:
        """Random window starts of the training split (``random_offsets=True``), or None."""
        if not self.spec.random_offsets:
            return None
        geometry = self.geometry
        bounds = self.split_bounds["train"]
        last = [
            bounds[dim][1] - extent + below
            for dim, extent, below in zip(
                geometry.dims, geometry.extent, geometry.reach_below, strict=True
            )
        ]
        return RandomOffsets(
            self.order.seed, np.asarray(geometry.stride), np.asarray(last, dtype=np.int64)
        )

    def window_statistics(self, split: str = "train") -> WindowStatistics:
        """Per-sample statistics of ``split``'s windows (one out-of-core pass each, kept)."""
        if split not in self._window_statistics:
            index = self.indices[split]
            self._window_statistics[split] = WindowStatistics(
                partial(self._window_statistic, index)
            )
        return self._window_statistics[split]

    def _window_statistic(self, index: SampleIndex, side: str, stat: str) -> np.ndarray:
        geometry, spec = self.geometry, self.spec
        names = self.dynamic(spec.input_vars if side == "input" else spec.targets)
        size = geometry.input_size if side == "input" else geometry.target_size
        offset = (0,) * len(size) if side == "input" else geometry.target_offset
        dims = geometry.dims

        def field_of(lo: int, hi: int) -> np.ndarray:
            return point_field(self.source.isel({dims[0]: slice(lo, hi)}), names, dims, stat)

        def reduce(field: np.ndarray, box: Sequence[int]) -> np.ndarray:
            return box_reduce(field, box, stat)

        # float64 per point and variable, their counts for a mean, the box sums' arrays
        step_bytes = self._points_per_step * 8 * (2 * len(names) + 4)
        return reduce_windows(index, offset, size, field_of, reduce, step_bytes)

    @cached_property
    def sample_weights(self) -> np.ndarray | None:
        """Sampling weight of every training sample (``sample_weights``), or None."""
        setting = self.spec.sample_weights
        if setting is None or "train" not in self.split_bounds:
            return None
        n = len(self.indices["train"])
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
        if setting is None or "train" not in self.split_bounds:
            return None
        return build_sampler(setting, len(self.indices["train"]), self.sample_weights)

    @cached_property
    def window_labels(self) -> dict[str, np.ndarray]:
        """Label of every position of each windowed dim (for batch metadata).

        Datetimes as int64 nanoseconds, numbers as they are, positions where a dim has no
        coordinate.
        """
        labels = {}
        for dim in self.window_dims:
            if dim not in self.source.coords:
                labels[dim] = np.arange(self.source.sizes[dim], dtype=np.int64)
                continue
            values = np.asarray(self.source[dim].values)
            if np.issubdtype(values.dtype, np.datetime64):
                values = values.astype("datetime64[ns]").astype(np.int64)
            elif not np.issubdtype(values.dtype, np.number):
                values = np.arange(len(values), dtype=np.int64)
            labels[dim] = values
        return labels

    @cached_property
    def static_mask(self) -> StaticMask | None:
        """Where targets count (``mask``), or None."""
        name = self.spec.mask
        return (
            None if name is None else StaticMask(self.source, name, self.window_dims, self.time_dim)
        )

    @property
    def time_dim(self) -> str | None:
        """The windowed dim of time: the first with datetime labels, else ``time``, else None."""
        source = self.source
        for dim in self.window_dims:
            if dim in source.indexes and is_datetime_labels(source[dim].values):
                return dim
        return "time" if "time" in self.window_dims else None

    def forecast_layout(self, layout: str = "auto") -> bool:
        """Whether :meth:`to_xarray` gives the forecast layout (init x lead) for ``layout``."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        time_dim = self.time_dim
        if layout == "grid":
            return False
        if time_dim is None:
            if layout == "forecast":
                raise ValueError(
                    f"layout='forecast' needs a time dim among the windowed dims {self.window_dims}"
                )
            return False
        geometry, axis = self.geometry, self.window_dims.index(time_dim)
        ahead = geometry.target_offset[axis] >= geometry.input_size[axis]  # a forecast
        return layout == "forecast" or (ahead and geometry.target_size[axis] > 1)

    def to_xarray(
        self, predictions: Sequence[Any], split: str = "predict", layout: str = "auto"
    ) -> xr.Dataset:
        """Predictions of every sample of ``split`` in order, in physical units.

        On the grid (windows averaged where they overlap) or, with several target steps after
        the last input step or ``layout="forecast"``, per init and lead time (see
        :mod:`xr_datamodule.stitch`). NaN where the target itself was missing, under
        ``nan_policy`` ``"fill"`` or ``"keep"``.
        """
        split = self.split_for(split)
        if split not in self.indices:
            raise ValueError(f"unknown split {split!r}. Valid: {tuple(self.indices)}")
        physical = [self.scale(part, self.target_order, inverse=True) for part in predictions]
        arguments = (
            physical,
            self.indices[split],
            self.geometry,
            self.source,
            self.target_order,
        )
        bounds = self.split_bounds[split]
        if self.forecast_layout(layout):
            time_dim = self.time_dim
            assert time_dim is not None
            out = stitch_forecasts(*arguments, time_dim=time_dim, bounds=bounds)
        else:
            out = stitch_windows(*arguments, bounds=bounds)
        valid = None if self.static_mask is None else self.static_mask.field
        truth = self.spec.nan_policy in ("fill", "keep")  # only then can targets be missing
        return masked_like(out, self.source, self.time_dim, truth, valid)

    def truth_for(self, predicted: xr.DataArray) -> xr.DataArray:
        """The source's values where ``predicted`` (from :meth:`to_xarray`) lies, same shape."""
        return truth_at(self.source, predicted, self.time_dim)

    # ------------------------------------------------------------------ training order

    @property
    def train_shuffle(self) -> str:
        """The training order in use: ``"full"`` (uniform) or ``"chunks"`` (chunk-aware)."""
        spec = self.spec
        if spec.shuffle == "full" or self.loads_into_memory:
            return "full"
        if spec.sampler is not None:
            return "full"  # the user's order: not grouped by cell
        return "chunks"

    def train_split(self) -> TrainSplit:
        """What the training order needs to know of the ``train`` split."""
        if "train" not in self.indices:
            raise ValueError(f"there is no 'train' split; splits are {tuple(self.indices)}")
        return self._train_split(self.reader)

    def _train_split(self, reader: WindowReader) -> TrainSplit:
        index = self.indices["train"]
        shuffle, workers = self.train_shuffle, self.num_workers
        sampling = dict(weights=self.sample_weights, sampler=self.user_sampler, index=index)
        if not isinstance(reader, ChunkedReader):
            return TrainSplit(len(index), shuffle, workers, **sampling)
        cached = self.__dict__.get("_train_cells")
        if cached is None:  # cell of every training sample (where its span starts)
            below = self.geometry.reach_below
            starts = [axis - low for axis, low in zip(index.axis_starts, below, strict=True)]
            cached = self.__dict__["_train_cells"] = reader.home_cells(starts)[index.grid_ids()]
        return TrainSplit(
            len(index),
            shuffle,
            workers,
            cells=cached,
            cells_per_sample=reader.cells_per_sample,
            cell_bytes=reader.cell_bytes,
            walk=reader.cell_walk(),
            **sampling,
        )

    def chunk_layout(self) -> tuple[int, int]:
        """Chunk-aware order: (parts, streams per part).

        See :meth:`~xr_datamodule.order.TrainingOrder.chunk_layout`.
        """
        return self.order.chunk_layout(self.train_split(), self.world()[0])

    def train_batches(self, epoch: int = 0) -> list[np.ndarray]:
        """Sample numbers of every training batch of a data epoch on this rank, in order."""
        return self.order.epoch_batches(self.train_split(), epoch, self.world())

    def batch_spread(self, dim: str | None = None, epoch: int = 0) -> float:
        """How varied training batches are along ``dim``, against a full shuffle (1.0)."""
        dims = self.geometry.dims
        dim = dim or self.split_dim
        if dim not in dims:
            raise KeyError(f"batch_spread: {dim!r} is not a windowed dim. Valid: {dims}")
        index = self.indices["train"]
        positions = index.starts(np.arange(len(index)))[:, dims.index(dim)]
        return batch_spread(self.train_batches(epoch), positions)
