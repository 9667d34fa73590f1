"""What a datamodule's data look like, read-only: shapes, names, splits, statistics, values back.

The accessors of :class:`~xr_datamodule.datamodule.XarrayDataModule` over its pipeline's
stages (:mod:`~xr_datamodule.pipeline`), kept apart from Lightning's hooks. Everything here
is known before ``setup`` reads anything, except where a docstring says otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from xr_datamodule.display import summary, summary_html, summary_text
from xr_datamodule.loaders import loader_settings
from xr_datamodule.normalize import Statistics
from xr_datamodule.order import TrainingOrder
from xr_datamodule.pipeline import DataPipeline
from xr_datamodule.spec import DataSpec
from xr_datamodule.stitch import DEFAULT_BLEND
from xr_datamodule.windows import SampleIndex, WindowGeometry

__all__ = ["DataViews"]


class DataViews:
    """Read-only views of a pipeline's stages, for users, plots and LightningCLI links."""

    spec: DataSpec
    order: TrainingOrder
    pipeline: DataPipeline

    def _trainer_on_cuda(self) -> bool:  # the datamodule knows its trainer
        raise NotImplementedError

    def _world(self) -> tuple[int, int]:  # (world size, global rank)
        raise NotImplementedError

    # ------------------------------------------------------------------ the spec

    @property
    def data(self) -> str | os.PathLike | xr.Dataset:
        """The source as given."""
        return self.spec.data

    @property
    def input_vars(self) -> list[str]:
        """Variables that form ``X``."""
        return self.spec.input_vars

    @property
    def target_vars(self) -> list[str]:
        """Variables that form ``y``."""
        return self.spec.targets

    @property
    def batch_size(self) -> int:
        """Samples per batch."""
        return self.spec.batch_size

    @property
    def seed(self) -> int:
        """Seed of the training order (a checkpoint's, once one is restored)."""
        return self.order.seed

    # ------------------------------------------------------------------ what setup builds

    @property
    def source(self) -> xr.Dataset:
        """The opened source: lazy, nothing loaded."""
        return self.pipeline.layout.source

    @property
    def window_dims(self) -> tuple[str, ...]:
        """Windowed dims in the order of the window axes of ``X`` and ``y``."""
        return self.pipeline.layout.window_dims

    @property
    def geometry(self) -> WindowGeometry:
        """Window sizes, strides and offsets in :attr:`window_dims` order."""
        return self.pipeline.geometry

    @property
    def split_bounds(self) -> dict[str, dict[str, tuple[int, int]]]:
        """Position range ``[lower, upper)`` of every split along every windowed dim."""
        return self.pipeline.plan.split_bounds

    @property
    def indices(self) -> dict[str, SampleIndex]:
        """Sample index of every split (integer start grids; cheap, built once)."""
        return self.pipeline.plan.indices

    @property
    def split_sizes(self) -> dict[str, int]:
        """Number of samples per split."""
        return self.pipeline.plan.split_sizes

    @property
    def dropped_samples(self) -> dict[str, int]:
        """Samples ``nan_policy="drop"`` left out, per split."""
        return self.pipeline.plan.dropped_samples

    @property
    def sample_weights(self) -> np.ndarray | None:
        """The training samples' sampling weights (``sample_weights``), or None.

        Example:
            >>> from xr_datamodule import XarrayDataModule
            >>> dm = XarrayDataModule("synthetic://weather", input_vars=["t2m"],
            ...                       input_dims={"time": 1, "lat": 32, "lon": 32},
            ...                       sample_weights={"by": "input_max", "quantile": 0.9,
            ...                                       "boost": 5})
            >>> sorted(set(dm.sample_weights.tolist()))
            [1.0, 5.0]
        """
        return self.pipeline.sampling.sample_weights

    def window_statistics(self, split: str = "train") -> Mapping[str, np.ndarray]:
        """Per-sample statistics of a split's windows: ``input_max``, ``target_mean``, ....

        One float per sample (in sample order): the statistic over every variable and
        channel of its input (or target) window; each computed once, out of core, with one
        vectorised pass over the data (see :mod:`xr_datamodule.weights`).
        """
        return self.pipeline.sampling.window_statistics(split)

    @property
    def datasets(self) -> dict[str, Any]:
        """The datasets built so far, per split."""
        return self.pipeline.datasets

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one ``X`` sample, ``(channel, *window)``, known before ``setup``.

        Link it to a model in LightningCLI with ``apply_on="instantiate"``.
        """
        return self.pipeline.channels.input_shape

    @property
    def target_shape(self) -> tuple[int, ...]:
        """Shape of one ``y`` sample, ``(channel, *window)``, known before ``setup``."""
        return self.pipeline.channels.target_shape

    @property
    def input_channel_names(self) -> list[str]:
        """Readable name of each channel of ``X``, e.g. ``u[level=200]`` (a transform's own)."""
        return self.pipeline.channels.input_names

    @property
    def target_channel_names(self) -> list[str]:
        """Readable name of each channel of ``y``."""
        return self.pipeline.channels.target_names

    @property
    def grids(self) -> dict[str, dict[str, Any]]:
        """Inputs on other grids than ``X``'s (dict batches' ``x_<family>``): shape, channels.

        Known before ``setup``, e.g. ``{"x_y20_x20": {"shape": (2, 1, 6, 6), "channels":
        ["b11", "b12"]}}``; empty with one grid. See :mod:`xr_datamodule.grids`.
        """
        return {
            key: {"shape": shape, "channels": names}
            for key, (shape, names) in self.pipeline.channels.grids.items()
        }

    @property
    def area_weights(self) -> torch.Tensor:
        """Latitude weights (cos latitude over its mean) shaped to broadcast against ``y``.

        For the latitude-weighted loss of global models: ``((pred - y) ** 2 * w).mean()``.
        """
        pipeline = self.pipeline
        weights = pipeline.layout.area_weights(pipeline.geometry, self.spec.array_dtype)
        return torch.from_numpy(weights)

    @property
    def loads_into_memory(self) -> bool:
        """Whether the selected variables are (or will be) held in memory (see ``load``)."""
        return self.pipeline.resources.loads_into_memory

    @property
    def num_workers(self) -> int:
        """DataLoader workers: the given number, or the ``"auto"`` choice for this data."""
        return self.pipeline.resources.num_workers

    @property
    def statistics(self) -> Statistics:
        """Per-channel z-score statistics (given, restored, or computed from ``train``)."""
        return self.pipeline.statistics

    @property
    def train_shuffle(self) -> str:
        """The training order in use: ``"full"`` (uniform) or ``"chunks"`` (chunk-aware)."""
        return self.pipeline.sampling.shuffle

    def chunk_layout(self) -> tuple[int, int]:
        """Chunk-aware order: (parts, streams per part); a part per DataLoader worker.

        See :meth:`xr_datamodule.order.TrainingOrder.chunk_layout`.
        """
        return self.pipeline.sampling.chunk_layout(self._world()[0])

    @property
    def loader_settings(self) -> dict[str, Any]:
        """DataLoader keyword arguments (workers, pinning, prefetching) as resolved now.

        Pinning is on by default only when the attached trainer runs on a CUDA GPU.
        """
        return loader_settings(self.pipeline, self._trainer_on_cuda())

    # ------------------------------------------------------------------ values

    def denormalize(self, values: Any, names: Sequence[str] | None = None) -> Any:
        """Undo the normalisation of ``(batch, channel, ...)`` values (tensor or array).

        Args:
            values: Normalised values, channels on axis 1 (e.g. predictions of ``y``).
            names: Their variables (default: the target variables).

        Example:
            >>> from xr_datamodule import XarrayDataModule
            >>> dm = XarrayDataModule("synthetic://weather", input_vars=["t2m"],
            ...                       input_dims={"time": 1, "lat": 32, "lon": 32},
            ...                       normalize="zscore")
            >>> X, y = next(iter(dm.val_dataloader()))
            >>> time = dm.indices["val"].starts([0])[0, 0]  # sample 0: first time, corner patch
            >>> raw = dm.source.t2m.isel(time=time, lat=slice(0, 32), lon=slice(0, 32))
            >>> bool(abs(dm.denormalize(y)[0, 0, 0].numpy() - raw.values).max() < 1e-4)
            True
        """
        return self.pipeline.scale(values, names or self.pipeline.target_order, inverse=True)

    def to_xarray(
        self,
        predictions: Sequence[Any],
        split: str = "predict",
        layout: str = "auto",
        blend: str = DEFAULT_BLEND,
        blend_width: float | None = None,
    ) -> xr.Dataset:
        """Put what ``trainer.predict`` returned back on the grid, as the target variables.

        The predictions must be the target windows of every sample of ``split`` in order (the
        predict loader's order), e.g. ``trainer.predict(model, datamodule=dm)``; values come
        back in physical units, NaN where the target itself was missing (``nan_policy``
        ``"fill"`` or ``"keep"``).

        Layouts (``layout``):

        - ``"grid"``: on the source grid, overlapping windows blended, NaN where none
          landed; the default for one target step along time.
        - ``"forecast"``: the layout of forecast verification (WeatherBench 2), the default
          for several target steps along time: dims ``time`` (the init time: the label of
          the last input step) and ``prediction_timedelta`` (lead times from it), a 2-D
          ``valid_time`` coordinate; windows blended in space at one init time, leads
          never. ``"auto"`` picks it when the target window has several steps after the
          last input step (a target that overlaps the inputs stays on the grid). Verify
          per lead with xarray alone:
          ``truth = dm.source[v].sel(time=forecast.valid_time)`` (the source's time dim).

        Where windows overlap (``blend``): ``"gaussian"`` (default) weighs each window by a
        Gaussian over it (sigma ``blend_width`` x the window, 0.125 by default), so that a
        point comes mostly from the window in which it sits deepest (a model's edges are its
        least reliable outputs); ``"cosine"``: flat in the middle, raised-cosine ramps over
        ``blend_width`` (0.25) of the window at each edge; ``"mean"``: equal weights. Never
        along time; a point covered by one window keeps its value.

        Example:
            >>> from xr_datamodule import XarrayDataModule
            >>> dm = XarrayDataModule("synthetic://weather", input_vars=["t2m"],
            ...                       input_dims={"time": 1, "lat": 32, "lon": 32},
            ...                       input_overlap={"lon": 16})
            >>> truth = [y for _, y in dm.predict_dataloader()]
            >>> grid = dm.to_xarray(truth)
            >>> bool(np.allclose(grid.t2m, dm.source.t2m.sel(time=grid.time)))
            True
        """
        return self.pipeline.to_xarray(predictions, split, layout, blend, blend_width)

    def train_batches(self, epoch: int = 0) -> list[np.ndarray]:
        """Sample numbers of every training batch of a data epoch on this rank, in order.

        The order the training loader yields in that epoch (it is a function of ``(seed,
        epoch)`` and the settings), computed without reading any data.

        Example:
            >>> from xr_datamodule import XarrayDataModule
            >>> dm = XarrayDataModule("synthetic://weather", input_vars=["t2m"],
            ...                       input_dims={"time": 1, "lat": 32, "lon": 32},
            ...                       batch_size=8)
            >>> batches = dm.train_batches(epoch=0)
            >>> sum(len(b) for b in batches) == dm.split_sizes["train"]
            True
        """
        return self.pipeline.sampling.train_batches(epoch, self._world())

    def batch_spread(self, dim: str | None = None, epoch: int = 0) -> float:
        """How varied training batches are along ``dim``, against a full shuffle (1.0).

        The mean standard deviation of the samples' positions along ``dim`` (default: the
        split dim, e.g. time) within a batch, over that of a uniform shuffle; see
        :func:`~xr_datamodule.samplers.batch_spread`. With ``shuffle="chunks"`` it shows
        what the chunk-aware order gives up for its speed.
        """
        return self.pipeline.sampling.batch_spread(dim, epoch, self._world())

    # ------------------------------------------------------------------ display

    def summary(self) -> dict[str, Any]:
        """What the datamodule will feed a model: source, variables, shapes, splits, loader.

        Opens the source lazily (nothing is loaded); used by ``repr`` and the notebook view.
        """
        return summary(self.pipeline)

    def __repr__(self) -> str:
        return summary_text(self.pipeline)

    def __str__(self) -> str:  # Lightning's would list the dataloaders' sizes instead
        return summary_text(self.pipeline)

    def _repr_html_(self) -> str:
        return summary_html(self.pipeline)
