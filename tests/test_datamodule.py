"""DataModule wiring: setup, loader settings, shuffling, workers, hyperparameters."""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from torch.utils.data import DistributedSampler

from tests.conftest import cpu_trainer
from xr_datamodule import XarrayDataModule
from xr_datamodule.samplers import ArrayBatchSampler, ShardedBatchSampler

CONFIG = dict(
    input_vars=["a", "b"],
    target_vars=["b"],
    input_dims={"time": 3, "lat": 4},
    target_dims={"time": 1, "lat": 4},
    target_offset={"time": 3},
    input_overlap={"time": 2, "lat": 2},
    batch_size=8,
)


def epoch_inputs(loader) -> list[np.ndarray]:
    return [x.numpy().copy() for x, _ in loader]


def test_metadata_works_before_setup_and_setup_is_idempotent(small_ds):
    dm = XarrayDataModule(small_ds, **CONFIG)
    assert dm.input_shape == (2 * 10, 3, 4)  # lon is not windowed: 10 channels per variable
    assert dm.target_shape == (10, 1, 4)
    assert dm.datasets == {}
    dm.setup("fit")
    train, source = dm.datasets["train"], dm.source
    dm.setup("fit")
    dm.setup("validate")
    assert dm.datasets["train"] is train and dm.source is source
    assert sorted(dm.datasets) == ["train", "val"]
    dm.setup("test")
    assert dm.datasets["test"].reader is train.reader  # one stacked copy shared by all splits


def test_splits_by_label_are_inclusive_and_disjoint(small_ds):
    dm = XarrayDataModule(
        small_ds,
        **{
            **CONFIG,
            "splits": {
                "train": {"time": ["2020-01-01", "2020-01-25"]},
                "val": {"time": ["2020-01-26", "2020-02-09"]},
            },
        },
    )
    dm.setup()
    train_starts = dm.indices["train"].starts(np.arange(len(dm.indices["train"])))
    val_starts = dm.indices["val"].starts(np.arange(len(dm.indices["val"])))
    # Inclusive: day 25 (position 24) is the last the train split may touch.
    assert train_starts[:, 0].max() + dm.geometry.extent[0] - 1 == 24
    assert val_starts[:, 0].min() == 25
    assert val_starts[:, 0].max() + dm.geometry.extent[0] - 1 <= 39


def test_train_order_is_seeded_shuffled_and_changes_per_epoch(small_ds):
    def orders(seed):
        dm = XarrayDataModule(small_ds, **{**CONFIG, "seed": seed})
        dm.setup("fit")
        loader = dm.train_dataloader()
        return dm, [epoch_inputs(loader) for _ in range(2)]

    dm, (first, second) = orders(0)
    _, (again, _) = orders(0)
    _, (other, _) = orders(1)
    n = len(dm.datasets["train"])
    assert sum(len(x) for x in first) == n
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
    assert not np.array_equal(np.concatenate(first), np.concatenate(second))
    assert not np.array_equal(np.concatenate(first), np.concatenate(other))
    # Each epoch holds every training sample exactly once.
    ordered = dm.datasets["train"].__getitems__(np.arange(n)).inputs
    key = lambda arr: sorted(map(bytes, arr.reshape(len(arr), -1)))  # noqa: E731
    assert key(np.concatenate(first)) == key(ordered) == key(np.concatenate(second))


def test_val_and_test_are_in_order(small_ds):
    dm = XarrayDataModule(small_ds, **CONFIG)
    dm.setup()
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        n = len(dm.datasets[split])
        expected = dm.datasets[split].__getitems__(np.arange(n)).inputs
        np.testing.assert_array_equal(np.concatenate(epoch_inputs(loader)), expected)


@pytest.mark.parametrize(("cores", "out_of_core"), [(1, 0), (2, 2), (4, 2), (8, 4), (64, 4)])
def test_auto_workers_follow_the_data_and_the_cores(small_ds, monkeypatch, cores, out_of_core):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert XarrayDataModule(small_ds, **CONFIG).num_workers == 0  # in memory: never
    assert XarrayDataModule(small_ds, **{**CONFIG, "load": False}).num_workers == out_of_core


def test_workers_and_threads_fit_the_cores_this_process_may_use(small_ds, monkeypatch):
    # A job given 2 of a node's 64 cores (Slurm, a container, taskset).
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5, 6}, raising=False)
    assert XarrayDataModule(small_ds, **{**CONFIG, "load": False}).num_workers == 2
    dm = XarrayDataModule(small_ds, **{**CONFIG, "load": False, "num_workers": 0})
    dm.setup()
    assert dm.datasets["train"].reader.decode_threads == 2


def test_loader_settings_defaults_and_overrides(small_ds):
    dm = XarrayDataModule(small_ds, **CONFIG)
    loader = dm.train_dataloader()
    # Training: a DistributedSampler (Lightning keeps it) that yields whole index batches.
    assert isinstance(loader.sampler, ShardedBatchSampler) and loader.batch_size is None
    assert isinstance(loader.sampler, DistributedSampler)
    assert loader.num_workers == 0 and loader.pin_memory is False
    assert loader.sampler.batch_size == 8
    assert isinstance(dm.val_dataloader().batch_sampler, ArrayBatchSampler)

    dm.trainer = SimpleNamespace(accelerator=CPUAccelerator())
    assert dm.loader_settings["pin_memory"] is False
    dm.trainer = SimpleNamespace(accelerator=CUDAAccelerator())
    assert dm.loader_settings["pin_memory"] is True

    workers = XarrayDataModule(
        small_ds,
        **{**CONFIG, "num_workers": 2, "prefetch_factor": 4, "multiprocessing_context": "spawn"},
    )
    settings = workers.loader_settings
    assert settings["persistent_workers"] is True
    assert settings["prefetch_factor"] == 4
    assert settings["multiprocessing_context"] == "spawn"
    assert settings["pin_memory"] is False
    loader = workers.val_dataloader()
    assert loader.num_workers == 2 and loader.persistent_workers and loader.prefetch_factor == 4

    forced = XarrayDataModule(
        small_ds, **{**CONFIG, "num_workers": 1, "pin_memory": True, "persistent_workers": False}
    )
    assert forced.loader_settings["pin_memory"] is True
    assert forced.loader_settings["persistent_workers"] is False


