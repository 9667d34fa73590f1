"""Xarray-level transforms: user functions on windows as an ``xr.Dataset``.

A transform returns a Dataset whose data variables become channels (same folding rule as
the source, see :mod:`xr_datamodule.sources`). It runs in one of two ways:

- ``transform_on="sample"`` (default): on each sample's window with its real coordinates
  (e.g. ``ds.isel(time=slice(t, t + 4), lat=..., lon=...)``): one ``isel`` and one call per
  sample: xarray's overhead on a small window, paid per sample (measured by
  ``benchmarks/transform_cost.py``).
- ``transform_on="batch"``: once per batch, on the batch's windows gathered the vectorised
  way into one Dataset with a leading ``sample`` dim. The windowed dims carry no labels
  there (they differ from sample to sample); ``<dim>_start`` along ``sample`` gives the label
  of each window's first position (e.g. ``ds.time_start.dt.hour``). Element-wise transforms
  (derived variables, unit changes) work unchanged and cost about as much per batch as one
  sample's call did.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import xarray as xr

from xr_datamodule.sources import channel_layouts

__all__ = [
    "TRANSFORM_ON",
    "Transform",
    "batch_dataset",
    "batch_to_channels",
    "transformed_windows",
    "window_to_channels",
]

TRANSFORM_ON = ("sample", "batch")

Transform = Callable[[xr.Dataset], xr.Dataset]


def window_to_channels(
    window: xr.Dataset, window_dims: Sequence[str], dtype: np.dtype
) -> np.ndarray:
    """Stack the data variables of one window as ``(channel, *window)``.

    Args:
        window: One window; every data variable must have all ``window_dims``.
        window_dims: Windowed dims in output order.
        dtype: Output dtype.

    Raises:
        ValueError: If a variable lacks a windowed dim (e.g. a transform dropped one).
    """
    parts = []
    for name, var in window.data_vars.items():
        missing = [dim for dim in window_dims if dim not in var.dims]
        if missing:
            raise ValueError(
                f"transform output variable {name!r} has dims {var.dims} and lacks the "
                f"windowed dim(s) {missing}"
            )
        extra = [dim for dim in var.dims if dim not in window_dims]
        values = var.transpose(*extra, *window_dims).values
        parts.append(values.reshape(-1, *values.shape[len(extra) :]))
    return np.concatenate(parts).astype(dtype, copy=False)


def transformed_windows(
    ds: xr.Dataset,
    starts: np.ndarray,
    window_dims: Sequence[str],
    size: Sequence[int],
    transform: Transform,
    dtype: np.dtype,
) -> np.ndarray:
    """Apply ``transform`` to each window and stack the results as ``(batch, channel, *size)``.

    Args:
        ds: Dataset of the variables the transform receives.
        starts: ``(batch, ndim)`` window starts.
        window_dims: Windowed dims.
        size: Window length per dim.
        transform: The user function.
        dtype: Output dtype.
    """
    out: np.ndarray | None = None
    for row, sample_starts in enumerate(starts):
        window = ds.isel(
            {
                dim: slice(int(start), int(start) + length)
                for dim, start, length in zip(window_dims, sample_starts, size, strict=True)
            }
        )
        values = window_to_channels(transform(window), window_dims, dtype)
        if out is None:
            out = np.empty((len(starts), *values.shape), dtype=dtype)
        out[row] = values
    if out is None:
        raise ValueError("transformed_windows needs at least one window")
    return out


def batch_dataset(
    source: xr.Dataset,
    names: Sequence[str],
    window_dims: Sequence[str],
    starts: np.ndarray,
    values: np.ndarray,
) -> xr.Dataset:
    """A batch of windows as one Dataset with a leading ``sample`` dim.

    Args:
        source: The dataset the windows come from (variables' dims, attributes, labels).
        names: The variables of ``values``' channels, in channel order.
        window_dims: Windowed dims, in window axis order.
        starts: ``(batch, ndim)`` window starts (positions).
        values: ``(batch, channel, *window)`` values, channels folded as in
            :func:`~xr_datamodule.sources.channel_layouts`.
    """
    size = values.shape[2:]
    data_vars = {}
    coords: dict[str, Any] = {}
    begin = 0
    for layout in channel_layouts(source, list(names), window_dims):
        block = values[:, begin : begin + layout.n_channels]
        begin += layout.n_channels
        dims = ("sample", *layout.extra_dims, *window_dims)
        shape = (len(values), *layout.extra_shape, *size)
        data_vars[layout.name] = xr.Variable(dims, block.reshape(shape), source[layout.name].attrs)
        coords.update({dim: source[dim] for dim in layout.extra_dims if dim in source.coords})
    for axis, dim in enumerate(window_dims):
        if dim in source.indexes:
            coords[f"{dim}_start"] = ("sample", np.asarray(source.indexes[dim])[starts[:, axis]])
    return xr.Dataset(data_vars, coords=coords)


def batch_to_channels(
    batch: xr.Dataset, window_dims: Sequence[str], size: Sequence[int], dtype: np.dtype
) -> np.ndarray:
    """Stack the data variables of a transformed batch as ``(batch, channel, *size)``.

    Raises:
        ValueError: If a variable lacks the ``sample`` dim or a windowed dim.
    """
    parts = []
    for name, var in batch.data_vars.items():
        missing = [dim for dim in ("sample", *window_dims) if dim not in var.dims]
        if missing:
            raise ValueError(
                f"transform output variable {name!r} has dims {var.dims} and lacks "
                f"{missing} (transform_on='batch' keeps the sample dim first)"
            )
        extra = [dim for dim in var.dims if dim not in ("sample", *window_dims)]
        values = var.transpose("sample", *extra, *window_dims).values
        parts.append(values.reshape(values.shape[0], -1, *size))
    return np.concatenate(parts, axis=1).astype(dtype, copy=False)


def window_channels(
    source: xr.Dataset,
    names: Sequence[str],
    window_dims: Sequence[str],
    start: Sequence[int],
    size: Sequence[int],
) -> np.ndarray:
    """One window's channels ``(channel, *size)`` read with ``isel`` (a probe, not the hot path)."""
    window = source[list(names)].isel(
        {dim: slice(int(s), int(s) + n) for dim, s, n in zip(window_dims, start, size, strict=True)}
    )
    return window_to_channels(window, window_dims, np.dtype(np.float64))
