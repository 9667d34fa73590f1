"""Forcings and area weights on unstructured and curvilinear grids, against the formulas."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from tests.conftest import cpu_trainer
from xr_datamodule import XarrayDataModule
from xr_datamodule.forcings import FORCINGS

ALL_FORCINGS = list(FORCINGS)
TIMES = pd.date_range("2021-03-20", periods=12, freq="5h")


def cell_grid(n_cells: int = 60, seed: int = 0) -> xr.Dataset:
    """An anemoi-like unstructured grid: ``data(time, variable, cell)``, lat/lon on cells."""
    rng = np.random.default_rng(seed)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n_cells)))
    lon = rng.uniform(0, 360, n_cells)
    data = rng.standard_normal((len(TIMES), 2, n_cells)).astype("float32")
    return xr.Dataset(
        {
            "data": (("time", "variable", "cell"), data),
            "cell_area": (("cell",), rng.uniform(0.5, 2.0, n_cells)),
        },
        coords={
            "time": TIMES,
            "variable": ["t2m", "msl"],
            "latitudes": ("cell", lat),
            "longitudes": ("cell", lon),
        },
    )


def curvilinear_grid(ny: int = 9, nx: int = 11) -> xr.Dataset:
    """A rotated ocean grid: ``sst(time, y, x)`` on 2-D nav_lat/nav_lon (CF units only)."""
    y, x = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    nav_lat = 40 + 1.5 * y + 0.4 * x
    nav_lon = -30 + 2.0 * x - 0.3 * y
    rng = np.random.default_rng(1)
    return xr.Dataset(
        {"sst": (("time", "y", "x"), rng.standard_normal((len(TIMES), ny, nx)))},
        coords={
            "time": TIMES,
            "nav_lat": (("y", "x"), nav_lat, {"units": "degrees_north"}),
            "nav_lon": (("y", "x"), nav_lon, {"units": "degrees_east"}),
        },
    )


def expected_forcings(lat, lon, time) -> np.ndarray:
    """Brute force: each formula at each point, one point at a time."""
    return np.array(
        [[FORCINGS[name][1](np.array([la]), np.array([lo]), np.array([time]))[0]
          for la, lo in zip(lat, lon, strict=True)] for name in ALL_FORCINGS]
    )  # fmt: skip


@pytest.mark.parametrize("cells_per_window", [60, 20])
def test_forcings_on_a_cell_dim_are_the_formulas_at_each_cell(cells_per_window):
    ds = cell_grid()
    dm = XarrayDataModule(
        ds, ["data"], {"time": 1, "cell": cells_per_window}, forcings=ALL_FORCINGS,
        splits={"predict": 1.0}, batch_format="dict", dtype="float64",
    )  # fmt: skip
    dm.setup("predict")
    first = dm.input_channel_names.index(ALL_FORCINGS[0])
    seen = 0
    for batch in dm.predict_dataloader():
        for i in range(len(batch["x"])):
            t = int(batch["sample"][i])
            start_time, start_cell = dm.indices["predict"].starts([t])[0]
            cells = slice(start_cell, start_cell + cells_per_window)
            expected = expected_forcings(
                ds.latitudes.values[cells], ds.longitudes.values[cells], ds.time.values[start_time]
            )
            got = batch["x"][i, first:, 0].numpy()
            np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
            seen += 1
    assert seen == len(TIMES) * (60 // cells_per_window)


def test_forcings_on_a_2d_curvilinear_grid_are_the_formulas_at_each_point():
    ds = curvilinear_grid()
    dm = XarrayDataModule(
        ds, ["sst"], {"time": 2, "y": 4, "x": 5}, input_overlap={"y": 2},
        forcings=ALL_FORCINGS, splits={"predict": 1.0}, batch_format="dict", dtype="float64",
    )  # fmt: skip
    dm.setup("predict")
    first = dm.input_channel_names.index(ALL_FORCINGS[0])
    index = dm.indices["predict"]
    for batch in dm.predict_dataloader():
        for i in range(len(batch["x"])):
            t, y0, x0 = index.starts([int(batch["sample"][i])])[0]
            for step in range(2):
                lat = ds.nav_lat.values[y0 : y0 + 4, x0 : x0 + 5].ravel()
                lon = ds.nav_lon.values[y0 : y0 + 4, x0 : x0 + 5].ravel()
                expected = expected_forcings(lat, lon, ds.time.values[t + step])
                got = batch["x"][i, first:, step].numpy().reshape(len(ALL_FORCINGS), -1)
                np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_area_weights_from_cell_latitudes_and_from_a_cell_area_variable():
    ds = cell_grid()
    windows = dict(input_dims={"time": 1, "cell": 60}, splits={"predict": 1.0})
    from_latitude = XarrayDataModule(ds, ["data"], **windows).area_weights.numpy()
    cos = np.cos(np.radians(ds.latitudes.values))
    np.testing.assert_allclose(from_latitude.reshape(-1), cos / cos.mean(), rtol=1e-6)
    assert from_latitude.shape == (1, 1, 1, 60)
    named = XarrayDataModule(ds, ["data"], coordinates={"area": "cell_area"}, **windows)
    area = ds.cell_area.values
    np.testing.assert_allclose(named.area_weights.numpy().reshape(-1), area / area.mean(), 1e-6)


def test_per_sample_area_weights_on_curvilinear_patches():
    ds = curvilinear_grid()
    dm = XarrayDataModule(
        ds, ["sst"], {"time": 1, "y": 3, "x": 4}, splits={"predict": 1.0}, batch_format="dict"
    )
    with pytest.raises(ValueError, match="per-sample target_area_weight"):
        dm.area_weights  # noqa: B018  (patches: weights differ per sample)
    dm.setup("predict")
    cos = np.cos(np.radians(ds.nav_lat.values))
    cos /= cos.mean()
    index = dm.indices["predict"]
    batch = next(iter(dm.predict_dataloader()))
    for i in range(len(batch["x"])):
        _, y0, x0 = index.starts([int(batch["sample"][i])])[0]
        np.testing.assert_allclose(
            batch["target_area_weight"][i, 0, 0].numpy(), cos[y0 : y0 + 3, x0 : x0 + 4], 1e-6
        )


def test_named_coordinates_are_checked():
    ds = curvilinear_grid().rename({"nav_lat": "a", "nav_lon": "b"})
    ds.a.attrs.clear()
    ds.b.attrs.clear()
    windows = dict(input_dims={"time": 1, "y": 9, "x": 11}, splits={"predict": 1.0})
    with pytest.raises(ValueError, match=r"'insolation' needs a latitude coordinate"):
        XarrayDataModule(ds, ["sst"], forcings=["insolation"], **windows).setup("predict")
    named = XarrayDataModule(
        ds, ["sst"], forcings=["insolation"], coordinates={"lat": "a", "lon": "b"}, **windows
    )
    named.setup("predict")  # found where the user says
    with pytest.raises(KeyError, match=r"coordinates\['lat'\]: 'nope' is not in the data"):
        XarrayDataModule(ds, ["sst"], coordinates={"lat": "nope"}, **windows).setup("predict")
    with pytest.raises(ValueError, match=r"unknown role 'height'"):
        XarrayDataModule(ds, ["sst"], coordinates={"height": "a"}, **windows).setup("predict")
    flat = ds.assign(area=("x", -np.ones(11)))
    with pytest.raises(ValueError, match="must hold positive areas"):
        XarrayDataModule(flat, ["sst"], coordinates={"area": "area"}, **windows).setup("predict")
    with pytest.raises(ValueError, match="must lie over windowed dims only"):
        XarrayDataModule(
            ds.assign(t_lat=("time", np.zeros(12))), ["sst"], coordinates={"lat": "t_lat"},
            input_dims={"y": 9, "x": 11}, splits={"predict": 1.0},
        ).setup("predict")  # fmt: skip


# The test data's string coordinate is written as zarr v3's fixed-length UTF-32, which zarr
# warns has no v3 specification yet: a property of the test's store, not of the reading.
@pytest.mark.filterwarnings("ignore:The data type .* does not have a Zarr V3 specification")
def test_an_unstructured_store_trains_with_forcings_and_area_weights(tmp_path):
    import lightning.pytorch as pl
    import torch

    path = tmp_path / "cells.zarr"
    cell_grid().chunk({"time": 1}).to_zarr(path)
    dm = XarrayDataModule(
        path, ["data"], {"time": 1, "cell": 60}, target_vars=["data"],
        target_offset={"time": 1}, forcings=["cos_latitude", "insolation"],
        splits={"train": 0.75, "val": 0.25}, load=False, batch_size=4,
    )  # fmt: skip
    weights = dm.area_weights

    class Weighted(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Conv1d(4, 2, 1)
            self.losses = []

        def training_step(self, batch, _):
            X, y = batch
            error = (self.layer(X[:, :, 0]) - y[:, :, 0]) ** 2 * weights[:, :, 0]
            self.losses.append(float(error.mean().detach()))
            return error.mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    model = Weighted()
    cpu_trainer(max_epochs=2, limit_val_batches=0).fit(model, datamodule=dm)
    # 9 training steps, 8 samples (a target one step on), batches of 4, 2 epochs.
    assert len(model.losses) == 2 * 2 and np.isfinite(model.losses).all()


def test_scores_on_a_cell_grid_are_area_weighted_like_brute_force():
    from xr_datamodule.callbacks import _area_weighting
    from xr_datamodule.verification import weighted_rmse

    ds = cell_grid()
    dm = XarrayDataModule(ds, ["data"], {"time": 1, "cell": 60}, splits={"predict": 1.0})
    weights = _area_weighting(dm)
    assert isinstance(weights, xr.DataArray) and weights.dims == ("cell",)
    truth = ds.data.isel(variable=0)
    forecast = truth + np.random.default_rng(2).standard_normal(truth.shape)
    got = weighted_rmse(forecast, truth, weights, keep=["time"])
    cos = np.cos(np.radians(ds.latitudes.values))
    squared = (forecast.values - truth.values) ** 2
    expected = np.sqrt((squared * cos).sum(1) / cos.sum())
    np.testing.assert_allclose(got.values, expected, rtol=1e-6)
    regular = XarrayDataModule(
        ds.rename(cell="lat").assign_coords(lat=np.linspace(-80, 80, 60)), ["data"],
        {"time": 1, "lat": 60}, splits={"predict": 1.0},
    )  # fmt: skip
    assert _area_weighting(regular) == "lat"  # a regular grid keeps its latitude dim


@pytest.mark.parametrize("grid", ["cells", "curvilinear"])
def test_plots_draw_on_the_grids_coordinates(grid, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.collections import QuadMesh, TriMesh

    from xr_datamodule.plot import plot_prediction

    ds, name, dims = (
        (cell_grid(), "data", {"time": 1, "cell": 60})
        if grid == "cells"
        else (curvilinear_grid(), "sst", {"time": 1, "y": 9, "x": 11})
    )
    dm = XarrayDataModule(ds, [name], dims, splits={"predict": 1.0})
    dm.setup("predict")
    predicted = dm.to_xarray([y for _, y in dm.predict_dataloader()])[name]
    figure = plot_prediction(predicted, ds[name])
    figure.savefig(tmp_path / "prediction.png")
    assert (tmp_path / "prediction.png").stat().st_size > 0
    panel = figure.axes[0]
    if grid == "cells":  # a triangulation of the cells' own longitudes and latitudes
        (mesh,) = [c for c in panel.collections if isinstance(c, TriMesh)]
        assert len(mesh.get_array()) == 60  # one value per cell
        assert panel.get_xlabel().startswith("longitudes") and "north" in panel.get_ylabel()
        x_low, x_high = panel.get_xlim()
        assert x_low <= ds.longitudes.min() and x_high >= ds.longitudes.max()
    else:  # pcolormesh on the 2-D nav_lon, nav_lat
        (mesh,) = [c for c in panel.collections if isinstance(c, QuadMesh)]
        assert panel.get_xlabel().startswith("nav_lon") and panel.get_ylabel().startswith("nav_lat")
        y_low, y_high = panel.get_ylim()
        assert y_low <= ds.nav_lat.min() and y_high >= ds.nav_lat.max()
