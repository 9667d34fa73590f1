"""Predictions back on the grid: stitched windows against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from tests.conftest import FORECAST, cpu_trainer
from xr_datamodule import XarrayDataModule
from xr_datamodule.models import DemoForecaster
from xr_datamodule.stitch import BLENDS, DEFAULT_BLEND, window_taper

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


@pytest.mark.parametrize("blend", BLENDS)
def test_overlapping_windows_are_blended_by_their_tapers(small_ds, blend):
    dm = XarrayDataModule(small_ds, **CONFIG)
    n = len(dm.indices["predict"])
    shape = (n, *dm.target_shape)
    predictions = np.broadcast_to(np.arange(n, dtype=float).reshape(-1, 1, 1, 1, 1), shape)
    grid = dm.to_xarray([predictions[:4], predictions[4:]], blend=blend)
    # Brute force: every position gets the taper-weighted mean of the sample numbers whose
    # window covers it (the taper flat along time).
    starts = dm.indices["predict"].starts(np.arange(n)) + np.asarray(dm.geometry.target_offset)
    dims, size = dm.geometry.dims, dm.geometry.target_size
    taper = window_taper(size, dims, "time", blend)
    lower = np.array([dm.split_bounds["predict"][dim][0] for dim in dims])  # the grid's origin
    totals, weights, counts = {}, {}, {}
    for sample, start in enumerate(starts):
        for offset in np.ndindex(*size):
            key = tuple(int(s + o - lo) for s, o, lo in zip(start, offset, lower, strict=True))
            totals[key] = totals.get(key, 0.0) + taper[offset] * sample
            weights[key] = weights.get(key, 0.0) + taper[offset]
            counts[key] = counts.get(key, 0) + 1
    b = grid.b.transpose(*dims).values
    for key, total in totals.items():
        assert b[key] == pytest.approx(total / weights[key])
    assert max(counts.values()) > 1  # windows really overlap along lat
    assert np.isnan(b).sum() == b.size - len(totals)


def test_the_taper_is_highest_in_the_middle_flat_along_time_and_never_zero():
    for blend in ("cosine", "gaussian"):
        taper = window_taper((3, 16, 9), ("time", "lat", "lon"), "time", blend)
        assert (taper > 0).all()
        np.testing.assert_array_equal(taper[0], taper[2])  # never along time
        assert taper[0, 8, 4] == taper.max() and taper[0, 0, 0] == taper.min()
    assert (window_taper((4, 6), ("lat", "lon"), blend="mean") == 1).all()
    with pytest.raises(ValueError, match="blend must be one of"):
        window_taper((4,), ("lat",), blend="hann")
    with pytest.raises(ValueError, match="blend_width must be in"):
        window_taper((4,), ("lat",), blend="cosine", width=0.8)


def patches(blend_field: xr.Dataset) -> XarrayDataModule:
    """16x16 patches overlapping by half along both spatial dims, one step, over a field."""
    return XarrayDataModule(
        blend_field,
        input_vars=["t"],
        input_dims={"time": 1, "lat": 16, "lon": 16},
        input_overlap={"lat": 8, "lon": 8},
        splits={"predict": 1.0},
        dtype="float64",
        batch_size=64,
    )


@pytest.fixture
def blend_field() -> xr.Dataset:
    rng = np.random.default_rng(3)
    lat, lon = np.linspace(-60, 60, 40), np.linspace(0, 357.5, 72)
    smooth = np.cos(np.radians(lat))[:, None] * np.sin(np.radians(2 * lon))[None, :]
    values = 280 + 10 * smooth[None] + rng.normal(0, 0.5, (3, 40, 72))
    return xr.Dataset(
        {"t": (("time", "lat", "lon"), values)},
        coords={"time": np.arange(3), "lat": lat, "lon": lon},
    )


@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("width", [0.1, 0.25, 0.5])
def test_a_constant_prediction_comes_back_constant(blend_field, blend, width):
    dm = patches(blend_field)
    n = len(dm.indices["predict"])
    constant = np.full((n, *dm.target_shape), 7.25)
    grid = dm.to_xarray([constant], blend=blend, blend_width=width)
    covered = grid.t.notnull()
    assert covered.sum() > 0.9 * grid.t.size
    np.testing.assert_allclose(grid.t.values[covered.values], 7.25, rtol=0, atol=1e-12)


def test_tapering_takes_window_edge_errors_out_of_the_field(blend_field):
    # A patch model is worst at its edges: each window's prediction is the truth plus an
    # error that grows toward the window's edges (its sign random per window).
    dm = patches(blend_field)
    truth = np.concatenate([y.numpy() for _, y in dm.predict_dataloader()])
    rng = np.random.default_rng(0)
    x = (np.arange(16) - 7.5) / 8  # -0.94 .. 0.94 across a window
    edge = np.maximum(np.abs(x)[:, None], np.abs(x)[None, :]) ** 4  # 0 inside, ~0.8 at edges
    signs = rng.choice([-1.0, 1.0], size=(len(truth), 1, 1, 1, 1))
    predicted = truth + 3.0 * signs * edge
    errors, inside = {}, {}
    for blend in BLENDS:
        grid = dm.to_xarray([predicted], blend=blend)
        error = (grid.t - blend_field.t.sel(time=grid.time)).values
        errors[blend] = float(np.sqrt(np.nanmean(error**2)))
        # Away from the domain's border (8 points), where every point has two windows or
        # more along both dims: the seams between windows.
        inside[blend] = float(np.sqrt(np.nanmean(error[:, 8:-8, 8:-8] ** 2)))
    report = "; ".join(
        f"{blend}: {errors[blend]:.3f} K (between windows {inside[blend]:.3f} K)"
        for blend in BLENDS
    )
    message = f"RMSE of the blended field: {report}"
    for taper in ("cosine", "gaussian"):
        assert inside[taper] < 0.5 * inside["mean"], message
        assert errors[taper] < errors["mean"], message
    assert min(inside, key=inside.get) == DEFAULT_BLEND, f"the default is not the best: {report}"


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
