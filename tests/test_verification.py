"""Leads kept apart, masks that survive, metrics in physical units, plots on coordinates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from tests.conftest import cpu_trainer
from xr_datamodule import XarrayDataModule
from xr_datamodule.callbacks import BaselineReport
from xr_datamodule.loaders import eval_loader
from xr_datamodule.losses import masked_mse
from xr_datamodule.models import DemoForecaster
from xr_datamodule.verification import latitude_weights, rmse_table, weighted_rmse


def hourly(n_time=48, n_lat=6, n_lon=8, seed=0) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    times = pd.date_range("2021-06-01", periods=n_time, freq="h")
    shape = (n_time, n_lat, n_lon)
    ds = xr.Dataset(
        {
            "t": (("time", "lat", "lon"), 280 + 5 * rng.normal(size=shape)),
            "u": (("time", "lat", "lon"), rng.normal(size=shape)),
        },
        coords={"time": times, "lat": np.linspace(60, 10, n_lat), "lon": np.arange(n_lon) * 2.0},
    )
    ds.t.attrs["units"] = "K"
    return ds


@pytest.mark.parametrize("leads", [2, 3])
def test_predictions_per_lead_come_back_unaveraged(leads):
    dm = XarrayDataModule(
        hourly(),
        ["t", "u"],
        target_vars=["t"],
        input_dims={"time": 2, "lat": 6, "lon": 4},
        input_overlap={"time": 1, "lon": 2},  # spatial windows overlap: averaged in space
        target_dims={"time": leads, "lat": 6, "lon": 4},
        target_offset={"time": 2},
        batch_size=7,
    )
    index = dm.indices["test"]
    # Each prediction coded by its lead: 10 * (lead step) + 1000 * init position.
    starts = index.starts(np.arange(len(index)))
    coded = np.zeros((len(index), 1, leads, 6, 4))
    for j in range(leads):
        coded[:, :, j] = 10 * (j + 1) + 1000 * (starts[:, 0] + 1)[:, None, None, None]
    forecast = dm.to_xarray([coded[:5], coded[5:]], split="test")
    t = forecast.t
    assert t.dims == ("time", "prediction_timedelta", "lat", "lon")
    hours = forecast.prediction_timedelta.values.astype("timedelta64[h]").astype(int)
    assert hours.tolist() == list(range(1, leads + 1))  # lead from the last input step
    labels = dm.source.time.values
    for i, init in enumerate(forecast.time.values):
        position = int(np.flatnonzero(labels == init)[0])
        for j in range(leads):
            field = t.isel(time=i, prediction_timedelta=j).values
            assert np.allclose(field, 10 * (j + 1) + 1000 * position)
            assert forecast.valid_time.values[i, j] == labels[position + j + 1]
    np.testing.assert_array_equal(
        forecast.valid_time.values, (forecast.time + forecast.prediction_timedelta).values
    )
    truth = dm.source.t.sel(time=forecast.valid_time)
    assert truth.dims == t.dims


def test_one_step_keeps_the_grid_unless_the_forecast_layout_is_asked_for():
    dm = XarrayDataModule(
        hourly(),
        ["t"],
        input_dims={"time": 2, "lat": 6, "lon": 8},
        target_dims={"time": 1, "lat": 6, "lon": 8},
        target_offset={"time": 2},
    )
    truth = [y for _, y in dm.predict_dataloader()]
    grid = dm.to_xarray(truth)
    assert grid.t.dims == ("time", "lat", "lon")
    forecast = dm.to_xarray(truth, layout="forecast")
    assert forecast.t.dims == ("time", "prediction_timedelta", "lat", "lon")
    shifted = dm.source.t.sel(time=forecast.valid_time)
    np.testing.assert_allclose(forecast.t.values, shifted.values, rtol=1e-6)
    with pytest.raises(ValueError, match="layout must be one of"):
        dm.to_xarray(truth, layout="leads")


def with_holes() -> xr.Dataset:
    ds = hourly(seed=1)
    values = ds.t.values.copy()
    values[10:20, 1:4, 2:6] = np.nan  # a radar gap
    values[:, 5, 0] = np.nan  # a point that is never observed (land under an ocean model)
    return ds.assign(t=(("time", "lat", "lon"), values, ds.t.attrs))


def masked_dm(data, **kwargs) -> XarrayDataModule:
    return XarrayDataModule(
        data,
        ["t", "u"],
        target_vars=["t"],
        input_dims={"time": 1, "lat": 3, "lon": 4},
        target_dims={"time": 1, "lat": 3, "lon": 4},
        target_offset={"time": 1},
        batch_size=6,
        batch_format="dict",
        nan_policy="fill",
        normalize="zscore",
        **kwargs,
    )


@pytest.mark.parametrize("where", ["memory", "zarr-0", "zarr-2"])
def test_masked_targets_are_marked_in_batches_and_come_back_nan(where, tmp_path):
    ds = with_holes()
    if where == "memory":
        dm = masked_dm(ds)
    else:
        ds.chunk({"time": 8}).to_zarr(tmp_path / "holes.zarr")
        dm = masked_dm(str(tmp_path / "holes.zarr"), load=False, num_workers=int(where[-1]))
    seen_missing = 0
    predictions = []
    for batch in eval_loader(dm.pipeline, "predict"):
        mask = batch["target_mask"]
        assert mask.dtype == torch.bool and mask.shape == batch["y"].shape
        starts = dm.indices["test"].starts(batch["sample"].numpy())
        for row, (time, lat, lon) in enumerate(starts):
            reference = ds.t.values[time + 1, lat : lat + 3, lon : lon + 4]
            np.testing.assert_array_equal(mask[row, 0, 0].numpy(), ~np.isnan(reference))
            seen_missing += int(np.isnan(reference).sum())
        assert not torch.isnan(batch["y"]).any()  # filled for the model
        predictions.append(batch["y"].clone())
    assert seen_missing > 0
    index = dm.indices["test"]
    landed = np.unique(index.starts(np.arange(len(index)))[:, 0] + 1)
    grid = dm.to_xarray(predictions).isel(time=landed - dm.split_bounds["test"]["time"][0])
    truth = ds.t.sel(time=grid.time)
    np.testing.assert_array_equal(np.isnan(grid.t.values), np.isnan(truth.values))
    np.testing.assert_allclose(grid.t.values, truth.values, rtol=1e-5)


def test_statistics_ignore_missing_values():
    ds = with_holes()
    dm = masked_dm(ds, splits={"train": 1.0})
    stats = dm.statistics
    assert np.isclose(stats.mean["t"][0], np.nanmean(ds.t.values))
    assert np.isclose(stats.std["t"][0], np.nanstd(ds.t.values), rtol=1e-6)


def test_masked_mse_leaves_missing_targets_out_and_weights_latitudes():
    target = torch.tensor([[1.0, float("nan"), 3.0, 0.0]])
    prediction = torch.tensor([[2.0, 5.0, 1.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True, False]])
    weights = torch.tensor([[2.0, 1.0, 1.0, 1.0]])
    loss = masked_mse(prediction, target, mask, weights)
    assert float(loss.detach()) == pytest.approx((2 * 1 + 1 * 4) / 3)
    loss.backward()
    assert prediction.grad is not None
    assert prediction.grad[0, 1] == 0 and prediction.grad[0, 3] == 0  # no gradient when missing


def test_rmse_equals_a_numpy_reference():
    rng = np.random.default_rng(3)
    lat = np.linspace(-80, 80, 9)
    dims = ("time", "prediction_timedelta", "level", "lat", "lon")
    shape = (5, 3, 2, 9, 12)
    coords = {"lat": lat, "lon": np.arange(12) * 30.0, "level": [500, 850]}
    truth = xr.DataArray(rng.normal(size=shape), dims=dims, coords=coords, name="z")
    forecast = truth + rng.normal(size=shape)
    forecast[0, 0, 0, :3, :4] = np.nan  # missing points are left out of both sums
    got = weighted_rmse(forecast, truth, "lat", keep=["prediction_timedelta", "level"])
    weights = np.cos(np.radians(lat))
    weights = weights / weights.mean()
    for lead in range(3):
        for level in range(2):
            error = (forecast.values - truth.values)[:, lead, level]
            w = np.broadcast_to(weights[None, :, None], error.shape)
            present = ~np.isnan(error)
            reference = np.sqrt((w * np.nan_to_num(error) ** 2).sum() / w[present].sum())
            assert abs(float(got[lead, level]) - reference) < 1e-6
    table = rmse_table({"model": forecast.to_dataset()}, truth.to_dataset(), "lat", ["lat", "lon"])
    assert list(table["model"]) == ["z[level=500]", "z[level=850]"]
    assert table["model"]["z[level=850]"]["+2"] == pytest.approx(float(got[2, 1]), abs=1e-12)
    assert latitude_weights(lat).mean() == pytest.approx(1.0)


def test_rmse_equals_the_verification_library():
    scores = pytest.importorskip("scores.continuous")
    rng = np.random.default_rng(4)
    lat = np.linspace(-60, 60, 7)
    truth = xr.DataArray(
        rng.normal(size=(4, 7, 5)), dims=("time", "lat", "lon"), coords={"lat": lat}
    )
    forecast = truth + rng.normal(size=truth.shape)
    weights = xr.DataArray(latitude_weights(lat), dims=("lat",), coords={"lat": lat})
    theirs = scores.rmse(forecast, truth, weights=weights)
    ours = weighted_rmse(forecast, truth, "lat")
    assert abs(float(theirs) - float(ours)) < 1e-6


def test_the_report_verifies_the_best_checkpoint_in_physical_units(tmp_path, capsys):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    ds = hourly(n_time=60)
    dm = XarrayDataModule(
        ds,
        ["t", "u"],
        target_vars=["t"],
        input_dims={"time": 2, "lat": 6, "lon": 8},
        target_dims={"time": 2, "lat": 6, "lon": 8},
        target_offset={"time": 2},
        normalize="zscore",
        batch_size=8,
    )
    model = DemoForecaster(dm.input_shape, dm.target_shape, hidden_channels=4)
    report = BaselineReport()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", filename="best")
    logger = CSVLogger(tmp_path, name="run")
    trainer = cpu_trainer(
        callbacks=[checkpoint, report],
        max_epochs=3,
        logger=logger,
        default_root_dir=tmp_path,
        enable_checkpointing=True,
    )
    final = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit(model, datamodule=dm)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    out = capsys.readouterr().out
    assert "of the best checkpoint" in out and "t (K)" in out
    # Reference: the best checkpoint's predictions, in physical units, through numpy.
    best = DemoForecaster.load_from_checkpoint(checkpoint.best_model_path).double().eval()
    index = dm.indices["val"]
    starts = index.starts(np.arange(len(index)))[:, 0]
    with torch.no_grad():
        x = torch.from_numpy(dm.datasets["val"].__getitems__(np.arange(len(index))).inputs)
        predicted = dm.denormalize(best(x.double())).numpy()[:, 0]
    weights = latitude_weights(ds.lat.values)[None, :, None]
    for lead in range(2):
        error = predicted[:, lead] - ds.t.values[starts + 2 + lead]
        reference = np.sqrt(
            (weights * error**2).sum() / np.broadcast_to(weights, error.shape).sum()
        )
        assert report.scores["model"]["t"][f"+{lead + 1}h"] == pytest.approx(reference, rel=1e-4)
        persistence = ds.t.values[starts + 2 + lead] - ds.t.values[starts + 1]
        expected = np.sqrt(
            (weights * persistence**2).sum() / np.broadcast_to(weights, persistence.shape).sum()
        )
        assert report.scores["persistence"]["t"][f"+{lead + 1}h"] == pytest.approx(
            expected, rel=1e-9
        )
    header = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    for who in ("model", "persistence", "climatology"):
        assert f"val_rmse_{who}/t/+2h" in header
    for name, value in model.state_dict().items():  # the model keeps its final weights
        assert torch.equal(value, final[name])


def test_the_prediction_plot_is_drawn_north_up_on_coordinates(tmp_path):
    pytest.importorskip("matplotlib")
    from xr_datamodule.plot import plot_prediction

    ds = hourly()  # latitude stored north to south
    dm = XarrayDataModule(
        ds,
        ["t"],
        input_dims={"time": 1, "lat": 6, "lon": 8},
        target_dims={"time": 2, "lat": 6, "lon": 8},
        target_offset={"time": 1},
    )
    truth = [y + 0.5 for _, y in dm.predict_dataloader()]
    forecast = dm.to_xarray(truth)
    figure = plot_prediction(forecast.t, ds.t)
    path = tmp_path / "prediction.png"
    figure.savefig(path)
    assert path.stat().st_size > 10_000
    field_axis, _, error_axis = figure.axes[:3]
    bottom, top = field_axis.get_ylim()
    assert bottom < top and top >= 60 - 1e-9  # north up, in degrees
    assert field_axis.get_ylabel().startswith("lat")
    low, high = error_axis.collections[0].get_clim()
    assert low == pytest.approx(-high) and 0.4 < high < 0.6  # the error's own scale
    field_low, field_high = field_axis.collections[0].get_clim()
    assert 250 < field_low < field_high < 310  # a sequential scale over the field, not +-max
    assert "prediction_timedelta +1h" in figure.get_suptitle()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_missing_value_first_seen_late_marks_every_batch_right(tmp_path, workers):
    ds = hourly(seed=2)
    values = ds.t.values.copy()
    values[30:33, 2:5, 1:3] = np.nan  # only in late cells: early cells never kept masks
    ds = ds.assign(t=(("time", "lat", "lon"), values, ds.t.attrs))
    ds.chunk({"time": 4}).to_zarr(tmp_path / "late.zarr")
    dm = masked_dm(str(tmp_path / "late.zarr"), load=False, num_workers=workers)
    dm.spec.splits = {"train": 1.0}
    seen_missing = 0
    for epoch in range(2):  # the second pass reads cells decoded before the first NaN
        for batch in eval_loader(dm.pipeline, "train", in_order=True):
            starts = dm.indices["train"].starts(batch["sample"].numpy())
            for row, (time, lat, lon) in enumerate(starts):
                reference = ds.t.values[time + 1, lat : lat + 3, lon : lon + 4]
                np.testing.assert_array_equal(
                    batch["target_mask"][row, 0, 0].numpy(), ~np.isnan(reference)
                )
                seen_missing += int(np.isnan(reference).sum()) * (epoch == 0)
    assert seen_missing > 0


def test_a_static_mask_marks_batches_predictions_and_metrics(tmp_path):
    ds = hourly(n_time=60)
    ocean = np.ones((6, 8), dtype=bool)
    ocean[1:3, 2:5] = False  # land
    ds = ds.assign(ocean=(("lat", "lon"), ocean))
    dm = XarrayDataModule(
        ds,
        ["t", "u"],
        target_vars=["t"],
        input_dims={"time": 1, "lat": 3, "lon": 4},
        target_dims={"time": 2, "lat": 3, "lon": 4},
        target_offset={"time": 1},
        batch_size=5,
        batch_format="dict",
        mask="ocean",
    )
    predictions = []
    for batch in eval_loader(dm.pipeline, "predict"):
        starts = dm.indices["test"].starts(batch["sample"].numpy())
        for row, (_, lat, lon) in enumerate(starts):
            expected = np.broadcast_to(ocean[lat : lat + 3, lon : lon + 4], (1, 2, 3, 4))
            np.testing.assert_array_equal(batch["target_mask"][row].numpy(), expected)
        predictions.append(batch["y"].clone())
    forecast = dm.to_xarray(predictions)
    land = ~np.broadcast_to(ocean, forecast.t.shape)
    assert np.isnan(forecast.t.values[land]).all()
    assert not np.isnan(forecast.t.values[~land]).any()
    with pytest.raises(ValueError, match="a static mask spans windowed dims other than time"):
        XarrayDataModule(ds, ["t"], {"time": 1, "lat": 3, "lon": 4}, mask="u").setup()
