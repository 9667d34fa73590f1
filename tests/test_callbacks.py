"""Baselines against a brute force, and predictions written on the grid by a Trainer."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from tests.conftest import cpu_trainer
from xr_datamodule import XarrayDataModule
from xr_datamodule.callbacks import BaselineReport, GridPredictionWriter, baseline_losses
from xr_datamodule.models import DemoForecaster

CONFIG = dict(
    input_vars=["b", "a"],
    target_vars=["a"],
    input_dims={"time": 2, "lat": 4, "lon": 5},
    input_overlap={"time": 1},
    target_dims={"time": 1, "lat": 4, "lon": 5},
    target_offset={"time": 3},
    splits={"train": 0.5, "val": 0.25, "test": 0.25},
    batch_size=5,
    dtype="float64",
)


def test_baselines_equal_a_brute_force(small_ds):
    dm = XarrayDataModule(small_ds, **CONFIG)
    losses = baseline_losses(dm, "val")
    geometry = dm.geometry
    axis = geometry.dims.index("time")

    def targets_and_last_inputs(split):
        rows = []
        for start in dm.indices[split].starts(np.arange(len(dm.indices[split]))):
            window = {d: int(s) for d, s in zip(geometry.dims, start, strict=True)}
            t = window["time"]
            space = {d: slice(window[d], window[d] + n) for d, n in (("lat", 4), ("lon", 5))}
            target = small_ds.a.isel(time=t + 3, **space).transpose("lat", "lon").values
            last = small_ds.a.isel(time=t + 1, **space).transpose("lat", "lon").values
            rows.append((target, last))
        return rows

    train_mean = np.mean([target for target, _ in targets_and_last_inputs("train")])
    val = targets_and_last_inputs("val")
    assert axis == 0 and losses["climatology"] == pytest.approx(
        np.mean([(target - train_mean) ** 2 for target, _ in val])
    )
    assert losses["persistence"] == pytest.approx(
        np.mean([(target - last) ** 2 for target, last in val])
    )


def test_no_persistence_where_the_target_is_not_an_input(small_ds):
    dm = XarrayDataModule(small_ds, **{**CONFIG, "target_vars": ["c"]})
    assert list(baseline_losses(dm, "test")) == ["climatology"]


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_predictions_are_written_on_the_grid(small_ds, tmp_path, suffix, capsys):
    dm = XarrayDataModule(small_ds, **{**CONFIG, "input_vars": ["a"], "normalize": "zscore"})
    model = DemoForecaster(dm.input_shape, dm.target_shape, hidden_channels=2).double()
    output = tmp_path / f"predictions{suffix}"
    writer = GridPredictionWriter(output, plot=tmp_path / "prediction.png")
    trainer = cpu_trainer(callbacks=[writer])
    predictions = trainer.predict(model, datamodule=dm)
    expected = dm.to_xarray(predictions, "test")
    with xr.open_dataset(output, engine="zarr" if suffix == ".zarr" else None) as written:
        xr.testing.assert_allclose(written.a, expected.a)
        assert written.sizes == {"time": 10, "lat": 12, "lon": 10}  # the test split's grid
        np.testing.assert_array_equal(written.lat, small_ds.lat)
    assert (tmp_path / "prediction.png").stat().st_size > 0
    assert f"predictions: {output}" in capsys.readouterr().out


def test_a_writer_refuses_an_unknown_format():
    with pytest.raises(ValueError, match=r"output must end in '.nc' or '.zarr'"):
        GridPredictionWriter("predictions.csv")


def test_the_report_verifies_the_fitted_model_beside_the_baselines(small_ds, capsys):
    dm = XarrayDataModule(small_ds, **CONFIG)
    model = DemoForecaster(dm.input_shape, dm.target_shape, hidden_channels=2).double()
    report = BaselineReport()
    trainer = cpu_trainer(callbacks=[report], max_epochs=1)
    trainer.fit(model, datamodule=dm)
    out = capsys.readouterr().out
    assert report.lines[0].startswith("val: latitude-weighted RMSE per lead time")
    assert "of the model at the end of fit" in report.lines[0]  # no checkpoint kept
    assert set(report.scores) == {"model", "persistence", "climatology"}
    assert "+2D" not in out and "    persistence" in out  # lead 2 days: "+2d"
    assert list(report.scores["model"]["a"]) == ["+2d"]
