"""Callbacks that leave the user something: a verification report, predictions on the grid.

Both can be listed in any config's ``trainer.callbacks``::

    trainer:
      callbacks:
        - class_path: xr_datamodule.callbacks.BaselineReport
        - class_path: xr_datamodule.callbacks.GridPredictionWriter
          init_args: {output: lightning_logs/predictions.nc, plot: lightning_logs/prediction.png}

:class:`BaselineReport` verifies the model the way forecasters do (see
:mod:`xr_datamodule.verification`): latitude-weighted RMSE per lead time and per target
channel, in physical units, of the model (the best checkpoint), of persistence (the truth at
the last input step, for every lead) and of climatology (the training split's mean at each
grid point); printed and written to the logger (``metrics.csv``).

:func:`baseline_losses` gives the same baselines as mean squared errors in the units the
model sees (normalised, if the datamodule normalises), comparable with its loss.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import xarray as xr
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_only

from xr_datamodule.coordinates import weight_field
from xr_datamodule.datamodule import XarrayDataModule
from xr_datamodule.forcings import coordinate_dims
from xr_datamodule.loaders import eval_loader
from xr_datamodule.sources import channel_layouts
from xr_datamodule.stitch import DEFAULT_BLEND, window_taper
from xr_datamodule.verification import (
    climatology_forecast,
    persistence_forecast,
    rmse_table,
)

__all__ = [
    "BaselineReport",
    "DataSummary",
    "GridPredictionWriter",
    "baseline_losses",
    "predict_split",
    "verify",
]


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
    time_dim = dm.pipeline.layout.time_dim
    if spec.transform or spec.target_transform or time_dim is None:
        return None
    if any(name not in dm.input_vars for name in dm.target_vars):
        return None
    for axis, dim in enumerate(geometry.dims):
        same = geometry.input_size[axis] == geometry.target_size[axis]
        if dim != time_dim and not (same and geometry.target_offset[axis] == 0):
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
    if (
        "train" not in pipeline.plan.indices
        or pipeline.plan.split_for(split) not in pipeline.plan.indices
    ):
        raise ValueError(
            f"baselines need a 'train' split and a {split!r} split; splits are "
            f"{tuple(pipeline.plan.indices)}"
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
    time_dim = dm.pipeline.layout.time_dim
    time_axis = 2 + dm.window_dims.index(time_dim) if persistence and time_dim else 0
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


def predict_split(
    dm: XarrayDataModule, model: pl.LightningModule, split: str = "val"
) -> list[torch.Tensor]:
    """The model's ``predict_step`` on every batch of ``split``, in sample order (no grad).

    Batches are moved to the model's device and pass the datamodule's
    ``on_after_batch_transfer`` as in a Trainer; the model is left in the mode it was in.
    """
    from lightning.fabric.utilities import move_data_to_device

    outputs = []
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for number, batch in enumerate(eval_loader(dm.pipeline, split, in_order=True)):
                moved = move_data_to_device(batch, model.device)
                moved = dm.on_after_batch_transfer(
                    moved if isinstance(moved, dict) else tuple(moved), 0
                )
                outputs.append(model.predict_step(moved, number).detach().cpu())
    finally:
        model.train(training)
    return outputs


def verify(
    dm: XarrayDataModule, predictions: Sequence[Any], split: str = "val"
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, str]]:
    """Latitude-weighted RMSE per lead time of the model and the baselines, physical units.

    Args:
        dm: The datamodule the predictions come from.
        predictions: The model's predictions of every sample of ``split``, in order.
        split: The split verified.

    Returns:
        ``({forecast: {channel: {lead: rmse}}}, {forecast: why it was not computed})`` for the
        forecasts ``model``, ``persistence`` and ``climatology`` (see
        :mod:`xr_datamodule.verification`).

    Raises:
        ValueError: Without a time dim among the windowed dims (no lead time to verify).
    """
    pipeline = dm.pipeline
    time_dim = pipeline.layout.time_dim
    if time_dim is None:
        raise ValueError(f"verification needs a time dim among the windowed dims {dm.window_dims}")
    model = dm.to_xarray(predictions, split, layout="forecast")
    truth = xr.Dataset({name: pipeline.truth_for(model[name]) for name in model.data_vars})
    forecasts: dict[str, xr.Dataset] = {"model": model}
    skipped: dict[str, str] = {}
    persistence = _persistence(dm, model, time_dim)
    if isinstance(persistence, str):
        skipped["persistence"] = persistence
    else:
        forecasts["persistence"] = persistence
    if "train" in dm.split_bounds:
        forecasts["climatology"] = _climatology(dm, model, time_dim)
    else:
        skipped["climatology"] = "no 'train' split to take the mean of"
    space = [dim for dim in dm.window_dims if dim != time_dim]
    return rmse_table(forecasts, truth, _area_weighting(dm), space), skipped


def _area_weighting(dm: Any) -> str | xr.DataArray | None:
    """The latitude dim of a regular grid; else the area weights over a cell or 2-D grid."""
    lat_dim = coordinate_dims(dm.source, dm.window_dims).get("lat")
    if lat_dim is not None:
        return lat_dim
    field = weight_field(dm.source, dm.window_dims, dm.spec.coordinates)
    if field is None:
        return None
    return xr.DataArray(field.values, dims=[dm.window_dims[axis] for axis in field.axes])


def _region_of(values: xr.DataArray, like: xr.DataArray) -> xr.DataArray:
    """``values`` at the grid points of ``like`` (its coordinates on the shared dims)."""
    where = {dim: like[dim].values for dim in like.dims if dim in values.indexes}
    return values.sel(where)


def _persistence(dm: XarrayDataModule, model: xr.Dataset, time_dim: str) -> xr.Dataset | str:
    """Persistence in the forecast layout, or why it is not computed."""
    geometry = dm.geometry
    axis = dm.window_dims.index(time_dim)
    if geometry.target_offset[axis] < geometry.input_size[axis]:
        return (
            f"the target window starts at or before the last input step along {time_dim!r} "
            "(no lead time to persist over)"
        )
    out = {}
    for name in model.data_vars:
        at_init = dm.source[name].sel({time_dim: model["time"].values})
        at_init = _region_of(at_init.rename({time_dim: "time"}), model[name])
        out[name] = persistence_forecast(at_init.compute(), model[name])
    return xr.Dataset(out)


def _climatology(dm: XarrayDataModule, model: xr.Dataset, time_dim: str) -> xr.Dataset:
    """The training split's mean at every grid point, in the forecast layout."""
    lo, hi = dm.split_bounds["train"][time_dim]
    out = {}
    for name in model.data_vars:
        mean = dm.source[name].isel({time_dim: slice(lo, hi)}).mean(time_dim)
        out[name] = climatology_forecast(_region_of(mean, model[name]).compute(), model[name])
    return xr.Dataset(out)


