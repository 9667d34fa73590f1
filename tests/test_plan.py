"""layout and plan: the first two stages, against brute force over the data's labels."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from xr_datamodule.layout import source_layout
from xr_datamodule.plan import plan_samples, window_geometry
from xr_datamodule.spec import DataSpec


@pytest.fixture
def data():
    rng = np.random.default_rng(1)
    time = pd.date_range("2021-01-01", periods=30, freq="6h")
    ds = xr.Dataset(
        {
            "t": (("lat", "time", "lon"), rng.normal(size=(6, 30, 8))),
            "z": (("time", "level", "lat", "lon"), rng.normal(size=(30, 2, 6, 8))),
            "lsm": (("lat", "lon"), (rng.random((6, 8)) > 0.5).astype(float)),
        },
        coords={"time": time, "level": [500, 850], "lat": np.arange(6.0), "lon": np.arange(8.0)},
    )
    return ds.drop_isel(time=[13])  # one missing step: a gap


def spec_of(ds, **extra):
    settings = dict(
        input_vars=["z", "lsm", "t"],
        target_vars=["t"],
        input_dims={"time": 2, "lat": 6, "lon": 8},
        target_dims={"time": 1, "lat": 6, "lon": 8},
        target_offset={"time": 2},
        input_overlap={"time": 1},
        splits={"train": 0.7, "val": 0.3},
    )
    return DataSpec(ds, **{**settings, **extra})


def test_the_layout_orders_dims_by_the_first_time_varying_variable(data):
    layout = source_layout(spec_of(data))
    assert layout.window_dims == ("time", "lat", "lon")  # z's order, not t's
    assert layout.input_order == ["z", "t", "lsm"]  # time-varying, then static
    assert layout.reader_vars == ["z", "t"]
    assert layout.n_channels(["z", "t"]) == 3
    assert layout.reader_channels(["t"]).tolist() == [2]
    assert layout.time_dim == "time"
    labels = layout.window_labels["time"]
    assert labels.tolist() == data.time.values.astype("datetime64[ns]").astype(np.int64).tolist()


def test_the_plan_keeps_exactly_the_windows_inside_each_split_that_cross_no_gap(data):
    spec = spec_of(data)
    layout = source_layout(spec)
    geometry = window_geometry(spec, layout)
    plan = plan_samples(spec, layout, geometry)
    step = np.timedelta64(6, "h")
    times = data.time.values
    for name, index in plan.indices.items():
        lo, hi = plan.split_bounds[name]["time"]
        expected = [
            start
            for start in range(lo, hi - 3 + 1)  # input 2 steps + target at offset 2
            if (np.diff(times[start : start + 3]) == step).all()
        ]
        starts = index.starts(np.arange(len(index)))[:, 0].tolist()
        assert starts == expected
        assert plan.gap_samples.get(name, 0) == len(range(lo, hi - 2)) - len(expected)
    assert sum(plan.gap_samples.values()) > 0


def test_nan_drop_leaves_out_exactly_the_windows_holding_one(data):
    data = data.copy(deep=True)
    data["t"][2, 5, 3] = np.nan  # lat 2, time 5, lon 3
    spec = spec_of(data, nan_policy="drop", gaps="allow", input_overlap={"time": 1})
    layout = source_layout(spec)
    plan = plan_samples(spec, layout, window_geometry(spec, layout))
    train = plan.indices["train"]
    starts = train.starts(np.arange(len(train)))[:, 0]
    lo, hi = plan.split_bounds["train"]["time"]
    # t is in X (steps s, s+1) and in y (step s+2): windows starting at 3, 4, 5 see it.
    assert sorted(set(range(lo, hi - 2)) - set(starts.tolist())) == [3, 4, 5]
    assert plan.dropped_samples["train"] == 3


@pytest.mark.parametrize(
    "extra, error, message",
    [
        ({"input_dims": {"time": 40, "lat": 6, "lon": 8}}, ValueError, "larger than the dim"),
        ({"target_offset": {"time": 29}}, ValueError, "lies outside the data"),
        ({"time_step": {"lon": 1.0, "depth": 2}}, KeyError, "depth"),
    ],
)
def test_impossible_windows_are_refused_before_anything_is_read(data, extra, error, message):
    spec = spec_of(data, **extra)
    layout = source_layout(spec)
    with pytest.raises(error, match=message):
        plan_samples(spec, layout, window_geometry(spec, layout))


def test_every_sample_of_a_split_is_a_point_of_its_start_grid(data):
    patches = {"time": 2, "lat": 6, "lon": 4}
    spec = spec_of(
        data,
        gaps="allow",
        input_dims=patches,
        input_overlap={"time": 1, "lon": 2},  # strides 1 and 2
        target_dims={**patches, "time": 1},
    )
    layout = source_layout(spec)
    plan = plan_samples(spec, layout, window_geometry(spec, layout))
    index = plan.indices["val"]
    lo, hi = plan.split_bounds["val"]["time"]
    grid = itertools.product(range(lo, hi - 2), [0], [0, 2, 4])
    assert [tuple(s) for s in index.starts(np.arange(len(index))).tolist()] == list(grid)


def test_a_forecast_that_skips_start_times_says_so_once(caplog):
    from xr_datamodule import XarrayDataModule

    forecast = dict(
        input_vars=["t2m"],
        input_dims={"time": 2, "lat": 32, "lon": 32},
        target_dims={"time": 1, "lat": 32, "lon": 32},
        target_offset={"time": 2},
    )
    with caplog.at_level(logging.WARNING, logger="xr_datamodule.plan"):
        dm = XarrayDataModule("synthetic://weather", **forecast)
        dm.setup("fit")
        text = str(dm)
    notices = [r.getMessage() for r in caplog.records if "forecast start times" in r.getMessage()]
    assert notices == [
        "windows start every 2 steps along 'time' (input_dims 2, input_overlap 0): only 1 in 2 "
        "forecast start times is a sample; input_overlap={'time': 1} uses every one"
    ]
    assert "time 2 (stride 2: 1 in 2 start times" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xr_datamodule.plan"):
        every = XarrayDataModule("synthetic://weather", input_overlap={"time": 1}, **forecast)
        every.setup("fit")
        assert "start times" not in str(every)
    assert not caplog.records
    skipping, all_starts = (m.indices["train"].axis_starts[0] for m in (dm, every))
    assert set(np.diff(skipping)) == {2} and set(np.diff(all_starts)) == {1}
    assert set(skipping) < set(all_starts)
