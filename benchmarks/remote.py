"""The remote scenario of ``benchmarks/throughput.py``: the global store over HTTP, with latency.

The global scenario's store (82 channels on 64 x 128, zarr v3, one step per chunk; 2 input
steps -> the next, batches of 8, shuffled) is served from another process over HTTP on
127.0.0.1 by :func:`xr_datamodule.testing.served`, each request answered after a latency
(30 and 100 ms by default: what a cloud object store takes). Per latency it measures:

* the store's GET limit: every chunk of the store fetched once with 128 requests in flight
  (aiohttp, the client under fsspec's HTTP filesystem), expressed as bytes delivered per
  epoch (each chunk feeds three samples);
* a hand-written Dataset (zarr over fsspec, one ``[t:t+3]`` slice per variable per sample,
  ``DataLoader(shuffle=True)``), with a time cap: at one round trip per variable and sample
  it does not finish an epoch in reasonable time;
* our training loader over whole epochs, with 0 and 2 workers, and the requests per chunk of
  the store it made per epoch (counted by the server).

Run alone: ``python benchmarks/remote.py --latency 0.03 0.1``. On a machine of four cores or
more, ``--server-cpus 2 3 --client-cpus 0 1`` keeps the server off the cores that read (the
limit's client, ours and the hand-written Dataset, workers included), as a cloud store is:
on one machine of two cores the server takes CPU the reader needs (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import global_fields
import numpy as np
import zarr
from bench_common import in_child
from torch.utils.data import DataLoader

from xr_datamodule.testing import checked_cpus, served

IN_FLIGHT = 128  # concurrent GETs of the limit
N_TIME = 720  # the store (1.9 GB decoded) well beyond the readers' arenas


def chunk_keys(path: Path) -> list[str]:
    """Every chunk file of the store, relative to it (metadata documents left out)."""
    return sorted(
        str(file.relative_to(path))
        for file in path.rglob("*")
        if file.is_file() and file.name not in ("zarr.json", ".zarray", ".zattrs", ".zgroup")
    )


async def _fetch_all(url: str, keys: list[str]) -> int:
    connector = aiohttp.TCPConnector(limit=IN_FLIGHT)
    gate = asyncio.Semaphore(IN_FLIGHT)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def fetch(key: str) -> int:
            async with gate, session.get(f"{url}/{key}") as response:
                response.raise_for_status()
                return len(await response.read())

        sizes = await asyncio.gather(*(fetch(key) for key in keys))
    return sum(sizes)


@contextmanager
def running_on(cpus: list[int] | None) -> Iterator[None]:
    """This process runs on ``cpus`` (None: as it is) until the block ends."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, checked_cpus(cpus))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def pinned(cpus: list[int] | None, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` run on ``cpus``: a case's child (and its workers) stays there."""
    with running_on(cpus):
        return function(*args)


def get_limit(url: str, keys: list[str], repeats: int = 2) -> float:
    """Seconds to fetch every chunk once with ``IN_FLIGHT`` GETs in flight (best of repeats)."""
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        asyncio.run(_fetch_all(url, keys))
        best = min(best, time.perf_counter() - began)
    return best


class HandWritten(global_fields.HandWritten):
    """The global scenario's hand-written Dataset; the group is opened in each process."""

    def __init__(self, url: str, n_time: int) -> None:
        self.url, self.n = url, n_time - global_fields.INPUT_STEPS
        self._group = None

    @property
    def group(self):  # type: ignore[override]
        if self._group is None:
            self._group = zarr.open_group(self.url, mode="r")
        return self._group

    def __getstate__(self) -> dict:
        return {"url": self.url, "n": self.n, "_group": None}


def hand_written(url: str, n_time: int, workers: int, seconds: float) -> dict:
    import torch

    loader = DataLoader(
        HandWritten(url, n_time),
        batch_size=global_fields.BATCH,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(0),
    )
    began, nbytes = time.perf_counter(), 0
    for X, y in loader:
        nbytes += X.nbytes + y.nbytes
        if time.perf_counter() - began > seconds:
            break
    return dict(rate=nbytes / (time.perf_counter() - began) / 1e6)


