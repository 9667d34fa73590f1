"""Callbacks that leave the user something: a report against baselines, predictions on the grid.

Both can be listed in any config's ``trainer.callbacks``::

    trainer:
      callbacks:
        - class_path: xr_datamodule.callbacks.BaselineReport
        - class_path: xr_datamodule.callbacks.GridPredictionWriter
          init_args: {output: lightning_logs/predictions.nc, plot: lightning_logs/prediction.png}

The baselines are the trivial forecasts a model has to beat, scored with the mean squared
error in the units the model sees (normalised, if the datamodule normalises):

- **climatology**: the mean of each target channel over the training split, everywhere;
- **persistence**: the last input time step of each target variable, repeated over the
  target window (when every target variable is an input, time is windowed, there is no
  transform, and the target window covers the input window's other dims).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_only

from xr_datamodule.datamodule import XarrayDataModule
from xr_datamodule.loaders import eval_loader
from xr_datamodule.sources import channel_layouts

__all__ = ["BaselineReport", "DataSummary", "GridPredictionWriter", "baseline_losses"]


def _datamodule(trainer: pl.Trainer, who: str) -> XarrayDataModule:
    datamodule = getattr(trainer, "datamodule", None)
    if not isinstance(datamodule, XarrayDataModule):
        raise TypeError(
            f"{who} needs the trainer's datamodule to be an XarrayDataModule, got "
            f"{type(datamodule).__name__}"
        )
    return datamodule


def _channel_ranges(dm: XarrayDataModule, names: Sequence[str]) -> dict[str, range]:
    layouts = channel_layouts(dm.source, list(names), dm.window_dims)
    ranges, start = {}, 0
    for name, layout in zip(names, layouts, strict=True):
        ranges[name] = range(start, start + layout.n_channels)
        start += layout.n_channels
    return ranges


def _persistence_channels(dm: XarrayDataModule) -> list[int] | None:
    """Input channel of every target channel, or None where persistence does not apply."""
    spec, geometry = dm.spec, dm.geometry
    if spec.transform or spec.target_transform or "time" not in geometry.dims:
        return None
    if any(name not in dm.input_vars for name in dm.target_vars):
        return None
    for axis, dim in enumerate(geometry.dims):
        same = geometry.input_size[axis] == geometry.target_size[axis]
        if dim != "time" and not (same and geometry.target_offset[axis] == 0):
            return None
    inputs = _channel_ranges(dm, dm.input_vars)
    return [channel for name in dm.target_vars for channel in inputs[name]]


def _on_device(dm: XarrayDataModule, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    moved = dm.on_after_batch_transfer(batch if isinstance(batch, dict) else tuple(batch), 0)
    inputs, targets = (moved["x"], moved["y"]) if isinstance(moved, dict) else moved
    return inputs.double(), targets.double()


def baseline_losses(dm: XarrayDataModule, split: str = "val") -> dict[str, float]:
    """Mean squared error of the climatology and persistence forecasts on ``split``.

    Reads the training split once (for the climatology) and ``split`` once.

    Example:
        >>> dm = XarrayDataModule("synthetic://weather", input_vars=["t2m"],
        ...                       input_dims={"time": 2, "lat": 32, "lon": 32},
        ...                       target_dims={"time": 1, "lat": 32, "lon": 32},
        ...                       target_offset={"time": 2})
        >>> losses = baseline_losses(dm, "val")
        >>> sorted(losses), losses["persistence"] < losses["climatology"]
        (['climatology', 'persistence'], True)
    """
    pipeline = dm.pipeline
    if "train" not in pipeline.indices or pipeline.split_for(split) not in pipeline.indices:
        raise ValueError(
            f"baselines need a 'train' split and a {split!r} split; splits are "
            f"{tuple(pipeline.indices)}"
        )
    total, count = None, 0
    for batch in eval_loader(pipeline, "train"):
        _, targets = _on_device(dm, batch)
        per_channel = targets.transpose(0, 1).reshape(targets.shape[1], -1)
        summed = per_channel.sum(dim=1)
        total = summed if total is None else total + summed
        count += per_channel.shape[1]
    assert total is not None
    climatology = total / count
    persistence = _persistence_channels(dm)
    time_axis = 2 + dm.window_dims.index("time") if persistence is not None else 0
    errors = {"climatology": 0.0, "persistence": 0.0}
    values = 0
    for batch in eval_loader(pipeline, split):
        inputs, targets = _on_device(dm, batch)
        shape = (1, -1) + (1,) * (targets.ndim - 2)
        errors["climatology"] += float(((targets - climatology.reshape(shape)) ** 2).sum())
        if persistence is not None:
            last = inputs[:, persistence].narrow(time_axis, inputs.shape[time_axis] - 1, 1)
            errors["persistence"] += float(((targets - last) ** 2).sum())
        values += targets.numel()
    if persistence is None:
        del errors["persistence"]
    return {name: error / values for name, error in errors.items()}


class DataSummary(pl.Callback):
    """Print what the model is fed when a run starts: the summary and every channel's name.

    Example:
        >>> trainer = pl.Trainer(callbacks=[DataSummary()], logger=False)
    """

    @rank_zero_only
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Print the datamodule's summary and channel names (once per run)."""
        dm = _datamodule(trainer, "DataSummary")
        print(str(dm), flush=True)
        print(f"X channels ({len(dm.input_channel_names)}): {', '.join(dm.input_channel_names)}")
        print(f"y channels ({len(dm.target_channel_names)}): {', '.join(dm.target_channel_names)}")


