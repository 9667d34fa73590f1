"""Setup at archive scale: the statistics pass, its cache, and a sampled estimate.

A 0.25 deg global store (721 x 1440, float32, one step per chunk; 24 variables by default,
a few dozen hourly steps) is written once. Then, each in a fresh datamodule as a new ``fit``
would build it:

1. ``setup`` without normalisation (the floor: opening, checks, the index);
2. the first ``fit`` with ``normalize="zscore"`` and an empty statistics cache (the pass);
3. a second ``fit`` on the same store (the statistics from the cache file);
4. ``stats_sample={"every": 4}`` without the cache: time, and the error of the estimate
   against the full statistics in units of each channel's std, beside the largest standard
   error it reports.

Run: ``python benchmarks/archive_setup.py [--steps 32] [--variables 24] [--keep DIR]``.
Targets (issue 25): the second setup <= 10 % of the first and under 1 s.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from xr_datamodule import XarrayDataModule

N_LAT, N_LON = 721, 1440


def write_store(path: Path, n_time: int, n_vars: int) -> float:
    """A smooth field per variable with weather noise; returns the store's GB."""
    rng = np.random.default_rng(0)
    lat = np.linspace(90, -90, N_LAT)
    lon = np.arange(N_LON) * 0.25
    base = (np.cos(np.deg2rad(lat))[:, None] * np.sin(np.deg2rad(lon))[None, :]).astype("f4")
    coords = {
        "time": pd.date_range("2020-01-01", periods=n_time, freq="h"),
        "lat": lat,
        "lon": lon,
    }
    template = xr.Dataset(
        {
            f"v{k:02d}": (("time", "lat", "lon"), np.zeros((n_time, N_LAT, N_LON), "f4"))
            for k in range(n_vars)
        },
        coords=coords,
    ).chunk({"time": 1, "lat": -1, "lon": -1})
    template.to_zarr(path, compute=False, mode="w")
    for t in range(n_time):  # one step at a time: memory stays one step of every variable
        step = {
            name: (
                ("time", "lat", "lon"),
                (10 * (k + 1) * base + 0.1 * t + rng.standard_normal(base.shape, "f4"))[None],
            )
            for k, name in enumerate(template.data_vars)
        }
        xr.Dataset(step).to_zarr(path, region={"time": slice(t, t + 1)})
    return 4 * n_time * n_vars * N_LAT * N_LON / 1e9


def setup_seconds(store: Path, **options) -> tuple[float, XarrayDataModule]:
    began = time.perf_counter()
    dm = XarrayDataModule(
        store,
        input_vars=VARIABLES,
        input_dims={"time": 1, "lat": N_LAT, "lon": N_LON},
        splits={"train": 0.75, "val": 0.25},
        load=False,
        **options,
    )
    dm.setup("fit")
    return time.perf_counter() - began, dm


def main() -> None:
    global VARIABLES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--variables", type=int, default=24)
    parser.add_argument("--keep", type=Path, default=None, help="write the store here, keep it")
    args = parser.parse_args()
    VARIABLES = [f"v{k:02d}" for k in range(args.variables)]
    folder = Path(tempfile.mkdtemp(prefix="xr_stats_"))
    store = args.keep or folder / "quarter_degree.zarr"
    try:
        if not (store / "zarr.json").exists():
            began = time.perf_counter()
            gb = write_store(store, args.steps, args.variables)
            print(f"wrote {store} ({gb:.2f} GB) in {time.perf_counter() - began:.0f} s")
        cache = folder / "cache"
        floor, _ = setup_seconds(store, stats_cache=False)
        first, dm = setup_seconds(store, normalize="zscore", stats_cache=str(cache))
        full = dm.statistics
        second, again = setup_seconds(store, normalize="zscore", stats_cache=str(cache))
        sampled, estimated = setup_seconds(
            store, normalize="zscore", stats_cache=False, stats_sample={"every": 4}
        )
        estimate = estimated.pipeline.normalisation.estimate
        errors = [
            abs(np.array(estimate.mean[v]) - full.mean[v]) / np.array(full.std[v])
            for v in VARIABLES
        ]
        reported = estimate.largest_relative_error()
        train_gb = 4 * dm.split_sizes["train"] * args.variables * N_LAT * N_LON / 1e9
        print(f"training split: {dm.split_sizes['train']} steps, {train_gb:.2f} GB")
        print(f"setup without normalisation      {floor:7.2f} s")
        print(f"first fit (statistics computed)  {first:7.2f} s")
        print(f"   {dm.pipeline.statistics_origin}")
        print(f"second fit (statistics cached)   {second:7.2f} s")
        print(f"   {again.pipeline.statistics_origin}")
        print(f"second / first                   {second / first:7.3f}  (target <= 0.10, < 1 s)")
        print(
            f"sampled (every 4th step)         {sampled:7.2f} s  ({estimate.steps} of "
            f"{estimate.of_steps} steps)"
        )
        print(
            f"sampled mean's error vs full: largest {max(e.max() for e in errors):.4f} std; "
            f"largest reported standard error {reported[1]:.4f} std ({reported[0]})"
        )
        met = second <= 0.1 * first and second < 1
        print(f"target met: {met}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


VARIABLES: list[str] = []

if __name__ == "__main__":
    main()
