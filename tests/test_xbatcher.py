"""Our windows are xbatcher's windows: property tests with xbatcher as the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from xr_datamodule import XarrayDataModule
from xr_datamodule.interop import samples_per_batch

xbatcher = pytest.importorskip("xbatcher")

DIM_NAMES = ("time", "level", "lat", "lon", "member")


@st.composite
def layouts(draw: st.DrawFn) -> dict:
    """1-3 windowed dims (ragged edges, overlaps) and 0-2 sample dims, in any dim order."""
    n_windowed = draw(st.integers(1, 3))
    n_sample = draw(st.integers(0, 2))
    dims = draw(st.permutations(DIM_NAMES))[: n_windowed + n_sample]
    windowed = draw(st.sets(st.sampled_from(dims), min_size=n_windowed, max_size=n_windowed))
    sizes, input_dims, overlap = {}, {}, {}
    for dim in dims:
        sizes[dim] = draw(st.integers(1, 9))
        if dim in windowed:
            input_dims[dim] = draw(st.integers(1, sizes[dim]))
            overlap[dim] = draw(st.integers(0, input_dims[dim] - 1))
    # xbatcher's windows follow the order input_dims is given in, not the data's.
    order = draw(st.permutations(sorted(input_dims)))
    return {
        "sizes": sizes,
        "input_dims": {dim: input_dims[dim] for dim in order},
        "overlap": overlap,
        "n_vars": draw(st.integers(1, 2)),
    }


def dataset(sizes: dict[str, int], n_vars: int) -> xr.Dataset:
    """Distinct exact values everywhere; labels unlike positions (10 * position + dim id)."""
    shape = tuple(sizes.values())
    count = math.prod(shape)
    coords = {dim: 10 * np.arange(n) + k for k, (dim, n) in enumerate(sizes.items())}
    data = {
        f"v{k}": (tuple(sizes), (np.arange(count) + k * count).reshape(shape).astype("float32"))
        for k in range(n_vars)
    }
    return xr.Dataset(data, coords=coords)


def xbatcher_samples(generator, dims: tuple[str, ...]) -> dict[tuple, np.ndarray]:
    """Every (window, sample position) of the generator: first labels -> values."""
    samples = {}
    for batch in generator:
        if "sample" in batch.dims:
            batch = batch.unstack("sample")
        values = batch.to_array("variable").transpose("variable", *dims)
        sample_dims = [d for d in dims if d not in generator.input_dims]
        for where in np.ndindex(*(values.sizes[d] for d in sample_dims)):
            at = dict(zip(sample_dims, where, strict=True))
            key = tuple(int(values[d].values[at.get(d, 0)]) for d in dims)
            block = values.isel(at).values
            assert key not in samples  # xbatcher gives each window once
            samples[key] = block
    return samples


def our_samples(
    dm: XarrayDataModule, dims: tuple[str, ...], windowed: set[str]
) -> list[tuple[tuple, np.ndarray]]:
    """The predict loader's samples, in order: first labels -> values (sample dims dropped)."""
    samples = []
    squeeze = tuple(slice(None) if d in windowed else 0 for d in dm.window_dims)
    for batch in dm.predict_dataloader():
        for i in range(len(batch["x"])):
            key = tuple(int(batch[f"input_{d}"][i, 0]) for d in dims)
            block = batch["x"][i].numpy()[(slice(None), *squeeze)]
            samples.append((key, block))
    return samples


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_samples_equal_xbatcher_windows(layout):
    ds = dataset(layout["sizes"], layout["n_vars"])
    generator = xbatcher.BatchGenerator(ds, layout["input_dims"], layout["overlap"])
    dims = tuple(ds.dims)
    theirs = xbatcher_samples(generator, dims)

    dm = XarrayDataModule.from_xbatcher(
        generator, splits={"predict": 1.0}, batch_format="dict", batch_size=64
    )
    dm.setup("predict")
    ours = our_samples(dm, dims, set(layout["input_dims"]))

    assert len(ours) == len(theirs)
    for key, block in ours:
        np.testing.assert_array_equal(block, theirs[key])
    # Our order: C order over the dims in the data's order (xbatcher: windows in input_dims
    # order outside, sample positions inside each batch), so the same set, sorted.
    keys = [key for key, _ in ours]
    assert keys == sorted(theirs)


