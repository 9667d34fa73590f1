"""Zero-copy collate: the gathered numpy batch becomes torch tensors sharing its memory.

In a DataLoader worker the batch instead goes to the main process as a ticket for the slot
of the worker's shared-memory ring it was gathered into (:mod:`xr_datamodule.handoff`),
which costs a fraction of torch's per-tensor shared-memory transfer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import get_worker_info

from xr_datamodule import handoff
from xr_datamodule.datasets import Batch
from xr_datamodule.handoff import DEFAULT_RING_SLOTS

__all__ = ["DEFAULT_RING_SLOTS", "collate_batch"]


class _WithMeta:
    """A worker's ticket and the batch's (small) metadata, unpickled as one dict."""

    def __init__(self, ticket: handoff.Ticket, meta: dict[str, Any], names: list[str]) -> None:
        self.ticket, self.meta, self.names = ticket, meta, names

    def __reduce__(self) -> tuple[Any, tuple]:
        return _as_dict, (self.ticket, self.meta, self.names)


def _as_dict(
    tensors: tuple[torch.Tensor, ...], meta: dict[str, Any], names: list[str]
) -> dict[str, torch.Tensor]:
    """``x``, ``y``, ``target_mask``, the other grids' inputs (``names``) and the metadata."""
    out = dict(zip(names, tensors, strict=True))
    return {**out, **{k: torch.from_numpy(v) for k, v in meta.items()}}


def collate_batch(batch: Batch, ring_slots: int = DEFAULT_RING_SLOTS) -> Any:
    """Turn a :class:`~xr_datamodule.datasets.Batch` into ``(X, y)`` CPU tensors.

    A batch with metadata (``batch_format="dict"``) becomes a dict: ``x``, ``y``,
    ``target_mask`` (bool like ``y``, False where a target value was missing) and the
    metadata (``sample``, ``input_<dim>``, ``target_<dim>``) as tensors; inputs on other
    grids than ``x``'s under their own keys (``x_<family>``, see :mod:`~xr_datamodule.grids`).

    Use it as ``collate_fn`` of a DataLoader over an
    :class:`~xr_datamodule.datasets.XarrayWindowDataset`; device placement is left to
    Lightning (or to you). In the main process the tensors share the batch's memory (no
    copy). In a DataLoader worker it returns a :class:`~xr_datamodule.handoff.Ticket`
    for the batch, which lies in (or is copied into) the worker's shared-memory ring; the
    DataLoader's main process receives it as the same ``(X, y)`` tensors.

    Args:
        batch: The gathered batch.
        ring_slots: Slots of a worker's ring; at least the DataLoader's ``prefetch_factor``
            plus two (with fewer, some batches take torch's slower path).

    Example:
        >>> import numpy as np
        >>> X, y = collate_batch(Batch(np.zeros((2, 1, 3), np.float32), np.ones((2, 1, 1))))
        >>> tuple(X.shape), X.dtype
        ((2, 1, 3), torch.float32)
    """
    arrays, names = [batch.inputs, batch.targets], ["x", "y"]
    if batch.meta is not None and batch.target_mask is not None:
        arrays.append(batch.target_mask)
        names.append("target_mask")
    if batch.meta is not None and batch.grids:
        arrays += batch.grids.values()
        names += batch.grids
    if get_worker_info() is not None:
        ticket = handoff.send(arrays, ring_slots)
        if ticket is not None:
            return ticket if batch.meta is None else _WithMeta(ticket, batch.meta, names)
    tensors = tuple(torch.from_numpy(array) for array in arrays)
    return tensors if batch.meta is None else _as_dict(tensors, batch.meta, names)
