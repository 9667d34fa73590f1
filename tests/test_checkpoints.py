"""The datamodule's checkpoints load under torch's safe default (weights_only=True)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tests.conftest import cpu_trainer
from xr_datamodule import XarrayDataModule
from xr_datamodule.models import DemoForecaster
from xr_datamodule.spec import plain


def test_every_argument_type_survives_a_weights_only_checkpoint(zarr_path: Path, tmp_path):
    stats = tmp_path / "stats.json"
    names = ["a", "b"]
    stats.write_text(
        json.dumps({"mean": dict.fromkeys(names, 0.0), "std": dict.fromkeys(names, 1.0)})
    )
    dm = XarrayDataModule(
        zarr_path,  # a pathlib.Path
        input_vars=("a", "b"),  # a tuple
        input_dims={"time": np.int64(2), "lat": 4, "lon": 5},  # a numpy integer
        target_vars=["a"],
        target_offset={"time": 2},
        target_dims={"time": 1, "lat": 4, "lon": 5},
        splits={
            "train": {"time": [pd.Timestamp("2020-01-01"), np.datetime64("2020-01-25")]},
            "val": {"time": [datetime.datetime(2020, 1, 26), None]},
        },
        stats=stats,  # a Path
        batch_size=np.int32(4),
        fill_value=np.float32(0.5),
        nan_policy="fill",
        time_step="1D",
    )
    model = DemoForecaster(dm.input_shape, dm.target_shape, hidden_channels=2)
    trainer = cpu_trainer(max_steps=2, max_epochs=None, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    path = tmp_path / "safe.ckpt"
    trainer.save_checkpoint(path)
    stored = torch.load(path, weights_only=True)  # raised UnpicklingError before
    hyper = stored["datamodule_hyper_parameters"]
    assert hyper["data"] == str(zarr_path)
    assert hyper["splits"]["train"]["time"] == ["2020-01-01T00:00:00", "2020-01-25T00:00:00"]
    restored = XarrayDataModule.load_from_checkpoint(path)
    assert restored.split_sizes == dm.split_sizes
    assert restored.input_shape == dm.input_shape


def test_plain_converts_what_a_checkpoint_cannot_hold():
    value = {
        "p": Path("x.zarr"),
        "t": (np.int64(3), np.float32(0.5)),
        "a": np.arange(3),
        "s": slice(np.int64(1), None),
    }
    assert plain(value) == {
        "p": "x.zarr",
        "t": [3, 0.5],
        "a": [0, 1, 2],
        "s": {"start": 1, "stop": None},
    }


def test_hostile_checkpoint_state_is_refused_naming_it(small_ds):
    import pytest

    config = dict(input_vars=["a"], input_dims={"time": 2, "lat": 4, "lon": 5}, batch_size=4)
    for state, message in (
        ({"seed": 0, "epoch": 0, "batches_done": 10**18}, "more than an epoch holds"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"seed": 0, "epoch": "0", "batches_done": 3}, "epoch must be a non-negative integer"),
        ({"seed": 0, "statistics": {"mean": {"a": [0.0]}, "std": {"a": [0.0]}}}, "unusable"),
    ):
        with pytest.raises(ValueError, match=message):
            XarrayDataModule(small_ds, **config).load_state_dict(state)


def test_a_store_declaring_absurdly_many_steps_is_refused_clearly(tmp_path):
    import pytest
    import zarr

    group = zarr.open_group(str(tmp_path / "huge.zarr"), mode="w", zarr_format=3)
    array = group.create_array(
        "v", shape=(10**12, 4), chunks=(10**6, 4), dtype="f4", dimension_names=["time", "x"]
    )
    array[:2] = 1.0
    dm = XarrayDataModule(
        str(tmp_path / "huge.zarr"),
        input_vars=["v"],
        input_dims={"time": 1, "x": 4},
        open_kwargs={"consolidated": False},
    )
    with pytest.raises(ValueError, match=r"window starts along 'time' would take .* GiB of index"):
        dm.setup()
