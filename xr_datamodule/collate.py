"""Zero-copy collate: the gathered numpy batch becomes torch tensors sharing its memory."""

from __future__ import annotations

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
    return torch.from_numpy(batch.inputs), torch.from_numpy(batch.targets)
