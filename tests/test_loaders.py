"""loaders: the DataLoaders of a pipeline, their settings, and what they learn of a trainer."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import reference_windows
from xr_datamodule.loaders import (
    eval_loader,
    loader_settings,
    on_cuda,
    train_loader,
    trained_so_far,
    world_of,
)
from xr_datamodule.pipeline import DataPipeline
from xr_datamodule.spec import DataSpec

SETTINGS = dict(
    input_vars=["a", "c"],
    target_vars=["b"],
    input_dims={"time": 3, "lat": 4, "lon": 5},
    target_dims={"time": 1, "lat": 4, "lon": 5},
    target_offset={"time": 3},
    batch_size=7,
    num_workers=0,
)


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluation_batches_are_every_sample_in_order(small_ds, zarr_path, workers):
    pipeline = DataPipeline(DataSpec(str(zarr_path), **{**SETTINGS, "num_workers": workers}))
    X = torch.cat([x for x, _ in eval_loader(pipeline, "test", in_order=True)]).numpy()
    index = pipeline.plan.indices["test"]
    starts = index.starts(np.arange(len(index)))
    dims = pipeline.layout.window_dims
    expected = reference_windows(small_ds, ["a", "c"], dims, starts, (3, 4, 5))
    np.testing.assert_allclose(X, expected.astype(np.float32))


def test_an_epoch_of_training_batches_holds_every_sample_once(small_ds):
    pipeline = DataPipeline(DataSpec(small_ds, **SETTINGS))
    seen = []
    for x, _ in train_loader(pipeline, epoch=0):
        seen.append(x.reshape(len(x), -1)[:, 0])  # first value: tells samples apart here
    n = len(pipeline.plan.indices["train"])
    assert sum(len(s) for s in seen) == n
    assert len(np.unique(torch.cat(seen).numpy())) == n


def test_settings_follow_the_spec_and_the_resolved_workers(small_ds):
    quiet = DataPipeline(DataSpec(small_ds, **SETTINGS))
    assert loader_settings(quiet) == {"num_workers": 0, "pin_memory": False}
    busy = DataPipeline(DataSpec(small_ds, **{**SETTINGS, "num_workers": 2}, prefetch_factor=3))
    settings = loader_settings(busy, pin_memory=True)
    assert settings["persistent_workers"] and settings["prefetch_factor"] == 3
    assert settings["pin_memory"] and settings["num_workers"] == 2


def test_big_batches_are_loaded_one_ahead_per_worker():
    """Each batch ahead is a ring slot per worker: 0.25 deg batches load one ahead."""
    import dask.array as da
    import xarray as xr

    lazy = xr.Dataset(
        {name: (("time", "lat", "lon"), da.zeros((8, 721, 1440), "f4")) for name in "abc"}
    )  # never computed: the settings need the shapes only
    spec = dict(
        input_vars=["a", "b", "c"], input_dims={"time": 2, "lat": 721, "lon": 1440},
        input_overlap={"time": 1}, target_dims={"time": 1, "lat": 721, "lon": 1440},
        target_offset={"time": 2}, splits={"train": 1.0}, load=False, num_workers=2,
    )  # fmt: skip
    big = DataPipeline(DataSpec(lazy, **spec, batch_size=4))  # 150 MB a batch
    assert loader_settings(big)["prefetch_factor"] == 1 and big.resources.ring_slots == 3
    small = DataPipeline(DataSpec(lazy, **spec, batch_size=2))  # 75 MB: torch's default
    assert "prefetch_factor" not in loader_settings(small) and small.resources.ring_slots == 4
    chosen = DataPipeline(DataSpec(lazy, **spec, batch_size=4, prefetch_factor=2))
    assert loader_settings(chosen)["prefetch_factor"] == 2 and chosen.resources.ring_slots == 4


def test_what_the_loaders_learn_of_a_trainer():
    assert world_of(None) == (1, 0) and not on_cuda(None)
    assert trained_so_far(None) == (None, None)
    trainer = SimpleNamespace(
        world_size=4,
        global_rank=3,
        current_epoch=2,
        fit_loop=SimpleNamespace(
            epoch_loop=SimpleNamespace(
                batch_progress=SimpleNamespace(current=SimpleNamespace(processed=9))
            )
        ),
        accelerator=object(),
    )
    assert world_of(trainer) == (4, 3)
    assert trained_so_far(trainer) == (9, 2)
    assert not on_cuda(trainer)
