"""The worker → main hand-off through shared-memory rings (xr_datamodule.handoff)."""

from __future__ import annotations

from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
import torch.multiprocessing  # registers torch's reductions with ForkingPickler
from torch.utils.data import DataLoader, Dataset

from xr_datamodule import Batch, XarrayDataModule, collate_batch, handoff
from xr_datamodule.handoff import Ticket


@pytest.fixture(autouse=True)
def fresh_ring(monkeypatch):
    """Each test starts without a ring in this process."""
    monkeypatch.setattr(handoff, "_sender", handoff._Sender())


def deliver(ticket: Ticket) -> tuple[torch.Tensor, ...]:
    """What the DataLoader's main process does with a worker's result."""
    return ForkingPickler.loads(ForkingPickler.dumps(ticket))


def batch_arrays(seed: int, batch: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal((batch, 3, 4, 4)).astype(np.float32),
        rng.integers(0, 100, (batch, 1, 2)).astype(np.int64),  # another dtype and size
    ]


def test_a_ticket_arrives_as_equal_tensors_that_view_the_ring():
    arrays = batch_arrays(0)
    ticket = handoff.send(arrays, slots=3)
    assert ticket is not None
    received = deliver(ticket)
    assert [t.dtype for t in received] == [torch.float32, torch.int64]
    for tensor, array in zip(received, arrays, strict=True):
        np.testing.assert_array_equal(tensor.numpy(), array)
    # No copy: the tensors are the slot's memory.
    ring = ticket.ring
    slot_memory = ring.region(ticket.slot, ring.slot_bytes)
    assert np.shares_memory(received[0].numpy(), slot_memory)


def test_a_slot_has_memory_only_once_it_is_taken_and_travels_once(monkeypatch):
    """Sharing memory writes all of it: slots of a big ring never taken must not hold any."""
    monkeypatch.setattr(handoff, "_EAGER_RING_BYTES", 0)  # every ring counts as big
    first = handoff.send(batch_arrays(0), slots=4)
    assert first is not None
    ring = first.ring
    assert [tensor is not None for tensor in ring.data] == [True, False, False, False]
    received = deliver(first)
    assert ring.mapped(first.slot)
    del received  # the slot is free again: the next batch takes it, no new memory
    second = handoff.send(batch_arrays(1), slots=4)
    assert second is not None and second.slot == first.slot
    assert sum(tensor is not None for tensor in ring.data) == 1
    # The main process has mapped the slot: the ticket no longer carries its memory.
    assert ForkingPickler.loads(ForkingPickler.dumps(second))[0].shape == (5, 3, 4, 4)
    assert len(ForkingPickler.dumps(second)) < 1000
    monkeypatch.undo()  # a small ring is made whole: its memory stays what it is from the start
    small = handoff._Ring(4, 2**20)
    assert all(tensor is not None for tensor in small.data)


def test_a_slot_is_reused_only_once_every_tensor_of_its_batch_is_freed():
    slots = 3
    sent = [batch_arrays(seed) for seed in range(slots)]
    tickets = [handoff.send(arrays, slots) for arrays in sent]
    assert all(ticket is not None for ticket in tickets)
    assert handoff.send(batch_arrays(99), slots) is None  # every slot is in use
    received = [deliver(ticket) for ticket in tickets]
    # Received but held: the worker still may not write them.
    assert handoff.send(batch_arrays(99), slots) is None
    X0, y0 = received[0]
    view = X0[1:3]  # a view keeps the batch's slot too
    del received[0], X0, y0
    assert handoff.send(batch_arrays(99), slots) is None
    del view
    reused = handoff.send(batch_arrays(100), slots)
    assert reused is not None and reused.slot == tickets[0].slot
    # The batches still held kept their data; the reused slot has the new one.
    for (X, _), arrays in zip(received, sent[1:], strict=True):
        np.testing.assert_array_equal(X.numpy(), arrays[0])
    np.testing.assert_array_equal(deliver(reused)[1].numpy(), batch_arrays(100)[1])


