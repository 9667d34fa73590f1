"""Statistics computed once: the cache's key, its hits and misses, sampled estimates, the CLI."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from xr_datamodule import XarrayDataModule, normalize
from xr_datamodule.estimate import positions_of

WINDOWS = dict(input_dims={"time": 1, "lat": 4, "lon": 5}, normalize="zscore")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("XR_DATAMODULE_CACHE", str(folder))
    return folder


@pytest.fixture
def counted(monkeypatch) -> list:
    """Each full computation of statistics, recorded."""
    calls: list = []
    compute = normalize.zscore_statistics

    def recording(*args, **kwargs):
        calls.append(args[1])
        return compute(*args, **kwargs)

    monkeypatch.setattr(normalize, "zscore_statistics", recording)
    return calls


def statistics_of(data, **options) -> tuple[dict, str]:
    dm = XarrayDataModule(data, **{"input_vars": ["a", "b"], **WINDOWS, **options})
    statistics = dm.statistics.to_dict()
    return statistics, dm.pipeline.statistics_origin


def test_a_second_fit_loads_what_the_first_computed(zarr_path, cache, counted):
    first, origin = statistics_of(zarr_path)
    assert len(counted) == 1 and origin.startswith("computed, cached in ")
    second, origin = statistics_of(zarr_path)
    assert len(counted) == 1 and origin.startswith("from cache ")
    assert second == first
    assert str(cache) in origin and Path(origin.split("from cache ")[1]).exists()


@pytest.mark.parametrize(
    "change",
    ["variables", "split bound", "method", "select", "nan_policy", "touched", "rewritten"],
)
def test_any_change_in_the_key_recomputes(zarr_path, cache, counted, change):
    statistics_of(zarr_path)
    options: dict = {}
    if change == "variables":
        options["input_vars"] = ["a"]
    elif change == "split bound":
        options["splits"] = {"train": 0.6, "val": 0.4}
    elif change == "method":
        options["normalize"] = "minmax"
    elif change == "select":
        options["select"] = {"lon": slice(0, 8)}
    elif change == "nan_policy":
        options["nan_policy"] = "keep"
    elif change == "touched":
        metadata = zarr_path / "a" / "zarr.json"
        stat = metadata.stat()
        os.utime(metadata, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    elif change == "rewritten":  # new values and a new attribute, same shape
        ds = xr.open_zarr(zarr_path).load()
        ds["a"] = (ds.a + 1).assign_attrs(units="K")
        ds.chunk({"time": 7, "lat": 5}).to_zarr(zarr_path, mode="w")
    _, origin = statistics_of(zarr_path, **options)
    assert len(counted) == 2 and origin.startswith("computed")
    # ... and the new key is a hit next time.
    statistics_of(zarr_path, **options)
    assert len(counted) == 2


def test_a_corrupt_or_foreign_cache_file_is_computed_again(zarr_path, cache, counted, caplog):
    first, _ = statistics_of(zarr_path)
    (path,) = cache.glob("*.json")
    path.write_text('{"key": {"source": "elsewhere"}, "statistics": {"mean": {}')
    with caplog.at_level(logging.WARNING):
        again, origin = statistics_of(zarr_path)
    assert len(counted) == 2 and again == first and origin.startswith("computed")
    assert "could not be used" in caplog.text
    stored = json.loads(path.read_text())  # rewritten whole
    assert stored["statistics"] == first
    stored["key"]["bounds"]["time"] = [0, 1]  # a file whose key is not the one asked for
    path.write_text(json.dumps(stored))
    assert statistics_of(zarr_path)[1].startswith("computed") and len(counted) == 3


def test_the_cache_can_be_off_or_elsewhere(zarr_path, cache, tmp_path, counted):
    statistics_of(zarr_path, stats_cache=False)
    statistics_of(zarr_path, stats_cache=False)
    assert len(counted) == 2 and not cache.exists()
    elsewhere = tmp_path / "mine"
    statistics_of(zarr_path, stats_cache=str(elsewhere))
    assert statistics_of(zarr_path, stats_cache=str(elsewhere))[1].startswith("from cache")
    assert len(list(elsewhere.glob("*.json"))) == 1 and len(counted) == 3


def test_an_in_memory_dataset_is_always_computed(small_ds, cache, counted):
    statistics_of(small_ds)
    _, origin = statistics_of(small_ds)
    assert origin == "computed" and len(counted) == 2 and not cache.exists()


def test_a_netcdf_file_is_keyed_by_its_size_and_time(small_ds, tmp_path, cache, counted):
    path = tmp_path / "small.nc"
    small_ds.to_netcdf(path)
    statistics_of(path)
    assert statistics_of(path)[1].startswith("from cache")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert statistics_of(path)[1].startswith("computed") and len(counted) == 2


def smooth_field(n_time: int = 960) -> xr.Dataset:
    """A seasonal-and-daily cycle on a small grid, with weather noise."""
    rng = np.random.default_rng(1)
    hours = np.arange(n_time)
    cycle = 10 * np.sin(2 * np.pi * hours / 240) + 3 * np.sin(2 * np.pi * hours / 24)
    lat = np.linspace(-60, 60, 8)
    field = 280 + cycle[:, None, None] + 20 * np.cos(np.deg2rad(lat))[None, :, None]
    values = field + rng.standard_normal((n_time, 8, 10))
    return xr.Dataset(
        {"a": (("time", "lat", "lon"), values), "b": (("time", "lat", "lon"), values * 0.1)},
        coords={"time": pd.date_range("2020", periods=n_time, freq="h"), "lat": lat,
                "lon": np.arange(10.0)},
    )  # fmt: skip


@pytest.mark.parametrize("sample", [{"every": 4}, {"fraction": 0.3}])
def test_sampled_statistics_fall_within_their_printed_error(tmp_path, cache, sample, caplog):
    path = tmp_path / "smooth.zarr"
    smooth_field().chunk({"time": 24}).to_zarr(path)
    full, _ = statistics_of(path, stats_cache=False)
    with caplog.at_level(logging.WARNING):
        dm = XarrayDataModule(path, ["a", "b"], stats_sample=sample, stats_cache=False, **WINDOWS)
        estimate = dm.pipeline.normalisation.estimate
    assert "estimated from" in caplog.text and "standard error" in caplog.text
    assert "estimated from" in dm.pipeline.statistics_origin
    lower, upper = dm.split_bounds["train"]["time"]
    assert estimate.steps < estimate.of_steps == upper - lower
    for name in ("a", "b"):
        for kind in ("mean", "std"):
            got = np.array(getattr(estimate, kind)[name])
            error = np.array(getattr(estimate, f"{kind}_error")[name])
            assert (error > 0).all()
            assert (np.abs(got - full[kind][name]) <= 3 * error).all(), (name, kind)


def test_fraction_picks_whole_chunks_by_seed():
    picked = positions_of({"fraction": 0.25}, 5, 100, chunk=10, seed=3)
    chunks = np.unique(picked // 10)
    assert len(chunks) == 2 or len(chunks) == 3  # 10 chunks touch [5, 100): 0.25 -> 2 or 3
    for chunk in chunks:  # whole chunks, cut to the split
        expected = np.arange(max(5, chunk * 10), min(100, chunk * 10 + 10))
        np.testing.assert_array_equal(picked[picked // 10 == chunk], expected)
    np.testing.assert_array_equal(picked, positions_of({"fraction": 0.25}, 5, 100, 10, 3))


@pytest.mark.parametrize(
    "bad", [{"every": 0}, {"fraction": 1.5}, {"each": 2}, 4, {"every": 2, "fraction": 0.5}]
)
def test_a_bad_stats_sample_names_the_valid_forms(small_ds, bad):
    with pytest.raises(ValueError, match=r"stats_sample: .*Valid: \{'every': k\}"):
        XarrayDataModule(small_ds, ["a"], stats_sample=bad, **WINDOWS)


def test_the_stats_command_writes_what_stats_takes(tmp_path, cache, monkeypatch, capsys):
    from xr_datamodule.cli import stats

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "config.yaml"
    root = Path(__file__).resolve().parents[1]
    config.write_text((root / "examples" / "synthetic.yaml").read_text())
    written = stats(["--config", str(config), "--output", "out/stats.json"])
    out = capsys.readouterr().out
    assert f"use them with: data.stats: {written}" in out and "computed" in out
    stored = json.loads(written.read_text())
    assert set(stored) == {"mean", "std", "min", "max"} and set(stored["mean"]) >= {"t2m"}
    # The round trip: stats= takes the file, and the statistics are the ones computed.
    from xr_datamodule.cli import _data_arguments

    arguments = _data_arguments(str(config))
    given = XarrayDataModule(**{**arguments, "stats": str(written)})
    assert given.statistics.to_dict() == stored
    assert given.pipeline.statistics_origin == "given"
    computed = XarrayDataModule(**{**arguments, "normalize": "zscore", "stats_cache": False})
    for kind in ("mean", "std"):
        for name, values in getattr(computed.statistics, kind).items():
            np.testing.assert_allclose(stored[kind][name], values, rtol=1e-12)


def test_a_pass_shows_a_bar_only_where_someone_watches(monkeypatch, capsys):
    import dask.array as da

    from xr_datamodule import progress

    class Terminal:
        def __init__(self, stream):
            self.stream = stream

        def isatty(self):
            return True

        def write(self, text):
            return self.stream.write(text)

        def flush(self):
            self.stream.flush()

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(progress.sys, "stderr", Terminal(progress.sys.stderr))
    assert progress.shows_progress()
    with progress.scan_progress("statistics"):
        da.ones(100, chunks=10).sum().compute()
    assert "xr_datamodule: statistics" in capsys.readouterr().err
    for variable, value in (("CI", "true"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(variable, value)
        assert not progress.shows_progress()
        monkeypatch.delenv(variable)
