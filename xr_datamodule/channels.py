"""The channels of ``X`` and ``y``: shapes and readable names, known before any batch is read.

``X``'s channels are the time-varying input variables, then the static ones, then the
forcings, then the ``nan_mask``; ``y``'s the time-varying targets, then the static ones. A
variable's non-windowed dims (``level``) are folded into its channels in C order. With a
transform, its output variables give the channels: it is run once per side, on the first
window of the first split (:func:`channels_of`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

from xr_datamodule.layout import SourceLayout
from xr_datamodule.sources import channel_layouts as layouts_of
from xr_datamodule.spec import DataSpec
from xr_datamodule.transforms import (
    Transform,
    batch_dataset,
    batch_to_channels,
    window_channels,
    window_to_channels,
)
from xr_datamodule.windows import WindowGeometry

if TYPE_CHECKING:
    from xr_datamodule.families import FamilyStages

__all__ = ["Channels", "channels_of", "with_families"]


@dataclass(frozen=True)
class Channels:
    """Shape, variables and channel names of one ``X`` and one ``y`` sample.

    Args:
        input_shape: ``(channel, *window)`` of ``X``.
        target_shape: ``(channel, *window)`` of ``y``.
        input_variables: The variables ``X`` is made of (``input_vars`` and the forcings, or
            the transform's output).
        target_variables: Likewise for ``y``.
        input_names: Readable name of each channel of ``X``, e.g. ``u[level=200]``.
        target_names: Likewise for ``y``.
        grids: Inputs on other grids (dict batches' ``x_<family>``): shape and channel names.
        broadcast: Channels of ``X`` that are series repeated over the window (before the
            ``nan_mask``).
    """

    input_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    input_variables: list[str]
    target_variables: list[str]
    input_names: list[str]
    target_names: list[str]
    grids: dict[str, tuple[tuple[int, ...], list[str]]] = field(default_factory=dict)
    broadcast: int = 0


def channels_of(
    spec: DataSpec,
    layout: SourceLayout,
    geometry: WindowGeometry,
    first_start: Callable[[], np.ndarray],
) -> Channels:
    """The channels of both sides; ``first_start()`` gives a window to run a transform on."""
    forcings = list(spec.forcings or [])
    sides = {}
    for inputs in (True, False):
        transform = spec.transform if inputs else spec.target_transform
        names = spec.input_vars if inputs else spec.targets
        size = geometry.input_size if inputs else geometry.target_size
        order = layout.input_order if inputs else layout.target_order
        if transform is None:
            data, variables = layout.source, order
            count = layout.n_channels(names)
        else:
            data = _run_first(spec, layout, names, transform, size, first_start())
            variables = list(map(str, data.data_vars))
            count = window_to_channels(data, layout.window_dims, spec.array_dtype).shape[0]
        channel_layouts = layouts_of(data, variables, layout.window_dims)
        named = [name for each in channel_layouts for name in each.channel_names(data)]
        sides[inputs] = (count, variables, named, size)
    count, variables, named, size = sides[True]
    input_names = named + forcings + (["nan_mask"] if spec.nan_mask else [])
    input_variables = variables + forcings if spec.transform is None else variables
    input_shape = (count + len(forcings) + spec.nan_mask, *size)
    count, variables, named, size = sides[False]
    return Channels(input_shape, (count, *size), input_variables, variables, input_names, named)


def _run_first(
    spec: DataSpec,
    layout: SourceLayout,
    names: Sequence[str],
    transform: Transform,
    size: tuple[int, ...],
    first: np.ndarray,
) -> xr.Dataset:
    """A side's transform run once on the window starting at ``first``."""
    source, dims = layout.source, layout.window_dims
    if spec.transform_on == "batch":
        values = window_channels(source, list(names), dims, first, size)
        batch = transform(batch_dataset(source, list(names), dims, first[None], values[None]))
        batch_to_channels(batch, dims, size, spec.array_dtype)  # checks its dims
        return batch.isel(sample=0)
    window = source[list(names)].isel(
        {dim: slice(int(s), int(s) + n) for dim, s, n in zip(dims, first, size, strict=True)}
    )
    return transform(window)


def with_families(
    channels: Channels, families: Sequence[FamilyStages], nan_mask: bool, series_as: str
) -> Channels:
    """The channels with other grids' variables: ``y`` on its grid, inputs apart or in ``X``.

    A series with ``series_as="channels"`` joins ``X``'s channels before the ``nan_mask``;
    other inputs on other grids are ``x_<family>`` (``grids``); targets on another grid are
    ``y``, shaped like that grid's window.
    """
    out = channels
    for stages in families:
        family, geometry = stages.family, stages.geometry
        if family.input_vars:
            names = stages.channel_names(family.input_vars)
            if family.is_series and series_as == "channels":
                end = len(out.input_names) - nan_mask
                out = replace(
                    out,
                    input_shape=(out.input_shape[0] + len(names), *out.input_shape[1:]),
                    input_variables=out.input_variables + family.input_vars,
                    input_names=out.input_names[:end] + names + out.input_names[end:],
                    broadcast=out.broadcast + len(names),
                )
            else:
                shape = (len(names), *geometry.input_size)
                out = replace(out, grids={**out.grids, f"x_{family.name}": (shape, names)})
        if family.target_vars:
            names = stages.channel_names(family.target_vars)
            out = replace(
                out,
                target_shape=(len(names), *geometry.target_size),
                target_variables=list(family.target_vars),
                target_names=names,
            )
    return out
