"""XarrayDataModule: configuration → ``setup(stage)`` → DataLoaders. Only wires the parts.

Data flows one way: :mod:`~xr_datamodule.sources` (open lazily) →
:mod:`~xr_datamodule.splits` (position ranges) → :mod:`~xr_datamodule.windows` (integer start
grids) → :mod:`~xr_datamodule.gather` (one vectorised read per batch) →
:mod:`~xr_datamodule.collate` (zero-copy tensors) → Lightning's Trainer, which owns devices.
"""

from __future__ import annotations

import gc
import html
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property, partial
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import xarray as xr
from torch.utils.data import DataLoader, SequentialSampler

from xr_datamodule import decode as decode_module
from xr_datamodule.collate import DEFAULT_RING_SLOTS, collate_batch
from xr_datamodule.datasets import XarrayIterableDataset, XarrayWindowDataset
from xr_datamodule.decode import (
    CellDecoder,
    TensorStoreDecoder,
    ZarrDecoder,
    tensorstore_available,
    zarr_decoding,
)
from xr_datamodule.gather import ChunkedReader, InMemoryReader, Preparation, WindowReader
from xr_datamodule.missing import NAN_POLICIES, box_any, first_missing, missing_mask
from xr_datamodule.normalize import Statistics, zscore_statistics
from xr_datamodule.samplers import (
    ArrayBatchSampler,
    BlockInterleavedSampler,
    ChunkShuffleSampler,
    EpochSampler,
    EpochShuffleSampler,
    ShardedBatchSampler,
    batch_spread,
)
from xr_datamodule.sources import (
    channel_layouts,
    check_source_exists,
    check_variables,
    is_in_memory,
    local_zarr_group,
    open_source,
    window_dim_order,
    zarr_opener,
)
from xr_datamodule.splits import DEFAULT_SPLITS, check_splits, resolve_splits
from xr_datamodule.stitch import stitch_windows
from xr_datamodule.transforms import Transform, transformed_windows
from xr_datamodule.windows import SampleIndex, WindowGeometry, build_index

__all__ = ["XarrayDataModule"]

logger = logging.getLogger(__name__)
_warned_tensorstore_fork = False  # the warning of _warn_if_workers_lose_tensorstore, once

DTYPES = ("float16", "float32", "float64")
STYLES = ("map", "iterable")
SHUFFLES = ("auto", "chunks", "full")
MIN_STREAMS = 4  # chunk-aware streams per rank at least (shuffle_chunks="auto")
FULL_SHUFFLE_CACHE_BYTES = 2**30  # most a full shuffle out of core caches per process
STREAM_CACHE_BYTES = 256 * 2**20  # shuffle_chunks="auto": cells of the streams, per process
STREAM_MIN_CELLS = 10  # shuffle_chunks="auto": a stream spans this many samples' cells at least
NORMALIZATIONS = (None, "zscore")
LOAD_CHOICES = ("auto", True, False)
LOAD_BUDGET_SHARE = 0.25  # load="auto" loads when the data take at most this share of free RAM
DECODE_THREADS_MAX = 4  # threads decoding cells in parallel without workers
AUTO_WORKERS_MAX = 4  # most decoding workers num_workers="auto" picks for out-of-core data
STAGE_SPLITS = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("predict",),
}


def _positive_int(value: Any, what: str, minimum: int = 1, what_else: str = "") -> int:
    number = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not number or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        kind = f"{kind} {what_else}" if what_else else kind
        raise (TypeError if not number else ValueError)(f"{what} must be {kind}, got {value!r}")
    return int(value)


def _int_mapping(mapping: Any, what: str, minimum: int | None) -> dict[str, int]:
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{what} must be a mapping of dim name to integer, got {mapping!r}")
    out = {}
    for dim, value in mapping.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{what}[{dim!r}] must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            kind = "positive" if minimum == 1 else f">= {minimum}"
            raise ValueError(f"{what}[{dim!r}] must be {kind}, got {value}")
        out[str(dim)] = int(value)
    return out


def _check_keys(mapping: Mapping[str, int], valid: Mapping[str, int], what: str) -> None:
    for dim in mapping:
        if dim not in valid:
            raise KeyError(f"{what}: dim {dim!r} is not in input_dims. Valid: {tuple(valid)}")


class _EpochLoader(DataLoader):
    """A DataLoader over an :class:`XarrayIterableDataset` that sets its epoch on each pass.

    Lightning calls ``set_epoch`` only on samplers, and an iterable dataset has none; the
    epoch is therefore asked of ``epoch_of`` (the trainer's epoch) when a pass starts, in the
    main process, before the pass's workers are started.
    """

    def __init__(self, dataset: XarrayIterableDataset, epoch_of: Callable[[], int], **kwargs: Any):
        self._epoch_of = epoch_of
        super().__init__(dataset, **kwargs)

    def __iter__(self) -> Any:
        self.dataset.set_epoch(self._epoch_of())  # type: ignore[attr-defined]
        return super().__iter__()


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


def _init_worker(worker_id: int) -> None:
    """Worker start: synchronous dask, one zarr thread, own file handles, numpy seeded.

    - Dask runs synchronously: no thread pool after fork.
    - Zarr decodes with one thread: a worker reads one chunk at a time anyway, and each extra
      thread kept its own malloc arena (2 workers held 35 MB less on the benchmark, at the
      same speed).
    - ``gc.freeze()``: the collector no longer walks the objects inherited from the parent,
      so their pages stay shared instead of being copied into each worker.
    - Files opened by the parent are forgotten (not closed) by xarray's file cache here, so
      the worker opens its own: a netCDF3 handle shared across a fork shares its file
      offset, and two processes reading through it failed with "Inappropriate ioctl for
      device" or "Resource temporarily unavailable".
    """
    import dask
    from xarray.backends.file_manager import FILE_CACHE

    gc.freeze()
    for key in list(FILE_CACHE):
        del FILE_CACHE[key]  # deleting does not close (eviction would)
    dask.config.set(scheduler="synchronous")
    if "zarr" in sys.modules:
        sys.modules["zarr"].config.set({"threading.max_workers": 1})
    # Seed the legacy global RNG too: user transforms commonly draw from it.
    np.random.seed(torch.initial_seed() % 2**32)  # noqa: NPY002


