"""Beyond one machine: remote stores through fsspec URLs, whole-data passes on a dask cluster."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from tests.conftest import reference_windows
from xr_datamodule import XarrayDataModule

CONFIG = dict(
    input_vars=["a", "b"], input_dims={"time": 4, "lat": 6}, splits={"train": 1.0}, batch_size=16
)


def test_zarr_store_behind_an_fsspec_url(small_ds):
    fsspec = pytest.importorskip("fsspec")
    url = "memory://remote/small.zarr"
    small_ds.chunk({"time": 10}).to_zarr(url, mode="w")
    try:
        for load in (False, True):
            dm = XarrayDataModule(url, **CONFIG, load=load, num_workers=0)
            dm.setup("fit")
            ids = np.arange(len(dm.datasets["train"]))
            batch = dm.datasets["train"].__getitems__(ids)
            starts = dm.indices["train"].starts(ids)
            expected = reference_windows(small_ds, ["a", "b"], dm.window_dims, starts, (4, 6))
            np.testing.assert_array_equal(batch.inputs, expected.astype(np.float32))
    finally:
        fsspec.filesystem("memory").rm("/remote", recursive=True)


def test_loading_runs_on_a_dask_distributed_client(small_ds, tmp_path):
    distributed = pytest.importorskip("distributed")
    path = tmp_path / "store.zarr"
    small_ds.chunk({"time": 5}).to_zarr(path)
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        with distributed.Client(cluster) as client:
            dm = XarrayDataModule(xr.open_zarr(path), **CONFIG, load=True)
            dm.setup("fit")  # loading the selected variables is one whole-data pass
            tasks = client.run_on_scheduler(
                lambda dask_scheduler: (
                    len(dask_scheduler.tasks) + len(dask_scheduler.transition_log)
                )
            )
            assert tasks > 0  # the pass ran on the cluster
            X, _ = next(iter(dm.train_dataloader()))
    assert X.shape == (16, 2 * 10, 4, 6)
