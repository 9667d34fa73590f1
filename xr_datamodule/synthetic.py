"""The embedded default: a deterministic, weather-like ``xr.Dataset`` (no download).

Hourly 2 m temperature anomaly ``t2m`` (K) on a regional 0.5° grid, carried by a 10 m wind
(``u10``, ``v10``, m/s) that is divergence-free (from a drifting streamfunction) with a mean
westerly and a diurnal modulation, heated by a sun that moves west across the domain and
relaxed toward a latitude-dependent equilibrium. It is integrated with a semi-Lagrangian
scheme, so the next ``t2m`` truly depends on the current ``t2m`` and wind: a model that sees
them can beat persistence and a climatological mean.

Example:
    >>> ds = make_weather(n_time=48)
    >>> dict(ds.sizes)
    {'time': 48, 'lat': 32, 'lon': 64}
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd
import xarray as xr
from scipy.ndimage import map_coordinates

from xr_datamodule.forcings import insolation

__all__ = ["make_global", "make_weather"]

_GRID_KM = 50.0  # 0.5° at mid-latitudes, roughly
_SECONDS_PER_STEP = 3600.0


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], modes: int) -> np.ndarray:
    """Sum of random low-wavenumber waves on a periodic grid, unit standard deviation."""
    y, x = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    field = np.zeros(shape)
    for _ in range(modes):
        ky, kx = rng.integers(1, 4), rng.integers(1, 5)
        phase = rng.uniform(0, 2 * np.pi)
        field += np.cos(2 * np.pi * (ky * y / shape[0] + kx * x / shape[1]) + phase) / max(ky, kx)
    return field / field.std()


def _wind(
    step: int, y: np.ndarray, x: np.ndarray, shape: tuple[int, int], phases: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Divergence-free wind in m/s: a mean westerly plus the flow of a drifting streamfunction.

    ``psi = sin(a1) + 0.7 sin(a2)``; ``u = -dpsi/dy``, ``v = dpsi/dx`` in grid units, scaled
    so that the swirl peaks near 15 m/s, and modulated by +-30 % over the day.
    """
    drift = 2 * np.pi * step / (24 * 5)  # the pattern turns over in about five days
    ky, kx = 2 * np.pi / shape[0], 2 * np.pi / shape[1]
    arg1 = ky * y + kx * x + phases[0] + drift
    arg2 = 2 * ky * y - kx * x + phases[1] - 0.5 * drift
    u = -(ky * np.cos(arg1) + 0.7 * 2 * ky * np.cos(arg2))
    v = kx * np.cos(arg1) - 0.7 * kx * np.cos(arg2)
    scale = 15.0 / (ky * (1 + 1.4))
    diurnal = 1.0 + 0.3 * np.sin(2 * np.pi * step / 24)
    return 8.0 + scale * diurnal * u, scale * diurnal * v


def make_weather(
    n_time: int = 744,
    n_lat: int = 32,
    n_lon: int = 64,
    seed: int = 0,
    start: str = "2019-03-01",
) -> xr.Dataset:
    """Make the synthetic weather dataset.

    Args:
        n_time: Number of hourly steps (744 = March 2019).
        n_lat: Latitudes (0.5° apart, from 30°N).
        n_lon: Longitudes (0.5° apart, from 20°W).
        seed: Seed of the initial temperature and the wind pattern's phases.
        start: First time stamp.

    Returns:
        Dataset with float32 ``t2m``, ``u10``, ``v10`` on ``(time, lat, lon)``; a fresh deep
        copy on every call (the integration itself runs once per argument set).
    """
    return _integrate(n_time, n_lat, n_lon, seed, start).copy(deep=True)


