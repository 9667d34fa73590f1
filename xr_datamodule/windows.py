"""Window geometry and the sample index: integer start positions, no per-sample objects.

A *sample* is one input window plus one target window. Along every windowed dim the input
window covers ``[start, start + input_size)`` and the target window
``[start + offset, start + offset + target_size)``. Valid starts form a regular grid per dim
(stride = window - overlap, anchored at the lower edge of the split), so the index of a split
is a handful of 1-D integer arrays, one per dim; sample ``i`` is the ``i``-th point of their
Cartesian product in C order. Nothing here knows about xarray or torch.

Example:
    >>> geometry = WindowGeometry(dims=("time",), input_size=(4,), stride=(1,),
    ...                           target_size=(1,), target_offset=(4,))
    >>> index = build_index(geometry, {"time": (0, 10)})
    >>> len(index), index.starts([0, 5]).ravel().tolist()
    (6, [0, 5])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MAX_INDEX_BYTES",
    "SLAB_BYTES",
    "SampleIndex",
    "WindowGeometry",
    "build_index",
    "reduce_windows",
]

# Fields of one value per grid point (a window statistic, a missing-value mask) are computed
# in slabs along the first windowed dim of at most this many bytes (one window at least).
SLAB_BYTES = 256 * 2**20
# Most bytes the window starts along one dim may take (2**30 starts): a store that declares
# more positions than that is refused with a clear error, not a MemoryError inside numpy.
MAX_INDEX_BYTES = 8 * 2**30


@dataclass(frozen=True)
class WindowGeometry:
    """Sizes, strides and target offsets of the windows, per windowed dim.

    Args:
        dims: Windowed dims, in the order they have in the variables.
        input_size: Input window length per dim.
        stride: Step between consecutive window starts per dim (window - overlap).
        target_size: Target window length per dim.
        target_offset: Target window start relative to the input window start, per dim.
    """

    dims: tuple[str, ...]
    input_size: tuple[int, ...]
    stride: tuple[int, ...]
    target_size: tuple[int, ...]
    target_offset: tuple[int, ...]

    @property
    def reach_below(self) -> tuple[int, ...]:
        """How far below the input start a sample reaches (> 0 for negative offsets)."""
        return tuple(max(0, -off) for off in self.target_offset)

    @property
    def extent(self) -> tuple[int, ...]:
        """Length of the span one sample touches per dim (input and target windows)."""
        return tuple(
            max(size, off + tsize) - min(0, off)
            for size, off, tsize in zip(
                self.input_size, self.target_offset, self.target_size, strict=True
            )
        )

    def starts_along(self, axis: int, lower: int, upper: int) -> np.ndarray:
        """Valid input-window starts along one dim for samples inside ``[lower, upper)``.

        Args:
            axis: Position of the dim in :attr:`dims`.
            lower: First position the sample may touch.
            upper: One past the last position the sample may touch.

        Returns:
            int64 array of starts, empty when no full sample fits.
        """
        first = lower + self.reach_below[axis]
        last = upper - self.extent[axis] + self.reach_below[axis]
        if last < first:
            return np.empty(0, dtype=np.int64)
        count = (last - first) // self.stride[axis] + 1
        if count * 8 > MAX_INDEX_BYTES:
            raise ValueError(
                f"{count:,} window starts along {self.dims[axis]!r} would take "
                f"{count * 8 / 2**30:,.0f} GiB of index: the data declare "
                f"{upper - lower:,} positions there. Check the store's metadata (its shape), "
                "or select a part of it"
            )
        return np.arange(first, last + 1, self.stride[axis], dtype=np.int64)


@dataclass(frozen=True, eq=False)
class SampleIndex:
    """The samples of one split: a regular grid of window starts, one array per dim.

    Args:
        dims: Windowed dims, in :class:`WindowGeometry` order.
        axis_starts: Valid input-window starts along each dim.
        selected: Optional grid numbers (C order) of the samples kept, when some were
            dropped (e.g. windows with missing values); ``None`` keeps the whole grid.
    """

    dims: tuple[str, ...]
    axis_starts: tuple[np.ndarray, ...]
    selected: np.ndarray | None = None

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Number of window positions along each dim."""
        return tuple(len(starts) for starts in self.axis_starts)

    def __len__(self) -> int:
        if self.selected is not None:
            return len(self.selected)
        return int(np.prod(self.grid_shape, dtype=np.int64))

    def keep(self, mask: np.ndarray) -> SampleIndex:
        """The same split without the samples where ``mask`` (one bool per sample) is False."""
        grid_ids = np.arange(len(self)) if self.selected is None else self.selected
        return SampleIndex(self.dims, self.axis_starts, grid_ids[np.asarray(mask, bool)])

    def grid_ids(self) -> np.ndarray:
        """Grid number (C order over ``axis_starts``) of every sample."""
        grid_size = int(np.prod(self.grid_shape, dtype=np.int64))
        return np.arange(grid_size) if self.selected is None else self.selected

    def starts(self, sample_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Input-window starts of the given samples.

        Args:
            sample_ids: Sample numbers in ``[0, len(self))``.

        Returns:
            int64 array of shape ``(len(sample_ids), len(dims))``.

        Raises:
            IndexError: If a sample number is out of range.
        """
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            bad = ids[(ids < 0) | (ids >= len(self))][0]
            raise IndexError(f"sample {bad} is out of range for a split of {len(self)} samples")
        if self.selected is not None:
            ids = self.selected[ids]
        positions = np.unravel_index(ids, self.grid_shape)
        out = np.empty((ids.size, len(self.dims)), dtype=np.int64)
        for axis, (starts, pos) in enumerate(zip(self.axis_starts, positions, strict=True)):
            out[:, axis] = starts[pos]
        return out


def build_index(
    geometry: WindowGeometry,
    bounds: Mapping[str, tuple[int, int]],
) -> SampleIndex:
    """Build the sample index of a region.

    Args:
        geometry: Window sizes, strides and offsets.
        bounds: ``(lower, upper)`` positions per windowed dim that samples must stay inside;
            every dim of ``geometry`` must be present.

    Returns:
        The sample index; it may be empty (callers decide whether that is an error).
    """
    axis_starts = tuple(
        geometry.starts_along(axis, *bounds[dim]) for axis, dim in enumerate(geometry.dims)
    )
    return SampleIndex(dims=geometry.dims, axis_starts=axis_starts)


def reduce_windows(
    index: SampleIndex,
    offset: Sequence[int],
    size: Sequence[int],
    field_of: Callable[[int, int], np.ndarray],
    reduce: Callable[[np.ndarray, Sequence[int]], np.ndarray],
    step_bytes: int,
    budget: int | None = None,
) -> np.ndarray:
    """One value per sample: a reduction of a per-point field over each sample's window.

    The field is never built whole: ``field_of(lo, hi)`` gives it over positions
    ``lo:hi`` of the first dim (all of the others) and is called slab by slab, each slab
    holding at most ``budget`` bytes (:data:`SLAB_BYTES`) at ``step_bytes`` per position of
    the first dim (or one window's length, if that is more); memory then does not grow with
    the data.

    Args:
        index: The samples.
        offset: Where the window starts relative to each sample's start, per dim (the
            target's offset, or zeros for the input window).
        size: The window's length per dim.
        field_of: The field over a range of the first dim, shape ``(hi - lo, *others)``.
        reduce: ``reduce(field, size)``: the reduction over the box of ``size`` at every
            position of ``field`` (``field.shape[d] - size[d] + 1`` along each dim).
        step_bytes: Bytes ``field_of`` holds per position of the first dim as it computes.
        budget: Bytes per slab; default :data:`SLAB_BYTES`.

    Returns:
        An array with one value per sample, in sample order.

    Example:
        >>> index = SampleIndex(("time",), (np.arange(0, 8, 2),))
        >>> field = np.array([0.0, 5.0, 1.0, 2.0, 9.0, 3.0, 4.0, 0.0, 7.0])
        >>> def box_max(f, size):
        ...     return np.lib.stride_tricks.sliding_window_view(f, size[0]).max(-1)
        >>> reduce_windows(index, (1,), (2,), lambda lo, hi: field[lo:hi], box_max,
        ...                step_bytes=8, budget=24).tolist()
        [5.0, 9.0, 4.0, 7.0]
    """
    budget = SLAB_BYTES if budget is None else budget
    firsts = np.asarray(index.axis_starts[0], dtype=np.int64) + int(offset[0])
    others = [
        np.asarray(starts, dtype=np.int64) + int(o)
        for starts, o in zip(index.axis_starts[1:], offset[1:], strict=True)
    ]
    if np.any(np.diff(firsts) <= 0):
        raise ValueError("internal error: window starts are not increasing")
    span = max(int(size[0]), budget // max(1, int(step_bytes)))  # positions per slab
    parts, begin = [], 0
    while begin < len(firsts):
        lo = int(firsts[begin])
        end = max(begin + 1, int(np.searchsorted(firsts, lo + span - size[0], side="right")))
        hi = int(firsts[end - 1]) + int(size[0])
        boxes = reduce(field_of(lo, hi), size)
        parts.append(boxes[np.ix_(firsts[begin:end] - lo, *others)])
        begin = end
    if not parts:
        return np.empty(0)
    return np.concatenate(parts, axis=0).reshape(-1)[index.grid_ids()]
