"""Transforms per sample and per batch: the same channels for element-wise functions."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from xr_datamodule import XarrayDataModule

SETTINGS = dict(
    input_vars=["a", "b", "c"],
    target_vars=["b"],
    input_dims={"time": 3, "lat": 4, "lon": 5},
    input_overlap={"time": 1, "lat": 2},
    target_dims={"time": 1, "lat": 4, "lon": 5},
    target_offset={"time": 3},
    splits={"train": 0.6, "val": 0.4},
    batch_size=6,
    dtype="float64",
    num_workers=0,
)


def derived(ds: xr.Dataset) -> xr.Dataset:
    """Element-wise: a new variable from two, one dropped, a level-folded one rescaled."""
    return ds.assign(speed=np.hypot(ds.a, ds.b), c=ds.c * 2).drop_vars("a")


def doubled(ds: xr.Dataset) -> xr.Dataset:
    return ds * 2


@pytest.mark.parametrize("load", [True, False])
def test_a_batch_transform_gives_what_the_sample_transform_gives(small_ds, zarr_path, load):
    batches = {}
    for transform_on in ("sample", "batch"):
        dm = XarrayDataModule(
            str(zarr_path),
            **SETTINGS,
            load=load,
            transform=derived,
            target_transform=doubled,
            transform_on=transform_on,
        )
        assert dm.input_shape == (1 + 3 + 1, 3, 4, 5)  # b, c's 3 levels, speed
        assert dm.input_channel_names[-1] == "speed"
        batches[transform_on] = [(X.numpy(), y.numpy()) for X, y in dm.val_dataloader()]
    for (x1, y1), (x2, y2) in zip(batches["sample"], batches["batch"], strict=True):
        np.testing.assert_allclose(x2, x1)
        np.testing.assert_allclose(y2, y1)
    assert len(batches["batch"]) > 1


def test_a_batch_transform_sees_each_windows_first_label(small_ds):
    seen = []

    def record(ds: xr.Dataset) -> xr.Dataset:
        assert ds.a.dims[0] == "sample" and "time" not in ds.coords
        seen.append(ds.time_start.values.copy())
        return ds

    dm = XarrayDataModule(small_ds, **SETTINGS, transform=record, transform_on="batch")
    dm.setup("fit")
    dm.datasets["val"].__getitems__(np.arange(4))
    starts = dm.indices["val"].starts(np.arange(4))[:, dm.window_dims.index("time")]
    np.testing.assert_array_equal(seen[-1], small_ds.time.values[starts])


def test_transform_on_must_be_known(small_ds):
    with pytest.raises(ValueError, match=r"transform_on must be one of \('sample', 'batch'\)"):
        XarrayDataModule(small_ds, **SETTINGS, transform=doubled, transform_on="window")
