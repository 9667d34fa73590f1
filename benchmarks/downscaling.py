"""The downscaling scenario of ``benchmarks/throughput.py``: inputs and targets on two grids.

ClimateLearn's and CorrDiff's task: 8 variables on a coarse global grid (32 x 64, 5.625 deg)
in, 2 variables on a grid 4x finer along each axis (128 x 256, 1.40625 deg) out, the target
window the same region at the same time. Both grids live in one zarr v3 store, float32, one
time step per chunk. Every step is a sample (one global field in, one out), batches of 16,
shuffled, whole epochs.

Beside our loader it runs, in the same process and on the same store, the bar to beat: a
hand-written per-sample map Dataset (``zarr.open_group``, one ``[t]`` read per variable,
``DataLoader(shuffle=True)``), what a capable user writes for this task.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr
import zarr
from bench_common import RssMonitor, in_child
from torch.utils.data import DataLoader, Dataset

INPUTS = ["z500", "t850", "t2m", "u10", "v10", "msl", "q700", "tcwv"]
TARGETS = ["t2m_hr", "tp_hr"]
N_LAT, N_LON, FACTOR = 32, 64, 4
BATCH = 16
SAMPLE_BYTES = (len(INPUTS) * N_LAT * N_LON + len(TARGETS) * N_LAT * N_LON * FACTOR**2) * 4


def make_pair(n_time: int, seed: int = 0) -> xr.Dataset:
    """Smooth travelling waves on both grids (the fine one its own field, not a copy)."""
    rng = np.random.default_rng(seed)
    coarse, fine = 180 / N_LAT, 180 / (N_LAT * FACTOR)
    lat = 90 - coarse / 2 - coarse * np.arange(N_LAT)
    lon = coarse * np.arange(N_LON)
    lat_hr = 90 - fine / 2 - fine * np.arange(N_LAT * FACTOR)
    lon_hr = lon[0] - coarse / 2 + fine / 2 + fine * np.arange(N_LON * FACTOR)
    steps = np.arange(n_time, dtype=np.float32)[:, None, None]

    def waves(lats: np.ndarray, lons: np.ndarray) -> np.ndarray:
        phi, lam = np.deg2rad(lats)[:, None], np.deg2rad(lons)[None, :]
        amp, phase = rng.uniform(0.5, 2, 2), rng.uniform(0, 2 * np.pi, 2)
        return (
            amp[0] * np.cos(phi) * np.sin(2 * lam + 0.05 * steps + phase[0])
            + amp[1] * np.sin(3 * phi) * np.cos(5 * lam - 0.03 * steps + phase[1])
        ).astype(np.float32)

    data = {name: (("time", "lat", "lon"), waves(lat, lon)) for name in INPUTS}
    data |= {name: (("time", "lat_hr", "lon_hr"), waves(lat_hr, lon_hr)) for name in TARGETS}
    coords = {
        "time": pd.date_range("2020-01-01", periods=n_time, freq="6h"),
        "lat": lat,
        "lon": lon,
        "lat_hr": lat_hr,
        "lon_hr": lon_hr,
    }
    return xr.Dataset(data, coords=coords)


def write_pair(path: Path, n_time: int) -> None:
    if not path.exists():
        make_pair(n_time).chunk({"time": 1}).to_zarr(path, zarr_format=3, consolidated=False)


class HandWritten(Dataset):
    """What a capable user writes: one ``[t]`` read per variable per sample."""

    def __init__(self, path: Path) -> None:
        self.group = zarr.open_group(path, mode="r")
        self.n = self.group[INPUTS[0]].shape[0]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.stack([self.group[name][t] for name in INPUTS])
        y = np.stack([self.group[name][t] for name in TARGETS])
        return torch.from_numpy(x), torch.from_numpy(y)


def hand_written_loader(path: Path, workers: int) -> DataLoader:
    return DataLoader(
        HandWritten(path),
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(0),
    )


def ours_loader(path: Path, workers: int) -> DataLoader:
    from xr_datamodule import XarrayDataModule

    dm = XarrayDataModule(
        str(path),
        input_vars=INPUTS,
        target_vars=TARGETS,
        input_dims={"time": 1, "lat": N_LAT, "lon": N_LON},
        splits={"train": 1.0},
        batch_size=BATCH,
        num_workers=workers,
        load=False,
        seed=0,
    )
    dm.setup("fit")
    return dm.train_dataloader()


def epochs_of(make_loader: Callable[[], DataLoader], epochs: int) -> dict:
    """Whole epochs: the first (with worker start) apart, the rest as the steady rate."""
    gc.collect()
    baseline = RssMonitor.pss()
    loader = make_loader()
    seconds, nbytes = [], []
    shapes = None
    for _ in range(epochs):
        began, total = time.perf_counter(), 0
        for X, y in loader:
            total += X.nbytes + y.nbytes
            shapes = (tuple(X.shape[1:]), tuple(y.shape[1:]))
        seconds.append(time.perf_counter() - began)
        nbytes.append(total)
    steady = slice(1, None) if epochs > 1 else slice(None)
    return dict(
        rate=sum(nbytes[steady]) / sum(seconds[steady]) / 1e6,
        epoch_seconds=seconds,
        shapes=shapes,
        added=RssMonitor.pss() - baseline,
    )


def ours_epochs(path: Path, workers: int, epochs: int) -> dict:
    return epochs_of(lambda: ours_loader(path, workers), epochs)


def hand_epochs(path: Path, workers: int, epochs: int) -> dict:
    return epochs_of(lambda: hand_written_loader(path, workers), epochs)


def run_downscaling(workdir: Path, workers_list: list[int], epochs: int, n_time: int) -> list[dict]:
    """Ours against the hand-written Dataset, per worker count (each case in a child)."""
    path = workdir / "downscaling.zarr"
    write_pair(path, n_time)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(
        f"\n== downscaling: {len(INPUTS)} variables on {N_LAT} x {N_LON} -> {len(TARGETS)} on "
        f"{N_LAT * FACTOR} x {N_LON * FACTOR}, {n_time} steps, chunks of one step; store "
        f"{size / 1e9:.2f} GB, an epoch delivers {n_time * SAMPLE_BYTES / 1e9:.2f} GB =="
    )
    rows = []
    for workers in workers_list:
        hand = in_child(hand_epochs, path, workers, max(2, epochs - 1))
        ours = in_child(ours_epochs, path, workers, epochs)
        assert ours["shapes"] == (
            (len(INPUTS), 1, N_LAT, N_LON),
            (len(TARGETS), 1, N_LAT * FACTOR, N_LON * FACTOR),
        ), ours["shapes"]
        print(
            f"  {workers} workers: hand-written {hand['rate']:6.0f} MB/s (epochs "
            f"{_seconds(hand['epoch_seconds'])}); ours {ours['rate']:6.0f} MB/s = "
            f"{ours['rate'] / hand['rate']:.1f}x (epochs {_seconds(ours['epoch_seconds'])}, "
            f"added PSS {ours['added'] / 1e9:.2f} GB)"
        )
        rows.append(dict(workers=workers, hand=hand, ours=ours))
    return rows


def _seconds(values: list[float]) -> str:
    return " ".join(f"{value:.2f}" for value in values)
