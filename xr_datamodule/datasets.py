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

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from xr_datamodule import handoff
from xr_datamodule.ahead import BatchAhead
from xr_datamodule.coordinates import CoordinateField
from xr_datamodule.extras import ExtraChannels
from xr_datamodule.familyread import GridRead
from xr_datamodule.gather import Cut, WindowReader
from xr_datamodule.missing import (
    MISSING_ADVICE,
    MissingValueError,
    StaticMask,
    describe_missing,
    first_nan,
    holds_nan,
)
from xr_datamodule.samplers import BatchPlan, RandomOffsets, ShardedBatchSampler
from xr_datamodule.sources import label_at
from xr_datamodule.transforms import (
    Transform,
    batch_dataset,
    batch_to_channels,
    transformed_windows,
)
from xr_datamodule.windows import SampleIndex, WindowGeometry

__all__ = ["Batch", "XarrayIterableDataset", "XarrayWindowDataset"]


class Batch(NamedTuple):
    """Gathered windows: ``inputs`` ``(batch, channel, *window)`` and ``targets`` likewise.

    With metadata (dict batches), ``target_mask`` says where each target value was present
    (False where it was missing, so filled or NaN).

    :func:`~xr_datamodule.collate.collate_batch` turns it into tensors without copying.
    """

    inputs: np.ndarray
    targets: np.ndarray
    meta: dict[str, np.ndarray] | None = None
    target_mask: np.ndarray | None = None  # bool like targets: True where the value was there
    grids: dict[str, np.ndarray] | None = None  # inputs on other grids, by name (dict batches)


def _with_room(channels: np.ndarray, extras: int, masked: bool) -> np.ndarray:
    """A cut's channels with a stand-in for each extra channel, before the mask if any.

    The stand-in (the cut's first channel) is read like any other and then overwritten by
    :func:`_fill_extras`: gathering the batch straight into its final layout costs those
    channels' copy instead of a second copy of the whole batch.
    """
    if not extras:
        return channels
    channels = np.asarray(channels, dtype=np.int64)
    data = len(channels) - masked
    stand_in = np.full(extras, channels[0], dtype=np.int64)  # setup refuses no channels
    return np.concatenate([channels[:data], stand_in, channels[data:]])


def _fill_extras(
    out: np.ndarray, extras: ExtraChannels, starts: np.ndarray, masked: bool, after: int = 0
) -> None:
    """Write the extra channels into their place in ``out`` (before ``after`` more, the mask)."""
    end = out.shape[1] - masked - after
    extras.fill(out[:, end - extras.n_channels : end], starts)


def _outputs(
    shapes: Sequence[tuple[int, ...]],
    dtype: np.dtype,
    ring_slots: int,
    mask_shape: tuple[int, ...] | None = None,
) -> list[np.ndarray]:
    """One buffer for all of a batch's windows (see :func:`~xr_datamodule.handoff.allocate`).

    With ``mask_shape``, a last bool array of that shape (the target mask) too.
    """
    dtypes = [dtype] * len(shapes)
    shapes = list(shapes)
    if mask_shape is not None:
        shapes.append(mask_shape)
        dtypes.append(np.dtype(bool))
    sizes = [
        int(np.prod(shape)) * kind.itemsize for shape, kind in zip(shapes, dtypes, strict=True)
    ]
    offsets = np.cumsum([0] + [handoff.aligned(size) for size in sizes])
    buffer = handoff.allocate(int(offsets[-1]), ring_slots)
    return [
        buffer[offset : offset + size].view(kind).reshape(shape)
        for offset, size, shape, kind in zip(offsets, sizes, shapes, dtypes, strict=False)
    ]


def _broadcast(
    reads: Sequence[GridRead], inputs: np.ndarray, starts: np.ndarray, masked: bool
) -> None:
    """Read the series that ``X`` holds as channels and repeat them over the window."""
    first = inputs.shape[1] - masked - sum(read.n_channels for read in reads)
    for read in reads:
        values = np.empty(read.shape(len(starts)), dtype=inputs.dtype)
        read.read(starts, None, values)
        read.broadcast(values, inputs[:, first : first + read.n_channels])
        first += read.n_channels


