"""Exactly once at any scale: seeded epochs, DDP shards, mid-epoch resume, fork safety."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import dask
import numpy as np
import pytest
import torch
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.conftest import cpu_trainer
from tests.ddp_script import Recorder, ids_dataset
from xr_datamodule import XarrayDataModule
from xr_datamodule.samplers import ChunkShuffleSampler, EpochShuffleSampler, ShardedBatchSampler

ROOT = Path(__file__).resolve().parents[1]


def make_order(kind: str, n: int, seed: int, batch: int = 4, streams: int = 1):
    if kind == "uniform":
        return EpochShuffleSampler(n, seed)
    cells = np.repeat(np.arange(n // 5 + 1), 5)[:n]
    return ChunkShuffleSampler(
        cells, seed, streams=streams, batch_size=batch, processes=streams, walk=np.arange(n)
    )


@settings(max_examples=120, deadline=None)
@given(
    n=st.integers(1, 300),
    batch=st.integers(1, 20),
    world=st.integers(1, 4),
    epoch=st.integers(0, 20),
    seed=st.integers(0, 1000),
    drop_last=st.booleans(),
    kind=st.sampled_from(["uniform", "chunk"]),
    streams=st.integers(1, 3),
    resume_at=st.integers(0, 40),
)
def test_ranks_see_each_sample_once_and_resume_completes_the_epoch(
    n, batch, world, epoch, seed, drop_last, kind, streams, resume_at
):
    def order():
        return make_order(kind, n, seed, batch, streams)

    per_rank = []
    for rank in range(world):
        sampler = ShardedBatchSampler(order(), batch, drop_last, world, rank)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
        assert len(per_rank[-1]) == len(sampler)
    # Every rank has the same number of batches, so DDP never waits on a rank that ran out.
    assert len({len(batches) for batches in per_rank}) == 1
    seen = np.concatenate([b for batches in per_rank for b in batches] or [np.empty(0, int)])
    assert len(np.unique(seen)) == len(seen)  # no duplicates across ranks
    kept = n - n % world
    if not drop_last:
        assert len(seen) == kept  # at most world - 1 samples left out
    else:
        assert len(seen) == world * (kept // world // batch) * batch
    # The epoch's order is the same whoever computes it: ranks hold contiguous blocks of it
    # (a chunk-aware order mixes each block's streams and deals it to the processes).
    full = make_order(kind, n, seed, batch, streams=1)
    full.set_epoch(epoch)
    blocks = full.order()[:kept].reshape(world, -1) if kept else np.empty((world, 0), int)
    for rank, batches in enumerate(per_rank):
        if batches:
            got = np.concatenate(batches)
            if drop_last:
                assert set(got.tolist()) <= set(blocks[rank].tolist())
            else:
                assert np.array_equal(np.sort(got), np.sort(blocks[rank]))
            if streams == 1:
                assert np.array_equal(got, blocks[rank][: len(got)])
    # Resuming mid-epoch yields exactly the batches that remained.
    for rank in range(world):
        resumed = ShardedBatchSampler(
            order(), batch, drop_last, world, rank, resume=(epoch, resume_at * batch)
        )
        resumed.set_epoch(epoch)
        remaining = list(resumed)
        assert [b.tolist() for b in remaining] == [b.tolist() for b in per_rank[rank][resume_at:]]
        # The next epoch is whole again.
        assert len(list(resumed)) == len(per_rank[rank])


def train_ids(dm: XarrayDataModule, epochs: int = 1) -> list[list[int]]:
    loader = dm.train_dataloader()
    return [batch.reshape(-1).tolist() for _ in range(epochs) for batch, _ in loader]


def test_in_memory_training_order_is_the_same_for_any_number_of_workers(tmp_path):
    path = tmp_path / "ids.zarr"
    ds = xr.Dataset({"x": (("time", "lat"), np.arange(600.0).reshape(200, 3))})
    ds.chunk({"time": 16}).to_zarr(path)
    orders = []
    for workers in (0, 1, 3):
        dm = XarrayDataModule(
            str(path),
            input_vars=["x"],
            input_dims={"time": 1, "lat": 1},
            splits={"train": 1.0},
            batch_size=7,
            num_workers=workers,
            load=True,
            dtype="float64",
            seed=3,
        )
        dm.setup("fit")
        orders.append(train_ids(dm, epochs=2))
    assert orders[0] == orders[1] == orders[2]
    first, second = orders[0][: len(orders[0]) // 2], orders[0][len(orders[0]) // 2 :]
    flat = [[i for batch in epoch for i in batch] for epoch in (first, second)]
    assert sorted(flat[0]) == sorted(flat[1]) == list(range(600))
    assert first != second


def fit_ids(dm, ckpt_path=None, callbacks=(), **trainer_kwargs):
    return fit_ids_and_trainer(dm, ckpt_path, callbacks, **trainer_kwargs)[0]


def fit_ids_and_trainer(dm, ckpt_path=None, callbacks=(), **trainer_kwargs):
    model = Recorder()
    # Lightning's own defaults for epochs and checkpointing, unless the caller sets them.
    settings = {"max_epochs": None, "enable_checkpointing": True, "callbacks": list(callbacks)}
    trainer = cpu_trainer(**{**settings, **trainer_kwargs})
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen, trainer


def ids_module(workers: int, style: str = "map") -> XarrayDataModule:
    return XarrayDataModule(
        ids_dataset(90),
        input_vars=["x"],
        input_dims={"time": 1},
        splits={"train": 1.0},
        batch_size=8,
        dtype="float64",
        num_workers=workers,
        seed=11,
        style=style,
    )


@pytest.mark.parametrize(("workers", "style"), [(0, "map"), (2, "map"), (2, "iterable")])
def test_mid_epoch_resume_through_a_checkpoint_sees_exactly_what_remained(tmp_path, workers, style):
    full = fit_ids(ids_module(workers, style), max_epochs=2, enable_checkpointing=False)
    assert len(full) == 2 * 12
    every = ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1, filename="{step}"
    )
    interrupted = fit_ids(ids_module(workers, style), callbacks=[every], max_epochs=2)
    assert interrupted == full
    for step in (5, 15):  # mid epoch 0, and mid epoch 1
        checkpoint = tmp_path / f"step={step}.ckpt"
        stored = torch.load(checkpoint, weights_only=False)["XarrayDataModule"]
        assert stored == {
            "seed": 11,
            "epoch": step // 12,
            "batches_done": step % 12,
            "samples_done": 8 * (step % 12),
            "batch_size": 8,
            "world_size": 1,
            "order": "EpochShuffleSampler",
            "epoch_offset": 0,
        }
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rest = fit_ids(
                ids_module(workers, style),
                ckpt_path=str(checkpoint),
                max_epochs=2,
                enable_checkpointing=False,
            )
        assert rest == full[step:]  # exactly the batches that remained, in the same order
        # ... and Lightning knows the loader is resumable (it warns otherwise).
        assert not [w for w in caught if "not resumable" in str(w.message)]


def ids_module_of(batch_size: int, workers: int = 0, **settings) -> XarrayDataModule:
    return XarrayDataModule(
        ids_dataset(120),
        input_vars=["x"],
        input_dims={"time": 1},
        splits={"train": 1.0},
        batch_size=batch_size,
        dtype="float64",
        num_workers=workers,
        seed=5,
        **settings,
    )


@pytest.mark.parametrize(("before", "after", "workers"), [(6, 12, 0), (6, 4, 0), (6, 9, 2)])
def test_a_resume_with_another_batch_size_continues_exactly_by_samples(
    tmp_path, before, after, workers
):
    every = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=1, filename="x")
    first = fit_ids(ids_module_of(before, workers), callbacks=[every], max_steps=5)
    rest = fit_ids(
        ids_module_of(after, workers),
        ckpt_path=str(tmp_path / "x.ckpt"),
        max_epochs=1,
        enable_checkpointing=False,
    )
    seen = [i for batch in first + rest for i in batch]
    assert sorted(seen) == list(range(120))  # none lost, none twice
    assert all(len(batch) == after for batch in rest[:-1])
    once = fit_ids(ids_module_of(before), max_epochs=1, enable_checkpointing=False)
    uninterrupted = [i for b in once for i in b]
    assert seen == uninterrupted  # the same order of samples, in other batches


def test_a_resume_that_would_change_the_order_is_refused(tmp_path, small_ds):
    every = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=1, filename="x")
    fit_ids(ids_module_of(6), callbacks=[every], max_steps=5)
    checkpoint = str(tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match=r"world size 2 then, 1 now"):
        dm = ids_module_of(6)
        state = torch.load(checkpoint, weights_only=False)["XarrayDataModule"]
        dm.load_state_dict({**state, "world_size": 2})
    with pytest.raises(ValueError, match=r"order EpochShuffleSampler then, FixedLengthSampler"):
        fit_ids(
            ids_module_of(6, samples_per_epoch=60),
            ckpt_path=checkpoint,
            max_epochs=1,
            enable_checkpointing=False,
        )
    # Out of core, chunk-aware: the order mixes its streams by batch.
    path = tmp_path / "ids.zarr"
    ids_dataset(120).chunk({"time": 10}).to_zarr(path)
    chunked = {"load": False, "shuffle": "chunks"}
    out_of_core = XarrayDataModule(
        str(path), ["x"], {"time": 1}, splits={"train": 1.0}, batch_size=6, seed=5, **chunked
    )
    chunked_every = ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=5, save_top_k=1, filename="chunked"
    )
    fit_ids(out_of_core, callbacks=[chunked_every], max_steps=5)
    other = XarrayDataModule(
        str(path), ["x"], {"time": 1}, splits={"train": 1.0}, batch_size=12, seed=5, **chunked
    )
    with pytest.raises(ValueError, match=r"batch_size 6 then, 12 now \(the chunk-aware order"):
        fit_ids(
            other,
            ckpt_path=str(tmp_path / "chunked.ckpt"),
            max_epochs=1,
            enable_checkpointing=False,
        )


@pytest.mark.parametrize(("workers", "style"), [(0, "map"), (2, "iterable")])
def test_resume_after_fit_stopped_by_max_steps_continues_the_cut_epoch(tmp_path, workers, style):
    full = fit_ids(ids_module(workers, style), max_epochs=2, enable_checkpointing=False)
    first, trainer = fit_ids_and_trainer(
        ids_module(workers, style), max_steps=5, enable_checkpointing=False
    )
    assert first == full[:5]
    checkpoint = tmp_path / "stopped.ckpt"
    trainer.save_checkpoint(checkpoint)
    stored = torch.load(checkpoint, weights_only=False)["XarrayDataModule"]
    # Lightning counts the cut epoch as finished (it resumes in its epoch 1); the data
    # continue epoch 0 there, one epoch behind the trainer's count.
    assert {k: stored[k] for k in ("seed", "epoch", "batches_done", "epoch_offset")} == {
        "seed": 11,
        "epoch": 0,
        "batches_done": 5,
        "epoch_offset": 1,
    }
    assert stored["samples_done"] == 40
    rest = fit_ids(
        ids_module(workers, style),
        ckpt_path=str(checkpoint),
        max_epochs=3,
        enable_checkpointing=False,
    )
    assert rest == full[5:]


@pytest.mark.timeout(120)
def test_workers_do_not_hang_after_dask_threads_ran_in_the_parent(tmp_path):
    path = tmp_path / "dask.zarr"
    xr.Dataset({"x": (("time", "lat"), np.random.default_rng(0).random((400, 8)))}).chunk(
        {"time": 50}
    ).to_zarr(path)
    ds = xr.open_zarr(path)  # dask-backed
    with dask.config.set(scheduler="threads"):
        assert float(ds.x.mean().compute()) > 0  # the parent's dask thread pool has run
    dm = XarrayDataModule(
        ds,
        input_vars=["x"],
        input_dims={"time": 4, "lat": 8},
        splits={"train": 1.0},
        batch_size=16,
        num_workers=2,
        load=False,
        multiprocessing_context="fork",
    )
    dm.setup("fit")
    total = sum(len(x) for x, _ in dm.train_dataloader())
    assert total == len(dm.datasets["train"])


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("style", "workers"), [("map", 0), ("iterable", 2)])
def test_real_two_process_ddp_run_shards_without_duplicates(tmp_path, style, workers):
    script = str(ROOT / "tests" / "ddp_script.py")
    result = subprocess.run(
        [sys.executable, script, str(tmp_path), "101", "8", style, str(workers)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=220,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(rank["world"] == 2 for rank in ranks)
    batches = [rank["epochs"] for rank in ranks]
    assert len(batches[0]) == len(batches[1])  # same number of steps on both ranks
    per_epoch = len(batches[0]) // 2
    for epoch in range(2):
        seen = [
            i
            for rank in batches
            for b in rank[epoch * per_epoch : (epoch + 1) * per_epoch]
            for i in b
        ]
        assert len(seen) == len(set(seen)) == 100  # 101 - 101 % 2: one left out, none twice
    epoch0 = [b for rank in batches for b in rank[:per_epoch]]
    epoch1 = [b for rank in batches for b in rank[per_epoch:]]
    assert epoch0 != epoch1


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_iterable_style_streams_the_map_style_batches_with_any_workers(workers):
    def epochs(style: str, n_workers: int) -> list[list[int]]:
        dm = ids_module(n_workers, style)
        dm.setup("fit")
        return train_ids(dm, epochs=2)

    assert epochs("iterable", workers) == epochs("map", 0)


@pytest.mark.parametrize("world", [2, 3])
def test_iterable_shards_over_simulated_ranks_and_workers_exactly_once(world):
    from torch.utils.data import DataLoader

    from xr_datamodule import XarrayIterableDataset, collate_batch

    dm = ids_module(0)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    per_rank = []
    for rank in range(world):
        batches = ShardedBatchSampler(EpochShuffleSampler(90, 11), 8, False, world, rank)
        stream = XarrayIterableDataset(dataset, batches)
        loader = DataLoader(stream, batch_size=None, num_workers=2, collate_fn=collate_batch)
        per_rank.append([x.reshape(-1).long().tolist() for x, _ in loader])
    assert len({len(batches) for batches in per_rank}) == 1
    seen = [i for batches in per_rank for b in batches for i in b]
    assert len(seen) == len(set(seen)) == 90 - 90 % world


class _IdsOnly:
    """Stands in for the map-style dataset: a batch is just its sample numbers."""

    def __getitem__(self, batch):
        return np.asarray(batch)


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 200),
    batch=st.integers(1, 16),
    world=st.integers(1, 4),
    workers=st.integers(0, 3),
    epoch=st.integers(0, 10),
    resume_at=st.integers(0, 30),
)
def test_iterable_streams_over_ranks_and_workers_exactly_once(
    n, batch, world, workers, epoch, resume_at
):
    import types

    import xr_datamodule.datasets as datasets_module
    from xr_datamodule import XarrayIterableDataset

    def stream(rank: int, resume=None) -> list[list[int]]:
        """What the DataLoader delivers: worker w's batches, taken in turn."""
        per_worker = []
        for worker in range(max(workers, 1)):
            info = None if workers == 0 else types.SimpleNamespace(id=worker, num_workers=workers)
            original = datasets_module.get_worker_info
            datasets_module.get_worker_info = lambda info=info: info
            try:
                batches = ShardedBatchSampler(
                    EpochShuffleSampler(n, 5), batch, False, world, rank, resume=resume
                )
                dataset = XarrayIterableDataset(_IdsOnly(), batches)
                dataset.set_epoch(epoch)
                per_worker.append([b.tolist() for b in dataset])
            finally:
                datasets_module.get_worker_info = original
        delivered = []
        for turn in range(max(len(w) for w in per_worker)):
            delivered += [w[turn] for w in per_worker if turn < len(w)]
        return delivered

    per_rank = [stream(rank) for rank in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1
    seen = [i for batches in per_rank for b in batches for i in b]
    assert len(seen) == len(set(seen)) == n - n % world
    for rank in range(world):
        assert stream(rank, resume=(epoch, resume_at * batch)) == per_rank[rank][resume_at:]
