"""What the datamodule says it will feed a model: print, repr, the notebook view, names."""

from __future__ import annotations

import numpy as np

from xr_datamodule import XarrayDataModule

SETTINGS = dict(input_dims={"time": 3, "lat": 4, "lon": 5}, splits={"train": 0.5, "val": 0.5})


def test_print_and_repr_give_the_summary(small_ds):
    dm = XarrayDataModule(small_ds, input_vars=["a", "c"], target_vars=["b"], **SETTINGS)
    text = str(dm)
    assert text == repr(dm)
    assert text.splitlines()[0] == "XarrayDataModule: xr.Dataset (in memory)"
    assert "  X: a, c -> (4, 3, 4, 5)" in text and "  y: b -> (1, 3, 4, 5)" in text
    assert "  train: time 2020-01-01 00:00:00 … 2020-01-20 00:00:00 (" in text
    html = dm._repr_html_()
    assert "<table>" in html and "a, c → (4, 3, 4, 5)" in html


def test_a_broken_configuration_is_shown_not_raised(small_ds):
    # What only setup can find (names are checked at construction): a window too long.
    dm = XarrayDataModule(small_ds, input_vars=["a"], **{**SETTINGS, "input_dims": {"time": 99}})
    assert "not usable yet" in str(dm) and "input_dims['time'] = 99 is larger" in str(dm)


def test_channel_names_follow_the_transform(small_ds):
    def wind(ds):
        return ds.assign(speed=np.hypot(ds.a, ds.b)).drop_vars("b")

    dm = XarrayDataModule(
        small_ds, input_vars=["a", "b", "c"], target_vars=["b"], transform=wind, **SETTINGS
    )
    names = dm.input_channel_names
    assert names == ["a", "c[level=200]", "c[level=500]", "c[level=850]", "speed"]
    assert len(names) == dm.input_shape[0]
    assert "  X: a, c, speed -> (5, 3, 4, 5)" in str(dm)


def test_the_summary_says_how_a_store_is_read_and_where_the_statistics_came_from(zarr_path, caplog):
    settings = dict(input_vars=["a"], load=False, num_workers=0, **SETTINGS)
    fast = XarrayDataModule(str(zarr_path), normalize="zscore", **settings)
    assert "(out of core, by chunk)" in str(fast)  # nothing chosen before setup
    fast.setup("fit")
    text = str(fast)
    assert "(out of core, by chunk, through its zarr chunk files)" in text.splitlines()[0]
    assert "normalize zscore (statistics computed, cached in " in text
    again = XarrayDataModule(str(zarr_path), normalize="zscore", **settings)
    again.setup("fit")
    cached = str(fast).split("cached in ")[1].split(")")[0]
    assert f"normalize zscore (statistics from cache {cached})" in str(again)
    selected = XarrayDataModule(
        str(zarr_path), select={"lat": {"start": 90, "stop": 0}}, **settings
    )
    with caplog.at_level("INFO", logger="xr_datamodule.resources"):
        selected.setup("fit")
    reason = "a selection's positions are not the store's"
    assert f"through xarray ({reason})" in str(selected)
    assert f"reading through xarray: {reason}" in caplog.text
