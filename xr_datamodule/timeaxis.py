"""Checked coordinate axes: order, duplicates and gaps of every windowed dim, before training.

A window is a run of consecutive *positions*; a model assumes it is a run of consecutive
*steps* (1 h, 6 h, one month). Real archives break that: missing days (outages, failed
downloads), duplicated steps (overlapping downloads concatenated), descending time. This
module checks each windowed dim's labels once, in ``setup``, and finds the samples whose
span crosses a gap, vectorised over the whole index (prefix sums of the gaps; no loop per
sample).

The rules, per windowed dim with datetime (numpy or cftime) or numeric labels:

* a time axis (datetime labels) must be strictly increasing: a duplicate or a step back
  is an error naming the dim, the first offending labels and the fix;
* any other numeric axis must be strictly monotonic in one direction (latitude stored north
  to south is fine; a repeated or zig-zagging latitude is not);
* the regular step is the most common one (or given, ``time_step``); a step that differs
  from it is a *gap*. Datetimes on the same day of month and time of day every step
  (monthly, yearly data) are measured in calendar months, so 28-31 day months are regular.
  Steps of numeric axes may deviate by 5 % (Gaussian latitudes are not evenly spaced).

Example:
    >>> import pandas as pd
    >>> times = pd.date_range("2020-01-01", periods=6, freq="h").delete(3)  # 03:00 missing
    >>> axis = check_axis("time", times.values)
    >>> axis.step_text, axis.gap_after.tolist()
    ('1 h', [2])
    >>> crosses_gap(axis, starts=np.array([0, 1, 2]), extent=2).tolist()
    [False, False, True]
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "GAP_POLICIES",
    "AxisCheck",
    "TimeAxisError",
    "apply_gap_policy",
    "check_axis",
    "crosses_gap",
    "is_datetime_labels",
]

logger = logging.getLogger(__name__)

GAP_POLICIES = ("drop", "error", "allow")
NUMERIC_STEP_TOLERANCE = 0.05  # Gaussian latitudes deviate from even spacing by far less
_NS_PER = {"D": 86_400 * 10**9, "h": 3_600 * 10**9, "min": 60 * 10**9, "s": 10**9}


class TimeAxisError(ValueError):
    """A windowed dim's labels are not in order, repeat, or (with ``gaps="error"``) have gaps."""


@dataclass(frozen=True)
class AxisCheck:
    """What the labels of one windowed dim look like.

    Args:
        dim: The dim.
        step: The regular step, in :attr:`unit` (ns for datetimes, months for monthly data,
            the labels' own unit for numbers); None when the dim has fewer than 2 labels or
            no usable labels.
        unit: ``"ns"``, ``"months"`` or ``"value"``.
        gap_after: Positions ``i`` whose step to ``i + 1`` is not the regular one.
        labels: The labels (for messages).
    """

    dim: str
    step: float | None
    unit: str
    gap_after: np.ndarray
    labels: Any

    @property
    def step_text(self) -> str:
        """The regular step as people write it (``6 h``, ``1 month``, ``0.75``)."""
        return _step_text(self.step, self.unit)

    def describe_gap(self, position: int) -> str:
        """``2020-01-01T02 -> 2020-01-01T04 (2 h, the regular step is 1 h)``."""
        first, second = self.labels[position], self.labels[position + 1]
        return f"{_label(first)} -> {_label(second)} (the regular step is {self.step_text})"


def is_datetime_labels(values: Any) -> bool:
    """Whether labels are datetimes: numpy ``datetime64`` or cftime objects."""
    values = np.asarray(values)
    if np.issubdtype(values.dtype, np.datetime64):
        return True
    return values.dtype == object and len(values) > 0 and hasattr(values[0], "calendar")


def _label(value: Any) -> str:
    if isinstance(value, np.datetime64):
        return str(np.datetime_as_string(value, unit="s")).removesuffix(":00:00")
    if hasattr(value, "calendar"):
        return value.isoformat()
    return str(value)


def _step_text(step: float | None, unit: str) -> str:
    if step is None:
        return "?"
    if unit == "months":
        whole = int(step)
        return f"{whole} month" + ("s" if whole != 1 else "") if whole % 12 else f"{whole // 12} y"
    if unit == "ns":
        for name, size in _NS_PER.items():
            if step % size == 0:
                return f"{int(step // size)} {name}"
        return f"{step:g} ns"
    return f"{step:g}"


