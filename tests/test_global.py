"""Full-field samples from time-chunked stores: isel's batches, exactly once, each chunk once."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.conftest import cpu_trainer, reference_windows
from xr_datamodule import XarrayDataModule, cells
from xr_datamodule.gather import ChunkedReader

N_LAT, N_LON = 6, 8


@pytest.fixture(autouse=True)
def chunks_are_cells(monkeypatch):
    """These stores are tiny: keep their chunks as cells (not merged to 1 MiB)."""
    monkeypatch.setattr(cells, "MIN_CELL_BYTES", 0)


def global_dataset(n_time: int, levels: int = 3) -> xr.Dataset:
    """Upper-air ``u`` on levels, surface ``t2m``, and ``step`` (the time index) everywhere."""
    rng = np.random.default_rng(0)
    shape = (n_time, N_LAT, N_LON)
    step = np.broadcast_to(np.arange(n_time, dtype=np.float32)[:, None, None], shape)
    return xr.Dataset(
        {
            "u": (
                ("time", "level", "lat", "lon"),
                rng.standard_normal((n_time, levels, N_LAT, N_LON), np.float32),
            ),
            "t2m": (("time", "lat", "lon"), rng.standard_normal(shape, np.float32)),
            "step": (("time", "lat", "lon"), step.copy()),
        },
        coords={
            "time": pd.date_range("2021-01-01", periods=n_time, freq="6h"),
            "level": [500, 700, 850][:levels],
            "lat": np.linspace(-80, 80, N_LAT),
            "lon": np.arange(N_LON) * 45.0,
        },
    )


def write(ds: xr.Dataset, path: Path, chunk: int) -> Path:
    ds.chunk({"time": chunk}).to_zarr(path, zarr_format=3, consolidated=False)
    return path


def global_module(path: Path, **settings) -> XarrayDataModule:
    """Two input steps -> the next, every full field, out of core."""
    config = dict(
        input_vars=["u", "t2m"],
        input_dims={"time": 2, "lat": N_LAT, "lon": N_LON},
        input_overlap={"time": 1},
        target_dims={"time": 1, "lat": N_LAT, "lon": N_LON},
        target_offset={"time": 2},
        splits={"train": 0.8, "val": 0.2},
        batch_size=5,
        load=False,
        open_kwargs={"consolidated": False},
    )
    return XarrayDataModule(str(path), **{**config, **settings})


@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("shuffle", ["chunks", "full"])
@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_gives_isel_batches_each_sample_once(tmp_path, chunk, shuffle, workers):
    ds = global_dataset(60)
    dm = global_module(write(ds, tmp_path / "g.zarr", chunk), shuffle=shuffle, num_workers=workers)
    dm.setup("fit")
    assert dm.train_shuffle == shuffle
    assert dm.input_shape == (3 + 1, 2, N_LAT, N_LON)  # u on 3 levels, t2m
    reader = dm.datasets["train"].reader
    assert isinstance(reader, ChunkedReader)
    assert reader.grid.edges[0].tolist() == list(range(0, 61, chunk))  # the chunks are the cells
    expected_ids = dm.train_batches(epoch=0)
    delivered = [(X.clone(), y.clone()) for X, y in dm.train_dataloader()]
    assert len(delivered) == len(expected_ids)
    ids = np.concatenate(expected_ids)
    assert np.array_equal(np.sort(ids), np.arange(dm.split_sizes["train"]))
    geometry = dm.geometry
    for (X, y), batch in zip(delivered, expected_ids, strict=True):
        starts = dm.indices["train"].starts(batch)
        reference_x = reference_windows(ds, ["u", "t2m"], geometry.dims, starts, (2, N_LAT, N_LON))
        reference_y = reference_windows(
            ds, ["u", "t2m"], geometry.dims, starts + np.array([2, 0, 0]), (1, N_LAT, N_LON)
        )
        np.testing.assert_array_equal(X.numpy(), reference_x)
        np.testing.assert_array_equal(y.numpy(), reference_y)


def test_the_chunk_aware_order_decodes_each_chunk_about_once_and_mixes_dates(tmp_path):
    ds = global_dataset(400, levels=1)
    path = write(ds, tmp_path / "g.zarr", 1)
    dm = global_module(path, splits={"train": 1.0}, batch_size=8, num_workers=0)
    dm.setup("fit")
    # A cell (one step) holds one sample: auto gives a stream per sample of a batch.
    assert dm.chunk_layout() == (1, 8)
    reader = dm.datasets["train"].reader
    assert reader.grid.cells_per_sample == 3
    batches = sum(1 for _ in dm.train_dataloader())
    assert batches == -(-398 // 8)
    assert reader.cells_read <= 1.1 * 400
    # Batches are about as spread out in time as a full shuffle's.
    assert dm.batch_spread("time") > 0.8
    full = global_module(path, splits={"train": 1.0}, batch_size=8, shuffle="full")
    assert 0.9 < full.batch_spread("time") < 1.1


class StepRecorder(pl.LightningModule):
    """Records the time index of every training sample (the ``step`` variable's value)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        inputs, _ = batch
        self.seen.append(inputs[:, 0, 0, 0, 0].long().tolist())
        return self.layer(inputs[:, :1, 0, 0, 0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_mid_epoch_resume_out_of_core_sees_exactly_what_remained(tmp_path, workers):
    path = write(global_dataset(80, levels=1), tmp_path / "g.zarr", 1)

    def fit(ckpt_path=None, callbacks=()):
        dm = global_module(
            path, input_vars=["step"], splits={"train": 1.0}, batch_size=6, num_workers=workers
        )
        model = StepRecorder()
        trainer = cpu_trainer(
            max_epochs=2,
            callbacks=list(callbacks),
            enable_checkpointing=bool(callbacks),
            default_root_dir=tmp_path,
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model.seen

    every = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    full = fit(callbacks=[every])
    per_epoch = -(-78 // 6)
    assert len(full) == 2 * per_epoch
    for epoch in range(2):
        seen = [i for batch in full[epoch * per_epoch : (epoch + 1) * per_epoch] for i in batch]
        assert sorted(seen) == list(range(78))  # every sample once per epoch
    assert full[:per_epoch] != full[per_epoch:]  # a new order each epoch
    for step in (4, 16):  # mid epoch 0, mid epoch 1
        checkpoint = tmp_path / f"epoch={step // per_epoch}-step={step}.ckpt"
        assert fit(ckpt_path=str(checkpoint)) == full[step:]
