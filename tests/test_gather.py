"""Gathered batches equal ``ds.isel`` of the same windows, for numpy, zarr and netCDF data."""

from __future__ import annotations

import multiprocessing
import threading

import numpy as np
import pytest
import xarray as xr

from tests.conftest import reference_windows
from xr_datamodule import XarrayDataModule, cells
from xr_datamodule.gather import ChunkedReader, InMemoryReader, gather_windows
from xr_datamodule.loaders import _init_worker
from xr_datamodule.resources import usable_cores

CONFIG = dict(
    input_vars=["c", "a"],
    target_vars=["b"],
    input_dims={"time": 3, "lat": 4, "lon": 5},
    input_overlap={"time": 1, "lon": 2},
    target_dims={"time": 1, "lat": 4, "lon": 5},
    target_offset={"time": 3},
    splits={"train": 0.6, "val": 0.2, "test": 0.2},
    batch_size=7,
)


def check_random_batches(dm: XarrayDataModule, reference: xr.Dataset, split: str) -> None:
    dataset = dm.datasets[split]
    rng = np.random.default_rng(1)
    ids = rng.choice(len(dataset), size=min(20, len(dataset)), replace=False)
    batch = dataset.__getitems__(ids)
    starts = dm.indices[split].starts(ids)
    geometry = dm.geometry
    expected_x = reference_windows(
        reference, dm.input_vars, geometry.dims, starts, geometry.input_size
    )
    expected_y = reference_windows(
        reference,
        dm.target_vars,
        geometry.dims,
        starts + np.asarray(geometry.target_offset),
        geometry.target_size,
    )
    assert batch.inputs.dtype == np.float32
    np.testing.assert_array_equal(batch.inputs, expected_x.astype(np.float32))
    np.testing.assert_array_equal(batch.targets, expected_y.astype(np.float32))


def test_numpy_backed_batches_equal_isel(small_ds):
    dm = XarrayDataModule(small_ds, **CONFIG)
    dm.setup()
    assert isinstance(dm.datasets["train"].reader, InMemoryReader)
    # Window axes follow the first input variable: c is (level, lon, time, lat).
    assert dm.window_dims == ("lon", "time", "lat")
    assert dm.input_shape == (3 + 1, 5, 3, 4)
    assert dm.input_channel_names == ["c[level=200]", "c[level=500]", "c[level=850]", "a"]
    for split in ("train", "val", "test"):
        check_random_batches(dm, small_ds, split)


def lazy(ds) -> bool:
    return not any(ds[name].variable._in_memory for name in ds.data_vars)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("opened", ["path", "dask"])
def test_zarr_batches_equal_isel_and_stay_lazy(small_ds, zarr_path, opened, workers):
    # By path the store opens without dask; an xr.open_zarr Dataset comes dask-backed.
    data = str(zarr_path) if opened == "path" else xr.open_zarr(zarr_path)
    dm = XarrayDataModule(data, **CONFIG, load=False, num_workers=workers)
    dm.setup()
    assert lazy(dm.source)
    assert (dm.source["a"].chunks is not None) == (opened == "dask")
    reader = dm.datasets["train"].reader
    assert isinstance(reader, ChunkedReader)
    # Without workers the main process decodes a batch's missing cells in parallel threads.
    assert reader.decode_threads == (min(4, usable_cores()) if workers == 0 else 1)
    # Cells are the chunks of 7 along time: samples that reach into the next cell are
    # gathered with the rest of the batch.
    assert reader.grid.edges[dm.window_dims.index("time")].tolist() == [0, 7, 14, 21, 28, 35, 40]
    for split in ("train", "test"):
        check_random_batches(dm, small_ds, split)
    # Reading batches loaded nothing into the source.
    assert lazy(dm.source)