class XarrayDataModule(pl.LightningDataModule):
    """Windows of Xarray data as train/val/test/predict DataLoaders for Lightning.

    Batches are ``(X, y)`` float tensors of shape ``(batch, channel, *window)``: window axes
    follow the dim order of the first input variable; channels are the variables in the order
    given, each variable's non-windowed dims (e.g. ``level``) folded into channels in C order.
    Windows never cross a split boundary and only full windows are used.

    Args:
        data: A zarr store, a netCDF file, a glob of netCDF files, an fsspec URL, an
            ``xr.Dataset``, or ``"synthetic://weather"`` (the embedded synthetic data).
        input_vars: Variables that form ``X``.
        input_dims: Window length per dim (xbatcher's ``input_dims``).
        target_vars: Variables that form ``y``; default: ``input_vars``.
        input_overlap: Overlap of consecutive windows per dim (default 0), so the stride is
            ``window - overlap`` (xbatcher's ``input_overlap``).
        target_dims: Target window length per dim; same dims as ``input_dims`` (default).
        target_offset: Target window start relative to the input window start (default 0).
        splits: Label ranges per split (inclusive, as ``.sel(slice)``), e.g.
            ``{"train": {"time": ["2019-03-01", "2019-03-21T23"]}, ...}``, or fractions of
            ``split_dim``, e.g. ``{"train": 0.8, "val": 0.1, "test": 0.1}``. Names: train,
            val, test, predict. Default: 0.7/0.15/0.15 along ``split_dim``.
        split_dim: Dim that fractions split; default ``"time"`` if windowed, else the first
            dim of ``input_dims``.
        batch_size: Samples per batch.
        seed: Seed of the training order; the order is a function of ``(seed, epoch)``.
        num_workers: DataLoader worker processes, or ``"auto"`` (default). In memory: 0, since
            a batch is one sub-millisecond gather and workers only add a copy through shared
            memory (on the benchmark, 2 workers delivered 1.3 GB/s against 2.0 for 0). Out of
            core: half the cores, at least 2 and at most 4, so decoding overlaps the training
            step (on 2 cores, the benchmark's zarr store: 2 workers 538 MB/s, 0 workers 484
            with the main process decoding in 2 threads); 0 on a single core.
        pin_memory: Page-lock batches for faster host→GPU copies. Default: on only when the
            attached trainer runs on a CUDA GPU (pinning is wasted work on CPU).
        persistent_workers: Keep workers between epochs; default on when ``num_workers > 0``.
        prefetch_factor: Batches each worker loads ahead (torch's default 2); needs workers.
        multiprocessing_context: ``"fork"``, ``"spawn"`` or ``"forkserver"`` for workers.
        drop_last: Drop the last, smaller training batch.
        load: ``"auto"`` (default) loads the selected variables into memory when they take
            at most a quarter of the available memory, ``True`` always loads, ``False``
            never does: the data are then read out of core, cell by cell (groups of storage
            chunks), with chunk-aware shuffling for training.
        shuffle: How training samples are shuffled. ``"auto"`` (default): ``"full"`` for data
            in memory, ``"chunks"`` out of core. ``"chunks"``: a chunk-aware order that
            decodes each storage chunk about once per epoch: streams walk the chunks (the
            chunks a sample reaches into, e.g. the next time steps, come next in its stream)
            and every batch mixes ``shuffle_chunks`` streams, so a batch of full-field
            samples holds samples from that many different dates; consecutive batches of a
            process come from the same streams, a little further on. ``"full"``: a uniform
            per-sample shuffle, decoding whatever each batch needs (out of core a chunk is
            then decoded about as often as samples use it, like a hand-written Dataset but
            batched and with every read in flight at once).
        shuffle_chunks: Out of core, chunk-aware order: streams per rank, i.e. how many
            places of the data feed training at any moment (each DataLoader worker has
            ``shuffle_chunks / max(1, num_workers)`` of them, at least 1). ``"auto"``
            (default): enough for a batch to draw each sample from another stream where a
            cell holds fewer samples than a batch (full-field samples), at least 4 per rank.
            Each stream caches the cells one sample touches. The order depends on it and on
            ``num_workers``; a checkpoint keeps the layout it was written with.
        style: ``"map"`` (default): a map-style dataset with a DDP-aware batch sampler;
            ``"iterable"``: an iterable dataset that streams whole batches, sharded across
            DDP ranks and workers itself (workers are started anew each epoch). Both give the
            same batches in the same order.
        dtype: Tensor dtype: ``"float16"``, ``"float32"`` (default) or ``"float64"``.
        transform: Optional function applied to each input window as an ``xr.Dataset``
            (e.g. ``lambda ds: ds.assign(speed=np.hypot(ds.u10, ds.v10))``); its data
            variables become the channels. This leaves the vectorised path: one ``isel`` and
            one call per sample, roughly 0.1-1 ms each. Not saved in hyperparameters.
        target_transform: Likewise for the target window.
        open_kwargs: Keyword arguments for the xarray opener (``engine``, ``chunks``,
            ``storage_options``, ...).
        normalize: ``"zscore"`` normalises each channel with the mean and standard deviation
            of the **training split only** (computed once, out of core with dask; saved in
            the datamodule's ``state_dict`` so they travel in checkpoints). ``None``
            (default): raw values. :meth:`denormalize` and :meth:`to_xarray` give
            predictions back in physical units.
        normalize_on: ``"gather"`` (default) normalises the data when they are read (once
            per loaded copy or decoded cell, so it costs nothing per batch and works for any
            model); ``"device"`` normalises each batch after Lightning moved it, in
            ``on_after_batch_transfer`` (the arithmetic then runs on the GPU).
        nan_policy: Missing values (NaN). ``None`` (default): not looked for; they reach the
            model as NaN. ``"error"``: scan the data in ``setup`` and name the first NaN
            (variable and coordinates). ``"drop"``: leave out every sample whose input or
            target window holds a NaN (one out-of-core scan, then vectorised over all
            windows; the counts are in ``dropped_samples`` and the log). ``"fill"``:
            replace NaN with ``fill_value`` (after normalisation, so 0 is the mean).
        fill_value: The value ``nan_policy="fill"`` writes.
        nan_mask: With ``nan_policy="fill"``, add a last input channel that is 1 where any
            input variable or channel was missing (before filling) and 0 elsewhere.
        stats: Explicit statistics instead of computing them: ``{"mean": {var: value or
            [per channel]}, "std": {...}}`` or the path of a JSON file holding that; implies
            ``normalize="zscore"``.

    Example:
        >>> dm = XarrayDataModule(
        ...     "synthetic://weather", input_vars=["t2m", "u10", "v10"], target_vars=["t2m"],
        ...     input_dims={"time": 2, "lat": 32, "lon": 32}, input_overlap={"lon": 16},
        ...     target_dims={"time": 1, "lat": 32, "lon": 32}, target_offset={"time": 2},
        ...     batch_size=16)
        >>> dm.input_shape, dm.target_shape
        ((3, 2, 32, 32), (1, 1, 32, 32))
        >>> dm.setup("fit")
        >>> X, y = next(iter(dm.train_dataloader()))
        >>> tuple(X.shape), tuple(y.shape)
        ((16, 3, 2, 32, 32), (16, 1, 1, 32, 32))
    """

    def __init__(
        self,
        data: str | os.PathLike | xr.Dataset,
        input_vars: list[str],
        input_dims: dict[str, int],
        target_vars: list[str] | None = None,
        input_overlap: dict[str, int] | None = None,
        target_dims: dict[str, int] | None = None,
        target_offset: dict[str, int] | None = None,
        splits: dict[str, Any] | None = None,
        split_dim: str | None = None,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int | str = "auto",
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        prefetch_factor: int | None = None,
        multiprocessing_context: str | None = None,
        drop_last: bool = False,
        load: bool | str = "auto",
        shuffle_chunks: int | str = "auto",
        style: str = "map",
        dtype: str = "float32",
        transform: Callable[[xr.Dataset], xr.Dataset] | None = None,
        target_transform: Callable[[xr.Dataset], xr.Dataset] | None = None,
        open_kwargs: dict[str, Any] | None = None,
        normalize: str | None = None,
        normalize_on: str = "gather",
        stats: dict[str, Any] | str | None = None,
        nan_policy: str | None = None,
        fill_value: float = 0.0,
        nan_mask: bool = False,
        shuffle: str = "auto",
    ) -> None:
        super().__init__()
        unsaved = ["transform", "target_transform"]
        if isinstance(data, xr.Dataset):
            unsaved.append("data")
        self.save_hyperparameters(ignore=unsaved)
        check_source_exists(data)
        self.data = data
        self.input_vars = self._names(input_vars, "input_vars")
        self.target_vars = self._names(
            self.input_vars if target_vars is None else target_vars, "target_vars"
        )
        self.input_dims = _int_mapping(input_dims, "input_dims", minimum=1)
        if not self.input_dims:
            raise ValueError("input_dims must give a window length for at least one dim")
        self.input_overlap = _int_mapping(input_overlap, "input_overlap", minimum=0)
        _check_keys(self.input_overlap, self.input_dims, "input_overlap")
        for dim, overlap in self.input_overlap.items():
            if overlap >= self.input_dims[dim]:
                raise ValueError(
                    f"input_overlap[{dim!r}] = {overlap} must be smaller than the window "
                    f"input_dims[{dim!r}] = {self.input_dims[dim]}"
                )
        self.target_dims = _int_mapping(target_dims, "target_dims", minimum=1) or dict(
            self.input_dims
        )
        if set(self.target_dims) != set(self.input_dims):
            raise KeyError(
                f"target_dims must have the same dims as input_dims {tuple(self.input_dims)}, "
                f"got {tuple(self.target_dims)} (use length 1 for a dim the target does not span)"
            )
        self.target_offset = _int_mapping(target_offset, "target_offset", minimum=None)
        _check_keys(self.target_offset, self.input_dims, "target_offset")
        self.splits = dict(DEFAULT_SPLITS if splits is None else splits)
        check_splits(self.splits)
        self.split_dim = split_dim
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.seed = int(seed)
        if num_workers != "auto":
            _positive_int(num_workers, "num_workers", minimum=0)
        self._num_workers = num_workers
        if prefetch_factor is not None:
            _positive_int(prefetch_factor, "prefetch_factor")
            if num_workers == 0:
                raise ValueError("prefetch_factor needs num_workers > 0 (workers prefetch)")
        if multiprocessing_context not in (None, "fork", "spawn", "forkserver"):
            raise ValueError(
                f"multiprocessing_context must be one of ('fork', 'spawn', 'forkserver'), "
                f"got {multiprocessing_context!r}"
            )
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.drop_last = bool(drop_last)
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        if style == "iterable" and persistent_workers:
            raise ValueError(
                "style='iterable' needs persistent_workers=False: each epoch starts workers "
                "that see the new epoch"
            )
        self.style = style
        if not (load == "auto" or isinstance(load, bool)):
            raise ValueError(f"load must be one of {LOAD_CHOICES}, got {load!r}")
        self.load = load
        if shuffle_chunks != "auto":
            _positive_int(shuffle_chunks, "shuffle_chunks", what_else="or 'auto'")
        self.shuffle_chunks = shuffle_chunks
        if shuffle not in SHUFFLES:
            raise ValueError(f"shuffle must be one of {SHUFFLES}, got {shuffle!r}")
        self.shuffle = shuffle
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.dtype = np.dtype(dtype)
        self.transform = transform
        self.target_transform = target_transform
        self.open_kwargs = dict(open_kwargs or {})
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if normalize_on not in ("gather", "device"):
            raise ValueError(
                f"normalize_on must be one of ('gather', 'device'), got {normalize_on!r}"
            )
        if normalize is not None and (transform is not None or target_transform is not None):
            raise ValueError(
                "normalize works on the variables' channels; with a transform the channels "
                "are the transform's: normalise inside the transform instead"
            )
        if stats is not None and normalize is None:
            normalize = "zscore"  # explicit statistics mean: normalise with them
        self.normalize = normalize
        self.normalize_on = normalize_on
        self.stats = stats
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        self.nan_policy = nan_policy
        self.fill_value = float(fill_value)
        if nan_mask and nan_policy != "fill":
            raise ValueError(
                f"nan_mask=True needs nan_policy='fill' (got {nan_policy!r}): the mask marks "
                "the values that were filled"
            )
        self.nan_mask = bool(nan_mask)
        self.dropped_samples: dict[str, int] = {}
        self.datasets: dict[str, XarrayWindowDataset] = {}
        self._train_sampler: EpochSampler | None = None
        self._resume: tuple[int, int] | None = None
        self._resumed_layout: tuple[int, int] | None = None  # a checkpoint's (parts, streams)
        self._epoch_offset = 0
        self._train_batch_sampler: ShardedBatchSampler | None = None
        self._iterable_passes = 0

    @staticmethod
    def _names(names: Any, what: str) -> list[str]:
        if isinstance(names, str) or not all(isinstance(name, str) for name in names):
            raise TypeError(f"{what} must be a list of variable names, got {names!r}")
        return list(names)

    # ------------------------------------------------------------------ metadata (lazy)

    @cached_property
    def source(self) -> xr.Dataset:
        """The opened source, restricted to nothing: lazy, nothing loaded."""
        return open_source(self.data, self.open_kwargs)

    @cached_property
    def window_dims(self) -> tuple[str, ...]:
        """Windowed dims in the order of the window axes of ``X`` and ``y``."""
        check_variables(self.source, self.input_vars, "input_vars")
        check_variables(self.source, self.target_vars, "target_vars")
        return window_dim_order(self.source, self._all_vars, tuple(self.input_dims))

    @property
    def _all_vars(self) -> list[str]:
        return self.input_vars + [v for v in self.target_vars if v not in self.input_vars]

    @cached_property
    def geometry(self) -> WindowGeometry:
        """Window sizes, strides and offsets in :attr:`window_dims` order."""
        dims = self.window_dims
        geometry = WindowGeometry(
            dims=dims,
            input_size=tuple(self.input_dims[d] for d in dims),
            stride=tuple(self.input_dims[d] - self.input_overlap.get(d, 0) for d in dims),
            target_size=tuple(self.target_dims[d] for d in dims),
            target_offset=tuple(self.target_offset.get(d, 0) for d in dims),
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

    @cached_property
    def split_bounds(self) -> dict[str, dict[str, tuple[int, int]]]:
        """Position range ``[lower, upper)`` of every split along every windowed dim."""
        geometry = self.geometry
        split_dim = self.split_dim or ("time" if "time" in geometry.dims else geometry.dims[0])
        return resolve_splits(self.splits, split_dim, self.source, geometry.dims)

    @cached_property
    def indices(self) -> dict[str, SampleIndex]:
        """Sample index of every split (integer start grids; cheap, built once)."""
        geometry = self.geometry
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
        if self.nan_policy == "error":
            found = first_missing(self.source, self._all_vars, geometry.dims)
            if found is not None:
                name, where = found
                place = ", ".join(f"{dim}={label}" for dim, label in where.items())
                raise ValueError(
                    f"variable {name!r} has a missing value (NaN) at {place}; use "
                    "nan_policy='drop' to leave out windows with missing values or "
                    "nan_policy='fill' to replace them"
                )
        if self.nan_policy == "drop":
            indices = self._drop_missing(indices)
        return indices

    def _drop_missing(self, indices: dict[str, SampleIndex]) -> dict[str, SampleIndex]:
        """Leave out every sample whose input or target window holds a NaN (vectorised)."""
        geometry = self.geometry
        # X sees only the input variables, y only the target ones: one mask for each.
        in_input = box_any(
            missing_mask(self.source, self.input_vars, geometry.dims), geometry.input_size
        )
        in_target = box_any(
            missing_mask(self.source, self.target_vars, geometry.dims), geometry.target_size
        )
        kept = {}
        for name, index in indices.items():
            at_input = np.ix_(*index.axis_starts)
            at_target = np.ix_(
                *(s + o for s, o in zip(index.axis_starts, geometry.target_offset, strict=True))
            )
            bad = (in_input[at_input] | in_target[at_target]).reshape(-1)[index.grid_ids()]
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

    @property
    def split_sizes(self) -> dict[str, int]:
        """Number of samples per split."""
        return {name: len(index) for name, index in self.indices.items()}

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one ``X`` sample, ``(channel, *window)``, known before ``setup``.

        Link it to a model in LightningCLI with ``apply_on="instantiate"``.
        """
        size = self.geometry.input_size
        channels = self._n_channels(self.input_vars, self.transform, size) + self.nan_mask
        return (channels, *size)

    @property
    def target_shape(self) -> tuple[int, ...]:
        """Shape of one ``y`` sample, ``(channel, *window)``, known before ``setup``."""
        size = self.geometry.target_size
        return (self._n_channels(self.target_vars, self.target_transform, size), *size)

    @property
    def input_channel_names(self) -> list[str]:
        """Readable name of each channel of ``X`` (without transform), e.g. ``u[level=200]``."""
        layouts = channel_layouts(self.source, self.input_vars, self.window_dims)
        names = [name for layout in layouts for name in layout.channel_names(self.source)]
        return [*names, "nan_mask"] if self.nan_mask else names

    def _n_channels(self, names: list[str], transform: Transform | None, size: tuple) -> int:
        if transform is None:
            layouts = channel_layouts(self.source, names, self.window_dims)
            return sum(layout.n_channels for layout in layouts)
        # A transform may add or drop variables: run it once on the first window.
        first = next(iter(self.indices.values())).starts([0])
        probe = transformed_windows(
            self.source[names], first, self.window_dims, size, transform, self.dtype
        )
        return probe.shape[1]

    @cached_property
    def _reader(self) -> WindowReader:
        # One reader for all splits: in-memory data is stacked once, not once per split.
        prepare = Preparation(
            mask_of=self._input_channel_range() if self.nan_mask else None,
            affine=(
                self.statistics.channel_arrays(self._all_vars)
                if self.normalize is not None and self.normalize_on == "gather"
                else None
            ),
            fill_value=self.fill_value if self.nan_policy == "fill" else None,
        )
        if self.loads_into_memory:
            return InMemoryReader(
                self.source, self._all_vars, self.window_dims, self.dtype, prepare
            )
        reader = ChunkedReader(
            self.source,
            self._all_vars,
            self.window_dims,
            self.dtype,
            extent=self.geometry.extent,
            cache_cells=1,  # sized below, once the cells are known
            prepare=prepare,
            decode_threads=self._decode_threads,
            decoder=self._zarr_decoder(),
        )
        reader.resize_cache(self._cache_cells_for(reader))
        return reader

    def _zarr_decoder(self) -> CellDecoder | None:
        """Zarr's asynchronous reads when the store allows them exactly, else None (xarray)."""
        opener = zarr_opener(self.data, self.open_kwargs, self._all_vars)
        if opener is None:
            return None
        try:
            arrays = opener()
        except Exception as error:  # xarray opened it; read through xarray then
            logger.info("reading through xarray: zarr could not open the store (%s)", error)
            return None
        decodings = {}
        for name in self._all_vars:
            decoding = zarr_decoding(self.source[name], arrays[name], self.dtype)
            if decoding is None:
                logger.info(
                    "reading through xarray: variable %r has an encoding zarr reads differently",
                    name,
                )
                return None
            decodings[name] = decoding
        layouts = channel_layouts(self.source, self._all_vars, self.window_dims)
        dims = {name: tuple(map(str, self.source[name].dims)) for name in self._all_vars}
        decoder = ZarrDecoder(opener, layouts, self.window_dims, dims, decodings)
        decoder._arrays = (os.getpid(), arrays)  # opened already in this process
        folder = local_zarr_group(self.data, self.open_kwargs)
        if folder is None or not tensorstore_available():
            return decoder
        specs = {
            name: {
                "driver": "zarr3" if arrays[name].metadata.zarr_format == 3 else "zarr",
                "kvstore": {"driver": "file", "path": os.path.join(folder, name)},
            }
            for name in self._all_vars
        }
        return TensorStoreDecoder(
            specs, layouts, self.window_dims, dims, decodings, self._decode_threads, decoder
        )

    def _input_channel_range(self) -> np.ndarray:
        # The input variables come first among the reader's channels.
        layouts = channel_layouts(self.source, self.input_vars, self.window_dims)
        return np.arange(sum(layout.n_channels for layout in layouts))

    @cached_property
    def statistics(self) -> Statistics:
        """Per-channel z-score statistics.

        Given (``stats``), restored from a checkpoint, or computed once from the training
        split (out of core, with dask).
        """
        if self.stats is not None:
            return Statistics.from_value(self.stats, self.source, self._all_vars, self.window_dims)
        if "train" not in self.split_bounds:
            raise ValueError("normalize='zscore' needs a 'train' split (or explicit stats)")
        return zscore_statistics(
            self.source, self._all_vars, self.window_dims, self.split_bounds["train"]
        )

    def denormalize(self, values: Any, names: Sequence[str] | None = None) -> Any:
        """Undo the normalisation of ``(batch, channel, ...)`` values (tensor or array).

        Args:
            values: Normalised values, channels on axis 1 (e.g. predictions of ``y``).
            names: Their variables (default: the target variables).

        Example:
            >>> dm = XarrayDataModule("synthetic://weather", input_vars=["t2m"],
            ...                       input_dims={"time": 1, "lat": 32, "lon": 32},
            ...                       normalize="zscore")
            >>> X, y = next(iter(dm.val_dataloader()))
            >>> time = dm.indices["val"].starts([0])[0, 0]  # sample 0: first time, corner patch
            >>> raw = dm.source.t2m.isel(time=time, lat=slice(0, 32), lon=slice(0, 32))
            >>> bool(abs(dm.denormalize(y)[0, 0, 0].numpy() - raw.values).max() < 1e-4)
            True
        """
        if self.normalize is None:
            return values
        mean, std = self.statistics.channel_arrays(names or self.target_vars)
        shape = (1, -1) + (1,) * (values.ndim - 2)
        if hasattr(values, "new_tensor"):
            return values * values.new_tensor(std).reshape(shape) + values.new_tensor(mean).reshape(
                shape
            )
        return values * std.reshape(shape) + mean.reshape(shape)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``normalize_on="device"``, normalise ``(X, y)`` after Lightning moved them.

        Runs in each process on the device batch, so the arithmetic happens on the GPU.
        """
        if self.normalize is None or self.normalize_on != "device":
            return batch
        inputs, targets = batch
        return self._scale(inputs, self.input_vars), self._scale(targets, self.target_vars)

    def _scale(self, values: Any, names: Sequence[str]) -> Any:
        mean, std = self.statistics.channel_arrays(names)
        shape = (1, -1) + (1,) * (values.ndim - 2)
        return (values - values.new_tensor(mean).reshape(shape)) / values.new_tensor(std).reshape(
            shape
        )

    @property
    def train_shuffle(self) -> str:
        """The training order in use: ``"full"`` (uniform) or ``"chunks"`` (chunk-aware)."""
        if self.shuffle == "full" or self.loads_into_memory:
            return "full"
        return "chunks"

    @cached_property
    def _train_cells(self) -> np.ndarray:
        """Cell of every training sample (where its span starts), out of core."""
        reader = self._reader
        assert isinstance(reader, ChunkedReader)
        index = self.indices["train"]
        below = self.geometry.reach_below
        starts = [axis - low for axis, low in zip(index.axis_starts, below, strict=True)]
        return reader.home_cells(starts)[index.grid_ids()]

    def _samples_per_cell(self) -> float:
        cells = self._train_cells
        return len(cells) / max(1, len(np.unique(cells)))

    def chunk_layout(self) -> tuple[int, int]:
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
        if self._resumed_layout is not None:
            return self._resumed_layout
        processes = max(1, self.num_workers)
        if self.shuffle_chunks != "auto":
            return processes, max(1, int(self.shuffle_chunks) // processes)
        least = -(-MIN_STREAMS // processes)
        reader = self._reader
        if self._samples_per_cell() >= self.batch_size or not isinstance(reader, ChunkedReader):
            return processes, least
        stream_bytes = reader.cells_per_sample * reader.cell_bytes
        affordable = STREAM_CACHE_BYTES // max(stream_bytes, 1)
        world, _ = self._world()
        cells = len(np.unique(self._train_cells)) // world
        long_enough = cells // (processes * STREAM_MIN_CELLS * reader.cells_per_sample)
        return processes, max(least, min(self.batch_size, affordable, long_enough))

    def _cache_cells_for(self, reader: ChunkedReader) -> int:
        """Cells each process caches: what its share of the training order keeps in use."""
        per_sample = reader.cells_per_sample
        if "train" not in self.split_bounds:
            return per_sample + 1
        if self.train_shuffle == "full":
            wanted = self.batch_size * per_sample + 1
            return max(per_sample, min(wanted, FULL_SHUFFLE_CACHE_BYTES // reader.cell_bytes))
        self.__dict__["_reader"] = reader  # chunk_layout reads the cells through it
        parts, streams = self.chunk_layout()
        processes = max(1, self.num_workers)
        # A process reads one part, unless a checkpoint's layout does not match the workers.
        parts_read = parts // math.gcd(parts, processes)
        # Each stream keeps the cells of its current sample; within a batch, streams move on
        # to their next cell about batch_size / samples-per-cell times. Where streams move
        # every batch (full-field samples), one cell more keeps a stream's cells while it
        # sits out a batch of the random merge (on the benchmark's store of 4 steps per
        # chunk: 1.12 decodes per chunk without it, 1.07-1.08 with it).
        per_cell = self._samples_per_cell()
        moves = math.ceil(self.batch_size / per_cell)
        return parts_read * (streams * per_sample + moves) + int(per_cell < self.batch_size)

    @property
    def _decode_threads(self) -> int:
        # Without workers the main process decodes a batch's cells in parallel threads, and
        # the next batch's in the background; workers already decode in parallel with each
        # other (and share the cores).
        if self.num_workers > 0:
            return 1
        return min(DECODE_THREADS_MAX, os.cpu_count() or 1)

    @cached_property
    def loads_into_memory(self) -> bool:
        """Whether the selected variables are (or will be) held in memory (see ``load``).

        Decided once: ``"auto"`` compares the selected variables in the output dtype with a
        quarter of the memory available at the first call.
        """
        if self.load is True or self.load is False:
            return self.load
        if is_in_memory(self.source, self._all_vars):
            return True
        layouts = channel_layouts(self.source, self._all_vars, self.window_dims)
        space = int(np.prod([self.source.sizes[d] for d in self.window_dims]))
        nbytes = sum(layout.n_channels for layout in layouts) * space * self.dtype.itemsize
        return nbytes <= LOAD_BUDGET_SHARE * available_memory()

    @property
    def num_workers(self) -> int:
        """DataLoader workers: the given number, or the ``"auto"`` choice for this data."""
        if self._num_workers != "auto":
            return int(self._num_workers)
        if self.loads_into_memory:
            return 0
        cores = os.cpu_count() or 1
        return min(AUTO_WORKERS_MAX, max(2, cores // 2)) if cores >= 2 else 0

    # ------------------------------------------------------------------ display

    def summary(self) -> dict[str, Any]:
        """What the datamodule will feed a model: source, variables, shapes, splits, loader.

        Opens the source lazily (nothing is loaded); used by ``repr`` and the notebook view.
        """
        source = "xr.Dataset" if isinstance(self.data, xr.Dataset) else os.fspath(self.data)
        geometry = self.geometry
        splits = {}
        for name, bounds in self.split_bounds.items():
            ranges = []
            for dim, (lo, hi) in bounds.items():
                if (lo, hi) != (0, self.source.sizes[dim]):
                    labels = self.source.indexes[dim] if dim in self.source.indexes else None
                    first = labels[lo] if labels is not None else lo
                    last = labels[hi - 1] if labels is not None else hi - 1
                    ranges.append(f"{dim} {first} … {last}")
            splits[name] = (", ".join(ranges) or "all", len(self.indices[name]))
        return {
            "source": source,
            "reading": "in memory" if self.loads_into_memory else "out of core (by chunk)",
            "inputs": (", ".join(self.input_vars), self.input_shape),
            "targets": (", ".join(self.target_vars), self.target_shape),
            "windows": ", ".join(
                f"{dim} {size} (stride {stride}, target {tsize} at {offset:+d})"
                for dim, size, stride, tsize, offset in zip(
                    geometry.dims,
                    geometry.input_size,
                    geometry.stride,
                    geometry.target_size,
                    geometry.target_offset,
                    strict=True,
                )
            ),
            "splits": splits,
            "loader": (
                f"batch {self.batch_size}, workers {self.num_workers}, style {self.style}, "
                f"dtype {self.dtype.name}, normalize {self.normalize}, "
                f"nan_policy {self.nan_policy}"
            ),
        }

    def __repr__(self) -> str:
        try:
            info = self.summary()
        except Exception as err:  # a repr must not raise: show what is wrong instead
            return f"XarrayDataModule(data={self.data!r}) — not usable yet: {err}"
        lines = [f"XarrayDataModule: {info['source']} ({info['reading']})"]
        lines.append(f"  X: {info['inputs'][0]} -> {info['inputs'][1]}")
        lines.append(f"  y: {info['targets'][0]} -> {info['targets'][1]}")
        lines.append(f"  windows: {info['windows']}")
        for name, (where, count) in info["splits"].items():
            lines.append(f"  {name}: {where} ({count:,} samples)")
        lines.append(f"  loader: {info['loader']}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        try:
            info = self.summary()
        except Exception:
            return f"<pre>{html.escape(repr(self))}</pre>"
        rows = [
            ("source", f"{info['source']} ({info['reading']})"),
            ("X", f"{info['inputs'][0]} → {info['inputs'][1]}"),
            ("y", f"{info['targets'][0]} → {info['targets'][1]}"),
            ("windows", info["windows"]),
            *((f"split {n}", f"{w} ({c:,} samples)") for n, (w, c) in info["splits"].items()),
            ("loader", info["loader"]),
        ]
        body = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
            f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>"
            for k, v in rows
        )
        return f"<b>XarrayDataModule</b><table>{body}</table>"

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets a stage needs; runs in every process, cheap when repeated.

        ``stage`` is ``"fit"`` (train + val), ``"validate"``, ``"test"``, ``"predict"`` or
        ``None`` (all splits). Opens the source lazily and checks the whole configuration
        against the data (variables, dims, windows, splits). A lazy store is loaded only as
        ``load`` allows: with ``load=False`` nothing is loaded whole.

        Example:
            >>> dm = XarrayDataModule("synthetic://weather", input_vars=["t2m"],
            ...                       input_dims={"time": 1, "lat": 32, "lon": 32})
            >>> dm.setup("test")
            >>> sorted(dm.datasets)
            ['test']
        """
        if stage is not None and stage not in STAGE_SPLITS:
            raise ValueError(f"unknown stage {stage!r}. Valid: {tuple(STAGE_SPLITS)} or None")
        self.input_shape, self.target_shape  # noqa: B018  (validates the whole configuration)
        wanted = STAGE_SPLITS[stage] if stage else tuple(self._split_for(s) for s in self.indices)
        if stage == "fit" and "train" not in self.indices:
            raise ValueError(f"stage 'fit' needs a 'train' split; splits are {tuple(self.indices)}")
        for split in wanted:
            split = self._split_for(split)
            if split in self.indices:
                self._dataset(split)

    def _split_for(self, split: str) -> str:
        # Without a "predict" split, prediction runs over the test split.
        return "test" if split == "predict" and "predict" not in self.indices else split

    def _dataset(self, split: str) -> XarrayWindowDataset:
        if split not in self.datasets:
            self.datasets[split] = XarrayWindowDataset(
                self._reader,
                self.indices[split],
                self.geometry,
                self.input_vars,
                self.target_vars,
                self.transform,
                self.target_transform,
                ring_slots=self._ring_slots,
            )
        return self.datasets[split]

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the order is a function of ``(seed, epoch)``."""
        return self._dataloader("train")

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in order (an empty list when there is no ``val`` split)."""
        return self._dataloader("val")

    def test_dataloader(self) -> DataLoader | list:
        """Test batches in order (an empty list when there is no ``test`` split)."""
        return self._dataloader("test")

    def predict_dataloader(self) -> DataLoader | list:
        """Batches of the ``predict`` split in order (the ``test`` split when there is none)."""
        return self._dataloader("predict")

    def to_xarray(self, predictions: Sequence[Any], split: str = "predict") -> xr.Dataset:
        """Put what ``trainer.predict`` returned back on the grid, as the target variables.

        Windows are averaged where they overlap; positions no window covers are NaN. The
        predictions must be the target windows of every sample of ``split`` in order (the
        predict loader's order), e.g. ``trainer.predict(model, datamodule=dm)``.

        Example:
            >>> dm = XarrayDataModule("synthetic://weather", input_vars=["t2m"],
            ...                       input_dims={"time": 1, "lat": 32, "lon": 32},
            ...                       input_overlap={"lon": 16})
            >>> truth = [y for _, y in dm.predict_dataloader()]
            >>> grid = dm.to_xarray(truth)
            >>> bool((grid.t2m == dm.source.t2m.sel(time=grid.time)).all())
            True
        """
        split = self._split_for(split)
        if split not in self.indices:
            raise ValueError(f"unknown split {split!r}. Valid: {tuple(self.indices)}")
        # Predictions are in normalised units when normalisation is on: back to physical.
        physical = [self.denormalize(part) for part in predictions]
        return stitch_windows(
            physical, self.indices[split], self.geometry, self.source, self.target_vars
        )

    def _dataloader(self, requested: str) -> Any:
        split = self._split_for(requested)
        if split not in self.indices:
            if split == "train":
                raise ValueError(f"there is no 'train' split; splits are {tuple(self.indices)}")
            return []
        dataset = self._dataset(split)
        self._warn_if_workers_lose_tensorstore(dataset)
        if split == "train" and self.style == "iterable":
            settings = self.loader_settings
            if self.num_workers > 0:
                settings["persistent_workers"] = False  # each pass must see the new epoch
            return _EpochLoader(
                XarrayIterableDataset(dataset, self._train_batches(dataset)),
                epoch_of=self._iterable_epoch,
                batch_size=None,
                collate_fn=self._collate,
                **settings,
            )
        if split == "train":
            return DataLoader(
                dataset,
                sampler=self._train_batches(dataset),
                batch_size=None,  # the sampler yields whole batches
                collate_fn=self._collate,  # one Batch, not a list
                **self.loader_settings,
            )
        order = self._eval_order(requested, dataset)
        batch_sampler = ArrayBatchSampler(order, self.batch_size, False)
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=self._collate,
            **self.loader_settings,
        )

    def _warn_if_workers_lose_tensorstore(self, dataset: XarrayWindowDataset) -> None:
        """Forked workers cannot use TensorStore once this process has: say so, once."""
        decoder = getattr(dataset.reader, "decoder", None)
        forked = self.multiprocessing_context in (None, "fork") and sys.platform != "win32"
        if (
            self.num_workers > 0
            and forked
            and isinstance(decoder, TensorStoreDecoder)
            and not decode_module.forked_workers_may_use_tensorstore()
        ):
            global _warned_tensorstore_fork
            if not _warned_tensorstore_fork:
                _warned_tensorstore_fork = True
                logger.warning(
                    "this process has read through TensorStore, which does not survive a "
                    "fork: DataLoader workers forked from it read through zarr-python instead, "
                    "which decodes 2-3x slower. Read only in workers (num_workers > 0 "
                    "throughout), or pass multiprocessing_context='forkserver'."
                )

    def _eval_order(self, requested: str, dataset: XarrayWindowDataset) -> Any:
        # Out of core with workers, validation and test deal one contiguous run of batches to
        # each worker, so that each cell is decoded once, not once per worker (2 workers on
        # the benchmark's store: 389 MB/s in order, 615-622 dealt). Prediction stays in
        # order: to_xarray and prediction writers expect it.
        if (
            requested in ("val", "test")
            and self.num_workers > 1
            and isinstance(dataset.reader, ChunkedReader)
        ):
            return BlockInterleavedSampler(len(dataset), self.batch_size, self.num_workers)
        return SequentialSampler(dataset)

    @property
    def _collate(self) -> Any:
        return partial(collate_batch, ring_slots=self._ring_slots)

    @property
    def _ring_slots(self) -> int:
        # A worker's ring needs a slot per batch it may have in flight (prefetch_factor)
        # plus two held by the training loop; see xr_datamodule.handoff.
        prefetch = self.prefetch_factor or DEFAULT_RING_SLOTS - 2
        return prefetch + 2

    def _train_batches(self, dataset: XarrayWindowDataset) -> ShardedBatchSampler:
        if self._train_sampler is None or self._train_sampler.n != len(dataset):
            self._train_sampler = self._make_train_sampler(dataset)
        world_size, rank = self._world()
        sampler = ShardedBatchSampler(
            self._train_sampler,
            self.batch_size,
            self.drop_last,
            world_size,
            rank,
            resume=self._resume,
            epoch_offset=self._epoch_offset,
            # Without workers the reader decodes the next batch's cells in the background.
            lookahead=int(self.num_workers == 0 and isinstance(dataset.reader, ChunkedReader)),
        )
        if self.trainer is not None:
            # Lightning may start the loader's iterator (and workers' prefetching) before it
            # calls set_epoch, e.g. when resuming: start from the trainer's epoch already.
            sampler.set_epoch(self.trainer.current_epoch)
        self._resume = None  # handed over: the sampler applies it once
        self._train_batch_sampler = sampler
        return sampler

    def train_batches(self, epoch: int = 0) -> list[np.ndarray]:
        """Sample numbers of every training batch of a data epoch on this rank, in order.

        The order the training loader yields in that epoch (it is a function of ``(seed,
        epoch)`` and the settings), computed without reading any data.

        Example:
            >>> dm = XarrayDataModule("synthetic://weather", input_vars=["t2m"],
            ...                       input_dims={"time": 1, "lat": 32, "lon": 32},
            ...                       batch_size=8)
            >>> batches = dm.train_batches(epoch=0)
            >>> sum(len(b) for b in batches) == dm.split_sizes["train"]
            True
        """
        dataset = self._dataset("train") if "train" in self.indices else None
        if dataset is None:
            raise ValueError(f"there is no 'train' split; splits are {tuple(self.indices)}")
        world, rank = self._world()
        order = self._make_train_sampler(dataset)
        sampler = ShardedBatchSampler(order, self.batch_size, self.drop_last, world, rank)
        sampler.set_epoch(epoch - self._epoch_offset)
        return sampler.epoch_batches()

    def batch_spread(self, dim: str | None = None, epoch: int = 0) -> float:
        """How varied training batches are along ``dim``, against a full shuffle (1.0).

        The mean standard deviation of the samples' positions along ``dim`` (default: the
        split dim, e.g. time) within a batch, over that of a uniform shuffle; see
        :func:`~xr_datamodule.samplers.batch_spread`. With ``shuffle="chunks"`` it shows
        what the chunk-aware order gives up for its speed.
        """
        dims = self.geometry.dims
        dim = dim or self.split_dim or ("time" if "time" in dims else dims[0])
        if dim not in dims:
            raise KeyError(f"batch_spread: {dim!r} is not a windowed dim. Valid: {dims}")
        index = self.indices["train"]
        positions = index.starts(np.arange(len(index)))[:, dims.index(dim)]
        return batch_spread(self.train_batches(epoch), positions)

    def _iterable_epoch(self) -> int:
        """The epoch of the next iterable pass: the trainer's, or one more than the last."""
        if self.trainer is not None:
            return int(self.trainer.current_epoch)
        self._iterable_passes += 1
        return self._iterable_passes - 1

    def _world(self) -> tuple[int, int]:
        """(world size, global rank): from the trainer, else torch.distributed, else (1, 0)."""
        if self.trainer is not None:
            return int(self.trainer.world_size), int(self.trainer.global_rank)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the data exactly (Lightning saves it).

        The seed, and while fitting the epoch and how many of its batches were trained on,
        so that ``fit(ckpt_path=...)`` continues with exactly the samples that remained.
        """
        state: dict[str, Any] = {"seed": self.seed, "epoch_offset": self._epoch_offset}
        if isinstance(self._train_sampler, ChunkShuffleSampler):
            # The order depends on them: a resume with other workers keeps them.
            state["chunk_layout"] = [self._train_sampler.processes, self._train_sampler.streams]
        if "statistics" in self.__dict__:  # computed or given: keep them with the model
            state["statistics"] = self.statistics.to_dict()
        trainer, sampler = self.trainer, self._train_batch_sampler
        if trainer is not None and sampler is not None:
            # `processed`, not `completed`: a checkpoint written in on_train_batch_end (as
            # ModelCheckpoint(every_n_train_steps=...) does) counts the current batch as
            # done, and Lightning resumes after it.
            progress = trainer.fit_loop.epoch_loop.batch_progress.current
            done = int(progress.processed)  # type: ignore[attr-defined]
            state["epoch"] = sampler.serving
            state["batches_done"] = done
            if 0 < done < len(sampler):
                # Lightning may already count this epoch as finished (fit stopped by
                # max_steps); it will then resume in its next epoch, which must continue
                # this data epoch.
                state["epoch_offset"] = int(trainer.current_epoch) - sampler.serving
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the seed and, mid-epoch, the batches to skip (Lightning calls it on resume).

        Example:
            >>> dm = XarrayDataModule("synthetic://weather", input_vars=["t2m"],
            ...                       input_dims={"time": 1, "lat": 32, "lon": 32})
            >>> dm.load_state_dict({"seed": 7, "epoch": 0, "batches_done": 3})
            >>> dm.seed
            7
        """
        if int(state_dict.get("seed", self.seed)) != self.seed:
            self.seed = int(state_dict["seed"])
            self._train_sampler = None
        self._epoch_offset = int(state_dict.get("epoch_offset", 0))
        if "statistics" in state_dict:
            stored = state_dict["statistics"]
            self.__dict__["statistics"] = Statistics(stored["mean"], stored["std"])
            self.__dict__.pop("_reader", None)  # built with other statistics: build anew
            self.datasets.clear()
        if "epoch" in state_dict and state_dict.get("batches_done"):
            self._resume = (int(state_dict["epoch"]), int(state_dict["batches_done"]))
        layout = state_dict.get("chunk_layout")
        if layout is not None and self.train_shuffle == "chunks":
            layout = (int(layout[0]), int(layout[1]))
            if layout != self.chunk_layout():
                self._restore_layout(layout)

    def _restore_layout(self, layout: tuple[int, int]) -> None:
        """Keep a checkpoint's chunk-aware layout, so the resumed order is the same."""
        logger.warning(
            "the checkpoint's chunk-aware order has %d parts of %d streams (one part per "
            "DataLoader worker then); keeping it with num_workers=%d so that every sample "
            "still comes exactly once (some cells may be decoded by more than one worker)",
            *layout,
            self.num_workers,
        )
        self._resumed_layout = layout
        self._train_sampler = None
        reader = self.__dict__.get("_reader")
        if isinstance(reader, ChunkedReader):  # built already: size its cache for the layout
            reader.resize_cache(self._cache_cells_for(reader))

    def _make_train_sampler(self, dataset: XarrayWindowDataset) -> EpochSampler:
        reader = dataset.reader
        if isinstance(reader, ChunkedReader) and self.train_shuffle == "chunks":
            parts, streams = self.chunk_layout()
            return ChunkShuffleSampler(
                self._train_cells,
                seed=self.seed,
                streams=streams,
                batch_size=self.batch_size,
                processes=parts,
                walk=reader.cell_walk(),
            )
        return EpochShuffleSampler(len(dataset), self.seed)

    @property
    def loader_settings(self) -> dict[str, Any]:
        """DataLoader keyword arguments (workers, pinning, prefetching) as resolved now."""
        pin_memory = self.pin_memory
        if pin_memory is None:
            pin_memory = self._trainer_on_cuda()
        settings: dict[str, Any] = {"num_workers": self.num_workers, "pin_memory": pin_memory}
        if self.num_workers > 0:
            persistent = self.persistent_workers
            settings["persistent_workers"] = True if persistent is None else persistent
            settings["worker_init_fn"] = _init_worker
            if self.prefetch_factor is not None:
                settings["prefetch_factor"] = self.prefetch_factor
            if self.multiprocessing_context is not None:
                settings["multiprocessing_context"] = self.multiprocessing_context
        return settings

    def _trainer_on_cuda(self) -> bool:
        from lightning.pytorch.accelerators import CUDAAccelerator

        trainer = self.trainer
        return trainer is not None and isinstance(trainer.accelerator, CUDAAccelerator)
