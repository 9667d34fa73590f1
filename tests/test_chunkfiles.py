"""Chunk files decoded straight into blocks give exactly what zarr-python reads."""

from __future__ import annotations

import os
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import xarray as xr
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.codecs import (
    BloscCodec,
    BytesCodec,
    Crc32cCodec,
    GzipCodec,
    ShardingCodec,
    TransposeCodec,
    ZstdCodec,
)

from tests.conftest import reference_windows
from xr_datamodule.chunkfiles import ChunkFileDecoder, chunk_files, decoded_size
from xr_datamodule.decode import CfDecoding, DecodeJob
from xr_datamodule.sources import VariableLayout


def XarrayDataModule(*args, **kwargs):
    """The datamodule; these tests are skipped where torch is not (the Python 3.13 CI job)."""
    pytest.importorskip("torch")
    from xr_datamodule import XarrayDataModule as datamodule

    return datamodule(*args, **kwargs)


# (zarr format, compressor, byte order on disk, chunk key separator)
LAYOUTS = [
    (3, "zstd", "little", "/"),
    (3, "blosc", "little", "/"),
    (3, None, "big", "/"),
    (3, "zstd", "big", "."),
    (2, "zstd", "little", "."),
    (2, "blosc", "big", "/"),
    (2, None, "little", "."),
]
DTYPES = ["f4", "f8", "i2", "u1", "i4"]


def make_array(path: Path, shape, chunks, dtype, layout, sharding=None) -> zarr.Array:
    """A zarr array with ``layout`` (see LAYOUTS) holding distinct values per element.

    ``sharding`` (zarr v3): ``(chunks per shard along each dim, index location, checksum)``.
    """
    zarr_format, compressor, order, separator = layout
    kwargs: dict = {}
    if zarr_format == 3:
        compressors = {"zstd": ZstdCodec(), "blosc": BloscCodec(), None: None}[compressor]
        kwargs["serializer"] = BytesCodec(endian=order)
        if separator == ".":
            kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "."}
        if sharding is not None:
            per_shard, location, checksum = sharding
            kwargs["serializer"] = ShardingCodec(
                chunk_shape=chunks,
                codecs=[BytesCodec(endian=order), *([compressors] if compressors else [])],
                index_codecs=[BytesCodec(), *([Crc32cCodec()] if checksum else [])],
                index_location=location,
            )
            chunks = tuple(c * n for c, n in zip(chunks, per_shard, strict=True))
            compressors = None
    else:
        compressors = {"zstd": numcodecs.Zstd(), "blosc": numcodecs.Blosc(), None: None}
        compressors = compressors[compressor]
        dtype = np.dtype(dtype).newbyteorder("<" if order == "little" else ">")
        kwargs["chunk_key_encoding"] = {"name": "v2", "separator": separator}
    array = zarr.create_array(
        str(path),
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        zarr_format=zarr_format,
        compressors=compressors,
        fill_value=7,
        **kwargs,
    )
    values = np.arange(int(np.prod(shape))).reshape(shape) % 120 - 50
    array[...] = values.astype(array.dtype)
    return array


def decoder_for(array: zarr.Array, folder: Path, channel_dim: int | None, threads: int):
    """A decoder of one variable with dims d0, d1, ...; ``channel_dim`` becomes channels."""
    dims = tuple(f"d{axis}" for axis in range(array.ndim))
    window_dims = tuple(dim for axis, dim in enumerate(dims) if axis != channel_dim)
    extra = () if channel_dim is None else (dims[channel_dim],)
    extra_shape = () if channel_dim is None else (array.shape[channel_dim],)
    files = chunk_files(array, str(folder))
    assert files is not None
    layout = VariableLayout("x", extra, extra_shape)
    decoder = ChunkFileDecoder(
        {"x": files}, [layout], window_dims, {"x": dims}, {"x": CfDecoding()}, threads
    )
    return decoder, dims, window_dims


