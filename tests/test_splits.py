"""splits: label ranges and fractions become position bounds, checked against ``.sel``."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from xr_datamodule.splits import check_splits, resolve_splits


def hourly(n: int = 48) -> xr.Dataset:
    time = pd.date_range("2020-01-01", periods=n, freq="h")
    lat = np.linspace(60, 30, 8)  # north to south, as reanalyses store it
    return xr.Dataset({"t": (("time", "lat"), np.zeros((n, 8)))}, coords={"time": time, "lat": lat})


def test_label_ranges_are_the_positions_sel_selects():
    ds = hourly()
    splits = {
        "train": {"time": ["2020-01-01", "2020-01-01T23"]},
        "val": {"time": ["2020-01-02T00", "2020-01-02T11"], "lat": [55, 40]},
    }
    bounds = resolve_splits(splits, "time", ds, ("time", "lat"))
    for name, spec in splits.items():
        selected = ds.sel({dim: slice(*labels) for dim, labels in spec.items()})
        for dim in ("time", "lat"):
            lo, hi = bounds[name][dim]
            np.testing.assert_array_equal(ds[dim].values[lo:hi], selected[dim].values)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(20, 200),
    parts=st.lists(st.integers(1, 10), min_size=1, max_size=3),
)
def test_fractions_tile_the_split_dim_in_order_without_overlap(n, parts):
    total = sum(parts) + 1  # leave some of the dim out
    names = ["train", "val", "test"][: len(parts)]
    splits = {name: part / total for name, part in zip(names, parts, strict=True)}
    bounds = resolve_splits(splits, "time", hourly(n), ("time", "lat"))
    edges = [bounds[name]["time"] for name in names]
    assert edges[0][0] == 0
    for (_, hi), (lo, _) in itertools.pairwise(edges):
        assert hi == lo  # consecutive, no overlap
    for name in names:
        assert bounds[name]["lat"] == (0, 8)  # other dims whole


def test_overlapping_splits_are_refused_naming_both():
    splits = {
        "train": {"time": ["2020-01-01", "2020-01-02T05"]},
        "val": {"time": ["2020-01-02", "2020-01-02T12"]},
    }
    with pytest.raises(ValueError, match=r"train.*val|val.*train"):
        resolve_splits(splits, "time", hourly(), ("time", "lat"))


def test_a_range_that_selects_nothing_names_the_label_order():
    splits = {"train": {"lat": [30, 60]}}  # ascending labels on a descending axis
    with pytest.raises(ValueError, match="selects no data along 'lat'"):
        resolve_splits(splits, "time", hourly(), ("time", "lat"))


def test_a_split_along_a_dim_that_is_not_windowed_is_refused():
    with pytest.raises(KeyError, match="'level' is not a windowed dim"):
        resolve_splits({"train": {"level": [500, 850]}}, "time", hourly(), ("time", "lat"))


@pytest.mark.parametrize(
    "splits, message",
    [
        ({"train": 0.8, "val": 0.3}, "sum"),
        ({"training": 0.8}, "training"),
    ],
)
def test_invalid_split_settings_are_refused(splits, message):
    with pytest.raises((ValueError, KeyError), match=message):
        check_splits(splits)