@pytest.mark.filterwarnings("ignore:The following dimensions were included in both")
@settings(max_examples=40, deadline=None)
@given(layouts(), st.booleans(), st.data())
def test_batch_size_is_the_generators_and_samples_a_superset(layout, concat, data):
    ds = dataset(layout["sizes"], 1)
    # Along an input dim, a batch length below the window leaves xbatcher's concatenated
    # batches empty (it then fails on them), so such lengths are not drawn.
    batch_dims = {
        dim: data.draw(st.integers(layout["input_dims"].get(dim, 1), size))
        for dim, size in layout["sizes"].items()
        if data.draw(st.booleans())
    }
    generator = xbatcher.BatchGenerator(
        ds,
        layout["input_dims"],
        layout["overlap"],
        batch_dims=batch_dims,
        concat_input_dims=concat,
    )
    if len(generator) == 0:
        return
    first = generator[0]
    window = math.prod(layout["input_dims"].values())
    assert samples_per_batch(generator, ds) == math.prod(first.sizes.values()) // window
    # batch_dims only group samples: xbatcher leaves out those that do not fill a whole
    # batch along them, the datamodule keeps every one.
    dm = XarrayDataModule.from_xbatcher(generator, splits={"predict": 1.0})
    try:
        in_batches = sum(math.prod(b.sizes.values()) // window for b in generator)
    except ValueError as error:
        # xbatcher fails on a concatenated batch that holds no whole window (batch_dims along
        # an input dim: "min() arg is an empty sequence"): nothing to compare with.
        assume("empty sequence" not in str(error))
        raise
    assert dm.split_sizes["predict"] >= in_batches
    if not batch_dims:
        assert dm.split_sizes["predict"] == in_batches


def test_target_generator_gives_xbatchers_y_windows(small_ds):
    """MapDataset(x_gen, y_gen) in xbatcher; target=y_gen here: y equals y_gen's windows."""
    windows = {"input_dims": {"lat": 4, "lon": 5}, "input_overlap": {"lat": 2}}
    x_gen = xbatcher.BatchGenerator(small_ds[["a", "b"]], **windows, batch_dims={"time": 8})
    doubled = (2 * small_ds.b).to_dataset(name="b2")  # another Dataset, same coordinates
    y_gen = xbatcher.BatchGenerator(doubled, **windows, batch_dims={"time": 8})
    dm = XarrayDataModule.from_xbatcher(
        x_gen, target=y_gen, splits={"predict": 1.0}, batch_format="dict"
    )
    assert dm.input_vars == ["a", "b"] and dm.target_vars == ["b2"]
    assert dm.batch_size == 8  # a batch of y_gen: 8 times of one window
    dm.setup("predict")
    theirs = {}
    for batch in y_gen:  # 8 times x one window per batch; the last 40 % 8 = 0 times kept
        for t in range(batch.sizes["time"]):
            window = batch.b2.isel(time=t)
            key = (
                int(window.time.values.astype("datetime64[ns]").astype("int64")),
                float(window.lat[0]),
                float(window.lon[0]),
            )
            theirs[key] = window.transpose("lat", "lon").values
    ours = {}
    for batch in dm.predict_dataloader():
        for i in range(len(batch["y"])):
            key = (
                int(batch["target_time"][i, 0]),
                float(batch["target_lat"][i, 0]),
                float(batch["target_lon"][i, 0]),
            )
            ours[key] = batch["y"][i, 0, 0].numpy()
    assert ours.keys() == theirs.keys() and len(ours) == 40 * 5 * 2
    for key, values in ours.items():
        np.testing.assert_array_equal(values, theirs[key])


def test_what_from_xbatcher_cannot_honour_is_refused(small_ds, tmp_path):
    gen = xbatcher.BatchGenerator(small_ds[["a"]], input_dims={"lat": 4})
    with pytest.raises(ValueError, match=r"caches batches .*build the generator without cache"):
        XarrayDataModule.from_xbatcher(
            xbatcher.BatchGenerator(small_ds[["a"]], input_dims={"lat": 4}, cache={})
        )
    preprocess = xbatcher.BatchGenerator(
        small_ds[["a"]], input_dims={"lat": 4}, cache={}, cache_preprocess=lambda b: b
    )
    preprocess.cache = None
    with pytest.raises(ValueError, match=r"preprocesses batches .*transform="):
        XarrayDataModule.from_xbatcher(preprocess)
    other = xbatcher.BatchGenerator(small_ds[["b"]], input_dims={"lat": 6})
    with pytest.raises(ValueError, match=r"input_dims \{'lat': 6\} differ .*target_dims="):
        XarrayDataModule.from_xbatcher(gen, target=other)
    with pytest.raises(TypeError, match=r"input_dims come.* from the generator"):
        XarrayDataModule.from_xbatcher(gen, input_dims={"lat": 2})
    with pytest.raises(TypeError, match=r"must be an xbatcher\.BatchGenerator; got Dataset"):
        XarrayDataModule.from_xbatcher(small_ds)
    levels = xbatcher.BatchGenerator(small_ds[["c"]], input_dims={"lat": 4})
    with pytest.raises(ValueError, match=r"dims \['lat', 'level', 'lon', 'time'\], the inputs'"):
        XarrayDataModule.from_xbatcher(gen, target=levels)
    with pytest.raises(ValueError, match=r"variable 'a' has no 'level', a dim whose positions"):
        XarrayDataModule.from_xbatcher(xbatcher.BatchGenerator(small_ds, input_dims={"lat": 4}))
    shifted = small_ds[["b"]].assign_coords(lon=small_ds.lon + 0.5)
    with pytest.raises(ValueError, match="not on the inputs' coordinates"):
        XarrayDataModule.from_xbatcher(
            gen, target=xbatcher.BatchGenerator(shifted, input_dims={"lat": 4})
        )


def test_a_dataarray_generator_trains_through_a_trainer(small_ds):
    import lightning.pytorch as pl
    import torch

    from tests.conftest import cpu_trainer

    gen = xbatcher.BatchGenerator(
        small_ds.a.rename("temperature"),
        input_dims={"lat": 6, "lon": 5},
        batch_dims={"time": 10},
    )
    dm = XarrayDataModule.from_xbatcher(gen, splits={"train": 0.75, "val": 0.25})
    assert dm.input_vars == ["temperature"] and dm.input_shape == (1, 1, 6, 5)

    class Linear(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(30, 30)
            self.shapes = []

        def training_step(self, batch, _):
            X, y = batch
            self.shapes.append(tuple(X.shape))
            return torch.nn.functional.mse_loss(self.layer(X.flatten(1)), y.flatten(1))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    model = Linear()
    cpu_trainer(limit_val_batches=0).fit(model, datamodule=dm)
    # 30 training times x 2 x 2 windows, batches of 10 samples.
    assert sum(shape[0] for shape in model.shapes) == 30 * 4
    assert model.shapes[0] == (10, 1, 1, 6, 5)


def test_steps_of_a_dim_windowed_one_at_a_time_are_not_gaps(caplog):
    """Irregular level labels cannot be spanned by windows of 1: no report, no refusal."""
    ds = dataset({"time": 6, "level": 4, "lat": 5}, 1).assign_coords(level=[1000, 850, 500, 250])
    gen = xbatcher.BatchGenerator(ds, input_dims={"lat": 3})
    for gaps in ("drop", "error"):
        dm = XarrayDataModule.from_xbatcher(gen, splits={"predict": 1.0}, gaps=gaps)
        assert dm.split_sizes["predict"] == 6 * 4 and not dm.dropped_samples
    assert "irregular" not in caplog.text


def test_readme_migration_example_runs():
    """The README's xbatcher migration example, run as a doctest."""
    import doctest
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Coming from xbatcher", 1)[1].split("\n## ", 1)[0]
    test = doctest.DocTestParser().get_doctest(section, {}, "README: xbatcher", None, 0)
    assert len(test.examples) > 10
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_the_package_never_imports_xbatcher():
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "xr_datamodule"
    for module in package.rglob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(name.split(".")[0] == "xbatcher" for name in names), module