def test_a_failed_decode_leaves_no_cell_behind(small_ds, zarr_path, monkeypatch):
    # Two cached cells for six: reading the whole split evicts, and a failure mid-way
    # must hand the evicted slot back, not leave it to be handed out twice.
    settings = {**CONFIG, "splits": {"train": 1.0}}
    dm = XarrayDataModule(str(zarr_path), **settings, load=False, num_workers=0)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    reader = dataset.reader
    assert isinstance(reader, ChunkedReader) and reader.grid.cells_per_sample == 2
    reader.resize_cache(2)
    assert int(np.prod(reader.grid.grid_shape)) == 6
    check_random_batches(dm, small_ds, "train")  # the cache is full now
    read_before = reader.cells_read
    calls = []

    def failing(jobs):
        calls.append(jobs)
        raise OSError("store went away")

    monkeypatch.setattr(reader.decoder, "decode", failing)
    with pytest.raises(OSError, match="store went away"):
        dataset.__getitems__(np.arange(len(dataset)))
    assert calls and reader.cells_read == read_before
    assert len(reader.arena.slots) + len(reader.arena.free) == reader.cache_cells
    monkeypatch.undo()
    for _ in range(3):  # the slots decode correctly again, whatever is evicted
        check_random_batches(dm, small_ds, "train")
    np.testing.assert_array_equal(
        dataset.__getitems__(np.arange(len(dataset))).inputs,
        reference_windows(
            small_ds,
            dm.input_vars,
            dm.geometry.dims,
            dm.indices["train"].starts(np.arange(len(dataset))),
            dm.geometry.input_size,
        ).astype(np.float32),
    )


def test_netcdf_batches_equal_isel(small_ds, tmp_path):
    path = tmp_path / "small.nc"
    small_ds.to_netcdf(path)
    dm = XarrayDataModule(str(path), **CONFIG, load=False)
    dm.setup("fit")
    assert isinstance(dm.datasets["train"].reader, ChunkedReader)
    check_random_batches(dm, small_ds, "train")


def test_load_auto_loads_a_small_store_and_load_false_reads_numpy_by_cells(small_ds, zarr_path):
    loaded = XarrayDataModule(str(zarr_path), **CONFIG)
    loaded.setup("fit")
    assert loaded.loads_into_memory and isinstance(loaded.datasets["train"].reader, InMemoryReader)
    check_random_batches(loaded, small_ds, "train")
    # The source itself stays lazy: loading stacks a copy of the selected variables.
    assert lazy(loaded.source)

    cells = XarrayDataModule(small_ds, **CONFIG, load=False)
    cells.setup("fit")
    assert isinstance(cells.datasets["train"].reader, ChunkedReader)
    check_random_batches(cells, small_ds, "train")


def test_chunked_reader_straddling_samples_and_bounded_cache(small_ds, tmp_path, monkeypatch):
    monkeypatch.setattr(cells, "MIN_CELL_BYTES", 0)  # keep the small chunks as cells
    path = tmp_path / "thin.zarr"
    small_ds.chunk({"time": 4, "lat": 3, "lon": 2}).to_zarr(path)
    dm = XarrayDataModule(
        str(path),
        input_vars=["a", "c"],
        input_dims={"time": 2, "lat": 2, "lon": 3},
        target_vars=["b"],
        target_dims={"time": 1, "lat": 2, "lon": 3},
        target_offset={"time": -1},
        splits={"train": 1.0},
        load=False,
        shuffle_chunks=1,
    )
    dm.setup("fit")
    reader = dm.datasets["train"].reader
    # Samples cross cell edges along time (cells of 4) and lat (cells of 3): a span touches
    # up to 2 x 2 cells. Along lon (the last dim) chunks of 2 are merged: 4 x 2 positions.
    assert isinstance(reader, ChunkedReader) and reader.grid.cells_per_sample == 4
    assert [len(e) - 1 for e in reader.grid.edges] == [10, 4, 1]
    dataset = dm.datasets["train"]
    geometry = dm.geometry
    # The whole split at once, then shuffled with the arena as small as one sample's cells:
    # read in waves that fit; then smaller than a sample: read cell by cell.
    shuffled = np.random.default_rng(0).permutation(len(dataset))
    for ids, cache in [
        (np.arange(len(dataset)), None),
        (shuffled, 4),
        (shuffled, 2),
        (shuffled, 1),
        (np.arange(len(dataset))[::-1], 3),
    ]:
        if cache is not None:
            reader.resize_cache(cache)
        batch = dataset.__getitems__(ids)
        starts = dm.indices["train"].starts(ids)
        np.testing.assert_array_equal(
            batch.inputs,
            reference_windows(
                small_ds, ["a", "c"], geometry.dims, starts, geometry.input_size
            ).astype(np.float32),
        )
        np.testing.assert_array_equal(
            batch.targets,
            reference_windows(
                small_ds, ["b"], geometry.dims, starts - [1, 0, 0], geometry.target_size
            ).astype(np.float32),
        )
        assert len(reader.arena.slots) <= reader.cache_cells