@st.composite
def cases(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    chunks = tuple(draw(st.integers(1, n + 2)) for n in shape)
    region = []
    for n in shape:
        start = draw(st.integers(0, n - 1))
        region.append(slice(start, draw(st.integers(start + 1, n))))
    layout = draw(st.sampled_from(LAYOUTS))
    sharding = None
    if layout[0] == 3 and draw(st.booleans()):
        per_shard = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
        location = draw(st.sampled_from(["start", "end"]))
        sharding = (per_shard, location, draw(st.booleans()))
    channel_dim = draw(st.sampled_from([None, *range(1, ndim)]))
    if channel_dim is not None:  # a variable's channels are read whole
        region[channel_dim] = slice(0, shape[channel_dim])
    return dict(
        shape=shape,
        chunks=chunks,
        region=region,
        channel_dim=channel_dim,
        dtype=draw(st.sampled_from(DTYPES)),
        layout=layout,
        sharding=sharding,
        out_dtype=draw(st.sampled_from(["float32", "float64"])),
        lost=draw(st.integers(0, 3)),
        threads=draw(st.sampled_from([1, 2])),
    )


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=cases())
def test_any_region_of_any_layout_reads_as_zarr_reads_it(tmp_path_factory, case):
    folder = tmp_path_factory.mktemp("store") / "x"
    array = make_array(
        folder, case["shape"], case["chunks"], case["dtype"], case["layout"], case["sharding"]
    )
    files = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if not name.startswith(".") and name != "zarr.json"
    )
    for path in files[: case["lost"]]:  # chunks (shards) lost in a copy read as fill values
        os.unlink(path)
    decoder, dims, window_dims = decoder_for(array, folder, case["channel_dim"], case["threads"])
    region = dict(zip(dims, case["region"], strict=True))
    expected = array[tuple(case["region"])].astype(case["out_dtype"])
    if case["channel_dim"] is not None:  # the block is (channel, *window)
        expected = np.moveaxis(expected, case["channel_dim"], 0)
    else:
        expected = expected[None]
    out = np.full(expected.shape, np.nan, dtype=case["out_dtype"])
    window_region = {dim: region[dim] for dim in window_dims}
    decoder.decode([DecodeJob(window_region, out)])
    np.testing.assert_array_equal(out, expected)


def test_whole_chunks_are_decoded_in_place(tmp_path, monkeypatch):
    array = make_array(tmp_path / "x", (4, 6, 8), (2, 6, 8), "f4", LAYOUTS[0])
    decoder, _, _ = decoder_for(array, tmp_path / "x", None, 1)
    copies = []
    monkeypatch.setattr(ChunkFileDecoder, "_scratch", lambda self, files: copies.append(1))
    out = np.empty((1, 4, 6, 8), np.float32)
    decoder.decode([DecodeJob({"d0": slice(0, 4)}, out)])
    assert copies == []  # no scratch chunk: each chunk went straight into the block
    np.testing.assert_array_equal(out[0], array[...])


@pytest.mark.parametrize(
    ("codecs", "readable"),
    [
        ({"compressors": ZstdCodec()}, True),
        ({"compressors": None}, True),
        ({"compressors": GzipCodec()}, False),  # no size in its header: zarr-python reads it
        ({"compressors": [ZstdCodec(), Crc32cCodec()]}, False),
        ({"filters": [TransposeCodec(order=(1, 0))]}, False),
        ({"shards": (4, 6)}, True),
        ({"shards": (4, 6), "compressors": GzipCodec()}, False),
    ],
)
def test_layouts_read_from_chunk_files_and_those_left_to_zarr(tmp_path, codecs, readable):
    array = zarr.create_array(
        str(tmp_path / "x"), shape=(8, 6), chunks=(2, 3), dtype="f4", zarr_format=3, **codecs
    )
    assert (chunk_files(array, str(tmp_path / "x")) is not None) == readable


