"""Chunk-aware sampling: exactly once, seeded, bounded chunks per batch, decode once per epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import SequentialSampler

from xr_datamodule import XarrayDataModule
from xr_datamodule.gather import ChunkedReader
from xr_datamodule.samplers import (
    ArrayBatchSampler,
    BatchPlan,
    BlockInterleavedSampler,
    ChunkShuffleSampler,
    ShardedBatchSampler,
    sample_order,
)


def batches_of(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@settings(max_examples=150, deadline=None)
@given(
    cell_sizes=st.lists(st.integers(1, 30), min_size=1, max_size=25),
    streams=st.integers(1, 4),
    batch_size=st.integers(1, 17),
    processes=st.integers(1, 3),
    world=st.integers(1, 3),
    walk=st.booleans(),
    seed=st.integers(0, 2**16),
    epoch=st.integers(0, 50),
)
def test_every_sample_once_per_epoch_over_ranks_and_bounded_cells(
    cell_sizes, streams, batch_size, processes, world, walk, seed, epoch
):
    cells = np.repeat(np.arange(len(cell_sizes)) * 7, cell_sizes)  # sparse cell numbers
    walk_positions = np.arange(7 * len(cell_sizes))[::-1].copy() if walk else None
    sampler = ChunkShuffleSampler(cells, seed, streams, batch_size, processes, walk_positions)
    sampler.set_epoch(epoch)
    orders = [sampler.rank_order(rank, world) for rank in range(world)]
    assert all(len(order) == len(cells) // world for order in orders)
    seen = np.concatenate(orders)
    assert len(np.unique(seen)) == len(seen)  # no sample twice, on any rank
    for order in orders:
        batches = batches_of(order, batch_size)
        if min(cell_sizes) >= batch_size:
            # A batch takes a contiguous run of at most batch_size samples from each of its
            # process's streams, and a stream holds whole cells in turn: two cells at most.
            for batch in batches:
                assert len(np.unique(cells[batch])) <= 2 * streams
        if world == 1:
            # Each process reads its own stretches: processes share at most the cells cut
            # between consecutive stretches.
            read = [
                set(cells[np.concatenate(batches[p::processes] or [[]]).astype(int)].tolist())
                for p in range(processes)
            ]
            cuts = processes * streams - 1 if processes > 1 else 0
            assert sum(map(len, read)) <= len(set().union(*read)) + cuts


def test_order_is_a_function_of_seed_and_epoch_and_changes_per_epoch():
    cells = np.repeat(np.arange(12), 40)
    a = ChunkShuffleSampler(cells, seed=5, streams=3, batch_size=8)
    b = ChunkShuffleSampler(cells, seed=5, streams=3, batch_size=8)
    first = a.take_order()
    assert np.array_equal(first, b.take_order())
    second = a.take_order()
    assert not np.array_equal(first, second)
    b.set_epoch(1)
    assert np.array_equal(second, b.order())
    other = ChunkShuffleSampler(cells, seed=6, streams=3, batch_size=8).order()
    assert not np.array_equal(first, other)
    # Cells come in a different order each epoch, not just the samples within them.
    assert not np.array_equal(np.unique(cells[first][:120]), np.unique(cells[second][:120]))


def lru_decodes(batches: list[np.ndarray], reach: int, capacity: int) -> int:
    """Decodes of an LRU cache of cells when sample t needs cells t .. t + reach."""
    cache: dict[int, None] = {}
    decodes = 0
    for batch in batches:
        needed = np.unique((batch[:, None] + np.arange(reach + 1)).reshape(-1)).tolist()
        for cell in needed:
            if cell in cache:
                del cache[cell]
            else:
                decodes += 1
            cache[cell] = None
        while len(cache) > capacity:
            del cache[next(iter(cache))]
    return decodes


@pytest.mark.parametrize("processes", [1, 2])
def test_full_field_samples_walk_the_cells_and_decode_each_about_once(processes):
    # One time step per chunk, samples of 3 steps (t, t+1 -> t+2), batches of 8 from 8
    # streams per process: the walk puts the cells a sample reaches into next.
    n_cells, reach, batch_size, streams = 730, 2, 8, 8
    cells = np.arange(n_cells - reach)  # sample t starts in cell t
    capacity = streams * (reach + 1) + batch_size + 1  # what the datamodule caches
    for walk, bound in [(np.arange(n_cells), 1.1), (None, None)]:
        sampler = ChunkShuffleSampler(cells, 0, streams, batch_size, processes, walk)
        order = sampler.order()
        batches = batches_of(order, batch_size)
        decodes = sum(lru_decodes(batches[p::processes], reach, capacity) for p in range(processes))
        if bound is not None:
            assert decodes <= bound * n_cells
            walked = decodes
            # A batch holds samples from 8 different places of the year.
            spread = np.mean([np.ptp(b) for b in batches if len(b) == batch_size])
            assert spread > n_cells / 4
        else:  # without the walk the neighbours are rarely cached
            assert decodes > 2 * walked


@pytest.mark.parametrize(("world", "processes"), [(1, 2), (1, 3), (2, 2), (2, 3)])
def test_each_worker_of_each_rank_reads_its_own_cells(world, processes):
    cells = np.repeat(np.arange(24), 64)
    for rank in range(world):
        order = ChunkShuffleSampler(cells, seed=0, streams=2, batch_size=32, processes=processes)
        batches = list(ShardedBatchSampler(order, 32, False, world, rank))
        # The DataLoader deals batch i to worker i % num_workers.
        worker_cells = [
            set(np.unique(cells[np.concatenate(batches[w::processes])]).tolist())
            for w in range(processes)
        ]
        # Only the cells cut between consecutive stretches are read by two workers.
        cuts = 2 * processes - 1
        assert sum(map(len, worker_cells)) <= len(set().union(*worker_cells)) + cuts
        assert len(set().union(*worker_cells)) <= 24 // world + 1


@pytest.fixture
def chunked_store(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    ds = xr.Dataset(
        {
            name: (("time", "lat", "lon"), rng.standard_normal((96, 128, 128), np.float32))
            for name in ("x", "y")
        },
        coords={"time": pd.date_range("2000-01-01", periods=96, freq="h")},
    )
    # Chunks of 8 steps x full space are 1 MiB for both variables: no cell merging.
    path = tmp_path / "chunked.zarr"
    ds.chunk({"time": 8}).to_zarr(path)
    return path


def train_batches(dm: XarrayDataModule) -> list[np.ndarray]:
    """The next epoch's training batches of the datamodule, as arrays of sample numbers."""
    items = dm.order.batch_sampler(dm.pipeline.sampling.train_split(), dm._world(), None)
    return [item.ids if isinstance(item, BatchPlan) else item for item in items]


