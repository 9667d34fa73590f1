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


def test_a_ticket_arrives_as_equal_tensors_that_own_their_memory():
    arrays = batch_arrays(0)
    ticket = handoff.send(arrays, slots=3)
    assert ticket is not None
    received = deliver(ticket)
    assert [t.dtype for t in received] == [torch.float32, torch.int64]
    for tensor, array in zip(received, arrays, strict=True):
        np.testing.assert_array_equal(tensor.numpy(), array)
        assert not tensor.is_shared()  # a private copy: the slot can be reused


def test_a_full_ring_falls_back_and_a_received_ticket_frees_its_slot():
    slots = 3
    sent = [batch_arrays(seed) for seed in range(slots)]
    tickets = [handoff.send(arrays, slots) for arrays in sent]
    assert all(ticket is not None for ticket in tickets)
    assert handoff.send(batch_arrays(99), slots) is None  # every slot is still unread
    first = deliver(tickets[0])
    reused = handoff.send(batch_arrays(100), slots)
    assert reused is not None and reused.slot == tickets[0].slot
    # Receiving the others afterwards still gives their own data, and the reused slot its new data.
    for ticket, arrays in zip(tickets[1:], sent[1:], strict=True):
        np.testing.assert_array_equal(deliver(ticket)[0].numpy(), arrays[0])
    np.testing.assert_array_equal(first[0].numpy(), sent[0][0])
    np.testing.assert_array_equal(deliver(reused)[1].numpy(), batch_arrays(100)[1])


def test_a_larger_batch_gets_a_new_ring():
    small = handoff.send(batch_arrays(1, batch=2), slots=2)
    assert small is not None
    deliver(small)
    large_arrays = batch_arrays(2, batch=50)
    large = handoff.send(large_arrays, slots=2)
    assert large is not None and large.ring is not small.ring
    np.testing.assert_array_equal(deliver(large)[0].numpy(), large_arrays[0])


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
