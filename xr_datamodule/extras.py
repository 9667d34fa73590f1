"""Channels not read window by window: static fields and forcings computed from coordinates.

Global weather models take, besides the prognostic variables, **static fields** (land-sea
mask, orography: variables without the time dim) and **forcings** computed from the
coordinates (sines and cosines of latitude, longitude, day of year and local time, the
cosine of the solar zenith angle, top-of-atmosphere insolation). Both are vectorised over a
whole batch: a static field is read once (it is small) and its windows are cut with one
gather and broadcast along time; a forcing is one numpy expression over the batch's window
coordinates.

Solar geometry follows NOAA's "General Solar Position Calculations" (fractional year,
equation of time and declination from Spencer's Fourier series): the hour angle comes from
the true solar time at the longitude, and ``cos(zenith) = sin(lat) sin(decl) + cos(lat)
cos(decl) cos(hour angle)``. ``insolation`` is the incoming flux at the top of the
atmosphere over the solar constant: ``max(cos(zenith), 0)`` times Spencer's eccentricity
factor (about 1.034 in early January, 0.967 in early July).

Example:
    >>> t = np.array(["2020-06-20T12:00"], dtype="datetime64[ns]")
    >>> round(float(cos_solar_zenith(np.array([90.0]), np.array([0.0]), t)[0]), 3)  # sin(23.4)
    0.398
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import xarray as xr

from xr_datamodule.gather import gather_windows
from xr_datamodule.missing import (
    MISSING_ADVICE,
    MissingValueError,
    describe_missing,
    first_nan,
    holds_nan,
)
from xr_datamodule.sources import channel_layouts, label_at

__all__ = ["FORCINGS", "ExtraChannels", "cos_solar_zenith", "insolation"]

LATITUDE_NAMES = ("lat", "latitude")
LONGITUDE_NAMES = ("lon", "longitude")
TIME_NAMES = ("time", "valid_time")


def _fractional_year(time: np.ndarray) -> np.ndarray:
    """NOAA's fractional year gamma (radians) of UTC times (datetime64)."""
    time = time.astype("datetime64[ns]")
    year = time.astype("datetime64[Y]")
    days_in_year = ((year + 1).astype("datetime64[D]") - year.astype("datetime64[D]")).astype(
        np.float64
    )
    elapsed = (time - year.astype("datetime64[ns]")).astype(np.float64) / 86400e9  # days
    return 2 * np.pi / days_in_year * elapsed  # (day of year - 1 + hour / 24)


def _utc_hours(time: np.ndarray) -> np.ndarray:
    time = time.astype("datetime64[ns]")
    return (time - time.astype("datetime64[D]")).astype(np.float64) / 3600e9


def cos_solar_zenith(lat: np.ndarray, lon: np.ndarray, time: np.ndarray) -> np.ndarray:
    """Cosine of the solar zenith angle at latitudes, longitudes (degrees) and UTC times."""
    gamma = _fractional_year(time)
    equation_of_time = 229.18 * (
        0.000075
        + 0.001868 * np.cos(gamma)
        - 0.032077 * np.sin(gamma)
        - 0.014615 * np.cos(2 * gamma)
        - 0.040849 * np.sin(2 * gamma)
    )  # minutes
    declination = (
        0.006918
        - 0.399912 * np.cos(gamma)
        + 0.070257 * np.sin(gamma)
        - 0.006758 * np.cos(2 * gamma)
        + 0.000907 * np.sin(2 * gamma)
        - 0.002697 * np.cos(3 * gamma)
        + 0.00148 * np.sin(3 * gamma)
    )
    true_solar_minutes = _utc_hours(time) * 60 + equation_of_time + 4 * lon
    hour_angle = np.radians(true_solar_minutes / 4 - 180)
    phi = np.radians(lat)
    return np.sin(phi) * np.sin(declination) + np.cos(phi) * np.cos(declination) * np.cos(
        hour_angle
    )


