"""Reads out of a cell arena piece by piece, where a batch cannot be gathered in one go.

:class:`~xr_datamodule.gather.ChunkedReader` gathers a batch from its arena with one copy
per window. Two cases go through here instead:

* :class:`CellByCell`: a batch whose single samples need more cells than the arena holds.
  Where cells are big (a 0.25 deg global state: 100 MB a step), the arena keeps only the
  cells the next batch reuses (``TrainingOrder.cache_cells``), fewer than a sample touches.
  Missing cells that lie whole in one window of one sample are decoded straight into the
  batch and then kept; the others pass through the arena a few at a time.
* :func:`assemble_span`: one sample whose rows cross a cell edge along the last dim.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, NamedTuple

import numpy as np
import torch

from xr_datamodule.arena import CellArena
from xr_datamodule.decode import DecodeJob

__all__ = ["CellByCell", "Cut", "Runs", "assemble_span"]


class Cut(NamedTuple):
    """One output of a batch read: which channels, where in the sample's span, how large."""

    channels: np.ndarray
    offset: tuple[int, ...]
    size: tuple[int, ...]


class Runs(NamedTuple):
    """The runs of one cut for a batch, before slots are known (by :class:`CellByCell` too)."""

    within: np.ndarray  # flat offset of each run inside its cell, (batch, channel, *lens)
    keys: np.ndarray  # flat cell number of each run, (batch, 1, *lens)
    width: int


def copy_with_threads(out: np.ndarray, values: np.ndarray) -> None:
    """``out[...] = values`` with torch's intra-op threads (numpy copies with one)."""
    torch.from_numpy(out).copy_(torch.from_numpy(values))


