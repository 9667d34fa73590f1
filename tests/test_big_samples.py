"""Big samples stay lean: batches read cell by cell through an arena smaller than a sample,
cells decoded straight into the batch, whole batches read ahead, the pool's wait."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_dataset, reference_windows
from xr_datamodule import XarrayDataModule, cells, handoff, order
from xr_datamodule.ahead import BatchAhead
from xr_datamodule.gather import ChunkedReader

ALL = ["a", "b", "c"]  # inputs = targets: a cell's every channel lands in one window


def module(ds, **overrides) -> XarrayDataModule:
    settings_ = dict(
        input_vars=ALL,
        target_vars=ALL,
        input_dims={"time": 2, "lat": 12, "lon": 10},
        input_overlap={"time": 1},
        target_dims={"time": 1, "lat": 12, "lon": 10},
        target_offset={"time": 2},
        splits={"train": 1.0},
        batch_size=1,
        load=False,
        seed=0,
    )
    settings_.update(overrides)
    dm = XarrayDataModule(ds, **settings_)
    dm.setup("fit")
    return dm


def expected(dm, ds, ids) -> tuple[np.ndarray, np.ndarray]:
    starts = dm.indices["train"].starts(ids)
    g = dm.geometry
    x = reference_windows(ds, dm.input_vars, g.dims, starts, g.input_size)
    y = reference_windows(ds, dm.target_vars, g.dims, starts + g.target_offset, g.target_size)
    return x.astype(np.float32), y.astype(np.float32)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    time_chunk=st.sampled_from([1, 2, 3]),
    lat_chunk=st.sampled_from([4, 6, 12]),
    input_steps=st.integers(1, 3),
    lead=st.integers(0, 2),
    lat_size=st.sampled_from([6, 12]),
    everything=st.booleans(),
    nan_mask=st.booleans(),
    batch=st.integers(1, 4),
    cache_share=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**16),
)
def test_batches_read_cell_by_cell_equal_isel(
    time_chunk,
    lat_chunk,
    input_steps,
    lead,
    lat_size,
    everything,
    nan_mask,
    batch,
    cache_share,
    seed,
):
    """Any arena below a sample's cells: the batch is the brute-force one, and the arena
    never holds more than its slots."""
    ds = make_dataset(n_time=16).chunk({"time": time_chunk, "lat": lat_chunk})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cells, "MIN_CELL_BYTES", 0)  # keep the small chunks as cells
        dm = module(
            ds,
            input_vars=ALL if everything else ["b", "a"],
            input_dims={"time": input_steps, "lat": lat_size, "lon": 10},
            input_overlap={"time": input_steps - 1},
            target_dims={"time": 1, "lat": lat_size, "lon": 10},
            target_offset={"time": input_steps + lead},
            nan_mask=nan_mask,
            nan_policy="fill" if nan_mask else "check",
        )
    reader = dm.datasets["train"].reader
    assert isinstance(reader, ChunkedReader)
    per_sample = reader.grid.cells_per_sample
    reader.resize_cache(max(1, int(cache_share * per_sample)))
    dataset = dm.datasets["train"]
    rng = np.random.default_rng(seed)
    for _ in range(3):  # cells cached by one batch are used (and replaced) by the next
        ids = rng.choice(len(dataset), size=min(batch, len(dataset)), replace=False)
        got = dataset.__getitems__(ids)
        x, y = expected(dm, ds, ids)
        np.testing.assert_array_equal(got.inputs[:, : x.shape[1]], x)
        assert got.inputs.shape[1] == x.shape[1] + nan_mask
        assert not got.inputs[:, x.shape[1] :].any()  # the mask: nothing was missing
        np.testing.assert_array_equal(got.targets, y)
        assert len(reader.arena.slots) <= reader.cache_cells


def test_cells_decoded_into_the_batch_are_normalised_and_kept_for_the_next():
    ds = make_dataset(n_time=24).chunk({"time": 1, "lat": -1, "lon": -1})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cells, "MIN_CELL_BYTES", 0)
        wide = module(ds, normalize="zscore")
        narrow = module(ds, normalize="zscore")
    reader = narrow.datasets["train"].reader
    assert reader.grid.cells_per_sample == 3
    reader.resize_cache(2)  # the two cells the next sample (one step on) reuses
    for sample in range(len(narrow.datasets["train"])):  # walking forward, as a stream does
        got = narrow.datasets["train"].__getitems__([sample])
        want = wide.datasets["train"].__getitems__([sample])
        np.testing.assert_allclose(got.inputs, want.inputs, rtol=1e-6)
        np.testing.assert_allclose(got.targets, want.targets, rtol=1e-6)
    # One new cell a sample after the first: the decoded cells were kept for reuse.
    assert reader.cells_read == 3 + (len(narrow.datasets["train"]) - 1)


def test_big_samples_without_workers_read_whole_batches_ahead(monkeypatch):
    """Each training batch is read whole in the background: every sample once an epoch,
    each equal to ``ds.isel``, through an arena smaller than a sample, decoding about
    each cell once."""
    monkeypatch.setattr(cells, "MIN_CELL_BYTES", 0)
    monkeypatch.setattr(order, "STREAM_CACHE_BYTES", 1)  # every sample counts as big
    ds = make_dataset(n_time=24).chunk({"time": 1, "lat": -1, "lon": -1})
    dm = module(ds, num_workers=0)
    dataset = dm.datasets["train"]
    reader = dataset.reader
    assert dataset.ahead is not None
    assert reader.cache_cells < reader.grid.cells_per_sample
    loader = dm.train_dataloader()
    for epoch in range(2):
        read_before = reader.cells_read
        seen = []
        for X, y in loader:
            sample = _sample_of(dm, ds, X, y)
            assert sample is not None, "a batch equals no sample's windows"
            seen.append(sample)
        assert sorted(seen) == list(range(len(dataset))), epoch
        # 24 cells, 22 samples of 3: without reuse 66 decodes an epoch.
        assert reader.cells_read - read_before <= 30
    dm.teardown("fit")


def test_another_splits_batch_waits_for_the_batch_read_ahead(monkeypatch):
    """Validation reads share the reader with the training batch being read ahead."""
    monkeypatch.setattr(cells, "MIN_CELL_BYTES", 0)
    monkeypatch.setattr(order, "STREAM_CACHE_BYTES", 1)
    ds = make_dataset(n_time=30).chunk({"time": 1, "lat": -1, "lon": -1})
    dm = module(ds, splits={"train": 0.7, "val": 0.3}, num_workers=0)
    train, val = dm.datasets["train"], dm.datasets["val"]
    assert train.ahead is not None
    for sample in range(len(train) - 1):
        got = train.__getitems__([sample], upcoming=np.array([sample + 1]))
        np.testing.assert_array_equal(got.inputs, expected(dm, ds, [sample])[0])
        del got  # the loop moves on: the read ahead gets its buffer and starts
        for other in (sample % len(val), (sample + 3) % len(val)):  # while one is read ahead
            starts = dm.indices["val"].starts([other])
            g = dm.geometry
            want = reference_windows(ds, ALL, g.dims, starts, g.input_size).astype(np.float32)
            np.testing.assert_array_equal(val.__getitems__([other]).inputs, want)
    dm.teardown("fit")


def _sample_of(dm, ds, X: torch.Tensor, y: torch.Tensor) -> int | None:
    """The sample whose brute-force windows the batch of one equals."""
    for sample in range(len(dm.datasets["train"])):
        x, want_y = expected(dm, ds, [sample])
        if np.array_equal(X.numpy(), x) and np.array_equal(y.numpy(), want_y):
            return sample
    return None


def test_a_batch_read_ahead_is_used_only_for_the_batch_asked_for():
    reads = []

    def read(ids, epoch, seed):
        reads.append((ids.tolist(), threading.current_thread() is threading.main_thread()))
        if ids[0] == 99:
            raise OSError("store went away")
        return ids * 10

    ahead = BatchAhead(read)
    assert ahead.read([1], upcoming=np.array([2])).tolist() == [10]
    assert ahead.read([2], upcoming=np.array([3])).tolist() == [20]  # read ahead
    assert reads[1] == ([2], False)
    assert ahead.read([5]).tolist() == [50]  # not the one hinted: read again, here
    assert reads[-1] == ([5], True)
    ahead.read([7], upcoming=np.array([99]))
    with pytest.raises(OSError, match="went away"):  # a failed read ahead fails in the caller
        ahead.read([99])
    assert reads[-1] == ([99], True)
    ahead.read([1], upcoming=np.array([2]), epoch=0)
    assert ahead.read([2], epoch=1).tolist() == [20] and reads[-1] == ([2], True)  # epoch
    ahead.close()


def test_the_pool_waits_for_a_buffer_to_come_back_in_a_read_ahead():
    pool = handoff._Pool()
    monkey = pytest.MonkeyPatch()
    monkey.setattr(handoff, "_pool", pool)
    try:
        held = handoff.allocate(2**21)  # the batch the loop holds
        address = held.__array_interface__["data"][0]
        taken = []

        def read_ahead() -> None:
            with handoff.waiting_for_buffers(threading.Event()):
                taken.append(handoff.allocate(2**21))

        thread = threading.Thread(target=read_ahead)
        thread.start()
        thread.join(0.2)
        assert thread.is_alive() and not taken  # waits rather than make a second buffer
        del held  # the loop moves on: the read ahead gets its buffer
        thread.join(5)
        assert taken[0].__array_interface__["data"][0] == address
        hurry = threading.Event()
        hurry.set()
        with handoff.waiting_for_buffers(hurry):  # the loop waits for the batch: no wait
            other = handoff.allocate(2**21)
        assert other.__array_interface__["data"][0] != address
    finally:
        monkey.undo()


def test_a_fit_reading_whole_batches_ahead_resumes_exactly_mid_epoch(tmp_path, monkeypatch):
    """Through a Trainer: each epoch every sample once; a mid-epoch checkpoint resumes with
    exactly the batches that remained, in order."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.ddp_script import ids_dataset
    from tests.test_exactly_once import fit_ids

    monkeypatch.setattr(cells, "MIN_CELL_BYTES", 0)
    monkeypatch.setattr(order, "STREAM_CACHE_BYTES", 1)  # every sample counts as big

    def ids_module() -> XarrayDataModule:
        return XarrayDataModule(
            ids_dataset(90).chunk({"time": 1}),
            input_vars=["x"],
            input_dims={"time": 1},
            splits={"train": 1.0},
            batch_size=8,
            dtype="float64",
            num_workers=0,
            load=False,
            seed=11,
        )

    probe = ids_module()
    probe.setup("fit")
    assert probe.datasets["train"].ahead is not None
    full = fit_ids(ids_module(), max_epochs=2, enable_checkpointing=False)
    for epoch in (full[:12], full[12:]):
        assert sorted(i for batch in epoch for i in batch) == list(range(90))
    every = ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1, filename="{step}"
    )
    assert fit_ids(ids_module(), callbacks=[every], max_epochs=2) == full
    rest = fit_ids(
        ids_module(),
        ckpt_path=str(tmp_path / "step=15.ckpt"),
        max_epochs=2,
        enable_checkpointing=False,
    )
    assert rest == full[15:]