def insolation(lat: np.ndarray, lon: np.ndarray, time: np.ndarray) -> np.ndarray:
    """Top-of-atmosphere incoming solar flux over the solar constant (0 at night)."""
    gamma = _fractional_year(time)
    eccentricity = (
        1.000110
        + 0.034221 * np.cos(gamma)
        + 0.001280 * np.sin(gamma)
        + 0.000719 * np.cos(2 * gamma)
        + 0.000077 * np.sin(2 * gamma)
    )
    return np.maximum(cos_solar_zenith(lat, lon, time), 0.0) * eccentricity


def _local_time_phase(lon: np.ndarray, time: np.ndarray) -> np.ndarray:
    return 2 * np.pi * ((_utc_hours(time) + lon / 15.0) % 24.0) / 24.0


_Forcing = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

# name -> (coordinates it needs, function of (lat degrees, lon degrees, UTC datetime64))
FORCINGS: Mapping[str, tuple[tuple[str, ...], _Forcing]] = {
    "cos_latitude": (("lat",), lambda lat, lon, t: np.cos(np.radians(lat))),
    "sin_latitude": (("lat",), lambda lat, lon, t: np.sin(np.radians(lat))),
    "cos_longitude": (("lon",), lambda lat, lon, t: np.cos(np.radians(lon))),
    "sin_longitude": (("lon",), lambda lat, lon, t: np.sin(np.radians(lon))),
    "cos_julian_day": (("time",), lambda lat, lon, t: np.cos(_fractional_year(t))),
    "sin_julian_day": (("time",), lambda lat, lon, t: np.sin(_fractional_year(t))),
    "cos_local_time": (("lon", "time"), lambda lat, lon, t: np.cos(_local_time_phase(lon, t))),
    "sin_local_time": (("lon", "time"), lambda lat, lon, t: np.sin(_local_time_phase(lon, t))),
    "cos_solar_zenith_angle": (("lat", "lon", "time"), cos_solar_zenith),
    "insolation": (("lat", "lon", "time"), insolation),
}


def coordinate_dims(ds: xr.Dataset, window_dims: Sequence[str]) -> dict[str, str]:
    """Which windowed dim holds latitude, longitude and time (those found)."""
    found: dict[str, str] = {}
    for dim in window_dims:
        coord = ds[dim] if dim in ds.coords else None
        standard = coord.attrs.get("standard_name", "") if coord is not None else ""
        if dim in LATITUDE_NAMES or standard == "latitude":
            found["lat"] = dim
        elif dim in LONGITUDE_NAMES or standard == "longitude":
            found["lon"] = dim
        elif coord is not None and np.issubdtype(coord.dtype, np.datetime64):
            if dim in TIME_NAMES or "time" not in found:
                found["time"] = dim
    return found


def check_forcings(forcings: Sequence[str], ds: xr.Dataset, window_dims: Sequence[str]) -> None:
    """Raise a clear error for an unknown forcing or one whose coordinate is not windowed."""
    dims = coordinate_dims(ds, window_dims)
    what = {"lat": "a latitude", "lon": "a longitude", "time": "a datetime time"}
    for name in forcings:
        if name not in FORCINGS:
            raise ValueError(f"forcings: unknown forcing {name!r}. Valid: {tuple(FORCINGS)}")
        for needed in FORCINGS[name][0]:
            if needed not in dims:
                raise ValueError(
                    f"forcings: {name!r} needs {what[needed]} coordinate among the windowed "
                    f"dims {tuple(window_dims)} (latitude: one of {LATITUDE_NAMES}, longitude: "
                    f"one of {LONGITUDE_NAMES}, time: a datetime64 dim)"
                )


