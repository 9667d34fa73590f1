"""The global-model scenario of ``benchmarks/throughput.py``: full-field samples.

What most of our users train (GraphCast-, FourCastNet-, Pangu-, AIFS-like models): every sample
is the whole field of 6 upper-air variables on 13 levels plus 4 surface variables (82
channels) on a 64 x 128 grid, at 2 input steps, and the target is the next step. The store is
zarr v3, float32, one time step per chunk (full levels and space), as the public ARCO-ERA5
and WeatherBench 2 stores are; a variant has chunks of 4 steps. Fields are smooth waves that
travel in time (compressible, like real ones). Batches of 8, shuffled.

Beside our loader it runs, in the same process and on the same store:

* the bar to beat: a hand-written per-sample map Dataset (``zarr.open_group``, one slice
  ``[t:t+3]`` per variable, ``DataLoader(shuffle=True)``), what a capable user writes;
* the decode-once limit: every chunk of the store decoded once by zarr with one thread,
  expressed as bytes delivered per epoch (each chunk feeds three samples);
* how many chunk decodes an epoch made per chunk in the store, counted inside zarr's codec
  for the hand-written Dataset and per cell decoded for ours (also in DataLoader workers);
* a measure of batch diversity: :meth:`XarrayDataModule.batch_spread` (the spread of the
  time positions within a batch against a full shuffle's) and the distinct weeks per batch.

Whole epochs are timed: a chunk-aware order looks faster than it is over a short run.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
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

UPPER = ["z", "t", "u", "v", "q", "w"]
SURFACE = ["t2m", "u10", "v10", "msl"]
VARIABLES = UPPER + SURFACE
LEVELS = 13
N_LAT, N_LON = 64, 128
INPUT_STEPS = 2
BATCH = 8
N_CHANNELS = len(UPPER) * LEVELS + len(SURFACE)
STEP_BYTES = N_CHANNELS * N_LAT * N_LON * 4
SAMPLE_BYTES = (INPUT_STEPS + 1) * STEP_BYTES


def make_global(n_time: int = 730, seed: int = 0) -> xr.Dataset:
    """Smooth travelling waves on a global 64 x 128 grid, 12-hourly, 82 channels."""
    rng = np.random.default_rng(seed)
    lat = np.linspace(-87.19, 87.19, N_LAT)
    lon = np.arange(N_LON) * 360.0 / N_LON
    level = np.linspace(50, 1000, LEVELS).astype(np.int64)
    phi = np.deg2rad(lat)[:, None]
    lam = np.deg2rad(lon)[None, :]
    steps = np.arange(n_time)[:, None, None]

    def field(levels: int) -> np.ndarray:
        amp = rng.uniform(0.5, 2.0, 3)
        phase = rng.uniform(0, 2 * np.pi, 3)
        waves = (
            amp[0] * np.cos(phi) * np.sin(2 * lam + 0.05 * steps + phase[0])
            + amp[1] * np.sin(3 * phi) * np.cos(3 * lam - 0.03 * steps + phase[1])
            + amp[2] * np.cos(phi) ** 2 * np.sin(0.0172 * steps + phase[2])
        ).astype(np.float32)
        if not levels:
            return waves
        scale = (1 + 0.1 * np.arange(levels, dtype=np.float32))[None, :, None, None]
        return waves[:, None] * scale + np.arange(levels, dtype=np.float32)[None, :, None, None]

    data = {name: (("time", "level", "lat", "lon"), field(LEVELS)) for name in UPPER}
    data |= {name: (("time", "lat", "lon"), field(0)) for name in SURFACE}
    time_ = pd.date_range("2020-01-01", periods=n_time, freq="12h")
    return xr.Dataset(data, coords={"time": time_, "level": level, "lat": lat, "lon": lon})


def alternating_cli(doc: str, default_dir: str) -> tuple[argparse.Namespace, Path]:
    """Arguments of a script that alternates two settings on the global store of one step per
    chunk (``--epochs``, ``--rounds``, ``--dir``), and that store, written if missing."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path(default_dir))
    args = parser.parse_args()
    path = args.dir / "global_t1.zarr"
    if not path.exists():
        args.dir.mkdir(parents=True, exist_ok=True)
        write_store(path, 730, 1)
    return args, path


