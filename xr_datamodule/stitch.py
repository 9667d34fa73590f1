"""Predictions back on the grid: batched window predictions → an ``xr.Dataset``.

Each prediction is a target window ``(channel, *target_size)`` of one sample. Two layouts:

* **grid** (:func:`stitch_windows`): the windows of a split are laid back at their positions
  (input start + ``target_offset``) and averaged where they overlap; positions no window
  covers stay NaN. For window-at-a-time predictions (one target step).
* **forecast** (:func:`stitch_forecasts`), the layout of forecast verification (WeatherBench
  2): ``time`` is the initialisation time (the label of the last *input* step), a
  ``prediction_timedelta`` dim holds the lead times (timedelta64 for datetime axes), and a
  2-D ``valid_time`` coordinate gives init + lead. Overlapping windows are averaged in space
  at one init time, leads are never mixed.

Where windows overlap, each point is a weighted mean of the windows over it (``blend``).
A model's outputs are least reliable at a window's edges (padding, missing context), so by
default each window is weighted by a taper that is highest in its middle (``"gaussian"``:
MONAI's Gaussian with sigma ``blend_width`` x the window, 0.125 by default; ``"cosine"``:
flat in the middle, raised-cosine ramps over ``blend_width`` of the window at each edge,
0.25 by default), and a point is taken mostly from the window in which it sits deepest;
``"mean"`` weighs every window equally. On windows whose error grows toward their edges
(``tests/test_stitch.py``), the Gaussian left the least error between windows. Weights are
normalised per point (they sum to one where any window landed), never zero, and flat along
the time dim: a point covered by one window keeps that window's value (no darkened
border), and times and leads are never blended together.

Channels unfold into the target variables with the same rule that folded them (see
:mod:`xr_datamodule.sources`). The accumulation is vectorised: one weighted ``np.bincount``
per channel (and lead) over the flat positions of all windows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from xr_datamodule.sources import channel_layouts
from xr_datamodule.windows import SampleIndex, WindowGeometry

__all__ = [
    "BLENDS",
    "DEFAULT_WIDTHS",
    "LAYOUTS",
    "LEAD_DIM",
    "VALID_TIME",
    "is_forecast_layout",
    "masked_like",
    "put_back",
    "stitch_forecasts",
    "stitch_windows",
    "truth_at",
    "window_taper",
]

LEAD_DIM = "prediction_timedelta"
VALID_TIME = "valid_time"
LAYOUTS = ("auto", "grid", "forecast")  # of predictions put back on the grid
BLENDS = ("gaussian", "cosine", "mean")  # how overlapping windows are weighted
DEFAULT_BLEND = "gaussian"  # the fewest seams on the edge-error test (tests/test_stitch.py)
DEFAULT_WIDTHS = {"gaussian": 0.125, "cosine": 0.25, "mean": 1.0}  # of the window


def window_taper(
    size: Sequence[int],
    dims: Sequence[str],
    time_dim: str | None = None,
    blend: str = DEFAULT_BLEND,
    width: float | None = None,
) -> np.ndarray:
    """The weight of each position of a window of ``size`` (along ``dims``), never zero.

    Args:
        size: Window length per dim.
        dims: The window's dims; ``time_dim`` among them stays flat.
        time_dim: The dim that is never tapered (times and leads are not blended).
        blend: ``"cosine"``, ``"gaussian"`` or ``"mean"`` (flat).
        width: Cosine: the ramp at each edge as a fraction of the window (0 < width <= 0.5).
            Gaussian: sigma as a fraction of the window. Default: :data:`DEFAULT_WIDTHS`.

    Example:
        >>> window_taper((8,), ("lon",), blend="cosine", width=0.25).round(2)
        array([0.15, 0.85, 1.  , 1.  , 1.  , 1.  , 0.85, 0.15])
    """
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    width = DEFAULT_WIDTHS[blend] if width is None else width
    if not 0 < width <= (0.5 if blend == "cosine" else np.inf):
        limit = "in (0, 0.5]" if blend == "cosine" else "positive"
        raise ValueError(f"blend_width must be {limit} for blend={blend!r}, got {width!r}")
    taper = np.ones((), dtype=np.float64)
    for dim, length in zip(dims, size, strict=True):
        line = np.ones(int(length))
        if blend != "mean" and dim != time_dim and length > 1:
            position = np.arange(length, dtype=np.float64)
            if blend == "cosine":
                ramp = max(1.0, width * length)
                inside = np.minimum(position, length - 1 - position) + 0.5  # to the nearest edge
                line = np.where(inside < ramp, 0.5 * (1 - np.cos(np.pi * inside / ramp)), 1.0)
            else:
                centre, sigma = (length - 1) / 2, width * length
                line = np.exp(-0.5 * ((position - centre) / sigma) ** 2)
            line = np.maximum(line, 1e-6)  # never zero: a point one window covers keeps it
        taper = np.multiply.outer(taper, line)
    return taper


def is_forecast_layout(layout: str, geometry: WindowGeometry, time_dim: str | None) -> bool:
    """Whether ``layout`` gives the forecast layout (init x lead) for windows of ``geometry``.

    ``"auto"``: when the target window holds several steps of ``time_dim`` after the last
    input step (a multi-step forecast).

    Raises:
        ValueError: An unknown layout, or ``"forecast"`` without a time dim.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "grid":
        return False
    if time_dim is None:
        if layout == "forecast":
            raise ValueError(
                f"layout='forecast' needs a time dim among the windowed dims {geometry.dims}"
            )
        return False
    axis = geometry.dims.index(time_dim)
    ahead = geometry.target_offset[axis] >= geometry.input_size[axis]  # a forecast
    return layout == "forecast" or (ahead and geometry.target_size[axis] > 1)