def test_a_batch_gathered_into_its_slot_is_sent_without_a_copy(monkeypatch):
    monkeypatch.setattr(handoff, "get_worker_info", lambda: object())  # as in a worker
    arrays = batch_arrays(4)
    sizes = [handoff.aligned(a.nbytes) for a in arrays]
    buffer = handoff.allocate(sum(sizes), ring_slots=3)
    parts = [
        buffer[offset : offset + a.nbytes].view(a.dtype).reshape(a.shape)
        for offset, a in zip([0, sizes[0]], arrays, strict=True)
    ]
    for part, array in zip(parts, arrays, strict=True):
        part[...] = array
    ticket = handoff.send(parts, slots=3)
    assert ticket is not None
    assert [offset for offset, *_ in ticket.layout] == [0, sizes[0]]  # where they lie
    for tensor, array in zip(deliver(ticket), arrays, strict=True):
        np.testing.assert_array_equal(tensor.numpy(), array)
    del tensor  # the batch is freed: its slot too
    # A batch that failed before its ticket was made gives its slot back.
    handoff.allocate(100, ring_slots=3)
    handoff.allocate(100, ring_slots=3)
    ring = handoff._sender.ring
    assert int((ring.state_view[: ring.slots] == handoff._BUSY).sum()) == 1


def test_the_main_process_reuses_a_buffer_once_nothing_views_it():
    pool = handoff._Pool()
    first = pool.take(2**20)
    address = first.__array_interface__["data"][0]
    tensor = torch.from_numpy(first[64:].view(np.float32))
    del first
    second = pool.take(2**20)  # the first is still viewed by the tensor: another buffer
    other = second.__array_interface__["data"][0]
    assert other != address
    del tensor, second
    assert pool.lent == 0 and len(pool.free) == 2
    third = pool.take(2**20 - 64)  # a smaller batch fits a returned buffer
    assert third.__array_interface__["data"][0] in {address, other}
    assert pool.lent == 1 and len(pool.free) == 1


class Batches(Dataset):
    """Each item is a whole batch whose values identify it."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> Batch:
        base = np.arange(6 * 2 * 3, dtype=np.float32).reshape(6, 2, 3) + 1000 * i
        both = np.concatenate([base.reshape(-1), -base[:, :1].reshape(-1)])
        return Batch(both[: base.size].reshape(base.shape), both[base.size :].reshape(6, 1, 3))


@pytest.mark.parametrize("prefetch", [1, 2, 4])
def test_workers_deliver_every_batch_in_order_through_their_rings(prefetch):
    loader = DataLoader(
        Batches(),
        batch_size=None,
        num_workers=2,
        prefetch_factor=prefetch,
        collate_fn=lambda batch: collate_batch(batch, ring_slots=prefetch + 2),
        persistent_workers=True,
    )
    for _ in range(2):  # the second pass reuses the workers and their rings
        for i, (X, y) in enumerate(loader):
            expected = Batches()[i]
            np.testing.assert_array_equal(X.numpy(), expected.inputs)
            np.testing.assert_array_equal(y.numpy(), expected.targets)
            assert not X.is_shared()  # came through a ring, not torch's shared-memory path
        assert i == len(Batches()) - 1


def test_datamodule_worker_batches_equal_the_in_process_ones(small_ds):
    def loader_batches(workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        dm = XarrayDataModule(
            small_ds,
            input_vars=["a", "b"],
            input_dims={"time": 2, "lat": 4, "lon": 4},
            batch_size=7,
            num_workers=workers,
            prefetch_factor=3 if workers else None,
        )
        dm.setup("fit")
        return [(X.clone(), y.clone()) for X, y in dm.val_dataloader()]

    in_process, from_workers = loader_batches(0), loader_batches(2)
    assert len(in_process) == len(from_workers) > 1
    for (X0, y0), (X2, y2) in zip(in_process, from_workers, strict=True):
        assert torch.equal(X0, X2) and torch.equal(y0, y2)


def test_batches_kept_by_the_main_process_stay_intact():
    # Keeping every batch (as a prediction loop may) holds every slot: the workers then
    # hand over through torch's path, and nothing kept is overwritten.
    loader = DataLoader(Batches(), batch_size=None, num_workers=2, collate_fn=collate_batch)
    kept = list(loader)
    for i, (X, y) in enumerate(kept):
        np.testing.assert_array_equal(X.numpy(), Batches()[i].inputs)
        np.testing.assert_array_equal(y.numpy(), Batches()[i].targets)


def test_rings_of_finished_workers_are_released():
    loader = DataLoader(
        Batches(), batch_size=None, num_workers=2, collate_fn=collate_batch, prefetch_factor=2
    )
    for _ in range(4):  # new workers, with new rings, every pass
        assert sum(1 for _ in loader) == len(Batches())
    assert len(handoff._rings) <= 2 * 2  # this pass's rings, and at most the last pass's


def test_a_ticket_for_a_ring_never_received_is_an_error():
    arrays = batch_arrays(3)
    ticket = handoff.send(arrays, slots=2)
    assert ticket is not None
    ticket.ring.state_view[handoff._ATTACHED] = ticket.ring.token  # pretend it was attached
    with pytest.raises(RuntimeError, match="never received"):
        deliver(ticket)