@pytest.mark.parametrize("backing", ["numpy", "zarr"])
def test_two_workers_give_the_same_batches_as_none(small_ds, zarr_path, backing):
    data = small_ds if backing == "numpy" else str(zarr_path)
    single = XarrayDataModule(data, **CONFIG)
    multi = XarrayDataModule(data, **{**CONFIG, "num_workers": 2})
    for dm in (single, multi):
        dm.setup()
    for name in ("val_dataloader", "test_dataloader", "train_dataloader"):
        expected = epoch_inputs(getattr(single, name)())
        got = epoch_inputs(getattr(multi, name)())
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)


def test_missing_val_split_gives_no_val_batches(small_ds):
    dm = XarrayDataModule(small_ds, **{**CONFIG, "splits": {"train": 0.5, "test": 0.5}})
    dm.setup()
    assert dm.val_dataloader() == []
    # Without a predict split, prediction runs over the test split.
    assert len(dm.predict_dataloader().dataset) == len(dm.datasets["test"])


def test_hyperparameters_are_saved_and_yaml_friendly(small_ds):
    dm = XarrayDataModule(small_ds, **CONFIG, transform=lambda ds: ds)
    assert "data" not in dm.hparams and "transform" not in dm.hparams
    assert dm.hparams["input_dims"] == {"time": 3, "lat": 4}
    dm2 = XarrayDataModule(
        "synthetic://weather", input_vars=["t2m"], input_dims={"time": 1, "lat": 8, "lon": 8}
    )
    assert dm2.hparams["data"] == "synthetic://weather"


def test_no_device_placement_in_the_package():
    package = Path(__file__).resolve().parents[1] / "xr_datamodule"
    pattern = re.compile(r"\.(to|cuda)\(|device=")
    offenders = [
        f"{path.name}:{number}"
        for path in package.glob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_batches_are_contiguous_cpu_tensors(small_ds):
    dm = XarrayDataModule(small_ds, **CONFIG)
    X, y = next(iter(dm.val_dataloader()))
    assert X.device.type == "cpu" and X.dtype == torch.float32 and X.is_contiguous()
    assert X.shape == (8, *dm.input_shape) and y.shape == (8, *dm.target_shape)


def test_collate_shares_memory_with_the_gathered_batch(small_ds):
    from xr_datamodule import collate_batch

    dm = XarrayDataModule(small_ds, **CONFIG)
    dm.setup("test")
    batch = dm.datasets["test"].__getitems__(np.arange(4))
    X, y = collate_batch(batch)
    assert X.data_ptr() == batch.inputs.ctypes.data
    assert y.data_ptr() == batch.targets.ctypes.data


def _mapped_shared_memory() -> int:
    """Shared-memory mappings of this process (torch's segments, unlinked or not)."""
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if "/dev/shm" in line or "torch_" in line)


@pytest.mark.parametrize("workers", [0, 2])
def test_teardown_gives_back_threads_and_shared_memory(workers):
    # Out of core the main process decodes in threads (no workers) or maps the workers'
    # shared-memory rings; once fit ends, both are released.
    import gc
    import threading
    import time

    import lightning.pytorch as pl

    dm = XarrayDataModule(
        "synthetic://weather",
        input_vars=["t2m"],
        input_dims={"time": 1, "lat": 32, "lon": 32},
        load=False,
        num_workers=workers,
        batch_size=16,
    )
    dm.setup("fit")
    gc.collect()
    threads, maps = set(threading.enumerate()), _mapped_shared_memory()

    class Mean(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return ((x.mean() * self.weight - y.mean()) ** 2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cpu_trainer(limit_train_batches=10, limit_val_batches=0).fit(Mean(), datamodule=dm)
    gc.collect()
    deadline = time.monotonic() + 10  # torch's queue feeder threads end on their own, soon
    while (left := set(threading.enumerate()) - threads) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"threads left running after fit: {[thread.name for thread in left]}"
    assert _mapped_shared_memory() <= maps  # earlier tests' rings may go too
    X, _ = next(iter(dm.val_dataloader()))  # still usable
    assert tuple(X.shape) == (16, 1, 1, 32, 32)


def test_one_selected_level_stays_a_named_channel(small_ds):
    dm = XarrayDataModule(
        small_ds,
        input_vars=["c"],
        input_dims={"time": 2, "lat": 4, "lon": 5},
        select={"level": 500, "lat": slice(55, 35)},
    )
    assert dm.input_channel_names == ["c[level=500]"]
    X, _ = next(iter(dm.val_dataloader()))
    starts = dm.indices["val"].starts([0])[0]
    region = small_ds.c.sel(level=500, lat=slice(55, 35)).transpose(*dm.window_dims)
    sizes = {"time": 2, "lat": 4, "lon": 5}
    window = region.isel(
        {dim: slice(s, s + sizes[dim]) for dim, s in zip(dm.window_dims, starts, strict=True)}
    )
    np.testing.assert_allclose(X[0, 0].numpy(), window.values, rtol=1e-6)
