"""Helpers shared by the benchmarks: memory readings, and running a case in a fresh child.

Each case of our loader runs in a child process started by a fork server (a clean process
with the libraries imported once), so that no case inherits another's state. Two kinds of
state do not survive a fork of the benchmark's own process: GNU OpenMP's thread team (torch
ops run by the anchors would make torch's first parallel copy in the child hang), and
TensorStore's threads (a process forked after TensorStore ran cannot use it).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


def rss_of(pid: int, proportional: bool = True) -> int:
    """Proportional set size (shared pages split between processes), else resident size.

    PSS walks the page tables and stalls the process's memory mapping while it does, so it
    is read only between epochs; the polling thread reads the cheap resident size.
    """
    sources = [(f"/proc/{pid}/status", "VmRSS:")]
    if proportional:
        sources.insert(0, (f"/proc/{pid}/smaps_rollup", "Pss:"))
    for path, key in sources:
        try:
            with open(path) as status:
                for line in status:
                    if line.startswith(key):
                        return int(line.split()[1]) * 1024
        except OSError:
            continue
    return 0


def child_pids(pid: int) -> list[int]:
    pids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return pids


class RssMonitor:
    """Samples the memory of this process and its children (workers).

    Resident size by default (cheap); with ``proportional``, the proportional set size of
    the process, its children and, in a case's child, the fork server (:meth:`pss`): a
    forked worker's resident size counts every page it shares with its parent (the
    interpreter and libraries) again, its PSS only its share.
    """

    def __init__(self, interval: float = 0.25, proportional: bool = False) -> None:
        self.interval = interval
        self.proportional = proportional
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            if self.proportional:
                self.samples.append(self.pss())
            else:
                self.samples.append(
                    rss_of(me, False) + sum(rss_of(c, False) for c in child_pids(me))
                )
            time.sleep(self.interval)

    def __enter__(self) -> RssMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)

    @staticmethod
    def rss_total() -> int:
        """Resident size of this process and its children now."""
        me = os.getpid()
        return rss_of(me, False) + sum(rss_of(c, False) for c in child_pids(me))

    @staticmethod
    def pss() -> int:
        """PSS of this process, its children and, in a case's child, the fork server.

        The fork server shares its pages (the imported libraries) with every process forked
        from it: a case's DataLoader workers take a share of them that the fork server then
        no longer counts, so only the sum over all of them measures what the case added.
        """
        me = os.getpid()
        total = rss_of(me) + sum(rss_of(c) for c in child_pids(me))
        return total + (rss_of(os.getppid()) if _in_case_child else 0)


_PRELOAD = ["numpy", "torch", "xarray", "zarr", "lightning.pytorch", "xr_datamodule"]


def in_child(function: Callable[..., Any], *args: Any) -> Any:
    """Run ``function(*args)`` (picklable, module level) in a fresh child; return its result.

    The child is not a daemon, so it may start DataLoader workers of its own.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_run, args=(send, function, args))
    child.start()
    send.close()
    try:
        status, result = receive.recv()
    except EOFError:
        status, result = "error", f"the child died (exit code {child.join() or child.exitcode})"
    child.join()
    if status != "ok":
        raise RuntimeError(f"benchmark case failed in its child process:\n{result}")
    return result


_in_case_child = False  # set in the child a case runs in


def _run(send: Any, function: Callable[..., Any], args: tuple) -> None:
    global _in_case_child
    _in_case_child = True
    # A child of the fork server inherits its start method; DataLoader workers in a user's
    # process on Linux are forked.
    multiprocessing.set_start_method("fork", force=True)
    try:
        send.send(("ok", function(*args)))
    except BaseException:  # reported in the parent
        send.send(("error", traceback.format_exc()))


def rate(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds else float("nan")