def write_store(path: Path, n_time: int, chunk_steps: int) -> None:
    if not path.exists():
        make_global(n_time).chunk({"time": chunk_steps}).to_zarr(
            path, zarr_format=3, consolidated=False
        )


# ----------------------------------------------------------------------------- counting decodes


class DecodeCounter:
    """Counts chunk decodes, in this process and its children (also DataLoader workers).

    Two counts, since the paths decode differently: chunks that zarr-python's zstd codec
    decodes (the hand-written Dataset), and cells our reader decodes (in these stores each
    is one chunk of every variable, whatever decodes it: chunk files, TensorStore, zarr or
    xarray). The counters live in shared memory; a child process calls :meth:`install`
    again.
    """

    def __init__(self) -> None:
        context = multiprocessing.get_context("forkserver")  # the context of bench_common
        self.chunks = context.Value("q", 0)
        self.cells = context.Value("q", 0)
        self.install()

    def install(self) -> None:
        """Count in this process (patches zarr's zstd codec and our reader, once)."""
        from zarr.codecs.zstd import ZstdCodec

        from xr_datamodule.arena import CellArena

        if getattr(CellArena, "_counted", False):
            return
        chunks, cells = self.chunks, self.cells
        decode_chunk = ZstdCodec._decode_sync
        make_job = CellArena._job

        def counted_chunk(codec: ZstdCodec, *args: object, **kwargs: object) -> object:
            with chunks.get_lock():
                chunks.value += 1
            return decode_chunk(codec, *args, **kwargs)

        def counted_cells(arena: CellArena, *args: object, **kwargs: object) -> object:
            # One job per cell decoded, whichever thread (read or prefetch) decodes it.
            with cells.get_lock():
                cells.value += 1
            return make_job(arena, *args, **kwargs)

        ZstdCodec._decode_sync = counted_chunk  # type: ignore[method-assign]
        CellArena._job = counted_cells  # type: ignore[method-assign]
        CellArena._counted = True  # type: ignore[attr-defined]

    def reset(self) -> None:
        for count in (self.chunks, self.cells):
            with count.get_lock():
                count.value = 0

    def per_chunk(self, path: Path, ours: bool) -> float:
        """Decodes per chunk of the store since the last reset."""
        if ours:
            return self.cells.value / cells_in_store(path)
        return self.chunks.value / chunks_in_store(path)


def chunks_in_store(path: Path) -> int:
    group = zarr.open_group(path, mode="r")
    return sum(int(np.prod(group[name].cdata_shape)) for name in VARIABLES)


def cells_in_store(path: Path) -> int:
    """Chunks along time: each holds one chunk of every variable (full levels and space)."""
    return int(zarr.open_group(path, mode="r")[VARIABLES[0]].cdata_shape[0])


# ----------------------------------------------------------------------------- the paths


SLAB = 64  # time steps the decode-once limits decode at a time, into one reused buffer


def _slabs(shape: tuple[int, ...]) -> list[slice]:
    return [slice(t, min(t + SLAB, shape[0])) for t in range(0, shape[0], SLAB)]


def decode_once(path: Path) -> float:
    """Seconds for zarr-python to decode every chunk of the store once, one thread.

    Slabs of whole chunks are decoded into one reused buffer per variable (its pages
    touched beforehand): the figure is the decoder's, not that of page faults in a fresh
    allocation.
    """
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import cleanup_resources

    cleanup_resources()  # zarr's thread pool is made anew, with one thread
    try:
        with zarr.config.set({"threading.max_workers": 1}):
            group = zarr.open_group(path, mode="r")
            arrays = [group[name] for name in VARIABLES]
            buffers = [np.ones((SLAB, *array.shape[1:]), array.dtype) for array in arrays]
            prototype = default_buffer_prototype()
            began = time.perf_counter()
            for array, buffer in zip(arrays, buffers, strict=True):
                for slab in _slabs(array.shape):
                    out = prototype.nd_buffer.from_numpy_array(buffer[: slab.stop - slab.start])
                    array.get_orthogonal_selection((slab,), out=out)
            return time.perf_counter() - began
    finally:
        cleanup_resources()  # and back to zarr's default for what follows