def out_of_core(path: Path, **settings) -> XarrayDataModule:
    """x -> y on 32x32 patches of the chunked store, read out of core, set up for fit."""
    dm = XarrayDataModule(
        str(path),
        input_vars=["x"],
        target_vars=["y"],
        splits={"train": 1.0},
        input_dims={"time": 1, "lat": 32, "lon": 32},
        batch_size=16,
        load=False,
        **settings,
    )
    dm.setup("fit")
    return dm


def test_each_chunk_is_decoded_once_per_epoch(chunked_store):
    dm = out_of_core(chunked_store, num_workers=0, shuffle_chunks=2)
    reader = dm.datasets["train"].reader
    assert isinstance(reader, ChunkedReader)
    n_cells = int(np.prod(reader.grid.grid_shape))
    assert n_cells == 12  # chunks of 8 hours over 96 hours, full space
    loader = dm.train_dataloader()
    before = 0
    for epoch in range(3):
        seen = sum(len(x) for x, _ in loader)
        assert seen == len(dm.datasets["train"])
        decoded = reader.cells_read - before
        before = reader.cells_read
        # Every cell once; a cell whose samples two streams share may be decoded by each,
        # and cells still cached from the last epoch are not decoded again.
        assert n_cells - (epoch > 0) * reader.cache_cells <= decoded <= n_cells + 1
    assert len(reader.arena.slots) <= reader.cache_cells < n_cells


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_worker_memory_does_not_grow_across_epochs(chunked_store):
    dm = out_of_core(chunked_store, num_workers=2, shuffle_chunks=1)
    loader = dm.train_dataloader()
    totals = []
    for _ in range(5):
        for _batch in loader:
            pass
        workers = loader._iterator._workers  # persistent workers survive between epochs
        totals.append(sum(rss(worker.pid) for worker in workers))
    # Loose: after the first epoch warms the caches, memory stays within 10 %.
    assert max(totals[1:]) <= 1.10 * totals[1]


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_out_of_core_order_gives_each_worker_its_own_cells(chunked_store, workers):
    dm = out_of_core(chunked_store, num_workers=workers, shuffle_chunks=6)
    dataset = dm.datasets["train"]
    reader = dataset.reader
    cells = reader.grid.home_cells(dataset.index.axis_starts)[dataset.index.grid_ids()]
    batches = train_batches(dm)
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(len(dataset)))
    # Reproducible: the same settings give the same order.
    again = out_of_core(chunked_store, num_workers=workers, shuffle_chunks=6)
    assert all(np.array_equal(a, b) for a, b in zip(batches, train_batches(again), strict=True))
    processes = max(1, workers)
    per_process = [
        set(cells[np.concatenate(batches[p::processes])].tolist()) for p in range(processes)
    ]
    # Each process mixes shuffle_chunks / processes streams, each on one cell (a cell holds
    # 128 samples, more than a batch), and caches one more for a stream moving on.
    assert dm.chunk_layout() == (processes, 6 // processes)
    assert reader.cache_cells == 6 // processes + 1
    # 12 cells; each read by one process, except where a stretch is cut.
    cuts = 6 - 1 if processes > 1 else 0
    assert sum(len(cells_read) for cells_read in per_process) <= 12 + cuts


def test_a_checkpoint_keeps_its_layout_when_resumed_with_other_workers(chunked_store, caplog):
    written = out_of_core(chunked_store, num_workers=2, shuffle_chunks=4)
    full = train_batches(written)
    assert written.state_dict()["chunk_layout"] == [2, 2]
    resumed = out_of_core(chunked_store, num_workers=0, shuffle_chunks=4)
    with caplog.at_level("WARNING"):
        resumed.load_state_dict({"seed": 0, "chunk_layout": [2, 2], "epoch": 0, "batches_done": 3})
    assert "has 2 parts of 2 streams" in caplog.text
    # The one process now reads both parts: its cache holds both parts' streams.
    assert resumed.datasets["train"].reader.cache_cells == 2 * (2 + 1)
    rest = train_batches(resumed)
    assert len(rest) == len(full) - 3
    assert all(np.array_equal(a, b) for a, b in zip(rest, full[3:], strict=True))


@settings(max_examples=150, deadline=None)
@given(n=st.integers(0, 400), batch_size=st.integers(1, 20), blocks=st.integers(1, 4))
def test_evaluation_order_gives_each_worker_a_contiguous_run(n, batch_size, blocks):
    order = BlockInterleavedSampler(n, batch_size, blocks).order()
    assert np.array_equal(np.sort(order), np.arange(n))
    sampler = BlockInterleavedSampler(n, batch_size, blocks)
    batches = list(ArrayBatchSampler(sampler, batch_size, False))
    full = n // batch_size
    # Whole rounds (every run still has a batch): batch i belongs to run i % blocks, the run
    # of whole batches a worker reads alone.
    for i, batch in enumerate(batches[: (full // blocks) * blocks]):
        assert len(batch) == batch_size
        assert np.array_equal(batch, np.arange(batch[0], batch[0] + batch_size))
        assert (batch[0] // batch_size) * blocks // full == i % blocks


@pytest.mark.parametrize(("workers", "load"), [(2, False), (0, False), (2, True)])
def test_evaluation_loaders_deal_runs_to_workers_out_of_core(chunked_store, workers, load):
    dm = XarrayDataModule(
        str(chunked_store),
        input_vars=["x"],
        target_vars=["y"],
        splits={"train": 0.5, "val": 0.25, "test": 0.25},
        input_dims={"time": 1, "lat": 32, "lon": 32},
        batch_size=16,
        num_workers=workers,
        load=load,
    )
    dm.setup("fit")
    dealt = workers > 1 and not load
    for name in ("val", "test", "predict"):  # predict runs over test here, in order
        loader = getattr(dm, f"{name}_dataloader")()
        sampler = loader.batch_sampler.sampler
        expected = BlockInterleavedSampler if dealt and name != "predict" else SequentialSampler
        assert isinstance(sampler, expected), name
        if name == "val":  # through the workers, exactly the samples of the order, in it
            delivered = torch.cat([x for x, _ in loader]).numpy()
            expected = dm.datasets["val"].__getitems__(sample_order(sampler)).inputs
            np.testing.assert_array_equal(delivered, expected)
