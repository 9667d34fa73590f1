"""The cell grid: how the windowed dims are cut into cells, and which cells a sample touches.

Out of core the data are read in *cells*, groups of whole storage chunks (see
:func:`cell_edges` for when chunks are merged). Everything that depends only on the cell
boundaries lives here, computed before any reader exists: the most cells one sample can
touch, the bytes of one cached cell, the cell each sample starts in (its *home*), and a walk
over the cells that steps to the cells samples reach into. The training order is sized from
this grid (:meth:`~xr_datamodule.order.TrainingOrder.cache_cells`), then the reader
(:class:`~xr_datamodule.gather.ChunkedReader`) is built with it.

Invariant: a cell is a box of whole chunks of every read variable along every windowed dim;
cells tile the data without overlap, numbered in C order of :attr:`CellGrid.grid_shape`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr

__all__ = ["CellGrid", "cell_edges", "cell_grid"]

MIN_CELL_BYTES = 2**20  # thinner chunks are merged along the first dim (per-cell overhead)
DEFAULT_CELL_BYTES = 16 * 2**20  # cell size along the first dim of a file without chunks


def cell_edges(
    ds: xr.Dataset,
    name: str,
    window_dims: Sequence[str],
    extent: Sequence[int],
    itemsize: int,
    n_channels: int,
    min_cell_bytes: int | None = None,
    default_cell_bytes: int = DEFAULT_CELL_BYTES,
) -> list[np.ndarray]:
    """Cell boundaries along each windowed dim, aligned with the storage chunks of ``name``.

    Chunks come from dask (``chunksizes``), else from the file's ``preferred_chunks`` /
    ``chunksizes`` encoding; without either, the first windowed dim is cut into cells of
    about ``default_cell_bytes``. Chunks are merged only where that pays:

    * a dim that every sample spans whole (a full-field window) is one cell;
    * along the last dim, chunks are merged until a cell is at least four times the sample's
      reach beyond one position: a window row that crosses a cell edge there is assembled
      sample by sample, while samples crossing edges along other dims are gathered with the
      rest of the batch;
    * along the first dim, until a cell holds at least ``min_cell_bytes`` (default
      :data:`MIN_CELL_BYTES`).

    Returns:
        One int64 array per dim: ``[0, edge_1, ..., length]``.
    """
    min_cell_bytes = MIN_CELL_BYTES if min_cell_bytes is None else min_cell_bytes
    var = ds[name]
    encoded = var.encoding.get("preferred_chunks") or dict(
        zip(var.dims, var.encoding.get("chunksizes") or (), strict=False)
    )
    lengths: list[list[int]] = []
    for dim in window_dims:
        size = ds.sizes[dim]
        if var.chunks is not None:
            chunk_lengths = list(var.chunksizes[dim])
        elif dim in encoded:
            step = int(encoded[dim])
            chunk_lengths = [step] * (size // step) + ([size % step] if size % step else [])
        else:
            chunk_lengths = [size]
        lengths.append(chunk_lengths)
    if var.chunks is None and not encoded:
        # An unchunked file: cut the first dim so that one cell is about default_cell_bytes.
        other = int(np.prod([ds.sizes[d] for d in window_dims[1:]])) * n_channels * itemsize
        step = max(1, default_cell_bytes // max(other, 1))
        size = ds.sizes[window_dims[0]]
        lengths[0] = [step] * (size // step) + ([size % step] if size % step else [])
    last = len(window_dims) - 1
    edges = []
    for axis, chunk_lengths in enumerate(lengths):
        size = sum(chunk_lengths)
        if extent[axis] >= size:
            edges.append(np.asarray([0, size], dtype=np.int64))
            continue
        minimum = 4 * (extent[axis] - 1) if axis == last else 1
        if axis == 0:
            other = int(np.prod([sum(c) for c in lengths[1:]])) * n_channels * itemsize
            minimum = max(minimum, -(-min_cell_bytes // max(other, 1)))
        edges.append(_merge_thin(chunk_lengths, minimum))
    return edges


def _merge_thin(chunk_lengths: Sequence[int], minimum: int) -> np.ndarray:
    """Edges after merging consecutive chunks until each cell spans at least ``minimum``."""
    edges, run = [0], 0
    for length in chunk_lengths:
        run += length
        if run >= minimum:
            edges.append(edges[-1] + run)
            run = 0
    if run:
        if len(edges) > 1:
            edges[-1] += run  # fold a thin remainder into the last cell
        else:
            edges.append(run)
    return np.asarray(edges, dtype=np.int64)


@dataclass(frozen=True)
class CellGrid:
    """Cell boundaries along each windowed dim, and what follows from them.

    Args:
        edges: One int64 array per windowed dim: ``[0, edge_1, ..., length]``.
        extent: Length of a sample's span (input and target) per windowed dim.
        channel_bytes: Bytes of one position of every read channel (channels x itemsize).

    Example:
        >>> grid = CellGrid((np.array([0, 4, 8]), np.array([0, 10])), (2, 10), 4)
        >>> grid.grid_shape, grid.cells_per_sample, grid.cell_bytes
        ((2, 1), 2, 160)
    """

    edges: tuple[np.ndarray, ...]
    extent: tuple[int, ...]
    channel_bytes: int

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Cells along each windowed dim."""
        return tuple(len(edges) - 1 for edges in self.edges)

    @property
    def cell_shape(self) -> tuple[int, ...]:
        """Shape of the largest cell (an arena slot)."""
        return tuple(int(np.diff(edges).max()) for edges in self.edges)

    @property
    def cells_per_sample(self) -> int:
        """The most cells one sample's span can touch."""
        count = 1
        for edges, length in zip(self.edges, self.extent, strict=True):
            thinnest = int(np.diff(edges).min())
            count *= min(len(edges) - 1, 1 + -(-(length - 1) // thinnest))
        return count

    @property
    def cell_bytes(self) -> int:
        """Bytes of one arena slot: every read channel of the largest cell."""
        return self.channel_bytes * int(np.prod(self.cell_shape))

    def cell_of(self, positions: np.ndarray | int, axis: int) -> np.ndarray:
        """Cell number along ``axis`` of each position."""
        return np.searchsorted(self.edges[axis], positions, side="right") - 1

    def home_cells(self, axis_starts: Sequence[np.ndarray]) -> np.ndarray:
        """Flat cell number of every point of a grid of span starts (C order), as int64."""
        keys = np.zeros((1,) * len(axis_starts), dtype=np.int64)
        for axis, starts in enumerate(axis_starts):
            shape = [1] * len(axis_starts)
            shape[axis] = len(starts)
            keys = keys * self.grid_shape[axis] + self.cell_of(starts, axis).reshape(shape)
        return keys.reshape(-1)

    def span_keys(self, base: np.ndarray, extent: Sequence[int]) -> np.ndarray:
        """Flat numbers of the cells the spans ``base + extent`` touch, in order of first need."""
        keys = np.zeros((len(base), 1), dtype=np.int64)
        for axis, length in enumerate(extent):
            first = self.cell_of(base[:, axis], axis)
            last = self.cell_of(base[:, axis] + length - 1, axis)
            steps = int((last - first).max()) + 1 if len(base) else 1
            cells = np.minimum(first[:, None] + np.arange(steps), last[:, None])
            keys = (keys[:, :, None] * self.grid_shape[axis] + cells[:, None, :]).reshape(
                len(base), -1
            )
        flat = keys.reshape(-1)
        _, first_seen = np.unique(flat, return_index=True)
        return flat[np.sort(first_seen)]

    def cell_walk(self) -> np.ndarray | None:
        """Position of every cell in a walk that steps to the cells samples reach into.

        Samples reach beyond their cell along the dims where a span is longer than one
        position and there is more than one cell (time, for a full-field sample of several
        steps). The walk visits cells in C order with those dims varying fastest, so that
        consecutive cells of the walk share samples. None when no sample reaches out.
        """
        grid_shape = self.grid_shape
        reach = [
            axis
            for axis, (length, cells) in enumerate(zip(self.extent, grid_shape, strict=True))
            if length > 1 and cells > 1
        ]
        if not reach:
            return None
        order = [a for a in range(len(grid_shape)) if a not in reach] + reach
        coords = np.indices(grid_shape).reshape(len(grid_shape), -1)
        walk = np.lexsort(coords[order[::-1]])
        positions = np.empty_like(walk)
        positions[walk] = np.arange(len(walk))
        return positions


def cell_grid(
    ds: xr.Dataset,
    names: Sequence[str],
    window_dims: Sequence[str],
    extent: Sequence[int],
    n_channels: int,
    itemsize: int,
    first_edges: np.ndarray | None = None,
) -> CellGrid:
    """The cell grid of the variables ``names`` (cut along the first one's chunks).

    ``first_edges``: cell edges along the first dim to share (another grid's, along the
    same time dim), so that the training order's walk over that grid's cells is a walk over
    these too; taken where they fall on chunk edges here.
    """
    extent = tuple(int(e) for e in extent)
    edges = cell_edges(ds, names[0], window_dims, extent, itemsize, n_channels)
    if first_edges is not None and len(edges[0]) > 2:
        chunks = cell_edges(ds, names[0], window_dims, extent, itemsize, n_channels, 1)[0]
        if np.isin(first_edges, chunks).all() and first_edges[-1] == chunks[-1]:
            edges[0] = np.asarray(first_edges, dtype=np.int64)
    return CellGrid(tuple(edges), extent, n_channels * itemsize)
