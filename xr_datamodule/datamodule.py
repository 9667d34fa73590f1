"""XarrayDataModule: Lightning's hooks over a spec, a pipeline of stages and loaders.

Arguments: :mod:`~xr_datamodule.spec`; stages: :mod:`~xr_datamodule.pipeline`; loaders:
:mod:`~xr_datamodule.loaders`; read-only views: :mod:`~xr_datamodule.views`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import xarray as xr
from torch.utils.data import DataLoader

from xr_datamodule.handoff import release_memory
from xr_datamodule.interop import xbatcher_arguments
from xr_datamodule.layout import preview_source
from xr_datamodule.loaders import eval_loader, on_cuda, train_loader, trained_so_far, world_of
from xr_datamodule.pipeline import DataPipeline, training_order
from xr_datamodule.spec import STAGE_SPLITS, DataSpec, hyperparameters
from xr_datamodule.views import DataViews

__all__ = ["XarrayDataModule"]


class XarrayDataModule(DataViews, pl.LightningDataModule):
    """Windows of Xarray data as train/val/test/predict DataLoaders for Lightning.

    Batches are ``(X, y)`` float tensors of shape ``(batch, channel, *window)``: window axes
    follow the dim order of the first input variable; channels are the variables in the order
    given, each variable's non-windowed dims (e.g. ``level``) folded into channels in C order.
    Windows never cross a split boundary and only full windows are used.

    Args:
        data: A zarr store, a netCDF file, a glob of netCDF files, an fsspec URL, an
            ``xr.Dataset``, or ``"synthetic://weather"`` (the embedded synthetic data).
        input_vars: Variables that form ``X`` (names are checked against the data here).
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
            memory. Out of core: half the cores this process may use (its Slurm or container
            share), 2 to 4, so decoding overlaps the step; 0 on one core (``benchmarks/``).
        pin_memory: Page-lock batches for faster host→GPU copies. Default: on only when the
            attached trainer runs on a CUDA GPU (pinning is wasted work on CPU).
        persistent_workers: Keep workers between epochs; default on when ``num_workers > 0``.
        prefetch_factor: Batches each worker loads ahead; needs workers. Default: torch's
            two, one for batches of 128 MiB or more (each a worker's shared-memory slot).
        multiprocessing_context: ``"fork"``, ``"spawn"`` or ``"forkserver"`` for workers.
        drop_last: Drop the last, smaller training batch.
        load: ``"auto"`` (default) loads the selected variables into memory when they take
            at most a quarter of the available memory, ``True`` always loads, ``False``
            never does: the data are then read out of core, cell by cell (docs/reading.md).
        shuffle: How training samples are shuffled. ``"auto"`` (default): ``"full"`` for data
            in memory, ``"chunks"`` out of core. ``"chunks"``: a chunk-aware order that
            decodes each storage chunk about once per epoch; every batch mixes
            ``shuffle_chunks`` streams that walk the chunks (see
            :class:`~xr_datamodule.samplers.ChunkShuffleSampler`). ``"full"``: a uniform
            per-sample shuffle, decoding whatever each batch needs.
        shuffle_chunks: Out of core, chunk-aware order: streams per rank, i.e. how many
            places of the data feed training at any moment. ``"auto"`` (default): enough
            for a batch to draw each sample from another stream where a cell holds fewer
            samples than a batch, at least 4 per rank. A checkpoint keeps its layout.
        style: ``"map"`` (default): a map-style dataset with a DDP-aware batch sampler;
            ``"iterable"``: an iterable dataset that streams whole batches, sharded across
            DDP ranks and workers itself (workers are started anew each epoch). Both give the
            same batches in the same order.
        dtype: Tensor dtype: ``"float16"``, ``"float32"`` (default) or ``"float64"``.
        transform: Optional function applied to each input window as an ``xr.Dataset``
            (e.g. ``lambda ds: ds.assign(speed=np.hypot(ds.u10, ds.v10))``); its data
            variables become the channels. Per sample (``transform_on="sample"``) this leaves
            the vectorised path: one ``isel`` and one call per sample. Not saved in
            hyperparameters.
        target_transform: Likewise for the target window.
        transform_on: ``"sample"`` (default): the transforms run on each sample's window.
            ``"batch"``: once per batch, on all its windows as one Dataset with a leading
            ``sample`` dim, about 1/batch of the cost (:mod:`xr_datamodule.transforms`).
        open_kwargs: Keyword arguments for the xarray opener (``engine``, ``chunks``,
            ``storage_options``, ...).
        normalize: ``"zscore"`` normalises each channel with the mean and standard deviation
            of the **training split only** (computed once, out of core with dask; saved in
            the datamodule's ``state_dict`` so they travel in checkpoints). One method for
            all variables (``"zscore"``, ``"std"``, ``"minmax"``, ``"max"``, ``"none"``) or a
            mapping ``{variable: method, "default": method}`` (see
            :mod:`xr_datamodule.normalize`). ``None`` (default): raw values.
            :meth:`denormalize` and :meth:`to_xarray` give predictions back in physical
            units. Forcings are never normalised.
        normalize_on: ``"gather"`` (default) normalises the data when they are read (once
            per loaded copy or decoded cell, so it costs nothing per batch and works for any
            model); ``"device"`` normalises each batch after Lightning moved it, in
            ``on_after_batch_transfer`` (the arithmetic then runs on the GPU).
        nan_policy: Missing values (NaN, ±Inf). ``"check"`` (default; ``None`` means it too):
            looked for in every block as it is read, and the first batch that holds one
            raises :class:`~xr_datamodule.missing.MissingValueError` naming the variable,
            the coordinates and the options below. ``"keep"``: let NaN
            reach the model (for models that mask them themselves). ``"error"``: scan all
            the data in ``setup`` and name the first NaN. ``"drop"``: leave out every sample
            whose input or target window holds a NaN (one out-of-core scan, then vectorised
            over all windows; the counts are in ``dropped_samples`` and the log).
            ``"fill"``: replace NaN with ``fill_value`` (after normalisation, so 0 is the
            mean). Static fields are checked once in ``setup`` under ``"check"`` and
            ``"error"``.
        fill_value: The value ``nan_policy="fill"`` writes.
        nan_mask: With ``nan_policy="fill"``, add a last input channel that is 1 where any
            input variable or channel was missing (before filling) and 0 elsewhere.
        stats: Explicit statistics instead of computing them: ``{"mean": {var: value or
            [per channel]}, "std": {...}}`` or the path of a JSON file holding that (what
            ``xr-datamodule stats`` writes); implies ``normalize="zscore"``.
        stats_cache: Computed statistics are kept in a cache folder, keyed by the source
            (path, metadata, labels), variables, split and methods, and loaded by the next
            ``fit`` on the same data (:mod:`xr_datamodule.statcache`). ``True`` (default):
            ``$XR_DATAMODULE_CACHE`` or ``~/.cache/xr_datamodule``; a folder; ``False``: off.
        stats_sample: Estimate the statistics from part of the training split, with standard
            errors (logged): ``{"every": k}`` steps or ``{"fraction": f}`` of its chunks
            (:mod:`xr_datamodule.estimate`).
        forcings: Input channels computed from the coordinates, after the variables: any
            of ``cos_latitude``, ``sin_latitude``, ``cos_longitude``, ``sin_longitude``,
            ``cos_julian_day``, ``sin_julian_day``, ``cos_local_time``, ``sin_local_time``,
            ``cos_solar_zenith_angle``, ``insolation`` (see :mod:`xr_datamodule.forcings`);
            never normalised. A static field (a variable without the time dim, e.g.
            ``lsm(lat, lon)``) needs no option: it is broadcast along time (channel order:
            :mod:`xr_datamodule.channels`).
        select: What ``Dataset.sel`` takes, per dim, applied before windowing: a label
            (``{"level": 500}``: the dim stays, as size 1), a list, a ``slice`` (descending
            for a descending coordinate) or ``{"start": ..., "stop": ...}`` (YAML).
            Inclusive, lazy; a selected store is read through xarray.
        batch_format: ``"tuple"`` (default): batches are ``(X, y)``. ``"dict"``: ``{"x": X,
            "y": y, "sample": ..., "input_time": ..., "target_time": ..., ...}``: the sample
            numbers and, per windowed dim, the labels of every input and target window
            position (times as int64 nanoseconds), for conditioning on lead time or
            evaluating per season.
        sampler: The training order instead of the shuffle: a torch ``Sampler`` class, its
            import path or ``{"class_path", "init_args"}`` (YAML), built with
            ``data_source=range(n)`` (and ``weights=`` from ``sample_weights``), or
            ``f(index, rng)`` given the split's :class:`~xr_datamodule.windows.SampleIndex`,
            returning sample numbers. Seeded from ``(seed, epoch)``, sharded by rank,
            resumable; not chunk-aware.
        sample_weights: Weighted draws for rare events: ``{"by": "target_max", "quantile":
            0.99, "boost": 10}`` gives the samples whose statistic (``input_``/``target_``
            + ``max``/``min``/``mean`` over the window's variables and channels) reaches the
            training split's quantile (or ``"above": value``) ``boost`` times the weight of
            the others; a callable gets :meth:`window_statistics` and returns one weight
            per sample. Computed once, out of core (one pass); see :attr:`sample_weights`.
            Draws per epoch: ``samples_per_epoch`` or the split's size, chunk-aware.
        replacement: Weighted draws with replacement (default) or without.
        samples_per_epoch: An epoch is this many samples: consecutive epochs take
            consecutive stretches of passes over the index, so no sample repeats until
            every one has come (then a new shuffle); chunk-aware out of core.
        random_offsets: Training windows start at random positions each epoch, within one
            stride of their grid start, never past the split's end, reproducible from
            ``(seed, epoch)``; validation and test stay on the grid.
        gaps: Irregular steps along a windowed dim (a missing day, an outage), found in
            ``setup`` from the labels (see :mod:`xr_datamodule.timeaxis`; a time axis that
            repeats a step or runs backwards is always an error). ``"drop"`` (default):
            samples whose input and target span crosses one are left out, counted per split
            in the summary and logged once. ``"error"``: raise, naming the first gap.
            ``"allow"``: keep them (windows then span whatever the labels say).
        time_step: The regular step of the time axis (``"1h"``, ``"6h"``, ``"1D"``, ``"1M"``
            for monthly data, a number for numeric labels), or ``{dim: step}``; default: the
            most common step of each windowed dim.
        mask: A static variable, nonzero where targets count (``ds.assign(ocean=ds.lsm <
            0.5)``): elsewhere dict batches' ``target_mask`` is False, :meth:`to_xarray`
            writes NaN and the verification skips the points.
        strict_store: For a local store of untrusted origin: refuse it in ``setup`` when it
            holds a symlink leading outside it or an entry that is not a regular file.
        align_dims: Variables on other grids (downscaling targets, bands at other
            resolutions; see :mod:`xr_datamodule.grids`): which windowed dim each of their
            dims follows, e.g. ``{"lat_hr": "lat"}``; default: found from the coordinates.
        series_as: A variable with only the time dim (``co2(time)``): ``"vector"`` (default;
            dict batches' ``x_series``) or ``"channels"`` of ``X``, repeated over the window.
        coordinates: Where latitude and longitude live when not recognised, and a cell-area
            variable for area weights: ``{"lat": "nav_lat", "lon": "nav_lon", "area":
            "cell_area"}``. Recognised by name, CF ``standard_name`` or ``units``: 1-D dim
            coordinates, 1-D on a cell dim (unstructured grids), 2-D (curvilinear); see
            :mod:`xr_datamodule.coordinates`.

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
        normalize: str | dict[str, str] | None = None,
        normalize_on: str = "gather",
        stats: dict[str, Any] | str | None = None,
        stats_cache: bool | str = True,
        stats_sample: dict[str, Any] | None = None,
        nan_policy: str | None = "check",
        fill_value: float = 0.0,
        nan_mask: bool = False,
        shuffle: str = "auto",
        transform_on: str = "sample",
        forcings: list[str] | None = None,
        select: dict[str, Any] | None = None,
        batch_format: str = "tuple",
        sampler: str | dict[str, Any] | Callable[..., Any] | None = None,
        sample_weights: Any = None,
        replacement: bool = True,
        samples_per_epoch: int | None = None,
        random_offsets: bool = False,
        gaps: str = "drop",
        time_step: str | float | dict[str, Any] | None = None,
        mask: str | None = None,
        strict_store: bool = False,
        align_dims: dict[str, str] | None = None,
        series_as: str = "vector",
        coordinates: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        arguments = {k: v for k, v in locals().items() if k in DataSpec.__dataclass_fields__}
        self.save_hyperparameters(hyperparameters(arguments))
        opened = preview_source(arguments)  # opened early to check names against the data
        self.spec = DataSpec(**arguments)
        self.order = training_order(self.spec)
        self.pipeline = DataPipeline(self.spec, self.order, world=self._world, opened=opened)
        self._iterable_passes = 0

    @classmethod
    def from_xbatcher(cls, generator: Any, target: Any = None, **options: Any) -> XarrayDataModule:
        """The datamodule of an ``xbatcher.BatchGenerator``: its data, windows and batch size.

        ``target``: ``None`` (the inputs), variable names or the targets' generator;
        ``options``: other arguments. The samples are the generator's windows
        (:mod:`xr_datamodule.interop`; what differs: ``docs/xbatcher.md``).
        """
        return cls(**xbatcher_arguments(generator, target, **options))

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | os.PathLike,
        map_location: Any = None,
        hparams_file: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> XarrayDataModule:
        """Rebuild the datamodule a checkpoint was trained with (arguments and statistics).

        A datamodule built from an in-memory ``xr.Dataset`` does not store it in the
        checkpoint: pass it again as ``data=``. Keyword arguments override the stored ones.

        Example (not run)::

            dm = XarrayDataModule.load_from_checkpoint("best.ckpt")           # a path or URL
            dm = XarrayDataModule.load_from_checkpoint("best.ckpt", data=ds)  # an xr.Dataset
        """
        try:
            return super().load_from_checkpoint(  # type: ignore[return-value]
                checkpoint_path, map_location, hparams_file, **kwargs
            )
        except TypeError as error:
            if "data" in kwargs or "'data'" not in str(error):
                raise
            raise TypeError(
                f"{os.fspath(checkpoint_path)}: this datamodule was built from an in-memory "
                "xr.Dataset, which a checkpoint does not store; pass it again: "
                "XarrayDataModule.load_from_checkpoint(path, data=ds)"
            ) from error

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
        pipeline = self.pipeline
        pipeline.channels  # noqa: B018  (validates the whole configuration)
        plan = pipeline.plan
        if stage == "fit" and "train" not in plan.indices:
            raise ValueError(f"stage 'fit' needs a 'train' split; splits are {tuple(plan.indices)}")
        wanted = STAGE_SPLITS[stage] if stage else tuple(plan.indices)
        for split in {plan.split_for(split) for split in wanted}:
            if split in plan.indices:
                pipeline.dataset(split)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the order is a function of ``(seed, epoch)``."""
        if "train" not in self.indices:
            raise ValueError(f"there is no 'train' split; splits are {tuple(self.indices)}")
        trainer = self.trainer
        return train_loader(
            self.pipeline,
            epoch=int(trainer.current_epoch) if trainer is not None else None,
            epoch_of=self._iterable_epoch,
            pin_memory=self._trainer_on_cuda(),
            position=lambda: self.pipeline.order.state_dict(*trained_so_far(self.trainer)),
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in order (an empty list when there is no ``val`` split)."""
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader | list:
        """Test batches in order (an empty list when there is no ``test`` split)."""
        return self._eval_dataloader("test")

    def predict_dataloader(self) -> DataLoader | list:
        """Batches of the ``predict`` split in order (the ``test`` split when there is none)."""
        return self._eval_dataloader("predict")

    def _eval_dataloader(self, stage: str) -> DataLoader | list:
        if self.pipeline.plan.split_for(stage) not in self.indices:
            return []
        return eval_loader(self.pipeline, stage, self._trainer_on_cuda())

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``normalize_on="device"``, normalise ``(X, y)`` after Lightning moved them.

        Runs in each process on the device batch, so the arithmetic happens on the GPU.
        """
        if self.spec.normalize is None or self.spec.normalize_on != "device":
            return batch
        if isinstance(batch, dict):
            x, y = self.pipeline.scale_batch(batch["x"], batch["y"])
            return {**batch, "x": x, "y": y}
        inputs, targets = batch
        return self.pipeline.scale_batch(inputs, targets)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the data exactly (Lightning saves it).

        The seed, and while fitting the epoch and how many of its batches were trained on,
        so that ``fit(ckpt_path=...)`` continues with exactly the samples that remained.
        """
        serving = self.order.serving is not None  # a training loader was made
        return self.pipeline.state_dict(*trained_so_far(self.trainer if serving else None))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the seed and, mid-epoch, the samples to skip (Lightning calls it on resume).

        A mid-epoch checkpoint continues exactly by samples, also with another
        ``batch_size``; settings that would change the order of samples (another world
        size, another kind of order, a chunk-aware order with another batch size) are
        refused with an error that says why.

        Example:
            >>> dm = XarrayDataModule("synthetic://weather", input_vars=["t2m"],
            ...                       input_dims={"time": 1, "lat": 32, "lon": 32})
            >>> dm.load_state_dict({"seed": 7, "epoch": 0, "batches_done": 3})
            >>> dm.seed
            7
        """
        self.pipeline.load_state_dict(state_dict)

    def teardown(self, stage: str) -> None:
        """Release what reading holds once a stage ends: threads, caches, shared memory.

        Lightning calls it after ``fit``, ``validate``, ``test`` and ``predict`` (its workers
        are shut down by then). The datamodule stays usable: the next loader starts afresh.
        """
        self.pipeline.close()
        release_memory()
        self.pipeline.close_source()

    def _iterable_epoch(self) -> int:
        """The epoch of the next iterable pass: the trainer's, or one more than the last."""
        if self.trainer is not None:
            return int(self.trainer.current_epoch)
        self._iterable_passes += 1
        return self._iterable_passes - 1

    def _world(self) -> tuple[int, int]:
        """(world size, global rank): from the trainer, else torch.distributed, else (1, 0)."""
        return world_of(self.trainer)

    def _trainer_on_cuda(self) -> bool:
        return on_cuda(self.trainer)