class HandWritten(Dataset):
    """What a capable user writes: one ``[t:t+3]`` slice per variable per sample."""

    def __init__(self, path: Path) -> None:
        self.group = zarr.open_group(path, mode="r")
        self.n = self.group[VARIABLES[0]].shape[0] - INPUT_STEPS

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = []
        for name in VARIABLES:
            values = self.group[name][t : t + INPUT_STEPS + 1]
            if values.ndim == 3:
                values = values[:, None]
            parts.append(values.transpose(1, 0, 2, 3))  # (level, time, lat, lon)
        window = np.concatenate(parts)
        return (
            torch.from_numpy(np.ascontiguousarray(window[:, :INPUT_STEPS])),
            torch.from_numpy(np.ascontiguousarray(window[:, INPUT_STEPS:])),
        )


def hand_written_loader(path: Path, workers: int) -> DataLoader:
    return DataLoader(
        HandWritten(path),
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(0),
    )


def ours_module(path: Path, workers: int, shuffle: str | None, **options: object) -> object:
    from xr_datamodule import XarrayDataModule

    extra = dict(options) if shuffle is None else {"shuffle": shuffle, **options}
    return XarrayDataModule(
        str(path),
        input_vars=VARIABLES,
        input_dims={"time": INPUT_STEPS, "lat": N_LAT, "lon": N_LON},
        input_overlap={"time": INPUT_STEPS - 1},  # a sample at every step
        target_dims={"time": 1, "lat": N_LAT, "lon": N_LON},
        target_offset={"time": INPUT_STEPS},
        splits={"train": 1.0},
        batch_size=BATCH,
        num_workers=workers,
        load=False,
        seed=0,
        **extra,
    )


def decode_once_tensorstore(path: Path) -> float:
    """Seconds for TensorStore (the fastest other reader) to decode every chunk, one thread.

    Like :func:`decode_once`, into one reused buffer per variable. Run it in a child process
    (:func:`bench_common.in_child`): TensorStore's threads do not survive a fork.
    """
    import tensorstore as ts

    # One decoding thread; file reads keep TensorStore's default concurrency (with one
    # reading thread too the limit came out lower, i.e. easier to meet).
    context = ts.Context(
        {"data_copy_concurrency": {"limit": 1}, "cache_pool": {"total_bytes_limit": 0}}
    )
    arrays = [
        ts.open(
            {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / name)}},
            read=True,
            context=context,
        ).result()
        for name in VARIABLES
    ]
    buffers = [np.ones((SLAB, *array.shape[1:]), np.float32) for array in arrays]
    began = time.perf_counter()
    for array, buffer in zip(arrays, buffers, strict=True):
        for slab in _slabs(tuple(array.shape)):
            target = ts.array(buffer[: slab.stop - slab.start], copy=False, write=True)
            target.write(array[slab]).result()
    return time.perf_counter() - began


def time_epochs(
    make_loader: Callable[[], object], epochs: int, counter: DecodeCounter, path: Path, ours: bool
) -> dict:
    """Whole epochs: the first (with worker start) apart, the rest as the steady rate."""
    gc.collect()
    baseline = RssMonitor.pss()
    loader = make_loader()
    seconds, nbytes, decodes, memory = [], [], [], []
    for _ in range(epochs):
        counter.reset()
        began = time.perf_counter()
        total = 0
        for X, y in loader:
            total += X.nbytes + y.nbytes
        seconds.append(time.perf_counter() - began)
        nbytes.append(total)
        decodes.append(counter.per_chunk(path, ours))
        memory.append(RssMonitor.pss())
    steady = slice(1, None) if epochs > 1 else slice(None)
    return dict(
        rate=sum(nbytes[steady]) / sum(seconds[steady]) / 1e6,
        first_epoch=seconds[0],
        epoch_seconds=seconds,
        decodes=float(np.mean(decodes[steady])),
        added=max(memory) - baseline,
        drift=(max(memory) - min(memory)) / max(min(memory), 1) * 100,
    )


