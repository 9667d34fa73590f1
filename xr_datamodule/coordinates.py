"""Latitude, longitude and area weights wherever a grid keeps them.

A regular grid has 1-D ``lat``/``lon`` dim coordinates; a reduced Gaussian or other
unstructured grid (anemoi's ``cell`` dim, AIFS's O96/N320) keeps them as 1-D coordinates on
its cell dim; an ocean or regional model (NEMO ``nav_lat``, ROMS ``lat_rho``, RASM ``yc``) as
2-D coordinates over its ``(y, x)`` dims. A :class:`CoordinateField` holds any of these: the
values over the windowed dims it spans, gathered for whole batches of windows at once.

Coordinates are recognised by name (``lat``, ``latitude``, ``latitudes``, ``nav_lat``,
``lat_*``...), CF ``standard_name`` or ``units`` (degrees north/east), among the coordinates
whose dims are all windowed (a dim coordinate first, then the one with fewest dims); or named
by the user: ``coordinates={"lat": "nav_lat", "lon": "nav_lon"}``. The weight of a point in
an area-weighted loss or score is its cell area when a variable holds it
(``coordinates={"area": "cell_area"}``), else cos(latitude); either over its mean over the
whole grid, so that a global mean of weights is 1.

Example:
    >>> ds = xr.Dataset(coords={"lat": ("cell", [0.0, 60.0, -60.0]), "lon": ("cell", [0.0] * 3)})
    >>> fields = find_coordinates(ds, ("time", "cell"))
    >>> fields["lat"].axes, fields["lat"].values.tolist()
    ((1,), [0.0, 60.0, -60.0])
    >>> weight_field(ds, ("time", "cell")).values.round(3).tolist()
    [1.5, 0.75, 0.75]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr

from xr_datamodule.forcings import FORCINGS, LATITUDE_NAMES, LONGITUDE_NAMES, coordinate_dims

__all__ = [
    "COORDINATE_ROLES",
    "CoordinateField",
    "check_coordinates",
    "check_forcings",
    "find_coordinates",
    "weight_field",
]

# What ``coordinates=`` may name: latitude, longitude and a cell-area variable.
COORDINATE_ROLES = ("lat", "lon", "area")
_NAMES = {
    "lat": (*LATITUDE_NAMES, "latitudes", "nav_lat", "tlat", "ulat", "xlat"),
    "lon": (*LONGITUDE_NAMES, "longitudes", "nav_lon", "tlon", "ulon", "xlong"),
}
_UNITS = {
    "lat": ("degrees_north", "degree_north", "degrees_n", "degree_n", "degreen", "degreesn"),
    "lon": ("degrees_east", "degree_east", "degrees_e", "degree_e", "degreee", "degreese"),
}
_STANDARD = {"lat": "latitude", "lon": "longitude"}


@dataclass(frozen=True)
class CoordinateField:
    """A coordinate's (or weight's) values over the windowed dims it spans.

    Args:
        name: The coordinate or variable it comes from.
        axes: Positions of its dims among the windowed dims, increasing.
        values: float64 (or datetime64) values over those dims, in that order.
    """

    name: str
    axes: tuple[int, ...]
    values: np.ndarray

    def windows(
        self, starts: np.ndarray, size: Sequence[int], offset: Sequence[int] | None = None
    ) -> np.ndarray:
        """The values at every position of a batch's windows, in one gather.

        Args:
            starts: ``(batch, ndim)`` window starts.
            size: Window length per windowed dim.
            offset: Window start relative to ``starts`` per dim (a target's), default 0.

        Returns:
            ``(batch, *window)`` with length 1 along the dims the field does not span, so that
            it broadcasts against a batch's ``(batch, *window)`` values.
        """
        index = []
        for axis in self.axes:
            shift = 0 if offset is None else int(offset[axis])
            positions = starts[:, axis, None] + shift + np.arange(size[axis])
            shape = [len(starts)] + [1] * len(size)
            shape[1 + axis] = size[axis]
            index.append(positions.reshape(shape))
        return self.values[tuple(index)]


def find_coordinates(
    ds: xr.Dataset, window_dims: Sequence[str], named: Mapping[str, str] | None = None
) -> dict[str, CoordinateField]:
    """Latitude, longitude and time over the windowed dims (those found).

    Args:
        ds: The source.
        window_dims: The windowed dims, in window axis order.
        named: ``{"lat": name, "lon": name}`` given by the user (checked by
            :func:`check_coordinates`).
    """
    named = dict(named or {})
    found: dict[str, CoordinateField] = {}
    for role in ("lat", "lon"):
        coord = ds[named[role]] if role in named else _recognised(ds, role, window_dims)
        if coord is not None:
            found[role] = _field(coord, window_dims, np.float64)
    time = coordinate_dims(ds, window_dims).get("time")
    if time is not None:
        found["time"] = _field(ds[time], window_dims, None)
    return found


def weight_field(
    ds: xr.Dataset, window_dims: Sequence[str], named: Mapping[str, str] | None = None
) -> CoordinateField | None:
    """Each point's area weight over its mean: a cell-area variable, else cos(latitude).

    None when there is neither (no latitude among the windowed dims' coordinates).
    """
    named = dict(named or {})
    if "area" in named:
        field = _field(ds[named["area"]], window_dims, np.float64)
        values = field.values
    else:
        latitude = find_coordinates(ds, window_dims, named).get("lat")
        if latitude is None:
            return None
        field, values = latitude, np.cos(np.radians(latitude.values))
    return CoordinateField(field.name, field.axes, values / values.mean())


def check_coordinates(
    ds: xr.Dataset, window_dims: Sequence[str], named: Mapping[str, str] | None
) -> None:
    """Raise a clear error for a ``coordinates=`` entry the data cannot serve."""
    for role, name in dict(named or {}).items():
        if role not in COORDINATE_ROLES:
            raise ValueError(f"coordinates: unknown role {role!r}. Valid: {COORDINATE_ROLES}")
        if name not in ds.variables:
            raise KeyError(
                f"coordinates[{role!r}]: {name!r} is not in the data. Valid: "
                f"{tuple(map(str, ds.variables))}"
            )
        dims = ds[name].dims
        if not dims or not set(dims) <= set(window_dims):
            raise ValueError(
                f"coordinates[{role!r}]: {name!r} has dims {dims}; it must lie over windowed "
                f"dims only (windowed: {tuple(window_dims)})"
            )
        values = np.asarray(ds[name].values, dtype=np.float64)
        if not np.isfinite(values).all() or (role == "area" and (values <= 0).any()):
            wanted = "positive areas" if role == "area" else "finite degrees"
            raise ValueError(f"coordinates[{role!r}]: {name!r} must hold {wanted} everywhere")


def check_forcings(
    forcings: Sequence[str],
    ds: xr.Dataset,
    window_dims: Sequence[str],
    named: Mapping[str, str] | None = None,
) -> None:
    """Raise a clear error for a forcing whose coordinates are not over the windowed dims."""
    roles = find_coordinates(ds, window_dims, named)
    what = {"lat": "a latitude", "lon": "a longitude", "time": "a datetime time"}
    for name in forcings:
        for needed in FORCINGS[name][0]:
            if needed not in roles:
                raise ValueError(
                    f"forcings: {name!r} needs {what[needed]} coordinate over the windowed "
                    f"dims {tuple(window_dims)}: a dim coordinate, a coordinate on a cell dim "
                    "or a 2-D one, recognised by name (e.g. lat, latitude, nav_lat), CF "
                    "standard_name or units (degrees_north/east), or named with "
                    "coordinates={'lat': ..., 'lon': ...}; time: a datetime64 dim"
                )


def _recognised(ds: xr.Dataset, role: str, window_dims: Sequence[str]) -> xr.DataArray | None:
    candidates = [
        ds[name]
        for name in ds.coords
        if _looks_like(ds[name], role) and ds[name].dims and set(ds[name].dims) <= set(window_dims)
    ]
    # A dim coordinate first, then the coordinate of fewest dims.
    candidates.sort(key=lambda c: (c.name not in window_dims, c.ndim))
    return candidates[0] if candidates else None


def _looks_like(coord: xr.DataArray, role: str) -> bool:
    name = str(coord.name).lower()
    attrs = coord.attrs
    if str(attrs.get("standard_name", "")) == _STANDARD[role]:
        return True
    if str(attrs.get("units", "")).lower() in _UNITS[role]:
        return True
    prefix = (f"{role}_", f"{_STANDARD[role]}_")
    return name in _NAMES[role] or name.startswith(prefix)


def _field(coord: xr.DataArray, window_dims: Sequence[str], dtype: type | None) -> CoordinateField:
    dims = [dim for dim in window_dims if dim in coord.dims]
    values = np.asarray(coord.transpose(*dims).values)
    if dtype is not None:
        values = values.astype(dtype)
    axes = tuple(list(window_dims).index(dim) for dim in dims)
    return CoordinateField(str(coord.name), axes, values)
