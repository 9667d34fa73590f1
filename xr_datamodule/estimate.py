"""Statistics estimated from a sample of the training split, with their standard errors.

For an archive too large to scan (an ERA5 training split is tens of TB), ``stats_sample``
describes the split from some of its steps along the first windowed dim (time):

* ``{"every": k}``: every k-th step;
* ``{"fraction": f}``: a fraction ``f`` of the storage chunks along that dim, chosen by the
  seed (whole chunks, so each chunk read is used whole).

Each step is reduced over the other windowed dims to its mean and mean square (per channel),
out of core with dask; the estimates come from those series. Their standard errors come from
a delete-one-group jackknife over groups of steps: the chosen chunks (``fraction``: each a
unit drawn at random, so the correlation of the steps inside a chunk is allowed for), or 20
interleaved subsamples (``every``: step ``i`` of the sample in group ``i % 20``, each group
itself a sample of every ``20 k``-th step over the whole split, as in Mahalanobis's
interpenetrating subsamples; a seasonal cycle is then seen by every group alike).

Example:
    >>> positions_of({"every": 4}, 0, 10, chunk=1, seed=0).tolist()
    [0, 4, 8]
    >>> positions_of({"fraction": 0.5}, 0, 8, chunk=2, seed=0).size
    4
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import xarray as xr

__all__ = [
    "SampledEstimate",
    "check_sample",
    "chunk_length",
    "groups_of",
    "positions_of",
    "sampled_statistics",
]

GROUPS = 20  # interleaved subsamples of an "every" sample (jackknife groups)
KINDS = ("every", "fraction")


def check_sample(sample: Any) -> None:
    """Raise for a ``stats_sample`` that is not ``{"every": k >= 1}`` or ``{"fraction": f}``."""
    if sample is None:
        return
    valid = f"Valid: {{'every': k}} (k >= 1) or {{'fraction': f}} (0 < f <= 1), got {sample!r}"
    if not isinstance(sample, Mapping) or len(sample) != 1 or next(iter(sample)) not in KINDS:
        raise ValueError(f"stats_sample: {valid}")
    kind, value = next(iter(sample.items()))
    if kind == "every" and not (isinstance(value, int) and value >= 1):
        raise ValueError(f"stats_sample: 'every' must be a whole number >= 1. {valid}")
    if kind == "fraction" and not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise ValueError(f"stats_sample: 'fraction' must be in (0, 1]. {valid}")


def positions_of(
    sample: Mapping[str, Any], lower: int, upper: int, chunk: int, seed: int
) -> np.ndarray:
    """The sampled positions along the first windowed dim within ``[lower, upper)``.

    Args:
        sample: ``{"every": k}`` or ``{"fraction": f}``.
        lower: First position of the split.
        upper: One past its last.
        chunk: Storage chunk length along the dim (``fraction`` picks whole chunks).
        seed: Seed of the chunks ``fraction`` picks.
    """
    if "every" in sample:
        return np.arange(lower, upper, int(sample["every"]))
    starts = np.arange(lower - lower % chunk, upper, chunk)
    picked = max(1, round(float(sample["fraction"]) * len(starts)))
    chosen = np.sort(np.random.default_rng(seed).choice(starts, picked, replace=False))
    positions = (chosen[:, None] + np.arange(chunk)).reshape(-1)
    return positions[(positions >= lower) & (positions < upper)]


def chunk_length(var: xr.DataArray, dim: str) -> int:
    """The storage chunk length of ``var`` along ``dim`` (dask's, else the store's, else 1)."""
    if var.chunks is not None:
        return int(var.chunksizes[dim][0])
    encoded = var.encoding.get("preferred_chunks") or dict(
        zip(var.dims, var.encoding.get("chunksizes") or (), strict=False)
    )
    return int(encoded.get(dim, 1))


@dataclass
class SampledEstimate:
    """Estimated statistics per variable and channel, their standard errors, and the sample.

    ``mean``/``std``/``min``/``max`` are like :class:`~xr_datamodule.normalize.Statistics`'
    fields; ``mean_error``/``std_error`` the standard errors of ``mean`` and ``std``;
    ``steps`` how many steps were read of ``of_steps``.
    """

    mean: dict[str, list[float]]
    std: dict[str, list[float]]
    min: dict[str, list[float]]
    max: dict[str, list[float]]
    mean_error: dict[str, list[float]]
    std_error: dict[str, list[float]]
    steps: int
    of_steps: int

    def largest_relative_error(self) -> tuple[str, float]:
        """The variable whose mean's error is the largest share of its std, and that share."""
        shares = {
            name: max(e / s for e, s in zip(errors, self.std[name], strict=True))
            for name, errors in self.mean_error.items()
        }
        worst = max(shares, key=shares.__getitem__)
        return worst, shares[worst]


