"""Each bad input raises a clear error at construction or in ``setup``, naming the culprit."""

from __future__ import annotations

import numpy as np
import pytest

from xr_datamodule import XarrayDataModule

BASE = dict(input_vars=["a"], input_dims={"time": 4, "lat": 3})


def build(ds, **overrides):
    """Construct and set up: every error must surface here, never inside a worker."""
    dm = XarrayDataModule(ds, **{**BASE, **overrides})
    dm.setup()
    return dm


def test_valid_base_config_builds(small_ds):
    assert build(small_ds).split_sizes["train"] > 0


@pytest.mark.parametrize(
    ("overrides", "error", "pattern"),
    [
        # unknown variable: the name and the valid choices
        (
            dict(input_vars=["nope"]),
            KeyError,
            r"'nope' is not in the data\. Valid: \('a', 'b', 'c'\)",
        ),
        (dict(target_vars=["zz"]), KeyError, r"target_vars: variable 'zz'"),
        # unknown dims
        (
            dict(input_dims={"time": 4, "height": 3}),
            KeyError,
            r"dimension 'height' does not exist\. Expected one or more of",
        ),
        (
            dict(target_dims={"time": 1, "level": 3}),  # a dim of the data, not windowed
            KeyError,
            r"target_dims must have the same dims",
        ),
        (
            dict(target_offset={"level": 1}),
            KeyError,
            r"target_offset: dim 'level' is not in input_dims",
        ),
        (
            dict(input_overlap={"lon": 1}),
            KeyError,
            r"input_overlap: dim 'lon' is not in input_dims",
        ),
        (dict(splits={"train": {"lon": [0, 3]}}), KeyError, r"dim 'lon' is not a windowed dim"),
        (dict(splits={"train": 0.5}, split_dim="level"), KeyError, r"split_dim: 'level'"),
        # window larger than the dim or than a split
        (
            dict(input_dims={"time": 41, "lat": 3}),
            ValueError,
            r"input_dims\['time'\] = 41 is larger than the dim 'time' \(40\)",
        ),
        (
            dict(splits={"train": 0.9, "val": 0.05}),
            ValueError,
            r"split 'val' has no full window: it spans 2 positions along 'time' "
            r"but one sample needs 4",
        ),
        # overlap >= window
        (
            dict(input_overlap={"time": 4}),
            ValueError,
            r"input_overlap\['time'\] = 4 must be smaller",
        ),
        # non-integer or non-positive sizes
        (
            dict(input_dims={"time": 2.5, "lat": 3}),
            TypeError,
            r"input_dims\['time'\] must be an integer",
        ),
        (
            dict(input_dims={"time": True, "lat": 3}),
            TypeError,
            r"input_dims\['time'\] must be an integer",
        ),
        (
            dict(input_dims={"time": 0, "lat": 3}),
            ValueError,
            r"input_dims\['time'\] must be positive",
        ),
        (
            dict(target_dims={"time": -1, "lat": 3}),
            ValueError,
            r"target_dims\['time'\] must be positive",
        ),
        (dict(input_overlap={"time": -1}), ValueError, r"input_overlap\['time'\] must be >= 0"),
        # overlapping splits
        (
            dict(
                splits={
                    "train": {"time": ["2020-01-01", "2020-01-20"]},
                    "val": {"time": ["2020-01-20", "2020-02-09"]},
                }
            ),
            ValueError,
            r"splits 'train' and 'val' overlap: train covers time 2020-01-01 00:00:00 … "
            r"2020-01-20 00:00:00 \(positions 0-19\), val covers time 2020-01-20",
        ),
        # a split with no full window (label range too short)
        (
            dict(
                splits={
                    "train": {"time": ["2020-01-01", "2020-01-30"]},
                    "test": {"time": ["2020-01-31", "2020-02-02"]},
                }
            ),
            ValueError,
            r"split 'test' has no full window: it spans 3 positions",
        ),
        # a split that selects nothing (labels in the wrong order for a descending coordinate)
        (
            dict(splits={"train": {"lat": [30, 60]}}),
            ValueError,
            r"splits\['train'\] selects no data along 'lat'.*from 60\.0 to 30\.0",
        ),
        # a target window outside the data
        (dict(target_offset={"time": 40}), ValueError, r"target window .* lies outside the data"),
        # non-positive batch size
        (dict(batch_size=0), ValueError, r"batch_size must be a positive integer, got 0"),
        (dict(batch_size=-3), ValueError, r"batch_size must be a positive integer"),
        (dict(batch_size=2.0), TypeError, r"batch_size must be a positive integer"),
        # split structure
        (
            dict(splits={"training": 0.5}),
            ValueError,
            r"unknown split 'training'\. Valid: \('train', 'val', 'test', 'predict'\)",
        ),
        (dict(splits={"train": 0.8, "val": 0.3}), ValueError, r"fractions sum to 1\.1, above 1"),
        (
            dict(splits={"train": 0.8, "val": {"time": [None, None]}}),
            ValueError,
            r"either fractions",
        ),
        (dict(splits={"train": {"time": ["2020-01-01"]}}), ValueError, r"must be \[start, stop\]"),
        # loader and dtype settings
        (
            dict(dtype="int8"),
            ValueError,
            r"dtype must be one of \('float16', 'float32', 'float64'\)",
        ),
        (
            dict(num_workers=0, prefetch_factor=4),
            ValueError,
            r"prefetch_factor needs num_workers > 0",
        ),
        (dict(multiprocessing_context="thread"), ValueError, r"multiprocessing_context must be"),
        (dict(num_workers=-1), ValueError, r"num_workers must be an integer >= 0"),
        (
            dict(shuffle="random"),
            ValueError,
            r"shuffle must be one of \('auto', 'chunks', 'full'\), got 'random'",
        ),
        (
            dict(shuffle_chunks=0),
            ValueError,
            r"shuffle_chunks must be a positive integer or 'auto'",
        ),
        (dict(shuffle_chunks="many"), TypeError, r"shuffle_chunks must be a positive integer or"),
        # variables given wrongly
        (dict(input_vars="a"), TypeError, r"input_vars must be a list of variable names"),
        (dict(input_vars=["a", "a"]), ValueError, r"listed more than once"),
    ],
)
def test_bad_input(small_ds, overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        build(small_ds, **overrides)


def test_non_numeric_variable(small_ds):
    ds = small_ds.assign(label=(("time", "lat", "lon"), np.full((40, 12, 10), "x")))
    with pytest.raises(TypeError, match=r"variable 'label' has dtype <U1, which is not numeric"):
        build(ds, input_vars=["a", "label"])


def test_variable_lacking_a_spatial_windowed_dim(small_ds):
    # Only the time dim may be missing (a static field); a meridional mean lacks latitude.
    ds = small_ds.assign(meridional=(("time", "lon"), np.zeros((40, 10))))
    with pytest.raises(
        ValueError,
        match=r"'meridional' .* lacks the windowed dim\(s\) \['lat'\]; only 'time' may be",
    ):
        build(ds, input_vars=["a", "meridional"])


def test_only_static_variables(small_ds):
    ds = small_ds.assign(orography=(("lat", "lon"), np.zeros((12, 10))))
    with pytest.raises(ValueError, match=r"input_vars: \['orography'\] are all static fields"):
        build(ds, input_vars=["orography"], target_vars=["orography"])  # one message for all
    with pytest.raises(ValueError, match=r"input_vars: \['orography'\] are all static fields"):
        build(ds, input_vars=["orography"], target_vars=["a"])
    with pytest.raises(ValueError, match=r"target_vars: \['orography'\] are all static"):
        build(ds, input_vars=["a"], target_vars=["orography"])


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        (dict(forcings=["cos_lat"]), ValueError, r"forcings: unknown forcing 'cos_lat'. Valid:"),
        (dict(forcings="insolation"), TypeError, r"forcings must be a list of forcing names"),
        (dict(select={"level": [200, 925]}), KeyError, r"select\['level'\]: \[925\] not in"),
        (dict(select={"height": [1]}), KeyError, r"select: dim 'height' is not in the data"),
        (dict(select={"level": []}), TypeError, r"select\['level'\] must be a label, a non-empty"),
        (dict(select={"lat": slice(0, 10, 2)}), ValueError, r"select\['lat'\]: a range takes no"),
    ],
)
def test_bad_forcings_and_selections(small_ds, settings, error, message):
    with pytest.raises(error, match=message):
        build(small_ds, **settings).setup()


