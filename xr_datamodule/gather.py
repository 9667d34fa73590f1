"""Batched, vectorised window reads: one index computation and one copy per batch and window.

The variables a dataset needs are seen as one channel-major block ``(channel, *space)`` whose
last axes are the windowed dims (see :mod:`xr_datamodule.sources` for the channel rule). A
batch of windows is a set of *runs*, contiguous stretches of memory: a row along the last
windowed dim, or, when a window spans whole trailing dims (a full-field sample spans all of
``lat`` and ``lon``), a whole ``lat x lon`` plane. The flat offset of every run of the batch
is computed with numpy and all runs are copied by a single ``index_select`` into the output,
a buffer the caller may provide (a reused one, or a worker's shared-memory slot).

Two readers provide the blocks:

* :class:`InMemoryReader` stacks the variables once into a contiguous array of the output
  dtype (one copy of the selected variables, shared by all splits).
* :class:`ChunkedReader` never loads the data whole. It cuts the windowed dims into *cells*
  (storage chunks, :mod:`~xr_datamodule.cells`), decodes the cells a batch needs
  into slots of a bounded arena (least recently used slots are reused) with a
  :class:`~xr_datamodule.decode.CellDecoder`, and gathers the batch from the arena in one go,
  also the samples whose windows cross cell edges (each run is looked up in its own cell).
  It can decode the next batch's cells in the background while the current one is used.
  With the chunk-aware sampler (:class:`~xr_datamodule.samplers.ChunkShuffleSampler`) each
  cell is decoded about once per epoch.

The arena of decoded cells and its two-thread protocol live in :mod:`xr_datamodule.arena`;
the cell grid in :mod:`xr_datamodule.cells`.

Nothing here knows about Lightning; torch serves only as a copy kernel (see
:func:`_take_runs`), arrays in and out are numpy.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import xarray as xr

from xr_datamodule.arena import CellArena
from xr_datamodule.cells import CellGrid
from xr_datamodule.cellwise import CellByCell, Cut, Runs, assemble_span
from xr_datamodule.decode import (
    CellDecoder,
    DecodeJob,
    ReadError,
    XarrayDecoder,
    channel_slices,
    close_decoder,
    decode_with_retries,
    read_error,
)
from xr_datamodule.missing import (
    MISSING_ADVICE,
    MissingValueError,
    describe_missing,
    first_nan,
    holds_nan,
    non_finite,
)
from xr_datamodule.perprocess import thread_pool
from xr_datamodule.retries import worker_place
from xr_datamodule.sources import VariableLayout, channel_layouts, label_at

__all__ = [
    "ChunkedReader",
    "Cut",
    "InMemoryReader",
    "Preparation",
    "WindowReader",
    "gather_windows",
]


@dataclass(frozen=True)
class _Memory:
    """Where data lie: cells of ``cell_shape`` in slots of a C-contiguous array.

    ``edges`` cut each windowed dim into cells; a position's cell holds it at
    ``position - edges[cell]``. Items are counted in elements of the array.
    """

    shape: tuple[int, ...]  # the data's length along each windowed dim
    edges: tuple[np.ndarray, ...]
    channel_items: int
    axis_items: tuple[int, ...]
    slot_items: int

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(len(edges) - 1 for edges in self.edges)

    @classmethod
    def of_block(cls, block: np.ndarray) -> _Memory:
        """A single cell: a whole ``(channel, *space)`` array."""
        items = [stride // block.itemsize for stride in block.strides]
        return cls(
            tuple(block.shape[1:]),
            tuple(np.asarray([0, n], dtype=np.int64) for n in block.shape[1:]),
            items[0],
            tuple(items[1:]),
            0,
        )


def _keys_by_batch(grid: CellGrid, base_starts: np.ndarray, rows: int) -> list[list[int]]:
    """The cells of each batch of a hint (batches of ``rows`` samples, one after the other)."""
    rows = max(1, rows)
    return [
        grid.span_keys(base_starts[first : first + rows], grid.extent).tolist()
        for first in range(0, len(base_starts), rows)
    ]


def _merged_axes(size: Sequence[int], shape: Sequence[int]) -> int:
    """How many trailing axes a window spans whole (their runs merge into one)."""
    merged = 0
    for length, whole in zip(reversed(size), reversed(shape), strict=True):
        if length != whole:
            break
        merged += 1
    return merged


def _runs(memory: _Memory, base: np.ndarray, cut: Cut) -> Runs:
    """Offsets of every run of a cut within its cell, and the cell of every run."""
    ndim = len(cut.size)
    merged = _merged_axes(cut.size, memory.shape)
    enumerated = ndim - max(merged, 1)  # axes whose every position starts runs
    width = int(np.prod(cut.size[ndim - merged :])) if merged else int(cut.size[-1])
    batch = len(base)
    keys = np.zeros((batch, 1, *(1,) * ndim), dtype=np.int64)
    within = np.asarray(cut.channels, dtype=np.int64).reshape(1, -1, *(1,) * ndim)
    within = within * memory.channel_items + keys  # every run of every sample
    for axis in range(ndim):
        if axis >= enumerated and not (axis == ndim - 1 and merged == 0):
            continue  # merged into the run: position 0 of the only cell
        length = cut.size[axis] if axis < enumerated else 1
        positions = base[:, axis, None] + (cut.offset[axis] + np.arange(length))
        edges = memory.edges[axis]
        shape = [batch, 1] + [1] * ndim
        shape[2 + axis] = length
        if len(edges) > 2:
            cell = np.searchsorted(edges, positions, side="right") - 1
            positions = positions - edges[cell]
            keys = keys + (cell * _key_step(memory.grid_shape, axis)).reshape(shape)
        within = within + (positions * memory.axis_items[axis]).reshape(shape)
    return Runs(within, keys, width)


def _key_step(grid_shape: Sequence[int], axis: int) -> int:
    return int(np.prod(grid_shape[axis + 1 :], dtype=np.int64))


def _take_runs(source: np.ndarray, width: int, starts: np.ndarray, out: np.ndarray) -> None:
    """Copy the runs of ``width`` items that begin at the flat offsets ``starts`` into ``out``.

    The runs are rows of an overlapping strided view of the C-contiguous ``source``; torch's
    ``index_select`` copies them into ``out`` (C-contiguous, ``len(starts) * width`` items)
    without a copy of the view. It is the one place torch is used here, as a kernel on numpy
    memory: it copies the rows without materialising the index arithmetic numpy's fancy
    indexing of the same view does (several times faster; ``benchmarks/README.md``).
    """
    flat = torch.from_numpy(source.reshape(-1))  # zero-copy; the source is C-contiguous
    runs = torch.as_strided(flat, (flat.numel() - width + 1, width), (1, 1))
    index = torch.from_numpy(np.ascontiguousarray(starts, dtype=np.int64).reshape(-1))
    torch.index_select(runs, 0, index, out=torch.from_numpy(out.reshape(-1, width)))


@contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (None: as they are)."""
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _empty_outputs(batch: int, cuts: Sequence[Cut], dtype: np.dtype) -> list[np.ndarray]:
    return [np.empty((batch, len(cut.channels), *cut.size), dtype=dtype) for cut in cuts]