def _units(dm: XarrayDataModule, channel: str) -> str:
    name = channel.split("[", 1)[0]
    units = dm.source[name].attrs.get("units") if name in dm.source else None
    return f" ({units})" if units else ""


def report_lines(
    dm: XarrayDataModule,
    table: dict[str, dict[str, dict[str, float]]],
    skipped: dict[str, str],
    split: str,
    what: str,
) -> list[str]:
    """The RMSE table as lines: one per channel and forecast, a column per lead time."""
    leads = list(next(iter(next(iter(table.values())).values())))
    lines = [
        f"{split}: latitude-weighted RMSE per lead time from the last input step, physical "
        f"units, of {what}",
        f"  {'':28s}" + "".join(f"{lead:>12s}" for lead in leads),
    ]
    for channel in table["model"]:
        lines.append(f"  {channel}{_units(dm, channel)}")
        for who, rows in table.items():
            lines.append(
                f"    {who:26s}" + "".join(f"{rows[channel][lead]:12.4g}" for lead in leads)
            )
    for who, why in skipped.items():
        lines.append(f"  {who}: not computed: {why}")
    return lines


def metric_names(table: dict[str, dict[str, dict[str, float]]], split: str) -> dict[str, float]:
    """``{"val_rmse_model/t2m/+1h": ...}``: the table as logger metrics."""
    return {
        f"{split}_rmse_{who}/{channel}/{lead}": value
        for who, rows in table.items()
        for channel, leads in rows.items()
        for lead, value in leads.items()
    }


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
    """At the end of ``fit`` and ``test``: the model verified beside persistence and climatology.

    At the end of ``fit``, the best checkpoint's weights (when a ``ModelCheckpoint`` kept
    one; else the model as it is) predict the validation split, and the report prints the
    latitude-weighted RMSE per lead time and target channel in physical units of the
    model, persistence and climatology (see :func:`verify`), where the checkpoint and the
    logged metrics are, and the commands that go on from there. ``test`` reports the test
    split likewise. The scores are also written to the logger (``metrics.csv``) as
    ``val_rmse_model/<channel>/<lead>`` and so on. The model's own weights are left as they
    were at the end of ``fit``.

    Without a time dim among the windowed dims (no lead time), the report compares the
    logged loss with :func:`baseline_losses` instead.

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
        self.scores: dict[str, dict[str, dict[str, float]]] = {}  # the last RMSE table

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Verify the best checkpoint on the validation split; say where things are."""
        dm = _datamodule(trainer, "BaselineReport")
        if "val" not in dm.indices:
            return
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
        score = getattr(checkpoint, "best_model_score", None) if best else None
        what = (
            f"the best checkpoint ({self.monitor} {float(score):.4f})"
            if best and score is not None
            else ("the best checkpoint" if best else "the model at the end of fit")
        )
        with _weights_of(pl_module, best):
            lines = self._verified(trainer, pl_module, dm, "val", what)
        if best:
            lines.append(f"best checkpoint: {best}")
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
        """Verify the model (as tested) on the test split."""
        dm = _datamodule(trainer, "BaselineReport")
        if dm.pipeline.plan.split_for("test") in dm.indices:
            lines = self._verified(trainer, pl_module, dm, "test", "the model tested")
            if trainer.logger is not None:
                trainer.logger.save()
            self._print(lines)

    def _verified(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        dm: XarrayDataModule,
        split: str,
        what: str,
    ) -> list[str]:
        if dm.pipeline.layout.time_dim is None:
            name = self.monitor if split == "val" else "test_" + self.monitor.removeprefix("val_")
            if name not in trainer.callback_metrics:
                return []
            return [
                "no time dim among the windowed dims: no lead times to verify; losses instead",
                *self._compare(dm, split, float(trainer.callback_metrics[name])),
            ]
        table, skipped = verify(dm, predict_split(dm, pl_module, split), split)
        self.scores = table
        if trainer.logger is not None:
            trainer.logger.log_metrics(metric_names(table, split), step=trainer.global_step)
        return report_lines(dm, table, skipped, split, what)

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