def test_a_forcing_without_its_coordinate(small_ds):
    # Windows over time and a "x" dim: insolation needs latitude and longitude.
    ds = small_ds.rename({"lat": "y", "lon": "x"})
    with pytest.raises(ValueError, match=r"forcings: 'insolation' needs a latitude coordinate"):
        XarrayDataModule(
            ds, input_vars=["a"], input_dims={"time": 3, "y": 4, "x": 5}, forcings=["insolation"]
        ).setup()


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere.zarr"
    with pytest.raises(FileNotFoundError, match=r"nowhere\.zarr"):
        XarrayDataModule(str(missing), **BASE)
    with pytest.raises(FileNotFoundError, match=r"no file matches the pattern .*\*\.nc"):
        XarrayDataModule(str(tmp_path / "*.nc"), **BASE)


def test_unreadable_file_names_it(tmp_path):
    broken = tmp_path / "broken.nc"
    broken.write_bytes(b"this is not netCDF")
    dm = XarrayDataModule(str(broken), **BASE)
    with pytest.raises((OSError, ValueError), match=r"broken\.nc"):
        dm.setup()


def test_wrong_data_type():
    with pytest.raises(TypeError, match=r"data must be a path.*got list"):
        XarrayDataModule([1, 2, 3], **BASE)


def test_unknown_stage(small_ds):
    dm = XarrayDataModule(small_ds, **BASE)
    with pytest.raises(ValueError, match=r"unknown stage 'train'\. Valid: \('fit'"):
        dm.setup("train")


def test_misspelled_names_are_reported_at_construction_with_the_closest_valid_one(small_ds):
    with pytest.raises(KeyError, match=r"input_vars: variable 'aa' .* did you mean 'a'\?"):
        XarrayDataModule(small_ds, input_vars=["aa"], input_dims={"time": 2})
    # The unknown dim first: not "target_dims must have the same dims as input_dims".
    with pytest.raises(KeyError, match=r"input_dims: dimension 'latitude' .* did you mean 'lat'"):
        XarrayDataModule(
            small_ds,
            input_vars=["a"],
            input_dims={"time": 4, "latitude": 5, "lon": 5},
            target_dims={"time": 1, "lat": 5, "lon": 5},
        )
    with pytest.raises(KeyError, match=r"target_offset: dimension 'tim' .* did you mean 'time'"):
        XarrayDataModule(
            small_ds, input_vars=["a"], input_dims={"time": 2}, target_offset={"tim": 2}
        )
