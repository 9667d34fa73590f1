"""Losses that respect missing targets and the sphere.

Example:
    >>> import torch
    >>> y = torch.tensor([[1.0, float("nan"), 3.0]])
    >>> prediction = torch.tensor([[2.0, 100.0, 3.0]])
    >>> float(masked_mse(prediction, y))  # the NaN target is left out: (1 + 0) / 2
    0.5
    >>> filled = torch.nan_to_num(y)  # nan_policy="fill" wrote 0 where y was missing
    >>> present = torch.tensor([[True, False, True]])  # the dict batch's target_mask
    >>> float(masked_mse(prediction, filled, present))
    0.5
"""

from __future__ import annotations

import torch

__all__ = ["masked_mse"]


def masked_mse(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error over the target values present, optionally weighted.

    Args:
        prediction: The model's output, shaped like ``target``.
        target: The targets; NaN values count as missing.
        mask: Optional bool tensor broadcastable to ``target``, True where the target is
            present (a dict batch's ``target_mask``); combined with the NaN test.
        weights: Optional weights broadcastable to ``target``, e.g. ``dm.area_weights``
            (cos latitude over its mean) for a latitude-weighted loss.

    Returns:
        ``sum(w * (prediction - target)^2) / sum(w)`` over the present values (0 when none
        is present). Missing targets give no gradient.
    """
    present = ~torch.isnan(target)
    if mask is not None:
        present = present & mask.bool()
    error = torch.where(present, prediction - torch.nan_to_num(target), 0.0)
    weight = present.type_as(prediction)
    if weights is not None:
        weight = weight * weights.type_as(prediction)
    return (error**2 * weight).sum() / weight.sum().clamp_min(torch.finfo(weight.dtype).tiny)
