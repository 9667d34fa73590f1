"""Which reader a local zarr store gets, on every zarr version we support (no torch needed).

The common layouts users write (xarray's ``to_zarr`` in zarr v2 and v3, compressed with
zstd or blosc or not at all, sharded) must be read from their chunk files: a silent fallback
to a slower reader (as zarr 3.2's renamed classes once caused) fails here. This module and
``test_chunkfiles.py`` also run in CI's second job on Python 3.13 with the newest zarr.
"""

from __future__ import annotations

import logging

import numcodecs
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

from xr_datamodule.chunkfiles import ChunkFileDecoder
from xr_datamodule.layout import source_layout
from xr_datamodule.resources import Resources, choose_decoder
from xr_datamodule.spec import DataSpec

OUT_OF_CORE = Resources(loads_into_memory=False, num_workers=0, decode_threads=1, ring_slots=4)


def weather(n_time: int = 8) -> xr.Dataset:
    rng = np.random.default_rng(0)
    coords = {
        "time": pd.date_range("2020-01-01", periods=n_time, freq="6h"),
        "lat": np.linspace(80, -80, 6),
        "lon": np.arange(8.0),
    }
    return xr.Dataset(
        {name: (("time", "lat", "lon"), rng.random((n_time, 6, 8), "f4")) for name in "uv"},
        coords=coords,
    )


def backend_of(path):
    spec = DataSpec(str(path), input_vars=["u", "v"], input_dims={"time": 1, "lat": 6, "lon": 8})
    return choose_decoder(spec, source_layout(spec), OUT_OF_CORE)


V3_COMPRESSORS = {"zstd": ZstdCodec(), "blosc": BloscCodec(), "none": None}
V2_COMPRESSORS = {"zstd": numcodecs.Zstd(), "blosc": numcodecs.Blosc(), "none": None}


@pytest.mark.parametrize("compressor", ["zstd", "blosc", "none"])
@pytest.mark.parametrize("zarr_format", [2, 3])
def test_common_layouts_are_read_from_their_chunk_files(tmp_path, zarr_format, compressor):
    codecs = (V3_COMPRESSORS if zarr_format == 3 else V2_COMPRESSORS)[compressor]
    encoding = {name: {"compressors": codecs} if codecs else {"compressors": None} for name in "uv"}
    weather().chunk({"time": 1}).to_zarr(
        tmp_path / "s.zarr", zarr_format=zarr_format, encoding=encoding, consolidated=False
    )
    backend = backend_of(tmp_path / "s.zarr")
    assert isinstance(backend.decoder, ChunkFileDecoder), backend.description
    assert backend.description == "its zarr chunk files"


def test_sharded_stores_are_read_from_their_shards(tmp_path):
    encoding = {name: {"chunks": (1, 6, 8), "shards": (4, 6, 8)} for name in "uv"}
    weather().to_zarr(tmp_path / "s.zarr", zarr_format=3, encoding=encoding, consolidated=False)
    assert zarr.open_array(tmp_path / "s.zarr" / "u").shards == (4, 6, 8)
    backend = backend_of(tmp_path / "s.zarr")
    assert isinstance(backend.decoder, ChunkFileDecoder), backend.description


def test_a_declined_store_says_why_once(tmp_path, caplog):
    encoding = {"u": {"compressors": GzipCodec()}, "v": {"compressors": ZstdCodec()}}
    weather().chunk({"time": 1}).to_zarr(
        tmp_path / "s.zarr", zarr_format=3, encoding=encoding, consolidated=False
    )
    with caplog.at_level(logging.INFO, logger="xr_datamodule.resources"):
        backend = backend_of(tmp_path / "s.zarr")
    assert not isinstance(backend.decoder, ChunkFileDecoder)
    assert "chunk files declined for ['u']" in backend.description
    declined = [r for r in caplog.records if "chunk files declined" in r.getMessage()]
    assert len(declined) == 1
