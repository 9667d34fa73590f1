"""Remote zarr stores whose every chunk request is retried on its own.

A cell of a remote store is many chunk requests (a variable over a few dozen time steps, say).
Retrying the whole cell when one of them fails for a passing reason (a timeout, a server's
503) would repeat the requests that worked, and at a few percent of failed requests almost
every try of a large cell would fail again. :class:`RetryingStore` wraps the store zarr opens
(through zarr's public :class:`zarr.storage.WrapperStore`) and retries each request that
failed, with the bounded back-off of :func:`~xr_datamodule.retries.retrying`, while the
others go on.

Example:
    >>> import asyncio, zarr
    >>> store = RetryingStore(zarr.storage.MemoryStore(), "memory")
    >>> array = zarr.create_array(store, shape=(4,), chunks=(2,), dtype="int8")
    >>> array[:] = [1, 2, 3, 4]
    >>> zarr.open_array(store, mode="r")[:].tolist()
    [1, 2, 3, 4]
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from zarr.storage import FsspecStore, WrapperStore

from xr_datamodule.retries import retrying_async

__all__ = ["RetryingStore", "gather_requests", "open_remote_group", "open_remote_store"]

T = TypeVar("T")


@dataclass
class _Requests:
    """The store requests of one :func:`gather_requests`: how many run, whether to stop."""

    running: int = 0
    stopped: bool = False


# Set by gather_requests; the tasks zarr starts for its chunks inherit it (asyncio copies the
# context into each task), so that the store knows which reads its requests belong to.
_requests: ContextVar[_Requests | None] = ContextVar("xr_datamodule_requests", default=None)


async def gather_requests(reads: Sequence[Callable[[], Awaitable[Any]]]) -> None:
    """Run the reads at once; on the first failure stop the retries of the others, raise.

    zarr does not cancel the other chunks of a selection when one of them fails: they go on
    in the background. Their retries are stopped here, and their requests waited for, so
    that nothing is still being read for these reads once this returns.
    """
    state = _Requests()
    token = _requests.set(state)
    try:
        results = await asyncio.gather(*(read() for read in reads), return_exceptions=True)
    finally:
        _requests.reset(token)
    failures = [result for result in results if isinstance(result, BaseException)]
    if failures:
        state.stopped = True
        while state.running:
            await asyncio.sleep(0.005)
        raise failures[0]


class RetryingStore(WrapperStore[Any]):
    """A zarr store whose reads are each retried while their errors may pass.

    Args:
        store: The store read from (an ``FsspecStore`` of a URL, say).
        where: How warnings name the store (its URL; by default the store's own name).
    """

    def __init__(self, store: Any, where: str | None = None) -> None:
        super().__init__(store)
        # zarr re-wraps a store as type(store)(inner) (to make it read-only, say).
        self.where = where or str(store)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        """The store's ``get``, retried on its own when it fails for a passing reason."""
        call = partial(self._store.get, key, prototype, byte_range)
        return await self._retried(call, f"{key!r} of {self.where!r}")

    async def get_partial_values(
        self, prototype: Any, key_ranges: Iterable[tuple[str, Any]]
    ) -> list[Any]:
        """The store's ranged reads (a shard's chunks), retried like :meth:`get`."""
        key_ranges = list(key_ranges)
        call = partial(self._store.get_partial_values, prototype, key_ranges)
        keys = sorted({key for key, _ in key_ranges})
        return await self._retried(call, f"{', '.join(map(repr, keys))} of {self.where!r}")

    async def _retried(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        state = _requests.get()
        if state is None:
            return await retrying_async(call, what)

        async def attempt() -> T:
            if state.stopped:  # another read of the same batch failed for good
                raise asyncio.CancelledError(f"reading {what} stopped: another read failed")
            return await call()

        state.running += 1
        try:
            return await retrying_async(attempt, what)
        finally:
            state.running -= 1


# Connections an HTTP(S) store is read over at once. aiohttp's default (100) caps the requests
# in flight below what a reader that fetches several batches ahead keeps going.
HTTP_CONNECTIONS = 256


async def _http_client(**kwargs: Any) -> Any:
    """The HTTP client of fsspec with :data:`HTTP_CONNECTIONS` connections (``get_client``)."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=HTTP_CONNECTIONS)
    return aiohttp.ClientSession(connector=connector, **kwargs)


def open_remote_store(url: str, storage_options: dict[str, Any] | None) -> RetryingStore:
    """The store at ``url`` (read only), its requests retried one by one.

    An HTTP(S) store is read over up to :data:`HTTP_CONNECTIONS` connections unless the
    storage options give their own ``get_client``.
    """
    options = dict(storage_options or {})
    if url.startswith(("http://", "https://")):
        options.setdefault("get_client", _http_client)
    store = FsspecStore.from_url(url, storage_options=options, read_only=True)
    return RetryingStore(store, url)


def open_remote_group(url: str, group: str | None, storage_options: dict[str, Any] | None) -> Any:
    """The zarr group at ``url`` (read only), its chunk requests retried one by one."""
    import zarr

    return zarr.open_group(open_remote_store(url, storage_options), mode="r", path=group)