def put_back(
    predictions: Sequence[Any],
    index: SampleIndex,
    geometry: WindowGeometry,
    source: xr.Dataset,
    target_vars: Sequence[str],
    bounds: Mapping[str, tuple[int, int]],
    time_dim: str | None,
    forecast: bool,
    blend: str = DEFAULT_BLEND,
    blend_width: float | None = None,
) -> xr.Dataset:
    """Predictions back in the forecast layout (needs ``time_dim``) or on the grid."""
    arguments = (predictions, index, geometry, source, target_vars)
    if forecast:
        assert time_dim is not None
        return stitch_forecasts(*arguments, time_dim, bounds, blend, blend_width)
    return stitch_windows(*arguments, bounds, time_dim, blend, blend_width)


def _as_array(part: Any) -> np.ndarray:
    if hasattr(part, "detach"):  # a torch tensor: predictions may come back from a GPU
        part = part.detach().cpu().numpy()
    return np.asarray(part)


def _window_means(
    values: np.ndarray,
    starts: np.ndarray,
    size: Sequence[int],
    shape: Sequence[int],
    taper: np.ndarray | None = None,
) -> np.ndarray:
    """Weighted mean of windows ``(n, channel, *size)`` laid at ``starts`` in a region of ``shape``.

    Each window position weighs ``taper`` (of shape ``size``; equal weights without one).
    Returns ``(channel, prod(shape))``: NaN where no window landed.
    """
    shape = tuple(int(n) for n in shape)
    strides = np.cumprod((1, *shape[::-1]))[-2::-1]
    flat = np.zeros((len(starts), *size), dtype=np.int64)
    for axis, length in enumerate(size):
        along = [1] * (len(shape) + 1)
        along[1 + axis] = length
        position = starts[:, axis].reshape(-1, *[1] * len(shape))
        flat = flat + (position + np.arange(length).reshape(along)) * strides[axis]
    flat = flat.reshape(-1)
    points = int(np.prod(shape))
    weight = None
    if taper is not None:
        weight = np.broadcast_to(taper.reshape(1, *size), (len(starts), *size)).reshape(-1)
    totals = np.bincount(flat, weights=weight, minlength=points).astype(np.float64)
    covered = totals > 0
    means = np.full((values.shape[1], points), np.nan)
    for channel in range(values.shape[1]):
        each = values[:, channel].reshape(-1)
        weighted = each if weight is None else each * weight
        sums = np.bincount(flat, weights=weighted, minlength=points)
        means[channel, covered] = sums[covered] / totals[covered]
    return means


