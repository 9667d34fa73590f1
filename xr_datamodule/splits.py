"""Splits: turn label ranges or fractions into disjoint position ranges per windowed dim.

Two ways to give splits (not mixed):

* label ranges, inclusive at both ends as in ``ds.sel(dim=slice(start, stop))``::

      {"train": {"time": ["2019-03-01", "2019-03-21T23"]}, "val": {"time": [...]}}

  ``None`` leaves an end open. A dim without a coordinate takes positions.
* fractions of one dim (``split_dim``), as consecutive blocks in the order given::

      {"train": 0.8, "val": 0.1, "test": 0.1}

Every split is a box: a range on the dims it names, the whole length on the others. Boxes
must not overlap, so no data point is shared between splits; windows are then built inside
each box (see :mod:`xr_datamodule.windows`), so no window crosses a split boundary.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import numpy as np
import xarray as xr

from xr_datamodule.sources import label_range

__all__ = ["DEFAULT_SPLITS", "SPLIT_NAMES", "check_splits", "resolve_splits"]

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test", "predict")
DEFAULT_SPLITS: dict[str, Any] = {"train": 0.7, "val": 0.15, "test": 0.15}

Bounds = dict[str, tuple[int, int]]


def _is_fraction(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_splits(splits: Mapping[str, Any]) -> None:
    """Check the structure of a splits mapping (no data needed).

    Raises:
        ValueError: Unknown split name, mixed forms, fractions out of (0, 1] or summing above 1,
            a label range that is not ``[start, stop]``.
        TypeError: A split given as something else than a fraction or a mapping.
    """
    if not isinstance(splits, Mapping) or not splits:
        raise TypeError(
            f"splits must be a non-empty mapping of split name to range, got {splits!r}"
        )
    for name, spec in splits.items():
        if name not in SPLIT_NAMES:
            raise ValueError(f"splits: unknown split {name!r}. Valid: {SPLIT_NAMES}")
        if not (_is_fraction(spec) or isinstance(spec, Mapping)):
            raise TypeError(
                f"splits[{name!r}] must be a fraction (e.g. 0.8) or a mapping of dim to "
                f"[start, stop] labels, got {spec!r}"
            )
        if isinstance(spec, Mapping):
            for dim, bounds in spec.items():
                if (
                    isinstance(bounds, (str, bytes))
                    or not isinstance(bounds, Sequence)
                    or len(bounds) != 2
                ):
                    raise ValueError(
                        f"splits[{name!r}][{dim!r}] must be [start, stop] (inclusive labels, "
                        f"None for an open end), got {bounds!r}"
                    )
    kinds = {_is_fraction(spec) for spec in splits.values()}
    if len(kinds) > 1:
        raise ValueError("splits: give either fractions for all splits or label ranges for all")
    if kinds == {True}:
        for name, fraction in splits.items():
            if not 0 < fraction <= 1:
                raise ValueError(f"splits[{name!r}] = {fraction} must be in (0, 1]")
        total = float(sum(splits.values()))
        if total > 1 + 1e-9:
            raise ValueError(f"splits: fractions sum to {total:g}, above 1")


def _fraction_bounds(splits: Mapping[str, float], split_dim: str, length: int) -> dict[str, Bounds]:
    ends = np.rint(np.cumsum(list(splits.values())) * length).astype(np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    return {
        name: {split_dim: (int(lo), int(hi))}
        for name, lo, hi in zip(splits, starts, ends, strict=True)
    }


def _label_bounds(ds: xr.Dataset, name: str, dim: str, labels: Sequence[Any]) -> tuple[int, int]:
    start, stop = labels
    length = ds.sizes[dim]
    if dim not in ds.indexes:
        lo = 0 if start is None else int(start)
        hi = length if stop is None else int(stop) + 1
        return max(lo, 0), min(hi, length)
    index = ds.indexes[dim]
    try:
        positions = index.slice_indexer(start, stop)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"splits[{name!r}][{dim!r}]: cannot select labels {start!r} to {stop!r} on "
            f"{dim!r} (coordinate runs from {index[0]} to {index[-1]}): {err}"
        ) from err
    lo, hi, _ = positions.indices(length)
    if hi > lo and _outside(index, start, stop):
        logger.warning(
            "splits[%r][%r]: %r to %r reaches beyond the data; used %s to %s (%d steps)",
            name,
            dim,
            start,
            stop,
            index[lo],
            index[hi - 1],
            hi - lo,
        )
    return lo, hi


def _outside(index: Any, start: Any, stop: Any) -> bool:
    """Whether a label range starts before or ends after the labels (in their direction)."""
    try:
        ascending = bool(index.is_monotonic_increasing)
        first, last = index[0], index[-1]
        cast = (lambda x: x) if not hasattr(index, "tz") else (lambda x: type(first)(x))
        before = start is not None and (cast(start) < first if ascending else cast(start) > first)
        after = stop is not None and (cast(stop) > last if ascending else cast(stop) < last)
    except (TypeError, ValueError):  # labels that do not compare with the index (cftime)
        return False
    return bool(before or after)


def resolve_splits(
    splits: Mapping[str, Any],
    split_dim: str | None,
    ds: xr.Dataset,
    window_dims: Sequence[str],
) -> dict[str, Bounds]:
    """Position ranges ``[lower, upper)`` of every split along every windowed dim.

    Args:
        splits: Label ranges or fractions (see the module docstring); checked with
            :func:`check_splits` beforehand.
        split_dim: The dim that fractions split; required with fractions.
        ds: The source dataset.
        window_dims: The windowed dims.

    Returns:
        ``{split: {dim: (lower, upper)}}`` with every windowed dim present.

    Raises:
        KeyError: A split names a dim that is not windowed (or not in the data).
        ValueError: A range selects nothing, or two splits overlap.
    """
    if all(_is_fraction(spec) for spec in splits.values()):
        if split_dim is None or split_dim not in window_dims:
            raise KeyError(
                f"split_dim: {split_dim!r} is not a windowed dim. Valid: {tuple(window_dims)}"
            )
        named = _fraction_bounds(splits, split_dim, ds.sizes[split_dim])
    else:
        named = {}
        for name, spec in splits.items():
            for dim in spec:
                if dim not in window_dims:
                    raise KeyError(
                        f"splits[{name!r}]: dim {dim!r} is not a windowed dim. "
                        f"Valid: {tuple(window_dims)}"
                    )
            named[name] = {dim: _label_bounds(ds, name, dim, spec[dim]) for dim in spec}
    bounds = {
        name: {dim: ranges.get(dim, (0, ds.sizes[dim])) for dim in window_dims}
        for name, ranges in named.items()
    }
    for name, ranges in bounds.items():
        for dim, (lo, hi) in ranges.items():
            if hi <= lo:
                raise ValueError(
                    f"splits[{name!r}] selects no data along {dim!r} (check the label order: "
                    f"the coordinate runs from {_edge(ds, dim, 0)} to {_edge(ds, dim, -1)})"
                )
    _check_disjoint(bounds, ds)
    return bounds


def _edge(ds: xr.Dataset, dim: str, position: int) -> Any:
    return ds.indexes[dim][position] if dim in ds.indexes else position % ds.sizes[dim]


def _check_disjoint(bounds: Mapping[str, Bounds], ds: xr.Dataset) -> None:
    names = list(bounds)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            shared = all(
                max(bounds[first][dim][0], bounds[second][dim][0])
                < min(bounds[first][dim][1], bounds[second][dim][1])
                for dim in bounds[first]
            )
            if shared:
                raise ValueError(
                    f"splits {first!r} and {second!r} overlap: {first} covers "
                    f"{_described(bounds[first], ds)}, {second} covers "
                    f"{_described(bounds[second], ds)}; splits must be disjoint so no data "
                    "leaks between them"
                )


def _described(ranges: Bounds, ds: xr.Dataset) -> str:
    """The labels (and positions) a split covers along the dims it restricts."""
    parts = []
    for dim, (lo, hi) in ranges.items():
        if (lo, hi) == (0, ds.sizes[dim]):
            continue
        parts.append(label_range(ds, dim, lo, hi))
    return ", ".join(parts) or "everything"
