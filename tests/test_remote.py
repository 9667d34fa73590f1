"""A zarr store on an S3-compatible server (moto, on 127.0.0.1 only), read by URL."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import reference_windows
from xr_datamodule import XarrayDataModule

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

SETTINGS = dict(
    input_vars=["a", "c"],
    target_vars=["b"],
    input_dims={"time": 3, "lat": 12, "lon": 10},
    splits={"train": 0.5, "val": 0.5},
    batch_size=4,
    load=False,
)


@pytest.fixture(scope="module")
def bucket(request):
    """A moto S3 server on loopback holding ``s3://bucket/store.zarr``; its storage options."""
    from tests.conftest import make_dataset

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    request.addfinalizer(server.stop)
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    options = {
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}"},
        "key": "testing",
        "secret": "testing",
    }
    s3fs.S3FileSystem(**options).mkdir("bucket")
    make_dataset().chunk({"time": 7}).to_zarr("s3://bucket/store.zarr", storage_options=options)
    return options


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("select", [None, {"level": [850, 200]}])
def test_a_remote_store_reads_like_the_local_copy(small_ds, bucket, workers, select):
    # With `select`, cells are read through xarray's lazy indexing of the parent's store:
    # the path that failed in forked workers (an event loop of the parent's).
    dm = XarrayDataModule(
        "s3://bucket/store.zarr",
        **SETTINGS,
        num_workers=workers,
        select=select,
        open_kwargs={"storage_options": bucket},
    )
    loader = dm.val_dataloader()
    ids = np.concatenate([np.asarray(batch) for batch in loader.batch_sampler])
    X = np.concatenate([x.numpy() for x, _ in loader])
    local = small_ds.sel(level=select["level"]) if select else small_ds
    starts = dm.indices["val"].starts(ids)
    expected = reference_windows(local, ["a", "c"], dm.window_dims, starts, (3, 12, 10))
    np.testing.assert_array_equal(X, expected.astype(np.float32))


def test_a_missing_bucket_names_the_url(bucket):
    with pytest.raises(OSError, match=r"could not open 's3://nobucket/store.zarr'"):
        XarrayDataModule(
            "s3://nobucket/store.zarr",
            **SETTINGS,
            open_kwargs={"storage_options": bucket},
        ).setup("fit")
