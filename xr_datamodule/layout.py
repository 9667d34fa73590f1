"""The source's layout: what is read, in which order, along which dims (the first stage).

Built once by :func:`source_layout` from a :class:`~xr_datamodule.spec.DataSpec`: the source
is opened lazily (nothing loaded), every name in the spec is checked against it, and the
windowed dims are put in the order of the first time-varying variable. What follows from
the labels alone lives here too: which variables are static fields, the channel order of
``X`` and ``y`` (time-varying variables, then static ones), the labels of every windowed
position, the time dim, and area weights.

Invariants: ``window_dims`` are dims of every time-varying selected variable, in that
variable's order; a static field lacks exactly ``static_dim``; channels of one variable are
its non-windowed dims flattened in C order (:class:`~xr_datamodule.sources.VariableLayout`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import xarray as xr

from xr_datamodule.coordinates import (
    CoordinateField,
    check_coordinates,
    check_forcings,
    weight_field,
)
from xr_datamodule.missing import StaticMask
from xr_datamodule.sources import (
    VariableLayout,
    channel_layouts,
    check_names,
    check_store_tree,
    check_variables,
    is_remote,
    open_selected,
    open_source,
    select_labels,
    static_variables,
    window_dim_order,
)
from xr_datamodule.spec import DataSpec
from xr_datamodule.timeaxis import is_datetime_labels
from xr_datamodule.windows import WindowGeometry

__all__ = ["SourceLayout", "open_checked", "preview_source", "source_layout", "static_dim_of"]


@dataclass(frozen=True)
class SourceLayout:
    """The opened source and the order of its variables, dims and channels.

    Args:
        source: The opened source, lazy, restricted to ``select``'s labels.
        origin: The source as errors name it: its path or URL, or "the xr.Dataset".
        window_dims: Windowed dims in the order of the window axes of ``X`` and ``y``.
        static_dim: The dim static fields lack (and are broadcast along), or None.
        input_vars: The spec's input variables, as given.
        target_vars: The spec's target variables, as given.
        coordinates: Latitude, longitude and cell area named by the user (``coordinates=``).

    Example:
        >>> spec = DataSpec("synthetic://weather", input_vars=["t2m", "u10"],
        ...                 input_dims={"time": 1, "lat": 32, "lon": 32})
        >>> layout = source_layout(spec)
        >>> layout.window_dims, layout.input_order
        (('time', 'lat', 'lon'), ['t2m', 'u10'])
    """

    source: xr.Dataset
    origin: str
    window_dims: tuple[str, ...]
    static_dim: str | None
    input_vars: list[str]
    target_vars: list[str]
    coordinates: Mapping[str, str] | None = None

    @cached_property
    def window_labels(self) -> dict[str, np.ndarray]:
        """Label of every position of each windowed dim, for batch metadata (dict batches).

        Datetimes as int64 nanoseconds, numbers as they are, positions where a dim has no
        coordinate.
        """
        labels = {}
        for dim in self.window_dims:
            if dim not in self.source.coords:
                labels[dim] = np.arange(self.source.sizes[dim], dtype=np.int64)
                continue
            values = np.asarray(self.source[dim].values)
            if np.issubdtype(values.dtype, np.datetime64):
                values = values.astype("datetime64[ns]").astype(np.int64)
            elif not np.issubdtype(values.dtype, np.number):
                values = np.arange(len(values), dtype=np.int64)
            labels[dim] = values
        return labels

    def statics(self, names: Sequence[str]) -> list[str]:
        """The static fields among ``names`` (variables without the time dim)."""
        return static_variables(self.source, names, self.static_dim)

    def dynamic(self, names: Sequence[str]) -> list[str]:
        """The variables among ``names`` that vary along every windowed dim."""
        static = set(self.statics(names))
        return [name for name in names if name not in static]

    @property
    def input_order(self) -> list[str]:
        """The variables of ``X``'s channels in order: time-varying ones, then static ones."""
        return self.dynamic(self.input_vars) + self.statics(self.input_vars)

    @property
    def target_order(self) -> list[str]:
        """The variables of ``y``'s channels in order: time-varying ones, then static ones."""
        return self.dynamic(self.target_vars) + self.statics(self.target_vars)

    @property
    def reader_vars(self) -> list[str]:
        """The variables read window by window: inputs, then the other targets, not static."""
        names = self.input_vars + [n for n in self.target_vars if n not in self.input_vars]
        return self.dynamic(names)

    def layouts(self, names: Sequence[str]) -> list[VariableLayout]:
        """How each of ``names`` becomes channels."""
        return channel_layouts(self.source, names, self.window_dims)

    def static_mask(self, name: str | None) -> StaticMask | None:
        """The static field ``name`` as where targets count (see ``mask``), or None."""
        if name is None:
            return None
        return StaticMask(self.source, name, self.window_dims, self.time_dim)

    def n_channels(self, names: Sequence[str]) -> int:
        """Channels of the variables ``names`` together."""
        return sum(layout.n_channels for layout in self.layouts(names))

    def reader_channels(self, names: Sequence[str]) -> np.ndarray:
        """Positions of the (time-varying) ``names``' channels among the reader's channels."""
        layouts = self.layouts(self.reader_vars)
        ends = np.cumsum([layout.n_channels for layout in layouts])
        where = {layout.name: end for layout, end in zip(layouts, ends, strict=True)}
        sizes = {layout.name: layout.n_channels for layout in layouts}
        ranges = [np.arange(where[n] - sizes[n], where[n]) for n in self.dynamic(names)]
        return np.concatenate(ranges) if ranges else np.zeros(0, dtype=np.int64)

    @property
    def time_dim(self) -> str | None:
        """The windowed dim of time: the first with datetime labels, else ``time``, else None."""
        for dim in self.window_dims:
            if dim in self.source.indexes and is_datetime_labels(self.source[dim].values):
                return dim
        return "time" if "time" in self.window_dims else None

    def points_per_step(self) -> int:
        """Grid points of the windowed dims at one position of the first."""
        return int(np.prod([self.source.sizes[dim] for dim in self.window_dims[1:]]))

    def latitude_weights(self) -> CoordinateField | None:
        """Each grid point's area weight over its mean over the whole grid (or None).

        A cell-area variable named in ``coordinates``, else cos(latitude), from a 1-D, cell
        or 2-D latitude (:func:`~xr_datamodule.coordinates.weight_field`); gathered per
        sample for patches' ``target_area_weight``. None without either.
        """
        return weight_field(self.source, self.window_dims, self.coordinates)

    def area_weights(self, geometry: WindowGeometry, dtype: np.dtype) -> np.ndarray:
        """The area weights, shaped ``(1, 1, *target window)`` to weight ``y``.

        Needs the target window to span the dims the weights vary along whole (a global
        field, or every cell), so that every sample has the same weights.
        """
        field = self.latitude_weights()
        if field is None:
            raise ValueError(
                f"area_weights needs a latitude coordinate over the windowed dims "
                f"{self.window_dims} (1-D, on a cell dim or 2-D), or a cell-area variable: "
                "coordinates={'area': name}"
            )
        shape = [1, 1] + [1] * len(self.window_dims)
        for axis, length in zip(field.axes, field.values.shape, strict=True):
            dim = self.window_dims[axis]
            if geometry.target_size[axis] != length:
                raise ValueError(
                    f"area_weights: the target window spans {geometry.target_size[axis]} of "
                    f"the {length} positions of {dim!r}; weights differ from sample to sample "
                    "then: use dict batches' per-sample target_area_weight instead"
                )
            shape[2 + axis] = length
        return field.values.reshape(shape).astype(dtype)