class BaselineReport(pl.Callback):
    """At the end of ``fit`` and ``test``: the model's loss beside the trivial baselines.

    Prints the validation (or test) loss of the model, the climatology and persistence
    errors of :func:`baseline_losses` on the same split, and where the best checkpoint and
    the logged metrics are, with the commands that go on from there.

    Args:
        monitor: The logged validation loss (``test`` reports ``test_`` + what follows
            ``val_``).
        config: The config file, for the printed follow-up commands (default: the one
            on the command line, if any).

    Example:
        >>> trainer = pl.Trainer(callbacks=[BaselineReport()], logger=False)
    """

    def __init__(self, monitor: str = "val_loss", config: str | None = None) -> None:
        self.monitor = monitor
        self.config = config
        self.lines: list[str] = []  # what was printed last, for whoever runs the trainer

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report the validation loss against the baselines, the checkpoint and the metrics."""
        dm = _datamodule(trainer, "BaselineReport")
        if "val" not in dm.indices or self.monitor not in trainer.callback_metrics:
            return
        lines = self._compare(dm, "val", float(trainer.callback_metrics[self.monitor]))
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
        if best:
            score = getattr(checkpoint, "best_model_score", None)
            at = f" ({self.monitor} {float(score):.4f})" if score is not None else ""
            lines.append(f"best checkpoint: {best}{at}")
        if trainer.logger is not None and trainer.logger.log_dir:
            trainer.logger.save()  # a CSV logger writes what it buffered
            metrics = Path(trainer.logger.log_dir) / "metrics.csv"
            if metrics.exists():
                lines.append(f"metrics: {metrics}")
        if best:
            config = self.config or _config_on_command_line()
            given = f" --config {config}" if config else ""
            for stage in ("test", "predict"):
                lines.append(f"next: xr-datamodule {stage}{given} --ckpt_path {best}")
        self._print(lines)

    @rank_zero_only
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report the test loss against the baselines on the test split."""
        dm = _datamodule(trainer, "BaselineReport")
        name = "test_" + self.monitor.removeprefix("val_")
        if name in trainer.callback_metrics:
            self._print(self._compare(dm, "test", float(trainer.callback_metrics[name])))

    def _compare(self, dm: XarrayDataModule, split: str, loss: float) -> list[str]:
        baselines = baseline_losses(dm, split)
        lines = [f"{split} loss of the model: {loss:.4f} (mean squared error)"]
        for name, value in baselines.items():
            ratio = value / loss if loss > 0 else math.inf
            lines.append(f"  {name:12s} baseline: {value:.4f} ({ratio:.1f}x the model's)")
        return lines

    def _print(self, lines: list[str]) -> None:
        self.lines = lines
        print("\n".join(lines), flush=True)


def _config_on_command_line() -> str | None:
    import sys

    arguments = sys.argv[1:]
    for i, argument in enumerate(arguments):
        if argument == "--config" and i + 1 < len(arguments):
            return arguments[i + 1]
        if argument.startswith("--config="):
            return argument.split("=", 1)[1]
    return None


class GridPredictionWriter(BasePredictionWriter):
    """Write ``predict``'s output on the original grid: a netCDF file or a zarr store.

    The predictions of the whole predict split (the test split when there is none) are put
    back on the grid with :meth:`XarrayDataModule.to_xarray` (physical units, windows
    averaged where they overlap, NaN where none landed) and written as the target
    variables. Runs in a single process (``trainer.predict`` on one device).

    Args:
        output: A ``.nc`` file or a ``.zarr`` store (replaced if it exists).
        plot: Optionally a PNG of the first predicted field beside the truth and their
            difference (needs matplotlib).
        variable: The target variable to plot (default: the first).

    Example:
        >>> writer = GridPredictionWriter("predictions.nc", plot="prediction.png")
        >>> writer.output.suffix
        '.nc'
    """

    def __init__(
        self,
        output: str | os.PathLike = "predictions.nc",
        plot: str | os.PathLike | None = None,
        variable: str | None = None,
    ) -> None:
        super().__init__(write_interval="epoch")
        self.output = Path(output)
        if self.output.suffix not in (".nc", ".zarr"):
            raise ValueError(
                f"GridPredictionWriter: output must end in '.nc' or '.zarr', got {str(output)!r}"
            )
        self.plot = Path(plot) if plot is not None else None
        self.variable = variable

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        """Stitch every batch's prediction onto the grid and write the file."""
        dm = _datamodule(trainer, "GridPredictionWriter")
        if trainer.world_size > 1:
            raise RuntimeError(
                "GridPredictionWriter writes the whole predict split from one process; run "
                "predict on one device (trainer.devices=1)"
            )
        if predictions and isinstance(predictions[0], list):  # one list per dataloader
            predictions = predictions[0]
        grid = dm.to_xarray(list(predictions))
        self.output.parent.mkdir(parents=True, exist_ok=True)
        if self.output.suffix == ".zarr":
            grid.to_zarr(self.output, mode="w")
        else:
            grid.to_netcdf(self.output)
        print(f"predictions: {self.output} ({', '.join(map(str, grid.data_vars))} on the grid)")
        if self.plot is not None:
            self._plot(dm, grid)

    def _plot(self, dm: XarrayDataModule, grid: Any) -> None:
        from xr_datamodule.plot import plot_prediction

        name = self.variable or dm.target_vars[0]
        if name not in grid:
            raise KeyError(f"GridPredictionWriter: variable {name!r} is not a target variable")
        predicted = grid[name]
        # The first step of the leading dim (time) where a window landed.
        lead = predicted.dims[0]
        landed = predicted.notnull().any([dim for dim in predicted.dims if dim != lead])
        label = predicted.indexes[lead][int(np.argmax(landed.values))]
        figure = plot_prediction(predicted, dm.source[name], **{str(lead): label})
        assert self.plot is not None
        self.plot.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(self.plot, dpi=100, bbox_inches="tight")
        print(f"plot: {self.plot} ({name} at {lead}={label})")
