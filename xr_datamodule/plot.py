"""Plots of what a model will see: windows, splits, predictions beside the truth.

Needs matplotlib (``pip install "xr_datamodule[plot]"``). Every function returns the
``matplotlib.figure.Figure`` it drew.

Example:
    >>> from xr_datamodule import XarrayDataModule
    >>> dm = XarrayDataModule("synthetic://weather", input_vars=["t2m"],
    ...                       input_dims={"time": 1, "lat": 32, "lon": 32})
    >>> figure = plot_splits(dm)
    >>> len(figure.axes)
    1
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from xr_datamodule.coordinates import find_coordinates

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from xr_datamodule.datamodule import XarrayDataModule

__all__ = ["plot_prediction", "plot_splits", "plot_windows"]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use(matplotlib.get_backend())  # keep the notebook's backend
        import matplotlib.pyplot as plt
    except ImportError as err:  # an optional extra
        raise ImportError(
            'xr_datamodule.plot needs matplotlib: pip install "xr_datamodule[plot]"'
        ) from err
    return plt


def _image(window: np.ndarray) -> np.ndarray:
    """The last two axes of a ``(*lead, h, w)`` window, taking the last step of the others."""
    while window.ndim > 2:
        window = window[-1]
    return window


def _origin(source: xr.Dataset, window_dims: tuple[str, ...]) -> str:
    """``imshow``'s origin that puts north (larger row labels) up for raw window rows."""
    if len(window_dims) < 2:
        return "lower"
    rows = window_dims[-2]
    if rows in source.indexes and source.sizes[rows] > 1:
        labels = np.asarray(source[rows].values)
        if np.issubdtype(labels.dtype, np.number) and labels[0] > labels[-1]:
            return "upper"  # stored north to south: the first row is the northernmost
    return "lower"


def plot_windows(
    dm: XarrayDataModule, split: str = "train", n: int = 4, channel: int = 0
) -> Figure:
    """Input and target windows of ``n`` samples of a split, one column per sample.

    Shows ``channel`` of ``X`` (its last step along any leading window axis, e.g. the most
    recent time) above the first channel of ``y``, with their channel names.
    """
    plt = _pyplot()
    dm.setup()
    split = dm.pipeline.plan.split_for(split)
    dataset = dm.datasets[split]
    ids = np.linspace(0, len(dataset) - 1, num=min(n, len(dataset))).astype(int)
    batch = dataset.__getitems__(ids)
    starts = dm.indices[split].starts(ids)
    names = dm.input_channel_names
    origin = _origin(dm.source, dm.window_dims)
    figure, axes = plt.subplots(2, len(ids), figsize=(2.6 * len(ids), 5.2), squeeze=False)
    for column, (sample, start) in enumerate(zip(ids, starts, strict=True)):
        where = ", ".join(f"{d}={s}" for d, s in zip(dm.window_dims, start, strict=True))
        for row, (values, label) in enumerate(
            (
                (batch.inputs[column, channel], f"X: {names[channel]}"),
                (batch.targets[column, 0], f"y: {dm.target_vars[0]}"),
            )
        ):
            axis = axes[row, column]
            image = axis.imshow(_image(values), origin=origin, cmap="viridis")
            axis.set_title(f"{label}\nsample {sample} ({where})" if row == 0 else label, fontsize=8)
            axis.set_xticks([])
            axis.set_yticks([])
            figure.colorbar(image, ax=axis, shrink=0.7)
    figure.suptitle(f"{split}: inputs (top) and targets (bottom)")
    figure.tight_layout()
    return figure


def plot_splits(dm: XarrayDataModule, dim: str | None = None) -> Figure:
    """A timeline of the splits along ``dim`` (default: the first dim a split restricts)."""
    plt = _pyplot()
    bounds = dm.split_bounds
    source = dm.source
    if dim is None:
        restricted = [
            d for ranges in bounds.values() for d, r in ranges.items() if r != (0, source.sizes[d])
        ]
        dim = restricted[0] if restricted else dm.window_dims[0]
    coordinate = source[dim].values if dim in source.coords else np.arange(source.sizes[dim])
    figure, axis = plt.subplots(figsize=(9, 0.6 + 0.5 * len(bounds)))
    colours = {
        "train": "tab:blue",
        "val": "tab:orange",
        "test": "tab:green",
        "predict": "tab:purple",
    }
    for row, (name, ranges) in enumerate(bounds.items()):
        lo, hi = ranges[dim]
        axis.plot(
            [coordinate[lo], coordinate[hi - 1]],
            [row, row],
            linewidth=10,
            solid_capstyle="butt",
            color=colours.get(name, "grey"),
        )
        axis.text(
            coordinate[lo], row + 0.3, f"{name}: {len(dm.indices[name]):,} samples", fontsize=8
        )
    axis.set_yticks(range(len(bounds)), list(bounds))
    axis.set_ylim(-0.6, len(bounds) - 0.2)
    axis.set_xlabel(dim)
    axis.set_title(f"splits along {dim} (windows never cross their edges)")
    figure.autofmt_xdate()
    figure.tight_layout()
    return figure