class ExtraChannels:
    """Static fields and forcings of one side of a sample (``X`` or ``y``), for whole batches.

    Args:
        source: The source dataset (coordinates; the static variables).
        window_dims: Windowed dims, in window axis order.
        statics: Variables that lack ``static_dim``, in channel order.
        static_dim: The dim static fields are broadcast along (time).
        forcings: Names from :data:`FORCINGS`, in channel order (after the statics).
        dtype: Output dtype.
        affine: Optional ``(mean, std)`` per static channel: the statics are normalised
            once, when read. Forcings are never normalised.
    """

    def __init__(
        self,
        source: xr.Dataset,
        window_dims: Sequence[str],
        statics: Sequence[str] = (),
        static_dim: str | None = None,
        forcings: Sequence[str] = (),
        dtype: np.dtype | str = "float32",
        affine: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.window_dims = tuple(window_dims)
        self.statics = list(statics)
        self.forcings = list(forcings)
        self.dtype = np.dtype(dtype)
        self._static_axis = self.window_dims.index(static_dim) if self.statics else -1
        self._present = [a for a in range(len(self.window_dims)) if a != self._static_axis]
        self._block = self._read_statics(source, affine) if self.statics else None
        roles = coordinate_dims(source, self.window_dims)
        self._coords = {role: np.asarray(source[dim].values) for role, dim in roles.items()}
        self._axes = {role: self.window_dims.index(dim) for role, dim in roles.items()}
        n_static = 0 if self._block is None else self._block.shape[0]
        self.n_channels = n_static + len(self.forcings)
        layouts = channel_layouts(source, self.statics, self.window_dims)
        self.channel_names = [
            name for layout in layouts for name in layout.channel_names(source)
        ] + self.forcings

    def _read_statics(
        self, source: xr.Dataset, affine: tuple[np.ndarray, np.ndarray] | None
    ) -> np.ndarray:
        present = [self.window_dims[a] for a in self._present]
        parts = []
        for layout in channel_layouts(source, self.statics, self.window_dims):
            values = source[layout.name].transpose(*layout.extra_dims, *present).values
            parts.append(values.reshape(-1, *values.shape[len(layout.extra_dims) :]))
        block = np.concatenate(parts).astype(np.float64)
        if affine is not None:
            lead = (-1,) + (1,) * len(present)
            block = (block - np.reshape(affine[0], lead)) / np.reshape(affine[1], lead)
        return np.ascontiguousarray(block.astype(self.dtype))

    def fail_on_nan(self, source: xr.Dataset) -> None:
        """Raise :class:`MissingValueError` if a static field holds a NaN or ±Inf (once)."""
        if self._block is None or not holds_nan(self._block):
            return
        channel, *at = first_nan(self._block)
        value = self._block[(channel, *at)]
        dims = [self.window_dims[axis] for axis in self._present]
        raise MissingValueError(
            f"static field {self.channel_names[channel]!r} has a {describe_missing(value)} at "
            f"{label_at(source, dims, at)}; {MISSING_ADVICE}"
        )

    def fill(self, out: np.ndarray, starts: np.ndarray) -> None:
        """Write the channels of the windows starting at ``starts`` into ``out``.

        Args:
            out: ``(batch, n_channels, *window)``, written in place.
            starts: ``(batch, ndim)`` window starts (positions).
        """
        size = out.shape[2:]
        n_static = 0
        if self._block is not None:
            n_static = self._block.shape[0]
            windows = gather_windows(
                self._block,
                np.arange(n_static),
                starts[:, self._present],
                [size[a] for a in self._present],
            )
            out[:, :n_static] = np.expand_dims(windows, 2 + self._static_axis)
        if self.forcings:
            coords = self._window_coords(starts, size)
            for i, name in enumerate(self.forcings):
                out[:, n_static + i] = FORCINGS[name][1](*coords)

    def _window_coords(
        self, starts: np.ndarray, size: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lat, lon, time) of every window position, shaped to broadcast to (batch, *size)."""
        found = []
        for role, empty in (("lat", 0.0), ("lon", 0.0), ("time", np.datetime64(0, "ns"))):
            if role not in self._axes:
                found.append(np.asarray(empty))
                continue
            axis = self._axes[role]
            positions = starts[:, axis, None] + np.arange(size[axis])
            shape = [len(starts)] + [1] * len(size)
            shape[1 + axis] = size[axis]
            found.append(self._coords[role][positions].reshape(shape))
        lat, lon, time = found
        return lat, lon, time
