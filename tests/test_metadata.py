"""Batches as dicts with their metadata, against the sample index and the tuple batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import cpu_trainer
from xr_datamodule import XarrayDataModule
from xr_datamodule.models import DemoForecaster

SETTINGS = dict(
    input_vars=["a", "b"],
    target_vars=["b"],
    input_dims={"time": 3, "lat": 4, "lon": 5},
    input_overlap={"time": 1},
    target_dims={"time": 2, "lat": 4, "lon": 5},
    target_offset={"time": 4},
    splits={"train": 0.6, "val": 0.4},
    batch_size=4,
    dtype="float64",
)


@pytest.mark.parametrize(("load", "workers"), [(True, 0), (False, 2)])
def test_dict_batches_carry_the_samples_and_their_labels(small_ds, zarr_path, load, workers):
    common = dict(**SETTINGS, load=load, num_workers=workers)
    dm = XarrayDataModule(str(zarr_path), **common, batch_format="dict")
    plain = XarrayDataModule(str(zarr_path), **common)
    loader = dm.val_dataloader()
    order = [np.asarray(ids) for ids in loader.batch_sampler]
    for ids, batch, (X, y) in zip(order, loader, plain.val_dataloader(), strict=True):
        torch.testing.assert_close(batch["x"], X)
        torch.testing.assert_close(batch["y"], y)
        np.testing.assert_array_equal(batch["sample"].numpy(), ids)
        starts = dm.indices["val"].starts(ids)
        t, la, lo = (dm.window_dims.index(d) for d in ("time", "lat", "lon"))
        times = small_ds.time.values.astype("datetime64[ns]").astype(np.int64)
        expected = times[starts[:, t, None] + np.arange(3)]
        np.testing.assert_array_equal(batch["input_time"].numpy(), expected)
        expected = times[starts[:, t, None] + 4 + np.arange(2)]
        np.testing.assert_array_equal(batch["target_time"].numpy(), expected)
        assert batch["target_time"].dtype == torch.int64
        lats = small_ds.lat.values[starts[:, la, None] + np.arange(4)]
        np.testing.assert_array_equal(batch["input_lat"].numpy(), lats)
        lons = small_ds.lon.values[starts[:, lo, None] + np.arange(5)]
        np.testing.assert_array_equal(batch["target_lon"].numpy(), lons)


def test_a_trainer_fits_and_predicts_on_dict_batches(small_ds):
    dm = XarrayDataModule(
        small_ds, **{**SETTINGS, "dtype": "float32"}, batch_format="dict", normalize="zscore"
    )
    model = DemoForecaster(dm.input_shape, dm.target_shape, hidden_channels=2)
    trainer = cpu_trainer(max_epochs=1)
    trainer.fit(model, datamodule=dm)
    grid = dm.to_xarray(trainer.predict(model, dataloaders=dm.val_dataloader()), "val")
    assert grid.b.notnull().any()


def test_batch_format_must_be_known(small_ds):
    with pytest.raises(ValueError, match=r"batch_format must be one of \('tuple', 'dict'\)"):
        XarrayDataModule(small_ds, **SETTINGS, batch_format="named")
