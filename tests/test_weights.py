"""weights: per-window statistics against a brute force over every window, and the weights."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from xr_datamodule.weights import WindowStatistics, box_reduce, point_field, weights_from

REDUCE = {"max": np.nanmax, "min": np.nanmin, "mean": np.nanmean}


@settings(max_examples=60, deadline=None)
@given(
    field=arrays(
        np.float64,
        st.tuples(st.integers(1, 7), st.integers(1, 7)),
        elements=st.one_of(st.floats(-1e3, 1e3), st.just(np.nan)),
    ),
    data=st.data(),
    stat=st.sampled_from(["max", "min", "mean"]),
)
def test_box_reduce_is_the_statistic_of_every_box(field, data, stat):
    size = [data.draw(st.integers(1, n)) for n in field.shape]
    got = box_reduce(field, size, stat)
    expected = np.full([n - s + 1 for n, s in zip(field.shape, size, strict=True)], np.nan)
    for i in range(expected.shape[0]):
        for j in range(expected.shape[1]):
            box = field[i : i + size[0], j : j + size[1]]
            if not np.isnan(box).all():
                with np.errstate(all="ignore"):
                    expected[i, j] = REDUCE[stat](box)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


def test_point_field_reduces_variables_and_their_levels_per_point():
    rng = np.random.default_rng(0)
    ds = xr.Dataset(
        {
            "u": (("time", "level", "x"), rng.normal(size=(4, 3, 5))),
            "v": (("time", "x"), rng.normal(size=(4, 5))),
        }
    )
    ds["v"][1, 2] = np.nan
    stacked = np.concatenate([ds.u.values, ds.v.values[:, None]], axis=1)  # (time, 4, x)
    for stat in ("max", "min", "mean"):
        with np.errstate(all="ignore"):
            expected = REDUCE[stat](stacked, axis=1)
        got = point_field(ds, ["u", "v"], ("time", "x"), stat)
        np.testing.assert_allclose(got, expected)


def test_a_boost_gives_the_top_quantile_its_weight():
    values = np.arange(100, dtype=np.float64)
    stats = WindowStatistics(lambda side, stat: values)
    weights = weights_from({"by": "target_max", "quantile": 0.9, "boost": 10}, stats, 100)
    assert weights[values >= np.quantile(values, 0.9)].tolist() == [10.0] * 10
    assert set(weights[values < np.quantile(values, 0.9)].tolist()) == {1.0}


def test_statistics_are_computed_once_and_unknown_names_are_refused():
    calls = []
    stats = WindowStatistics(lambda side, stat: calls.append((side, stat)) or np.zeros(3))
    stats["input_mean"], stats["input_mean"]
    assert calls == [("input", "mean")]
    with pytest.raises(KeyError, match="input_median"):
        stats["input_median"]
    assert len(stats) == 6 and "target_max" in list(stats)
