"""Z-score normalisation: statistics from the training split, per variable and channel.

Statistics are means and standard deviations over the windowed dims of the training split's
region, one per channel (a variable's non-windowed dims, e.g. ``level``, keep their own).
They are computed out of core: the region is reduced chunk by chunk with dask (a lazily
indexed store is chunked along its first windowed dim for the pass), so memory stays bounded;
NaNs are skipped. A channel with zero spread gets a standard deviation of 1 (it is only
centred).

Example:
    >>> import numpy as np, xarray as xr
    >>> ds = xr.Dataset({"t": (("time", "x"), np.arange(8.0).reshape(4, 2))})
    >>> stats = zscore_statistics(ds, ["t"], ("time", "x"), {"time": (0, 2), "x": (0, 2)})
    >>> stats.mean["t"], stats.std["t"]
    ([1.5], [1.118033988749895])
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import xarray as xr

from xr_datamodule.sources import channel_layouts

__all__ = ["Statistics", "zscore_statistics"]

PASS_CHUNK_BYTES = 64 * 2**20  # chunk size of the reduction pass over a store without chunks


@dataclass
class Statistics:
    """Per-channel mean and standard deviation of each variable (lists, YAML/JSON friendly)."""

    mean: dict[str, list[float]]
    std: dict[str, list[float]]

    def to_dict(self) -> dict[str, dict[str, list[float]]]:
        """Plain nested dict, as stored in checkpoints."""
        return {"mean": dict(self.mean), "std": dict(self.std)}

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
        if not isinstance(value, Mapping):
            with open(value) as file:
                value = json.load(file)
        assert isinstance(value, Mapping)
        layouts = {layout.name: layout for layout in channel_layouts(ds, names, window_dims)}
        parsed: dict[str, dict[str, list[float]]] = {"mean": {}, "std": {}}
        for kind in ("mean", "std"):
            given = value.get(kind)
            if not isinstance(given, Mapping):
                raise KeyError(f"stats must have a {kind!r} mapping of variable to values")
            for name, layout in layouts.items():
                if name not in given:
                    raise KeyError(f"stats[{kind!r}] has no entry for variable {name!r}")
                numbers = np.atleast_1d(np.asarray(given[name], dtype=np.float64)).reshape(-1)
                if numbers.size == 1:
                    numbers = np.repeat(numbers, layout.n_channels)
                if numbers.size != layout.n_channels:
                    raise ValueError(
                        f"stats[{kind!r}][{name!r}] has {numbers.size} values; {name!r} has "
                        f"{layout.n_channels} channels"
                    )
                if kind == "std" and (numbers <= 0).any():
                    raise ValueError(f"stats['std'][{name!r}] must be positive, got {numbers}")
                parsed[kind][name] = numbers.tolist()
        return cls(parsed["mean"], parsed["std"])

    def channel_arrays(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std of every channel of the named variables, concatenated in order."""
        mean = np.concatenate([np.asarray(self.mean[name]) for name in names])
        std = np.concatenate([np.asarray(self.std[name]) for name in names])
        return mean, std


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
        reductions += [var.mean(over), var.std(over)]
    computed = dask.compute(*reductions)
    mean, std = {}, {}
    for i, layout in enumerate(layouts):
        means = np.asarray(computed[2 * i].transpose(*layout.extra_dims)).reshape(-1)
        spreads = np.asarray(computed[2 * i + 1].transpose(*layout.extra_dims)).reshape(-1)
        spreads = np.where(np.isfinite(spreads) & (spreads > 0), spreads, 1.0)
        mean[layout.name] = means.tolist()
        std[layout.name] = spreads.tolist()
    return Statistics(mean, std)