def ours_epochs(
    path: Path, workers: int, shuffle: str, epochs: int, counter: DecodeCounter
) -> dict:
    """Our training loader over whole epochs, with its batch diversity (in a child process)."""
    counter.install()
    dm = ours_module(path, workers, shuffle)
    dm.setup("fit")
    result = time_epochs(dm.train_dataloader, epochs, counter, path, ours=True)
    batches = dm.train_batches(epoch=1)
    positions = dm.indices["train"].starts(np.arange(dm.split_sizes["train"]))[:, 0]
    reader = dm.datasets["train"].reader
    result.update(
        spread=dm.batch_spread("time", epoch=1),
        weeks=distinct_weeks(batches, positions),
        layout=dm.chunk_layout() if dm.train_shuffle == "chunks" else None,
        cache_cells=reader.cache_cells,
        cache_bytes=reader.cache_cells * reader.grid.cell_bytes,
        decoder=type(reader.decoder).__name__,
    )
    return result


def run_global(
    workdir: Path,
    chunk_steps: int,
    workers_list: list[int],
    epochs: int,
    n_time: int,
    counter: DecodeCounter,
) -> list[dict]:
    """Every path on one store; the rows of the report."""
    path = workdir / f"global_t{chunk_steps}.zarr"
    write_store(path, n_time, chunk_steps)
    name = f"global, chunks of {chunk_steps} step{'s' if chunk_steps > 1 else ''}"
    print(f"\n== {name} ==")
    epoch_bytes = (n_time - INPUT_STEPS) * SAMPLE_BYTES
    zarr_seconds = min(decode_once(path) for _ in range(2))
    ts_seconds = min(in_child(decode_once_tensorstore, path) for _ in range(2))
    limits = {
        "zarr": epoch_bytes / zarr_seconds / 1e6,
        "tensorstore": epoch_bytes / ts_seconds / 1e6,
    }
    print(
        f"  store {sum(f.stat().st_size for f in path.rglob('*') if f.is_file()) / 1e9:.2f} GB"
        f" on disk, {n_time} steps; an epoch delivers {epoch_bytes / 1e9:.2f} GB"
    )
    print(
        f"  decode-once limit, one thread: zarr-python {zarr_seconds:.2f} s -> "
        f"{limits['zarr']:.0f} MB/s delivered; TensorStore {ts_seconds:.2f} s -> "
        f"{limits['tensorstore']:.0f} MB/s delivered"
    )
    rows = []
    for workers in workers_list:
        hand = time_epochs(
            lambda workers=workers: hand_written_loader(path, workers),
            max(2, epochs - 1),
            counter,
            path,
            ours=False,
        )
        print(
            f"  hand-written Dataset, {workers} workers: {hand['rate']:7.0f} MB/s, decodes per"
            f" chunk {hand['decodes']:.2f}, epochs {_seconds(hand['epoch_seconds'])}"
        )
        for shuffle in ("chunks", "full"):
            ours = in_child(ours_epochs, path, workers, shuffle, epochs, counter)
            print(
                f"  ours shuffle={shuffle!r:8s} {workers} workers: {ours['rate']:7.0f} MB/s"
                f" = {ours['rate'] / hand['rate']:.1f}x hand-written,"
                f" {ours['rate'] / limits['zarr']:.2f}x zarr limit,"
                f" {ours['rate'] / limits['tensorstore']:.2f}x TensorStore limit;"
                f" decodes per chunk {ours['decodes']:.2f}; spread {ours['spread']:.2f},"
                f" {ours['weeks']:.1f} weeks per batch; layout {ours['layout']},"
                f" cache {ours['cache_cells']} cells ({ours['cache_bytes'] / 1e6:.0f} MB),"
                f" added PSS {ours['added'] / 1e9:.2f} GB (drift {ours['drift']:.1f} %);"
                f" {ours['decoder']}; epochs {_seconds(ours['epoch_seconds'])}"
            )
            rows.append(
                dict(
                    store=name,
                    workers=workers,
                    shuffle=shuffle,
                    ours=ours,
                    hand=hand,
                    limits=limits,
                    epochs=epochs,
                    epoch_bytes=epoch_bytes,
                )
            )
    return rows


def _seconds(values: list[float]) -> str:
    return " ".join(f"{value:.2f}" for value in values)


# ----------------------------------------------------------------------------- batch diversity


def distinct_weeks(batches: list[np.ndarray], positions: np.ndarray) -> float:
    """Mean number of distinct 7-day periods (14 steps of 12 h) among a batch's samples."""
    full = [batch for batch in batches if len(batch) == BATCH]
    return float(np.mean([len(np.unique(positions[batch] // 14)) for batch in full]))
