"""A slow, flaky HTTP object store on this machine, to try remote reading without a cloud.

:func:`served` serves a folder (a zarr store, say) over HTTP from a separate process, each
request answered after ``latency`` seconds and a share ``fail_fraction`` of them refused with
``503 Service Unavailable``, as a busy object store does; ranged reads (``Range: bytes=``,
what a sharded store asks for) are answered with those bytes. Its counts of requests are at
``<url>/__stats__`` (JSON: requests, failed, bytes, the most requests of one path, the most
requests answered at once, the CPUs it runs on); a request for ``<url>/__fail__/0.5`` sets
the share that fails from then on (and starts the counts of each path and of requests at once
anew). The benchmarks and tests of remote reading use it; it is here so that users can try
their own store, settings and retries the same way.

Example:
    >>> import json, tempfile, urllib.request
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "hello.txt").write_text("hi")
    >>> with served(folder, latency=0.01) as url:
    ...     text = urllib.request.urlopen(f"{url}/hello.txt").read().decode()
    ...     stats = json.load(urllib.request.urlopen(f"{url}/__stats__"))
    >>> text, stats["requests"]
    ('hi', 1)

Run as a script (``python xr_datamodule/testing.py FOLDER --latency 0.03``) it prints the
URL and serves until stopped. Only the standard library is used, so that the server starts
quickly and shares nothing with the process that reads.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

__all__ = ["served"]

STATS_PATH = "/__stats__"
FAIL_PATH = "/__fail__/"


@contextmanager
def served(
    folder: str | os.PathLike[str],
    latency: float = 0.0,
    fail_fraction: float = 0.0,
    seed: int = 0,
    cpus: Sequence[int] | None = None,
) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 from a child process; yields its URL.

    Args:
        folder: What to serve (``<url>/<name>`` is ``folder/<name>``).
        latency: Seconds each request waits before it is answered (a round trip to an
            object store is 20-100 ms).
        fail_fraction: Share of the requests for files answered ``503 Service Unavailable``
            (chosen at random with ``seed``).
        seed: Seed of the failures.
        cpus: The CPUs the server runs on (Linux; None: any of this process's). A cloud
            store does not run on the reader's cores; a benchmark on one machine keeps them
            apart this way.
    """
    if not 0.0 <= fail_fraction < 1.0:
        raise ValueError(f"fail_fraction must be in [0, 1), got {fail_fraction!r}")
    # -P: the script's folder (this package's modules) stays off the child's sys.path.
    command = [sys.executable, "-P", __file__, os.fspath(folder), "--latency", str(latency)]
    command += ["--fail-fraction", str(fail_fraction), "--seed", str(seed)]
    if cpus is not None:
        command += ["--cpus", ",".join(str(cpu) for cpu in checked_cpus(cpus))]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        if not url:
            raise RuntimeError(f"the HTTP server for {folder} did not start")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def checked_cpus(cpus: Sequence[int]) -> list[int]:
    """``cpus`` sorted, once each, after checking that this process may run on them."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("choosing the CPUs a process runs on needs Linux (os.sched_setaffinity)")
    allowed = os.sched_getaffinity(0)
    chosen = sorted(set(cpus))
    if not chosen or not set(chosen) <= allowed:
        raise ValueError(
            f"cpus must be among the CPUs this process may use, {sorted(allowed)}; got {list(cpus)}"
        )
    return chosen


class _Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.failed = 0
        self.bytes = 0
        self.per_path: dict[str, int] = {}
        self.fail_fraction = 0.0
        self.in_flight = 0
        self.most_in_flight = 0
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def _handler(folder: str, latency: float, fail_fraction: float, seed: int) -> type:
    counts = _Counts()
    counts.fail_fraction = fail_fraction
    draw = random.Random(seed)

    class Handler(SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # connections are kept open, as object stores do

        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=folder, **kwargs)  # type: ignore[arg-type]

        def do_GET(self) -> None:
            if self.path == STATS_PATH:
                self._send_stats()
                return
            if self.path.startswith(FAIL_PATH):
                with counts.lock:
                    counts.fail_fraction = float(self.path[len(FAIL_PATH) :])
                    counts.per_path = {}
                    counts.most_in_flight = 0
                self._send_stats()
                return
            with counts.lock:
                counts.in_flight += 1
                counts.most_in_flight = max(counts.most_in_flight, counts.in_flight)
            try:
                self._answer()
            finally:
                with counts.lock:
                    counts.in_flight -= 1

        def _answer(self) -> None:
            time.sleep(latency)
            with counts.lock:
                counts.requests += 1
                counts.per_path[self.path] = counts.per_path.get(self.path, 0) + 1
                fail = counts.fail_fraction > 0 and draw.random() < counts.fail_fraction
                counts.failed += fail
            if fail:
                self.send_error(503, "Service Unavailable")
                return
            if self.headers.get("Range"):
                self._send_range(self.headers["Range"])
                return
            super().do_GET()

        def _send_range(self, wanted: str) -> None:
            """A ``Range: bytes=a-b`` request (a shard's chunk), answered 206 with those bytes."""
            path = self.translate_path(self.path)
            if not os.path.isfile(path):
                self.send_error(404, "File not found")
                return
            with open(path, "rb") as file:
                data = file.read()
            start_text, _, end_text = wanted.removeprefix("bytes=").partition("-")
            if start_text:
                start = int(start_text)
                end = min(int(end_text), len(data) - 1) if end_text else len(data) - 1
            else:  # the last n bytes
                start, end = max(0, len(data) - int(end_text)), len(data) - 1
            part = data[start : end + 1]
            self.send_response(206)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.send_header("Content-Length", str(len(part)))
            self.end_headers()
            self.wfile.write(part)
            with counts.lock:
                counts.bytes += len(part)

        def do_HEAD(self) -> None:
            time.sleep(latency)
            super().do_HEAD()

        def copyfile(self, source: object, outputfile: object) -> None:
            data = source.read()  # type: ignore[attr-defined]
            outputfile.write(data)  # type: ignore[attr-defined]
            with counts.lock:
                counts.bytes += len(data)

        def _send_stats(self) -> None:
            with counts.lock:
                stats = {
                    "requests": counts.requests,
                    "failed": counts.failed,
                    "bytes": counts.bytes,
                    "most_of_one_path": max(counts.per_path.values(), default=0),
                    "most_in_flight": counts.most_in_flight,
                    "cpus": counts.cpus,
                }
                body = json.dumps(stats).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # a line per request would flood the reader's console

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # many connections open at once (the default 5 drops some)


def main(argv: list[str] | None = None) -> None:
    """Serve a folder until stopped; the first line printed is its URL."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--fail-fraction", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpus", default=None, help="comma-separated CPUs to run on")
    args = parser.parse_args(argv)
    if args.cpus:
        os.sched_setaffinity(0, checked_cpus([int(cpu) for cpu in args.cpus.split(",")]))
    folder = str(Path(args.folder).resolve())
    handler = _handler(folder, args.latency, args.fail_fraction, args.seed)
    server = _Server(("127.0.0.1", 0), handler)
    print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
