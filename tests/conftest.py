"""Shared fixtures: small datasets made here, a zarr copy, and the real ERA-Interim file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xarray as xr

ERA_PATH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eraint_uvz.nc"


def make_dataset(n_time: int = 40, n_lat: int = 12, n_lon: int = 10, seed: int = 0) -> xr.Dataset:
    """Random data with an extra ``level`` dim on one variable and a descending latitude."""
    rng = np.random.default_rng(seed)
    time = pd.date_range("2020-01-01", periods=n_time, freq="D")
    lat = np.linspace(60, 30, n_lat)
    lon = np.arange(n_lon, dtype=float)
    return xr.Dataset(
        {
            "a": (("time", "lat", "lon"), rng.standard_normal((n_time, n_lat, n_lon))),
            "b": (("time", "lat", "lon"), rng.standard_normal((n_time, n_lat, n_lon), np.float32)),
            # Different dim order and an extra dim: folded into 3 channels.
            "c": (("level", "lon", "time", "lat"), rng.standard_normal((3, n_lon, n_time, n_lat))),
        },
        coords={"time": time, "lat": lat, "lon": lon, "level": [200, 500, 850]},
    )


# The synthetic forecasting set-up: two hours of t2m, u10, v10 -> t2m two hours on.
FORECAST = dict(
    input_vars=["t2m", "u10", "v10"],
    target_vars=["t2m"],
    input_dims={"time": 2, "lat": 32, "lon": 32},
    input_overlap={"time": 1, "lon": 16},
    target_dims={"time": 1, "lat": 32, "lon": 32},
    target_offset={"time": 2},
    batch_size=32,
)


@pytest.fixture(autouse=True)
def _statistics_cache(tmp_path_factory, monkeypatch):
    """Each test its own statistics cache: nothing computed by one test is found by another,
    nor left in the user's cache folder."""
    monkeypatch.setenv("XR_DATAMODULE_CACHE", str(tmp_path_factory.mktemp("stats_cache")))


@pytest.fixture
def small_ds() -> xr.Dataset:
    return make_dataset()


@pytest.fixture
def zarr_path(tmp_path: Path, small_ds: xr.Dataset) -> Path:
    path = tmp_path / "small.zarr"
    small_ds.chunk({"time": 7, "lat": 5}).to_zarr(path)
    return path


@pytest.fixture
def era_path() -> Path:
    if not ERA_PATH.exists():
        pytest.skip(f"real data not present at {ERA_PATH}")
    return ERA_PATH


def reference_windows(
    ds: xr.Dataset,
    names: list[str],
    window_dims: tuple[str, ...],
    starts: np.ndarray,
    size: tuple[int, ...],
) -> np.ndarray:
    """Brute force: one ``ds.isel`` per sample, channels stacked variable by variable."""
    samples = []
    for sample_starts in starts:
        window = ds.isel(
            {
                d: slice(int(s), int(s) + n)
                for d, s, n in zip(window_dims, sample_starts, size, strict=True)
            }
        )
        channels = []
        for name in names:
            var = window[name]
            extra = [d for d in var.dims if d not in window_dims]
            values = var.transpose(*extra, *window_dims).values
            channels.append(values.reshape(-1, *size))
        samples.append(np.concatenate(channels))
    return np.stack(samples)


def cpu_trainer(**kwargs) -> Any:
    """A quiet CPU trainer; ``kwargs`` override the defaults."""
    import lightning.pytorch as pl  # here: the reading tests also run where torch is not

    settings = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**settings, **kwargs})