class CellByCell:
    """Reads a batch through an arena that holds fewer cells than one of its samples touches.

    Missing cells that lie whole in one window of one sample are decoded straight into the
    batch (with ``decode`` in the background: meanwhile the cached cells are copied out)
    and then kept in the arena for the next batch. The other cells go through the arena a
    few at a time, cached ones first (copied out before a missing one replaces the oldest
    of them); each wave's runs are copied one by one: a cell this large holds few, long
    runs. Each wave leaves its cells newest in the order of their position, so that the
    next replaces the earliest: the one a stream walking forward needs no more; the batch's
    last cells stay.

    Args:
        arena: The reader's arena.
        slot_items: Elements of a slot.
        decode: Decodes and prepares jobs; may return a future (decoding in the background).
        direct: Whether cells may be decoded straight into the batch (not where masks are
            computed from a cell's channels: those are made in the arena).
        n_channels: Channels of a cell.
    """

    def __init__(
        self,
        arena: CellArena,
        slot_items: int,
        decode: Callable[[Sequence[DecodeJob]], Future[Any] | None],
        direct: bool,
        n_channels: int,
    ) -> None:
        self.arena, self.slot_items, self.decode = arena, slot_items, decode
        self.direct, self.n_channels = direct, n_channels

    def gather(
        self, base: np.ndarray, cuts: Sequence[Cut], outs: list[np.ndarray], runs: list[Runs]
    ) -> None:
        """Fill ``outs`` with the batch of samples ``base`` (their runs given per cut)."""
        arena, size = self.arena, self.arena.cache_cells
        keys = [np.broadcast_to(r.keys, r.within.shape).reshape(-1) for r in runs]
        needed = np.unique(np.concatenate(keys)).tolist()
        cached = [key for key in needed if key in arena.slots]
        missing = [key for key in needed if key not in cached]
        direct = self._places(base, cuts, outs, missing) if self.direct else {}
        jobs = [DecodeJob(arena.region(key), view) for key, view in direct.items()]
        decoding = self.decode(jobs) if jobs else None
        order = cached + [key for key in missing if key not in direct]
        try:
            for first in range(0, len(order), size):
                self._copy_wave(order[first : first + size], runs, outs, keys)
        finally:
            if decoding is not None:
                decoding.result()  # raises a failed decode, after the waves let go
        # Keep the last cells by position (a stream walking forward needs them next): the
        # cached ones among them newest, the others replaced first.
        keep = sorted(needed)[-size:]
        arena.touch([key for key in keep if key not in direct])
        for key, view in sorted(direct.items()):
            arena.adopt(key, view, key in keep, copy_with_threads)

    def _copy_wave(
        self, wave: list[int], runs: list[Runs], outs: list[np.ndarray], keys: list[np.ndarray]
    ) -> None:
        """Copy the runs of the cells ``wave`` (decoded into the arena first if missing)."""
        slots = dict(zip(wave, self.arena.slots_for(wave), strict=True))  # pinned
        try:
            block = self.arena.block
            assert block is not None
            source = block.reshape(-1)
            for r, out, of_run in zip(runs, outs, keys, strict=True):
                rows = out.reshape(-1, r.width)
                starts = r.within.reshape(-1)
                for run in np.flatnonzero(np.isin(of_run, wave)).tolist():
                    start = int(starts[run]) + slots[int(of_run[run])] * self.slot_items
                    rows[run] = source[start : start + r.width]
        finally:
            self.arena.unpin(wave)
        self.arena.touch(sorted(wave))

    def _places(
        self, base: np.ndarray, cuts: Sequence[Cut], outs: list[np.ndarray], missing: list[int]
    ) -> dict[int, np.ndarray]:
        """The ``(channel, *cell)`` place in the batch of each missing cell that has one.

        A cell has one when a single window of a single sample uses it, holds it whole and
        takes every channel of it, in order (the extra channels after them are stand-ins
        that are overwritten).
        """
        grid, everything = self.arena.grid, list(range(self.n_channels))
        places = {}
        for key in missing:
            cell = np.unravel_index(key, grid.grid_shape)
            lo = np.array([edges[i] for edges, i in zip(grid.edges, cell, strict=True)])
            hi = np.array([edges[i + 1] for edges, i in zip(grid.edges, cell, strict=True)])
            uses = []
            for cut, out in zip(cuts, outs, strict=True):
                start = base + np.asarray(cut.offset)
                stop = start + np.asarray(cut.size)
                whole = cut.channels[: len(everything)].tolist() == everything
                for row in np.flatnonzero(((start < hi) & (stop > lo)).all(axis=1)).tolist():
                    inside = (start[row] <= lo).all() and (stop[row] >= hi).all()
                    low, high = (lo - start[row]).tolist(), (hi - start[row]).tolist()
                    at = [slice(a, b) for a, b in zip(low, high, strict=True)]
                    place = (row, slice(0, len(everything)), *at)
                    uses.append(out[place] if inside and whole else None)
            if len(uses) == 1 and uses[0] is not None:
                places[key] = uses[0]
        return places


def assemble_span(
    arena: CellArena, n_channels: int, dtype: np.dtype, base: np.ndarray, extent: Sequence[int]
) -> np.ndarray:
    """Assemble one sample's span ``(channel, *extent)`` from the cells it touches."""
    grid = arena.grid
    span = np.empty((n_channels, *extent), dtype=dtype)
    per_axis = []  # for each axis: (cell, slice in the cell, slice in the span) pieces
    for axis, (edges, lo, length) in enumerate(zip(grid.edges, base, extent, strict=True)):
        hi = lo + length
        pieces = []
        first, last = int(grid.cell_of(lo, axis)), int(grid.cell_of(hi - 1, axis))
        for number in range(first, last + 1):
            start, stop = max(lo, edges[number]), min(hi, edges[number + 1])
            pieces.append(
                (
                    number,
                    slice(int(start - edges[number]), int(stop - edges[number])),
                    slice(int(start - lo), int(stop - lo)),
                )
            )
        per_axis.append(pieces)
    for combination in itertools.product(*per_axis):
        key = int(np.ravel_multi_index([piece[0] for piece in combination], grid.grid_shape))
        inside_cell = (slice(None), *(piece[1] for piece in combination))
        inside_span = (slice(None), *(piece[2] for piece in combination))
        (slot,) = arena.slots_for([key])
        try:
            span[inside_span] = arena.cell_view(slot, key)[inside_cell]
        finally:
            arena.unpin([key])
    return span
