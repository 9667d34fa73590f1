"""DataPipeline and loaders without Lightning: the same batches as the datamodule's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import reference_windows
from xr_datamodule import XarrayDataModule
from xr_datamodule.loaders import eval_loader, train_loader
from xr_datamodule.pipeline import DataPipeline
from xr_datamodule.spec import DataSpec

SETTINGS = dict(
    input_vars=["a", "c"],
    target_vars=["b"],
    input_dims={"time": 3, "lat": 4, "lon": 5},
    input_overlap={"time": 2},
    target_dims={"time": 1, "lat": 4, "lon": 5},
    target_offset={"time": 3},
    splits={"train": 0.6, "val": 0.4},
    batch_size=7,
    seed=5,
    num_workers=0,
)


@pytest.mark.parametrize("load", [True, False])
def test_a_plain_loop_gets_the_datamodules_batches(small_ds, zarr_path, load):
    dm = XarrayDataModule(str(zarr_path), **SETTINGS, load=load)
    dm.setup("fit")
    pipeline = DataPipeline(DataSpec(str(zarr_path), **SETTINGS, load=load))
    for epoch in (0, 1):
        ours = list(train_loader(pipeline, epoch=epoch))
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)  # what Lightning calls each epoch
        theirs = list(loader)
        assert len(ours) == len(theirs)
        for (x1, y1), (x2, y2) in zip(ours, theirs, strict=True):
            torch.testing.assert_close(x1, x2)
            torch.testing.assert_close(y1, y2)
    # Evaluation in order, against a brute-force isel.
    X = torch.cat([x for x, _ in eval_loader(pipeline, "val")]).numpy()
    starts = pipeline.plan.indices["val"].starts(np.arange(len(X)))
    dims = pipeline.layout.window_dims
    expected = reference_windows(small_ds, ["a", "c"], dims, starts, (3, 4, 5))
    np.testing.assert_allclose(X, expected.astype(np.float32))


def test_the_pipeline_knows_its_shapes_before_reading(small_ds):
    pipeline = DataPipeline(DataSpec(small_ds, **SETTINGS))
    assert pipeline.channels.input_shape == (4, 3, 4, 5)  # a, and c's 3 levels
    assert pipeline.channels.target_shape == (1, 1, 4, 5)
    assert pipeline.datasets == {}  # nothing built yet
    plan = pipeline.plan
    assert plan.split_for("predict") == "test" and plan.split_for("val") == "val"
