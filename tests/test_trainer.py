"""A real Lightning Trainer on CPU: fit, validate, test and predict through the datamodule."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from tests.conftest import FORECAST, cpu_trainer
from xr_datamodule import XarrayDataModule
from xr_datamodule.models import DemoForecaster


def run_all_stages(dm: XarrayDataModule, **trainer_kwargs) -> list[torch.Tensor]:
    model = DemoForecaster(dm.input_shape, dm.target_shape, hidden_channels=8)
    trainer = cpu_trainer(**trainer_kwargs)
    trainer.fit(model, datamodule=dm)
    assert trainer.state.finished
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    validated = trainer.validate(model, datamodule=dm)
    tested = trainer.test(model, datamodule=dm)
    assert "val_loss" in validated[0] and "test_loss" in tested[0]
    return trainer.predict(model, datamodule=dm)


def test_synthetic_through_all_stages():
    dm = XarrayDataModule(
        "synthetic://weather",
        input_vars=["t2m", "u10", "v10"],
        target_vars=["t2m"],
        input_dims={"time": 2, "lat": 32, "lon": 32},
        input_overlap={"lon": 16},
        target_dims={"time": 1, "lat": 32, "lon": 32},
        target_offset={"time": 2},
        splits={
            "train": {"time": ["2019-03-01", "2019-03-07T23"]},
            "val": {"time": ["2019-03-08", "2019-03-09T23"]},
            "test": {"time": ["2019-03-10", "2019-03-11T23"]},
            "predict": {"time": ["2019-03-12", "2019-03-12T23"]},
        },
        batch_size=16,
    )
    predictions = run_all_stages(dm, limit_train_batches=4)
    assert sum(len(p) for p in predictions) == len(dm.datasets["predict"])
    assert predictions[0].shape[1:] == dm.target_shape


def test_real_netcdf_through_all_stages(era_path):
    dm = XarrayDataModule(
        str(era_path),
        input_vars=["u", "v"],
        target_vars=["z"],
        input_dims={"latitude": 32, "longitude": 32},
        input_overlap={"latitude": 16},
        splits={"train": 0.6, "val": 0.2, "test": 0.2},
        split_dim="longitude",
        batch_size=8,
    )
    # month (2) and level (3) are not windowed: they fold into channels.
    assert dm.input_shape == (2 * 2 * 3, 32, 32)
    assert dm.target_shape == (2 * 3, 32, 32)
    assert dm.input_channel_names[:2] == ["u[month=1,level=200]", "u[month=1,level=500]"]
    predictions = run_all_stages(dm, limit_train_batches=3)
    assert sum(len(p) for p in predictions) == len(dm.datasets["test"])
    # The file stays lazily indexed: the datamodule never loaded it whole.
    assert not dm.source["u"].variable._in_memory


def test_fit_twice_reuses_setup():
    dm = XarrayDataModule(
        "synthetic://weather",
        input_vars=["t2m"],
        input_dims={"time": 1, "lat": 16, "lon": 16},
        batch_size=64,
    )
    model = DemoForecaster(dm.input_shape, dm.target_shape, hidden_channels=4)
    for _ in range(2):
        cpu_trainer(max_steps=2, limit_val_batches=1).fit(model, datamodule=dm)
    assert sorted(dm.datasets) == ["train", "val"]


@pytest.mark.parametrize("workers", [2])
def test_fit_with_workers(workers):
    dm = XarrayDataModule(
        "synthetic://weather",
        input_vars=["t2m", "u10"],
        input_dims={"time": 1, "lat": 16, "lon": 16},
        batch_size=32,
        num_workers=workers,
    )
    model = DemoForecaster(dm.input_shape, dm.target_shape, hidden_channels=4)
    trainer = cpu_trainer(limit_train_batches=3, limit_val_batches=2)
    trainer.fit(model, datamodule=dm)
    assert trainer.state.finished


def test_demo_learns_the_synthetic_target_beyond_climatology():
    dm = XarrayDataModule("synthetic://weather", **FORECAST)
    dm.setup("fit")
    train_mean = torch.cat([y for _, y in dm.train_dataloader()]).mean()
    climatology = torch.cat([(y - train_mean) ** 2 for _, y in dm.val_dataloader()]).mean()
    pl.seed_everything(0)
    model = DemoForecaster(dm.input_shape, dm.target_shape, hidden_channels=16, lr=2e-3)
    trainer = cpu_trainer(max_epochs=2, limit_train_batches=30)
    trainer.fit(model, datamodule=dm)
    assert float(trainer.callback_metrics["val_loss"]) < 0.2 * float(climatology)


def test_the_iterable_style_with_workers_runs_without_lightnings_length_warning():
    import warnings

    dm = XarrayDataModule(
        "synthetic://weather", **FORECAST, style="iterable", num_workers=2, persistent_workers=False
    )
    model = DemoForecaster(dm.input_shape, dm.target_shape, hidden_channels=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpu_trainer(limit_train_batches=3, limit_val_batches=1).fit(model, datamodule=dm)
    assert not [w for w in caught if "has `__len__` defined" in str(w.message)]