def _readable(value: Any) -> str:
    """A coordinate value for a title: dates to the minute, leads as +6h."""
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.datetime64):
        return str(np.datetime_as_string(value, unit="m")).replace("T", " ")
    if np.issubdtype(value.dtype, np.timedelta64):
        from xr_datamodule.verification import lead_label

        return lead_label(value)
    return str(value.item() if value.ndim == 0 else value)


def _units(field: xr.DataArray) -> str:
    units = field.attrs.get("units")
    return f"{field.name} ({units})" if units else str(field.name)


def _grid_coordinates(field: xr.DataArray) -> dict[str, xr.DataArray] | None:
    """Latitude and longitude coordinates that are not dims: a cell dim's or 2-D ones."""
    found = find_coordinates(field.coords.to_dataset(), field.dims)
    lat, lon = found.get("lat"), found.get("lon")
    if lat is None or lon is None or lat.name in field.dims:
        return None
    return {"lat": field[lat.name], "lon": field[lon.name]}


def _draw(axis: Any, field: xr.DataArray, grid: dict | None, style: dict) -> None:
    """Draw one panel: a regular grid on its dims, a curvilinear one on its 2-D coordinates.

    ``pcolormesh`` for both; an unstructured grid (a cell dim) as ``tripcolor`` on a
    triangulation of its cells' longitudes and latitudes.
    """
    label = {"label": _units(field)}
    if grid is None:
        y, x = field.dims
        field.plot.pcolormesh(ax=axis, x=x, y=y, add_colorbar=True, cbar_kwargs=label, **style)
        return
    if grid["lat"].ndim == 2:
        x, y = str(grid["lon"].name), str(grid["lat"].name)
        field.plot.pcolormesh(ax=axis, x=x, y=y, add_colorbar=True, cbar_kwargs=label, **style)
        return
    lon, lat = grid["lon"].values, grid["lat"].values
    mesh = axis.tripcolor(lon, lat, field.values, shading="gouraud", **style)
    axis.figure.colorbar(mesh, ax=axis, **label)
    axis.set_xlabel(f"{grid['lon'].name} (degrees east)")
    axis.set_ylabel(f"{grid['lat'].name} (degrees north)")


def plot_prediction(prediction: xr.DataArray, truth: xr.DataArray, **selection: Any) -> Figure:
    """A 2-D field of a prediction beside the truth and their difference, on coordinates.

    Drawn with the data's coordinates (xarray's ``pcolormesh``): north up whatever the
    storage order, degree axes; a curvilinear grid on its 2-D latitude and longitude, an
    unstructured one (a cell dim) as a triangulation of its cells (``tripcolor``); a
    sequential colour map shared by prediction and truth, a diverging one centred on 0 with
    its own scale for the error; units from the attributes.

    Args:
        prediction: E.g. ``dm.to_xarray(trainer.predict(...))["t2m"]``, on the grid or in
            the forecast layout (``time`` the init time, ``prediction_timedelta``).
        truth: The same variable from the source.
        **selection: Labels that pick one 2-D field, e.g. ``time="2019-03-28T12"``; without
            them the first step of every leading dim is shown (the first lead).
    """
    plt = _pyplot()
    predicted = prediction.sel(**selection) if selection else prediction
    grid = _grid_coordinates(predicted)
    cell = grid["lat"].dims[0] if grid and grid["lat"].ndim == 1 else None
    while predicted.ndim > (1 if cell else 2):
        predicted = predicted.isel({next(d for d in predicted.dims if d != cell): 0})
    if "valid_time" in predicted.coords:  # the forecast layout: the truth at the valid time
        time_dim = next(d for d in truth.dims if d not in predicted.dims and d != "level")
        actual = truth.sel({time_dim: predicted["valid_time"].values})
    else:
        fixed = {
            name: coord.values
            for name, coord in predicted.coords.items()
            if coord.ndim == 0 and name in truth.dims
        }
        actual = truth.sel(fixed)
    others = {
        name: coord.values
        for name, coord in predicted.coords.items()
        if coord.ndim == 0 and name in actual.dims
    }
    indexed = {dim: predicted[dim] for dim in predicted.dims if dim in predicted.indexes}
    actual = actual.sel(others).sel(indexed)
    actual = actual.transpose(*predicted.dims).compute()
    error = (predicted - actual.values).rename(f"{prediction.name} error")
    error.attrs = dict(truth.attrs)
    low, high = np.nanpercentile(actual.values, [1, 99])
    spread = float(np.nanpercentile(np.abs(error.values), 99)) or 1.0
    figure, axes = plt.subplots(1, 3, figsize=(15, 3.8), constrained_layout=True)
    panels = (
        (predicted, "prediction", dict(cmap="viridis", vmin=low, vmax=high)),
        (actual, "truth", dict(cmap="viridis", vmin=low, vmax=high)),
        (error, "prediction - truth", dict(cmap="RdBu_r", vmin=-spread, vmax=spread)),
    )
    for axis, (field, title, style) in zip(axes, panels, strict=True):
        field = field.copy()
        field.attrs = dict(truth.attrs)
        field.name = prediction.name
        _draw(axis, field, grid, style)
        axis.set_title(title)
    when = ", ".join(
        f"{name} {_readable(coord.values)}"
        for name, coord in predicted.coords.items()
        if coord.ndim == 0
    )
    figure.suptitle(f"{prediction.name}: {when}")
    return figure