def _gather_block(
    block: np.ndarray, base: np.ndarray, cuts: Sequence[Cut], outs: Sequence[np.ndarray]
) -> None:
    """Gather windows of a whole C-contiguous ``(channel, *space)`` block into ``outs``."""
    memory = _Memory.of_block(block)
    for cut, out in zip(cuts, outs, strict=True):
        runs = _runs(memory, base, cut)
        _take_runs(block, runs.width, runs.within, out)


def gather_windows(
    block: np.ndarray,
    channels: np.ndarray,
    starts: np.ndarray,
    size: Sequence[int],
) -> np.ndarray:
    """Cut windows out of a C-contiguous channel-major block in one vectorised read.

    Args:
        block: C-contiguous array ``(channel, *space)``; the last ``len(size)`` axes are
            windowed.
        channels: Channel numbers to take, in output order.
        starts: ``(batch, len(size))`` window starts within ``block``.
        size: Window length per windowed axis.

    Returns:
        A new C-contiguous array ``(batch, len(channels), *size)``.

    Example:
        >>> block = np.arange(2 * 5, dtype=np.float32).reshape(2, 5)
        >>> gather_windows(block, np.array([1]), np.array([[0], [3]]), (2,)).tolist()
        [[[5.0, 6.0]], [[8.0, 9.0]]]
    """
    cut = Cut(np.asarray(channels), (0,) * len(size), tuple(size))
    (out,) = _empty_outputs(len(starts), [cut], block.dtype)
    # One torch thread: these blocks are small (static fields), and a second intra-op thread
    # spins on the core a background decode needs.
    with _intra_op_threads(1):
        _gather_block(np.ascontiguousarray(block), np.asarray(starts, dtype=np.int64), [cut], [out])
    return out


