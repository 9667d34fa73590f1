"""Normalisation: statistics from the training split, per variable and channel.

Each variable is normalised by one method (``normalize="zscore"`` for all, or a mapping of
variable to method with a ``"default"``), each an affine map ``(x - offset) / scale``:

========  ==========================  ================================================
method    ``(offset, scale)``         for
========  ==========================  ================================================
zscore    ``(mean, std)``             most variables (AIFS's ``mean-std``)
std       ``(0, std)``                precipitation, humidity: zero stays zero
minmax    ``(min, max - min)``        bounded fields, to [0, 1]
max       ``(0, max |x|)``            orography (AIFS's ``max``)
none      ``(0, 1)``                  fractions, masks
========  ==========================  ================================================

Statistics are means, standard deviations, minima and maxima over the windowed dims of the
training split's region, one per channel (a variable's non-windowed dims, e.g. ``level``,
keep their own). They are computed out of core: the region is reduced chunk by chunk with
dask (a lazily indexed store is chunked along its first windowed dim for the pass), so memory
stays bounded; NaNs are skipped. A channel with zero spread gets a scale of 1 (it is only shifted).

Example:
    >>> import numpy as np, xarray as xr
    >>> ds = xr.Dataset({"t": (("time", "x"), np.arange(8.0).reshape(4, 2))})
    >>> stats = zscore_statistics(ds, ["t"], ("time", "x"), {"time": (0, 2), "x": (0, 2)})
    >>> stats.mean["t"], stats.std["t"]
    ([1.5], [1.118033988749895])
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import xarray as xr

from xr_datamodule.anemoi import STORED, stored_statistics
from xr_datamodule.estimate import (
    SampledEstimate,
    chunk_length,
    groups_of,
    positions_of,
    sampled_statistics,
)
from xr_datamodule.progress import scan_progress
from xr_datamodule.sources import channel_layouts
from xr_datamodule.statcache import cache_directory, load_cached, statistics_key, store_cached

__all__ = ["METHODS", "Normalisation", "Statistics", "normalisation_of", "zscore_statistics"]

logger = logging.getLogger(__name__)

METHODS = ("zscore", "std", "minmax", "max", "none")

PASS_CHUNK_BYTES = 64 * 2**20  # chunk size of the reduction pass over a store without chunks
# A training split beyond this many bytes gets a note on sampled statistics (results unchanged).
SUGGEST_SAMPLE_BYTES = 50 * 10**9


@dataclass
class Statistics:
    """Per-channel mean, std (and min, max) of each variable (lists, YAML/JSON friendly)."""

    mean: dict[str, list[float]]
    std: dict[str, list[float]]
    min: dict[str, list[float]] | None = None
    max: dict[str, list[float]] | None = None

    def to_dict(self) -> dict[str, dict[str, list[float]]]:
        """Plain nested dict, as stored in checkpoints."""
        stored = {"mean": dict(self.mean), "std": dict(self.std)}
        if self.min is not None and self.max is not None:
            stored.update(min=dict(self.min), max=dict(self.max))
        return stored

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any]) -> Statistics:
        """What :meth:`to_dict` stored (a checkpoint's), checked: finite, std positive.

        Raises:
            ValueError: A non-finite statistic or a std that is not positive (a damaged or
                edited checkpoint): it would turn every batch into NaN or Inf.
        """
        for kind in ("mean", "std", "min", "max"):
            for name, values in (stored.get(kind) or {}).items():
                numbers = np.asarray(values, dtype=np.float64)
                bad = not np.isfinite(numbers).all() or (kind == "std" and (numbers <= 0).any())
                if bad:
                    raise ValueError(
                        f"the checkpoint's statistics are unusable: {kind} of {name!r} is "
                        f"{numbers.tolist()} (a {kind} must be finite"
                        + (" and positive" if kind == "std" else "")
                        + "); recompute them (a datamodule without the checkpoint's state) "
                        "or give stats="
                    )
        return cls(stored["mean"], stored["std"], stored.get("min"), stored.get("max"))

    def affine(
        self, names: Sequence[str], methods: Mapping[str, str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(offset, scale)`` of every channel of the named variables by their methods.

        Raises:
            ValueError: A method needs minima and maxima these statistics lack (explicit
                ``stats`` with only mean and std).
        """
        offsets, scales = [], []
        for name in names:
            method = methods.get(name, "zscore")
            mean, std = np.asarray(self.mean[name]), np.asarray(self.std[name])
            if method in ("minmax", "max") and (self.min is None or self.max is None):
                raise ValueError(
                    f"normalize: method {method!r} of variable {name!r} needs its min and max; "
                    "these statistics have only mean and std (give 'min' and 'max' in stats)"
                )
            if method == "zscore":
                offset, scale = mean, std
            elif method == "std":
                offset, scale = np.zeros_like(mean), std
            elif method == "minmax":
                low, high = np.asarray(self.min[name]), np.asarray(self.max[name])  # type: ignore[index]
                offset, scale = low, high - low
            elif method == "max":
                low, high = np.asarray(self.min[name]), np.asarray(self.max[name])  # type: ignore[index]
                offset, scale = np.zeros_like(mean), np.maximum(np.abs(low), np.abs(high))
            else:
                offset, scale = np.zeros_like(mean), np.ones_like(mean)
            offsets.append(offset)
            scales.append(np.where(np.isfinite(scale) & (scale > 0), scale, 1.0))
        return np.concatenate(offsets), np.concatenate(scales)

    @classmethod
    def from_value(
        cls,
        value: Mapping[str, Any] | str | os.PathLike,
        ds: xr.Dataset,
        names: Sequence[str],
        window_dims: Sequence[str],
    ) -> Statistics:
        """Statistics given by the user.

        A ``{"mean": {var: ...}, "std": {var: ...}}`` mapping or the path of a JSON file
        holding one; a scalar applies to all of a variable's channels.

        Raises:
            KeyError: A variable has no mean or std.
            ValueError: A variable's list has the wrong number of channels, or a std is <= 0.
        """
        if isinstance(value, str) and value == STORED:
            value = stored_statistics(ds, names, window_dims)
        elif not isinstance(value, Mapping):
            value = _stats_file(value)
        layouts = {layout.name: layout for layout in channel_layouts(ds, names, window_dims)}
        parsed: dict[str, dict[str, list[float]]] = {"mean": {}, "std": {}, "min": {}, "max": {}}
        kinds = (
            ("mean", "std", "min", "max") if "min" in value or "max" in value else ("mean", "std")
        )
        for kind in kinds:
            given = value.get(kind)
            if not isinstance(given, Mapping):
                raise KeyError(f"stats must have a {kind!r} mapping of variable to values")
            for name, layout in layouts.items():
                if name not in given:
                    raise KeyError(f"stats[{kind!r}] has no entry for variable {name!r}")
                try:
                    numbers = np.atleast_1d(np.asarray(given[name], dtype=np.float64)).reshape(-1)
                except (TypeError, ValueError) as error:
                    raise TypeError(
                        f"stats[{kind!r}][{name!r}] must be a number or a list of numbers, "
                        f"got {given[name]!r}"
                    ) from error
                if numbers.size == 1:
                    numbers = np.repeat(numbers, layout.n_channels)
                if numbers.size != layout.n_channels:
                    raise ValueError(
                        f"stats[{kind!r}][{name!r}] has {numbers.size} values; {name!r} has "
                        f"{layout.n_channels} channels"
                    )
                if not np.isfinite(numbers).all():
                    raise ValueError(f"stats[{kind!r}][{name!r}] must be finite, got {numbers}")
                if kind == "std" and (numbers <= 0).any():
                    raise ValueError(f"stats['std'][{name!r}] must be positive, got {numbers}")
                parsed[kind][name] = numbers.tolist()
        if "min" in kinds:
            return cls(parsed["mean"], parsed["std"], parsed["min"], parsed["max"])
        return cls(parsed["mean"], parsed["std"])


def _chunked(var: xr.DataArray, first_dim: str, itemsize: int) -> xr.DataArray:
    if var.chunks is not None:
        return var
    per_step = int(np.prod([n for d, n in var.sizes.items() if d != first_dim])) * itemsize
    return var.chunk({first_dim: max(1, PASS_CHUNK_BYTES // max(per_step, 1))})


def zscore_statistics(
    ds: xr.Dataset,
    names: Sequence[str],
    window_dims: Sequence[str],
    bounds: Mapping[str, tuple[int, int]],
) -> Statistics:
    """Mean and std per channel of the named variables over a region, out of core.

    Args:
        ds: The source dataset.
        names: Variables to describe.
        window_dims: The windowed dims (reduced over); other dims stay channels.
        bounds: ``(lower, upper)`` positions per windowed dim of the region (the train split).
    """
    region = ds[list(names)].isel({dim: slice(lo, hi) for dim, (lo, hi) in bounds.items()})
    layouts = channel_layouts(ds, names, window_dims)
    reductions = []
    for layout in layouts:
        var = region[layout.name]
        over = [dim for dim in window_dims if dim in var.dims]  # a static field lacks time
        var = _chunked(var, over[0], 8).astype(np.float64)
        var = var.where(np.isfinite(var))  # ±Inf counts as missing, like NaN (skipped)
        reductions += [var.mean(over), var.std(over), var.min(over), var.max(over)]
    computed = dask.compute(*reductions)
    found: dict[str, dict[str, list[float]]] = {"mean": {}, "std": {}, "min": {}, "max": {}}
    constant = []
    for i, layout in enumerate(layouts):
        names = layout.channel_names(ds)
        for j, kind in enumerate(("mean", "std", "min", "max")):
            values = np.asarray(computed[4 * i + j].transpose(*layout.extra_dims)).reshape(-1)
            if not np.isfinite(values).all():
                empty = [names[k] for k in np.flatnonzero(~np.isfinite(values))]
                raise ValueError(
                    f"normalize: {empty} have no finite value in the training split (every "
                    "value NaN or ±Inf); select other variables or levels, or give stats="
                )
            if kind == "std" and (values <= 0).any():
                constant += [names[k] for k in np.flatnonzero(values <= 0)]
                values = np.where(values > 0, values, 1.0)
            found[kind][layout.name] = values.tolist()
    if constant:
        logger.warning(
            "normalize: %s are constant over the training split (std 0): scaled by 1 "
            "instead (z-score: the value minus its mean, i.e. 0)",
            constant,
        )
    return Statistics(found["mean"], found["std"], found["min"], found["max"])


def _stats_file(path: Any) -> Mapping:
    """The statistics mapping held in a JSON file (``stats="stats.json"``)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"stats must be a mapping or the path of a JSON file, got {path!r}")
    try:
        with open(path) as file:
            value = json.load(file)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"stats: no such file {os.fspath(path)!r}") from error
    except (OSError, ValueError) as error:
        raise ValueError(f"stats: could not read JSON from {os.fspath(path)!r}: {error}") from error
    if not isinstance(value, Mapping):
        raise ValueError(f"stats: {os.fspath(path)!r} must hold a JSON object, got {value!r}")
    return value


class Normalisation:
    """The normalisation a pipeline applies: statistics, one method per variable, affines.

    Args:
        spec: The spec (``normalize``, the methods per variable).
        statistics: The statistics in use.
        origin: Where they came from: ``"computed"`` (from the training split, and where
            they were cached), ``"from cache <file>"``, ``"estimated from ..."``
            (``stats_sample``), ``"given"`` (``stats=``) or ``"checkpoint"``.
        estimate: With ``stats_sample``: the estimate, with its standard errors.

    Example:
        >>> import xarray as xr
        >>> from xr_datamodule.spec import DataSpec
        >>> spec = DataSpec(xr.Dataset({"t": (("time",), [1.0, 3.0])}), input_vars=["t"],
        ...                 input_dims={"time": 1}, normalize="zscore")
        >>> norm = Normalisation(spec, Statistics({"t": [2.0]}, {"t": [1.0]}), "given")
        >>> norm.scale(np.array([[3.0]]), ["t"])
        array([[1.]])
    """

    def __init__(
        self,
        spec: Any,
        statistics: Statistics,
        origin: str,
        estimate: SampledEstimate | None = None,
    ) -> None:
        self.spec = spec
        self.statistics = statistics
        self.origin = origin
        self.estimate = estimate  # with stats_sample: the estimate and its standard errors
        self._affines: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}

    def affine(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(offset, scale)`` per channel of the named variables, by their methods."""
        key = tuple(names)
        if key not in self._affines:  # asked per batch with normalize_on="device"
            methods = {name: self.spec.method_of(name) for name in names}
            self._affines[key] = self.statistics.affine(names, methods)
        return self._affines[key]

    def scale(
        self, values: Any, names: Sequence[str], inverse: bool = False, unscaled: int = 0
    ) -> Any:
        """Normalise (or, ``inverse``, denormalise) ``(batch, channel, ...)`` values.

        Works on tensors (on their device) and numpy arrays alike. ``unscaled`` last
        channels (forcings, the mask) are left as they are.
        """
        mean, std = self.affine(names)
        mean = np.concatenate([mean, np.zeros(unscaled)])
        std = np.concatenate([std, np.ones(unscaled)])
        shape = (1, -1) + (1,) * (values.ndim - 2)
        if hasattr(values, "new_tensor"):
            mean, std = values.new_tensor(mean), values.new_tensor(std)
        mean, std = mean.reshape(shape), std.reshape(shape)
        return values * std + mean if inverse else (values - mean) / std

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the statistics (so that a model meets its own)."""
        return {"statistics": self.statistics.to_dict()}


def normalisation_of(
    spec: Any, source: xr.Dataset, window_dims: Sequence[str], train: Any
) -> Normalisation:
    """The spec's statistics: given (``stats``) or computed over the training split's bounds.

    Raises:
        KeyError: A ``normalize`` mapping that names a variable not selected.
        ValueError: Statistics to compute without a ``train`` split (``train`` is None).
    """
    if isinstance(spec.normalize, dict):
        unknown = [k for k in spec.normalize if k != "default" and k not in spec.all_vars]
        if unknown:
            raise KeyError(
                f"normalize: {unknown} are not selected variables. Valid: "
                f"{tuple(spec.all_vars)} and 'default'"
            )
    if spec.stats is not None:
        given = Statistics.from_value(spec.stats, source, spec.all_vars, window_dims)
        stored = isinstance(spec.stats, str) and spec.stats == STORED
        return Normalisation(spec, given, "stored in the data" if stored else "given")
    if train is None:
        raise ValueError("normalize='zscore' needs a 'train' split (or explicit stats)")
    folder = cache_directory(spec.stats_cache)
    key = None if folder is None else _cache_key(spec, source, window_dims, train)
    if key is not None and folder is not None:
        hit = load_cached(key, folder)
        if hit is not None:
            return Normalisation(spec, Statistics.from_dict(hit[0]), f"from cache {hit[1]}")
    normalisation = _described(spec, source, window_dims, train)
    if key is not None and folder is not None:
        try:
            path = store_cached(key, normalisation.statistics.to_dict(), folder)
            normalisation.origin += f", cached in {path}"
        except OSError as error:
            logger.warning("statistics not cached in %s: %s", folder, error)
    return normalisation


def _cache_key(
    spec: Any, source: xr.Dataset, window_dims: Sequence[str], train: Mapping[str, Any]
) -> dict[str, Any] | None:
    sample = spec.stats_sample
    described = {
        "normalize": spec.normalize,
        "nan_policy": spec.nan_policy,
        "select": spec.select,
        "stats_sample": sample,
        "seed": spec.seed if sample is not None and "fraction" in sample else None,
    }
    options = (spec.open_kwargs or {}).get("storage_options")
    return statistics_key(spec.data, source, spec.all_vars, window_dims, train, described, options)


def _described(
    spec: Any, source: xr.Dataset, window_dims: Sequence[str], train: Mapping[str, Any]
) -> Normalisation:
    """Statistics over the training split: the whole of it, or estimated from a sample."""
    names, sample = spec.all_vars, spec.stats_sample
    if sample is None:
        _suggest_sampling(source, names, train)
        with scan_progress("statistics of the training split"):
            return Normalisation(
                spec, zscore_statistics(source, names, window_dims, train), "computed"
            )
    first = window_dims[0]
    lower, upper = train[first]
    chunk = chunk_length(source[names[0]], first)
    positions = positions_of(sample, lower, upper, chunk, spec.seed) - lower
    region = source[list(names)].isel({d: slice(lo, hi) for d, (lo, hi) in train.items()})
    with scan_progress(f"statistics from {len(positions)} of {upper - lower} steps"):
        estimate = sampled_statistics(
            region, channel_layouts(source, names, window_dims), window_dims, positions,
            groups_of(sample, positions + lower, chunk), upper - lower,
        )  # fmt: skip
    _, share = estimate.largest_relative_error()
    origin = (
        f"estimated from {estimate.steps} of {estimate.of_steps} steps, standard error of "
        f"the means <= {100 * share:.2g} % of the std"
    )
    logger.warning("normalize: statistics %s; %s", origin, _error_report(estimate))
    statistics = Statistics(estimate.mean, estimate.std, estimate.min, estimate.max)
    return Normalisation(spec, statistics, origin, estimate)


def _error_report(estimate: SampledEstimate, shown: int = 5) -> str:
    """The largest standard errors of the means and stds, per variable, in % of its std."""
    rows = []
    for name, stds in estimate.std.items():
        mean = max(e / s for e, s in zip(estimate.mean_error[name], stds, strict=True))
        std = max(e / s for e, s in zip(estimate.std_error[name], stds, strict=True))
        rows.append((mean, std, name))
    rows.sort(reverse=True)
    parts = [f"{name}: mean {100 * m:.2g} %, std {100 * s:.2g} %" for m, s, name in rows[:shown]]
    if len(rows) > shown:
        rest = rows[shown:]
        parts.append(
            f"the other {len(rest)}: mean <= {100 * rest[0][0]:.2g} %, std <= "
            f"{100 * max(s for _, s, _ in rest):.2g} %"
        )
    return "standard error (largest over channels, in % of the std): " + "; ".join(parts)


def _suggest_sampling(source: xr.Dataset, names: Sequence[str], train: Mapping) -> None:
    """Say so when the split is large enough that a sampled estimate is worth a thought."""
    region = source[list(names)].isel({d: slice(lo, hi) for d, (lo, hi) in train.items()})
    nbytes = sum(region[name].size * region[name].dtype.itemsize for name in names)
    if nbytes > SUGGEST_SAMPLE_BYTES:
        logger.warning(
            "normalize: the training split holds %.0f GB, read whole for its statistics "
            "(once: they are cached). stats_sample={'every': k} estimates them from every "
            "k-th step with standard errors, or precompute them: xr-datamodule stats",
            nbytes / 1e9,
        )