def test_zarr_v2_filters_and_fortran_order_are_left_to_zarr(tmp_path):
    for name, kwargs in {"f": {"filters": [numcodecs.Delta("f4")]}, "o": {"order": "F"}}.items():
        array = zarr.create_array(
            str(tmp_path / name), shape=(8,), chunks=(2,), dtype="f4", zarr_format=2, **kwargs
        )
        assert chunk_files(array, str(tmp_path / name)) is None


@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[1], LAYOUTS[2]])
def test_a_damaged_chunk_file_fails_naming_the_array(tmp_path, layout):
    array = make_array(tmp_path / "x", (4, 6), (2, 6), "f4", layout)
    decoder, _, _ = decoder_for(array, tmp_path / "x", None, 1)
    damaged = Path(chunk_files(array, str(tmp_path / "x")).path((1, 0)))
    damaged.write_bytes(damaged.read_bytes()[:20])
    out = np.empty((1, 4, 6), np.float32)
    with pytest.raises(OSError, match="could not decode the chunk file") as raised:
        decoder.decode([DecodeJob({"d0": slice(0, 4)}, out)])
    assert str(damaged) in str(raised.value)


def test_a_chunk_that_decodes_short_is_an_error_not_stale_bytes(tmp_path):
    array = make_array(tmp_path / "x", (4, 6), (2, 6), "f4", LAYOUTS[0])
    decoder, _, _ = decoder_for(array, tmp_path / "x", None, 1)
    short = Path(chunk_files(array, str(tmp_path / "x")).path((0, 0)))
    short.write_bytes(numcodecs.Zstd().encode(np.zeros(5, np.float32)))
    with pytest.raises(OSError, match="holds 20 bytes decoded, not 48"):
        decoder.decode([DecodeJob({"d0": slice(0, 4)}, np.empty((1, 4, 6), np.float32))])


def test_decoded_sizes_are_read_from_the_headers():
    for codec in (numcodecs.Zstd(), numcodecs.Zstd(level=9), numcodecs.Blosc()):
        for size in (1, 255, 256, 300, 65_791, 2**20 + 3):
            encoded = memoryview(codec.encode(np.zeros(size, np.uint8)))
            assert decoded_size(codec.codec_id, encoded) == size
    # A zstd frame written as a stream does not say (descriptor 0, a window byte).
    assert decoded_size("zstd", memoryview(b"\x28\xb5\x2f\xfd\x00\x48" + bytes(12))) is None
    with pytest.raises(OSError, match="damaged"):
        decoded_size("zstd", memoryview(b"not a zstd frame at all"))


def test_a_frame_without_a_size_is_decoded_aside_and_checked(tmp_path, monkeypatch):
    from xr_datamodule import chunkfiles

    array = make_array(tmp_path / "x", (4, 6), (2, 6), "f4", LAYOUTS[0])
    decoder, _, _ = decoder_for(array, tmp_path / "x", None, 1)
    monkeypatch.setattr(chunkfiles, "decoded_size", lambda codec_id, raw: None)
    out = np.empty((1, 4, 6), np.float32)
    decoder.decode([DecodeJob({"d0": slice(0, 4)}, out)])
    np.testing.assert_array_equal(out[0], array[...])


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_and_the_main_process_read_chunk_files_into_isel_batches(tmp_path, workers):
    rng = np.random.default_rng(0)
    ds = xr.Dataset(
        {
            "u": (("time", "level", "lat", "lon"), rng.standard_normal((40, 3, 8, 12))),
            "t": (("time", "lat", "lon"), rng.standard_normal((40, 8, 12)).astype(np.float32)),
        },
        coords={"time": np.arange(40), "level": [850, 500, 250]},
    )
    ds.chunk({"time": 5}).to_zarr(tmp_path / "s.zarr", zarr_format=3, consolidated=False)
    dm = XarrayDataModule(
        str(tmp_path / "s.zarr"),
        input_vars=["u", "t"],
        input_dims={"time": 2, "lat": 8, "lon": 12},
        input_overlap={"time": 1},
        splits={"train": 1.0},
        batch_size=4,
        load=False,
        num_workers=workers,
        shuffle="full",
        seed=3,
    )
    dm.setup("fit")
    assert isinstance(dm.datasets["train"].reader.decoder, ChunkFileDecoder)
    X = np.concatenate([X.numpy() for X, _ in dm.train_dataloader()])
    order = np.concatenate(dm.train_batches(0))
    starts = dm.indices["train"].starts(order)
    expected = reference_windows(ds, ["u", "t"], dm.window_dims, starts, (2, 8, 12))
    np.testing.assert_array_equal(X, expected.astype(np.float32))