@dataclass(frozen=True)
class Preparation:
    """What is done to a block once, right after it is read (not per batch).

    Args:
        mask_of: Channels whose NaNs make an extra last channel, the mask (1.0 where any of
            them is NaN, computed before filling).
        affine: ``(offset, scale)`` per data channel: values become
            ``(value - offset) / scale`` (z-score normalisation).
        fill_value: Replaces NaN in the data channels (after ``affine``).
        missing_of: Channels whose own missing-value masks are kept (one channel each, 1.0
            where NaN, after the mask): the targets' masks under ``nan_policy="fill"``.
        find_nan: Look for NaN in every block read (the default ``nan_policy="check"``): a
            batch that holds one raises :class:`~xr_datamodule.missing.MissingValueError`.
    """

    mask_of: np.ndarray | None = None
    missing_of: np.ndarray | None = None
    affine: tuple[np.ndarray, np.ndarray] | None = None
    fill_value: float | None = None
    find_nan: bool = False


class WindowReader(ABC):
    """Reads batches of windows of a fixed set of variables, channel-major.

    A read that fails raises a :class:`~xr_datamodule.decode.ReadError` naming the variable,
    :attr:`origin` (the store or file) and the label range.

    Args:
        ds: The source dataset.
        names: Variables to read, in channel order.
        window_dims: Windowed dims, in the order of the output window axes.
        dtype: Output dtype.
        prepare: What to do to each block once it is read (mask, normalise, fill).
        origin: The store or file, as read errors name it.
    """

    # Whether a dataset reads this reader's batches one whole batch ahead, in the background
    # (xr_datamodule.ahead; big samples without workers), rather than hint the next batch.
    whole_batches = False

    def __init__(
        self,
        ds: xr.Dataset,
        names: Sequence[str],
        window_dims: Sequence[str],
        dtype: np.dtype,
        prepare: Preparation = Preparation(),
        origin: str = "the data",
    ) -> None:
        self.dataset = ds[list(names)]
        self.origin = origin  # what read errors call the source: the store or file
        self.reopen: Callable[[], xr.Dataset] | None = None  # see reopen_source
        self.fill_value = prepare.fill_value
        self.window_dims = tuple(window_dims)
        self.dtype = np.dtype(dtype)
        self.layouts: list[VariableLayout] = channel_layouts(ds, names, window_dims)
        slices = channel_slices(self.layouts)
        self._channel_slices = {
            layout.name: part for layout, part in zip(self.layouts, slices, strict=True)
        }
        self.n_data_channels = int(slices[-1].stop)
        mask_of = prepare.mask_of
        self.mask_of = None if mask_of is None else np.asarray(mask_of, dtype=np.int64)
        # With a missing-value mask, one more channel follows the data: 1.0 where any of the
        # ``mask_of`` channels is NaN (computed before filling).
        missing_of = prepare.missing_of
        self.missing_of = None if missing_of is None else np.asarray(missing_of, dtype=np.int64)
        # Then one channel per ``missing_of`` channel: 1.0 where it is NaN (before filling).
        self._first_missing = self.n_data_channels + (self.mask_of is not None)
        n_missing = 0 if self.missing_of is None else len(self.missing_of)
        self.n_channels = self._first_missing + n_missing
        # The watched channels as a slice where they are consecutive (a view, not a copy).
        self._missing_source: slice | np.ndarray | None = self.missing_of
        if n_missing and (np.diff(self.missing_of) == 1).all():
            first = int(self.missing_of[0])
            self._missing_source = slice(first, first + n_missing)
        self.shape = tuple(ds.sizes[dim] for dim in self.window_dims)
        self.affine = None
        if prepare.affine is not None:
            lead = (-1,) + (1,) * len(self.window_dims)
            offset, scale = (np.asarray(a, dtype=self.dtype).reshape(lead) for a in prepare.affine)
            self.affine = (offset, scale)
        self.find_nan = prepare.find_nan and self.dtype.kind == "f"
        # Set once a block read held a NaN: from then on every batch is searched for one
        # (a store without NaN never pays for more than one look at each decoded block).
        self.nan_seen = False
        # Likewise, set once a block held a missing value in a ``missing_of`` channel: until
        # then every target mask is all True and its channels need not be cut per batch.
        self.missing_seen = False
        self._missing_lock = threading.Lock()
        # One batch read at a time: a batch read ahead in the background (xr_datamodule.ahead)
        # and another split's batch share the reader.
        self._gathering = threading.RLock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        # Locks do not pickle; each process has its own.
        state["_missing_lock"] = state["_gathering"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._missing_lock, self._gathering = threading.Lock(), threading.RLock()

    def reopen_source(self) -> None:
        """Open the source anew in this process (a DataLoader worker), if it can be.

        A remote store opened through fsspec is bound to the event loop of the process
        that opened it; a forked worker must not use it (its requests fail with "attached
        to a different loop"), so each worker opens its own with :attr:`reopen`.
        """
        if self.reopen is None:
            return
        names = list(self.dataset.data_vars)
        self.dataset = self.reopen()[names]
        decoder = getattr(self, "decoder", None)
        if isinstance(decoder, XarrayDecoder):
            decoder.dataset = self.dataset[list(decoder.dataset.data_vars)]

    def channels_of(self, names: Sequence[str]) -> np.ndarray:
        """Channel numbers of the given variables, in the order given."""
        return np.concatenate(
            [np.arange(self.n_channels)[self._channel_slices[name]] for name in names]
        )

    def _prepare(self, block: np.ndarray) -> None:
        """Mask, normalise and fill a freshly read ``(channel, *space)`` block in place."""
        data = block[: self.n_data_channels]
        if self.mask_of is not None:
            block[self.n_data_channels] = non_finite(block[self.mask_of]).any(axis=0)
        if self.missing_of is not None:
            self._keep_missing(block)
        if self.affine is not None:
            data -= self.affine[0]
            data /= self.affine[1]
        if self.fill_value is not None:
            np.copyto(data, self.fill_value, where=non_finite(data))
        if self.find_nan and not self.nan_seen and holds_nan(data):
            self.nan_seen = True

    def _keep_missing(self, block: np.ndarray) -> None:
        """Write the ``missing_of`` channels' masks of a block, once a value was missing.

        One look first (:func:`~xr_datamodule.missing.holds_nan`). Until some block holds a
        missing value no mask is read (:attr:`missing_seen`), so none is written; the first
        such block zeroes the masks of every block held (under a lock: decoding threads
        prepare blocks at once), and from then on each block writes its own.
        """
        kept = block[self._first_missing : self._first_missing + len(self.missing_of)]
        watched = block[self._missing_source]
        if holds_nan(watched):
            with self._missing_lock:
                if not self.missing_seen:
                    for held in self._held_blocks():
                        held[:, self._first_missing : self.n_channels] = 0
                    self.missing_seen = True
            kept[...] = non_finite(watched)
        elif self.missing_seen:
            kept[...] = 0

    def _held_blocks(self) -> list[np.ndarray]:
        """Every ``(channel, ...)`` block this reader holds (for :meth:`_keep_missing`)."""
        return []

    def _fail_on_nan(
        self, base: np.ndarray, cuts: Sequence[Cut], outs: Sequence[np.ndarray]
    ) -> None:
        """Raise :class:`MissingValueError` at the first NaN of a gathered batch, if any."""
        for cut, out in zip(cuts, outs, strict=True):
            if not holds_nan(out):
                continue
            row, channel, *at = first_nan(out)
            value = out[(row, channel, *at)]
            positions = np.asarray(base[row]) + np.asarray(cut.offset) + np.asarray(at)
            channel = int(np.asarray(cut.channels)[channel])
            raise MissingValueError(
                f"{self.channel_name(channel)} has a {describe_missing(value)} at "
                f"{label_at(self.dataset, self.window_dims, positions)} in {self.origin}"
                f"{worker_place()}; {MISSING_ADVICE}"
            )

    def channel_name(self, channel: int) -> str:
        """``variable 'u' (level=200)``: what a message calls one channel."""
        for layout in self.layouts:
            part = self._channel_slices[layout.name]
            if part.start <= channel < part.stop:
                name = layout.channel_names(self.dataset)[channel - part.start]
                variable, _, labels = name.partition("[")
                return f"variable {variable!r}" + (f" ({labels[:-1]})" if labels else "")
        return "the missing-value mask"

    def missing_channels(self, channels: Sequence[int]) -> np.ndarray | None:
        """Channel numbers of the missing-value masks of data ``channels`` (None if not kept)."""
        if self.missing_of is None:
            return None
        position = {int(c): self._first_missing + i for i, c in enumerate(self.missing_of)}
        return np.asarray([position[int(c)] for c in channels], dtype=np.int64)

    @property
    def mask_channel(self) -> int | None:
        """Channel number of the missing-value mask, if there is one."""
        return self.n_data_channels if self.mask_of is not None else None

    def gather(
        self,
        base_starts: np.ndarray,
        extent: Sequence[int],
        cuts: Sequence[Cut],
        outs: Sequence[np.ndarray] | None = None,
        upcoming: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """Read a batch of samples.

        Args:
            base_starts: ``(batch, ndim)`` lowest position each sample touches.
            extent: Length of a sample's span per windowed dim.
            cuts: What to cut out of each span (e.g. the input and the target window).
            outs: Optional C-contiguous ``(batch, len(cut.channels), *cut.size)`` arrays of
                the reader's dtype to fill, one per cut; fresh ones by default.
            upcoming: Optional ``base_starts`` of the batch to be read next: a hint, so that
                a reader can decode its chunks in the background.

        Returns:
            One ``(batch, len(cut.channels), *cut.size)`` array per cut.

        Raises:
            MissingValueError: With ``find_nan``, at the first NaN of the batch.
        """
        base = np.asarray(base_starts, dtype=np.int64)
        outs = list(outs) if outs is not None else _empty_outputs(len(base), cuts, self.dtype)
        with self._gathering:
            self._read(base, extent, cuts, outs, upcoming)
            if self.nan_seen:
                self._fail_on_nan(base, cuts, outs)
        return outs

    def close(self) -> None:  # noqa: B027  (readers without threads hold nothing to free)
        """Release this process's threads and caches (the reader stays usable)."""

    @abstractmethod
    def _read(
        self,
        base: np.ndarray,
        extent: Sequence[int],
        cuts: Sequence[Cut],
        outs: list[np.ndarray],
        upcoming: np.ndarray | None,
    ) -> None:
        """Fill ``outs`` with the batch (the arguments of :meth:`gather`, outputs made)."""


class InMemoryReader(WindowReader):
    """Loads the variables once into one contiguous ``(channel, *space)`` array."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Same arguments as :class:`WindowReader`; loads at once, before workers fork."""
        super().__init__(*args, **kwargs)
        self.block = np.empty((self.n_channels, *self.shape), dtype=self.dtype)
        try:
            decoder = XarrayDecoder(self.dataset, self.layouts, self.window_dims)
            decode_with_retries(decoder, [DecodeJob({}, self.block)], self.origin)
        except Exception as error:
            raise read_error(error, self.dataset, [{}], self.origin) from error
        self._prepare(self.block)

    def _held_blocks(self) -> list[np.ndarray]:
        return [self.block] if hasattr(self, "block") else []

    def _read(
        self,
        base: np.ndarray,
        extent: Sequence[int],
        cuts: Sequence[Cut],
        outs: list[np.ndarray],
        upcoming: np.ndarray | None,
    ) -> None:
        """One vectorised copy per cut over the whole stacked array."""
        _gather_block(self.block, base, cuts, outs)


class ChunkedReader(WindowReader):
    """Reads cells (groups of storage chunks) on demand into a small arena of cached slots.

    The cache is one preallocated array of ``cache_cells`` slots, each large enough for the
    largest cell, managed least-recently-used. A batch is gathered from the arena with one
    copy per window (input, target): every run of every sample is looked up in the slot of
    its own cell, so samples that cross cell edges cost nothing extra, except along the last
    dim when it is not spanned whole: a row that crosses a cell edge there is assembled
    sample by sample. When a batch needs more cells than the arena holds, it is read in
    waves. Memory stays bounded by the arena: ``cache_cells`` cells per process.

    Args:
        ds: The source dataset (dask-backed, lazily indexed, or numpy).
        names: Variables to read, in channel order.
        window_dims: Windowed dims.
        dtype: Output dtype.
        grid: The cells of the data (:func:`~xr_datamodule.cells.cell_grid`).
        cache_cells: Decoded cells kept per process (at least what one sample touches).
        prepare: What to do to each decoded cell (mask, normalise, fill).
        decode_threads: Threads that decode cells at once with the xarray decoder (zarr's
            and netCDF's decompressors release the GIL), and whether the next batch's cells
            are decoded in the background while a batch is copied out (more than one
            thread). Use 1 inside DataLoader workers, which already decode in parallel.
        decoder: How cells are read; default :class:`~xr_datamodule.decode.XarrayDecoder`.
        prefetch_batches: Batches whose cells may be in flight at once in the background
            (the ``upcoming`` hint then holds that many batches). One suits local stores,
            whose reads are bound by decoding; a remote store's reads wait mostly on the
            network, and several batches in flight keep enough requests going.
    """

    def __init__(
        self,
        ds: xr.Dataset,
        names: Sequence[str],
        window_dims: Sequence[str],
        dtype: np.dtype,
        grid: CellGrid,
        cache_cells: int = 8,
        prepare: Preparation = Preparation(),
        decode_threads: int = 1,
        decoder: CellDecoder | None = None,
        origin: str = "the data",
        prefetch_batches: int = 1,
    ) -> None:
        super().__init__(ds, names, window_dims, dtype, prepare, origin)
        self.decode_threads = max(1, int(decode_threads))
        self.prefetch_batches = max(1, int(prefetch_batches))
        self.decoder: CellDecoder = decoder or XarrayDecoder(
            self.dataset, self.layouts, self.window_dims, self.decode_threads
        )
        self.grid = grid
        cell_shape = grid.cell_shape
        self._memory = _Memory(
            self.shape,
            grid.edges,
            int(np.prod(cell_shape)),
            tuple(int(np.prod(cell_shape[a + 1 :])) for a in range(len(cell_shape))),
            self.n_channels * int(np.prod(cell_shape)),
        )
        self.arena = CellArena(
            grid, self.window_dims, self.n_channels, self.dtype, cache_cells, self._fill
        )
        # Background threads per process: one per batch in flight.
        self._prefetcher = thread_pool(self.prefetch_batches)
        self._pending: deque[Future] = deque()
        self._batch_rows = 1  # samples of the batch being read (the hint's batches are alike)

    def __getstate__(self) -> dict:
        self._await_prefetch()  # the arena itself pickles empty: workers start their own
        return {**super().__getstate__(), "_pending": deque()}

    @property
    def cache_cells(self) -> int:
        """Cells the arena holds."""
        return self.arena.cache_cells

    @property
    def cells_read(self) -> int:
        """Cells decoded so far in this process."""
        return self.arena.cells_read

    def resize_cache(self, cache_cells: int) -> None:
        """Keep ``cache_cells`` cells from now on; what is cached is dropped."""
        with self._gathering:
            self._await_prefetch()
            self.arena.reset(cache_cells)

    # ------------------------------------------------------------------ the arena

    def _held_blocks(self) -> list[np.ndarray]:
        return self.arena.held_blocks()

    def _slots_for(self, keys: Sequence[int], wait: bool = True) -> list[int]:
        """Arena slots of the cells ``keys`` (see :meth:`CellArena.slots_for`)."""
        return self.arena.slots_for(keys, wait)

    def _unpin(self, keys: Sequence[int]) -> None:
        self.arena.unpin(keys)

    def _fill(self, jobs: Sequence[DecodeJob]) -> None:
        """Decode cells into their slots and prepare them; a failure names its variable."""
        try:
            decode_with_retries(self.decoder, jobs, self.origin)
            for job in jobs:
                self._prepare(job.out)
        except ReadError:
            raise
        except Exception as error:
            regions = [job.region for job in jobs]
            raise read_error(error, self.dataset, regions, self.origin) from error

    # ------------------------------------------------------------------ prefetching

    def _prefetch(self, base_starts: np.ndarray) -> None:
        """Decode the cells these samples touch in the background, in order of first need.

        Only what fits in the arena beside the cells being copied from (and those fetched
        for batches still to come) is fetched; a read that needs a cell still being decoded
        waits for it. Cells already cached or on their way are not fetched again, so with a
        hint of several batches each call fetches the newest batch's cells, and up to
        ``prefetch_batches`` calls are in flight at once.
        """
        while self._pending and self._pending[0].done():
            self._pending.popleft().exception()
        if len(self._pending) >= self.prefetch_batches:
            self._pending.popleft().exception()  # see _await_prefetch
        batches = _keys_by_batch(self.grid, np.asarray(base_starts, np.int64), self._batch_rows)
        self.arena.reserve(batches)  # kept until the batch that needs them is read
        keys = list(dict.fromkeys(key for batch in batches for key in batch))[: self.cache_cells]
        known = self.arena.slots  # read without the lock: a hint, checked again under it
        if any(key not in known for key in keys):
            self._pending.append(self._prefetcher.get().submit(self._slots_for, keys, False))

    def _await_prefetch(self) -> None:
        while self._pending:
            # A failed prefetch is not an error of this batch: the read that needs those
            # cells decodes them again and raises then. exception() waits without raising;
            # re-raising here would tie this frame (and the batch buffers of its callers)
            # into a cycle with the stored exception that only the garbage collector breaks.
            self._pending.popleft().exception()

    def close(self) -> None:
        """Stop this process's prefetch and decoding threads and free the arena."""
        with self._gathering:
            self._await_prefetch()
            self._prefetcher.close()
            close_decoder(self.decoder)
            self.arena.reset()

    # ------------------------------------------------------------------ gathering

    def _read(
        self,
        base: np.ndarray,
        extent: Sequence[int],
        cuts: Sequence[Cut],
        outs: list[np.ndarray],
        upcoming: np.ndarray | None,
    ) -> None:
        """One copy per cut for the whole batch; rows crossing a last-dim edge one by one.

        With ``upcoming`` (and decode threads), the next batch's cells are decoded in the
        background from the moment this batch's cells are ready: while it is copied out of
        the arena and while it is used.
        """
        background = self.decode_threads > 1 or self.prefetch_batches > 1
        if not background or upcoming is None or not len(upcoming):
            upcoming = None
        self._batch_rows = len(base)
        split = self._split_rows(base, cuts)
        zero = np.zeros((1, len(extent)), dtype=np.int64)
        for row in np.flatnonzero(split):
            span = self._span(base[row], extent)
            parts = _empty_outputs(1, cuts, self.dtype)
            _gather_block(span, zero, cuts, parts)
            for out, part in zip(outs, parts, strict=True):
                out[row] = part[0]
        rows = np.flatnonzero(~split)
        if rows.size == len(base):
            self._gather_cells(base, cuts, outs, upcoming)
            return
        if rows.size:
            parts = _empty_outputs(rows.size, cuts, self.dtype)
            self._gather_cells(base[rows], cuts, parts, upcoming)
            for out, part in zip(outs, parts, strict=True):
                out[rows] = part
        elif upcoming is not None:
            self._prefetch(upcoming)

    def _split_rows(self, base: np.ndarray, cuts: Sequence[Cut]) -> np.ndarray:
        """Samples with a row that crosses a cell edge along the last dim."""
        split = np.zeros(len(base), dtype=bool)
        last = len(self.grid.grid_shape) - 1
        if self.grid.grid_shape[last] == 1:
            return split
        for cut in cuts:
            if _merged_axes(cut.size, self.shape):
                continue
            lo = base[:, last] + cut.offset[last]
            split |= self.grid.cell_of(lo, last) != self.grid.cell_of(lo + cut.size[last] - 1, last)
        return split

    def _gather_cells(
        self,
        base: np.ndarray,
        cuts: Sequence[Cut],
        outs: list[np.ndarray],
        upcoming: np.ndarray | None = None,
    ) -> None:
        """Gather samples whose rows each lie in one cell, in waves that fit the arena.

        Once this batch's cells are ready, the next batch's (``upcoming``) are decoded in the
        background while the runs are copied; the cells copied from are kept meanwhile.
        """
        runs = [_runs(self._memory, base, cut) for cut in cuts]
        needed = np.unique(np.concatenate([r.keys.reshape(-1) for r in runs]))
        if len(needed) > self.cache_cells:
            self._gather_in_waves(base, cuts, outs, runs)
            if upcoming is not None:
                self._prefetch(upcoming)
            return
        keys = needed.tolist()
        slots = np.asarray(self._slots_for(keys), dtype=np.int64)  # pinned: see _unpin below
        try:
            if (slots < 0).any():
                raise RuntimeError("internal error: a batch's cells did not fit in the arena")
            if upcoming is not None:
                self._prefetch(upcoming)
            block = self.arena.block
            assert block is not None
            # While the next batch decodes in the background, copy with one thread: torch's
            # second intra-op thread would spin on the core the decoder needs (global
            # store, chunks of 4 steps, no workers: 1.64 s per epoch with two, 1.33 with one).
            with _intra_op_threads(1 if self._pending else None):
                for r, out in zip(runs, outs, strict=True):
                    slot = slots[np.searchsorted(needed, r.keys)]
                    within = r.within + slot * self._memory.slot_items
                    _take_runs(block, r.width, within, out)
        finally:
            self._unpin(keys)

    def _gather_in_waves(
        self, base: np.ndarray, cuts: Sequence[Cut], outs: list[np.ndarray], runs: list[Runs]
    ) -> None:
        """Read a batch that needs more cells than the arena holds, a group of samples at once.

        Samples are grouped greedily (in order of their first cell) so that each group's
        cells fit; cells already cached go first, so they are used before being replaced.
        """
        per_sample = np.concatenate([r.keys.reshape(len(base), -1) for r in runs], axis=1)
        cells_of = [np.unique(row) for row in per_sample]
        if max(len(keys) for keys in cells_of) > self.cache_cells:
            self._gather_by_cell(base, cuts, outs, runs)
            return
        cached = np.array([all(int(k) in self.arena.slots for k in keys) for keys in cells_of])
        order = np.lexsort(([keys[0] for keys in cells_of], ~cached))
        groups: list[list[int]] = [[]]
        group_cells: set[int] = set()
        for sample in order.tolist():
            keys = set(cells_of[sample].tolist())
            if groups[-1] and len(group_cells | keys) > self.cache_cells:
                groups.append([])
                group_cells = set()
            groups[-1].append(sample)
            group_cells |= keys
        for group in groups:
            rows = np.asarray(group, dtype=np.int64)
            parts = _empty_outputs(len(rows), cuts, self.dtype)
            self._gather_cells(base[rows], cuts, parts)
            for out, part in zip(outs, parts, strict=True):
                out[rows] = part

    def _gather_by_cell(
        self, base: np.ndarray, cuts: Sequence[Cut], outs: list[np.ndarray], runs: list[Runs]
    ) -> None:
        """Read a batch whose single samples need more cells than the arena holds."""
        decode = self._fill
        if self.decode_threads > 1:  # decode straight into the batch while cells are copied
            decode = partial(self._prefetcher.get().submit, self._fill)
        direct = self.mask_of is None and self.missing_of is None  # masks: made in the arena
        by_cell = CellByCell(self.arena, self._memory.slot_items, decode, direct, self.n_channels)
        by_cell.gather(base, cuts, outs, runs)

    def _span(self, base: np.ndarray, extent: Sequence[int]) -> np.ndarray:
        """Assemble one sample's span ``(channel, *extent)`` from the cells it touches."""
        return assemble_span(self.arena, self.n_channels, self.dtype, base, extent)