def _meta(
    ids: np.ndarray,
    starts: np.ndarray,
    labels: dict[str, np.ndarray],
    geometry: WindowGeometry,
    grid_reads: Sequence[GridRead],
) -> dict[str, np.ndarray]:
    """Sample numbers and the labels of every window position, per windowed dim.

    Also along the other grids' own dims (``grid_reads``).
    """
    meta = {"sample": ids.astype(np.int64)}
    for axis, dim in enumerate(geometry.dims):
        for side, offset, size in (
            ("input", 0, geometry.input_size[axis]),
            ("target", geometry.target_offset[axis], geometry.target_size[axis]),
        ):
            positions = starts[:, axis, None] + offset + np.arange(size)
            meta[f"{side}_{dim}"] = labels[dim][positions]
    for read in grid_reads:
        meta.update(read.meta(starts))
    return meta


def _area_weight(
    weights: CoordinateField,
    starts: np.ndarray,
    geometry: WindowGeometry,
    dtype: np.dtype,
) -> np.ndarray:
    """Each sample's area weights over its target window, shaped to broadcast against y."""
    values = weights.windows(starts, geometry.target_size, geometry.target_offset)
    return values.astype(dtype)[:, None]


def _transformed(
    reader: WindowReader,
    dims: Sequence[str],
    starts: np.ndarray,
    names: list[str],
    size: Sequence[int],
    transform: Transform,
    gathered: np.ndarray | None,
) -> np.ndarray:
    """The transform's channels: per window, or once on the gathered batch."""
    source, dtype = reader.dataset, reader.dtype
    if gathered is None:
        # The windows are read for the transform, not by the reader: look at its output.
        out = transformed_windows(source[names], starts, dims, size, transform, dtype)
        if reader.find_nan and holds_nan(out):
            first = first_nan(out)
            raise MissingValueError(
                f"the transform's output for the window of {names} starting at "
                f"{label_at(source, dims, starts[first[0]])} has a "
                f"{describe_missing(out[tuple(first)])}; {MISSING_ADVICE}"
            )
        return out
    batch = batch_dataset(source, names, dims, starts, gathered)
    return batch_to_channels(transform(batch), dims, size, dtype)


