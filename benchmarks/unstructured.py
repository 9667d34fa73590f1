"""The unstructured scenario of ``benchmarks/throughput.py``: an anemoi store on an O96 grid.

AIFS's layout: one ``data(time, variable, ensemble, cell)`` array on a reduced Gaussian O96
grid (40,320 cells, latitude and longitude per cell), 80 variables along ``variable``, one
member, one time step per chunk, written in anemoi-datasets' format (zarr v2, Blosc, the
``_ARRAY_DIMENSIONS``, ``dates``, ``latitudes``, ``longitudes`` and ``variables`` it writes).
The task is AIFS's: the state at ``t`` in, the state at ``t + 6 h`` out, every start time,
batches of 4, shuffled, whole epochs.

Beside our loader (opened from the store's path, ``stats``-free) it runs the bar to beat: a
hand-written map Dataset (``zarr.open_group``, ``data[t]`` and ``data[t + 1]`` per sample,
``DataLoader(shuffle=True)``), what an anemoi user writes without anemoi's own loader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr
from bench_common import in_child
from downscaling import _seconds, epochs_of
from torch.utils.data import DataLoader, Dataset

N_CELLS, N_VARS, BATCH = 40_320, 80, 4
SAMPLE_BYTES = 2 * N_VARS * N_CELLS * 4


def write_store(path: Path, n_time: int) -> None:
    """Smooth travelling waves per variable on the cells, written as anemoi-datasets does."""
    if path.exists():
        return
    rng = np.random.default_rng(0)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, N_CELLS)))
    lon = rng.uniform(0, 360, N_CELLS)
    group = zarr.open_group(str(path), mode="w", zarr_format=2)

    def add(name, dims, **kwargs):
        array = group.create_array(name, **kwargs)
        array.attrs["_ARRAY_DIMENSIONS"] = list(dims)
        return array

    data = add(
        "data",
        ("time", "variable", "ensemble", "cell"),
        shape=(n_time, N_VARS, 1, N_CELLS),
        chunks=(1, N_VARS, 1, N_CELLS),
        dtype="float32",
        fill_value=np.nan,
    )
    phi, lam = np.radians(lat), np.radians(lon)
    amplitude, phase = rng.uniform(0.5, 2, N_VARS), rng.uniform(0, 2 * np.pi, N_VARS)
    for t in range(n_time):
        step = amplitude[:, None] * np.cos(phi) * np.sin(2 * lam + 0.05 * t + phase[:, None])
        data[t] = step[:, None, :].astype("float32")
    dates = np.datetime64("2020-01-01T00", "s") + np.arange(n_time) * np.timedelta64(6, "h")
    add("dates", ("time",), data=dates)
    add("latitudes", ("cell",), data=lat)
    add("longitudes", ("cell",), data=lon)
    group.attrs.update(variables=[f"v{k:02d}" for k in range(N_VARS)], frequency="6h")


class HandWritten(Dataset):
    """One ``data[t]`` and one ``data[t + 1]`` read per sample."""

    def __init__(self, path: Path) -> None:
        self.data = zarr.open_group(str(path), mode="r")["data"]
        self.n = self.data.shape[0] - 1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.data[t]), torch.from_numpy(self.data[t + 1])


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
        input_vars=["data"],
        input_dims={"time": 1, "cell": N_CELLS},
        target_offset={"time": 1},
        splits={"train": 1.0},
        batch_size=BATCH,
        num_workers=workers,
        load=False,
        seed=0,
    )
    dm.setup("fit")
    return dm.train_dataloader()


def ours_epochs(path: Path, workers: int, epochs: int) -> dict:
    return epochs_of(lambda: ours_loader(path, workers), epochs)


def hand_epochs(path: Path, workers: int, epochs: int) -> dict:
    return epochs_of(lambda: hand_written_loader(path, workers), epochs)


def run_unstructured(
    workdir: Path, workers_list: list[int], epochs: int, n_time: int
) -> list[dict]:
    """Ours against the hand-written Dataset, per worker count (each case in a child)."""
    path = workdir / "o96.zarr"
    write_store(path, n_time)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(
        f"\n== unstructured: anemoi store, O96 ({N_CELLS} cells), {N_VARS} variables along a "
        f"dim, {n_time} steps, chunks of one step; store {size / 1e9:.2f} GB, an epoch "
        f"delivers {(n_time - 1) * SAMPLE_BYTES / 1e9:.2f} GB =="
    )
    rows = []
    for workers in workers_list:
        hand = in_child(hand_epochs, path, workers, max(2, epochs - 1))
        ours = in_child(ours_epochs, path, workers, epochs)
        assert ours["shapes"] == ((N_VARS, 1, N_CELLS),) * 2, ours["shapes"]
        print(
            f"  {workers} workers: hand-written {hand['rate']:6.0f} MB/s (epochs "
            f"{_seconds(hand['epoch_seconds'])}); ours {ours['rate']:6.0f} MB/s = "
            f"{ours['rate'] / hand['rate']:.1f}x (epochs {_seconds(ours['epoch_seconds'])}, "
            f"added PSS {ours['added'] / 1e9:.2f} GB)"
        )
        rows.append(dict(workers=workers, hand=hand, ours=ours))
    return rows