def _datetime_ordinals(values: np.ndarray) -> tuple[np.ndarray, str]:
    """Integers that make a datetime axis regular: calendar months, or nanoseconds.

    Monthly and yearly data (the same day of month and time of day at every step) count in
    months; everything else in ns since an epoch (cftime: microsecond resolution).
    """
    if np.issubdtype(values.dtype, np.datetime64):
        index = pd.DatetimeIndex(values)
        nanoseconds = values.astype("datetime64[ns]").astype(np.int64)
    else:  # cftime: xarray's CFTimeIndex gives the fields and integer times
        from xarray import CFTimeIndex

        index = CFTimeIndex(values)
        nanoseconds = np.asarray(index.asi8, dtype=np.int64) * 1000  # asi8: microseconds
    day = np.asarray(index.day)
    time_of_day = nanoseconds % _NS_PER["D"]
    if len(values) > 1 and (day == day[0]).all() and (time_of_day == time_of_day[0]).all():
        steps = np.diff(nanoseconds)
        if steps.size and steps.min() >= 27 * _NS_PER["D"]:  # every step at least a month
            months = np.asarray(index.year, dtype=np.int64) * 12 + np.asarray(index.month) - 1
            return months, "months"
    return nanoseconds, "ns"


def _first_disorder(steps: np.ndarray, direction: int) -> int | None:
    """First position whose step does not go in ``direction`` (a repeat or a step back)."""
    bad = np.flatnonzero(steps * direction <= 0)
    return int(bad[0]) if bad.size else None


def check_axis(dim: str, labels: Any, step: Any = None) -> AxisCheck:
    """Check one windowed dim's labels and find its gaps.

    Args:
        dim: The dim's name (for messages).
        labels: Its labels: datetimes (numpy or cftime) or numbers. Anything else (strings,
            no coordinate) is positions and is not checked.
        step: The regular step, if known: a ``pandas`` offset string or timedelta for
            datetimes (``"6h"``, ``"1D"``; ``"1MS"``-like month steps as ``"1M"``), a number
            otherwise. Default: the most common step.

    Returns:
        The axis' step and gaps.

    Raises:
        TimeAxisError: Datetimes not strictly increasing, numbers not strictly monotonic.
    """
    values = np.asarray(labels)
    datetimes = is_datetime_labels(values)
    if not datetimes and not np.issubdtype(values.dtype, np.number):
        return AxisCheck(dim, None, "position", np.empty(0, np.int64), values)
    if datetimes:
        ordinals, unit = _datetime_ordinals(values)
    else:
        ordinals, unit = values.astype(np.float64), "value"
    if len(ordinals) < 2:
        return AxisCheck(dim, None, unit, np.empty(0, np.int64), values)
    steps = np.diff(ordinals)
    direction = 1 if datetimes or steps[0] > 0 else -1
    wrong = _first_disorder(steps, direction)
    if wrong is not None:
        raise TimeAxisError(_disorder_message(dim, values, wrong, steps[wrong], datetimes))
    regular = _given_step(step, unit, dim) if step is not None else _most_common(steps)
    if unit == "value":
        tolerance = NUMERIC_STEP_TOLERANCE * abs(regular)
        gaps = np.flatnonzero(np.abs(steps - regular) > tolerance)
    else:
        gaps = np.flatnonzero(steps != regular)
    return AxisCheck(dim, float(regular), unit, gaps.astype(np.int64), values)


def _most_common(steps: np.ndarray) -> float:
    found, counts = np.unique(steps, return_counts=True)
    return float(found[np.argmax(counts)])


def _given_step(step: Any, unit: str, dim: str) -> float:
    if unit == "value":
        if isinstance(step, bool) or not isinstance(step, (int, float, np.number)):
            raise TypeError(
                f"time_step for {dim!r} (numeric labels) must be a number, got {step!r}"
            )
        return float(step)
    text = str(step).strip()
    if unit == "months" and text.upper().rstrip("S").endswith(("M", "Y")):
        number = text.upper().rstrip("S")[:-1] or "1"
        return float(int(number) * (12 if text.upper().rstrip("S").endswith("Y") else 1))
    try:
        return float(pd.Timedelta(step).value)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"time_step {step!r} for {dim!r} is not a duration such as '1h', '6h', '1D' "
            f"(months: '1M'): {error}"
        ) from error


def _disorder_message(dim: str, values: Any, at: int, step: float, datetimes: bool) -> str:
    first, second = _label(values[at]), _label(values[at + 1])
    where = f"{dim!r} at positions {at} and {at + 1} ({first}, then {second})"
    if step == 0:
        return (
            f"{dim!r} repeats a label: {where}; windows would hold the same step twice. "
            f"Drop the duplicates first, e.g. ds.drop_duplicates({dim!r})"
        )
    if datetimes:
        return (
            f"{dim!r} is not increasing: {where}; windows would run backwards in time. "
            f"Sort it first, e.g. ds.sortby({dim!r})"
        )
    return (
        f"{dim!r} is not monotonic: {where} turns back; windows need an ordered axis. "
        f"Sort it first, e.g. ds.sortby({dim!r})"
    )


