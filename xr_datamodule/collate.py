"""Zero-copy collate: the gathered numpy batch becomes torch tensors sharing its memory."""

from __future__ import annotations

import numpy as np
import torch

from xr_datamodule.datasets import Batch

__all__ = ["collate_batch"]


def collate_batch(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a :class:`~xr_datamodule.datasets.Batch` into ``(X, y)`` CPU tensors without copying.

    Use it as ``collate_fn`` of a DataLoader over an
    :class:`~xr_datamodule.datasets.XarrayWindowDataset`; device placement is left to
    Lightning (or to you).

    Example:
        >>> import numpy as np
        >>> X, y = collate_batch(Batch(np.zeros((2, 1, 3), np.float32), np.ones((2, 1, 1))))
        >>> tuple(X.shape), X.dtype
        ((2, 1, 3), torch.float32)
    """
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