def test_negative_target_offset_and_float64(small_ds):
    dm = XarrayDataModule(
        small_ds,
        input_vars=["a"],
        target_vars=["a", "b"],
        input_dims={"time": 2, "lat": 3},
        target_dims={"time": 1, "lat": 3},
        target_offset={"time": -2},
        dtype="float64",
        splits={"train": {"time": [None, "2020-01-20"]}, "test": {"time": ["2020-01-21", None]}},
    )
    dm.setup()
    # Every lon position is its own channel: lon is not windowed.
    assert dm.input_shape == (10, 2, 3)
    dataset = dm.datasets["test"]
    batch = dataset.__getitems__(np.arange(len(dataset)))
    starts = dm.indices["test"].starts(np.arange(len(dataset)))
    assert starts[:, 0].min() == 20 + 2  # the target two steps back must stay in the split
    expected = reference_windows(small_ds, ["a", "b"], ("time", "lat"), starts - [2, 0], (1, 3))
    assert batch.targets.dtype == np.float64
    np.testing.assert_array_equal(batch.targets, expected)


def test_single_sample_getitem_matches_batch(small_ds):
    dm = XarrayDataModule(small_ds, **CONFIG)
    dm.setup("test")
    dataset = dm.datasets["test"]
    sample = dataset[3]
    batch = dataset.__getitems__([3])
    np.testing.assert_array_equal(sample.inputs, batch.inputs[0])
    assert sample.inputs.shape == dm.input_shape
    assert sample.targets.shape == dm.target_shape


def test_transform_sees_real_coordinates_and_adds_channels(small_ds):
    seen = []

    def add_sum(window: xr.Dataset) -> xr.Dataset:
        seen.append(window.time.values[0])
        return window.assign(total=window.a + window.b)

    dm = XarrayDataModule(
        small_ds,
        input_vars=["a", "b"],
        input_dims={"time": 2, "lat": 3, "lon": 4},
        transform=add_sum,
        splits={"train": 1.0},
    )
    assert dm.input_shape == (3, 2, 3, 4)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    ids = np.array([5, 0, 17])
    batch = dataset.__getitems__(ids)
    starts = dm.indices["train"].starts(ids)
    ref = reference_windows(
        small_ds.assign(total=small_ds.a + small_ds.b),
        ["a", "b", "total"],
        ("time", "lat", "lon"),
        starts,
        (2, 3, 4),
    )
    np.testing.assert_allclose(batch.inputs, ref.astype(np.float32), rtol=1e-6)
    assert seen[-3:] == [small_ds.time.values[s] for s in starts[:, 0]]
    # The target side keeps the vectorised path and equals the plain windows.
    np.testing.assert_array_equal(
        batch.targets,
        reference_windows(small_ds, ["a", "b"], ("time", "lat", "lon"), starts, (2, 3, 4)).astype(
            np.float32
        ),
    )


