"""The hires scenario of ``benchmarks/throughput.py``: big samples at 0.25 degrees.

24 variables on a 721 x 1440 grid (float32, one time step per chunk, zarr v3), 2 steps in ->
the next out: 299 MB a sample, batches of 1, shuffled, whole epochs. Beside our loader, a
hand-written per-sample zarr Dataset (three ``[t]`` reads per variable). Printed: delivered
MB/s of each, and the peak memory of our loader beyond the interpreter's own (the
proportional set size of the process, its workers and the fork server they share pages with,
sampled every 50 ms, over what they held before the loader was made: a forked worker's
resident size would count the interpreter it shares with its parent again), in samples: the
target is <= 3 samples with 0 workers and <= 3 per worker with workers.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from archive_setup import N_LAT, N_LON, write_store
from bench_common import RssMonitor, in_child
from downscaling import _seconds
from torch.utils.data import DataLoader, Dataset

N_VARS = 24
NAMES = [f"v{k:02d}" for k in range(N_VARS)]
SAMPLE_BYTES = 3 * N_VARS * N_LAT * N_LON * 4


class HandWritten(Dataset):
    def __init__(self, path: Path) -> None:
        self.group = zarr.open_group(str(path), mode="r")
        self.n = self.group[NAMES[0]].shape[0] - 2

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.stack([self.group[name][t : t + 2] for name in NAMES])
        y = np.stack([self.group[name][t + 2 : t + 3] for name in NAMES])
        return torch.from_numpy(x), torch.from_numpy(y)


def _loader(path: Path, workers: int, ours: bool) -> DataLoader:
    if not ours:
        return DataLoader(
            HandWritten(path), batch_size=1, shuffle=True, num_workers=workers,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    from xr_datamodule import XarrayDataModule

    dm = XarrayDataModule(
        str(path), input_vars=NAMES, input_dims={"time": 2, "lat": N_LAT, "lon": N_LON},
        input_overlap={"time": 1}, target_dims={"time": 1, "lat": N_LAT, "lon": N_LON},
        target_offset={"time": 2},
        splits={"train": 1.0}, batch_size=1, num_workers=workers, load=False, seed=0,
    )  # fmt: skip
    dm.setup("fit")
    return dm.train_dataloader()


def epochs(path: Path, workers: int, n_epochs: int, ours: bool) -> dict:
    gc.collect()
    before = RssMonitor.pss()
    seconds, nbytes = [], []
    with RssMonitor(interval=0.05, proportional=True) as monitor:
        loader = _loader(path, workers, ours)
        for _ in range(n_epochs):
            began, total = time.perf_counter(), 0
            for X, y in loader:
                total += X.nbytes + y.nbytes
            seconds.append(time.perf_counter() - began)
            nbytes.append(total)
        del loader
    steady = slice(1, None) if n_epochs > 1 else slice(None)
    return dict(
        rate=sum(nbytes[steady]) / sum(seconds[steady]) / 1e6,
        epoch_seconds=seconds,
        peak_samples=(monitor.peak - before) / SAMPLE_BYTES,
    )


def run_hires(workdir: Path, workers_list: list[int], n_epochs: int, n_time: int) -> list[dict]:
    path = workdir / "hires.zarr"
    if not path.exists():
        write_store(path, n_time, N_VARS)
    print(
        f"\n== hires: {N_VARS} variables on {N_LAT} x {N_LON}, {n_time} steps, one step per "
        f"chunk; 2 steps -> 1, a sample {SAMPLE_BYTES / 1e6:.0f} MB, batches of 1 =="
    )
    rows = []
    for workers in workers_list:
        hand = in_child(epochs, path, workers, 2, False)
        ours = in_child(epochs, path, workers, n_epochs, True)
        per = max(workers, 1)
        print(
            f"  {workers} workers: hand-written {hand['rate']:6.0f} MB/s; ours "
            f"{ours['rate']:6.0f} MB/s = {ours['rate'] / hand['rate']:.1f}x (epochs "
            f"{_seconds(ours['epoch_seconds'])}); peak memory beyond the interpreter: ours "
            f"{ours['peak_samples']:.1f} samples ({ours['peak_samples'] / per:.1f} per "
            f"process), hand-written {hand['peak_samples']:.1f}"
        )
        rows.append(dict(workers=workers, hand=hand, ours=ours))
    return rows
