"""Missing values: drop windows with NaN (against brute force), name the first NaN, or fill."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tests.conftest import make_dataset, reference_windows
from xr_datamodule import XarrayDataModule

CONFIG = dict(
    input_vars=["a", "c"],
    target_vars=["b"],
    input_dims={"time": 3, "lat": 4, "lon": 5},
    input_overlap={"time": 1, "lat": 2, "lon": 2},
    target_dims={"time": 1, "lat": 4, "lon": 5},
    target_offset={"time": 3},
    splits={"train": 0.7, "test": 0.3},
    batch_size=8,
    dtype="float64",
)


@pytest.fixture
def holey():
    ds = make_dataset()
    ds["a"][5, 3, 4] = np.nan  # an input variable
    ds["c"][1, 2, 30, 7] = np.nan  # one level of the 3-channel variable (level, lon, time, lat)
    ds["b"][12, 0, 0] = np.nan  # the target variable
    return ds


def brute_force_keep(ds, dm, split):
    index = dm.indices[split]
    geometry = dm.geometry
    keep = []
    grid = itertools.product(*index.axis_starts)
    for starts in grid:
        windows = []
        for names, size, offset in (
            (["a", "c"], geometry.input_size, (0, 0, 0)),
            (["b"], geometry.target_size, geometry.target_offset),
        ):
            region = {
                d: slice(int(s + o), int(s + o + n))
                for d, s, o, n in zip(geometry.dims, starts, offset, size, strict=True)
            }
            windows += [bool(ds[name].isel(region).isnull().any()) for name in names]
        keep.append(tuple(int(s) for s in starts) if not any(windows) else None)
    return [k for k in keep if k is not None]


@pytest.mark.parametrize("backing", ["memory", "zarr"])
def test_drop_leaves_out_exactly_the_windows_with_nan(holey, tmp_path, backing):
    data = holey
    if backing == "zarr":
        path = tmp_path / "holey.zarr"
        holey.chunk({"time": 8}).to_zarr(path)
        data = str(path)
    dm = XarrayDataModule(data, **CONFIG, nan_policy="drop", load=backing == "memory")
    dm.setup()
    for split in ("train", "test"):
        expected = brute_force_keep(holey, dm, split)
        index = dm.indices[split]
        got = [tuple(row) for row in index.starts(np.arange(len(index))).tolist()]
        assert got == expected
        grid_size = int(np.prod(index.grid_shape))
        assert dm.dropped_samples[split] == grid_size - len(expected)
    assert dm.dropped_samples["train"] > 0 and dm.dropped_samples["test"] > 0
    # Batches hold no NaN, and a training epoch still has every kept sample exactly once.
    seen = 0
    for X, y in dm.train_dataloader():
        assert not X.isnan().any() and not y.isnan().any()
        seen += len(X)
    assert seen == len(dm.indices["train"])


def test_error_names_the_first_missing_value(holey):
    dm = XarrayDataModule(holey, **CONFIG, nan_policy="error")
    with pytest.raises(
        ValueError,
        match=r"variable 'a' has a missing value \(NaN\) at "
        r"time=2020-01-06.*lat=.*lon=4\.0; use nan_policy='drop'",
    ):
        dm.setup()


def test_fill_replaces_missing_values(holey):
    dm = XarrayDataModule(holey, **CONFIG, nan_policy="fill", fill_value=-99.0)
    dm.setup()
    batch = dm.datasets["train"].__getitems__(np.arange(len(dm.datasets["train"])))
    assert not np.isnan(batch.inputs).any()
    assert (batch.inputs == -99.0).sum() > 0
    normalised = XarrayDataModule(holey, **CONFIG, nan_policy="fill", normalize="zscore")
    normalised.setup()
    batch = normalised.datasets["train"].__getitems__(np.arange(8))
    assert not np.isnan(batch.inputs).any()


def test_no_policy_lets_nan_through_and_bad_policy_is_refused(holey):
    dm = XarrayDataModule(holey, **CONFIG)
    dm.setup()
    batch = dm.datasets["train"].__getitems__(np.arange(len(dm.datasets["train"])))
    assert np.isnan(batch.inputs).any()
    with pytest.raises(ValueError, match=r"nan_policy must be one of \(None, 'error', 'drop'"):
        XarrayDataModule(holey, **CONFIG, nan_policy="skip")


@pytest.mark.parametrize("load", [True, False])
def test_mask_channel_marks_filled_values(holey, load):
    dm = XarrayDataModule(holey, **CONFIG, nan_policy="fill", nan_mask=True, load=load)
    assert dm.input_shape[0] == 1 + 3 + 1  # a, c's three levels, the mask
    assert dm.input_channel_names[-1] == "nan_mask"
    dm.setup()
    ids = np.arange(len(dm.datasets["train"]))
    batch = dm.datasets["train"].__getitems__(ids)
    starts = dm.indices["train"].starts(ids)
    raw = reference_windows(holey, ["a", "c"], dm.window_dims, starts, dm.geometry.input_size)
    expected_mask = np.isnan(raw).any(axis=1)
    np.testing.assert_array_equal(batch.inputs[:, -1], expected_mask.astype(float))
    assert expected_mask.any()
    np.testing.assert_array_equal(batch.inputs[:, :-1], np.where(np.isnan(raw), 0.0, raw))
    with pytest.raises(ValueError, match=r"nan_mask=True needs nan_policy='fill'"):
        XarrayDataModule(holey, **CONFIG, nan_mask=True)


def test_drop_refuses_a_split_left_without_windows(holey):
    holey["b"][28:, :, :] = np.nan  # every target of the test split (times 28 and later)
    dm = XarrayDataModule(holey, **CONFIG, nan_policy="drop")
    with pytest.raises(
        ValueError,
        match=r"split 'test': every one of its \d+ windows holds a "
        r"missing value",
    ):
        dm.setup()
