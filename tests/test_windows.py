"""Window geometry and the sample index against brute-force references (and xbatcher)."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from xr_datamodule.windows import WindowGeometry, build_index


def brute_force_starts(lo, hi, size, stride, tsize, offset):
    """Starts on the grid lo + reach_below + k * stride whose windows lie in [lo, hi)."""
    inside = set(range(lo, hi))
    first = lo + max(0, -offset)
    out = []
    for start in range(first, hi, stride):
        touched = set(range(start, start + size)) | set(
            range(start + offset, start + offset + tsize)
        )
        if touched <= inside:
            out.append(start)
    return out


dim_case = st.tuples(
    st.integers(1, 40),  # length of the dim
    st.integers(1, 8),  # window
    st.integers(0, 7),  # overlap (clipped below the window)
    st.integers(1, 5),  # target window
    st.integers(-6, 8),  # target offset
).flatmap(
    lambda c: st.tuples(st.just(c), st.integers(0, c[0]), st.integers(0, c[0]))  # split bounds
)


@settings(max_examples=200, deadline=None)
@given(st.lists(dim_case, min_size=1, max_size=3))
def test_index_matches_brute_force(cases):
    dims, sizes, strides, tsizes, offsets, bounds = [], [], [], [], [], {}
    expected_axes = []
    for axis, ((_length, size, overlap, tsize, offset), a, b) in enumerate(cases):
        lo, hi = min(a, b), max(a, b)
        stride = size - min(overlap, size - 1)
        dim = f"d{axis}"
        dims.append(dim)
        sizes.append(size)
        strides.append(stride)
        tsizes.append(tsize)
        offsets.append(offset)
        bounds[dim] = (lo, hi)
        expected_axes.append(brute_force_starts(lo, hi, size, stride, tsize, offset))
    geometry = WindowGeometry(
        tuple(dims), tuple(sizes), tuple(strides), tuple(tsizes), tuple(offsets)
    )
    index = build_index(geometry, bounds)
    expected = list(itertools.product(*expected_axes))
    assert len(index) == len(expected)
    got = index.starts(np.arange(len(index)))
    assert got.shape == (len(expected), len(dims))
    assert [tuple(row) for row in got.tolist()] == expected
    # Every sample's input and target windows lie inside the split bounds.
    for axis, dim in enumerate(dims):
        lo, hi = bounds[dim]
        if len(index):
            assert got[:, axis].min() + min(0, offsets[axis]) >= lo
            assert got[:, axis].max() + max(sizes[axis], offsets[axis] + tsizes[axis]) <= hi


def test_index_matches_xbatcher_windows():
    xbatcher = pytest.importorskip("xbatcher")
    ds = xr.Dataset(
        {"x": (("time", "lat"), np.arange(23 * 17).reshape(23, 17).astype(float))},
        coords={"time": np.arange(23), "lat": np.arange(17)},
    )
    input_dims, overlap = {"time": 5, "lat": 4}, {"time": 2, "lat": 1}
    generator = xbatcher.BatchGenerator(ds, input_dims=input_dims, input_overlap=overlap)
    theirs = sorted((int(b.time[0]), int(b.lat[0])) for b in generator)
    geometry = WindowGeometry(("time", "lat"), (5, 4), (3, 3), (5, 4), (0, 0))
    index = build_index(geometry, {"time": (0, 23), "lat": (0, 17)})
    ours = sorted(map(tuple, index.starts(np.arange(len(index))).tolist()))
    assert ours == theirs


def test_out_of_range_sample_raises():
    geometry = WindowGeometry(("t",), (2,), (1,), (1,), (2,))
    index = build_index(geometry, {"t": (0, 10)})
    assert len(index) == 8  # one sample spans 3 positions: 10 - 3 + 1
    with pytest.raises(IndexError, match="sample 8 is out of range"):
        index.starts([0, 8])


def test_one_million_samples_index_is_fast_and_compact():
    geometry = WindowGeometry(
        ("time", "lat", "lon"), (1, 32, 32), (1, 1, 1), (1, 32, 32), (1, 0, 0)
    )
    began = time.perf_counter()
    index = build_index(geometry, {"time": (0, 1001), "lat": (0, 131), "lon": (0, 41)})
    starts = index.starts(np.arange(len(index)))
    elapsed = time.perf_counter() - began
    assert len(index) == 1000 * 100 * 10 == starts.shape[0]
    # The index itself is three short arrays, not a million objects.
    assert sum(a.nbytes for a in index.axis_starts) < 10_000
    print(f"1M-sample index + all starts: {elapsed * 1e3:.1f} ms")
