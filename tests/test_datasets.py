"""datasets: a batch of sample numbers is one vectorised read, equal to ``isel`` per sample."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import reference_windows
from xr_datamodule.pipeline import DataPipeline
from xr_datamodule.spec import DataSpec

SETTINGS = dict(
    input_vars=["a", "c"],
    target_vars=["b"],
    input_dims={"time": 3, "lat": 4, "lon": 5},
    target_dims={"time": 1, "lat": 2, "lon": 5},
    target_offset={"time": 3, "lat": 1},
    input_overlap={"lat": 2},
    num_workers=0,
)


@pytest.mark.parametrize("load", [True, False])
def test_a_batch_equals_isel_of_each_sample(small_ds, zarr_path, load):
    pipeline = DataPipeline(DataSpec(str(zarr_path), **SETTINGS, load=load))
    dataset = pipeline.dataset("train")
    ids = np.random.default_rng(0).choice(len(dataset), size=9, replace=False)
    batch = dataset.__getitems__(ids)
    starts = pipeline.plan.indices["train"].starts(ids)
    dims = pipeline.layout.window_dims
    np.testing.assert_allclose(
        batch.inputs, reference_windows(small_ds, ["a", "c"], dims, starts, (3, 4, 5))
    )
    target_starts = starts + np.asarray(pipeline.geometry.target_offset)
    np.testing.assert_allclose(
        batch.targets, reference_windows(small_ds, ["b"], dims, target_starts, (1, 2, 5))
    )


def test_dict_batches_carry_the_labels_of_every_window_position(small_ds):
    pipeline = DataPipeline(DataSpec(small_ds, **SETTINGS, batch_format="dict"))
    dataset = pipeline.dataset("val")
    batch = dataset.__getitems__(np.array([0, 3]))
    starts = pipeline.plan.indices["val"].starts(np.array([0, 3]))
    times = small_ds.time.values.astype("datetime64[ns]").astype(np.int64)
    for row, start in enumerate(starts[:, 0]):
        assert batch.meta["input_time"][row].tolist() == times[start : start + 3].tolist()
        assert batch.meta["target_time"][row].tolist() == [times[start + 3]]
    assert batch.meta["sample"].tolist() == [0, 3]
