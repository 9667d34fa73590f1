"""Stores in anemoi-datasets' format (written here as anemoi-datasets writes them) open labelled."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from tests.conftest import cpu_trainer
from xr_datamodule import XarrayDataModule
from xr_datamodule.sources import open_source

zarr = pytest.importorskip("zarr")

VARIABLES = ["10u", "10v", "2t", "msl", "z_500"]
N_TIME, N_ENS, N_CELLS = 10, 2, 40


def write_anemoi_store(path, seed: int = 0, zarr_format: int = 2) -> dict:
    """What anemoi-datasets' gridded creator and statistics writer leave.

    With zarr 2 (most published datasets) a v2 store; with zarr 3 a v3 store whose arrays
    still name their dims in ``_ARRAY_DIMENSIONS`` (no v3 ``dimension_names``).
    """
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((N_TIME, len(VARIABLES), N_ENS, N_CELLS)).astype("float32")
    data += np.arange(len(VARIABLES))[None, :, None, None] * 10
    dates = pd.date_range("2022-01-01", periods=N_TIME, freq="6h").values.astype("M8[s]")
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, N_CELLS)))
    lon = rng.uniform(0, 360, N_CELLS)
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)

    def add(name, values, dims, chunks=None):
        array = group.create_array(
            name, shape=values.shape, dtype=values.dtype, chunks=chunks or values.shape
        )
        array[:] = values
        array.attrs["_ARRAY_DIMENSIONS"] = list(dims)

    add("data", data, ("time", "variable", "ensemble", "cell"), (1, len(VARIABLES), 1, N_CELLS))
    add("dates", dates, ("time",))
    add("latitudes", lat, ("cell",))
    add("longitudes", lon, ("cell",))
    stats = {
        "mean": data.mean(axis=(0, 2, 3)).astype("f8"),
        "stdev": data.std(axis=(0, 2, 3)).astype("f8"),
        "minimum": data.min(axis=(0, 2, 3)).astype("f8"),
        "maximum": data.max(axis=(0, 2, 3)).astype("f8"),
    }
    for name, values in stats.items():
        add(name, values, ("variable",))
    group.attrs.update(variables=VARIABLES, frequency="6h", resolution="o96", field_shape=[N_CELLS])
    return {"data": data, "dates": dates, "lat": lat, "lon": lon, **stats}


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_an_anemoi_store_opens_with_names_dates_and_cell_coordinates(tmp_path, zarr_format):
    written = write_anemoi_store(tmp_path / "o96.zarr", zarr_format=zarr_format)
    ds = open_source(tmp_path / "o96.zarr")
    assert list(ds.data_vars) == ["data"]
    assert ds.data.dims == ("time", "variable", "ensemble", "cell")
    assert list(ds.variable.values) == VARIABLES
    np.testing.assert_array_equal(ds.time.values, written["dates"].astype("M8[ns]"))
    np.testing.assert_array_equal(ds.latitudes.values, written["lat"])
    assert ds.latitudes.dims == ("cell",) and ds.latitudes.attrs["units"] == "degrees_north"
    np.testing.assert_array_equal(ds.data.sel(variable="msl").values, written["data"][:, 3])


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_an_anemoi_store_trains_with_its_stored_statistics(tmp_path, zarr_format):
    written = write_anemoi_store(tmp_path / "o96.zarr", zarr_format=zarr_format)
    picked = ["2t", "msl"]
    dm = XarrayDataModule(
        tmp_path / "o96.zarr", ["data"], {"time": 1, "cell": N_CELLS},
        select={"variable": picked}, target_offset={"time": 1},
        forcings=["cos_latitude", "insolation"], stats="stored", load=False,
        splits={"train": 0.7, "val": 0.3}, batch_size=2,
    )  # fmt: skip
    # Channels: variable x ensemble in C order; each member has its variable's statistics.
    assert dm.input_channel_names[:4] == [
        "data[variable=2t,ensemble=0]", "data[variable=2t,ensemble=1]",
        "data[variable=msl,ensemble=0]", "data[variable=msl,ensemble=1]",
    ]  # fmt: skip
    statistics = dm.statistics
    index = [VARIABLES.index(name) for name in picked]
    np.testing.assert_allclose(statistics.mean["data"], np.repeat(written["mean"][index], 2))
    np.testing.assert_allclose(statistics.std["data"], np.repeat(written["stdev"][index], 2))
    assert dm.pipeline.statistics_origin == "stored in the data"
    cos = np.cos(np.radians(written["lat"]))
    np.testing.assert_allclose(dm.area_weights.numpy().reshape(-1), cos / cos.mean(), 1e-6)

    import lightning.pytorch as pl
    import torch

    seen = []

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Conv1d(6, 4, 1)

        def training_step(self, batch, _):
            X, y = batch
            seen.append(X.detach().clone())
            return torch.nn.functional.mse_loss(self.layer(X[:, :, 0]), y[:, :, 0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    cpu_trainer(limit_val_batches=0).fit(Model(), datamodule=dm)
    X = torch.cat(seen)
    assert X.shape[1:] == (6, 1, N_CELLS) and len(X) == 6  # 7 training steps, a step on
    # Normalised with the stored statistics: undo them and find the store's values.
    raw = X[:, :4, 0].numpy() * np.array(statistics.std["data"])[None, :, None]
    raw += np.array(statistics.mean["data"])[None, :, None]
    stored = written["data"][:7, index].reshape(7, 4, N_CELLS)
    for sample in raw:
        assert any(np.allclose(sample, step, atol=1e-4) for step in stored)


def test_stored_statistics_are_refused_where_there_are_none(small_ds):
    with pytest.raises(ValueError, match="stats='stored' takes the statistics an anemoi"):
        XarrayDataModule(small_ds, ["a"], {"time": 1, "lat": 4, "lon": 5}, stats="stored").setup(
            "fit"
        )


def test_other_stores_are_left_as_they_are(zarr_path):
    opened = open_source(zarr_path)
    assert set(opened.data_vars) == {"a", "b", "c"}
    assert isinstance(opened, xr.Dataset)
