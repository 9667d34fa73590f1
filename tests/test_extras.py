"""Static fields, forcings, label selection and area weights against brute-force references."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from tests.conftest import reference_windows
from xr_datamodule import XarrayDataModule, make_weather
from xr_datamodule.forcings import cos_solar_zenith, insolation

WINDOWS = dict(
    input_dims={"time": 3, "lat": 4, "lon": 5},
    input_overlap={"time": 1, "lat": 2},
    target_dims={"time": 2, "lat": 4, "lon": 5},
    target_offset={"time": 3},
    splits={"train": 0.6, "val": 0.4},
    batch_size=5,
    dtype="float64",
)


def read_in_loader_order(dm):
    """Validation X, y and sample numbers in the loader's order (out of core with workers,
    each worker reads its own run of batches)."""
    loader = dm.val_dataloader()
    ids = np.concatenate([np.asarray(batch) for batch in loader.batch_sampler])
    pairs = [(x.numpy(), y.numpy()) for x, y in loader]
    return np.concatenate([x for x, _ in pairs]), np.concatenate([y for _, y in pairs]), ids


def with_statics(ds: xr.Dataset) -> xr.Dataset:
    rng = np.random.default_rng(1)
    return ds.assign(
        orog=(("lat", "lon"), rng.standard_normal((12, 10))),
        soil=(("depth", "lon", "lat"), rng.standard_normal((2, 10, 12))),
    ).assign_coords(depth=[0.1, 1.0])


@pytest.mark.parametrize(("load", "workers"), [(True, 0), (False, 0), (False, 2)])
def test_static_fields_are_broadcast_along_time(small_ds, tmp_path, load, workers):
    ds = with_statics(small_ds)
    path = tmp_path / "statics.zarr"
    ds.chunk({"time": 7}).to_zarr(path)
    dm = XarrayDataModule(
        str(path),
        input_vars=["orog", "a", "soil", "c"],
        target_vars=["b", "orog"],
        load=load,
        num_workers=workers,
        **WINDOWS,
    )
    dm.setup("fit")
    assert dm.input_channel_names == [
        "a", "c[level=200]", "c[level=500]", "c[level=850]",
        "orog", "soil[depth=0.1]", "soil[depth=1.0]",
    ]  # fmt: skip
    assert dm.input_shape == (7, 3, 4, 5) and dm.target_shape == (2, 2, 4, 5)
    X, Y, ids = read_in_loader_order(dm)
    broadcast = ds.assign(
        {name: ds[name].broadcast_like(ds.a.isel(lat=0, lon=0)) for name in ("orog", "soil")}
    )
    starts = dm.indices["val"].starts(ids)
    dims = dm.window_dims
    expected = reference_windows(broadcast, ["a", "c", "orog", "soil"], dims, starts, (3, 4, 5))
    np.testing.assert_array_equal(X, expected)
    at = starts + np.asarray(dm.geometry.target_offset)
    expected = reference_windows(broadcast, ["b", "orog"], dims, at, (2, 4, 5))
    np.testing.assert_array_equal(Y, expected)


def test_static_fields_are_normalised_with_the_training_split(small_ds):
    ds = with_statics(small_ds)
    dm = XarrayDataModule(ds, input_vars=["a", "orog"], normalize="zscore", **WINDOWS)
    mean, std = (np.asarray(dm.statistics.mean["orog"]), np.asarray(dm.statistics.std["orog"]))
    assert mean[0] == pytest.approx(float(ds.orog.mean()))
    assert std[0] == pytest.approx(float(ds.orog.std()))
    X = next(iter(dm.val_dataloader()))[0].numpy()
    start = dm.indices["val"].starts([0])[0]
    raw = ds.orog.isel(lat=slice(start[1], start[1] + 4), lon=slice(start[2], start[2] + 5))
    np.testing.assert_allclose(X[0, 1, 0], (raw.values - mean[0]) / std[0])


def test_forcings_equal_a_direct_formula():
    source = make_weather(n_time=72)
    forcings = [
        "cos_latitude", "sin_longitude", "cos_julian_day", "sin_julian_day",
        "cos_local_time", "sin_local_time", "cos_solar_zenith_angle", "insolation",
    ]  # fmt: skip
    dm = XarrayDataModule(
        source,
        input_vars=["t2m"],
        input_dims={"time": 2, "lat": 8, "lon": 8},
        input_overlap={"time": 1},
        splits={"train": 0.5, "val": 0.5},
        forcings=forcings,
        dtype="float64",
    )
    assert dm.input_channel_names == ["t2m", *forcings]
    X = np.concatenate([x.numpy() for x, _ in dm.val_dataloader()])
    starts = dm.indices["val"].starts(np.arange(len(X)))
    for sample in (0, len(X) // 2, len(X) - 1):
        t0, y0, x0 = starts[sample]
        for step in range(2):
            when = pd.Timestamp(source.time.values[t0 + step])
            day = when.day_of_year - 1 + when.hour / 24
            days = 366 if when.is_leap_year else 365
            for row in range(8):
                for column in range(8):
                    lat = float(source.lat[y0 + row])
                    lon = float(source.lon[x0 + column])
                    local = (when.hour + lon / 15) % 24
                    direct = [
                        np.cos(np.radians(lat)),
                        np.sin(np.radians(lon)),
                        np.cos(2 * np.pi * day / days),
                        np.sin(2 * np.pi * day / days),
                        np.cos(2 * np.pi * local / 24),
                        np.sin(2 * np.pi * local / 24),
                    ]
                    got = X[sample, 1:7, step, row, column]
                    np.testing.assert_allclose(got, direct, atol=1e-12)
    # The solar channels against the functions applied point by point.
    t = source.time.values[starts[0, 0]]
    lat, lon = float(source.lat[starts[0, 1]]), float(source.lon[starts[0, 2]])
    point = (np.array([lat]), np.array([lon]), np.array([t]))
    assert X[0, 7, 0, 0, 0] == pytest.approx(float(cos_solar_zenith(*point)[0]))
    assert X[0, 8, 0, 0, 0] == pytest.approx(float(insolation(*point)[0]))


def test_solar_geometry_by_hand():
    def at(lat, lon, when):
        return float(
            cos_solar_zenith(np.array([lat]), np.array([lon]), np.array([when], "datetime64[ns]"))[
                0
            ]
        )

    # Summer solstice at the North Pole: the sun stands at the declination, ~23.44 degrees.
    assert at(90.0, 0.0, "2020-06-20T12:00") == pytest.approx(np.sin(np.radians(23.44)), abs=2e-3)
    # March equinox, noon UTC on the equator at Greenwich: the sun is ~1.9 degrees from the
    # zenith (equation of time -7.5 minutes, declination ~0).
    assert at(0.0, 0.0, "2020-03-20T12:00") == pytest.approx(np.cos(np.radians(1.9)), abs=1e-3)
    # Midnight there: below the horizon, no insolation.
    assert at(0.0, 0.0, "2020-03-20T00:00") < -0.99
    night = insolation(np.array([0.0]), np.array([0.0]), np.array(["2020-03-20"], "datetime64[ns]"))
    assert night[0] == 0.0
    # Early January the Earth is nearest the Sun: 3.4 % more than the solar constant.
    january = insolation(
        np.array([-23.0]), np.array([0.0]), np.array(["2020-01-03T12:00"], "datetime64[ns]")
    )
    assert 1.02 < january[0] < 1.04


@pytest.mark.parametrize("load", [True, False])
def test_selected_levels_are_the_channels(small_ds, zarr_path, load):
    dm = XarrayDataModule(
        str(zarr_path),
        input_vars=["a", "c"],
        target_vars=["b"],
        select={"level": [850, 200]},
        load=load,
        **WINDOWS,
    )
    assert dm.input_channel_names == ["a", "c[level=850]", "c[level=200]"]
    X, _, ids = read_in_loader_order(dm)
    starts = dm.indices["val"].starts(ids)
    chosen = small_ds.sel(level=[850, 200])
    expected = reference_windows(chosen, ["a", "c"], dm.window_dims, starts, (3, 4, 5))
    np.testing.assert_array_equal(X, expected)


def test_a_label_range_selects_before_windowing(small_ds):
    dm = XarrayDataModule(
        small_ds,
        input_vars=["a"],
        select={"time": {"start": "2020-01-05", "stop": "2020-01-24"}},
        **WINDOWS,
    )
    assert dm.source.sizes["time"] == 20
    assert str(dm.source.time.values[0])[:10] == "2020-01-05"


def test_area_weights_for_global_targets():
    source = make_weather(n_time=24)
    dm = XarrayDataModule(source, input_vars=["t2m"], input_dims={"time": 1, "lat": 32, "lon": 64})
    weights = dm.area_weights
    assert tuple(weights.shape) == (1, 1, 1, 32, 1)
    expected = np.cos(np.radians(source.lat.values))
    np.testing.assert_allclose(weights.numpy().ravel(), expected / expected.mean(), rtol=1e-6)
    patches = XarrayDataModule(
        source, input_vars=["t2m"], input_dims={"time": 1, "lat": 16, "lon": 16}
    )
    with pytest.raises(ValueError, match=r"area_weights: the target window spans 16 of the 32"):
        patches.area_weights  # noqa: B018


@pytest.mark.parametrize("load", [True, False])
def test_extras_sit_between_the_variables_and_the_missing_value_mask(small_ds, load):
    ds = with_statics(small_ds)
    ds["a"][10:14, 2, 3] = np.nan
    dm = XarrayDataModule(
        ds,
        input_vars=["a", "orog"],
        forcings=["cos_latitude"],
        nan_policy="fill",
        fill_value=-5.0,
        nan_mask=True,
        load=load,
        **WINDOWS,
    )
    dm.setup("fit")
    assert dm.input_channel_names == ["a", "orog", "cos_latitude", "nan_mask"]
    ids = np.arange(len(dm.datasets["train"]))
    X = dm.datasets["train"].__getitems__(ids).inputs
    starts = dm.indices["train"].starts(ids)
    orog = ds.orog.broadcast_like(ds.a.isel(lat=0, lon=0))
    raw = reference_windows(ds.assign(orog=orog), ["a", "orog"], dm.window_dims, starts, (3, 4, 5))
    cos_lat = np.cos(np.radians(ds.lat.values))[starts[:, 1, None] + np.arange(4)]
    np.testing.assert_array_equal(X[:, 0], np.where(np.isnan(raw[:, 0]), -5.0, raw[:, 0]))
    np.testing.assert_array_equal(X[:, 1], raw[:, 1])
    np.testing.assert_allclose(X[:, 2], np.broadcast_to(cos_lat[:, None, :, None], X[:, 2].shape))
    np.testing.assert_array_equal(X[:, 3], np.isnan(raw[:, 0]).astype(float))
    assert X[:, 3].any()


def test_patches_carry_their_own_latitude_weights_in_dict_batches():
    source = make_weather(n_time=24)
    global_weights = np.cos(np.radians(source.lat.values))
    global_weights /= global_weights.mean()
    patches = XarrayDataModule(
        source,
        input_vars=["t2m"],
        input_dims={"time": 1, "lat": 16, "lon": 16},
        batch_format="dict",
        batch_size=8,
    )
    patches.setup("fit")
    batch = next(iter(patches.val_dataloader()))
    weights = batch["target_area_weight"]
    assert tuple(weights.shape) == (8, 1, 1, 16, 1)  # broadcasts against y
    for k in range(8):
        lats = batch["target_lat"][k].numpy()
        rows = [np.flatnonzero(source.lat.values == lat)[0] for lat in lats]
        np.testing.assert_allclose(weights[k].numpy().ravel(), global_weights[rows], rtol=1e-6)
    loss = ((batch["y"] - 0) ** 2 * weights).mean()  # a latitude-weighted patch loss
    assert torch.isfinite(loss)
    full = XarrayDataModule(
        source, input_vars=["t2m"], input_dims={"time": 1, "lat": 32, "lon": 64}
    )
    np.testing.assert_allclose(
        full.area_weights.numpy().ravel(), global_weights, rtol=1e-6
    )  # the same weights as the whole-field ones
