"""A zarr store over HTTP (``xr_datamodule.testing.served``): deep prefetch and retries."""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.request

import numpy as np
import pytest
import torch

from tests.conftest import make_dataset, reference_windows
from xr_datamodule import XarrayDataModule, cells, retries
from xr_datamodule import order as training_order
from xr_datamodule.decode import ReadError
from xr_datamodule.remotechunks import RemoteChunkDecoder
from xr_datamodule.testing import served

pytest.importorskip("aiohttp")  # fsspec's HTTP filesystem

SETTINGS = dict(
    input_vars=["a", "b"],
    input_dims={"time": 2, "lat": 12, "lon": 10},
    input_overlap={"time": 1},
    target_dims={"time": 1, "lat": 12, "lon": 10},
    target_offset={"time": 2},
    splits={"train": 1.0},
    batch_size=4,
    load=False,
    num_workers=0,
    seed=3,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store of one step per chunk (a cell per step), and its dataset."""
    folder = tmp_path_factory.mktemp("http")
    ds = make_dataset(n_time=48)[["a", "b"]].astype(np.float32)
    ds.chunk({"time": 1}).to_zarr(folder / "store.zarr", zarr_format=3, consolidated=False)
    return folder, ds


def stats(url: str, fail: float | None = None) -> dict:
    path = "__stats__" if fail is None else f"__fail__/{fail}"
    return json.load(urllib.request.urlopen(f"{url}/{path}"))


def module(data: str) -> XarrayDataModule:
    return XarrayDataModule(data, **SETTINGS, open_kwargs={"consolidated": False})


def remote_epoch(url: str, workers: int = 0) -> tuple[XarrayDataModule, list, dict]:
    """An epoch of the store over HTTP, and the server's counts over it."""
    settings = {**SETTINGS, "num_workers": workers}
    remote = XarrayDataModule(f"{url}/store.zarr", **settings, open_kwargs={"consolidated": False})
    remote.setup("fit")
    stats(url, fail=0.0)  # counts anew
    before = stats(url)["requests"]
    batches = list(remote.train_dataloader())
    seen = stats(url)
    seen["requests"] -= before
    remote.teardown("fit")
    return remote, batches, seen


def test_a_remote_store_without_workers_fetches_batches_ahead_and_reads_as_local(
    store, monkeypatch
):
    folder, ds = store
    monkeypatch.setattr(cells, "MIN_CELL_BYTES", 0)  # a cell per chunk, one step
    local = module(str(folder / "store.zarr"))
    local.setup("fit")
    assert local.datasets["train"].reader.prefetch_batches == 1
    with served(folder, latency=0.05) as url:
        monkeypatch.setattr(training_order, "REMOTE_BATCHES_AHEAD", 1)
        _, _, one_ahead = remote_epoch(url)
        monkeypatch.setattr(training_order, "REMOTE_BATCHES_AHEAD", 8)
        remote, batches, seen = remote_epoch(url)
    assert remote.datasets["train"].reader.prefetch_batches == 8
    # Plain compressed chunks: fetched through the store, decoded by us, not by zarr.
    assert type(remote.datasets["train"].reader.decoder) is RemoteChunkDecoder
    # Several batches' requests at once, not one batch's.
    assert seen["most_in_flight"] >= 2 * one_ahead["most_in_flight"]
    # Each chunk fetched about once an epoch: the cells fetched ahead are not replaced by
    # cells of later batches before their batch reads them.
    assert seen["requests"] <= 1.1 * 2 * ds.sizes["time"]
    expected = list(local.train_dataloader())
    assert len(batches) == len(expected)
    order = np.concatenate(local.train_batches(epoch=0))
    starts = local.indices["train"].starts(order)
    reference = reference_windows(ds, ["a", "b"], local.window_dims, starts, (2, 12, 10))
    X = torch.cat([x for x, _ in batches]).numpy()
    np.testing.assert_array_equal(X, reference)
    for (x, y), (x_local, y_local) in zip(batches, expected, strict=True):
        assert torch.equal(x, x_local) and torch.equal(y, y_local)


def test_requests_that_fail_now_and_then_are_made_again_alone(store, monkeypatch, caplog):
    folder, ds = store
    monkeypatch.setattr(retries, "RETRY_BASE_SECONDS", 0.001)
    local = module(str(folder / "store.zarr"))
    local.setup("fit")
    with served(folder, fail_fraction=0.0, seed=1) as url:
        remote = module(f"{url}/store.zarr")
        remote.setup("fit")  # opened while the server answers every request
        stats(url, fail=0.2)
        with caplog.at_level(logging.WARNING, logger="xr_datamodule.retries"):
            batches = list(remote.train_dataloader())
        remote.teardown("fit")
        seen = stats(url)
    assert seen["failed"] > 10
    # Only a failed request is made again, not every request of its batch.
    assert seen["requests"] < 1.5 * 2 * ds.sizes["time"] + seen["failed"]
    for (x, y), (x_local, y_local) in zip(batches, local.train_dataloader(), strict=True):
        assert torch.equal(x, x_local) and torch.equal(y, y_local)
    retried = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert retried and "store.zarr" in retried[0] and "'a/c/" in retried[0] + retried[-1]
    assert "503" in retried[0]


def test_a_store_that_keeps_failing_stops_after_bounded_retries(store, monkeypatch):
    folder, _ = store
    monkeypatch.setattr(retries, "RETRY_BASE_SECONDS", 0.0)
    monkeypatch.setattr(retries, "READ_RETRIES", 2)
    with served(folder) as url:
        remote = module(f"{url}/store.zarr")
        remote.setup("fit")
        stats(url, fail=0.99)
        with pytest.raises(ReadError, match=r"could not read .*store.zarr"):
            next(iter(remote.train_dataloader()))
        remote.teardown("fit")  # the prefetches of later batches end (and fail) first
        seen = stats(url)
    # Each chunk asked for by the prefetch and again by the read that needs it, each time
    # READ_RETRIES + 1 attempts at most.
    assert 0 < seen["most_of_one_path"] <= 2 * (2 + 1)


def test_a_sharded_remote_store_reads_through_zarr_with_ranged_requests(tmp_path, monkeypatch):
    ds = make_dataset(n_time=48)[["a", "b"]].astype(np.float32)
    encoding = {name: {"chunks": (1, 12, 10), "shards": (8, 12, 10)} for name in ("a", "b")}
    ds.to_zarr(tmp_path / "store.zarr", zarr_format=3, consolidated=False, encoding=encoding)
    monkeypatch.setattr(retries, "RETRY_BASE_SECONDS", 0.001)
    local = module(str(tmp_path / "store.zarr"))
    local.setup("fit")
    with served(tmp_path, seed=2) as url:
        remote = module(f"{url}/store.zarr")
        remote.setup("fit")
        stats(url, fail=0.1)
        batches = list(remote.train_dataloader())
        remote.teardown("fit")
        assert stats(url)["failed"] > 0
    # Shards need ranged reads of their chunks: zarr-python reads them, through the
    # retrying store, and says so.
    assert type(remote.datasets["train"].reader.decoder).__name__ == "ZarrDecoder"
    assert "sharded" in remote.pipeline.backend.description
    for (x, y), (x_local, y_local) in zip(batches, local.train_dataloader(), strict=True):
        assert torch.equal(x, x_local) and torch.equal(y, y_local)


def test_each_worker_fetches_its_own_next_batches_from_a_remote_store(store, monkeypatch):
    folder, ds = store
    monkeypatch.setattr(cells, "MIN_CELL_BYTES", 0)  # a cell per chunk, one step
    with served(folder, latency=0.01) as url:
        monkeypatch.setattr(training_order, "REMOTE_BATCHES_AHEAD", 1)
        _, _, one_ahead = remote_epoch(url, workers=2)
        monkeypatch.setattr(training_order, "REMOTE_BATCHES_AHEAD", 8)
        remote, batches, seen = remote_epoch(url, workers=2)
    assert remote.datasets["train"].reader.prefetch_batches == 8
    # Fetching a worker's next batches ahead fetches no chunk more often than reading them
    # one batch at a time (the cells fetched ahead are kept until their batch is read).
    assert seen["requests"] <= one_ahead["requests"]
    # The windows of the order for two workers (it deals cells out to them), as ds.isel's.
    order = np.concatenate(remote.train_batches(epoch=0))
    starts = remote.indices["train"].starts(order)
    reference = reference_windows(ds, ["a", "b"], remote.window_dims, starts, (2, 12, 10))
    np.testing.assert_array_equal(torch.cat([x for x, _ in batches]).numpy(), reference)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux")
def test_the_server_runs_on_the_cpus_it_is_given_and_names_the_ones_it_may_use(tmp_path):
    allowed = sorted(os.sched_getaffinity(0))
    with served(tmp_path, cpus=allowed[-1:]) as url:
        assert stats(url)["cpus"] == allowed[-1:]
    with served(tmp_path) as url:
        assert stats(url)["cpus"] == allowed
    wrong = [max(allowed) + 1]
    with pytest.raises(ValueError, match=re.escape(f"may use, {allowed}; got {wrong}")):
        with served(tmp_path, cpus=wrong):
            pass