def test_a_shard_whose_index_fails_its_checksum_is_reported(tmp_path):
    array = make_array(tmp_path / "x", (8, 6), (2, 3), "f4", LAYOUTS[0], ((2, 2), "end", True))
    decoder, _, _ = decoder_for(array, tmp_path / "x", None, 1)
    shard = Path(chunk_files(array, str(tmp_path / "x")).path((0, 0)))
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # a bit flipped in the index
    shard.write_bytes(bytes(raw))
    with pytest.raises(OSError, match="index fails its checksum") as raised:
        decoder.decode([DecodeJob({"d0": slice(0, 8)}, np.empty((1, 8, 6), np.float32))])
    assert str(shard) in str(raised.value)


def test_sharded_stores_are_read_from_their_shards_through_the_datamodule(tmp_path):
    rng = np.random.default_rng(1)
    ds = xr.Dataset(
        {"t": (("time", "lat", "lon"), rng.standard_normal((32, 8, 12)).astype(np.float32))},
        coords={"time": np.arange(32)},
    )
    encoding = {"t": {"chunks": (2, 8, 12), "shards": (8, 8, 12)}}
    ds.chunk({"time": 8}).to_zarr(
        tmp_path / "s.zarr", zarr_format=3, consolidated=False, encoding=encoding
    )
    dm = XarrayDataModule(
        str(tmp_path / "s.zarr"),
        input_vars=["t"],
        input_dims={"time": 3, "lat": 8, "lon": 12},
        splits={"train": 1.0},
        batch_size=4,
        load=False,
        num_workers=2,
    )
    dm.setup("fit")
    assert isinstance(dm.datasets["train"].reader.decoder, ChunkFileDecoder)
    X = np.concatenate([X.numpy() for X, _ in dm.train_dataloader()])
    starts = dm.indices["train"].starts(np.concatenate(dm.train_batches(0)))
    expected = reference_windows(ds, ["t"], dm.window_dims, starts, (3, 8, 12))
    np.testing.assert_array_equal(X, expected)


def test_a_chunk_left_out_of_its_shard_reads_as_the_fill_value(tmp_path):
    array = make_array(tmp_path / "x", (8, 6), (2, 3), "f4", LAYOUTS[0], ((2, 2), "end", True))
    array[2:4, 3:6] = 7  # the fill value: zarr leaves the chunk out of the shard's index
    files = chunk_files(array, str(tmp_path / "x"))
    shard = Path(files.path((1, 1)))
    index = np.frombuffer(shard.read_bytes()[-68:-4], "<u8").reshape(2, 2, 2)
    assert (index[1, 1] == 2**64 - 1).all()  # written as "no chunk"
    decoder, _, _ = decoder_for(array, tmp_path / "x", None, 1)
    out = np.empty((1, 8, 6), np.float32)
    decoder.decode([DecodeJob({"d0": slice(0, 8)}, out)])
    np.testing.assert_array_equal(out[0], array[...])


def test_the_environment_can_turn_chunk_files_off(tmp_path, monkeypatch):
    array = make_array(tmp_path / "x", (4, 6), (2, 6), "f4", LAYOUTS[0])
    monkeypatch.setenv("XR_DATAMODULE_CHUNK_FILES", "0")
    assert chunk_files(array, str(tmp_path / "x")) is None
    monkeypatch.setenv("XR_DATAMODULE_CHUNK_FILES", "1")
    assert chunk_files(array, str(tmp_path / "x")) is not None


