"""Reading a grid family's windows for a batch of primary window starts.

One :class:`GridRead` per family and side: the family's reader (in memory or by cell, like
the primary grid's), the channels of that side's variables, and where the window lies in
the family's own cells (:meth:`~xr_datamodule.grids.GridFamily.starts`). A batch is one
vectorised gather per family; nothing per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xr_datamodule.gather import Cut, WindowReader
from xr_datamodule.grids import GridFamily
from xr_datamodule.windows import WindowGeometry

__all__ = ["GridRead"]


@dataclass(frozen=True, eq=False)
class GridRead:
    """One side of one grid family, read for a batch.

    Args:
        key: Where it goes: ``"y"`` (the targets), ``"x_<family>"`` (its own input tensor)
            or ``"x"`` with ``into`` set (channels of ``X``, broadcast along the dims the
            family lacks).
        family: The family.
        primary_dims: The primary grid's windowed dims, in window-axis order.
        reader: Reads the family's variables.
        geometry: The family's window geometry, in its own cells.
        channels: The reader's channels of this side's variables.
        target: Whether it is the target side (its window at the target offset).
        labels: Label of every position of the family's dims (for dict batches' metadata).
        into: With ``key="x"``, the first channel of ``X`` it fills.
    """

    key: str
    family: GridFamily
    primary_dims: tuple[str, ...]
    reader: WindowReader
    geometry: WindowGeometry
    channels: np.ndarray
    target: bool = False
    labels: dict[str, np.ndarray] | None = None
    into: int | None = None

    @property
    def size(self) -> tuple[int, ...]:
        """The window's length per family dim."""
        return self.geometry.target_size if self.target else self.geometry.input_size

    @property
    def n_channels(self) -> int:
        """Channels it delivers."""
        return len(self.channels)

    def shape(self, batch: int) -> tuple[int, ...]:
        """Shape of its output for ``batch`` samples."""
        return (batch, self.n_channels, *self.size)

    def _own_starts(self, starts: np.ndarray) -> np.ndarray:
        """The family's input-window starts for primary input-window starts."""
        return self.family.starts(self.primary_dims, starts)

    def read(self, starts: np.ndarray, upcoming: np.ndarray | None, out: np.ndarray) -> None:
        """Gather the windows of primary starts ``starts`` into ``out`` (one gather)."""
        geometry = self.geometry
        below = np.asarray(geometry.reach_below, dtype=np.int64)
        offset = np.add(geometry.reach_below, geometry.target_offset if self.target else 0)
        cut = Cut(self.channels, tuple(int(v) for v in offset), self.size)
        ahead = None if upcoming is None else self._own_starts(upcoming) - below
        base = self._own_starts(starts) - below
        self.reader.gather(base, geometry.extent, [cut], [out], upcoming=ahead)

    def broadcast(self, values: np.ndarray, out: np.ndarray) -> None:
        """Write ``values`` (its output) into ``out`` ``(batch, n, *primary window)``.

        Along the primary dims the family lacks, each value is repeated (like a static
        field along time).
        """
        dims = self.family.dims
        order = sorted(range(len(dims)), key=lambda k: self.primary_dims.index(dims[k]))
        values = values.transpose(0, 1, *(2 + k for k in order))
        shape = [self.size[dims.index(d)] if d in dims else 1 for d in self.primary_dims]
        out[...] = values.reshape(values.shape[0], values.shape[1], *shape)

    def meta(self, starts: np.ndarray) -> dict[str, np.ndarray]:
        """Labels of every window position along the family's own dims (not the primary's)."""
        if self.labels is None:
            return {}
        own = self._own_starts(starts)
        offset = self.geometry.target_offset if self.target else (0,) * len(self.family.dims)
        side = "target" if self.target else "input"
        out = {}
        for axis, dim in enumerate(self.family.dims):
            if dim in self.primary_dims:
                continue
            positions = own[:, axis, None] + offset[axis] + np.arange(self.size[axis])
            out[f"{side}_{dim}"] = self.labels[dim][positions]
        return out