def test_gather_windows_one_dim():
    block = np.arange(3 * 6, dtype=np.float32).reshape(3, 6)
    out = gather_windows(block, np.array([2, 0]), np.array([[1], [4]]), (2,))
    assert out.shape == (2, 2, 2)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out[0], [[13, 14], [1, 2]])
    np.testing.assert_array_equal(out[1], [[16, 17], [4, 5]])


@pytest.mark.parametrize("backing", ["numpy", "zarr"])
def test_loader_batches_cover_split_in_order(small_ds, zarr_path, backing):
    data = small_ds if backing == "numpy" else str(zarr_path)
    dm = XarrayDataModule(data, **CONFIG)
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    n = len(dm.datasets["val"])
    assert sum(len(x) for x, _ in batches) == n
    X = np.concatenate([x.numpy() for x, _ in batches])
    starts = dm.indices["val"].starts(np.arange(n))
    expected = reference_windows(
        small_ds, dm.input_vars, dm.window_dims, starts, dm.geometry.input_size
    )
    np.testing.assert_array_equal(X, expected.astype(np.float32))


def _read_many(ds: xr.Dataset, name: str, expected: np.ndarray, init: bool, queue) -> None:
    try:
        if init:
            _init_worker(0)  # what each DataLoader worker runs first
        for i in range(20):
            got = ds[name].isel(longitude=slice(i, i + 30)).values
            np.testing.assert_array_equal(got, expected[..., i : i + 30])
        queue.put("ok")
    except Exception as error:  # reported to the parent
        queue.put(repr(error))


def test_workers_open_their_own_netcdf3_handles(era_path):
    # The real netCDF3 file: a handle opened in the parent and used by forked processes at
    # once failed in one of two children ("Inappropriate ioctl for device") before workers
    # dropped the inherited handles.
    with xr.open_dataset(era_path) as other:
        expected = {name: other[name].values for name in ("u", "v", "z")}
    ds = xr.open_dataset(era_path)
    _ = ds["u"].isel(longitude=slice(0, 10)).values  # read through the handle, not cached whole
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [
        context.Process(target=_read_many, args=(ds, name, expected[name], True, queue))
        for name in ("u", "z")
    ]
    for child in children:
        child.start()
    _read_many(ds, "v", expected["v"], False, queue)  # the parent keeps reading meanwhile
    results = [queue.get(timeout=60) for _ in range(3)]
    for child in children:
        child.join(timeout=60)
    assert results == ["ok"] * 3


def time_chunked_module(ds, tmp_path, monkeypatch, input_vars, **settings):
    """Out of core, no workers, on a store of 2-step chunks that are the cells; set up."""
    monkeypatch.setattr(cells, "MIN_CELL_BYTES", 0)
    path = tmp_path / "cells.zarr"
    ds.chunk({"time": 2}).to_zarr(path)
    dm = XarrayDataModule(
        str(path),
        input_vars=input_vars,
        input_dims={"time": 3, "lat": 12, "lon": 10},
        splits={"train": 1.0},
        load=False,
        num_workers=0,
        **settings,
    )
    dm.setup("fit")
    return dm


