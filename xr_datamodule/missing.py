"""Missing values (NaN; ±Inf get the same treatment): find them or the windows holding them.

The data are scanned once, out of core (dask reduces a lazy store chunk by chunk), into one
boolean per grid point of the windowed dims: "some selected variable or channel is NaN
here". Which windows touch such a point is then a box-``any`` over that mask, computed for
all window positions at once with sliding-window views (no loop over windows). The mask takes
one byte per grid point of the windowed dims.

Example:
    >>> import numpy as np, xarray as xr
    >>> ds = xr.Dataset({"x": (("time",), np.array([0.0, 1.0, np.nan, 3.0, 4.0]))})
    >>> mask = missing_mask(ds, ["x"], ("time",))
    >>> box_any(mask, (2,)).tolist()   # windows of 2 starting at 0..3
    [False, True, True, False]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import dask
import numpy as np
import xarray as xr

__all__ = [
    "MISSING_ADVICE",
    "NAN_POLICIES",
    "MissingValueError",
    "StaticMask",
    "absent_chunks",
    "box_any",
    "describe_missing",
    "first_missing",
    "first_nan",
    "holds_nan",
    "missing_mask",
    "non_finite",
    "scannable",
]

NAN_POLICIES = ("check", "keep", "error", "drop", "fill", None)  # None: the default, "check"
MISSING_ADVICE = (
    "use nan_policy='drop' to leave out windows with missing values, nan_policy='fill' to "
    "replace them, or nan_policy='keep' if your model handles NaN itself (a zarr chunk "
    "missing from the store reads as NaN)"
)


class MissingValueError(ValueError):
    """A missing (NaN) or non-finite (±Inf) value: in a batch, or in ``setup`` (``"error"``)."""


SCAN_CHUNK_BYTES = 64 * 2**20  # chunk size of the scan over a store without chunks
# Arrays with more chunks are not listed in setup (zarr lists every key: 10^8 chunks took
# over 50 s); their absent chunks still read as the fill value, NaN for floats, and the
# first batch that touches one fails under nan_policy="check".
MAX_LISTED_CHUNKS = 1_000_000


def holds_nan(block: np.ndarray) -> bool:
    """Whether a float array holds a missing or non-finite value (NaN, +Inf or -Inf).

    One pass at memory speed without a temporary where the block is contiguous: the dot
    product of the block with itself (measured on a 10 MB cell: 0.27 ms, against 0.22 for
    ``max`` alone, which finds NaN and +Inf only, and 0.43 for ``max`` and ``min``);
    ``isfinite().all()`` needs a temporary.

    Example:
        >>> holds_nan(np.array([1.0, -np.inf])), holds_nan(np.full(3, 1e30, np.float32))
        (True, False)
    """
    if block.dtype.kind not in "fc" or block.size == 0:
        return False
    if block.dtype.kind == "f" and block.dtype.itemsize >= 4 and block.flags.c_contiguous:
        flat = block.reshape(-1)
        # x . x in one BLAS pass: NaN and ±Inf make it NaN or Inf (so may huge values, whose
        # squares overflow: then the exact test decides).
        with np.errstate(over="ignore", invalid="ignore"):
            if math.isfinite(np.dot(flat, flat)):
                return False
        return not bool(np.isfinite(block).all())
    if block.dtype.kind == "f":  # max propagates NaN and finds +Inf; min finds -Inf
        return not (math.isfinite(np.max(block)) and math.isfinite(np.min(block)))
    return not bool(np.isfinite(block).all())


def describe_missing(value: Any) -> str:
    """``missing value (NaN)`` or ``non-finite value (inf)``: what a message calls a value."""
    value = float(value)
    return "missing value (NaN)" if math.isnan(value) else f"non-finite value ({value})"


def non_finite(values: Any) -> Any:
    """Where values are missing or non-finite (NaN, ±Inf): numpy arrays and DataArrays."""
    return ~np.isfinite(values)


def first_nan(array: np.ndarray) -> list[int]:
    """Index of the first NaN or ±Inf of ``array`` (C order), once :func:`holds_nan` said so."""
    return np.argwhere(~np.isfinite(array))[0].tolist()


def absent_chunks(arrays: Mapping[str, Any]) -> dict[str, tuple[int, int, Any]]:
    """Chunks a zarr store lacks, per variable: ``{name: (absent, total, fill value)}``.

    One listing of each array's keys (cheap on a local store; on an object store it is one
    listing request per thousand chunks, so it is only done for local stores). Absent chunks
    read as the array's fill value: an interrupted write or a partial copy, or chunks left
    out on purpose because they held only the fill value (``write_empty_chunks=False``).
    """
    found = {}
    for name, array in arrays.items():
        if int(array.nchunks) > MAX_LISTED_CHUNKS:
            continue  # listing them all would take minutes; an absent one reads as NaN later
        absent = int(array.nchunks) - int(array.nchunks_initialized)
        if absent > 0:
            found[name] = (absent, int(array.nchunks), array.metadata.fill_value)
    return found


def scannable(ds: xr.Dataset, name: str, window_dims: Sequence[str]) -> xr.DataArray:
    """The variable, chunked along the first windowed dim if lazy and unchunked.

    A reduction over it then runs out of core (dask, chunk by chunk).
    """
    var = ds[name]
    if var.chunks is None and not var.variable._in_memory:
        per_step = int(np.prod([n for d, n in var.sizes.items() if d != window_dims[0]]))
        step = max(1, SCAN_CHUNK_BYTES // max(per_step * var.dtype.itemsize, 1))
        var = var.chunk({window_dims[0]: step})
    return var


def _is_missing(ds: xr.Dataset, name: str, window_dims: Sequence[str]) -> xr.DataArray:
    var = scannable(ds, name, window_dims)
    extra = [dim for dim in var.dims if dim not in window_dims]
    missing = var.isnull() | np.isinf(var) if var.dtype.kind in "fc" else var.isnull()
    return (missing.any(extra) if extra else missing).transpose(*window_dims)


def missing_mask(ds: xr.Dataset, names: Sequence[str], window_dims: Sequence[str]) -> np.ndarray:
    """Boolean over the windowed dims: True where any selected variable/channel is NaN/±Inf."""
    parts = dask.compute(*[_is_missing(ds, name, window_dims) for name in names])
    mask = np.zeros(tuple(ds.sizes[dim] for dim in window_dims), dtype=bool)
    for part in parts:
        mask |= np.asarray(part)
    return mask


def box_any(mask: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """For every window position, whether the window of ``size`` there holds a True.

    Returns:
        Boolean array with ``mask.shape[d] - size[d] + 1`` positions along each dim.
    """
    out = mask
    for axis, length in enumerate(size):
        out = np.asarray(np.lib.stride_tricks.sliding_window_view(out, length, axis=axis).any(-1))
    return out


def first_missing(
    ds: xr.Dataset, names: Sequence[str], window_dims: Sequence[str]
) -> tuple[str, dict[str, object]] | None:
    """The first variable with a NaN (or ±Inf) and the coordinates of the first, or ``None``.

    Scanned in slabs along the first windowed dim (:data:`~xr_datamodule.windows.SLAB_BYTES`
    of mask at most), so memory does not grow with the data.
    """
    from xr_datamodule import windows  # read at call time: tests shrink the slabs

    first = window_dims[0]
    per_step = int(np.prod([ds.sizes[dim] for dim in window_dims[1:]]))
    step = max(1, windows.SLAB_BYTES // max(per_step, 1))
    for name in names:
        for lo in range(0, ds.sizes[first], step):
            slab = ds.isel({first: slice(lo, lo + step)})
            hits = np.argwhere(np.asarray(dask.compute(_is_missing(slab, name, window_dims))[0]))
            if not len(hits):
                continue
            where = {}
            for axis, (dim, position) in enumerate(zip(window_dims, hits[0], strict=True)):
                position = int(position) + (lo if axis == 0 else 0)
                labels = ds.indexes[dim] if dim in ds.indexes else None
                where[dim] = labels[position] if labels is not None else position
            return name, where
    return None


class StaticMask:
    """Where targets are valid, from a static variable of the data (e.g. an ocean mask).

    True (or nonzero) where a target value counts, False (zero, NaN) where it does not: the
    land points under an ocean model, outside a radar's range. Dict batches' ``target_mask``
    is False there, predictions put back on the grid are NaN there, and metrics skip them.

    Args:
        source: The source dataset.
        name: The mask variable: its dims are windowed dims other than time.
        window_dims: The windowed dims, in window axis order.
        time_dim: The time dim (a static mask must not vary along it), if any.

    Example:
        >>> ds = xr.Dataset({"ocean": (("lat", "lon"), [[1, 0, 1], [1, 1, 0]])})
        >>> mask = StaticMask(ds, "ocean", ("time", "lat", "lon"), "time")
        >>> starts = np.array([[5, 0, 1]])  # (time, lat, lon) of one window's first point
        >>> mask.window(starts, (1, 2, 2)).astype(int).tolist()
        [[[[[0, 1], [1, 0]]]]]
    """

    def __init__(
        self, source: xr.Dataset, name: str, window_dims: Sequence[str], time_dim: str | None
    ) -> None:
        if name not in source.data_vars:
            raise KeyError(f"mask: {name!r} is not a variable of the data. Valid: {list(source)}")
        variable = source[name]
        dims = tuple(map(str, variable.dims))
        wrong = [dim for dim in dims if dim not in window_dims or dim == time_dim]
        if wrong or not dims:
            raise ValueError(
                f"mask: variable {name!r} has dims {dims}; a static mask spans windowed dims "
                f"other than time only (here {tuple(d for d in window_dims if d != time_dim)})"
            )
        self.name = name
        self.axes = [list(window_dims).index(dim) for dim in dims]
        order = [dim for dim in window_dims if dim in dims]
        values = np.asarray(variable.transpose(*order).values)
        if values.dtype.kind == "f":
            values = np.nan_to_num(values, nan=0.0)
        self.values = values.astype(bool)
        self.ndim = len(window_dims)
        self.field = variable.transpose(*order).notnull() & (variable.transpose(*order) != 0)

    def window(self, starts: np.ndarray, size: Sequence[int]) -> np.ndarray:
        """The mask over windows of ``size`` at ``starts`` ``(batch, ndim)``.

        Shape ``(batch, 1, *window)``, with length 1 along the dims the mask lacks.
        """
        axes = sorted(self.axes)
        index = []
        for k, axis in enumerate(axes):
            shape = [1] * (len(axes) + 1)
            shape[0] = -1
            shape[1 + k] = size[axis]
            positions = np.asarray(starts)[:, axis, None] + np.arange(size[axis])
            index.append(positions.reshape(shape))
        picked = self.values[tuple(index)]  # (batch, *mask dims' window)
        shape = [len(starts), 1] + [size[a] if a in axes else 1 for a in range(self.ndim)]
        return picked.reshape(shape)