class XarrayWindowDataset(Dataset):
    """The samples of one split: input and target windows cut from a :class:`WindowReader`.

    ``__getitems__`` (called once per batch by torch's DataLoader) reads the whole batch with
    one vectorised gather per side, into memory from :func:`~xr_datamodule.handoff.allocate`
    (a reused buffer, or in a DataLoader worker a slot of its shared-memory ring);
    ``__getitem__`` is the same for a single sample, and takes a
    :class:`~xr_datamodule.samplers.BatchPlan` too (then the reader decodes the next batch's
    chunks ahead). Build the DataLoader with ``collate_fn=collate_batch``;
    :class:`~xr_datamodule.XarrayDataModule` does this for you.

    Args:
        reader: Provides the data of every variable named below.
        index: Window starts of the split.
        geometry: Window sizes and target offsets.
        input_vars: Variables of ``X``, in channel order.
        target_vars: Variables of ``y``, in channel order.
        transform: Optional function on each input window (an ``xr.Dataset``); see
            :mod:`xr_datamodule.transforms` for its cost.
        target_transform: Likewise for the target window.
        ring_slots: Slots of a DataLoader worker's shared-memory ring (its prefetch depth
            plus two).
        transform_on: ``"sample"``: the transforms run on each window; ``"batch"``: once on
            the batch's windows, gathered the vectorised way (see
            :mod:`xr_datamodule.transforms`).
        input_extras: Static fields and forcings appended to ``X``'s channels (before the
            missing-value mask), see :mod:`xr_datamodule.extras`.
        target_extras: Static fields appended to ``y``'s channels.
        labels: With them, each batch carries its metadata (``Batch.meta``): the sample
            numbers and, per windowed dim, the labels of every input and target window
            position (``input_<dim>``, ``target_<dim>``), from these label arrays (times as
            int64 nanoseconds), and a ``target_mask`` (see :class:`Batch`).
        offsets: Random window offsets of the training split, if any.
        targets_may_hold_nan: Whether NaN can reach the targets (``nan_policy="keep"``):
            the target mask then looks for them; otherwise it is all True unless the reader
            keeps the targets' missing-value masks (``nan_policy="fill"``).
        valid: Where targets count at all (the ``mask`` option), or None.
        latitude_weights: With ``labels``: each grid point's area weight
            (:func:`~xr_datamodule.coordinates.weight_field`), for each sample's
            ``target_area_weight`` (its target window's, shaped to broadcast against ``y``).
        grids: Windows of other grids' variables (:mod:`~xr_datamodule.familyread`): the
            targets (key ``"y"``), inputs of their own (``"x_<family>"``), or series
            broadcast into ``X``'s channels after the extra ones.
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
        ring_slots: int = handoff.DEFAULT_RING_SLOTS,
        transform_on: str = "sample",
        input_extras: ExtraChannels | None = None,
        target_extras: ExtraChannels | None = None,
        labels: dict[str, np.ndarray] | None = None,
        offsets: RandomOffsets | None = None,
        targets_may_hold_nan: bool = True,
        valid: StaticMask | None = None,
        grids: Sequence[GridRead] = (),
        latitude_weights: CoordinateField | None = None,
    ) -> None:
        self.reader = reader
        # Reads each next batch whole in the background (big samples without workers, see
        # xr_datamodule.ahead); None: the reader decodes the next batch's cells ahead.
        self.ahead = BatchAhead(self._read_batch) if reader.whole_batches else None
        self.latitude_weights = latitude_weights
        self.targets_may_hold_nan = targets_may_hold_nan
        self.valid = valid
        self.offsets = offsets
        self.index = index
        self.geometry = geometry
        self.input_vars = list(input_vars)
        self.target_vars = list(target_vars)
        self.input_channels = reader.channels_of(self.input_vars)
        if reader.mask_channel is not None:  # the missing-value mask is the last input channel
            self.input_channels = np.append(self.input_channels, reader.mask_channel)
        self.target_channels = (
            reader.channels_of(self.target_vars) if self.target_vars else np.zeros(0, np.int64)
        )
        self.grid_targets = next((g for g in grids if g.key == "y"), None)
        self.grid_inputs = [g for g in grids if g.key != "y" and g.into is None]
        self.broadcasts = [g for g in grids if g.into is not None]
        self._n_broadcast = sum(g.n_channels for g in self.broadcasts)
        self.transform = transform
        self.target_transform = target_transform
        self.ring_slots = int(ring_slots)
        self.transform_on = transform_on
        self.input_extras = input_extras if input_extras and input_extras.n_channels else None
        self.target_extras = target_extras if target_extras and target_extras.n_channels else None
        self.labels = labels
        self._raw_inputs = reader.channels_of(self.input_vars)
        self._reach_below = np.asarray(geometry.reach_below, dtype=np.int64)
        self._target_offset = np.asarray(geometry.target_offset, dtype=np.int64)
        # Where the target window lies in a sample's span.
        self._target_at = tuple(np.add(geometry.reach_below, geometry.target_offset).tolist())

    def __len__(self) -> int:
        return len(self.index)

    def __getitems__(
        self,
        indices: Sequence[int] | np.ndarray,
        upcoming: np.ndarray | None = None,
        epoch: int | None = None,
        seed: int | None = None,
    ) -> Batch:
        """Read a whole batch of samples at once.

        Args:
            indices: Sample numbers.
            upcoming: Sample numbers of the batch read next, if known: its chunks are then
                decoded in the background (out of core, without DataLoader workers), or
                the whole batch is (with :attr:`ahead`, big samples).
            epoch: The data epoch (with random offsets, where the windows start).
            seed: The training order's seed (with random offsets).
        """
        if self.ahead is not None:
            return self.ahead.read(indices, upcoming, epoch, seed)
        return self._read_batch(indices, epoch, seed, upcoming)

    def _read_batch(
        self,
        indices: Sequence[int] | np.ndarray,
        epoch: int | None = None,
        seed: int | None = None,
        upcoming: np.ndarray | None = None,
    ) -> Batch:
        """:meth:`__getitems__` without a batch read ahead."""
        starts = self._starts(indices, epoch, seed)
        ahead = (
            None if upcoming is None else self._starts(upcoming, epoch, seed) - self._reach_below
        )
        geometry = self.geometry
        batched = self.transform_on == "batch"
        # Extra channels are gathered in place: the cut reads a stand-in channel where they
        # go, which they then overwrite (no second copy of the batch). A transform cannot be
        # combined with them (the spec refuses it), so the reader's cut is the output.
        masked = self.reader.mask_channel is not None
        n_extra = (self.input_extras.n_channels if self.input_extras else 0) + self._n_broadcast
        target_here = self.grid_targets is None
        cuts = []
        if self.transform is None or batched:  # the raw input variables, for the transform
            channels = self.input_channels if self.transform is None else self._raw_inputs
            channels = _with_room(channels, n_extra, masked)
            cuts.append(Cut(channels, geometry.reach_below, geometry.input_size))
        if target_here and (self.target_transform is None or batched):
            target_extras = self.target_extras.n_channels if self.target_extras else 0
            channels = _with_room(self.target_channels, target_extras, False)
            cuts.append(Cut(channels, self._target_at, geometry.target_size))
        batch = len(starts)
        shapes = [(batch, len(cut.channels), *cut.size) for cut in cuts]
        own = [self.grid_targets] if self.grid_targets else []
        own += self.grid_inputs
        shapes += [read.shape(batch) for read in own]
        with_mask = self.labels is not None
        target_shape = (
            (batch, self.n_target_channels, *geometry.target_size)
            if target_here
            else self.grid_targets.shape(batch)  # type: ignore[union-attr]
        )
        outs = _outputs(
            shapes, self.reader.dtype, self.ring_slots, target_shape if with_mask else None
        )
        target_mask = outs.pop() if with_mask else None
        own_outs = outs[len(cuts) :]
        del outs[len(cuts) :]
        gathered = iter(
            self.reader.gather(
                starts - self._reach_below, geometry.extent, cuts, outs, upcoming=ahead
            )
            if cuts
            else []
        )
        inputs = next(gathered) if self.transform is None or batched else None
        targets = None
        if target_here and (self.target_transform is None or batched):
            targets = next(gathered)
        for read, out in zip(own, own_outs, strict=True):
            read.read(starts, None if upcoming is None else ahead + self._reach_below, out)
        if not target_here:
            targets = own_outs[0]
        if self.transform is not None:
            inputs = _transformed(
                self.reader,
                self.geometry.dims,
                starts,
                self.input_vars,
                geometry.input_size,
                self.transform,
                inputs,
            )
        if self.target_transform is not None:
            targets = _transformed(
                self.reader,
                self.geometry.dims,
                starts + self._target_offset,
                self.target_vars,
                geometry.target_size,
                self.target_transform,
                targets,
            )
        assert inputs is not None and targets is not None
        if self.input_extras is not None:
            _fill_extras(inputs, self.input_extras, starts, masked, self._n_broadcast)
        _broadcast(self.broadcasts, inputs, starts, masked)
        if self.target_extras is not None:
            _fill_extras(targets, self.target_extras, starts + self._target_offset, False)
        meta = None
        if self.labels is not None:
            own = ([self.grid_targets] if self.grid_targets else []) + self.grid_inputs
            meta = _meta(np.asarray(indices), starts, self.labels, geometry, own)
            if self.latitude_weights is not None and self.grid_targets is None:
                meta["target_area_weight"] = _area_weight(
                    self.latitude_weights, starts, geometry, self.reader.dtype
                )
        if target_mask is not None:
            self._mark_present(target_mask, targets, starts)
            if self.valid is not None:
                target_mask &= self.valid.window(starts + self._target_offset, geometry.target_size)
        named = {read.key: out for read, out in zip(own, own_outs, strict=True) if read.key != "y"}
        return Batch(inputs, targets, meta, target_mask, named or None)

    def _mark_present(
        self,
        mask: np.ndarray,
        targets: np.ndarray,
        starts: np.ndarray,
    ) -> None:
        """Fill ``mask`` (bool like ``targets``): True where a target value was present.

        Under ``nan_policy="fill"`` the reader keeps the read target channels' masks from
        before filling; they are cut only once the reader has seen a missing value (until
        then every value is present). Under ``"keep"`` NaN in ``targets`` marks what is
        missing. Under the other policies no NaN reaches a target: all True (likewise under
        ``"fill"`` with a target transform, whose output is not the read channels). Extra
        channels after the read ones (static fields) count as present.
        """
        reader, geometry = self.reader, self.geometry
        missing = reader.missing_channels(self.target_channels)
        if self.grid_targets is not None:
            missing = None  # read by the family's reader, which keeps no masks
        if self.target_transform is None and missing is not None:
            if not reader.missing_seen:
                mask[...] = True
                return
            # Checked after this batch's read: a cell it decoded may have been the first.
            cut = Cut(missing, self._target_at, geometry.target_size)
            (kept,) = reader.gather(starts - self._reach_below, geometry.extent, [cut])
            np.equal(kept, 0, out=mask[:, : kept.shape[1]])
            mask[:, kept.shape[1] :] = True
        elif self.targets_may_hold_nan:
            np.isnan(targets, out=mask)
            np.logical_not(mask, out=mask)
        else:
            mask[...] = True

    def _starts(
        self, ids: Sequence[int] | np.ndarray, epoch: int | None, seed: int | None = None
    ) -> np.ndarray:
        """Input-window starts of samples ``ids``: on the grid, or moved by random offsets."""
        starts = self.index.starts(ids)
        if self.offsets is None:
            return starts
        return self.offsets.apply(starts, np.asarray(ids, dtype=np.int64), epoch or 0, seed)

    @property
    def n_target_channels(self) -> int:
        """Channels of ``y`` (a target transform's own, found on first use)."""
        if self.grid_targets is not None:
            return self.grid_targets.n_channels
        if self.target_transform is None:
            extras = 0 if self.target_extras is None else self.target_extras.n_channels
            return len(self.target_channels) + extras
        if not hasattr(self, "_n_transformed_targets"):
            dims, size = self.geometry.dims, self.geometry.target_size
            at = self.index.starts([0]) + self._target_offset
            args = (self.reader, dims, at, self.target_vars, size, self.target_transform, None)
            self._n_transformed_targets = int(_transformed(*args).shape[1])
        return self._n_transformed_targets

    def __getitem__(self, index: int | np.ndarray | BatchPlan) -> Batch:
        """One sample, without the batch axis; an index array or a plan reads a whole batch.

        The array and plan forms serve DataLoaders whose sampler yields whole batches
        (``batch_size=None``), as the datamodule's training loader does. With a plan, the
        reader is told the next batch once this one is read.
        """
        if isinstance(index, BatchPlan):
            return self.__getitems__(index.ids, index.upcoming, index.epoch, index.seed)
        if isinstance(index, np.ndarray) and index.ndim == 1:
            return self.__getitems__(index)
        batch = self.__getitems__([int(index)])
        meta = None if batch.meta is None else {k: v[0] for k, v in batch.meta.items()}
        mask = None if batch.target_mask is None else batch.target_mask[0]
        return Batch(batch.inputs[0], batch.targets[0], meta, mask)


class XarrayIterableDataset(IterableDataset):
    """Iterable style: streams whole batches, sharded across DDP ranks and DataLoader workers.

    Each epoch, ``batches`` gives this rank's batches (a contiguous block of the epoch's
    order, the same number on every rank; see
    :class:`~xr_datamodule.samplers.ShardedBatchSampler`), and DataLoader worker ``w`` of
    ``n`` reads batches ``w, w + n, ...``. The DataLoader takes one batch from each worker in
    turn, so the batches arrive in the same order as with the map style and with any number
    of workers: no duplicates, no gaps. Use it with ``batch_size=None``.

    The epoch must be set in the main process before each pass (:meth:`set_epoch`; the
    datamodule's loader does it), and workers must not be persistent, so that each pass
    starts workers that see the new epoch.

    Args:
        dataset: The map-style dataset that reads batches.
        batches: This rank's batch sampler.

    Example:
        >>> from xr_datamodule import XarrayDataModule
        >>> dm = XarrayDataModule("synthetic://weather", input_vars=["t2m"], batch_size=8,
        ...                       input_dims={"time": 1, "lat": 32, "lon": 32}, style="iterable")
        >>> X, y = next(iter(dm.train_dataloader()))
        >>> tuple(X.shape)
        (8, 1, 1, 32, 32)
    """

    def __init__(self, dataset: XarrayWindowDataset, batches: ShardedBatchSampler) -> None:
        self.dataset = dataset
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next pass streams."""
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for number, batch in enumerate(self.batches):
            if number % workers == worker:
                yield self.dataset[batch]
