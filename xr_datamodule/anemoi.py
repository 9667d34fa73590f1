"""Stores written by anemoi-datasets, opened as labelled Datasets.

ECMWF's anemoi-datasets (the training data of AIFS) writes one zarr group per dataset: a
``data`` array of ``(time, variable, ensemble, cell)`` (its ``_ARRAY_DIMENSIONS``), ``dates``
(datetime64 per step), ``latitudes`` and ``longitudes`` per cell, the variable names in the
group's ``variables`` attribute, and statistics over its statistics period per variable:
``mean``, ``stdev``, ``minimum``, ``maximum`` (read from anemoi-datasets' own source:
``create/gridded/creator.py``, ``create/statistics.py``, ``usage/gridded/store.py``).

Written with zarr 2 the group is zarr v2; with zarr 3 it is v3 with the dims still in the
``_ARRAY_DIMENSIONS`` attributes, which :func:`~xr_datamodule.sources.open_source` reads
(lazily, with dask) where xarray asks for v3's ``dimension_names``.

xarray opens such a group with ``dates``, ``latitudes`` and ``longitudes`` as data variables
and no labels on ``time`` or ``variable``. :func:`labelled` makes it what the datamodule
needs: ``time`` labelled by the dates, ``variable`` by the names, latitude and longitude as
coordinates on ``cell`` (so forcings and area weights work), the statistics kept aside
(coordinates on ``variable``), and only ``data`` left as a variable. ``stats="stored"``
takes those statistics instead of a scan (:func:`stored_statistics`).

Example:
    >>> ds = xr.Dataset(
    ...     {"data": (("time", "variable", "ensemble", "cell"), np.zeros((2, 2, 1, 3))),
    ...      "dates": ("time", np.array(["2020-01-01", "2020-01-02"], "M8[s]")),
    ...      "latitudes": ("cell", [0.0, 1.0, 2.0]), "longitudes": ("cell", [0.0, 1.0, 2.0]),
    ...      "mean": ("variable", [1.0, 2.0]), "stdev": ("variable", [1.0, 3.0])},
    ...     attrs={"variables": ["2t", "msl"]})
    >>> is_anemoi(ds)
    True
    >>> labelled(ds).data.sel(variable="msl").dims
    ('time', 'ensemble', 'cell')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

__all__ = ["STORED", "is_anemoi", "labelled", "stored_statistics"]

STORED = "stored"  # stats="stored": the statistics a store carries (anemoi's)
DATA_DIMS = ("time", "variable", "ensemble", "cell")
# anemoi's statistics arrays -> ours
STATISTICS = {"mean": "mean", "stdev": "std", "minimum": "min", "maximum": "max"}
_PREFIX = "stored_"  # statistics kept as coordinates on ``variable``


def is_anemoi(ds: xr.Dataset) -> bool:
    """Whether ``ds`` is an anemoi-datasets store as xarray opens it."""
    return (
        "data" in ds.data_vars
        and ds["data"].dims == DATA_DIMS
        and "dates" in ds.variables
        and "variables" in ds.attrs
    )


def labelled(ds: xr.Dataset) -> xr.Dataset:
    """The store with labels: time, variable names, cell coordinates; statistics aside."""
    names = [str(name) for name in ds.attrs["variables"]]
    if len(names) != ds.sizes["variable"]:
        raise ValueError(
            f"anemoi store: its 'variables' attribute names {len(names)} variables, its "
            f"data hold {ds.sizes['variable']}"
        )
    statistics = {
        f"{_PREFIX}{ours}": ("variable", np.asarray(ds[theirs].values, dtype=np.float64))
        for theirs, ours in STATISTICS.items()
        if theirs in ds.variables and ds[theirs].dims == ("variable",)
    }
    cells = {
        name: ("cell", np.asarray(ds[name].values, dtype=np.float64), {"units": units})
        for name, units in (("latitudes", "degrees_north"), ("longitudes", "degrees_east"))
        if name in ds.variables
    }
    times = np.asarray(ds["dates"].values).astype("datetime64[ns]")
    out = ds[["data"]].assign_coords(time=times, variable=names, **cells, **statistics)
    out.attrs = dict(ds.attrs)
    return out


def stored_statistics(
    ds: xr.Dataset, names: Sequence[str], window_dims: Sequence[str]
) -> dict[str, Any]:
    """The store's statistics as ``stats=`` takes them, per channel of each variable.

    A variable with the ``variable`` dim (anemoi's ``data``) gets the statistics of each
    variable it holds, repeated over its other channel dims (an ensemble member shares its
    variable's statistics), in the order of its channels (C order over its non-windowed
    dims, :mod:`xr_datamodule.channels`), found by broadcasting, not assumed.

    Raises:
        ValueError: The store carries no statistics, or a variable has no ``variable`` dim.
    """
    kinds = [kind for kind in STATISTICS.values() if f"{_PREFIX}{kind}" in ds.coords]
    if not {"mean", "std"} <= set(kinds):
        raise ValueError(
            "stats='stored' takes the statistics an anemoi-datasets store carries; this "
            f"data has none (its statistics arrays: {sorted(STATISTICS)}); use "
            "normalize='zscore' to compute them, or stats= a mapping or file"
        )
    out: dict[str, dict[str, list[float]]] = {kind: {} for kind in kinds}
    for name in names:
        var = ds[name]
        if "variable" not in var.dims or "variable" in window_dims:
            raise ValueError(
                f"stats='stored': {name!r} needs the 'variable' dim among its channels to "
                "take the stored statistics along"
            )
        channels = var.isel({dim: 0 for dim in window_dims if dim in var.dims}, drop=True)
        for kind in kinds:
            values = ds[f"{_PREFIX}{kind}"].reset_coords(drop=True)
            per_channel = values.broadcast_like(channels).transpose(*channels.dims)
            out[kind][name] = per_channel.values.reshape(-1).tolist()
    return out
