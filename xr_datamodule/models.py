"""A small demo LightningModule whose channel counts come from the datamodule.

Example:
    >>> model = DemoForecaster(input_shape=(3, 2, 32, 32), target_shape=(1, 1, 32, 32))
    >>> import torch
    >>> tuple(model(torch.zeros(4, 3, 2, 32, 32)).shape)
    (4, 1, 1, 32, 32)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import nn

from xr_datamodule.losses import masked_mse

__all__ = ["DemoForecaster"]

# ``(X, y)``, or with ``batch_format="dict"`` a dict with ``"x"`` and ``"y"`` (and metadata).
Batch = tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]


class DemoForecaster(pl.LightningModule):
    """A few 2-D convolutions from ``X`` to ``y``, trained with mean squared error.

    The loss leaves out missing targets (:func:`~xr_datamodule.losses.masked_mse`): NaN in
    ``y``, or where a dict batch's ``target_mask`` is False (values filled under
    ``nan_policy="fill"``).

    Window axes other than the last two (e.g. ``time``) are folded into channels, so any
    ``(channel, ..., height, width)`` sample works; where the target lies on another grid
    (downscaling), the inputs are first repeated onto it (nearest neighbour). Batches may be
    ``(X, y)`` or dicts (``batch_format="dict"``). In LightningCLI the shapes are linked from
    the datamodule's ``input_shape`` and ``target_shape`` (see :mod:`xr_datamodule.cli`).

    Args:
        input_shape: Shape of one input sample, ``(channel, *window)``.
        target_shape: Shape of one target sample.
        hidden_channels: Width of the hidden convolutions.
        lr: Adam learning rate.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        target_shape: Sequence[int],
        hidden_channels: int = 32,
        lr: float = 2e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.input_shape = tuple(int(n) for n in input_shape)
        self.target_shape = tuple(int(n) for n in target_shape)
        if len(self.input_shape) < 3 or len(self.target_shape) < 3:
            raise ValueError(
                "DemoForecaster needs input and target windows that end in two spatial axes, "
                f"got input {self.input_shape} and target {self.target_shape}"
            )
        in_channels = math.prod(self.input_shape[:-2])
        out_channels = math.prod(self.target_shape[:-2])
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden_channels, out_channels, 1),
        )
        self.lr = lr

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Map ``(batch, *input_shape)`` to ``(batch, *target_shape)``."""
        planes = inputs.flatten(1, -3)
        if planes.shape[-2:] != self.target_shape[-2:]:  # another grid: work on the target's
            planes = nn.functional.interpolate(planes, size=self.target_shape[-2:], mode="nearest")
        hidden = self.net(planes)
        return hidden.reshape(inputs.shape[0], *self.target_shape)

    def _loss(self, batch: Batch, name: str) -> torch.Tensor:
        inputs, targets = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
        mask = batch.get("target_mask") if isinstance(batch, dict) else None
        loss = masked_mse(self(inputs), targets, mask)
        self.log(name, loss, prog_bar=True, batch_size=inputs.shape[0])
        return loss

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """Mean squared error of one training batch, logged as ``train_loss``."""
        return self._loss(batch, "train_loss")

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Log ``val_loss``."""
        self._loss(batch, "val_loss")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """Log ``test_loss``."""
        self._loss(batch, "test_loss")

    def predict_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """The prediction for the batch's inputs, shaped like its targets."""
        return self(batch["x"] if isinstance(batch, dict) else batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam with the configured learning rate."""
        return torch.optim.Adam(self.parameters(), lr=self.lr)
