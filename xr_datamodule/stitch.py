"""Predictions back on the grid: batched window predictions → an ``xr.Dataset``.

Each prediction is a target window ``(channel, *target_size)`` of one sample. The windows of a
split are laid back at their positions (input start + ``target_offset``) and averaged where
they overlap; positions no window covers stay NaN. Channels unfold into the target variables
with the same rule that folded them (see :mod:`xr_datamodule.sources`). The accumulation is
vectorised: one ``np.bincount`` per channel over the flat positions of all windows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from xr_datamodule.sources import channel_layouts
from xr_datamodule.windows import SampleIndex, WindowGeometry

__all__ = ["stitch_windows"]


def _as_array(part: Any) -> np.ndarray:
    if hasattr(part, "detach"):  # a torch tensor: predictions may come back from a GPU
        part = part.detach().cpu().numpy()
    return np.asarray(part)


def stitch_windows(
    predictions: Sequence[Any],
    index: SampleIndex,
    geometry: WindowGeometry,
    source: xr.Dataset,
    target_vars: Sequence[str],
    bounds: Mapping[str, tuple[int, int]] | None = None,
) -> xr.Dataset:
    """Average predicted target windows back onto the source grid.

    Args:
        predictions: Batches of predictions in sample order (what ``trainer.predict``
            returns for an in-order loader): arrays or tensors ``(batch, channel, *window)``.
        index: The sample index the predictions follow.
        geometry: Window sizes and target offsets.
        source: The source dataset (for coordinates, dim orders and attributes).
        target_vars: The target variables, in channel order.
        bounds: Position range ``[lower, upper)`` of the grid to return along each windowed
            dim (the split's); default: the part the windows cover.

    Returns:
        One variable per target variable on the grid (NaN where no window landed), with the
        source's coordinates and attributes.

    Raises:
        ValueError: If the number of predictions or their shape does not match the split.
    """
    if not len(predictions):
        raise ValueError("no predictions to stitch")
    values = np.concatenate([_as_array(part) for part in predictions])
    layouts = channel_layouts(source, target_vars, geometry.dims)
    n_channels = sum(layout.n_channels for layout in layouts)
    expected = (len(index), n_channels, *geometry.target_size)
    if values.shape != expected:
        raise ValueError(
            f"predictions have shape {values.shape} but the split's targets are {expected} "
            f"(samples, channels {[layout.name for layout in layouts]}, target window); pass "
            "every batch that trainer.predict returned, in order"
        )
    starts = index.starts(np.arange(len(index))) + np.asarray(geometry.target_offset)
    if bounds is None:
        lower = starts.min(axis=0)
        shape = tuple(int(n) for n in starts.max(axis=0) + geometry.target_size - lower)
    else:
        lower = np.array([bounds[dim][0] for dim in geometry.dims])
        shape = tuple(int(bounds[dim][1] - bounds[dim][0]) for dim in geometry.dims)
    # Flat position, in the covered region, of every element of every window.
    strides = np.cumprod((1, *shape[::-1]))[-2::-1]
    flat = np.zeros((len(starts), *geometry.target_size), dtype=np.int64)
    for axis, size in enumerate(geometry.target_size):
        along = [1] * (len(shape) + 1)
        along[1 + axis] = size
        position = (starts[:, axis] - lower[axis]).reshape(-1, *[1] * len(shape))
        flat = flat + (position + np.arange(size).reshape(along)) * strides[axis]
    flat = flat.reshape(-1)
    size = int(np.prod(shape))
    counts = np.bincount(flat, minlength=size).astype(np.float64)
    covered = counts > 0
    means = np.full((n_channels, size), np.nan)
    for channel in range(n_channels):
        sums = np.bincount(flat, weights=values[:, channel].reshape(-1), minlength=size)
        means[channel, covered] = sums[covered] / counts[covered]
    region = {
        dim: slice(int(lo), int(lo) + length)
        for dim, lo, length in zip(geometry.dims, lower, shape, strict=True)
    }
    coords_source = source.isel(region)
    variables = {}
    begin = 0
    for layout in layouts:
        block = means[begin : begin + layout.n_channels].reshape(*layout.extra_shape, *shape)
        begin += layout.n_channels
        original = source[layout.name]
        variables[layout.name] = xr.Variable(
            (*layout.extra_dims, *geometry.dims),
            block.astype(np.result_type(values.dtype, np.float32)),
            original.attrs,
        ).transpose(*original.dims)
    # Only the coordinates of the target variables' dims (not, e.g., an input's levels).
    used = {dim for variable in variables.values() for dim in variable.dims}
    coords = {
        name: coord for name, coord in coords_source.coords.items() if set(coord.dims) <= used
    }
    return xr.Dataset(variables, coords=coords, attrs=source.attrs)
