"""Batched, vectorised window reads: one numpy fancy-index per batch, no loop over samples.

The variables a dataset needs are seen as one channel-major block ``(channel, *space)`` whose
last axes are the windowed dims (see :mod:`xr_datamodule.sources` for the channel rule). A
batch of windows is then a single advanced-indexing expression over a
``sliding_window_view`` of the last axis, so every window row is one contiguous copy and the
result lands in one freshly allocated ``(batch, channel, *window)`` array that the collate
hands to torch without copying.

Two readers provide the block:

* :class:`InMemoryReader` stacks numpy-backed variables once into a contiguous array of the
  output dtype (one copy of the selected variables, shared by all splits).
* :class:`LazyReader` reads, per batch, only the positions the batch's windows touch, with one
  orthogonal ``isel`` over all variables and one ``compute``; nothing is loaded whole.

Nothing here knows about torch or Lightning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import xarray as xr

from xr_datamodule.sources import VariableLayout, channel_layouts, is_in_memory

__all__ = ["InMemoryReader", "LazyReader", "WindowReader", "gather_windows", "make_reader"]


def gather_windows(
    block: np.ndarray,
    channels: np.ndarray,
    starts: np.ndarray,
    size: Sequence[int],
) -> np.ndarray:
    """Cut windows out of a channel-major block in one vectorised read.

    Args:
        block: Array ``(channel, *space)``; the last ``len(size)`` axes are windowed.
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
    ndim = len(size)
    rows = np.lib.stride_tricks.sliding_window_view(block, size[-1], axis=-1)
    # Index arrays broadcast to (batch, channel, w_0, ..., w_{n-2}); the last window axis
    # comes from the sliding view, so each row is one contiguous run of size[-1] items.
    lead = (1,) * (ndim - 1)
    index: list[np.ndarray] = [np.asarray(channels).reshape(1, -1, *lead)]
    for axis in range(ndim - 1):
        offsets_shape = [1] * (ndim + 1)
        offsets_shape[2 + axis] = size[axis]
        offsets = np.arange(size[axis]).reshape(offsets_shape)
        index.append(starts[:, axis].reshape(-1, 1, *lead) + offsets)
    index.append(starts[:, ndim - 1].reshape(-1, 1, *lead))
    return rows[tuple(index)]


class WindowReader(ABC):
    """Provides the channel-major block that windows are cut from.

    Args:
        ds: The source dataset.
        names: Variables to read, in channel order.
        window_dims: Windowed dims, in the order of the output window axes.
        dtype: Output dtype of the block.
    """

    def __init__(
        self, ds: xr.Dataset, names: Sequence[str], window_dims: Sequence[str], dtype: np.dtype
    ) -> None:
        self.dataset = ds[list(names)]
        self.window_dims = tuple(window_dims)
        self.dtype = np.dtype(dtype)
        self.layouts: list[VariableLayout] = channel_layouts(ds, names, window_dims)
        ends = np.cumsum([layout.n_channels for layout in self.layouts])
        self._channel_slices = {
            layout.name: slice(int(end - layout.n_channels), int(end))
            for layout, end in zip(self.layouts, ends, strict=True)
        }
        self.n_channels = int(ends[-1])

    def channels_of(self, names: Sequence[str]) -> np.ndarray:
        """Channel numbers of the given variables, in the order given."""
        return np.concatenate(
            [np.arange(self.n_channels)[self._channel_slices[name]] for name in names]
        )

    def _fill(self, block: np.ndarray, ds: xr.Dataset) -> None:
        """Write each variable of ``ds`` into its channels of ``block`` (casting on the way)."""
        space = block.shape[1:]
        for layout in self.layouts:
            values = ds[layout.name].transpose(*layout.extra_dims, *self.window_dims).values
            block[self._channel_slices[layout.name]] = values.reshape(-1, *space)

    @abstractmethod
    def read(self, base_starts: np.ndarray, extent: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Return a block holding every span ``[base, base + extent)`` and the bases within it.

        Args:
            base_starts: ``(batch, ndim)`` lowest position each sample touches.
            extent: Span length per windowed dim.
        """


class InMemoryReader(WindowReader):
    """Stacks numpy-backed variables once into a contiguous ``(channel, *space)`` array."""

    def __init__(
        self, ds: xr.Dataset, names: Sequence[str], window_dims: Sequence[str], dtype: np.dtype
    ) -> None:
        super().__init__(ds, names, window_dims, dtype)
        space = tuple(ds.sizes[dim] for dim in self.window_dims)
        self.block = np.empty((self.n_channels, *space), dtype=self.dtype)
        self._fill(self.block, self.dataset)

    def read(self, base_starts: np.ndarray, extent: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The whole stacked array; positions are unchanged."""
        return self.block, base_starts


class LazyReader(WindowReader):
    """Reads, per batch, only the positions the batch touches (one ``isel`` + ``compute``)."""

    def read(self, base_starts: np.ndarray, extent: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Read the union of the batch's spans along each windowed dim."""
        indexers: dict[str, slice | np.ndarray] = {}
        local = np.empty_like(base_starts)
        for axis, dim in enumerate(self.window_dims):
            touched = np.unique(base_starts[:, axis, None] + np.arange(extent[axis]))
            local[:, axis] = np.searchsorted(touched, base_starts[:, axis])
            contiguous = touched[-1] - touched[0] + 1 == touched.size
            # A slice keeps backends (zarr, netCDF) on their fast contiguous path.
            indexers[dim] = slice(int(touched[0]), int(touched[-1]) + 1) if contiguous else touched
        subset = self.dataset.isel(indexers).compute()
        space = tuple(subset.sizes[dim] for dim in self.window_dims)
        block = np.empty((self.n_channels, *space), dtype=self.dtype)
        self._fill(block, subset)
        return block, local


def make_reader(
    ds: xr.Dataset, names: Sequence[str], window_dims: Sequence[str], dtype: np.dtype
) -> WindowReader:
    """An :class:`InMemoryReader` for numpy-backed variables, a :class:`LazyReader` otherwise."""
    reader_cls = InMemoryReader if is_in_memory(ds, names) else LazyReader
    return reader_cls(ds, names, window_dims, dtype)
