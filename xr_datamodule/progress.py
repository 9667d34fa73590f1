"""A progress bar for the passes ``setup`` makes over the data, where someone watches.

Statistics, window statistics for weighted draws and NaN scans read the whole training split
(hours on an archive). In a terminal each pass shows dask's progress bar on stderr, with its
name; under CI (``CI`` set), when stderr is not a terminal, and in DDP ranks other than 0
nothing is drawn. With a ``distributed`` client the scheduler's dashboard shows the pass
(dask's local bar does not see a cluster's tasks).

Example:
    >>> import dask.array as da
    >>> with scan_progress("statistics"):
    ...     float(da.ones(10, chunks=5).sum().compute())
    10.0
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

__all__ = ["scan_progress", "shows_progress"]


def shows_progress() -> bool:
    """Whether a pass draws a bar: stderr a terminal, not CI, the first DDP rank."""
    if os.environ.get("CI") or not getattr(sys.stderr, "isatty", lambda: False)():
        return False
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK"))


@contextlib.contextmanager
def scan_progress(what: str) -> Iterator[None]:
    """Show dask's progress bar for the computations inside, labelled ``what``."""
    if not shows_progress():
        yield
        return
    from dask.diagnostics import ProgressBar

    print(f"xr_datamodule: {what}", file=sys.stderr, flush=True)
    with ProgressBar(minimum=1.0, out=sys.stderr):
        yield
