"""cells: the cell grid against a brute force over every position and sample."""

from __future__ import annotations

import itertools

import numpy as np
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from xr_datamodule import cells
from xr_datamodule.cells import CellGrid, cell_edges, cell_grid


def edges_of(lengths: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=5), min_size=1, max_size=3),
    data=st.data(),
)
def test_cells_touched_by_a_span_are_those_a_brute_force_finds(lengths, data):
    edges = tuple(edges_of(each) for each in lengths)
    extent = tuple(data.draw(st.integers(1, int(e[-1]))) for e in edges)
    grid = CellGrid(edges, extent, 4)
    owner = [np.repeat(np.arange(len(e) - 1), np.diff(e)) for e in edges]  # cell of a position
    starts = [range(int(e[-1]) - n + 1) for e, n in zip(edges, extent, strict=True)]
    worst = 0
    for base in itertools.product(*starts):
        touched = set()
        spans = [range(b, b + n) for b, n in zip(base, extent, strict=True)]
        for point in itertools.product(*spans):
            cell = [int(o[p]) for o, p in zip(owner, point, strict=True)]
            touched.add(int(np.ravel_multi_index(cell, grid.grid_shape)))
        keys = grid.span_keys(np.asarray([base]), extent)
        assert set(keys.tolist()) == touched
        first = [int(o[b]) for o, b in zip(owner, base, strict=True)]
        home = np.ravel_multi_index(first, grid.grid_shape)
        assert grid.home_cells([np.asarray([b]) for b in base])[0] == home
        worst = max(worst, len(touched))
    assert grid.cells_per_sample >= worst  # the cache is sized for the worst sample


def test_the_walk_visits_every_cell_once_and_steps_along_the_reaching_dim():
    grid = CellGrid((edges_of([2] * 4), edges_of([3, 3])), (3, 1), 8)
    walk = grid.cell_walk()
    assert sorted(walk.tolist()) == list(range(8))
    order = np.argsort(walk)  # cells in walk order
    along_time = np.unravel_index(order, grid.grid_shape)[0]
    assert along_time[:4].tolist() == [0, 1, 2, 3]  # time varies fastest


def test_chunks_become_cells_merged_only_where_it_pays(monkeypatch):
    monkeypatch.setattr(cells, "MIN_CELL_BYTES", 0)
    ds = xr.Dataset({"t": (("time", "lat", "lon"), np.zeros((12, 8, 16), np.float32))}).chunk(
        {"time": 2, "lat": 4, "lon": 4}
    )
    edges = cell_edges(ds, "t", ("time", "lat", "lon"), (1, 8, 3), 4, 1)
    assert edges[0].tolist() == list(range(0, 13, 2))  # the chunks
    assert edges[1].tolist() == [0, 8]  # every sample spans latitude whole: one cell
    assert edges[2].tolist() == [0, 8, 16]  # at least 4 x (3 - 1) along the last dim
    grid = cell_grid(ds, ["t"], ("time", "lat", "lon"), (1, 8, 3), 1, 4)
    assert grid.cell_bytes == 2 * 8 * 8 * 4