def _checked_values(
    predictions: Sequence[Any], index: SampleIndex, geometry: WindowGeometry, layouts: list
) -> np.ndarray:
    if not len(predictions):
        raise ValueError("no predictions to stitch")
    values = np.concatenate([_as_array(part) for part in predictions])
    n_channels = sum(layout.n_channels for layout in layouts)
    expected = (len(index), n_channels, *geometry.target_size)
    if values.shape != expected:
        raise ValueError(
            f"predictions have shape {values.shape} but the split's targets are {expected} "
            f"(samples, channels {[layout.name for layout in layouts]}, target window); pass "
            "every batch that trainer.predict returned, in order"
        )
    return values


def _region(
    starts: np.ndarray,
    geometry: WindowGeometry,
    bounds: Mapping[str, tuple[int, int]] | None,
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Lower corner and shape of the region returned: the split's, or what windows cover."""
    if bounds is None:
        lower = starts.min(axis=0)
        return lower, tuple(int(n) for n in starts.max(axis=0) + geometry.target_size - lower)
    lower = np.array([bounds[dim][0] for dim in geometry.dims])
    return lower, tuple(int(bounds[dim][1] - bounds[dim][0]) for dim in geometry.dims)


def _variables(
    means: np.ndarray,
    layouts: list,
    dims: Sequence[str],
    shape: Sequence[int],
    source: xr.Dataset,
    dtype: np.dtype,
    order: Callable[[tuple[str, ...]], tuple[str, ...]],
) -> dict[str, xr.Variable]:
    """Channels ``(channel, *shape)`` unfolded into the target variables over ``dims``."""
    variables, begin = {}, 0
    for layout in layouts:
        block = means[begin : begin + layout.n_channels].reshape(*layout.extra_shape, *shape)
        begin += layout.n_channels
        original = source[layout.name]
        variables[layout.name] = xr.Variable(
            (*layout.extra_dims, *dims), block.astype(dtype), original.attrs
        ).transpose(*order(tuple(map(str, original.dims))))
    return variables


def _coords_of(region: xr.Dataset, variables: Mapping[str, xr.Variable]) -> dict[str, Any]:
    # Only the coordinates of the target variables' dims (not, e.g., an input's levels).
    used = {dim for variable in variables.values() for dim in variable.dims}
    return {name: coord for name, coord in region.coords.items() if set(coord.dims) <= used}


def stitch_windows(
    predictions: Sequence[Any],
    index: SampleIndex,
    geometry: WindowGeometry,
    source: xr.Dataset,
    target_vars: Sequence[str],
    bounds: Mapping[str, tuple[int, int]] | None = None,
    time_dim: str | None = None,
    blend: str = DEFAULT_BLEND,
    blend_width: float | None = None,
) -> xr.Dataset:
    """Blend predicted target windows back onto the source grid.

    Args:
        predictions: Batches of predictions in sample order (what ``trainer.predict``
            returns for an in-order loader): arrays or tensors ``(batch, channel, *window)``.
        index: The sample index the predictions follow.
        geometry: Window sizes and target offsets.
        source: The source dataset (for coordinates, dim orders and attributes).
        target_vars: The target variables, in channel order.
        bounds: Position range ``[lower, upper)`` of the grid to return along each windowed
            dim (the split's); default: the part the windows cover.
        time_dim: The windowed dim of time, never tapered.
        blend: How overlapping windows are weighted (see the module docstring).
        blend_width: The taper's width as a fraction of the window (default per blend).

    Returns:
        One variable per target variable on the grid (NaN where no window landed), with the
        source's coordinates and attributes.

    Raises:
        ValueError: If the number of predictions or their shape does not match the split.
    """
    layouts = channel_layouts(source, target_vars, geometry.dims)
    values = _checked_values(predictions, index, geometry, layouts)
    starts = index.starts(np.arange(len(index))) + np.asarray(geometry.target_offset)
    lower, shape = _region(starts, geometry, bounds)
    size = geometry.target_size
    taper = window_taper(size, geometry.dims, time_dim, blend, blend_width)
    means = _window_means(values, starts - lower, size, shape, taper)
    region = source.isel(
        {
            dim: slice(int(lo), int(lo) + length)
            for dim, lo, length in zip(geometry.dims, lower, shape, strict=True)
        }
    )
    dtype = np.result_type(values.dtype, np.float32)
    variables = _variables(
        means, layouts, geometry.dims, shape, source, dtype, order=lambda dims: dims
    )
    return xr.Dataset(variables, coords=_coords_of(region, variables), attrs=source.attrs)


def stitch_forecasts(
    predictions: Sequence[Any],
    index: SampleIndex,
    geometry: WindowGeometry,
    source: xr.Dataset,
    target_vars: Sequence[str],
    time_dim: str,
    bounds: Mapping[str, tuple[int, int]] | None = None,
    blend: str = DEFAULT_BLEND,
    blend_width: float | None = None,
) -> xr.Dataset:
    """Predicted target windows in the forecast layout: init time x lead time x space.

    Args:
        predictions: As for :func:`stitch_windows`.
        index: The sample index the predictions follow.
        geometry: Window sizes and target offsets.
        source: The source dataset.
        target_vars: The target variables, in channel order.
        time_dim: The windowed dim of the forecast's time (its labels give init and valid
            times).
        bounds: As for :func:`stitch_windows` (the other dims' region).
        blend: As for :func:`stitch_windows`, in space only.
        blend_width: As for :func:`stitch_windows`.

    Returns:
        Per target variable, dims ``(time, prediction_timedelta, *other dims)`` (``time`` the
        init time, the label of the last input step), a 2-D ``valid_time`` coordinate. Leads
        are counted from the last input step: ``lead = label[init + target_offset -
        input_size + 1 + j] - label[init]`` for the target's step ``j``.

    Example:
        >>> import pandas as pd
        >>> from xr_datamodule.windows import build_index
        >>> times = pd.date_range("2020-01-01", periods=8, freq="6h")
        >>> ds = xr.Dataset({"t": ("time", np.arange(8.0))}, coords={"time": times})
        >>> geometry = WindowGeometry(("time",), (2,), (1,), (3,), (2,))
        >>> index = build_index(geometry, {"time": (0, 8)})
        >>> truth = [np.stack([ds.t.values[s + 2 : s + 5] for s in range(len(index))])[:, None]]
        >>> forecast = stitch_forecasts(truth, index, geometry, ds, ["t"], "time")
        >>> forecast.t.dims, forecast.prediction_timedelta.values.astype("timedelta64[h]")
        (('time', 'prediction_timedelta'), array([ 6, 12, 18], dtype='timedelta64[h]'))
        >>> bool((forecast.t == ds.t.sel(time=forecast.valid_time)).all())
        True
    """
    layouts = channel_layouts(source, target_vars, geometry.dims)
    values = _checked_values(predictions, index, geometry, layouts)
    axis = geometry.dims.index(time_dim)
    starts = index.starts(np.arange(len(index)))
    init_positions = starts[:, axis] + geometry.input_size[axis] - 1
    inits, init_of_sample = np.unique(init_positions, return_inverse=True)
    lead_steps = (
        geometry.target_offset[axis]
        - geometry.input_size[axis]
        + 1
        + np.arange(geometry.target_size[axis])
    )
    # Space: the other dims as in the grid layout; time: one row per init, window size 1.
    placed = starts + np.asarray(geometry.target_offset)
    lower, shape = _region(placed, geometry, bounds)
    placed = placed - lower
    placed[:, axis] = init_of_sample.reshape(-1)
    shape = (*shape[:axis], len(inits), *shape[axis + 1 :])
    size = (*geometry.target_size[:axis], 1, *geometry.target_size[axis + 1 :])
    taper = window_taper(size, geometry.dims, time_dim, blend, blend_width)
    per_lead = [
        _window_means(np.take(values, [j], axis=2 + axis), placed, size, shape, taper)
        for j in range(len(lead_steps))
    ]
    means = np.stack(per_lead, axis=1)  # (channel, lead, *shape)
    init_name = "time"  # WeatherBench 2's name for the init time (a source's may be valid_time)
    dims = [*geometry.dims]
    dims[axis] = init_name
    region = source.isel(
        {
            dim: slice(int(lo), int(lo) + length)
            for i, (dim, lo, length) in enumerate(zip(geometry.dims, lower, shape, strict=True))
            if i != axis
        }
    )
    dtype = np.result_type(values.dtype, np.float32)

    def order(original: tuple[str, ...]) -> tuple[str, ...]:
        renamed = tuple(init_name if dim == time_dim else dim for dim in original)
        return (init_name, LEAD_DIM, *(dim for dim in renamed if dim != init_name))

    variables = _variables(
        means.reshape(means.shape[0], len(lead_steps), -1),
        layouts,
        (LEAD_DIM, *dims),
        (len(lead_steps), *shape),
        source,
        dtype,
        order,
    )
    labels = source[time_dim].values
    valid_positions = inits[:, None] + lead_steps[None, :]
    coords = {
        name: coord
        for name, coord in _coords_of(region, variables).items()
        if time_dim not in coord.dims
    }
    coords[init_name] = (init_name, labels[inits], source[time_dim].attrs)
    coords[LEAD_DIM] = (LEAD_DIM, _lead_times(labels, inits, lead_steps))
    coords[VALID_TIME] = ((init_name, LEAD_DIM), labels[valid_positions])
    return xr.Dataset(variables, coords=coords, attrs=source.attrs)


def _lead_times(labels: np.ndarray, inits: np.ndarray, lead_steps: np.ndarray) -> np.ndarray:
    """Lead time of each target step: timedelta64 for datetimes, steps otherwise.

    The most common difference from init to valid time over the inits (a time axis with
    gaps left in, ``gaps="allow"``, has others; ``valid_time`` holds the exact ones).
    """
    if np.issubdtype(labels.dtype, np.datetime64):
        valid = labels[inits[:, None] + lead_steps[None, :]]
        deltas = (valid - labels[inits][:, None]).astype("timedelta64[ns]")
        leads = []
        for column in deltas.T:
            found, counts = np.unique(column, return_counts=True)
            leads.append(found[np.argmax(counts)])
        return np.asarray(leads, dtype="timedelta64[ns]")
    if labels.dtype == object and len(labels) and hasattr(labels[0], "calendar"):
        valid = labels[inits[0] + lead_steps]
        return np.asarray([np.timedelta64(v - labels[inits[0]]) for v in valid]).astype(
            "timedelta64[ns]"
        )
    return lead_steps.astype(np.int64)


def truth_at(source: xr.Dataset, predicted: xr.DataArray, time_dim: str | None) -> xr.DataArray:
    """The source's values where ``predicted`` lies, in its shape and dim order.

    For the forecast layout, the values at each ``valid_time`` (``time_dim`` the source's
    time dim); on the grid, at the same labels.
    """
    truth = source[str(predicted.name)]
    if VALID_TIME in predicted.coords and time_dim is not None:
        picked = truth.sel({time_dim: predicted[VALID_TIME]})
        others = {dim: predicted[dim] for dim in predicted.dims if dim in truth.dims}
        others.pop(time_dim, None)
        picked = picked.sel({d: v for d, v in others.items() if d in picked.indexes})
        return picked.transpose(*predicted.dims).drop_vars(time_dim, errors="ignore")
    where = {dim: predicted[dim] for dim in predicted.dims if dim in truth.indexes}
    return truth.sel(where).transpose(*predicted.dims)


def masked_like(
    predicted: xr.Dataset,
    source: xr.Dataset,
    time_dim: str | None,
    truth: bool,
    valid: xr.DataArray | None = None,
) -> xr.Dataset:
    """Predictions with NaN where the target was missing (``truth``) or is not valid.

    Args:
        predicted: What :func:`stitch_windows` or :func:`stitch_forecasts` gave.
        source: The source dataset.
        time_dim: Its time dim (for the forecast layout's valid times).
        truth: NaN wherever the source's own target value is missing.
        valid: A static field, true where targets count (the ``mask`` option).
    """
    for name in predicted.data_vars:
        if truth:
            present = truth_at(source, predicted[name], time_dim).notnull()
            predicted[name] = predicted[name].where(present.values)
        if valid is not None:
            where = valid.sel({dim: predicted[dim] for dim in valid.dims if dim in valid.indexes})
            predicted[name] = predicted[name].where(where)
    return predicted
