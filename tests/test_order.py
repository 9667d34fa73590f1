"""TrainingOrder: epochs of batches, chunk layouts and the resume state, without data."""

from __future__ import annotations

import numpy as np

from xr_datamodule.order import TrainingOrder, TrainSplit


def test_each_epoch_is_every_sample_once_and_a_function_of_seed_and_epoch():
    split = TrainSplit(n_samples=50)
    order = TrainingOrder(seed=3, batch_size=8)
    first = order.epoch_batches(split, epoch=0)
    assert sorted(np.concatenate(first).tolist()) == list(range(50))
    again = TrainingOrder(seed=3, batch_size=8).epoch_batches(split, epoch=0)
    assert all((a == b).all() for a, b in zip(first, again, strict=True))
    other = order.epoch_batches(split, epoch=1)
    assert not all((a == b).all() for a, b in zip(first, other, strict=True))


def chunked(workers: int) -> TrainSplit:
    cells = np.repeat(np.arange(40), 3)  # 40 cells of 3 full-field samples each
    return TrainSplit(120, "chunks", workers, cells, cells_per_sample=2, cell_bytes=2**20)


def test_a_checkpoint_keeps_its_chunk_layout_and_resume_point():
    order = TrainingOrder(seed=1, batch_size=8)
    sampler = order.batch_sampler(chunked(workers=2), world=(1, 0), epoch=0)
    assert sampler.epoch_batches()  # the order a 2-worker run trains on
    state = order.state_dict(batches_done=5, trainer_epoch=0)
    assert state["chunk_layout"] == [2, 2] and state["batches_done"] == 5
    resumed = TrainingOrder(seed=0, batch_size=8)
    layout_now = resumed.chunk_layout(chunked(workers=0))
    assert layout_now == (1, 4)
    assert resumed.load_state_dict(state, layout_now)  # changed: a reader must resize
    assert resumed.seed == 1 and resumed.resume == (0, 40, 5)  # 40 samples, 5 batches
    assert resumed.chunk_layout(chunked(workers=0)) == (2, 2)
    # The resumed order skips exactly the batches done, in the same order.
    rest = resumed.batch_sampler(chunked(workers=0), world=(1, 0), epoch=0)
    full = TrainingOrder(seed=1, batch_size=8).batch_sampler(chunked(2), (1, 0), epoch=0)
    remaining = [np.asarray(getattr(b, "ids", b)) for b in rest]
    expected = [np.asarray(getattr(b, "ids", b)) for b in full][5:]
    assert all((a == b).all() for a, b in zip(remaining, expected, strict=True))
    assert len(remaining) == len(expected)


def test_the_cache_holds_what_the_streams_keep_in_use():
    order = TrainingOrder(batch_size=8)
    # In memory-like full shuffle: a batch's cells plus one.
    assert order.cache_cells(TrainSplit(120, "full", 0), per_sample=2, cell_bytes=2**20) == 17
    # Chunk-aware, 4 streams of 2 cells each; streams move on ceil(8 / 3) = 3 times a batch.
    assert order.cache_cells(chunked(0), per_sample=2, cell_bytes=2**20) == 4 * 2 + 3 + 1
    assert order.cache_cells(None, per_sample=2, cell_bytes=2**20) == 3


def test_big_samples_get_fewer_streams_not_more_memory():
    """A 0.25 deg state (cells of 100 MB, 3 a sample): the floor of 4 streams would hold 12."""
    cells = np.arange(40)  # one sample starts in each cell
    big = TrainSplit(40, "chunks", 0, cells, cells_per_sample=3, cell_bytes=100 * 2**20)
    order = TrainingOrder(batch_size=1)
    assert order.chunk_layout(big) == (1, 1)
    assert order.cache_cells(big, per_sample=3, cell_bytes=100 * 2**20) == 3 + 1
    # Cells of 20 MB: 4 streams' 240 MB fit the budget, so the floor stands.
    small = TrainSplit(40, "chunks", 0, cells, cells_per_sample=3, cell_bytes=20 * 2**20)
    assert order.chunk_layout(small) == (1, 4)
    # Every sample still comes once per epoch with the one stream.
    batches = order.epoch_batches(big, epoch=0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(40))


def test_a_worker_keeps_only_the_cells_its_stream_reuses_when_they_are_big():
    """A worker decodes nothing in the background: no slot for a prefetch."""
    cells = np.arange(40)
    order = TrainingOrder(batch_size=1)
    big = TrainSplit(40, "chunks", 2, cells, cells_per_sample=3, cell_bytes=100 * 2**20)
    assert order.chunk_layout(big) == (2, 1)
    # A sample's 3 cells of 100 MB pass the stream budget: the 2 the next sample reuses.
    assert order.cache_cells(big, per_sample=3, cell_bytes=100 * 2**20) == 2
    # Small cells: two streams a worker, as before (each stream's cells, one it moves to).
    small = TrainSplit(40, "chunks", 2, cells, cells_per_sample=3, cell_bytes=2**20)
    assert order.chunk_layout(small) == (2, 2)
    assert order.cache_cells(small, per_sample=3, cell_bytes=2**20) == 2 * 3 + 1
    batches_of_4 = TrainingOrder(batch_size=4)
    # Four samples of one stream span 3 + 3 cells; the next batch reuses the last 2.
    one_stream = TrainSplit(40, "chunks", 2, cells, cells_per_sample=3, cell_bytes=100 * 2**20)
    assert batches_of_4.chunk_layout(one_stream)[1] == 1
    assert batches_of_4.cache_cells(one_stream, per_sample=3, cell_bytes=100 * 2**20) == 2
