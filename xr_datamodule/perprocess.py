"""A value made once in each process: thread pools and open stores across forks.

Threads do not survive a fork, and a store handle opened in a parent may not be shared: a
forked DataLoader worker (or a reader pickled into a spawned one) must make its own. Every
such per-process value of the package goes through :class:`PerProcess`, which remembers the
process it was made in, makes a new one elsewhere, and closes it on request (``teardown``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Generic, TypeVar

__all__ = ["PerProcess", "thread_pool"]

T = TypeVar("T")


class PerProcess(Generic[T]):
    """``make()`` called once per process, on first :meth:`get`; pickled without the value.

    Args:
        make: Makes the value (picklable: workers receive it).
        close: Releases a value (picklable), e.g. a pool's ``shutdown``; default none.

    Example:
        >>> pool = thread_pool(2)
        >>> pool.get() is pool.get()
        True
        >>> pool.close(); pool.held() is None
        True
    """

    def __init__(self, make: Callable[[], T], close: Callable[[T], Any] | None = None) -> None:
        self.make = make
        self.closer = close
        self._held: tuple[int, T] | None = None  # (owner pid, value)
        self._lock = threading.Lock()  # a prefetch thread and the main thread both ask

    def get(self) -> T:
        """This process's value, made on first use."""
        with self._lock:
            held = self._held
            if held is None or held[0] != os.getpid():
                held = self._held = (os.getpid(), self.make())
            return held[1]

    def held(self) -> T | None:
        """This process's value if made already, else None."""
        held = self._held
        return held[1] if held is not None and held[0] == os.getpid() else None

    def put(self, value: T) -> None:
        """Use ``value`` (made by the caller in this process) from now on."""
        self._held = (os.getpid(), value)

    def close(self) -> None:
        """Release this process's value (made again on the next :meth:`get`)."""
        value = self.held()
        self._held = None
        if value is not None and self.closer is not None:
            self.closer(value)

    def __getstate__(self) -> dict:
        return {"make": self.make, "closer": self.closer}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["make"], state["closer"])  # type: ignore[misc]


def _shutdown(pool: ThreadPoolExecutor) -> None:
    pool.shutdown(wait=True)


def thread_pool(threads: int) -> PerProcess[ThreadPoolExecutor]:
    """A thread pool of ``threads`` threads per process, shut down by ``close``."""
    return PerProcess(partial(ThreadPoolExecutor, threads), _shutdown)
