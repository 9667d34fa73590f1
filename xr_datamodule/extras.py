"""Channels not read window by window: static fields and forcings, for whole batches.

Global weather models take, besides the prognostic variables, **static fields** (land-sea
mask, orography: variables without the time dim) and **forcings** computed from the
coordinates (:mod:`xr_datamodule.forcings`). Both are vectorised over a whole batch: a
static field is read once (it is small) and its windows are cut with one gather and
broadcast along time; a forcing is one numpy expression over the batch's window
coordinates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from xr_datamodule.coordinates import find_coordinates
from xr_datamodule.forcings import FORCINGS
from xr_datamodule.gather import gather_windows
from xr_datamodule.missing import (
    MISSING_ADVICE,
    MissingValueError,
    describe_missing,
    first_nan,
    holds_nan,
)
from xr_datamodule.sources import channel_layouts, label_at

__all__ = ["ExtraChannels"]


class ExtraChannels:
    """Static fields and forcings of one side of a sample (``X`` or ``y``), for whole batches.

    Args:
        source: The source dataset (coordinates; the static variables).
        window_dims: Windowed dims, in window axis order.
        statics: Variables that lack ``static_dim``, in channel order.
        static_dim: The dim static fields are broadcast along (time).
        forcings: Names from :data:`FORCINGS`, in channel order (after the statics).
        dtype: Output dtype.
        affine: Optional ``(mean, std)`` per static channel: the statics are normalised
            once, when read. Forcings are never normalised.
        coordinates: Latitude and longitude named by the user (``coordinates=``); else
            recognised (:mod:`xr_datamodule.coordinates`: 1-D, on a cell dim, or 2-D).
    """

    def __init__(
        self,
        source: xr.Dataset,
        window_dims: Sequence[str],
        statics: Sequence[str] = (),
        static_dim: str | None = None,
        forcings: Sequence[str] = (),
        dtype: np.dtype | str = "float32",
        affine: tuple[np.ndarray, np.ndarray] | None = None,
        coordinates: Mapping[str, str] | None = None,
    ) -> None:
        self.window_dims = tuple(window_dims)
        self.statics = list(statics)
        self.forcings = list(forcings)
        self.dtype = np.dtype(dtype)
        self._static_axis = self.window_dims.index(static_dim) if self.statics else -1
        self._present = [a for a in range(len(self.window_dims)) if a != self._static_axis]
        self._block = self._read_statics(source, affine) if self.statics else None
        self._fields = find_coordinates(source, self.window_dims, coordinates)
        n_static = 0 if self._block is None else self._block.shape[0]
        self.n_channels = n_static + len(self.forcings)
        layouts = channel_layouts(source, self.statics, self.window_dims)
        self.channel_names = [
            name for layout in layouts for name in layout.channel_names(source)
        ] + self.forcings

    def _read_statics(
        self, source: xr.Dataset, affine: tuple[np.ndarray, np.ndarray] | None
    ) -> np.ndarray:
        present = [self.window_dims[a] for a in self._present]
        parts = []
        for layout in channel_layouts(source, self.statics, self.window_dims):
            values = source[layout.name].transpose(*layout.extra_dims, *present).values
            parts.append(values.reshape(-1, *values.shape[len(layout.extra_dims) :]))
        block = np.concatenate(parts).astype(np.float64)
        if affine is not None:
            lead = (-1,) + (1,) * len(present)
            block = (block - np.reshape(affine[0], lead)) / np.reshape(affine[1], lead)
        return np.ascontiguousarray(block.astype(self.dtype))

    def fail_on_nan(self, source: xr.Dataset) -> None:
        """Raise :class:`MissingValueError` if a static field holds a NaN or ±Inf (once)."""
        if self._block is None or not holds_nan(self._block):
            return
        channel, *at = first_nan(self._block)
        value = self._block[(channel, *at)]
        dims = [self.window_dims[axis] for axis in self._present]
        raise MissingValueError(
            f"static field {self.channel_names[channel]!r} has a {describe_missing(value)} at "
            f"{label_at(source, dims, at)}; {MISSING_ADVICE}"
        )

    def fill(self, out: np.ndarray, starts: np.ndarray) -> None:
        """Write the channels of the windows starting at ``starts`` into ``out``.

        Args:
            out: ``(batch, n_channels, *window)``, written in place.
            starts: ``(batch, ndim)`` window starts (positions).
        """
        size = out.shape[2:]
        n_static = 0
        if self._block is not None:
            n_static = self._block.shape[0]
            windows = gather_windows(
                self._block,
                np.arange(n_static),
                starts[:, self._present],
                [size[a] for a in self._present],
            )
            out[:, :n_static] = np.expand_dims(windows, 2 + self._static_axis)
        if self.forcings:
            coords = self._window_coords(starts, size)
            for i, name in enumerate(self.forcings):
                out[:, n_static + i] = FORCINGS[name][1](*coords)

    def _window_coords(
        self, starts: np.ndarray, size: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lat, lon, time) of every window position, shaped to broadcast to (batch, *size)."""
        found = []
        for role, empty in (("lat", 0.0), ("lon", 0.0), ("time", np.datetime64(0, "ns"))):
            field = self._fields.get(role)
            found.append(np.asarray(empty) if field is None else field.windows(starts, size))
        lat, lon, time = found
        return lat, lon, time