# ----------------------------------------------------------------------------- hostile files


def test_a_chunk_of_two_zstd_frames_reads_as_zarr_reads_it(tmp_path):
    array = make_array(tmp_path / "x", (4, 6), (2, 6), "f4", LAYOUTS[0])
    decoder, _, _ = decoder_for(array, tmp_path / "x", None, 1)
    path = Path(chunk_files(array, str(tmp_path / "x")).path((1, 0)))
    values = np.asarray(array[2:4]).astype("<f4").tobytes()
    path.write_bytes(numcodecs.Zstd().encode(values[:20]) + numcodecs.Zstd().encode(values[20:]))
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "x"))[2:4], array[2:4])
    out = np.empty((1, 4, 6), np.float32)
    decoder.decode([DecodeJob({"d0": slice(0, 4)}, out)])  # refused as damaged before
    np.testing.assert_array_equal(out[0], array[...])


def test_a_decompression_bomb_stops_at_the_chunk_size(tmp_path):
    import resource

    import zstandard

    array = make_array(tmp_path / "x", (4, 6), (2, 6), "f4", LAYOUTS[0])
    decoder, _, _ = decoder_for(array, tmp_path / "x", None, 1)
    path = Path(chunk_files(array, str(tmp_path / "x")).path((0, 0)))
    writer = zstandard.ZstdCompressor(write_content_size=False)
    bomb = writer.compress(bytes(512 * 2**20))  # 512 MiB of zeros in a frame without a size
    assert len(bomb) < 64 * 2**10 and decoded_size("zstd", memoryview(bomb)) is None
    path.write_bytes(bomb)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(OSError, match=r"holds more than 48 bytes decoded, not 48") as raised:
        decoder.decode([DecodeJob({"d0": slice(0, 4)}, np.empty((1, 4, 6), np.float32))])
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    assert grown < 64 * 2**20, f"peak memory grew by {grown / 2**20:.0f} MiB"
    assert str(path) in str(raised.value)


def test_a_damaged_chunk_is_blamed_on_its_variable_without_reading_again(tmp_path, monkeypatch):
    from xr_datamodule.decode import ChunkError, ReadError, read_error

    ds = xr.Dataset({name: (("time", "x"), np.ones((8, 4), np.float32)) for name in ("a", "b")})
    ds.to_zarr(tmp_path / "s.zarr")
    opened = xr.open_zarr(tmp_path / "s.zarr")
    reads = []
    monkeypatch.setattr(xr.DataArray, "values", property(lambda self: reads.append(1)))
    error = read_error(
        ChunkError("the chunk file '.../b/c/0/0' is damaged", "b"), opened, [{}], "s"
    )
    assert isinstance(error, ReadError) and "variable 'b'" in str(error) and not reads


def test_a_fifo_is_refused_not_waited_for(tmp_path):
    array = make_array(tmp_path / "x", (4, 6), (2, 6), "f4", LAYOUTS[0])
    decoder, _, _ = decoder_for(array, tmp_path / "x", None, 1)
    path = Path(chunk_files(array, str(tmp_path / "x")).path((1, 0)))
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(OSError, match="is not a regular file"):
        decoder.decode([DecodeJob({"d0": slice(0, 4)}, np.empty((1, 4, 6), np.float32))])


