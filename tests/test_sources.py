"""sources: opening, selecting, checking names, and the channel rule, against xarray."""

from __future__ import annotations

import os

import numpy as np
import pytest
import xarray as xr

from xr_datamodule.sources import (
    channel_layouts,
    check_store_tree,
    check_variables,
    is_remote,
    open_selected,
    select_labels,
    zarr_opener,
)


@pytest.fixture
def levels():
    rng = np.random.default_rng(0)
    return xr.Dataset(
        {
            "u": (("time", "level", "member", "lat"), rng.normal(size=(3, 2, 2, 4))),
            "flag": (("time", "lat"), np.array([["a"] * 4] * 3)),
        },
        coords={"level": [500, 850], "lat": [40.0, 30.0, 20.0, 10.0]},
    )


def test_channels_follow_the_variables_non_windowed_dims_in_c_order(levels):
    (layout,) = channel_layouts(levels, ["u"], ("time", "lat"))
    assert layout.n_channels == 4
    assert layout.channel_names(levels) == [
        "u[level=500,member=0]",
        "u[level=500,member=1]",
        "u[level=850,member=0]",
        "u[level=850,member=1]",
    ]
    # Channel c is the C-order flattening of the extra dims: the same as a reshape.
    stacked = levels.u.transpose("level", "member", "time", "lat").values.reshape(4, 3, 4)
    np.testing.assert_array_equal(stacked[2], levels.u.sel(level=850).isel(member=0).values)


def test_variables_are_checked_by_name_type_and_repetition(levels):
    with pytest.raises(KeyError, match=r"'v' is not in the data. Valid: \('u', 'flag'\)"):
        check_variables(levels, ["v"], "input_vars")
    with pytest.raises(TypeError, match="'flag' has dtype <U1, which is not numeric"):
        check_variables(levels, ["flag"], "input_vars")
    with pytest.raises(ValueError, match=r"\['u'\] listed more than once"):
        check_variables(levels, ["u", "u"], "target_vars")


def test_selected_labels_are_what_sel_gives(levels):
    chosen = select_labels(levels, {"level": [850], "lat": slice(35, 15)})
    expected = levels.sel(level=[850], lat=slice(35, 15))
    xr.testing.assert_identical(chosen, expected)
    with pytest.raises(KeyError, match=r"select\['level'\]: \[700\] not in the data"):
        select_labels(levels, {"level": [700]})
    with pytest.raises(ValueError, match="selects nothing"):
        select_labels(levels, {"lat": slice(15, 35)})  # ascending on a descending axis


def test_a_netcdf_file_opens_lazily_and_is_not_read_as_zarr(levels, tmp_path):
    path = tmp_path / "u.nc"
    levels[["u"]].to_netcdf(path)
    opened = open_selected(str(path), None, {"level": [500]})
    assert opened.u.sizes["level"] == 1
    np.testing.assert_array_equal(opened.u.values, levels.u.sel(level=[500]).values)
    assert zarr_opener(str(path), None, ["u"]) is None
    assert not is_remote(str(path)) and is_remote("s3://bucket/era5.zarr")


def test_an_untrusted_store_with_a_link_outside_is_refused(tmp_path):
    store = tmp_path / "store.zarr"
    store.mkdir()
    (tmp_path / "secret").write_text("x")
    os.symlink(tmp_path / "secret", store / "zarr.json")
    with pytest.raises(PermissionError, match=r"zarr.json. links to .*secret., outside the store"):
        check_store_tree(str(store))


@pytest.mark.parametrize(
    "select, expected",
    [
        ({"level": 850}, {"level": [850]}),  # one label: the dim stays, as size 1
        ({"level": [850, 500]}, {"level": [850, 500]}),
        ({"lat": slice(35, 15)}, {"lat": slice(35, 15)}),  # descending, as .sel takes it
        ({"lat": {"start": 35, "stop": 15}}, {"lat": slice(35, 15)}),  # the YAML form
    ],
)
def test_select_takes_what_sel_takes(levels, select, expected):
    from xr_datamodule.spec import DataSpec

    spec = DataSpec(levels, input_vars=["u"], input_dims={"time": 1}, select=select)
    xr.testing.assert_identical(select_labels(levels, spec.select), levels.sel(expected))
    with pytest.raises(ValueError, match="takes no step"):
        DataSpec(levels, input_vars=["u"], input_dims={"time": 1}, select={"lat": slice(0, 9, 2)})