def crosses_gap(axis: AxisCheck, starts: np.ndarray, extent: int) -> np.ndarray:
    """Per span ``[start, start + extent)``: whether it holds a gap between two positions.

    Vectorised: a prefix count of the gaps, looked up at both ends of every span.

    Args:
        axis: The checked axis.
        starts: First position each span touches.
        extent: Positions per span.
    """
    starts = np.asarray(starts, dtype=np.int64)
    if not axis.gap_after.size or extent < 2:
        return np.zeros(starts.shape, dtype=bool)
    length = len(axis.labels)
    gap_steps = np.zeros(length, dtype=np.int64)
    gap_steps[axis.gap_after] = 1
    before = np.concatenate([[0], np.cumsum(gap_steps)])  # gaps at positions < k
    # Steps inside the span are those after positions start .. start + extent - 2.
    return before[starts + extent - 1] - before[starts] > 0


def check_axes(
    labels: Mapping[str, Any], steps: Mapping[str, Any] | None = None
) -> dict[str, AxisCheck]:
    """:func:`check_axis` for each named dim (``steps`` gives known steps per dim)."""
    steps = steps or {}
    return {dim: check_axis(dim, values, steps.get(dim)) for dim, values in labels.items()}


def gap_report(axes: Mapping[str, AxisCheck], dims: Sequence[str]) -> str:
    """One line per dim with gaps: how many, and the first."""
    lines = []
    for dim in dims:
        axis = axes.get(dim)
        if axis is not None and axis.gap_after.size:
            lines.append(
                f"{dim!r} has {axis.gap_after.size} irregular step(s), the first "
                f"{axis.describe_gap(int(axis.gap_after[0]))}"
            )
    return "; ".join(lines)


def spans_with_gaps(index: Any, geometry: Any, axes: Mapping[str, AxisCheck]) -> np.ndarray:
    """Per sample of ``index``: whether its span (input and target windows) crosses a gap.

    Computed per dim on the start grid (one lookup per grid position), then broadcast over
    the grid: memory is one bool per sample.

    Args:
        index: A :class:`~xr_datamodule.windows.SampleIndex`.
        geometry: Its :class:`~xr_datamodule.windows.WindowGeometry`.
        axes: The checked axes, per windowed dim (dims without one have no gaps).
    """
    grid = np.zeros(index.grid_shape, dtype=bool)
    for axis, dim in enumerate(geometry.dims):
        if dim not in axes or not axes[dim].gap_after.size:
            continue
        lowest = np.asarray(index.axis_starts[axis]) - geometry.reach_below[axis]
        along = crosses_gap(axes[dim], lowest, geometry.extent[axis])
        shape = [1] * len(geometry.dims)
        shape[axis] = len(along)
        grid |= along.reshape(shape)
    return grid.reshape(-1)[index.grid_ids()]


def apply_gap_policy(
    indices: Mapping[str, Any],
    geometry: Any,
    axes: Mapping[str, AxisCheck],
    policy: str,
    random_offsets: bool = False,
) -> tuple[dict[str, Any], dict[str, int]]:
    """The splits' sample indices under ``gaps=policy``, and the samples left out per split.

    ``"allow"`` keeps every sample; ``"error"`` raises at the first gap; ``"drop"`` leaves
    out the samples whose span crosses one (:func:`spans_with_gaps`) and logs it once.

    Raises:
        TimeAxisError: A gap under ``"error"``; a split whose every sample crosses one.
        ValueError: Samples left out with ``random_offsets`` (a moved window may cross one).
    """
    # A window one position long along a dim cannot span a step of it (a level picked one
    # at a time, as xbatcher's sample dims are), so only longer spans are checked.
    lengths = zip(geometry.dims, geometry.extent, strict=True)
    spanning = [dim for dim, extent in lengths if extent > 1]
    report = gap_report(axes, spanning)
    if not report or policy == "allow":
        return dict(indices), {}
    if policy == "error":
        raise TimeAxisError(
            f"{report}; windows would span it. gaps='drop' leaves out the samples that "
            "cross an irregular step, gaps='allow' keeps them, time_step= sets the step"
        )
    kept, left_out = {}, {}
    for name, index in indices.items():
        bad = spans_with_gaps(index, geometry, axes)
        kept[name] = index.keep(~bad)
        left_out[name] = int(bad.sum())
        if len(kept[name]) == 0:
            raise TimeAxisError(
                f"split {name!r}: every one of its {len(index)} samples crosses an "
                f"irregular step ({report}); check the time axis or set time_step="
            )
    if random_offsets and any(left_out.values()):
        raise ValueError(
            "random_offsets=True cannot be combined with samples left out at time gaps "
            f"({report}): a moved window may cross one; use gaps='allow' or no offsets"
        )
    counts = ", ".join(f"{name} {n}" for name, n in left_out.items() if n)
    logger.warning("gaps='drop': %s; samples left out per split: %s", report, counts)
    return kept, left_out
