"""Verification a forecaster reads: latitude-weighted RMSE per lead time, in physical units.

Forecasts are datasets in the forecast layout of :func:`~xr_datamodule.stitch.stitch_forecasts`
(``time`` the init time, ``prediction_timedelta`` the lead, a 2-D ``valid_time``). The metric is
WeatherBench 2's RMSE: the square root of the mean, over init times and grid points, of the
squared error weighted by ``cos(latitude)`` normalised to mean 1 over the latitudes; points
where the forecast or the truth is missing (NaN) are left out of both sums. One value per
target variable, per channel of its other dims (e.g. ``level``) and per lead time.

The baselines are forecasts in the same layout, so they go through the same metric:

* **persistence**: the truth at the init time (the last input step), for every lead;
* **climatology**: the training split's mean at every grid point (and level).

Example:
    >>> import pandas as pd
    >>> lat = np.array([-60.0, 0.0, 60.0])
    >>> truth = xr.DataArray(np.zeros((2, 1, 3)), dims=("time", "prediction_timedelta", "lat"),
    ...                      coords={"lat": lat})
    >>> forecast = truth + np.array([1.0, 1.0, 1.0])
    >>> float(weighted_rmse(forecast, truth, "lat"))
    1.0
    >>> latitude_weights(lat).round(3).tolist()
    [0.75, 1.5, 0.75]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from xr_datamodule.stitch import LEAD_DIM

__all__ = [
    "climatology_forecast",
    "latitude_weights",
    "lead_label",
    "persistence_forecast",
    "rmse_table",
    "weighted_rmse",
]


def latitude_weights(latitudes: Any) -> np.ndarray:
    """``cos(latitude)`` normalised to mean 1 over the latitudes given (WeatherBench 2)."""
    weights = np.cos(np.radians(np.asarray(latitudes, dtype=np.float64)))
    return weights / weights.mean()


def weighted_rmse(
    forecast: xr.DataArray,
    truth: xr.DataArray,
    lat_dim: str | xr.DataArray | None,
    keep: Sequence[str] = (),
) -> xr.DataArray:
    """Latitude-weighted RMSE over every dim but ``keep``, skipping missing points.

    Args:
        forecast: The forecast.
        truth: The truth on the same dims and coordinates.
        lat_dim: The latitude dim (weights ``cos(lat)`` over their mean), the area weights
            themselves over the grid's dims (a cell dim, 2-D ``(y, x)``), or None for equal
            weights.
        keep: Dims not averaged over (e.g. ``prediction_timedelta``, ``level``).
    """
    squared = (forecast - truth.values) ** 2
    present = squared.notnull()
    weights = xr.ones_like(squared)
    if isinstance(lat_dim, xr.DataArray):
        weights = weights * lat_dim
    elif lat_dim is not None:
        lat = latitude_weights(forecast[lat_dim].values)
        weights = weights * xr.DataArray(lat, dims=(lat_dim,))
    weights = weights.where(present, 0.0)
    over = [dim for dim in squared.dims if dim not in keep]
    total = (squared.fillna(0.0) * weights).sum(over)
    return np.sqrt(total / weights.sum(over))


def persistence_forecast(truth_at_init: xr.DataArray, like: xr.DataArray) -> xr.DataArray:
    """The truth at each init time, repeated over every lead time of ``like``."""
    values = np.broadcast_to(
        np.expand_dims(truth_at_init.transpose("time", ...).values, 1), like.shape
    )
    return like.copy(data=np.array(values, dtype=np.float64))


def climatology_forecast(mean_field: xr.DataArray, like: xr.DataArray) -> xr.DataArray:
    """A mean field (no time dim) at every init and lead time of ``like``."""
    order = [dim for dim in like.dims if dim in mean_field.dims]
    values = np.broadcast_to(mean_field.transpose(*order).values, like.shape)
    return like.copy(data=np.array(values, dtype=np.float64))


def lead_label(lead: Any) -> str:
    """``+6h``, ``+1d``, ``+30min``; ``+1`` (steps) for a lead without a time unit."""
    value = np.asarray(lead)
    if np.issubdtype(value.dtype, np.timedelta64):
        seconds = int(value.astype("timedelta64[s]").astype(np.int64))
        for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
            if seconds % size == 0:
                return f"+{seconds // size}{unit}"
        return f"+{seconds}s"
    return f"+{int(value)}"


def rmse_table(
    forecasts: Mapping[str, xr.Dataset],
    truth: xr.Dataset,
    lat_dim: str | xr.DataArray | None,
    space_dims: Sequence[str],
) -> dict[str, dict[str, dict[str, float]]]:
    """RMSE of several forecasts against one truth: ``{forecast: {channel: {lead: rmse}}}``.

    Args:
        forecasts: Named forecasts in the forecast layout (the same variables as ``truth``).
        truth: The truth at each forecast's valid time, same layout.
        lat_dim: The latitude dim, the area weights over the grid's dims, or None.
        space_dims: The dims of the grid (averaged over with the init times); other dims
            of a variable (e.g. ``level``) are kept apart, as channels.

    Returns:
        Per forecast, per channel (``z[level=500]`` for a variable with a level dim), per lead
        (:func:`lead_label`): the RMSE in the variable's units.
    """
    table: dict[str, dict[str, dict[str, float]]] = {}
    for who, forecast in forecasts.items():
        rows: dict[str, dict[str, float]] = {}
        for name in truth.data_vars:
            predicted = forecast[name]
            extra = [dim for dim in predicted.dims if dim not in ("time", LEAD_DIM, *space_dims)]
            scores = weighted_rmse(predicted, truth[name], lat_dim, keep=[LEAD_DIM, *extra])
            scores = scores.transpose(*extra, LEAD_DIM)
            for channel, values in _channels(str(name), scores, extra):
                rows[channel] = {
                    lead_label(lead): float(value)
                    for lead, value in zip(scores[LEAD_DIM].values, values, strict=True)
                }
        table[who] = rows
    return table


def _channels(
    name: str, scores: xr.DataArray, extra: Sequence[str]
) -> list[tuple[str, np.ndarray]]:
    if not extra:
        return [(name, np.asarray(scores.values))]
    flat = scores.stack(channel=list(extra))
    out = []
    for i in range(flat.sizes["channel"]):
        labels = ", ".join(f"{dim}={flat[dim].values[i]}" for dim in extra)
        out.append((f"{name}[{labels}]", np.asarray(flat.isel(channel=i).values)))
    return out
