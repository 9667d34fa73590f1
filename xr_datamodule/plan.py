"""The sample plan: which windows each split serves (integer start grids, checked).

How samples are chosen, in one place: the window geometry (:func:`window_geometry`: sizes,
strides, target offsets, checked against the data), the split bounds
(:mod:`~xr_datamodule.splits`), the time axes (:mod:`~xr_datamodule.timeaxis`: order, step,
gaps), then per split one :class:`~xr_datamodule.windows.SampleIndex` from which samples
crossing a time gap (``gaps``) or holding a missing value (``nan_policy="drop"``) are left
out. Built once by :func:`plan_samples`; nothing here reads more than the NaN scans need.

Invariants: a split's windows (input and target span) lie inside its bounds along every
windowed dim; sample ``i`` of a split is the ``i``-th kept point of its start grid in C
order, the same in every process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from xr_datamodule.layout import SourceLayout
from xr_datamodule.missing import (
    MISSING_ADVICE,
    MissingValueError,
    box_any,
    first_missing,
    missing_mask,
)
from xr_datamodule.progress import scan_progress
from xr_datamodule.spec import DataSpec
from xr_datamodule.splits import resolve_splits
from xr_datamodule.timeaxis import AxisCheck, apply_gap_policy, check_axis
from xr_datamodule.windows import SampleIndex, WindowGeometry, build_index, reduce_windows

__all__ = ["SamplePlan", "plan_samples", "skipped_starts", "window_geometry"]

logger = logging.getLogger(__name__)


def window_geometry(spec: DataSpec, layout: SourceLayout) -> WindowGeometry:
    """Window sizes, strides and offsets in the layout's dim order, checked against the data.

    Raises:
        ValueError: A window (input, or target at its offset) longer than its dim.
    """
    dims, source = layout.window_dims, layout.source
    assert spec.input_overlap is not None and spec.target_dims is not None
    overlap, offset = spec.input_overlap, spec.target_offset or {}
    geometry = WindowGeometry(
        dims=dims,
        input_size=tuple(spec.input_dims[d] for d in dims),
        stride=tuple(spec.input_dims[d] - overlap.get(d, 0) for d in dims),
        target_size=tuple(spec.target_dims[d] for d in dims),
        target_offset=tuple(offset.get(d, 0) for d in dims),
    )
    for axis, dim in enumerate(dims):
        length = source.sizes[dim]
        if geometry.input_size[axis] > length:
            raise ValueError(
                f"input_dims[{dim!r}] = {geometry.input_size[axis]} is larger than the "
                f"dim {dim!r} ({length})"
            )
        if geometry.extent[axis] > length:
            raise ValueError(
                f"the target window (target_offset[{dim!r}] = {geometry.target_offset[axis]}, "
                f"target_dims[{dim!r}] = {geometry.target_size[axis]}) lies outside the data: "
                f"one sample spans {geometry.extent[axis]} positions along {dim!r}, which has "
                f"{length}"
            )
    return geometry


@dataclass(frozen=True)
class SamplePlan:
    """The samples of every split, and what was left out on the way.

    Args:
        geometry: The window geometry.
        split_dim: The dim fractions split (and ``batch_spread`` measures by default).
        split_bounds: Position range ``[lower, upper)`` of every split along every windowed dim.
        axes: The checked labels of every windowed dim with a coordinate.
        indices: Sample index of every split.
        gap_samples: Samples left out per split for crossing a time gap.
        dropped_samples: Samples left out per split for a missing value (``nan_policy="drop"``).
    """

    geometry: WindowGeometry
    split_dim: str
    split_bounds: dict[str, dict[str, tuple[int, int]]]
    axes: dict[str, AxisCheck]
    indices: dict[str, SampleIndex]
    gap_samples: dict[str, int]
    dropped_samples: dict[str, int]

    @property
    def split_sizes(self) -> dict[str, int]:
        """Number of samples per split."""
        return {name: len(index) for name, index in self.indices.items()}

    def split_for(self, split: str) -> str:
        """The split a stage reads: without a ``predict`` split, prediction reads ``test``."""
        return "test" if split == "predict" and "predict" not in self.indices else split

    def index(self, split: str) -> SampleIndex:
        """The sample index ``split`` reads (see :meth:`split_for`), or a clear error."""
        name = self.split_for(split)
        if name not in self.indices:
            raise ValueError(f"unknown split {split!r}. Valid: {tuple(self.indices)}")
        return self.indices[name]


def plan_samples(
    spec: DataSpec,
    layout: SourceLayout,
    geometry: WindowGeometry,
    restrict: Callable[[dict[str, tuple[int, int]], WindowGeometry], dict] | None = None,
) -> SamplePlan:
    """Split bounds, checked time axes and the sample index of every split.

    ``restrict`` narrows each split's bounds (other grids: where their windows fit and start
    on their cells' edges, :meth:`~xr_datamodule.grids.GridPlan.restrict`).

    Raises:
        TimeAxisError: A time axis that repeats a label or runs backwards.
        ValueError: A split without a full window, or (``nan_policy="drop"``) whose every
            window holds a missing value.
        MissingValueError: ``nan_policy="error"`` and a missing value in the data.
    """
    dims = geometry.dims
    _notice_skipped_starts(layout, geometry)
    split_dim = spec.split_dim or ("time" if "time" in dims else dims[0])
    axes = _checked_axes(spec, layout, split_dim)  # a disordered time axis is reported first
    assert spec.splits is not None
    bounds = resolve_splits(spec.splits, split_dim, layout.source, dims)
    if restrict is not None:
        bounds = {name: restrict(split, geometry) for name, split in bounds.items()}
    indices = {name: _full_windows(name, geometry, split) for name, split in bounds.items()}
    indices, gap_samples = apply_gap_policy(indices, geometry, axes, spec.gaps, spec.random_offsets)
    dropped: dict[str, int] = {}
    if spec.nan_policy == "error":
        _fail_on_missing(layout, spec.all_vars, dims)
    if spec.nan_policy == "drop":
        indices, dropped = _drop_missing(spec, layout, geometry, indices)
    return SamplePlan(geometry, split_dim, bounds, axes, indices, gap_samples, dropped)


def skipped_starts(layout: SourceLayout, geometry: WindowGeometry) -> int:
    """The stride along time of a forecasting set-up (a target after the inputs), else 1.

    Windows start every ``stride`` steps, so only 1 in ``stride`` forecast start times is
    a sample: ``input_overlap={time: input_dims[time] - 1}`` makes every one a sample.
    """
    time_dim = layout.time_dim
    if time_dim is None:
        return 1
    axis = geometry.dims.index(time_dim)
    return geometry.stride[axis] if geometry.target_offset[axis] > 0 else 1


def _notice_skipped_starts(layout: SourceLayout, geometry: WindowGeometry) -> None:
    stride = skipped_starts(layout, geometry)
    if stride > 1:
        time_dim = layout.time_dim
        size = geometry.input_size[geometry.dims.index(time_dim)]  # type: ignore[arg-type]
        logger.warning(
            "windows start every %d steps along %r (input_dims %d, input_overlap %d): only 1 "
            "in %d forecast start times is a sample; input_overlap={%r: %d} uses every one",
            stride,
            time_dim,
            size,
            size - stride,
            stride,
            time_dim,
            size - 1,
        )


def _checked_axes(spec: DataSpec, layout: SourceLayout, split_dim: str) -> dict[str, AxisCheck]:
    """The checked labels of every windowed dim with a coordinate: order, step, gaps."""
    source, given, dims = layout.source, spec.time_step, layout.window_dims
    if given is not None and not isinstance(given, Mapping):
        given = {layout.time_dim or split_dim: given}  # one step: the time axis's
    steps = dict(given or {})
    unknown = [dim for dim in steps if dim not in dims]
    if unknown:
        raise KeyError(f"time_step: {unknown} are not windowed dims. Valid: {dims}")
    return {
        dim: check_axis(dim, source[dim].values, steps.get(dim))
        for dim in dims
        if dim in source.indexes
    }


def _full_windows(
    name: str, geometry: WindowGeometry, bounds: dict[str, tuple[int, int]]
) -> SampleIndex:
    index = build_index(geometry, bounds)
    if len(index) == 0:
        axis = index.grid_shape.index(0)
        dim = geometry.dims[axis]
        lo, hi = bounds[dim]
        raise ValueError(
            f"split {name!r} has no full window: it spans {hi - lo} positions along {dim!r} "
            f"but one sample needs {geometry.extent[axis]} (input window "
            f"{geometry.input_size[axis]}, target window {geometry.target_size[axis]} at "
            f"offset {geometry.target_offset[axis]})"
        )
    return index


def _fail_on_missing(layout: SourceLayout, names: Sequence[str], dims: Sequence[str]) -> None:
    with scan_progress("missing values (nan_policy='error')"):
        found = first_missing(layout.source, layout.dynamic(names), dims)
    if found is not None:
        name, where = found
        place = ", ".join(f"{dim}={label}" for dim, label in where.items())
        raise MissingValueError(
            f"variable {name!r} has a missing or non-finite value (NaN or ±Inf) at {place}; "
            f"{MISSING_ADVICE}"
        )


def _drop_missing(
    spec: DataSpec,
    layout: SourceLayout,
    geometry: WindowGeometry,
    indices: dict[str, SampleIndex],
) -> tuple[dict[str, SampleIndex], dict[str, int]]:
    """Leave out every sample whose input or target window holds a NaN (vectorised)."""
    zero = (0,) * len(geometry.dims)
    kept, dropped = {}, {}
    for name, index in indices.items():
        # X sees only the input variables, y only the target ones: a mask for each.
        bad = _windows_with_nan(layout, spec.input_vars, index, zero, geometry.input_size)
        bad |= _windows_with_nan(
            layout, spec.targets, index, geometry.target_offset, geometry.target_size
        )
        kept[name] = index.keep(~bad)
        dropped[name] = int(bad.sum())
        if len(kept[name]) == 0:
            raise ValueError(
                f"split {name!r}: every one of its {len(index)} windows holds a missing "
                "value (nan_policy='drop'); use nan_policy='fill' or other windows"
            )
        logger.info(
            "nan_policy='drop': left out %d of %d samples of split %r (missing values)",
            dropped[name],
            len(index),
            name,
        )
    return kept, dropped


def _windows_with_nan(
    layout: SourceLayout,
    names: Sequence[str],
    index: SampleIndex,
    offset: Sequence[int],
    size: Sequence[int],
) -> np.ndarray:
    """Per sample of ``index``: whether its window of ``names`` holds a NaN (in slabs)."""
    names, dims, source = layout.dynamic(names), layout.window_dims, layout.source

    def mask_of(lo: int, hi: int) -> np.ndarray:
        return missing_mask(source.isel({dims[0]: slice(lo, hi)}), names, dims)

    step_bytes = layout.points_per_step() * (len(names) + 3)  # one byte per point and name
    with scan_progress("missing values in the windows (nan_policy='drop')"):
        found = reduce_windows(index, offset, size, mask_of, box_any, step_bytes)
    return found.astype(bool)
