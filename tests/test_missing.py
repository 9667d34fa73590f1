"""Missing values: drop windows with NaN (against brute force), name the first NaN, or fill."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest

from tests.conftest import make_dataset, reference_windows
from xr_datamodule import XarrayDataModule, windows
from xr_datamodule.missing import MissingValueError

CONFIG = dict(
    input_vars=["a", "c"],
    target_vars=["b"],
    input_dims={"time": 3, "lat": 4, "lon": 5},
    input_overlap={"time": 1, "lat": 2, "lon": 2},
    target_dims={"time": 1, "lat": 4, "lon": 5},
    target_offset={"time": 3},
    splits={"train": 0.7, "test": 0.3},
    batch_size=8,
    dtype="float64",
)


@pytest.fixture
def holey():
    ds = make_dataset()
    ds["a"][5, 3, 4] = np.nan  # an input variable
    ds["c"][1, 2, 30, 7] = np.nan  # one level of the 3-channel variable (level, lon, time, lat)
    ds["b"][12, 0, 0] = np.nan  # the target variable
    return ds


def brute_force_keep(ds, dm, split):
    index = dm.indices[split]
    geometry = dm.geometry
    keep = []
    grid = itertools.product(*index.axis_starts)
    for starts in grid:
        windows = []
        for names, size, offset in (
            (["a", "c"], geometry.input_size, (0, 0, 0)),
            (["b"], geometry.target_size, geometry.target_offset),
        ):
            region = {
                d: slice(int(s + o), int(s + o + n))
                for d, s, o, n in zip(geometry.dims, starts, offset, size, strict=True)
            }
            windows += [bool(ds[name].isel(region).isnull().any()) for name in names]
        keep.append(tuple(int(s) for s in starts) if not any(windows) else None)
    return [k for k in keep if k is not None]


@pytest.mark.parametrize(
    ("backing", "slab_bytes"), [("memory", None), ("zarr", None), ("memory", 1), ("zarr", 4000)]
)
def test_drop_leaves_out_exactly_the_windows_with_nan(
    holey, tmp_path, backing, slab_bytes, monkeypatch
):
    if slab_bytes is not None:  # the mask in slabs of one window, or of a few
        monkeypatch.setattr(windows, "SLAB_BYTES", slab_bytes)
    data = holey
    if backing == "zarr":
        path = tmp_path / "holey.zarr"
        holey.chunk({"time": 8}).to_zarr(path)
        data = str(path)
    dm = XarrayDataModule(data, **CONFIG, nan_policy="drop", load=backing == "memory")
    dm.setup()
    for split in ("train", "test"):
        expected = brute_force_keep(holey, dm, split)
        index = dm.indices[split]
        got = [tuple(row) for row in index.starts(np.arange(len(index))).tolist()]
        assert got == expected
        grid_size = int(np.prod(index.grid_shape))
        assert dm.dropped_samples[split] == grid_size - len(expected)
    assert dm.dropped_samples["train"] > 0 and dm.dropped_samples["test"] > 0
    # Batches hold no NaN, and a training epoch still has every kept sample exactly once.
    seen = 0
    for X, y in dm.train_dataloader():
        assert not X.isnan().any() and not y.isnan().any()
        seen += len(X)
    assert seen == len(dm.indices["train"])


@pytest.mark.parametrize("slab_bytes", [None, 1, 500])
def test_error_names_the_first_missing_value(holey, slab_bytes, monkeypatch):
    if slab_bytes is not None:  # scanned one step at a time, or a few
        monkeypatch.setattr(windows, "SLAB_BYTES", slab_bytes)
    holey["a"][30, 1, 1] = np.nan  # a later NaN of the same variable: the first is named
    dm = XarrayDataModule(holey, **CONFIG, nan_policy="error")
    with pytest.raises(
        ValueError,
        match=r"variable 'a' has a missing or non-finite value \(NaN or ±Inf\) at "
        r"time=2020-01-06.*lat=.*lon=4\.0; use nan_policy='drop'",
    ):
        dm.setup()


def test_fill_replaces_missing_values(holey):
    dm = XarrayDataModule(holey, **CONFIG, nan_policy="fill", fill_value=-99.0)
    dm.setup()
    batch = dm.datasets["train"].__getitems__(np.arange(len(dm.datasets["train"])))
    assert not np.isnan(batch.inputs).any()
    assert (batch.inputs == -99.0).sum() > 0
    normalised = XarrayDataModule(holey, **CONFIG, nan_policy="fill", normalize="zscore")
    normalised.setup()
    batch = normalised.datasets["train"].__getitems__(np.arange(8))
    assert not np.isnan(batch.inputs).any()


def test_keep_lets_nan_through_and_bad_policy_is_refused(holey):
    dm = XarrayDataModule(holey, **CONFIG, nan_policy="keep")
    dm.setup()
    batch = dm.datasets["train"].__getitems__(np.arange(len(dm.datasets["train"])))
    assert np.isnan(batch.inputs).any()
    with pytest.raises(ValueError, match=r"nan_policy must be one of \('check', 'keep', 'error'"):
        XarrayDataModule(holey, **CONFIG, nan_policy="skip")


def one_hole():
    ds = make_dataset()
    ds["c"][1, 2, 30, 7] = np.nan  # level 500, lon 2.0, the 31st day, the 8th latitude
    return ds


def first_batch_with_nan(ds, dm, loader):
    """Number of the first batch of ``loader`` with a NaN in a window (brute force)."""
    geometry = dm.geometry
    for number, ids in enumerate(loader.batch_sampler):
        starts = dm.indices["test"].starts(np.asarray(ids))
        inputs = reference_windows(ds, ["a", "c"], dm.window_dims, starts, geometry.input_size)
        targets = reference_windows(
            ds, ["b"], dm.window_dims, starts + geometry.target_offset, geometry.target_size
        )
        if np.isnan(inputs).any() or np.isnan(targets).any():
            return number
    raise AssertionError("no batch holds the NaN")


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("backing", ["memory", "zarr"])
def test_by_default_the_first_batch_with_a_nan_fails_naming_it(tmp_path, backing, workers):
    ds = one_hole()
    data = ds
    if backing == "zarr":
        ds.chunk({"time": 8}).to_zarr(tmp_path / "hole.zarr")
        data = str(tmp_path / "hole.zarr")
    dm = XarrayDataModule(data, **CONFIG, load=backing == "memory", num_workers=workers)
    dm.setup()
    for _ in dm.train_dataloader():  # the training split holds no NaN: it passes
        pass
    loader = dm.test_dataloader()
    failing = first_batch_with_nan(ds, dm, loader)
    served = 0
    with pytest.raises(
        MissingValueError,
        match=r"variable 'c' \(level=500\) has a missing value \(NaN\) at "
        r"time=2020-01-31 00:00:00, lat=40\.909\d*, lon=2\.0 .*nan_policy='keep'",
    ):
        for _ in loader:
            served += 1
    assert served == failing


def test_a_zarr_chunk_missing_from_the_store_is_reported(small_ds, tmp_path, caplog):
    path = tmp_path / "gap.zarr"
    small_ds.chunk({"time": 8, "lat": 12, "lon": 10, "level": 3}).to_zarr(path)
    chunk_files = sorted(p for p in (path / "b").rglob("*") if p.is_file() and "zarr" not in p.name)
    assert len(chunk_files) == 5  # 40 days in chunks of 8
    chunk_files[4].unlink()  # the last 8 days of 'b': read back as NaN by zarr
    dm = XarrayDataModule(str(path), **CONFIG, load=False)
    with caplog.at_level(logging.WARNING, logger="xr_datamodule.resources"):
        dm.setup()
    warned = [r.getMessage() for r in caplog.records if "lacks" in r.getMessage()]
    assert len(warned) == 1 and "lacks 1 of the 5 chunks of variable 'b'" in warned[0]
    assert "fails under nan_policy='check'" in warned[0]
    with pytest.raises(MissingValueError, match=r"variable 'b' has .*zarr chunk missing"):
        for _ in dm.test_dataloader():
            pass


def test_a_static_field_with_nan_fails_in_setup():
    ds = make_dataset()
    ds["orog"] = (("lat", "lon"), np.ones((12, 10)))
    ds["orog"][3, 4] = np.nan
    dm = XarrayDataModule(ds, **{**CONFIG, "input_vars": ["a", "orog"]})
    with pytest.raises(
        MissingValueError, match=r"static field 'orog' has a missing value \(NaN\) at lat=.*lon=4"
    ):
        dm.setup()


def test_a_transform_output_with_nan_is_reported(holey):
    dm = XarrayDataModule(holey, **CONFIG, transform=lambda window: window)
    dm.setup()
    with pytest.raises(MissingValueError, match=r"the transform's output .* \(NaN\)"):
        dm.datasets["train"].__getitems__(np.arange(len(dm.datasets["train"])))


@pytest.mark.parametrize("load", [True, False])
def test_mask_channel_marks_filled_values(holey, load):
    dm = XarrayDataModule(holey, **CONFIG, nan_policy="fill", nan_mask=True, load=load)
    assert dm.input_shape[0] == 1 + 3 + 1  # a, c's three levels, the mask
    assert dm.input_channel_names[-1] == "nan_mask"
    dm.setup()
    ids = np.arange(len(dm.datasets["train"]))
    batch = dm.datasets["train"].__getitems__(ids)
    starts = dm.indices["train"].starts(ids)
    raw = reference_windows(holey, ["a", "c"], dm.window_dims, starts, dm.geometry.input_size)
    expected_mask = np.isnan(raw).any(axis=1)
    np.testing.assert_array_equal(batch.inputs[:, -1], expected_mask.astype(float))
    assert expected_mask.any()
    np.testing.assert_array_equal(batch.inputs[:, :-1], np.where(np.isnan(raw), 0.0, raw))
    with pytest.raises(ValueError, match=r"nan_mask=True needs nan_policy='fill'"):
        XarrayDataModule(holey, **CONFIG, nan_mask=True)


def test_drop_refuses_a_split_left_without_windows(holey):
    holey["b"][28:, :, :] = np.nan  # every target of the test split (times 28 and later)
    dm = XarrayDataModule(holey, **CONFIG, nan_policy="drop")
    with pytest.raises(
        ValueError,
        match=r"split 'test': every one of its \d+ windows holds a "
        r"missing value",
    ):
        dm.setup()


# ----------------------------------------------------------------------------- ±Inf


@pytest.fixture
def infinite():
    ds = make_dataset()
    ds["a"][5, 3, 4] = np.inf
    ds["b"][12, 0, 0] = -np.inf
    return ds


@pytest.mark.parametrize("where", ["memory", "zarr"])
def test_an_infinity_is_named_like_a_nan(infinite, tmp_path, where):
    data = infinite
    if where == "zarr":
        infinite.chunk({"time": 8}).to_zarr(tmp_path / "inf.zarr")
        data = str(tmp_path / "inf.zarr")
    dm = XarrayDataModule(data, **CONFIG, load=where == "memory", num_workers=0)
    with pytest.raises(
        MissingValueError, match=r"variable '.' has a non-finite value \(-?inf\) at time="
    ):
        for _ in dm.train_dataloader():
            pass


def test_infinities_are_dropped_filled_and_skipped_by_statistics(infinite, caplog):
    dropped = XarrayDataModule(infinite, **CONFIG, nan_policy="drop")
    as_nan = infinite.where(np.isfinite(infinite))
    reference = XarrayDataModule(as_nan, **CONFIG, nan_policy="drop")
    assert dropped.split_sizes == reference.split_sizes
    assert sum(dropped.dropped_samples.values()) > 0
    filled = XarrayDataModule(infinite, **CONFIG, nan_policy="fill", fill_value=-7.0)
    for X, y in filled.train_dataloader():
        assert np.isfinite(X.numpy()).all() and np.isfinite(y.numpy()).all()
    normalised = XarrayDataModule(infinite, **CONFIG, nan_policy="fill", normalize="zscore")
    stats = normalised.statistics
    train = as_nan.isel(time=slice(0, normalised.split_bounds["train"]["time"][1]))
    assert np.isclose(stats.mean["a"][0], float(train.a.mean()))
    assert np.isclose(stats.std["b"][0], float(train.b.std()))


def test_a_constant_channel_is_reported_and_bad_checkpoint_statistics_refused(caplog):
    ds = make_dataset()
    ds["b"][:] = 3.0
    dm = XarrayDataModule(ds, **CONFIG, normalize="zscore")
    with caplog.at_level(logging.WARNING, logger="xr_datamodule.normalize"):
        assert dm.statistics.std["b"] == [1.0]
    assert "['b'] are constant over the training split (std 0)" in caplog.text
    state = {"seed": 0, "statistics": {"mean": {"a": [0.0]}, "std": {"a": [0.0]}}}
    with pytest.raises(
        ValueError, match=r"std of 'a' is \[0.0\] \(a std must be finite and positive"
    ):
        XarrayDataModule(ds, **CONFIG).load_state_dict(state)
    state["statistics"] = {"mean": {"a": [float("nan")]}, "std": {"a": [1.0]}}
    with pytest.raises(ValueError, match="mean of 'a' is"):
        XarrayDataModule(ds, **CONFIG).load_state_dict(state)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_holds_nan_finds_every_non_finite_value_and_only_those(dtype):
    from xr_datamodule.missing import holds_nan

    rng = np.random.default_rng(0)
    block = rng.normal(size=(3, 40, 50)).astype(dtype)
    assert not holds_nan(block) and not holds_nan(block[:, ::2])  # contiguous or not
    huge = np.full((3, 40, 50), np.finfo(dtype).max / 2, dtype)  # squares overflow: finite
    assert not holds_nan(huge) and not holds_nan(-huge)
    for value in (np.nan, np.inf, -np.inf):
        for where in ((0, 0, 0), (2, 39, 49), (1, 17, 3)):
            hit = block.copy()
            hit[where] = value
            assert holds_nan(hit) and holds_nan(hit[:, ::1, ::1])
