"""Map-style torch dataset over the windows of one split, with a batched ``__getitems__``.

Example:
    >>> from torch.utils.data import DataLoader
    >>> from xr_datamodule import XarrayDataModule, collate_batch
    >>> dm = XarrayDataModule("synthetic://weather", input_vars=["t2m"],
    ...                       input_dims={"time": 2, "lat": 16, "lon": 16})
    >>> dm.setup("fit")
    >>> loader = DataLoader(dm.datasets["train"], batch_size=8, collate_fn=collate_batch)
    >>> X, y = next(iter(loader))
    >>> tuple(X.shape)
    (8, 1, 2, 16, 16)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from torch.utils.data import Dataset

from xr_datamodule.gather import Cut, WindowReader
from xr_datamodule.transforms import Transform, transformed_windows
from xr_datamodule.windows import SampleIndex, WindowGeometry

__all__ = ["Batch", "XarrayWindowDataset"]


class Batch(NamedTuple):
    """Gathered windows: ``inputs`` ``(batch, channel, *window)`` and ``targets`` likewise.

    :func:`~xr_datamodule.collate.collate_batch` turns it into tensors without copying.
    """

    inputs: np.ndarray
    targets: np.ndarray


class XarrayWindowDataset(Dataset):
    """The samples of one split: input and target windows cut from a :class:`WindowReader`.

    ``__getitems__`` (called once per batch by torch's DataLoader) reads the whole batch with
    one vectorised gather per side; ``__getitem__`` is the same for a single sample. Build the
    DataLoader with ``collate_fn=collate_batch``; :class:`~xr_datamodule.XarrayDataModule`
    does this for you.

    Args:
        reader: Provides the data of every variable named below.
        index: Window starts of the split.
        geometry: Window sizes and target offsets.
        input_vars: Variables of ``X``, in channel order.
        target_vars: Variables of ``y``, in channel order.
        transform: Optional function on each input window (an ``xr.Dataset``); see
            :mod:`xr_datamodule.transforms` for its cost.
        target_transform: Likewise for the target window.
    """

    def __init__(
        self,
        reader: WindowReader,
        index: SampleIndex,
        geometry: WindowGeometry,
        input_vars: Sequence[str],
        target_vars: Sequence[str],
        transform: Transform | None = None,
        target_transform: Transform | None = None,
    ) -> None:
        self.reader = reader
        self.index = index
        self.geometry = geometry
        self.input_vars = list(input_vars)
        self.target_vars = list(target_vars)
        self.input_channels = reader.channels_of(self.input_vars)
        self.target_channels = reader.channels_of(self.target_vars)
        self.transform = transform
        self.target_transform = target_transform
        self._reach_below = np.asarray(geometry.reach_below, dtype=np.int64)
        self._target_offset = np.asarray(geometry.target_offset, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitems__(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """Read a whole batch of samples at once."""
        starts = self.index.starts(indices)
        geometry = self.geometry
        cuts = []
        if self.transform is None:
            cuts.append(Cut(self.input_channels, geometry.reach_below, geometry.input_size))
        if self.target_transform is None:
            target_at = tuple(np.add(geometry.reach_below, geometry.target_offset).tolist())
            cuts.append(Cut(self.target_channels, target_at, geometry.target_size))
        gathered = iter(
            self.reader.gather(starts - self._reach_below, geometry.extent, cuts) if cuts else []
        )
        if self.transform is None:
            inputs = next(gathered)
        else:
            inputs = self._transformed(starts, self.input_vars, geometry.input_size, self.transform)
        if self.target_transform is None:
            targets = next(gathered)
        else:
            targets = self._transformed(
                starts + self._target_offset,
                self.target_vars,
                geometry.target_size,
                self.target_transform,
            )
        return Batch(inputs, targets)

    def __getitem__(self, index: int | np.ndarray) -> Batch:
        """One sample, without the batch axis; an index array reads a whole batch.

        The array form serves DataLoaders whose sampler yields whole batches
        (``batch_size=None``), as the datamodule's training loader does.
        """
        if isinstance(index, np.ndarray) and index.ndim == 1:
            return self.__getitems__(index)
        batch = self.__getitems__([int(index)])
        return Batch(batch.inputs[0], batch.targets[0])

    def _transformed(
        self, starts: np.ndarray, names: list[str], size: Sequence[int], transform: Transform
    ) -> np.ndarray:
        return transformed_windows(
            self.reader.dataset[names],
            starts,
            self.geometry.dims,
            size,
            transform,
            self.reader.dtype,
        )