@lru_cache(maxsize=4)
def _integrate(n_time: int, n_lat: int, n_lon: int, seed: int, start: str) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    shape = (n_lat, n_lon)
    y, x = np.meshgrid(np.arange(n_lat, dtype=float), np.arange(n_lon, dtype=float), indexing="ij")
    lat = 30.0 + 0.5 * np.arange(n_lat)
    lon = -20.0 + 0.5 * np.arange(n_lon)
    equilibrium = -6.0 * np.sin(np.pi * y / n_lat) ** 2 + 3.0
    phases = rng.uniform(0, 2 * np.pi, size=2)
    temperature = equilibrium + 4.0 * _smooth_field(rng, shape, modes=6)
    cells_per_ms = _SECONDS_PER_STEP / (_GRID_KM * 1000.0)
    t2m = np.empty((n_time, *shape), dtype=np.float32)
    u10 = np.empty_like(t2m)
    v10 = np.empty_like(t2m)
    for step in range(n_time):
        u, v = _wind(step, y, x, shape, phases)
        t2m[step], u10[step], v10[step] = temperature, u, v
        # Semi-Lagrangian advection: the value arriving here left from upstream.
        departure = np.stack([y - v * cells_per_ms, x - u * cells_per_ms])
        advected = map_coordinates(temperature, departure, order=1, mode="grid-wrap")
        hour_angle = 2 * np.pi * ((step % 24) / 24 + x / n_lon)
        heating = 0.6 * np.cos(hour_angle)
        temperature = advected + heating - (advected - equilibrium) / 48.0
    times = pd.date_range(start, periods=n_time, freq="h")
    coords = {"time": times, "lat": ("lat", lat), "lon": ("lon", lon)}
    dims = ("time", "lat", "lon")
    return xr.Dataset(
        {
            "t2m": (dims, t2m, {"long_name": "2 m temperature anomaly", "units": "K"}),
            "u10": (dims, u10, {"long_name": "10 m eastward wind", "units": "m s-1"}),
            "v10": (dims, v10, {"long_name": "10 m northward wind", "units": "m s-1"}),
        },
        coords=coords,
        attrs={"title": "xr_datamodule synthetic weather", "source": "xr_datamodule.synthetic"},
    )


def make_global(
    n_time: int = 480,
    n_lat: int = 32,
    n_lon: int = 64,
    levels: tuple[int, ...] = (500, 850, 1000),
    seed: int = 0,
    start: str = "2020-01-01",
    freq: str = "6h",
) -> xr.Dataset:
    """Synthetic global data shaped like ERA5 / WeatherBench 2: levels, statics, real dates.

    A deterministic toy planet on a regular global grid (cell-centred latitudes, longitudes
    from 0 east): eastward-travelling waves on a latitudinal temperature profile, heated by
    the real sun (:func:`~xr_datamodule.extras.insolation` at each time and place, more over
    land) and cooled with height above the orography; geopotential and winds follow the
    temperature (hydrostatic thickness, geostrophic-like winds), and precipitation falls
    where the waves rise over warm land. The next step depends on the current state and on
    the (known) insolation, so forcings and static fields carry information a model can use.

    Args:
        n_time: Steps (480 steps of 6 h = 120 days).
        n_lat: Latitudes, from pole to pole.
        n_lon: Longitudes, all around.
        levels: Pressure levels in hPa (``level`` dim).
        seed: Seed of the land mask, orography and wave phases.
        start: First time stamp.
        freq: Time step.

    Returns:
        float32 ``t``, ``u``, ``v``, ``z`` on ``(time, level, lat, lon)``; ``t2m``, ``msl``,
        ``tp`` on ``(time, lat, lon)``; static ``lsm`` and ``orography`` on ``(lat, lon)``.

    Example:
        >>> ds = make_global(n_time=8)
        >>> dict(ds.t.sizes), dict(ds.lsm.sizes)
        ({'time': 8, 'level': 3, 'lat': 32, 'lon': 64}, {'lat': 32, 'lon': 64})
    """
    return _global(n_time, n_lat, n_lon, tuple(levels), seed, start, freq).copy(deep=True)


