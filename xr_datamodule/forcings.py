"""Forcings: input channels computed from coordinates alone (pure formulas, a leaf module).

Global weather models take, besides the prognostic variables, sines and cosines of latitude,
longitude, day of year and local time, the cosine of the solar zenith angle and
top-of-atmosphere insolation. Each is one numpy expression of latitudes and longitudes
(degrees) and UTC times (datetime64), broadcast against each other.

Solar geometry follows NOAA's "General Solar Position Calculations" (fractional year,
equation of time and declination from Spencer's Fourier series): the hour angle comes from
the true solar time at the longitude, and ``cos(zenith) = sin(lat) sin(decl) + cos(lat)
cos(decl) cos(hour angle)``. ``insolation`` is the incoming flux at the top of the
atmosphere over the solar constant: ``max(cos(zenith), 0)`` times Spencer's eccentricity
factor (about 1.034 in early January, 0.967 in early July).

This module imports nothing from the package: the synthetic data, the spec and
:mod:`xr_datamodule.extras` build on it.

Example:
    >>> t = np.array(["2020-06-20T12:00"], dtype="datetime64[ns]")
    >>> round(float(cos_solar_zenith(np.array([90.0]), np.array([0.0]), t)[0]), 3)  # sin(23.4)
    0.398
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import xarray as xr

__all__ = [
    "FORCINGS",
    "check_forcing_names",
    "coordinate_dims",
    "cos_solar_zenith",
    "insolation",
]

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


def check_forcing_names(forcings: Sequence[str]) -> None:
    """Raise a clear error for an unknown forcing name or one listed twice."""
    for name in forcings:
        if name not in FORCINGS:
            raise ValueError(f"forcings: unknown forcing {name!r}. Valid: {tuple(FORCINGS)}")
    twice = sorted({name for name in forcings if list(forcings).count(name) > 1})
    if twice:
        raise ValueError(f"forcings: {twice} listed more than once")