def test_a_batch_whose_cells_are_decoding_in_the_background_waits_for_them(
    small_ds, tmp_path, monkeypatch
):
    dm = time_chunked_module(small_ds, tmp_path, monkeypatch, ["a", "b"], input_overlap={"time": 2})
    dataset = dm.datasets["train"]
    reader = dataset.reader
    reader.decode_threads = 2  # decode the next batch in the background, whatever the cores
    slow, release = reader.decoder.decode, threading.Event()

    def decode_slowly(jobs):
        if threading.current_thread() is not threading.main_thread():
            release.wait(10)  # held, however loaded the machine, until the next read comes
        slow(jobs)

    monkeypatch.setattr(reader.decoder, "decode", decode_slowly)
    first, second = np.array([0, 1]), np.array([20, 30])
    batch = dataset.__getitems__(first, upcoming=second)
    assert reader._pending and not reader._pending[-1].done()
    threading.Timer(0.2, release.set).start()
    later = dataset.__getitems__(second)  # its cells are being decoded: it waits for them
    for ids, got in ((first, batch), (second, later)):
        starts = dm.indices["train"].starts(ids)
        expected = reference_windows(small_ds, ["a", "b"], dm.window_dims, starts, (3, 12, 10))
        np.testing.assert_array_equal(got.inputs, expected.astype(np.float32))
    # Each cell was decoded once: the read used what the background decoded.
    touched = {2 * (t // 2) for s in (0, 1, 20, 30) for t in range(s, s + 3)}
    assert reader.cells_read == len(touched)


def test_a_failed_prefetch_holds_no_batch_alive(small_ds, tmp_path, monkeypatch):
    import gc
    import weakref

    dm = time_chunked_module(small_ds, tmp_path, monkeypatch, ["a"], input_overlap={"time": 2})
    dataset = dm.datasets["train"]
    reader = dataset.reader
    reader.decode_threads = 2
    decode_now = reader.decoder.decode

    def fail_in_background(jobs):
        if threading.current_thread() is not threading.main_thread():
            raise OSError("chunk lost")
        decode_now(jobs)

    monkeypatch.setattr(reader.decoder, "decode", fail_in_background)
    gc.disable()
    try:
        dataset.__getitems__(np.array([0, 1]), upcoming=np.array([20, 30]))
        batch = dataset.__getitems__(np.array([20, 30]), upcoming=np.array([10]))
        alive = weakref.ref(batch.inputs)
        # The failed prefetch was retried by the read that needed its cells.
        starts = dm.indices["train"].starts(np.array([20, 30]))
        expected = reference_windows(small_ds, ["a"], dm.window_dims, starts, (3, 12, 10))
        np.testing.assert_array_equal(batch.inputs, expected.astype(np.float32))
        dataset.__getitems__(np.array([10]))  # awaits the second failed prefetch
        del batch
        assert alive() is None  # freed at once, not left to the garbage collector
    finally:
        gc.enable()


def test_a_read_waits_for_a_prefetch_that_holds_slots_it_needs(small_ds, tmp_path, monkeypatch):
    dm = time_chunked_module(small_ds, tmp_path, monkeypatch, ["a"], input_overlap={"time": 2})
    dataset = dm.datasets["train"]
    reader = dataset.reader
    reader.decode_threads = 2
    reader.resize_cache(4)
    slow, release = reader.decoder.decode, threading.Event()

    def decode_slowly(jobs):
        if threading.current_thread() is not threading.main_thread():
            release.wait(10)  # held, however loaded the machine, until the other read comes
        slow(jobs)

    monkeypatch.setattr(reader.decoder, "decode", decode_slowly)
    dataset.__getitems__(np.array([0]), upcoming=np.array([20]))  # prefetches cells 10, 11
    assert reader._pending and not reader._pending[-1].done()
    threading.Timer(0.3, release.set).start()
    # Not the batch prefetched (e.g. a validation batch in between), and it needs every
    # slot of the arena, two of which the prefetch holds: it waits for them.
    other = np.array([8, 16])  # cells 4, 5, 8, 9
    batch = dataset.__getitems__(other)
    starts = dm.indices["train"].starts(other)
    expected = reference_windows(small_ds, ["a"], dm.window_dims, starts, (3, 12, 10))
    np.testing.assert_array_equal(batch.inputs, expected.astype(np.float32))


def test_the_copy_runs_single_threaded_while_a_prefetch_decodes(small_ds, tmp_path, monkeypatch):
    import torch

    from xr_datamodule import gather

    dm = time_chunked_module(small_ds, tmp_path, monkeypatch, ["a"])
    dataset = dm.datasets["train"]
    dataset.reader.decode_threads = 2
    seen = []
    take = gather._take_runs

    def recording(*args):
        seen.append(torch.get_num_threads())
        take(*args)

    monkeypatch.setattr(gather, "_take_runs", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        dataset.__getitems__(np.array([0, 1]), upcoming=np.array([10]))
        assert seen and set(seen) == {1}  # the decoder keeps the other core
        assert torch.get_num_threads() == 2  # and the model gets its threads back
        seen.clear()
        dataset.reader._await_prefetch()
        dataset.__getitems__(np.array([5]))  # nothing decoding in the background
        assert set(seen) == {2}
    finally:
        torch.set_num_threads(before)


def test_a_prefetch_never_evicts_the_cells_a_read_holds(small_ds, tmp_path, monkeypatch):
    """Stress: waves through a tiny arena while background prefetches start late.

    The prefetch thread's choice of slots is delayed a little (as the scheduler may delay
    it), and the read's own decoding is slowed, so that the two meet inside the read: every
    batch must still come out whole and right (before: "a batch's cells did not fit in the
    arena", or cells overwritten under the copy).
    """
    import time

    dm = time_chunked_module(small_ds, tmp_path, monkeypatch, ["a", "b"], input_overlap={"time": 2})
    dataset = dm.datasets["train"]
    reader = dataset.reader
    reader.decode_threads = 2
    reader.resize_cache(5)  # a batch of 6 samples needs up to 12 cells: read in waves
    rng = np.random.default_rng(0)
    slots_for, decode_now = reader._slots_for, reader.decoder.decode

    def late_prefetch(keys, wait=True):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(float(rng.uniform(0, 0.004)))
        return slots_for(keys, wait)

    def slow_decode(jobs):
        time.sleep(0.002)
        decode_now(jobs)

    monkeypatch.setattr(reader, "_slots_for", late_prefetch)
    monkeypatch.setattr(reader.decoder, "decode", slow_decode)
    n = len(dataset)
    batches = [rng.choice(n, size=6, replace=False) for _ in range(120)]
    for ids, upcoming in zip(batches, [*batches[1:], None], strict=True):
        batch = dataset.__getitems__(ids, upcoming=upcoming)
        starts = dm.indices["train"].starts(ids)
        expected = reference_windows(small_ds, ["a", "b"], dm.window_dims, starts, (3, 12, 10))
        np.testing.assert_array_equal(batch.inputs, expected.astype(np.float32))
    assert not reader.arena.pinned  # every read let go of its cells


@pytest.mark.parametrize("workers", [0, 2])
def test_full_shuffle_epochs_through_a_tiny_arena_are_exact(
    small_ds, tmp_path, monkeypatch, workers
):
    from xr_datamodule import order

    monkeypatch.setattr(cells, "MIN_CELL_BYTES", 0)
    monkeypatch.setattr(order, "FULL_SHUFFLE_CACHE_BYTES", 1)  # the smallest arena there is
    path = tmp_path / "cells.zarr"
    small_ds.chunk({"time": 2}).to_zarr(path)
    dm = XarrayDataModule(
        str(path),
        input_vars=["a"],
        input_dims={"time": 3, "lat": 12, "lon": 10},
        input_overlap={"time": 2},
        splits={"train": 1.0},
        load=False,
        num_workers=workers,
        shuffle="full",
        batch_size=5,
        batch_format="dict",
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    for _ in range(3):
        seen = []
        for batch in loader:
            ids = batch["sample"].numpy()
            starts = dm.indices["train"].starts(ids)
            expected = reference_windows(small_ds, ["a"], dm.window_dims, starts, (3, 12, 10))
            np.testing.assert_array_equal(batch["x"].numpy(), expected.astype(np.float32))
            seen += ids.tolist()
        assert sorted(seen) == list(range(len(dm.indices["train"])))