@lru_cache(maxsize=4)
def _global(
    n_time: int,
    n_lat: int,
    n_lon: int,
    levels: tuple[int, ...],
    seed: int,
    start: str,
    freq: str,
) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    step = 180.0 / n_lat
    lat = -90 + step / 2 + step * np.arange(n_lat)
    lon = 360.0 / n_lon * np.arange(n_lon)
    times = pd.date_range(start, periods=n_time, freq=freq)
    lat2, lon2 = np.meshgrid(lat, lon, indexing="ij")
    land = _smooth_field(rng, (n_lat, n_lon), modes=5)
    lsm = (land > 0.4).astype(np.float32)
    orography = (np.maximum(land - 0.4, 0) * 1500.0 * lsm).astype(np.float32)  # metres
    sun = insolation(
        lat2[None], lon2[None], times.values.astype("datetime64[ns]")[:, None, None]
    )  # (time, lat, lon)
    hours = (times - times[0]).total_seconds().values[:, None, None] / 3600.0
    phases = rng.uniform(0, 2 * np.pi, size=3)
    envelope = np.cos(np.radians(lat2))[None]
    waves = envelope * (
        np.cos(np.radians(3 * lon2[None]) - 2 * np.pi * hours / 96 + phases[0])
        + 0.6
        * np.sin(np.radians(5 * lon2[None] + 20 * lat2[None]) - 2 * np.pi * hours / 60 + phases[1])
    )
    t2m = (
        300.0
        - 45.0 * np.sin(np.radians(lat2))[None] ** 2
        + 6.0 * waves
        + 8.0 * sun * (1 + lsm)[None]
        - 0.0065 * orography[None]
    )
    pressure = np.asarray(levels, dtype=np.float64)
    height = 7000.0 * np.log(1013.25 / pressure)  # metres, scale height 7 km
    t = t2m[:, None] - 0.0065 * height[None, :, None, None]
    thickness = (
        29.3 * t.mean(axis=(2, 3), keepdims=True) * np.log(1013.25 / pressure)[None, :, None, None]
    )
    z = 9.80665 * (thickness + 80.0 * waves[:, None] * (1 + height[None, :, None, None] / 7000))
    grad_lon = np.gradient(z, axis=3)
    grad_lat = np.gradient(z, axis=2)
    coriolis = np.sign(lat2) * np.maximum(np.abs(np.sin(np.radians(lat2))), 0.2)
    u = (-grad_lat / (coriolis * 400.0) + 10.0 * envelope[:, None]).astype(np.float32)
    v = (grad_lon / (coriolis * 400.0)).astype(np.float32)
    msl = 101325.0 - 800.0 * waves - 400.0 * sun * lsm[None]
    rising = np.maximum(
        np.sin(np.radians(5 * lon2[None] + 20 * lat2[None]) - 2 * np.pi * hours / 60 + phases[1]), 0
    )
    tp = (1e-3 * rising * (0.3 + lsm[None]) * (t2m > 280)).astype(np.float32)
    dims3, dims4 = ("time", "lat", "lon"), ("time", "level", "lat", "lon")
    f32 = np.float32
    return xr.Dataset(
        {
            "t": (dims4, t.astype(f32), {"long_name": "temperature", "units": "K"}),
            "u": (dims4, u, {"long_name": "eastward wind", "units": "m s-1"}),
            "v": (dims4, v, {"long_name": "northward wind", "units": "m s-1"}),
            "z": (dims4, z.astype(f32), {"long_name": "geopotential", "units": "m2 s-2"}),
            "t2m": (dims3, t2m.astype(f32), {"long_name": "2 m temperature", "units": "K"}),
            "msl": (
                dims3,
                msl.astype(f32),
                {"long_name": "mean sea level pressure", "units": "Pa"},
            ),
            "tp": (dims3, tp, {"long_name": "total precipitation", "units": "m"}),
            "lsm": (("lat", "lon"), lsm, {"long_name": "land-sea mask", "units": "1"}),
            "orography": (("lat", "lon"), orography, {"long_name": "orography", "units": "m"}),
        },
        coords={
            "time": times,
            "level": ("level", np.asarray(levels), {"units": "hPa"}),
            "lat": ("lat", lat, {"standard_name": "latitude", "units": "degrees_north"}),
            "lon": ("lon", lon, {"standard_name": "longitude", "units": "degrees_east"}),
        },
        attrs={"title": "xr_datamodule synthetic global", "source": "xr_datamodule.synthetic"},
    )
