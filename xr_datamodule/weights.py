"""Per-sample statistics of the windows and the sampling weights derived from them.

Rare events (heatwaves, extreme precipitation, cyclones) are a few percent of the samples;
oversampling them needs a number per window: e.g. the maximum of its target. All windows'
statistics come from one out-of-core pass over the data (dask reduces the store chunk by
chunk to one value per grid point of the windowed dims) and a box reduction over all window
positions at once (sliding-window views, cumulative sums): no Python loop over windows.

Example:
    >>> import numpy as np, xarray as xr
    >>> ds = xr.Dataset({"x": (("time",), np.array([0.0, 5.0, 1.0, 2.0]))})
    >>> box_reduce(point_field(ds, ["x"], ("time",), "max"), (2,), "max").tolist()
    [5.0, 5.0, 2.0]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dask
import numpy as np
import xarray as xr

from xr_datamodule.missing import scannable

__all__ = ["WindowStatistics", "box_reduce", "point_field", "weights_from"]

STATS = ("max", "min", "mean")


def point_field(
    ds: xr.Dataset, names: Sequence[str], window_dims: Sequence[str], stat: str
) -> np.ndarray:
    """``stat`` over the variables and their other dims, per grid point of the windowed dims.

    Missing values are skipped (all-NaN points give NaN).
    """
    parts, counts = [], []
    for name in names:
        var = scannable(ds, name, window_dims).astype(np.float64)
        extra = [dim for dim in var.dims if dim not in window_dims]
        reduce = {"max": var.max, "min": var.min, "mean": var.sum}[stat]
        part = reduce(extra, skipna=True) if extra else var
        if stat == "mean":
            valid = var.notnull()
            counts.append((valid.sum(extra) if extra else valid).transpose(*window_dims))
        parts.append(part.transpose(*window_dims))
    values = [np.asarray(a, dtype=np.float64) for a in dask.compute(*parts)]
    if stat == "mean":
        total = sum(np.nan_to_num(v) for v in values)
        count = sum(np.asarray(c, dtype=np.float64) for c in dask.compute(*counts))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)
    combine = np.fmax if stat == "max" else np.fmin
    field = values[0]
    for value in values[1:]:
        field = combine(field, value)
    return field


def box_reduce(field: np.ndarray, size: Sequence[int], stat: str) -> np.ndarray:
    """``stat`` of ``field`` over the box of ``size`` at every window position.

    Returns:
        An array with ``field.shape[d] - size[d] + 1`` positions along each dim.
    """
    if stat == "mean":
        valid = ~np.isnan(field)
        total, count = np.where(valid, field, 0.0), valid.astype(np.float64)
        for axis, length in enumerate(size):
            total, count = (_box_sum(a, length, axis) for a in (total, count))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)
    out = field
    reduce = np.fmax.reduce if stat == "max" else np.fmin.reduce
    for axis, length in enumerate(size):
        windows = np.lib.stride_tricks.sliding_window_view(out, length, axis=axis)
        out = reduce(windows, axis=-1)
    return np.asarray(out)


def _box_sum(array: np.ndarray, length: int, axis: int) -> np.ndarray:
    padded = np.cumsum(array, axis=axis)
    zero = np.zeros_like(np.take(padded, [0], axis=axis))
    padded = np.concatenate([zero, padded], axis=axis)
    n = array.shape[axis] - length + 1
    upper = np.take(padded, np.arange(length, length + n), axis=axis)
    lower = np.take(padded, np.arange(n), axis=axis)
    return upper - lower


class WindowStatistics(Mapping[str, np.ndarray]):
    """Per-sample statistics of a split's windows, computed on first use and kept.

    Keys: ``input_max``, ``input_min``, ``input_mean``, ``target_max``, ``target_min``,
    ``target_mean`` — the statistic over all variables and channels of each sample's input
    (or target) window, one float per sample, in sample order.

    Args:
        compute: ``compute(side, stat)`` returns one side's statistic for every sample.
    """

    def __init__(self, compute: Callable[[str, str], np.ndarray]) -> None:
        self._compute = compute
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._cache:
            side, _, stat = key.partition("_")
            if side not in ("input", "target") or stat not in STATS:
                raise KeyError(f"window statistic {key!r}. Valid: {tuple(self)}")
            self._cache[key] = self._compute(side, stat)
        return self._cache[key]

    def __iter__(self):
        return iter(f"{side}_{stat}" for side in ("input", "target") for stat in STATS)

    def __len__(self) -> int:
        return 2 * len(STATS)


def weights_from(setting: Any, statistics: WindowStatistics, n_samples: int) -> np.ndarray:
    """Sampling weights of every sample, from ``sample_weights`` (see the datamodule).

    A mapping ``{"by": statistic, "quantile": q | "above": value, "boost": b}`` gives weight
    ``b`` to the samples whose statistic is at least the split's ``q``-quantile (or
    ``value``) and 1 to the others; a callable gets the statistics and returns the weights.

    Raises:
        ValueError: Weights of the wrong length, negative or not finite, or all zero.
    """
    if callable(setting):
        weights = np.asarray(setting(statistics), dtype=np.float64).reshape(-1)
    else:
        values = statistics[setting["by"]]
        if "quantile" in setting:
            threshold = float(np.nanquantile(values, setting["quantile"]))
        else:
            threshold = float(setting["above"])
        weights = np.where(values >= threshold, setting["boost"], 1.0)
    if len(weights) != n_samples:
        raise ValueError(
            f"sample_weights: got {len(weights)} weights for {n_samples} training samples"
        )
    if not np.isfinite(weights).all() or (weights < 0).any() or not weights.sum() > 0:
        raise ValueError("sample_weights: weights must be finite, non-negative and not all zero")
    return weights
