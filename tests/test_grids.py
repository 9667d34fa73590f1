"""Variables on several grids: downscaling pairs, bands at several resolutions, series.

Every window is checked against brute force: ``ds.sel`` by coordinates on each grid, over
the region the primary window's cells cover.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from tests.conftest import cpu_trainer
from xr_datamodule import XarrayDataModule
from xr_datamodule.grids import align_dim
from xr_datamodule.models import DemoForecaster

COARSE, FINE = 5.625, 2.8125  # ClimateLearn's downscaling pair


def downscaling_pair(n_time: int = 16, seed: int = 0, factor: int = 2) -> xr.Dataset:
    """Global t2m at 5.625 deg and on a grid ``factor`` times finer per axis, north to south."""
    rng = np.random.default_rng(seed)
    fine_step = COARSE / factor
    lat = 90 - COARSE / 2 - COARSE * np.arange(32)
    lon = COARSE * np.arange(64)
    lat_hr = 90 - fine_step / 2 - fine_step * np.arange(32 * factor)
    lon_hr = -COARSE / 2 + fine_step / 2 + fine_step * np.arange(64 * factor)
    time = pd.date_range("2000-01-01", periods=n_time, freq="6h")
    fine = rng.standard_normal((n_time, 32 * factor, 64 * factor)).astype("f4") * 3 + 280
    coarse = fine.reshape(n_time, 32, factor, 64, factor).mean(axis=(2, 4))
    coarse += rng.standard_normal((n_time, 32, 64)).astype("f4")
    return xr.Dataset(
        {
            "t2m": (("time", "lat", "lon"), coarse),
            "t2m_hr": (("time", "lat_hr", "lon_hr"), fine),
        },
        coords={"time": time, "lat": lat, "lon": lon, "lat_hr": lat_hr, "lon_hr": lon_hr},
    )


def eo_scene(n_time: int = 6, side: int = 48, seed: int = 1) -> xr.Dataset:
    """Bands at 10, 20 and 60 m over one scene; the 60 m grid starts 60 m inside it."""
    rng = np.random.default_rng(seed)
    x10, y10 = 5 + 10 * np.arange(side), 1000 - 5 - 10 * np.arange(side)
    x20, y20 = 10 + 20 * np.arange(side // 2), 1000 - 10 - 20 * np.arange(side // 2)
    x60 = 90 + 60 * np.arange(side // 6 - 1)  # cells from 60 m on
    y60 = 1000 - 30 - 60 * np.arange(side // 6)
    time = pd.date_range("2021-06-01", periods=n_time, freq="5D")
    coords = {"time": time, "x": x10, "y": y10, "x20": x20, "y20": y20, "x60": x60, "y60": y60}
    for name in ("x", "x20", "x60"):
        coords[name] = xr.DataArray(coords[name], dims=name, attrs={"axis": "X"})
    for name in ("y", "y20", "y60"):
        coords[name] = xr.DataArray(coords[name], dims=name, attrs={"axis": "Y"})
    shape = lambda n_y, n_x: (n_time, n_y, n_x)  # noqa: E731
    return xr.Dataset(
        {
            "b04": (("time", "y", "x"), rng.random(shape(side, side), np.float32)),
            "b11": (("time", "y20", "x20"), rng.random(shape(side // 2, side // 2), np.float32)),
            "b01": (
                ("time", "y60", "x60"),
                rng.random(shape(side // 6, side // 6 - 1), np.float32),
            ),
            "label": (("time", "y", "x"), rng.random(shape(side, side), np.float32)),
        },
        coords=coords,
    )


# Bands at 10, 20 and 60 m in, a 10 m label out; dict batches (inputs on three grids).
BANDS = dict(
    input_vars=["b04", "b11", "b01"],
    target_vars=["label"],
    input_dims={"time": 1, "y": 12, "x": 12},
    splits={"train": 0.5, "val": 0.5},
    batch_size=4,
    batch_format="dict",
)


def cells_of(ds: xr.Dataset, var: str, labels: dict[str, np.ndarray], follows: dict) -> np.ndarray:
    """Brute force: ``var`` over the region of the primary cells ``labels`` (by ``sel``)."""
    where = {}
    for dim in ds[var].dims:
        primary = follows.get(dim, dim)
        values = labels[primary]
        if primary == dim:
            where[dim] = values
            continue
        step = abs(float(ds[primary][1] - ds[primary][0]))
        lo, hi = values.min() - step / 2, values.max() + step / 2
        own = ds[dim].values
        inside = own[(own > lo) & (own < hi)]
        where[dim] = inside
    return ds[var].sel(where).values


def test_alignment_of_nested_grids_and_the_errors_for_others():
    ds = downscaling_pair(2)
    lat = align_dim(ds, "lat_hr", "lat")
    assert (lat.num, lat.den, lat.shift) == (2, 1, 0)
    lon = align_dim(ds, "lon_hr", "lon")
    assert lon.positions(np.array([0, 1, 63])).tolist() == [0, 2, 126]
    shifted = ds.assign_coords(lon_hr=ds.lon_hr + FINE / 2)  # centres on the coarse edges
    with pytest.raises(ValueError, match="do not nest"):
        align_dim(shifted, "lon_hr", "lon")
    flipped = ds.assign_coords(lat_hr=ds.lat_hr.values[::-1])
    with pytest.raises(ValueError, match="runs the other way"):
        align_dim(flipped, "lat_hr", "lat")
    odd = ds.assign_coords(lon_hr=ds.lon_hr * np.sqrt(0.5))
    with pytest.raises(ValueError, match="small whole numbers"):
        align_dim(odd, "lon_hr", "lon")


@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("window", [{"lat": 8, "lon": 16}, {"lat": 32, "lon": 64}])
def test_downscaling_windows_equal_sel_on_the_fine_grid(window, factor):
    ds = downscaling_pair(factor=factor)
    dm = XarrayDataModule(
        ds,
        input_vars=["t2m"],
        target_vars=["t2m_hr"],
        input_dims={"time": 1, **window},
        batch_size=8,
        batch_format="dict",
    )
    dm.setup("fit")
    assert dm.target_shape == (1, 1, factor * window["lat"], factor * window["lon"])
    follows = {"lat_hr": "lat", "lon_hr": "lon"}
    seen = 0
    for batch in dm.val_dataloader():
        for k in range(len(batch["x"])):
            labels = {
                "time": batch["input_time"][k].numpy().astype("datetime64[ns]"),
                "lat": batch["input_lat"][k].numpy(),
                "lon": batch["input_lon"][k].numpy(),
            }
            x = ds["t2m"].sel(labels).values
            np.testing.assert_array_equal(batch["x"][k, 0].numpy(), x)
            y = cells_of(ds, "t2m_hr", labels, follows)
            np.testing.assert_array_equal(batch["y"][k, 0].numpy(), y)
            np.testing.assert_array_equal(
                batch["target_lat_hr"][k].numpy(),
                ds.lat_hr.sel(lat_hr=batch["target_lat_hr"][k].numpy()),
            )
            seen += 1
    assert seen == len(dm.datasets["val"])


def test_three_grids_of_bands_equal_sel_and_windows_start_on_the_coarsest_cells():
    ds = eo_scene()
    dm = XarrayDataModule(
        ds,
        **BANDS,
    )
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert tuple(batch["x_y20_x20"].shape[1:]) == (1, 1, 6, 6)
    assert tuple(batch["x_y60_x60"].shape[1:]) == (1, 1, 2, 2)
    # The 60 m grid starts at x = 60 m: windows start there, on its cell edges.
    starts = dm.indices["val"].axis_starts
    assert starts[2].tolist() == [6, 18, 30]
    follows = {"y20": "y", "x20": "x", "y60": "y", "x60": "x"}
    for batch in dm.val_dataloader():
        for k in range(len(batch["x"])):
            labels = {
                "time": batch["input_time"][k].numpy().astype("datetime64[ns]"),
                "y": batch["input_y"][k].numpy(),
                "x": batch["input_x"][k].numpy(),
            }
            for key, var in (("x", "b04"), ("x_y20_x20", "b11"), ("x_y60_x60", "b01")):
                np.testing.assert_array_equal(
                    batch[key][k, 0].numpy(), cells_of(ds, var, labels, follows)
                )
            np.testing.assert_array_equal(batch["y"][k, 0].numpy(), ds["label"].sel(labels))


def test_a_series_beside_fields_as_a_vector_and_as_channels():
    ds = downscaling_pair(24)[["t2m"]]
    co2 = np.linspace(370, 380, 24).astype("f4")
    ds["co2"] = ("time", co2)
    common = dict(
        input_vars=["t2m", "co2"],
        target_vars=["t2m"],
        input_dims={"time": 2, "lat": 32, "lon": 64},
        input_overlap={"time": 1},
        batch_size=4,
    )
    dm = XarrayDataModule(ds, batch_format="dict", **common)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    n = len(batch["x"])
    assert n > 1 and tuple(batch["x_series"].shape) == (n, 1, 2)
    times = batch["input_time"].numpy().astype("datetime64[ns]")
    expected = np.stack([ds["co2"].sel(time=t).values for t in times])
    np.testing.assert_array_equal(batch["x_series"][:, 0].numpy(), expected)
    broadcast = XarrayDataModule(ds, series_as="channels", normalize="zscore", **common)
    broadcast.setup("fit")
    assert broadcast.input_shape == (2, 2, 32, 64)
    assert broadcast.input_channel_names == ["t2m", "co2"]
    X, _ = next(iter(broadcast.val_dataloader()))
    stats = broadcast.statistics.to_dict()
    mean, std = stats["mean"]["co2"][0], stats["std"]["co2"][0]
    lo, hi = broadcast.pipeline.plan.split_bounds["train"]["time"]
    assert mean == pytest.approx(co2[lo:hi].mean(), rel=1e-6)
    scaled = (expected - mean) / std
    np.testing.assert_allclose(
        X[:, 1].numpy(), np.broadcast_to(scaled[:, :, None, None], (n, 2, 32, 64)), rtol=1e-5
    )


@pytest.fixture
def pair_zarr(tmp_path):
    path = tmp_path / "pair.zarr"
    downscaling_pair(24).chunk({"time": 1}).to_zarr(path)
    return path


DOWNSCALE = dict(
    input_vars=["t2m"],
    target_vars=["t2m_hr"],
    input_dims={"time": 1, "lat": 16, "lon": 32},
    batch_size=8,
    normalize="zscore",
)


@pytest.mark.parametrize(("load", "workers"), [(True, 0), (False, 0), (False, 2)])
def test_downscaling_through_a_trainer_and_back_on_the_fine_grid(pair_zarr, load, workers):
    dm = XarrayDataModule(str(pair_zarr), load=load, num_workers=workers, **DOWNSCALE)
    model = DemoForecaster(dm.input_shape, dm.target_shape, hidden_channels=4)
    trainer = cpu_trainer(max_epochs=1)
    trainer.fit(model, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert dm.loads_into_memory is load
    predicted = trainer.predict(model, datamodule=dm)
    assert tuple(predicted[0].shape[1:]) == dm.target_shape == (1, 1, 32, 64)
    # The targets themselves, put back, are the fine grid's values: y's windows cover it.
    truth = [y for _, y in dm.predict_dataloader()]
    first = dm.denormalize(truth[0])[0, 0, 0].numpy()  # in kelvin again, on the fine grid
    start = dm.indices["test"].starts([0])[0]
    fine = xr.open_zarr(pair_zarr)["t2m_hr"].isel(time=start[0], lat_hr=slice(0, 32))
    np.testing.assert_allclose(first, fine.isel(lon_hr=slice(0, 64)).values, rtol=1e-5)
    back = dm.to_xarray(truth)["t2m_hr"]
    assert back.dims[-2:] == ("lat_hr", "lon_hr")
    expected = xr.open_zarr(pair_zarr)["t2m_hr"].sel(time=back.time)
    np.testing.assert_allclose(back.values, expected.values, rtol=1e-5)


def test_every_training_sample_once_per_epoch_with_workers_out_of_core(pair_zarr):
    dm = XarrayDataModule(
        str(pair_zarr), load=False, num_workers=2, batch_format="dict", **DOWNSCALE
    )
    dm.setup("fit")
    ds = xr.open_zarr(pair_zarr)
    mean, std = (dm.statistics.to_dict()[k]["t2m_hr"][0] for k in ("mean", "std"))
    seen = []
    for batch in dm.train_dataloader():
        seen += batch["sample"].tolist()
        k = len(seen) % len(batch["x"])
        labels = {
            "time": batch["input_time"][k].numpy().astype("datetime64[ns]"),
            "lat": batch["input_lat"][k].numpy(),
            "lon": batch["input_lon"][k].numpy(),
        }
        y = cells_of(ds, "t2m_hr", labels, {"lat_hr": "lat", "lon_hr": "lon"})
        np.testing.assert_allclose(batch["y"][k, 0].numpy() * std + mean, y, rtol=1e-5)
    assert sorted(seen) == list(range(len(dm.datasets["train"])))


def test_statistics_of_other_grids_travel_in_the_state_dict():
    ds = downscaling_pair()
    dm = XarrayDataModule(ds, **DOWNSCALE)
    dm.setup("fit")
    state = dm.state_dict()
    assert "t2m_hr" in state["grid_statistics"]["lat_hr_lon_hr"]["mean"]
    shifted = ds.assign(t2m_hr=ds.t2m_hr + 100)  # statistics computed here would differ
    other = XarrayDataModule(shifted, **DOWNSCALE)
    other.setup("fit")
    other.load_state_dict(state)
    assert other.statistics.to_dict() == dm.statistics.to_dict()
    batch = other.datasets["val"].__getitems__(np.arange(2))
    reference = dm.datasets["val"].__getitems__(np.arange(2))
    np.testing.assert_allclose(
        batch.targets, reference.targets + 100 / dm.statistics.std["t2m_hr"][0], rtol=1e-4
    )


class _AllGrids(pl.LightningModule):
    """Every input grid repeated onto y's, then one convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = torch.nn.Conv2d(channels, 1, 3, padding=1)

    def _inputs(self, batch: dict) -> torch.Tensor:
        size = batch["y"].shape[-2:]
        planes = [batch[k].flatten(1, -3) for k in sorted(batch) if k.startswith("x")]
        planes = [torch.nn.functional.interpolate(p, size=size) for p in planes]
        return torch.cat(planes, dim=1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = ((self.net(self._inputs(batch)) - batch["y"].flatten(1, -3)) ** 2).mean()
        self.log("train_loss", loss, batch_size=len(batch["y"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss = ((self.net(self._inputs(batch)) - batch["y"].flatten(1, -3)) ** 2).mean()
        self.log("val_loss", loss, batch_size=len(batch["y"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_three_grids_through_a_trainer():
    dm = XarrayDataModule(
        eo_scene(),
        **BANDS,
    )
    trainer = cpu_trainer(max_epochs=1)
    trainer.fit(_AllGrids(channels=3), datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert dm.grids == {
        "x_y20_x20": {"shape": (1, 1, 6, 6), "channels": ["b11"]},
        "x_y60_x60": {"shape": (1, 1, 2, 2), "channels": ["b01"]},
    }


def test_clear_errors_for_grids_that_cannot_be_read_together():
    ds = downscaling_pair(8)
    base = dict(input_dims={"time": 1, "lat": 8, "lon": 16})
    plain = ds.rename(lat_hr="a", lon_hr="b")
    with pytest.raises(ValueError, match=r"align_dims=\{'a': 'lat', 'b': 'lon'\}"):
        XarrayDataModule(plain, input_vars=["t2m"], target_vars=["t2m_hr"], **base).setup("fit")
    aligned = XarrayDataModule(
        plain,
        input_vars=["t2m"],
        target_vars=["t2m_hr"],
        align_dims={"a": "lat", "b": "lon"},
        **base,
    )
    aligned.setup("fit")
    assert aligned.target_shape == (1, 1, 16, 32)
    with pytest.raises(ValueError, match="several grids"):
        XarrayDataModule(ds, input_vars=["t2m"], target_vars=["t2m", "t2m_hr"], **base).setup()
    with pytest.raises(ValueError, match="batch_format='dict'"):
        XarrayDataModule(ds, input_vars=["t2m", "t2m_hr"], target_vars=["t2m"], **base).setup()
    with pytest.raises(ValueError, match="random_offsets=True"):
        XarrayDataModule(
            ds, input_vars=["t2m"], target_vars=["t2m_hr"], random_offsets=True, **base
        ).setup()
    with pytest.raises(ValueError, match="multiple of 2"):
        XarrayDataModule(
            ds,
            input_vars=["t2m_hr"],
            target_vars=["t2m"],
            input_dims={"time": 1, "lat_hr": 5, "lon_hr": 32},
        ).setup()


def test_the_fine_grid_is_cut_into_cells_like_the_coarse_one_and_decoded_once(pair_zarr):
    dm = XarrayDataModule(str(pair_zarr), load=False, num_workers=0, **DOWNSCALE)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    fine = dataset.grid_targets.reader
    np.testing.assert_array_equal(fine.grid.edges[0], dataset.reader.grid.edges[0])
    for _ in dm.train_dataloader():
        pass
    cells = int(np.prod(fine.grid.grid_shape))
    assert fine.cells_read == cells  # one chunk-aware epoch: each cell of either grid once
    assert dataset.reader.cells_read == int(np.prod(dataset.reader.grid.grid_shape))


def test_three_grids_out_of_core_with_workers_in_dict_batches(tmp_path):
    scene = eo_scene(n_time=8)
    path = tmp_path / "scene.zarr"
    scene.chunk({"time": 1}).to_zarr(path)
    dm = XarrayDataModule(
        str(path),
        **BANDS,
        load=False,
        num_workers=2,
    )
    dm.setup("fit")
    follows = {"y20": "y", "x20": "x", "y60": "y", "x60": "x"}
    seen = []
    for batch in dm.train_dataloader():
        seen += batch["sample"].tolist()
        labels = {
            "time": batch["input_time"][0].numpy().astype("datetime64[ns]"),
            "y": batch["input_y"][0].numpy(),
            "x": batch["input_x"][0].numpy(),
        }
        for key, var in (("x", "b04"), ("x_y20_x20", "b11"), ("x_y60_x60", "b01")):
            np.testing.assert_array_equal(
                batch[key][0, 0].numpy(), cells_of(scene, var, labels, follows)
            )
        np.testing.assert_array_equal(batch["y"][0, 0].numpy(), scene["label"].sel(labels))
    assert sorted(seen) == list(range(len(dm.datasets["train"])))


def test_a_series_as_channels_through_a_trainer_out_of_core(tmp_path):
    ds = downscaling_pair(24)[["t2m"]].isel(lat=slice(0, 8), lon=slice(0, 8))
    ds["co2"] = ("time", np.linspace(370, 380, 24).astype("f4"))
    path = tmp_path / "series.zarr"
    ds.chunk({"time": 4}).to_zarr(path)
    dm = XarrayDataModule(
        str(path),
        input_vars=["t2m", "co2"],
        target_vars=["t2m"],
        input_dims={"time": 2, "lat": 8, "lon": 8},
        target_dims={"time": 1, "lat": 8, "lon": 8},
        target_offset={"time": 2},
        series_as="channels",
        normalize="zscore",
        load=False,
        batch_size=4,
    )
    model = DemoForecaster(dm.input_shape, dm.target_shape, hidden_channels=4)
    trainer = cpu_trainer(max_epochs=1)
    trainer.fit(model, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert "co2" in str(dm) and "X channels" in str(dm)