@contextmanager
def _weights_of(module: pl.LightningModule, checkpoint: str) -> Iterator[None]:
    """Within the block, ``module`` holds a checkpoint's weights (none given: its own)."""
    if not checkpoint:
        yield
        return
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
    # The checkpoint this run just wrote (trusted): Lightning's hyperparameters in it are not
    # all plain types.
    stored = torch.load(checkpoint, map_location=module.device, weights_only=False)
    module.load_state_dict(stored["state_dict"])
    try:
        yield
    finally:
        module.load_state_dict(saved)


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
    back on the grid with :meth:`XarrayDataModule.to_xarray` (physical units, overlapping
    windows blended, NaN where none landed) and written as the target variables. Runs in a
    single process (``trainer.predict`` on one device).

    Args:
        output: A ``.nc`` file or a ``.zarr`` store (replaced if it exists).
        plot: Optionally a PNG of the first predicted field beside the truth and their
            difference (needs matplotlib).
        variable: The target variable to plot (default: the first).
        layout: ``"auto"`` (default), ``"grid"`` or ``"forecast"``: see
            :meth:`XarrayDataModule.to_xarray` (several target steps are written per init
            and lead time, never averaged together).
        blend: How overlapping windows are weighted: ``"gaussian"`` (default), ``"cosine"``
            or ``"mean"`` (see :meth:`XarrayDataModule.to_xarray`).
        blend_width: The taper's width as a fraction of the window (default per blend).

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
        layout: str = "auto",
        blend: str = DEFAULT_BLEND,
        blend_width: float | None = None,
    ) -> None:
        super().__init__(write_interval="epoch")
        window_taper((4,), ("x",), blend=blend, width=blend_width)  # refuse a bad choice now
        self.layout, self.blend, self.blend_width = layout, blend, blend_width
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
        grid = dm.to_xarray(list(predictions), "predict", self.layout, self.blend, self.blend_width)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        if self.output.suffix == ".zarr":
            grid.to_zarr(self.output, mode="w")
        else:
            grid.to_netcdf(self.output)
        kind = "per init and lead time" if "valid_time" in grid.coords else "on the grid"
        print(f"predictions: {self.output} ({', '.join(map(str, grid.data_vars))} {kind})")
        if self.plot is not None:
            self._plot(dm, grid)

    def _plot(self, dm: XarrayDataModule, grid: Any) -> None:
        from xr_datamodule.plot import plot_prediction

        name = self.variable or dm.target_vars[0]
        if name not in grid:
            raise KeyError(f"GridPredictionWriter: variable {name!r} is not a target variable")
        predicted = grid[name]
        # The first step of the leading dim (time) where a window landed (the first lead).
        lead = predicted.dims[0]
        landed = predicted.notnull().any([dim for dim in predicted.dims if dim != lead])
        label = predicted.indexes[lead][int(np.argmax(landed.values))]
        figure = plot_prediction(predicted.sel({lead: label}), dm.source[name])
        assert self.plot is not None
        self.plot.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(self.plot, dpi=100, bbox_inches="tight")
        print(f"plot: {self.plot} ({name} at {lead}={label})")