def preview_source(arguments: Mapping[str, Any]) -> xr.Dataset | None:
    """The source opened lazily where the datamodule is constructed, its names checked.

    Variables and dims are checked against the data before the arguments are checked
    against each other, so that a misspelled name is reported for what it is (with the
    closest valid one), not as, say, ``target_dims`` disagreeing with ``input_dims``. Only
    what opens without a network or a store of untrusted origin (``strict_store`` checks its
    tree first, in ``setup``): an ``xr.Dataset``, a local file or store, the synthetic data.
    None otherwise, and when it does not open (``setup`` then says why, in full).

    Raises:
        KeyError: An unknown variable or dim.
    """
    data = arguments.get("data")
    if arguments.get("strict_store") or data is None or is_remote(data):
        return None
    try:
        source = open_source(data, arguments.get("open_kwargs"))
    except Exception:  # reported by setup, which opens it again
        return None
    variables = {role: arguments.get(role) for role in ("input_vars", "target_vars")}
    dims = ("input_dims", "target_dims", "input_overlap", "target_offset")
    check_names(source, variables, {role: arguments.get(role) for role in dims})
    return source


def open_checked(spec: DataSpec, opened: xr.Dataset | None = None) -> xr.Dataset:
    """The spec's source opened lazily (``select`` applied), its variable names checked.

    Args:
        spec: The spec.
        opened: The source already opened (without ``select``), if it was.

    Raises:
        KeyError: A variable that the data lack (with the valid ones).
    """
    if spec.strict_store and isinstance(spec.data, (str, os.PathLike)):
        path = os.fspath(spec.data)
        if os.path.isdir(path):
            check_store_tree(path)
    if opened is None:
        source = open_selected(spec.data, spec.open_kwargs, spec.select)
    else:
        source = select_labels(opened, spec.select) if spec.select else opened
    check_variables(source, spec.input_vars, "input_vars")
    check_variables(source, spec.targets, "target_vars")
    return source


def static_dim_of(spec: DataSpec) -> str | None:
    """The windowed dim static fields lack: ``split_dim``, else ``time``, if windowed."""
    static_dim = spec.split_dim or ("time" if "time" in spec.input_dims else None)
    return static_dim if static_dim in spec.input_dims else None


def source_layout(spec: DataSpec, source: xr.Dataset | None = None) -> SourceLayout:
    """Open the spec's source lazily (unless given) and check every name in the spec against it.

    Raises:
        KeyError: A variable or windowed dim that the data lack (with the valid ones).
        ValueError: A side made only of static fields; static fields with a transform; a
            forcing whose coordinate is not windowed.
    """
    if source is None:
        source = open_checked(spec)
    static_dim = static_dim_of(spec)
    dims = window_dim_order(source, spec.all_vars, tuple(spec.input_dims), static_dim=static_dim)
    for role, names in (("input_vars", spec.input_vars), ("target_vars", spec.targets)):
        if names and len(static_variables(source, names, static_dim)) == len(names):
            raise ValueError(
                f"{role}: {list(names)} are all static fields (they lack {static_dim!r}); at "
                "least one must vary along it, the static fields are broadcast beside it"
            )
    check_coordinates(source, dims, spec.coordinates)
    check_forcings(spec.forcings or [], source, dims, spec.coordinates)
    statics = static_variables(source, spec.all_vars, static_dim)
    if statics and (spec.transform or spec.target_transform):
        raise ValueError(
            f"static variables {statics} cannot be combined with a transform yet: add them "
            "inside the transform instead"
        )
    data = spec.data
    origin = "the xr.Dataset" if isinstance(data, xr.Dataset) else repr(os.fspath(data))
    return SourceLayout(
        source, origin, dims, static_dim, spec.input_vars, spec.targets, spec.coordinates
    )
