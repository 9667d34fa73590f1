"""Hostile configurations: random arguments, wrong types and absurd values included.

Every configuration either serves training batches equal to a brute-force ``isel`` reference
or raises one of the documented errors (ValueError, KeyError, TypeError, FileNotFoundError)
whose message names the argument at fault: never an internal exception of numpy, xarray or
torch, and never a hang.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import reference_windows
from xr_datamodule import XarrayDataModule

DIMS = ("time", "lat", "lon")
DOCUMENTED = (ValueError, KeyError, TypeError, FileNotFoundError)
SECONDS_PER_CASE = 30  # far above what a case takes (~0.1 s): more is a hang

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.lists(st.integers(-2, 5), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-2, 5), max_size=2),
)


def sizes(max_value: int = 4, min_size: int = 1, long: bool = True) -> st.SearchStrategy:
    """Window-like mappings over the real dims, with plausible (with ``long``, sometimes too
    long) lengths."""
    lengths = st.integers(1, max_value)
    if long:
        lengths = st.one_of(lengths, lengths, st.integers(1, 15))
    return st.dictionaries(st.sampled_from(DIMS), lengths, min_size=min_size, max_size=3)


# Arguments of the right type and mostly sensible values (still often at odds with the data
# or each other: windows longer than a split, unknown variables, fractions over one).
def plausible(hostile: bool) -> st.SearchStrategy:
    """Arguments of the right type; with ``hostile``, some valid for no data."""

    def mostly(valid: list, wrong: list) -> st.SearchStrategy:
        if not hostile:
            return st.sampled_from(valid)
        return st.one_of(*[st.sampled_from(valid)] * 4, st.sampled_from(wrong))

    return st.fixed_dictionaries(
        {
            "input_vars": mostly([["a"], ["a", "c"], ["c", "b"], ["b"]], [["nope"], []]),
            "input_dims": sizes(2 if not hostile else 4, long=hostile),
            "num_workers": st.just(0),
        },
        optional={
            "target_vars": mostly([["b"], ["a"], ["c"]], [["zz"]]),
            "splits": mostly(
                [
                    {"train": 0.6, "val": 0.4},
                    {"train": 1.0},
                    {"train": 0.7, "val": 0.3},
                    {"train": 0.5, "test": 0.5},
                    {
                        "train": {"time": ["2020-01-01", "2020-01-09"]},
                        "val": {"time": ["2020-01-10", None]},
                    },
                ],
                [{"train": 1.5}, {"bogus": 0.3}, {"train": {"lat": [0, 3]}}, {"train": -0.2}],
            ),
            "batch_size": st.integers(1, 40),
            "dtype": mostly(["float32", "float64", "float16"], ["int32"]),
            "nan_policy": st.sampled_from(["check", "keep", "error", "drop", "fill"]),
            "shuffle": st.sampled_from(["auto", "chunks", "full"]),
            "load": st.sampled_from([True, False, "auto"]),
            "drop_last": st.booleans(),
            "seed": st.integers(0, 2**31),
            "normalize": mostly([None], [{"zz": "zscore"}, "median"]),
            "style": st.sampled_from(["map", "iterable"]),
        },
    )


ARGUMENTS = (  # replaced by junk now and then; a message must name one of them
    "input_vars input_dims target_vars input_overlap target_dims target_offset splits "
    "batch_size dtype nan_policy shuffle load drop_last seed normalize style num_workers "
    "split_dim fill_value nan_mask shuffle_chunks forcings select stats batch_format "
    "transform_on normalize_on prefetch_factor persistent_workers pin_memory"
).split()


@st.composite
def configs(draw: st.DrawFn, hostile: bool = True) -> dict:
    """A plausible configuration, with up to two arguments replaced by anything at all.

    Overlaps, target windows and offsets are mostly drawn over the input window's own dims
    (a mismatch is one of the errors, not the rule).
    """
    config = draw(plausible(hostile))
    dims = list(config["input_dims"])
    if hostile and draw(st.integers(0, 5)) == 0:  # dims at odds with the input window's
        config["input_overlap"] = draw(sizes(4, min_size=0))
        config["target_dims"] = draw(sizes(3))
        config["target_offset"] = draw(sizes(6, min_size=0))
    else:
        lengths = config["input_dims"]
        for name, most in (("input_overlap", None), ("target_dims", 3), ("target_offset", 6)):
            if draw(st.booleans()):
                continue
            picked = draw(st.lists(st.sampled_from(dims), unique=True, max_size=len(dims)))
            if name == "target_dims":
                picked = dims  # every input dim: required
            config[name] = {
                dim: draw(
                    st.integers(0, lengths[dim] - 1)
                    if most is None
                    else st.integers(1 if name == "target_dims" else -2, most)
                )
                for dim in picked
            }
    junked = draw(st.sampled_from([0, 0, 0, 1, 2])) if hostile else 0
    for name in draw(
        st.lists(st.sampled_from(ARGUMENTS), min_size=junked, max_size=junked, unique=True)
    ):
        config[name] = draw(junk)
    return config


def make_data(n_time: int, n_lat: int, n_lon: int, holes: int, seed: int) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    ds = xr.Dataset(
        {
            "a": (DIMS, rng.standard_normal((n_time, n_lat, n_lon))),
            "b": (DIMS, rng.standard_normal((n_time, n_lat, n_lon)).astype(np.float32)),
            "c": (("level", *DIMS), rng.standard_normal((2, n_time, n_lat, n_lon))),
        },
        coords={
            "time": pd.date_range("2020-01-01", periods=n_time, freq="D"),
            "lat": np.linspace(50, 40, n_lat),
            "lon": np.arange(n_lon, dtype=float),
            "level": [500, 850],
        },
    )
    for _ in range(holes):
        ds["a"].values[tuple(rng.integers(0, n) for n in (n_time, n_lat, n_lon))] = np.nan
    return ds


@contextmanager
def no_hang(seconds: int):
    def hang(*_):
        raise AssertionError(f"a configuration hung (over {seconds} s)")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def expected_batch(ds: xr.Dataset, dm: XarrayDataModule, ids: np.ndarray, fill: float | None):
    geometry, spec = dm.geometry, dm.spec
    starts = dm.indices["train"].starts(ids)
    target_starts = starts + np.asarray(geometry.target_offset)
    inputs = reference_windows(ds, spec.input_vars, dm.window_dims, starts, geometry.input_size)
    targets = reference_windows(
        ds, spec.targets, dm.window_dims, target_starts, geometry.target_size
    )
    if fill is not None:
        inputs, targets = np.nan_to_num(inputs, nan=fill), np.nan_to_num(targets, nan=fill)
    return inputs.astype(spec.array_dtype), targets.astype(spec.array_dtype)


def check(shape: tuple[int, int, int], holes: int, seed: int, config: dict) -> str:
    """Serve the configuration's training epoch against brute force, or check its error."""
    ds = make_data(*shape, holes, seed)
    with no_hang(SECONDS_PER_CASE):
        try:
            dm = XarrayDataModule(ds, **config)
            dm.setup("fit")
            batches = dm.train_batches(epoch=0)
            served = list(dm.train_dataloader())
        except DOCUMENTED as error:
            event(f"refused: {type(error).__name__}: {str(error)[:50]}")
            message = str(error)
            named = [name for name in ARGUMENTS if name in message]
            assert named or "split" in message, f"{type(error).__name__}: {message} <- {config}"
            return "refused"
    event("served")
    assert len(served) == len(batches)
    fill = dm.spec.fill_value if dm.spec.nan_policy == "fill" else None
    for ids, (inputs, targets) in zip(batches, served, strict=True):
        want_inputs, want_targets = expected_batch(ds, dm, np.asarray(ids), fill)
        np.testing.assert_array_equal(inputs.numpy(), want_inputs)
        np.testing.assert_array_equal(targets.numpy(), want_targets)
    return "served"


SHAPES = st.tuples(st.integers(1, 14), st.integers(1, 5), st.integers(1, 5))
HOLES = st.sampled_from([0, 0, 1, 3])  # NaN in the data, now and then
CASES = dict(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@pytest.mark.slow
@settings(max_examples=250, **CASES)
@given(shape=SHAPES, holes=HOLES, seed=st.integers(0, 100), config=configs())
def test_any_configuration_serves_the_reference_or_a_documented_error(shape, holes, seed, config):
    check(shape, holes, seed, config)


@pytest.mark.slow
@settings(max_examples=120, **CASES)
@given(
    shape=st.tuples(st.integers(6, 14), st.integers(2, 5), st.integers(2, 5)),
    holes=HOLES,
    seed=st.integers(0, 100),
    config=configs(hostile=False),
)
def test_valid_configurations_serve_the_reference(shape, holes, seed, config):
    # Valid arguments may still not fit the data (a window longer than a split, NaN with
    # nan_policy="check" or "error"): those end in a documented error too.
    check(shape, holes, seed, config)
