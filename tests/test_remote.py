"""A zarr store on an S3-compatible server (moto, on 127.0.0.1 only), read by URL."""

from __future__ import annotations

import http.client
import http.server
import logging
import threading

import numpy as np
import pytest

from tests.conftest import reference_windows
from xr_datamodule import XarrayDataModule, retries
from xr_datamodule.decode import ReadError

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


class FlakyProxy(http.server.ThreadingHTTPServer):
    """An HTTP proxy on 127.0.0.1 in front of the S3 server that injects faults.

    ``failures``: how many more GET requests of chunk objects get a 500 ``InternalError``
    (a transient server error); ``denied_key``: an access key id answered with 403
    ``InvalidAccessKeyId`` (bad credentials).
    """

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream
        self.failures = 0
        self.failed: list[str] = []
        self.denied_key = "wrong"
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _reply(self, status: int, code: str) -> None:
        body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>{code}</Message></Error>"
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def _forward(self) -> None:
        proxy: FlakyProxy = self.server  # type: ignore[assignment]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if f"Credential={proxy.denied_key}/" in self.headers.get("Authorization", ""):
            return self._reply(403, "InvalidAccessKeyId")
        if self.command == "GET" and "/c/" in self.path:  # a chunk of zarr v3
            with proxy.lock:
                fail = proxy.failures > 0
                proxy.failures -= fail
            if fail:
                proxy.failed.append(self.path)
                return self._reply(500, "InternalError")
        connection = http.client.HTTPConnection(proxy.upstream.split("//")[1])
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        connection.request(self.command, self.path, body=body, headers=headers)
        answer = connection.getresponse()
        data = answer.read()
        self.send_response(answer.status)
        for key, value in answer.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        connection.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


@pytest.fixture(scope="module")
def proxy(bucket, request):
    server = FlakyProxy(bucket["client_kwargs"]["endpoint_url"])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    request.addfinalizer(server.shutdown)
    return server


def through(proxy: FlakyProxy, bucket: dict, key: str = "testing") -> dict:
    """Storage options that reach the store through the proxy; botocore does not retry."""
    return {
        **bucket,
        "key": key,
        "client_kwargs": {"endpoint_url": proxy.url},
        "config_kwargs": {"retries": {"total_max_attempts": 1}},
    }


@pytest.mark.parametrize("workers", [0, 2])
def test_transient_server_errors_are_retried_and_logged(
    small_ds, bucket, proxy, workers, monkeypatch, caplog
):
    monkeypatch.setattr(retries, "RETRY_BASE_SECONDS", 0.01)
    dm = XarrayDataModule(
        "s3://bucket/store.zarr",
        **SETTINGS,
        num_workers=workers,
        open_kwargs={"storage_options": through(proxy, bucket)},
    )
    dm.setup("fit")
    proxy.failures, proxy.failed[:] = 2, []
    loader = dm.val_dataloader()
    ids = np.concatenate([np.asarray(batch) for batch in loader.batch_sampler])
    with caplog.at_level(logging.WARNING, logger="xr_datamodule.retries"):
        X = np.concatenate([x.numpy() for x, _ in loader])
    assert len(proxy.failed) == 2
    expected = reference_windows(
        small_ds, ["a", "c"], dm.window_dims, dm.indices["val"].starts(ids), (3, 12, 10)
    )
    np.testing.assert_array_equal(X, expected.astype(np.float32))
    if workers == 0:  # a worker's log goes to its own stderr
        retried = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
        assert retried and "retry 1 of 4" in retried[0] and "s3://bucket/store.zarr" in retried[0]


def test_a_read_that_keeps_failing_names_the_url(bucket, proxy, monkeypatch):
    monkeypatch.setattr(retries, "RETRY_BASE_SECONDS", 0.0)
    dm = XarrayDataModule(
        "s3://bucket/store.zarr",
        **SETTINGS,
        num_workers=0,
        open_kwargs={"storage_options": through(proxy, bucket)},
    )
    dm.setup("fit")
    proxy.failures = 1000
    try:
        with pytest.raises(ReadError, match=r"could not read .* of 's3://bucket/store.zarr' at"):
            next(iter(dm.val_dataloader()))
    finally:
        proxy.failures = 0


def test_bad_credentials_name_the_url(bucket, proxy):
    with pytest.raises(OSError, match=r"could not open 's3://bucket/store.zarr'"):
        XarrayDataModule(
            "s3://bucket/store.zarr",
            **SETTINGS,
            open_kwargs={"storage_options": through(proxy, bucket, key="wrong")},
        ).setup("fit")
