"""The time axis is checked, never trusted: order, duplicates, gaps, against brute force."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from xr_datamodule import XarrayDataModule
from xr_datamodule.timeaxis import TimeAxisError, check_axis

WINDOWS = dict(
    input_dims={"time": 2, "lat": 4, "lon": 4},
    target_dims={"time": 2, "lat": 4, "lon": 4},
    target_offset={"time": 2},
    input_overlap={"time": 1},
)


def field(times, n_lat=4, n_lon=4, lat=None) -> xr.Dataset:
    rng = np.random.default_rng(0)
    lat = np.linspace(50, 40, n_lat) if lat is None else lat
    return xr.Dataset(
        {"t": (("time", "lat", "lon"), rng.normal(size=(len(times), n_lat, n_lon)))},
        coords={"time": times, "lat": lat, "lon": np.arange(n_lon) * 1.0},
    )


def brute_force_regular(dm: XarrayDataModule, split: str, step) -> set[int]:
    """Start positions of the full-grid samples whose span has only regular steps."""
    labels = dm.source.time.values
    extent = dm.geometry.extent[0]
    allowed = XarrayDataModule(dm.source, ["t"], splits=dm.spec.splits, gaps="allow", **WINDOWS)
    starts = allowed.indices[split].starts(np.arange(len(allowed.indices[split])))[:, 0]
    kept = set()
    for start in starts:
        span = labels[start : start + extent]
        steps = [span[i + 1] - span[i] for i in range(len(span) - 1)]
        if all(s == step for s in steps):
            kept.add(int(start))
    return kept


def starts_of(dm: XarrayDataModule, split: str) -> set[int]:
    index = dm.indices[split]
    return set(index.starts(np.arange(len(index)))[:, 0].tolist())


@pytest.mark.parametrize(
    ("freq", "calendar"), [("1h", None), ("6h", None), ("6h", "noleap"), ("1D", "noleap")]
)
def test_samples_across_a_gap_are_left_out_like_brute_force(freq, calendar):
    if calendar is None:
        times = pd.date_range("2021-02-26", periods=60, freq=freq)
        step = pd.Timedelta(freq).to_timedelta64()
    else:
        times = xr.date_range(
            "2021-02-26", periods=60, freq=freq, calendar=calendar, use_cftime=True
        )
        step = pd.Timedelta(freq).to_pytimedelta()
    times = times.delete([17, 18, 40])  # a missing stretch and a missing step
    splits = {"train": 0.6, "val": 0.2, "test": 0.2}
    dm = XarrayDataModule(field(times), ["t"], splits=splits, **WINDOWS)
    for split in splits:
        expected = brute_force_regular(dm, split, step)
        assert starts_of(dm, split) == expected
        assert dm.pipeline.plan.gap_samples.get(split, 0) == len(
            XarrayDataModule(field(times), ["t"], splits=splits, gaps="allow", **WINDOWS).indices[
                split
            ]
        ) - len(expected)
    assert sum(dm.pipeline.plan.gap_samples.values()) > 0
    text = str(dm)
    assert "left out at time gaps" in text and "irregular step" in text


@settings(max_examples=40, deadline=None)
@given(
    missing=st.sets(st.integers(1, 46), max_size=6),
    input_size=st.integers(1, 3),
    offset=st.integers(-1, 4),
    target_size=st.integers(1, 3),
    overlap=st.integers(0, 2),
)
def test_kept_samples_equal_brute_force_for_any_windows(
    missing, input_size, offset, target_size, overlap
):
    overlap = min(overlap, input_size - 1)
    times = pd.date_range("2020-01-01", periods=48, freq="h").delete(sorted(missing))
    ds = field(times, n_lat=1, n_lon=1)
    windows = dict(
        input_dims={"time": input_size},
        target_dims={"time": target_size},
        target_offset={"time": offset},
        input_overlap={"time": overlap},
    )
    try:
        allowed = XarrayDataModule(ds, ["t"], splits={"train": 1.0}, gaps="allow", **windows)
        every = allowed.indices["train"]
    except ValueError:
        return  # no full window: nothing to compare
    starts = every.starts(np.arange(len(every)))[:, 0]
    low = min(0, offset)
    extent = max(input_size, offset + target_size) - low
    hour = np.timedelta64(1, "h")
    expected = {
        int(s)
        for s in starts
        if (np.diff(ds.time.values[s + low : s + low + extent]) == hour).all()
    }
    try:
        dm = XarrayDataModule(ds, ["t"], splits={"train": 1.0}, **windows)
        found = starts_of(dm, "train")
    except TimeAxisError as error:
        assert not expected and "every one of its" in str(error)
        return
    assert found == expected


def axis_of(freq: str, calendar: str | None, periods: int = 40) -> np.ndarray:
    if calendar is None:
        return pd.date_range("2021-01-01", periods=periods, freq=freq).values
    times = xr.date_range(
        "2021-01-01", periods=periods, freq=freq, calendar=calendar, use_cftime=True
    )
    return np.asarray(times)


CALENDARS = [("1h", None), ("6h", None), ("6h", "noleap")]


@pytest.mark.parametrize(("freq", "calendar"), CALENDARS)
def test_a_duplicated_step_is_an_error_naming_the_labels_and_the_fix(freq, calendar):
    times = axis_of(freq, calendar)
    times = np.concatenate([times[:8], times[7:8], times[8:]])
    dm = XarrayDataModule(field(times), ["t"], **WINDOWS)
    with pytest.raises(TimeAxisError, match=r"repeats a label.*positions 7 and 8.*drop_duplicates"):
        dm.setup()
    assert "repeats a label" in repr(dm)  # the summary says what is wrong instead of raising


@pytest.mark.parametrize(("freq", "calendar"), CALENDARS)
def test_descending_time_is_an_error_with_the_fix(freq, calendar):
    dm = XarrayDataModule(field(axis_of(freq, calendar)[::-1]), ["t"], **WINDOWS)
    with pytest.raises(TimeAxisError, match=r"not increasing.*sortby\('time'\)"):
        dm.setup()


def test_descending_latitude_is_fine_but_a_repeated_one_is_not():
    times = pd.date_range("2021-01-01", periods=40, freq="6h")
    north_to_south = XarrayDataModule(
        field(times, lat=np.array([50.0, 49, 48, 47])), ["t"], **WINDOWS
    )
    north_to_south.setup()
    assert not north_to_south.pipeline.plan.gap_samples
    repeated = XarrayDataModule(field(times, lat=np.array([50.0, 49, 49, 47])), ["t"], **WINDOWS)
    with pytest.raises(TimeAxisError, match="'lat' repeats a label"):
        repeated.setup()


def test_gaps_error_and_allow():
    times = pd.date_range("2021-01-01", periods=30, freq="h").delete(12)
    with pytest.raises(TimeAxisError, match=r"2021-01-01T11 -> 2021-01-01T13.*regular step is 1 h"):
        XarrayDataModule(field(times), ["t"], gaps="error", **WINDOWS).setup()
    allowed = XarrayDataModule(field(times), ["t"], gaps="allow", **WINDOWS)
    dropped = XarrayDataModule(field(times), ["t"], **WINDOWS)
    assert sum(allowed.split_sizes.values()) > sum(dropped.split_sizes.values())
    with pytest.raises(ValueError, match="gaps must be one of"):
        XarrayDataModule(field(times), ["t"], gaps="skip", **WINDOWS)


def test_monthly_data_are_regular_in_calendar_months():
    months = pd.date_range("2000-01-01", periods=36, freq="MS")
    axis = check_axis("time", months.values)
    assert axis.step_text == "1 month" and axis.gap_after.size == 0
    gappy = check_axis("time", months.delete(5).values)
    assert gappy.gap_after.tolist() == [4]


def test_a_given_step_overrides_the_most_common_one():
    times = pd.date_range("2021-01-01", periods=30, freq="2h")
    axis = check_axis("time", times.values, step="1h")
    assert axis.gap_after.size == 29
    with pytest.raises(TimeAxisError, match="every one of its"):
        XarrayDataModule(field(times), ["t"], time_step="1h", **WINDOWS).setup()
    with pytest.raises(KeyError, match="time_step"):
        XarrayDataModule(field(times), ["t"], time_step={"height": 1}, **WINDOWS).setup()


def test_a_decade_of_hourly_steps_is_checked_without_a_loop():
    times = pd.date_range("2000-01-01", periods=87_600, freq="h").delete([1000, 50_000])
    axis = check_axis("time", times.values)
    assert axis.gap_after.tolist() == [999, 49_998]


def test_a_split_that_reaches_beyond_the_data_is_reported(caplog):
    times = pd.date_range("2021-01-01", periods=40, freq="6h")
    splits = {
        "train": {"time": ["2020-12-01", "2021-01-05"]},
        "val": {"time": ["2021-01-06", None]},
    }
    with caplog.at_level(logging.WARNING, logger="xr_datamodule.splits"):
        XarrayDataModule(field(times), ["t"], splits=splits, **WINDOWS).setup()
    assert "reaches beyond the data; used 2021-01-01 00:00:00 to 2021-01-05 18:00:00" in caplog.text


def test_a_time_dim_called_valid_time_is_the_time_dim():
    times = pd.date_range("2021-01-01", periods=20, freq="6h")
    ds = field(times).rename(time="valid_time")
    dm = XarrayDataModule(
        ds,
        ["t"],
        input_dims={"valid_time": 2, "lat": 4, "lon": 4},
        target_dims={"valid_time": 1, "lat": 4, "lon": 4},
        target_offset={"valid_time": 2},
        splits={"train": 0.6, "val": 0.4},
        split_dim="valid_time",
    )
    assert dm.pipeline.layout.time_dim == "valid_time"
    from xr_datamodule.callbacks import baseline_losses

    assert "persistence" in baseline_losses(dm, "val")