def test_a_shard_rewritten_in_place_is_read_anew(tmp_path):
    import time

    sharding = ((2, 1), "end", False)
    array = make_array(tmp_path / "x", (8, 6), (2, 6), "f4", LAYOUTS[0], sharding)
    decoder, _, _ = decoder_for(array, tmp_path / "x", None, 1)
    out = np.empty((1, 4, 6), np.float32)  # the first shard's two chunks
    decoder.decode([DecodeJob({"d0": slice(0, 4)}, out)])  # its index is kept
    shard = Path(chunk_files(array, str(tmp_path / "x")).path((0, 0)))
    raw = shard.read_bytes()
    index = np.frombuffer(raw[-32:], "<u8").reshape(2, 2).copy()
    chunks = [raw[o : o + n] for o, n in index]
    # The same shard with its two chunks stored the other way round: same size, new index.
    body = chunks[1] + chunks[0]
    index[1] = (0, len(chunks[1]))
    index[0] = (len(chunks[1]), len(chunks[0]))
    time.sleep(0.01)  # another modification time
    shard.write_bytes(body + raw[len(body) : -32] + index.astype("<u8").tobytes())
    assert len(shard.read_bytes()) == len(raw)
    decoder.decode([DecodeJob({"d0": slice(0, 4)}, out)])  # permuted chunks before
    np.testing.assert_array_equal(out[0], array[0:4])


def test_reads_are_repeated_until_the_whole_chunk_is_in(tmp_path, monkeypatch):
    array = make_array(tmp_path / "x", (4, 6), (2, 6), "f4", LAYOUTS[2])  # raw bytes
    decoder, _, _ = decoder_for(array, tmp_path / "x", None, 1)
    preadv = os.preadv

    def a_few_bytes_at_a_time(fd, buffers, offset):
        return preadv(fd, [buffers[0][:7]], offset)  # as a read past 2 GiB returns less

    monkeypatch.setattr(os, "preadv", a_few_bytes_at_a_time)
    out = np.empty((1, 4, 6), np.float32)
    decoder.decode([DecodeJob({"d0": slice(0, 4)}, out)])
    np.testing.assert_array_equal(out[0], array[...])


def test_a_huge_chunk_leaves_no_buffer_behind(tmp_path, monkeypatch):
    from xr_datamodule import chunkfiles

    monkeypatch.setattr(chunkfiles, "KEPT_BUFFER_BYTES", 40)
    array = make_array(tmp_path / "x", (4, 6), (2, 6), "f4", LAYOUTS[2])  # 48-byte chunks
    decoder, _, _ = decoder_for(array, tmp_path / "x", None, 1)
    out = np.empty((1, 4, 6), np.float32)
    decoder.decode([DecodeJob({"d0": slice(0, 4)}, out)])
    np.testing.assert_array_equal(out[0], array[...])
    assert getattr(decoder._local, "buffer", None) is None


def test_strict_stores_refuse_links_outside_and_files_that_are_not_files(tmp_path):
    ds = xr.Dataset({"a": (("time", "x"), np.arange(24, dtype=np.float32).reshape(8, 3))})
    ds.chunk({"time": 2}).to_zarr(tmp_path / "s.zarr")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(100))
    chunk = next(
        p for p in (tmp_path / "s.zarr" / "a").rglob("*") if p.is_file() and "zarr" not in p.name
    )
    chunk.unlink()
    chunk.symlink_to(secret)
    config = dict(input_vars=["a"], input_dims={"time": 1}, splits={"train": 1.0})
    XarrayDataModule(str(tmp_path / "s.zarr"), **config)  # followed by default, as zarr does
    with pytest.raises(PermissionError, match=r"links to .*secret.bin', outside the store"):
        XarrayDataModule(str(tmp_path / "s.zarr"), strict_store=True, **config).setup()
    chunk.unlink()
    os.mkfifo(chunk)
    with pytest.raises(PermissionError, match="neither a regular file nor a folder"):
        XarrayDataModule(str(tmp_path / "s.zarr"), strict_store=True, **config).setup()


def test_metadata_that_do_not_parse_are_named(tmp_path):
    import json

    ds = xr.Dataset({"a": (("time", "x"), np.ones((4, 3), ">f4"))})
    ds.to_zarr(tmp_path / "odd.zarr", zarr_format=3, consolidated=False)
    meta_path = tmp_path / "odd.zarr" / "a" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["fill_value"] = "not a number"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"could not open .*odd.zarr': its metadata do not parse"):
        XarrayDataModule(str(tmp_path / "odd.zarr"), ["a"], {"time": 1}).setup()
