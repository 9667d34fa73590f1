"""Reads that fail for a reason that may pass (a dropped connection, a timeout, a server's 5xx).

Remote object stores fail now and then; a training run of days must not die of it. Such a
read is tried again with a bounded exponential back-off, each retry logged as a warning; a
missing file, a denied access or a corrupted chunk fails at once. The lower layers (botocore,
s3fs) retry some errors themselves: this is the last line, around a whole cell or an open.

Example:
    >>> calls = []
    >>> def flaky():
    ...     calls.append(1)
    ...     if len(calls) < 2:
    ...         raise ConnectionResetError("connection reset by peer")
    ...     return "read"
    >>> import xr_datamodule.retries as retries
    >>> retries.RETRY_BASE_SECONDS = 0.0
    >>> retrying(flaky, "a chunk")
    'read'
    >>> retries.RETRY_BASE_SECONDS = 0.5
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["READ_RETRIES", "is_transient", "retrying", "retrying_async", "worker_place"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Retries of a read that failed for a reason that may pass (a dropped connection, a timeout, a
# server's 5xx): READ_RETRIES more attempts, waiting RETRY_BASE_SECONDS x 2**attempt (at most
# RETRY_MAX_SECONDS, with +-25 % jitter so that workers do not retry in step).
READ_RETRIES = 4
RETRY_BASE_SECONDS = 0.5
RETRY_MAX_SECONDS = 8.0

_TRANSIENT_NAMES = {  # exception classes of aiohttp, botocore, requests, urllib3, fsspec
    "ClientConnectionError",
    "ClientOSError",
    "ClientPayloadError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "HTTPClientError",
    "ResponseStreamingError",
    "IncompleteRead",
    "ProtocolError",
    "FSTimeoutError",
}
_TRANSIENT_ERRNOS = {
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EAGAIN,
}
# Server replies (S3, GCS, HTTP, TensorStore's status codes) that may pass.
_TRANSIENT_WORDS = re.compile(
    r"slow ?down|service ?unavailable|internalerror|internal server error|\b50[234]\b"
    r"|\bunavailable\b|deadline_exceeded|timed out|connection reset",
    re.IGNORECASE,
)


def is_transient(error: BaseException) -> bool:
    """Whether a read error may pass if the read is tried again (network, server overload).

    The whole chain of causes is looked at: libraries wrap the network's errors in their own.
    A missing file, a denied access or a corrupted chunk is never transient.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, FileNotFoundError | PermissionError | KeyError):
            return False
        if isinstance(current, ConnectionError | TimeoutError | asyncio.TimeoutError):
            return True
        if any(klass.__name__ in _TRANSIENT_NAMES for klass in type(current).__mro__):
            return True
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        if _TRANSIENT_WORDS.search(str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False


def retrying(call: Callable[[], T], what: str) -> T:
    """``call()``, tried again with a bounded back-off while its errors are transient.

    Each retry is logged as a warning (what was read, the error, the wait); the last error,
    or the first one that is not transient, is raised.
    """
    for attempt in range(READ_RETRIES + 1):
        try:
            return call()
        except Exception as error:
            time.sleep(_wait_or_raise(error, attempt, what))
    raise AssertionError("unreachable")


async def retrying_async(call: Callable[[], Awaitable[T]], what: str) -> T:
    """``await call()`` with the retries of :func:`retrying`, waiting without blocking.

    For one request among many in flight: only the request that failed is made again.
    """
    for attempt in range(READ_RETRIES + 1):
        try:
            return await call()
        except Exception as error:
            await asyncio.sleep(_wait_or_raise(error, attempt, what))
    raise AssertionError("unreachable")


def _wait_or_raise(error: Exception, attempt: int, what: str) -> float:
    """Seconds to wait before retry ``attempt + 1``; raises ``error`` when none is left."""
    if attempt == READ_RETRIES or not is_transient(error):
        raise error
    wait = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2**attempt)
    wait *= random.uniform(0.75, 1.25)
    logger.warning(
        "reading %s failed%s (%s: %s); retry %d of %d in %.1f s",
        what,
        worker_place(),
        type(error).__name__,
        error,
        attempt + 1,
        READ_RETRIES,
        wait,
    )
    return wait


def worker_place() -> str:
    """`` in DataLoader worker 1 (pid 4242)`` inside a worker, else an empty string."""
    try:
        from torch.utils.data import get_worker_info
    except ImportError:  # reading without torch (no DataLoader, so no worker either)
        return ""
    worker = get_worker_info()
    return f" in DataLoader worker {worker.id} (pid {os.getpid()})" if worker else ""
