"""Z-score normalisation: train-only statistics, out of core, in checkpoints, on the device."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr

from tests.conftest import cpu_trainer, reference_windows
from xr_datamodule import XarrayDataModule
from xr_datamodule.models import DemoForecaster

CONFIG = dict(
    input_vars=["c", "a"],
    target_vars=["b"],
    input_dims={"time": 2, "lat": 4, "lon": 5},
    splits={"train": {"time": [None, "2020-01-20"]}, "val": {"time": ["2020-01-21", None]}},
    batch_size=8,
    dtype="float64",
    normalize="zscore",
)


def brute_force_stats(ds: xr.Dataset) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    train = ds.isel(time=slice(0, 20))  # 2020-01-01 .. 2020-01-20, the train split only
    out = {}
    for name in ("c", "a", "b"):
        values = train[name].transpose(..., "time", "lat", "lon").values.astype(np.float64)
        flat = values.reshape(-1, 20 * 12 * 10)
        out[name] = (flat.mean(axis=1), flat.std(axis=1))
    return out


@pytest.mark.parametrize("opened", ["memory", "zarr"])
def test_statistics_come_from_the_train_split_only(small_ds, zarr_path, opened):
    data = small_ds if opened == "memory" else str(zarr_path)
    dm = XarrayDataModule(data, **CONFIG, load=opened == "memory")
    dm.setup("fit")
    expected = brute_force_stats(small_ds)
    for name, (mean, std) in expected.items():
        np.testing.assert_allclose(dm.statistics.mean[name], mean, rtol=1e-10)
        np.testing.assert_allclose(dm.statistics.std[name], std, rtol=1e-10)
    assert len(dm.statistics.mean["c"]) == 3  # one per level


@pytest.mark.parametrize("load", [True, False])
def test_batches_are_normalised_per_channel(small_ds, load):
    dm = XarrayDataModule(small_ds, **CONFIG, load=load)
    dm.setup("fit")
    ids = np.arange(len(dm.datasets["val"]))
    batch = dm.datasets["val"].__getitems__(ids)
    starts = dm.indices["val"].starts(ids)
    stats = brute_force_stats(small_ds)
    raw = reference_windows(small_ds, ["c", "a"], dm.window_dims, starts, dm.geometry.input_size)
    mean = np.concatenate([stats["c"][0], stats["a"][0]]).reshape(1, -1, 1, 1, 1)
    std = np.concatenate([stats["c"][1], stats["a"][1]]).reshape(1, -1, 1, 1, 1)
    np.testing.assert_allclose(batch.inputs, (raw - mean) / std, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        dm.denormalize(batch.targets),
        reference_windows(small_ds, ["b"], dm.window_dims, starts, dm.geometry.target_size),
        rtol=1e-9,
    )


def test_device_normalisation_matches_gather_normalisation(small_ds):
    on_gather = XarrayDataModule(small_ds, **CONFIG)
    on_device = XarrayDataModule(small_ds, **CONFIG, normalize_on="device")
    expected = next(iter(on_gather.val_dataloader()))
    raw = next(iter(on_device.val_dataloader()))
    assert not torch.allclose(raw[0], expected[0])  # the loader hands out raw values
    moved = on_device.on_after_batch_transfer(raw, 0)
    for got, want in zip(moved, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_statistics_travel_in_checkpoints(zarr_path, tmp_path):
    config = {**CONFIG, "dtype": "float32"}
    dm = XarrayDataModule(str(zarr_path), **config)
    model = DemoForecaster(dm.input_shape, dm.target_shape, hidden_channels=4)
    trainer = cpu_trainer(max_steps=2, max_epochs=None)
    trainer.fit(model, datamodule=dm)
    checkpoint = tmp_path / "norm.ckpt"
    trainer.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=False)["XarrayDataModule"]["statistics"]
    assert saved == dm.statistics.to_dict()
    restored = XarrayDataModule.load_from_checkpoint(checkpoint)
    assert restored.pipeline.statistics_origin == "checkpoint"  # restored, not recomputed
    assert restored.statistics.to_dict() == saved
    # On resume the stored statistics win, even over a changed store.
    other = XarrayDataModule(str(zarr_path), **config)
    other.load_state_dict(
        {
            "seed": 0,
            "statistics": {
                "mean": {k: [0.0] * len(v) for k, v in saved["mean"].items()},
                "std": {k: [1.0] * len(v) for k, v in saved["std"].items()},
            },
        }
    )
    X, _ = next(iter(other.val_dataloader()))
    plain = XarrayDataModule(str(zarr_path), **{**config, "normalize": None})
    torch.testing.assert_close(X, next(iter(plain.val_dataloader()))[0])


def test_explicit_statistics_from_a_dict_or_a_json_file(small_ds, tmp_path):
    stats = {
        "mean": {"c": [1.0, 2.0, 3.0], "a": 0.5, "b": -1.0},
        "std": {"c": 2.0, "a": 4.0, "b": 0.5},
    }
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(stats))
    for given in (stats, str(path)):
        dm = XarrayDataModule(small_ds, **{**CONFIG, "normalize": None}, stats=given)
        dm.setup("fit")
        assert dm.statistics.mean["c"] == [1.0, 2.0, 3.0] and dm.statistics.std["c"] == [2.0] * 3
        batch = dm.datasets["train"].__getitems__([0])
        starts = dm.indices["train"].starts([0])
        raw = reference_windows(small_ds, ["b"], dm.window_dims, starts, dm.geometry.target_size)
        np.testing.assert_allclose(batch.targets, (raw + 1.0) / 0.5)


@pytest.mark.parametrize(
    ("stats", "error", "pattern"),
    [
        (
            {"mean": {"c": 0, "a": 0}, "std": {"c": 1, "a": 1, "b": 1}},
            KeyError,
            r"stats\['mean'\] has no entry for variable 'b'",
        ),
        (
            {"mean": {"c": [0, 0], "a": 0, "b": 0}, "std": {"c": 1, "a": 1, "b": 1}},
            ValueError,
            r"stats\['mean'\]\['c'\] has 2 values; 'c' has 3 channels",
        ),
        (
            {"mean": {"c": 0, "a": 0, "b": 0}, "std": {"c": 1, "a": 0, "b": 1}},
            ValueError,
            r"stats\['std'\]\['a'\] must be positive",
        ),
    ],
)
def test_bad_statistics(small_ds, stats, error, pattern):
    dm = XarrayDataModule(small_ds, **CONFIG, stats=stats)
    with pytest.raises(error, match=pattern):
        dm.setup("fit")


def test_bad_normalisation_settings(small_ds):
    with pytest.raises(ValueError, match=r"normalize must be one of \(None, 'zscore', 'std'"):
        XarrayDataModule(small_ds, **{**CONFIG, "normalize": "robust"})
    with pytest.raises(ValueError, match=r"normalize\['b'\]: unknown method 'log'. Valid:"):
        XarrayDataModule(small_ds, **{**CONFIG, "normalize": {"b": "log"}})
    with pytest.raises(KeyError, match=r"normalize: \['q'\] are not selected variables"):
        XarrayDataModule(small_ds, **{**CONFIG, "normalize": {"q": "std"}}).setup("fit")
    with pytest.raises(ValueError, match=r"normalize_on must be one of"):
        XarrayDataModule(small_ds, **CONFIG, normalize_on="cpu")
    with pytest.raises(ValueError, match=r"with a transform the channels"):
        XarrayDataModule(small_ds, **CONFIG, transform=lambda ds: ds)


def test_to_xarray_returns_physical_units(small_ds):
    dm = XarrayDataModule(small_ds, **CONFIG)
    truth = [y for _, y in dm.val_dataloader()]
    grid = dm.to_xarray(truth, split="val")
    covered = grid.b.notnull()
    expected = small_ds.b.sel(time=grid.time)
    xr.testing.assert_allclose(grid.b.where(covered), expected.where(covered).astype(float))


def test_a_checkpoint_of_an_in_memory_dataset_asks_for_the_data(small_ds, tmp_path):
    config = {**CONFIG, "dtype": "float32"}
    dm = XarrayDataModule(small_ds, **config)
    model = DemoForecaster(dm.input_shape, dm.target_shape, hidden_channels=4)
    trainer = cpu_trainer(max_steps=1, max_epochs=None)
    trainer.fit(model, datamodule=dm)
    checkpoint = tmp_path / "memory.ckpt"
    trainer.save_checkpoint(checkpoint)
    with pytest.raises(TypeError, match=r"memory.ckpt: this datamodule was built from an in-mem"):
        XarrayDataModule.load_from_checkpoint(checkpoint)
    restored = XarrayDataModule.load_from_checkpoint(checkpoint, data=small_ds)
    assert restored.statistics.to_dict() == dm.statistics.to_dict()
    assert restored.input_shape == dm.input_shape


def test_each_variable_is_normalised_by_its_method(small_ds):
    methods = {"a": "std", "c": "minmax", "b": "max", "default": "none"}
    settings = {**CONFIG, "input_vars": ["a", "c"], "target_vars": ["b"], "normalize": methods}
    dm = XarrayDataModule(small_ds, **settings)
    dm.setup("fit")
    # Brute force: numpy over the training split's region.
    train = small_ds.isel(
        {dim: slice(lo, hi) for dim, (lo, hi) in dm.split_bounds["train"].items()}
    )
    a, b = train.a.values, train.b.values.astype(np.float64)
    c = train.c.transpose("level", ...).values.reshape(3, -1)
    offset = np.concatenate([[0.0], c.min(axis=1)])
    scale = np.concatenate([[a.std()], c.max(axis=1) - c.min(axis=1)])
    X, y = next(iter(dm.val_dataloader()))
    starts = dm.indices["val"].starts(np.arange(len(X)))
    raw = reference_windows(small_ds, ["a", "c"], dm.window_dims, starts, dm.geometry.input_size)
    expected = (raw - offset.reshape(1, -1, 1, 1, 1)) / scale.reshape(1, -1, 1, 1, 1)
    np.testing.assert_allclose(X.numpy(), expected, rtol=1e-5, atol=1e-6)
    at = starts + np.asarray(dm.geometry.target_offset)
    raw_y = reference_windows(small_ds, ["b"], dm.window_dims, at, dm.geometry.target_size)
    np.testing.assert_allclose(y.numpy(), raw_y / np.abs(b).max(), rtol=1e-5, atol=1e-6)
    # Inverted per method.
    np.testing.assert_allclose(dm.denormalize(y).numpy(), raw_y, rtol=1e-5, atol=1e-5)
    assert set(dm.state_dict()["statistics"]) == {"mean", "std", "min", "max"}
