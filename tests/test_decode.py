"""Cell decoders: chunk files, TensorStore, zarr-python and xarray give what xarray decodes.

Stores written plainly (a compressor per chunk, or shards of such chunks) are read from
their chunk files (:mod:`xr_datamodule.chunkfiles`); the TensorStore and zarr-python paths
are exercised on copies whose chunks end with a CRC32C checksum, which only they read.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from zarr.codecs import Crc32cCodec, ZstdCodec

from tests.conftest import reference_windows
from xr_datamodule import XarrayDataModule, cells, decode
from xr_datamodule.chunkfiles import ChunkFileDecoder
from xr_datamodule.decode import (
    TensorStoreDecoder,
    XarrayDecoder,
    ZarrDecoder,
    tensorstore_available,
    zarr_decoding,
)
from xr_datamodule.gather import ChunkedReader


@pytest.fixture(autouse=True)
def chunks_are_cells(monkeypatch):
    monkeypatch.setattr(cells, "MIN_CELL_BYTES", 0)


def encoded_store(path: Path, checksummed: bool = False) -> tuple[Path, xr.Dataset]:
    """A store whose variables xarray decodes: packed ints, a float fill value, a lost chunk.

    ``checksummed``: each chunk's bytes end with their CRC32C (a codec chain).
    """
    rng = np.random.default_rng(0)
    shape = (24, 2, 5, 6)
    packed = np.round(rng.uniform(-5, 5, shape), 1)
    packed[0, 0, 0, :3] = np.nan  # written as the fill value
    filled = rng.standard_normal(shape[:1] + shape[2:]).astype(np.float32)
    filled[3, 1, :] = np.nan
    ds = xr.Dataset(
        {
            "packed": (("time", "level", "lat", "lon"), packed),
            "filled": (("time", "lat", "lon"), filled),
            "plain": (("time", "lat", "lon"), rng.standard_normal(shape[:1] + shape[2:])),
        },
        coords={"time": pd.date_range("2022-01-01", periods=24, freq="D"), "level": [1, 2]},
    )
    encoding = {
        "packed": {"dtype": "int16", "scale_factor": 0.1, "add_offset": 2.0, "_FillValue": -32767},
        "filled": {"_FillValue": -9999.0},
    }
    if checksummed:
        for name in ds.data_vars:
            encoding.setdefault(name, {})["compressors"] = (ZstdCodec(), Crc32cCodec())
    ds.chunk({"time": 4}).to_zarr(path, zarr_format=3, consolidated=False, encoding=encoding)
    # A chunk lost in a copy: zarr reads its fill value, which xarray decodes to NaN.
    lost = path / "plain" / "c" / "2" / "0" / "0"
    assert lost.exists()
    lost.unlink()
    return path, xr.open_zarr(path, consolidated=False).load()


def test_encodings_are_read_as_xarray_decodes_them(tmp_path):
    path, decoded = encoded_store(tmp_path / "encoded.zarr")
    assert np.isnan(decoded.plain.values[8:12]).all()  # the lost chunk
    raw = xr.open_zarr(path, consolidated=False, chunks=None)
    import zarr

    group = zarr.open_group(path, mode="r")
    packed = zarr_decoding(raw.packed, group["packed"], np.dtype("float32"))
    assert packed is not None and packed.fill_values == (-32767,) and packed.scale == 0.1
    assert zarr_decoding(raw.filled, group["filled"], np.dtype("float32")).fill_values == (-9999.0,)
    assert zarr_decoding(raw.plain, group["plain"], np.dtype("float32")).is_identity
    # int16 values are not exact in float16: leave those to xarray.
    assert zarr_decoding(raw.packed, group["packed"], np.dtype("float16")) is None
    assert zarr_decoding(raw.plain.rename(lat="y"), group["plain"], np.dtype("float32")) is None


@pytest.mark.parametrize("reader", ["chunk files", "tensorstore", "zarr", "xarray"])
def test_each_decoder_gives_the_batches_of_isel(tmp_path, reader, monkeypatch):
    path, decoded = encoded_store(tmp_path / "encoded.zarr", checksummed=reader != "chunk files")
    if reader == "tensorstore" and not tensorstore_available():
        pytest.skip("TensorStore cannot run in this process")
    if reader == "zarr":  # as in a process forked after TensorStore ran
        monkeypatch.setattr(decode, "_tensorstore_pid", -1)
    data = str(path) if reader != "xarray" else xr.open_zarr(path, consolidated=False)
    dm = XarrayDataModule(
        data,
        input_vars=["packed", "filled", "plain"],
        input_dims={"time": 3, "lat": 5, "lon": 6},
        input_overlap={"time": 2},
        splits={"train": 1.0},
        load=False,
        num_workers=0,
        open_kwargs={"consolidated": False},
        nan_policy="keep",  # the fill values and a lost chunk are meant to come as NaN
    )
    dm.setup("fit")
    chunked = dm.datasets["train"].reader
    assert isinstance(chunked, ChunkedReader)
    expected_type = {
        "chunk files": ChunkFileDecoder,
        "tensorstore": TensorStoreDecoder,
        "zarr": ZarrDecoder,
    }
    assert isinstance(chunked.decoder, expected_type.get(reader, XarrayDecoder))
    ids = np.random.default_rng(0).permutation(len(dm.datasets["train"]))
    batch = dm.datasets["train"].__getitems__(ids)
    starts = dm.indices["train"].starts(ids)
    expected = reference_windows(
        decoded, ["packed", "filled", "plain"], dm.window_dims, starts, (3, 5, 6)
    )
    np.testing.assert_array_equal(batch.inputs, expected.astype(np.float32))
    assert np.isnan(batch.inputs).any()  # the fill values and the lost chunk came as NaN


def _read_in_child(reader: ChunkedReader, queue) -> None:
    try:
        queue.put((tensorstore_available(), reader._span(np.zeros(3, dtype=np.int64), (3, 5, 6))))
    except BaseException as error:  # reported to the parent
        queue.put((None, repr(error)))


def test_a_process_forked_after_tensorstore_ran_reads_through_zarr(tmp_path):
    if not tensorstore_available():
        pytest.skip("TensorStore cannot run in this process")
    path, _ = encoded_store(tmp_path / "encoded.zarr", checksummed=True)
    dm = XarrayDataModule(
        str(path),
        input_vars=["packed", "plain"],
        input_dims={"time": 3, "lat": 5, "lon": 6},
        splits={"train": 1.0},
        load=False,
        num_workers=0,
        open_kwargs={"consolidated": False},
    )
    dm.setup("fit")
    reader = dm.datasets["train"].reader
    in_parent = reader._span(np.zeros(3, dtype=np.int64), (3, 5, 6))  # TensorStore runs here
    assert decode._tensorstore_pid == os.getpid()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(reader, queue))
    child.start()
    usable, in_child = queue.get(timeout=60)
    child.join(timeout=60)
    # TensorStore aborts a forked child that uses it: the child read through zarr instead.
    assert usable is False and child.exitcode == 0
    np.testing.assert_array_equal(in_child, in_parent)


def test_workers_after_the_main_process_read_still_give_isel_batches(tmp_path, caplog):
    path, decoded = encoded_store(tmp_path / "encoded.zarr", checksummed=True)
    settings = dict(
        input_vars=["packed", "plain"],
        input_dims={"time": 3, "lat": 5, "lon": 6},
        splits={"train": 0.5, "val": 0.5},
        load=False,
        open_kwargs={"consolidated": False},
        batch_size=4,
    )
    first = XarrayDataModule(str(path), **settings, num_workers=0)
    first.setup("fit")
    next(iter(first.val_dataloader()))  # the main process reads (with TensorStore)
    dm = XarrayDataModule(str(path), **settings, num_workers=2)
    dm.setup("fit")
    with caplog.at_level("WARNING"):
        loader = dm.val_dataloader()
    if decode._tensorstore_pid == os.getpid():  # the warning is given once per process
        from xr_datamodule import loaders

        assert loaders._warned_tensorstore_fork
    X = np.concatenate([X.numpy() for X, _ in loader])
    starts = dm.indices["val"].starts(np.arange(len(X)))
    expected = reference_windows(decoded, ["packed", "plain"], dm.window_dims, starts, (3, 5, 6))
    np.testing.assert_array_equal(X, expected.astype(np.float32))


def test_a_store_without_tensorstore_support_reads_through_zarr(tmp_path, monkeypatch):
    path, _ = encoded_store(tmp_path / "encoded.zarr", checksummed=True)
    monkeypatch.setattr(decode, "tensorstore_available", lambda: False)
    from xr_datamodule import resources

    monkeypatch.setattr(resources, "tensorstore_available", lambda: False)
    dm = XarrayDataModule(
        str(path),
        input_vars=["plain"],
        input_dims={"time": 3, "lat": 5, "lon": 6},
        splits={"train": 1.0},
        load=False,
        open_kwargs={"consolidated": False},
    )
    dm.setup("fit")
    assert isinstance(dm.datasets["train"].reader.decoder, ZarrDecoder)
    shutil.rmtree(path / "filled")  # a variable not asked for may go
    assert dm.datasets["train"].__getitems__([0]).inputs.shape == (1, 1, 3, 5, 6)


def test_a_store_without_consolidated_metadata_opens_without_a_warning(tmp_path):
    import warnings

    from xr_datamodule.sources import open_source

    path, decoded = encoded_store(tmp_path / "encoded.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # xarray's "falling back" warning
        opened = open_source(str(path))
    assert set(opened.data_vars) == set(decoded.data_vars)


def test_the_environment_can_turn_tensorstore_off(monkeypatch):
    monkeypatch.setenv("XR_DATAMODULE_TENSORSTORE", "0")
    assert not decode.tensorstore_available()
    monkeypatch.setenv("XR_DATAMODULE_TENSORSTORE", "1")
    assert decode.tensorstore_available() == (decode._tensorstore_pid in (None, os.getpid()))


@pytest.mark.parametrize(
    ("chunk_steps", "expected"),
    [(2, "TensorStoreDecoder"), (64, "TensorStoreDecoder"), (128, "ZarrDecoder")],
)
def test_workers_read_checksummed_stores_with_tensorstore_only_where_chunks_are_small(
    tmp_path, chunk_steps, expected
):
    if not tensorstore_available():
        pytest.skip("TensorStore cannot run in this process")
    ds = xr.Dataset(
        {"x": (("time", "lat", "lon"), np.zeros((128, 64, 64), np.float32))},
        coords={"time": np.arange(128)},
    )
    # 2 steps: 32 KB chunks (TensorStore saves zarr-python's per-chunk overhead); 128 steps:
    # 2 MiB chunks, where it would cost each worker its own ~30 MB for little gain.
    # Checksummed chunks: a plain store is read from its chunk files.
    ds.chunk({"time": chunk_steps}).to_zarr(
        tmp_path / "s.zarr",
        consolidated=False,
        zarr_format=3,
        encoding={"x": {"compressors": (ZstdCodec(), Crc32cCodec())}},
    )
    settings = dict(input_vars=["x"], input_dims={"time": 1, "lat": 32, "lon": 32}, load=False)
    dm = XarrayDataModule(str(tmp_path / "s.zarr"), **settings, num_workers=2)
    dm.setup("fit")
    assert type(dm.datasets["train"].reader.decoder).__name__ == expected
    alone = XarrayDataModule(str(tmp_path / "s.zarr"), **settings, num_workers=0)
    alone.setup("fit")
    assert type(alone.datasets["train"].reader.decoder).__name__ == "TensorStoreDecoder"
