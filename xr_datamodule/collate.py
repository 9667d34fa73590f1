"""Zero-copy collate: the gathered numpy batch becomes torch tensors sharing its memory.

In a DataLoader worker the batch instead goes to the main process through the worker's
shared-memory ring (:mod:`xr_datamodule.handoff`), which costs a fraction of torch's
per-tensor shared-memory transfer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from xr_datamodule import handoff
from xr_datamodule.datasets import Batch

__all__ = ["DEFAULT_RING_SLOTS", "collate_batch"]

DEFAULT_RING_SLOTS = 4  # torch's default prefetch_factor (2) plus two


def collate_batch(batch: Batch, ring_slots: int = DEFAULT_RING_SLOTS) -> Any:
    """Turn a :class:`~xr_datamodule.datasets.Batch` into ``(X, y)`` CPU tensors.

    Use it as ``collate_fn`` of a DataLoader over an
    :class:`~xr_datamodule.datasets.XarrayWindowDataset`; device placement is left to
    Lightning (or to you). In the main process the tensors share the batch's memory (no
    copy). In a DataLoader worker it returns a :class:`~xr_datamodule.handoff.Ticket`
    for the batch, copied into the worker's shared-memory ring; the DataLoader's main
    process receives it as the same ``(X, y)`` tensors.

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
    if get_worker_info() is not None:
        ticket = handoff.send([batch.inputs, batch.targets], ring_slots)
        if ticket is not None:
            return ticket
    base = batch.inputs.base
    if base is not None and base is batch.targets.base and base.flags.c_contiguous:
        # Inputs and targets were gathered into one allocation: hand out two views of one
        # tensor, so a DataLoader worker moves a single storage to shared memory per batch.
        whole = torch.from_numpy(base).reshape(-1)
        return _view_of(whole, base, batch.inputs), _view_of(whole, base, batch.targets)
    return torch.from_numpy(batch.inputs), torch.from_numpy(batch.targets)


def _view_of(whole: torch.Tensor, base: np.ndarray, part: np.ndarray) -> torch.Tensor:
    """The slice of ``whole`` (a flat tensor over ``base``) that holds the contiguous ``part``."""
    begin = (part.ctypes.data - base.ctypes.data) // part.itemsize
    return whole[begin : begin + part.size].view(part.shape)