def sampled_statistics(
    region: xr.Dataset,
    layouts: Sequence[Any],
    window_dims: Sequence[str],
    positions: np.ndarray,
    groups: np.ndarray,
    of_steps: int,
) -> SampledEstimate:
    """Estimate the statistics of ``region`` from its ``positions`` along the first dim.

    Args:
        region: The training split's region (positions relative to its start).
        layouts: The variables' channel layouts (:func:`~xr_datamodule.sources.channel_layouts`).
        window_dims: The windowed dims; the first is sampled, the others reduced per step.
        positions: Sampled positions, relative to the region's start.
        groups: The jackknife group of each position (:func:`groups_of`).
        of_steps: Steps of the whole split (for the report).
    """
    first = window_dims[0]
    reductions = []
    for layout in layouts:
        var = region[layout.name]
        if first in var.dims:
            var = var.isel({first: positions})
        var = var.astype(np.float64)
        var = var.where(np.isfinite(var))
        over = [dim for dim in window_dims[1:] if dim in var.dims]
        reductions += [var.mean(over), (var * var).mean(over), var.min(over), var.max(over)]
    computed = dask.compute(*reductions)
    found: dict[str, dict[str, list[float]]] = {k: {} for k in ("mean", "std", "min", "max")}
    errors: dict[str, dict[str, list[float]]] = {"mean": {}, "std": {}}
    for i, layout in enumerate(layouts):
        series = [_steps_by_channel(computed[4 * i + j], first, layout) for j in range(4)]
        mean, square, low, high = series
        overall_mean, overall_std = _mean_std(mean, square)
        error = _jackknife(mean, square, groups if mean.shape[0] == len(groups) else None)
        found["mean"][layout.name] = overall_mean.tolist()
        found["std"][layout.name] = np.where(overall_std > 0, overall_std, 1.0).tolist()
        found["min"][layout.name] = np.nanmin(low, axis=0).tolist()
        found["max"][layout.name] = np.nanmax(high, axis=0).tolist()
        errors["mean"][layout.name] = error[0].tolist()
        errors["std"][layout.name] = error[1].tolist()
    return SampledEstimate(
        found["mean"], found["std"], found["min"], found["max"],
        errors["mean"], errors["std"], len(positions), int(of_steps),
    )  # fmt: skip


def _steps_by_channel(values: xr.DataArray, first: str, layout: Any) -> np.ndarray:
    """``(steps, channels)`` from a per-step reduction (a static field: one step)."""
    extra = list(layout.extra_dims)
    if first not in values.dims:
        return np.asarray(values.transpose(*extra)).reshape(1, -1)
    return np.asarray(values.transpose(first, *extra)).reshape(values.sizes[first], -1)


def groups_of(sample: Mapping[str, Any], positions: np.ndarray, chunk: int) -> np.ndarray:
    """The jackknife group of each sampled position: its chunk, or its interleaved subsample."""
    if "fraction" in sample:
        return np.unique(positions // chunk, return_inverse=True)[1]
    return np.arange(len(positions)) % GROUPS


def _jackknife(mean: np.ndarray, square: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Standard errors ``(2, channels)`` of the mean and std, delete-one-group jackknife.

    A static field (one step, ``groups`` None) is read whole: its error is 0.
    """
    labels = np.unique(groups) if groups is not None else np.array([])
    if len(labels) < 2:
        return (
            np.zeros((2, mean.shape[1])) if groups is None else np.full((2, mean.shape[1]), np.inf)
        )
    left_out = np.stack([_mean_std(mean[groups != g], square[groups != g]) for g in labels])
    n = len(labels)
    spread = ((left_out - left_out.mean(axis=0)) ** 2).sum(axis=0)
    return np.sqrt((n - 1) / n * spread)


def _mean_std(mean: np.ndarray, square: np.ndarray) -> np.ndarray:
    """Mean and std per channel of steps given their means and mean squares."""
    m = np.nanmean(mean, axis=0)
    variance = np.maximum(np.nanmean(square, axis=0) - m * m, 0.0)
    return np.stack([m, np.sqrt(variance)])
