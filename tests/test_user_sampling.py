"""Sampling the user chooses: samplers, weighted draws, fixed-length epochs, random offsets.

Through a real Trainer where the guarantee is about training (the ids dataset's inputs are
the samples' time positions, so what the model saw is what was drawn), against brute force
where a statistic is computed, and over simulated and real DDP ranks for exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import RandomSampler

from tests.conftest import cpu_trainer, reference_windows
from tests.ddp_script import Recorder, ids_dataset
from xr_datamodule import XarrayDataModule, windows
from xr_datamodule.samplers import (
    EpochShuffleSampler,
    FixedLengthSampler,
    RandomOffsets,
    ShardedBatchSampler,
)

ROOT = Path(__file__).resolve().parents[1]


IDS = dict(
    input_vars=["x"],
    input_dims={"time": 1},
    splits={"train": 1.0},
    batch_size=8,
    dtype="float64",
    num_workers=0,
    seed=3,
)


def ids_module(n: int = 90, **settings) -> XarrayDataModule:
    return XarrayDataModule(ids_dataset(n), **{**IDS, **settings})


def fit(dm, epochs: int, ckpt_path=None, callbacks=()) -> list[list[int]]:
    model = Recorder()
    trainer = cpu_trainer(
        max_epochs=epochs,
        callbacks=list(callbacks),
        enable_checkpointing=bool(callbacks),
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


# ----------------------------------------------------------------------------- fixed length


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 60),
    per_epoch=st.integers(1, 80),
    world=st.integers(1, 3),
    seed=st.integers(0, 50),
)
def test_fixed_length_epochs_take_consecutive_stretches_of_passes(n, per_epoch, world, seed):
    epochs = 2 * n // per_epoch + 2
    for epoch in range(epochs):
        ranks = []
        for rank in range(world):
            order = FixedLengthSampler(EpochShuffleSampler(n, seed), per_epoch)
            batches = ShardedBatchSampler(order, 4, False, world, rank)
            batches.set_epoch(epoch)
            ranks.append(np.concatenate(list(batches)) if len(batches) else np.array([], int))
        epoch_ids = np.concatenate(ranks)
        assert len(epoch_ids) == per_epoch - per_epoch % world  # ranks disjoint, cut evenly
        assert len(set(epoch_ids.tolist())) == len(epoch_ids) or per_epoch > n
    # Laid end to end, the epochs are the passes: each a permutation of the index.
    stream = []
    for epoch in range(epochs):
        sampler = FixedLengthSampler(EpochShuffleSampler(n, seed), per_epoch)
        sampler.set_epoch(epoch)
        stream += sampler.order().tolist()
    for start in range(0, len(stream) - n + 1, n):
        assert sorted(stream[start : start + n]) == list(range(n))
    # One sampler asked for the epochs in any order gives the same epochs.
    reused = FixedLengthSampler(EpochShuffleSampler(n, seed), per_epoch)
    for epoch in [*range(epochs - 1, -1, -1), *range(epochs)]:
        reused.set_epoch(epoch)
        assert reused.order().tolist() == stream[epoch * per_epoch : (epoch + 1) * per_epoch]


def test_fixed_length_epochs_through_the_trainer_cover_the_index_and_resume_exactly(tmp_path):
    full = fit(ids_module(samples_per_epoch=30), epochs=6)
    assert len(full) == 6 * 4  # 30 samples in batches of 8: 8 + 8 + 8 + 6
    per_epoch = [sorted(i for b in full[e * 4 : (e + 1) * 4] for i in b) for e in range(6)]
    for first in (0, 3):  # epochs 0-2 are the first pass over the 90 samples, 3-5 the next
        assert sorted(i for part in per_epoch[first : first + 3] for i in part) == list(range(90))
    assert per_epoch[3] != per_epoch[0]  # the next pass is a new shuffle
    every = ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1, filename="{step}"
    )
    assert fit(ids_module(samples_per_epoch=30), epochs=6, callbacks=[every]) == full
    rest = fit(ids_module(samples_per_epoch=30), 6, ckpt_path=str(tmp_path / "step=6.ckpt"))
    assert rest == full[6:]  # mid epoch 1: exactly what remained


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_fixed_length_epochs_over_two_real_ddp_ranks(tmp_path):
    script = str(ROOT / "tests" / "ddp_script.py")
    result = subprocess.run(
        [sys.executable, script, str(tmp_path), "101", "8", "map", "0", "40"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=220,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text())["epochs"] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2 * 3  # 20 samples a rank an epoch, batches of 8
    seen = [i for rank in ranks for batch in rank for i in batch]
    assert len(seen) == len(set(seen)) == 80  # two epochs of 40: no sample twice in a pass


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("slab_bytes", [None, 1, 40_000])
def test_window_statistics_equal_brute_force(small_ds, tmp_path, slab_bytes, monkeypatch):
    if slab_bytes is not None:  # the statistics in slabs of one window, or of a few
        monkeypatch.setattr(windows, "SLAB_BYTES", slab_bytes)
    small_ds.chunk({"time": 8}).to_zarr(tmp_path / "s.zarr")
    for data in (small_ds, str(tmp_path / "s.zarr")):
        dm = XarrayDataModule(
            data,
            input_vars=["a", "c"],
            target_vars=["b"],
            input_dims={"time": 3, "lat": 4, "lon": 5},
            input_overlap={"time": 1, "lat": 2},
            target_dims={"time": 1, "lat": 4, "lon": 5},
            target_offset={"time": 3},
            splits={"train": 0.7, "val": 0.3},
            load=False,
        )
        stats = dm.window_statistics("val")
        starts = dm.indices["val"].starts(np.arange(len(dm.indices["val"])))
        geometry = dm.geometry
        inputs = reference_windows(small_ds, ["a", "c"], dm.window_dims, starts, (3, 4, 5))
        targets = reference_windows(
            small_ds, ["b"], dm.window_dims, starts + geometry.target_offset, (1, 4, 5)
        )
        flat_in, flat_out = inputs.reshape(len(starts), -1), targets.reshape(len(starts), -1)
        np.testing.assert_allclose(stats["input_max"], flat_in.max(1), rtol=1e-6)
        np.testing.assert_allclose(stats["input_mean"], flat_in.mean(1), rtol=1e-6)
        np.testing.assert_allclose(stats["target_min"], flat_out.min(1), rtol=1e-6)
        with pytest.raises(KeyError, match=r"window statistic 'target_p99'"):
            stats["target_p99"]


@pytest.mark.parametrize("replacement", [True, False])
def test_a_rare_class_is_oversampled_at_the_requested_rate_through_the_trainer(replacement):
    # 200 samples; the 10 with the highest values (the top 5 %) get 20 times the weight.
    weights = {"by": "input_max", "quantile": 0.95, "boost": 20.0}
    settings = dict(sample_weights=weights, replacement=replacement)
    if not replacement:
        settings["samples_per_epoch"] = 40
    dm = ids_module(200, **settings)
    seen = np.concatenate(fit(dm, epochs=5))
    rare = seen >= 190
    if replacement:
        expected = 10 * 20 / (10 * 20 + 190)  # 0.51 of the draws
        assert abs(rare.mean() - expected) < 0.08, rare.mean()
    else:  # at most once an epoch each; far above their 5 % share
        per_epoch = seen.reshape(5, 40)
        assert all(len(set(epoch.tolist())) == 40 for epoch in per_epoch)
        assert rare.mean() > 0.15
    assert sorted(set(dm.sample_weights.tolist())) == [1.0, 20.0]
    assert int((dm.sample_weights == 20).sum()) == 10


def test_weights_of_a_function_and_a_torch_sampler_from_yaml():
    # A function of the statistics; the class built from its import path gets the weights.
    dm = ids_module(
        50,
        sample_weights=lambda stats: (stats["input_max"] % 2 == 0).astype(float),
        sampler={
            "class_path": "torch.utils.data.WeightedRandomSampler",
            "init_args": {"replacement": True},
        },
    )
    seen = np.concatenate(fit(dm, epochs=2))
    assert len(seen) == 100 and (seen % 2 == 0).all()  # odd samples have weight 0


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        ({"sample_weights": {"by": "target_p99", "quantile": 0.9}}, ValueError, r"'by'"),
        ({"sample_weights": {"by": "input_max"}}, ValueError, r"exactly one of 'quantile'"),
        ({"sample_weights": "heatwaves"}, TypeError, r"sample_weights must be a mapping"),
        ({"sample_weights": lambda s: np.ones(3)}, ValueError, r"got 3 weights for 90"),
        ({"sampler": "torch.utils.data.Nope"}, ValueError, r"cannot import 'torch.utils"),
        ({"sampler": "collections.OrderedDict"}, ValueError, r"is not a torch.utils.data.Sampler"),
        ({"sampler": 3}, TypeError, r"sampler must be a torch Sampler class"),
        ({"samples_per_epoch": 0}, ValueError, r"samples_per_epoch must be a positive"),
        ({"random_offsets": "yes"}, TypeError, r"random_offsets must be True or False"),
        ({"random_offsets": True, "nan_policy": "drop"}, ValueError, r"random_offsets=True"),
    ],
)
def test_bad_sampling_settings_are_named(settings, error, message):
    with pytest.raises(error, match=message):
        dm = ids_module(**settings)
        dm.setup("fit")
        dm.train_batches(0)


# ----------------------------------------------------------------------------- samplers


def test_a_torch_sampler_class_and_a_function_of_the_index_through_the_trainer(tmp_path):
    dm = ids_module(sampler=RandomSampler)
    seen = fit(dm, epochs=2)
    for epoch in (seen[:12], seen[12:]):
        assert sorted(i for b in epoch for i in b) == list(range(90))
    assert seen[:12] != seen[12:]  # its generator is seeded per (seed, epoch)
    assert fit(ids_module(sampler=RandomSampler), epochs=2) == seen  # reproducible

    def late_first(index, rng):  # a callable of the split's index: the second half only
        starts = index.starts(np.arange(len(index)))[:, 0]
        return rng.permutation(np.flatnonzero(starts >= 45))

    seen = fit(ids_module(sampler=late_first), epochs=2)
    assert all(i >= 45 for b in seen for i in b) and len(seen) == 2 * 6


# ----------------------------------------------------------------------------- random offsets


def test_random_offsets_stay_in_their_cell_and_the_split_and_reach_every_start():
    offsets = RandomOffsets(seed=1, strides=np.array([4, 3]), last=np.array([21, 9]))
    grid = np.stack(np.meshgrid(np.arange(0, 22, 4), np.arange(0, 10, 3), indexing="ij"), -1)
    starts = grid.reshape(-1, 2)
    ids = np.arange(len(starts))
    reached = set()
    for epoch in range(200):
        moved = offsets.apply(starts, ids, epoch)
        assert ((moved >= starts) & (moved < starts + np.array([4, 3])) & (moved <= [21, 9])).all()
        reached |= {tuple(p) for p in moved.tolist()}
        np.testing.assert_array_equal(moved, offsets.apply(starts, ids, epoch))
    assert reached == {(t, y) for t in range(22) for y in range(10)}


@pytest.mark.parametrize("workers", [0, 2])
def test_random_offsets_through_the_trainer_inside_the_split(tmp_path, workers):
    # 80 steps: windows of 4 without overlap; train is the first 60 (15 grid starts).
    ds = ids_dataset(80)
    ds.to_zarr(tmp_path / "ids.zarr")
    settings = dict(
        input_vars=["x"],
        input_dims={"time": 4},
        splits={"train": 0.75, "val": 0.25},
        batch_size=5,
        dtype="float64",
        num_workers=workers,
        load=False,
        random_offsets=True,
        batch_format="dict",
    )
    dm = XarrayDataModule(str(tmp_path / "ids.zarr"), **settings)
    model = StartRecorder()
    cpu_trainer(max_epochs=3, limit_val_batches=0).fit(model, datamodule=dm)
    assert len(model.starts) == 3
    for epoch in model.starts:
        assert len(epoch) == 15 and all(0 <= s <= 56 for s in epoch)  # span inside train
        assert sorted(s // 4 for s in epoch) == list(range(15))  # one per grid cell
    assert any(s % 4 for s in model.starts[0]) and model.starts[0] != model.starts[1]
    again = StartRecorder()
    cpu_trainer(max_epochs=3, limit_val_batches=0).fit(
        again, datamodule=XarrayDataModule(str(tmp_path / "ids.zarr"), **settings)
    )
    assert again.starts == model.starts  # reproducible from (seed, epoch)
    val = np.concatenate([b["x"][:, 0, 0].numpy() for b in dm.val_dataloader()])
    assert (val % 4 == 0).all()  # validation stays on the grid


class StartRecorder(Recorder):
    """Records each epoch's window starts (the first input value: x[t] = t)."""

    def __init__(self) -> None:
        super().__init__()
        self.starts: list[list[int]] = []

    def on_train_epoch_start(self) -> None:
        self.starts.append([])

    def training_step(self, batch, batch_idx):
        x = batch["x"]
        if not self.starts:  # resumed mid-epoch: no epoch start was announced
            self.starts.append([])
        self.starts[-1] += x[:, 0, 0].long().tolist()
        assert torch.equal(
            x[:, 0, :] - x[:, 0, :1], torch.arange(4.0, dtype=x.dtype).expand(len(x), 4)
        )
        return self.layer(x[:, :, :1].reshape(-1, 1).float()).pow(2).mean()