def server_counts(url: str, anew: bool = False) -> dict:
    """The server's counts; ``anew``: start its most-at-once count again."""
    path = "__fail__/0.0" if anew else "__stats__"
    return json.load(urllib.request.urlopen(f"{url}/{path}"))


def ours(url: str, store_url: str, workers: int, epochs: int, chunks: int) -> dict:
    dm = global_fields.ours_module(
        store_url, workers, "chunks", open_kwargs={"consolidated": False}
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    seconds, nbytes, per_chunk, at_once = [], [], [], []
    for _ in range(epochs):
        before = server_counts(url, anew=True)["requests"]
        began, total = time.perf_counter(), 0
        for X, y in loader:
            total += X.nbytes + y.nbytes
        seconds.append(time.perf_counter() - began)
        nbytes.append(total)
        counts = server_counts(url)
        per_chunk.append((counts["requests"] - before) / chunks)
        at_once.append(counts["most_in_flight"])
    steady = slice(1, None) if epochs > 1 else slice(None)
    return dict(
        rate=sum(nbytes[steady]) / sum(seconds[steady]) / 1e6,
        epoch_seconds=seconds,
        per_chunk=float(np.mean(per_chunk[steady])),
        at_once=max(at_once),
        epoch_bytes=nbytes[-1],
        decoder=type(dm.datasets["train"].reader.decoder).__name__,
    )


def run_remote(
    workdir: Path,
    latencies: list[float],
    workers_list: list[int],
    epochs: int,
    seconds: float,
    n_time: int = N_TIME,
    server_cpus: list[int] | None = None,
    client_cpus: list[int] | None = None,
) -> list[dict]:
    path = workdir / "remote_global.zarr"
    global_fields.write_store(path, n_time, 1)
    keys = chunk_keys(path)
    samples = n_time - global_fields.INPUT_STEPS
    epoch_bytes = samples * global_fields.SAMPLE_BYTES
    print(
        f"\n== remote: the global store ({n_time} steps, {len(keys)} chunks) over HTTP on "
        f"127.0.0.1, a latency per request; limit: every chunk once, {IN_FLIGHT} GETs in "
        "flight, as bytes per epoch =="
    )
    if server_cpus or client_cpus:
        print(f"  the server on CPUs {server_cpus or 'any'}, the readers on {client_cpus or 'any'}")
    rows = []
    for latency in latencies:
        with served(workdir, latency=latency, cpus=server_cpus) as url:
            store_url = f"{url}/{path.name}"
            with running_on(client_cpus):
                limit = epoch_bytes / get_limit(store_url, keys) / 1e6
            print(f"  latency {latency * 1e3:.0f} ms: GET limit {limit:7.0f} MB/s")
            for workers in workers_list:
                hand = in_child(
                    pinned, client_cpus, hand_written, store_url, n_time, workers, seconds
                )
                result = in_child(
                    pinned, client_cpus, ours, url, store_url, workers, epochs, len(keys)
                )
                print(
                    f"    {workers} workers: hand-written {hand['rate']:6.1f} MB/s; ours "
                    f"{result['rate']:6.0f} MB/s = {result['rate'] / limit:.2f}x the limit, "
                    f"{result['rate'] / hand['rate']:.0f}x hand-written; "
                    f"{result['per_chunk']:.2f} requests per chunk, at most "
                    f"{result['at_once']} at once; epochs "
                    f"{' '.join(f'{s:.2f}' for s in result['epoch_seconds'])} s "
                    f"({result['decoder']})"
                )
                rows.append(
                    dict(latency=latency, workers=workers, limit=limit, hand=hand, ours=result)
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, nargs="+", default=[0.03, 0.1])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--n-time", type=int, default=N_TIME)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--server-cpus", type=int, nargs="+", default=None)
    parser.add_argument("--client-cpus", type=int, nargs="+", default=None)
    args = parser.parse_args()
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="xr_dm_remote_"))
    os.makedirs(workdir, exist_ok=True)
    run_remote(
        workdir,
        args.latency,
        args.workers,
        args.epochs,
        args.seconds,
        args.n_time,
        args.server_cpus,
        args.client_cpus,
    )


if __name__ == "__main__":
    main()
