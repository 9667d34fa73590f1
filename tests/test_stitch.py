"""Predictions back on the grid: stitched windows against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from tests.conftest import FORECAST, cpu_trainer
from xr_datamodule import XarrayDataModule
from xr_datamodule.models import DemoForecaster

CONFIG = dict(
    input_vars=["a"],
    target_vars=["c", "b"],
    input_dims={"time": 3, "lat": 4, "lon": 5},
    input_overlap={"time": 2, "lat": 2},
    target_dims={"time": 1, "lat": 4, "lon": 5},
    target_offset={"time": 3},
    splits={"train": {"time": [None, "2020-01-25"]}, "predict": {"time": ["2020-01-26", None]}},
    batch_size=6,
    dtype="float64",
)


def test_true_targets_stitch_back_to_the_source(small_ds):
    dm = XarrayDataModule(small_ds, **CONFIG)
    truth = [y for _, y in dm.predict_dataloader()]
    grid = dm.to_xarray(truth)
    assert list(grid.data_vars) == ["c", "b"]
    assert grid.c.dims == small_ds.c.dims  # (level, lon, time, lat): the source's order
    covered = grid.b.notnull()
    assert covered.any()
    expected = small_ds[["c", "b"]].sel(time=grid.time, lat=grid.lat, lon=grid.lon)
    xr.testing.assert_allclose(grid.where(covered), expected.where(covered))
    # The grid is the split's, whole: the source's lat and lon, the split's times. Targets
    # start 3 steps after the inputs: nothing is predicted before 2020-01-29.
    assert str(grid.time.values[0])[:10] == "2020-01-26"
    assert grid.sizes["lat"] == small_ds.sizes["lat"] and grid.sizes["lon"] == small_ds.sizes["lon"]
    predicted = grid.b.notnull().any([d for d in grid.b.dims if d != "time"])
    assert str(grid.time.values[int(np.argmax(predicted.values))])[:10] == "2020-01-29"


def test_overlapping_windows_are_averaged(small_ds):
    dm = XarrayDataModule(small_ds, **CONFIG)
    n = len(dm.indices["predict"])
    shape = (n, *dm.target_shape)
    predictions = np.broadcast_to(np.arange(n, dtype=float).reshape(-1, 1, 1, 1, 1), shape)
    grid = dm.to_xarray([predictions[:4], predictions[4:]])
    # Brute force: every position gets the mean of the sample numbers whose window covers it.
    starts = dm.indices["predict"].starts(np.arange(n)) + np.asarray(dm.geometry.target_offset)
    dims, size = dm.geometry.dims, dm.geometry.target_size
    lower = np.array([dm.split_bounds["predict"][dim][0] for dim in dims])  # the grid's origin
    totals, counts = {}, {}
    for sample, start in enumerate(starts):
        for offset in np.ndindex(*size):
            key = tuple(int(s + o - lo) for s, o, lo in zip(start, offset, lower, strict=True))
            totals[key] = totals.get(key, 0.0) + sample
            counts[key] = counts.get(key, 0) + 1
    b = grid.b.transpose(*dims).values
    for key, total in totals.items():
        assert b[key] == pytest.approx(total / counts[key])
    assert max(counts.values()) > 1  # windows really overlap along lat
    assert np.isnan(b).sum() == b.size - len(totals)


def test_wrong_predictions_are_refused(small_ds):
    dm = XarrayDataModule(small_ds, **CONFIG)
    truth = [y for _, y in dm.predict_dataloader()]
    with pytest.raises(ValueError, match=r"predictions have shape .* but the split's targets"):
        dm.to_xarray(truth[:-1])
    with pytest.raises(ValueError, match=r"unknown split 'val'"):
        dm.to_xarray(truth, split="val")


def test_trainer_predict_to_netcdf(tmp_path):
    splits = {"train": {"time": [None, "2019-03-20"]}, "predict": {"time": ["2019-03-25", None]}}
    dm = XarrayDataModule("synthetic://weather", **FORECAST, splits=splits)
    model = DemoForecaster(dm.input_shape, dm.target_shape, hidden_channels=4)
    trainer = cpu_trainer()
    grid = dm.to_xarray(trainer.predict(model, datamodule=dm))
    path = tmp_path / "pred.nc"
    grid.to_netcdf(path)
    back = xr.open_dataset(path)
    assert back.t2m.dims == ("time", "lat", "lon")
    assert back.sizes["lat"] == 32 and back.sizes["lon"] == 64
    # The split's whole grid: the first two steps precede every target (offset 2).
    assert bool(back.t2m.isel(time=slice(2, None)).notnull().all())
    assert bool(back.t2m.isel(time=slice(0, 2)).isnull().all())


def test_the_grid_is_never_cropped_where_no_window_lands():
    from xr_datamodule import make_weather

    source = make_weather(n_time=24, n_lat=33, n_lon=49)  # 16x16 windows leave a row and column
    dm = XarrayDataModule(
        source,
        input_vars=["t2m"],
        input_dims={"time": 1, "lat": 16, "lon": 16},
        splits={"train": 0.5, "predict": 0.5},
    )
    grid = dm.to_xarray([y for _, y in dm.predict_dataloader()])
    assert grid.sizes["lat"] == 33 and grid.sizes["lon"] == 49
    np.testing.assert_array_equal(grid.lat, source.lat)
    np.testing.assert_array_equal(grid.lon, source.lon)
    assert bool(grid.t2m.isel(lat=32).isnull().all()) and bool(grid.t2m.isel(lon=48).isnull().all())
    inside = grid.t2m.isel(lat=slice(0, 32), lon=slice(0, 48))
    xr.testing.assert_allclose(
        inside,
        source.t2m.sel(time=inside.time)
        .isel(lat=slice(0, 32), lon=slice(0, 48))
        .astype(inside.dtype),
    )