def test_a_sampler_from_yaml_reaches_the_datamodule_as_the_class_it_names(tmp_path):
    from xr_datamodule.cli import XarrayCLI

    config = tmp_path / "sampled.yaml"
    config.write_text(
        "seed_everything: 0\n"
        "data:\n"
        "  data: synthetic://weather\n"
        "  input_vars: [t2m]\n"
        "  input_dims: {time: 1, lat: 32, lon: 32}\n"
        "  num_workers: 0\n"
        "  sampler:\n"
        "    class_path: torch.utils.data.RandomSampler\n"
        "    init_args: {replacement: true}\n"
        "model:\n"
        "  class_path: xr_datamodule.models.DemoForecaster\n"
    )
    cli = XarrayCLI(
        pl.LightningModule,
        XarrayDataModule,
        subclass_mode_model=True,
        args=["--config", str(config), "--trainer.logger=false"],
        run=False,
    )
    dm = cli.datamodule
    assert dm.spec.sampler["class_path"] == "torch.utils.data.RandomSampler"
    dm.setup("fit")
    built = dm.pipeline.sampling.user_sampler
    assert isinstance(built, RandomSampler) and built.replacement
    assert len(built) == dm.split_sizes["train"]


def test_weighted_draws_out_of_core_are_read_chunk_by_chunk(tmp_path):
    # 400 steps in chunks of 10: 40 cells. The same draws as in memory, in an order that
    # decodes each drawn cell about once an epoch (a random order would decode one per draw).
    ids_dataset(400).chunk({"time": 10}).to_zarr(tmp_path / "ids.zarr")
    weights = {"by": "input_max", "quantile": 0.9, "boost": 5.0}
    settings = dict(sample_weights=weights, samples_per_epoch=200, batch_size=10)
    lazy = XarrayDataModule(
        str(tmp_path / "ids.zarr"),
        **{**IDS, **settings},
        load=False,
    )
    lazy.setup("fit")
    in_memory = ids_module(400, **settings)
    for epoch in (0, 1):
        drawn = np.concatenate(lazy.train_batches(epoch))
        assert sorted(drawn.tolist()) == sorted(
            np.concatenate(in_memory.train_batches(epoch)).tolist()
        )
    reader = lazy.datasets["train"].reader
    before = reader.cells_read
    seen = np.concatenate([x.numpy().ravel() for x, _ in lazy.train_dataloader()]).astype(int)
    assert sorted(seen.tolist()) == sorted(np.concatenate(lazy.train_batches(0)).tolist())
    distinct = len(np.unique(seen // 10))
    assert reader.cells_read - before <= 1.2 * distinct  # not one decode per draw (200)
    assert np.mean(seen >= 360) > 0.25  # the boosted tenth: 5/(5+9) of the draws expected


def test_random_offsets_resume_exactly_even_under_another_seed(tmp_path):
    settings = dict(
        input_dims={"time": 4},
        batch_size=5,
        random_offsets=True,
        batch_format="dict",
        splits={"train": 1.0},
    )

    def run(seed, ckpt_path=None, callbacks=()):
        model = StartRecorder()
        trainer = cpu_trainer(
            max_epochs=2, callbacks=list(callbacks), enable_checkpointing=bool(callbacks)
        )
        trainer.fit(model, datamodule=ids_module(80, seed=seed, **settings), ckpt_path=ckpt_path)
        return [s for epoch in model.starts for s in epoch]

    every = ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}"
    )
    full = run(3, callbacks=[every])
    assert len(full) == 2 * 20 and any(s % 4 for s in full)
    # The checkpoint's seed (3) is restored: the same windows as the uninterrupted run.
    assert run(99, ckpt_path=str(tmp_path / "step=3.ckpt")) == full[15:]


def test_a_checkpoint_keeps_the_chunk_layout_of_wrapped_chunk_aware_orders():
    from xr_datamodule.order import TrainingOrder, TrainSplit

    cells = np.repeat(np.arange(20), 10)
    split = TrainSplit(200, "chunks", workers=2, cells=cells, cell_bytes=1)
    for options, weights in (({"samples_per_epoch": 50}, None), ({}, np.ones(200))):
        order = TrainingOrder(seed=1, batch_size=8, **options)
        with_weights = TrainSplit(**{**split.__dict__, "weights": weights})
        order.epoch_sampler(with_weights)
        assert order.state_dict(None, None)["chunk_layout"] == list(
            order.chunk_layout(with_weights)
        )
