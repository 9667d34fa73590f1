"""Seeded epoch orders and index-array batches."""

from __future__ import annotations

import numpy as np
from torch.utils.data import SequentialSampler

from xr_datamodule.samplers import (
    ArrayBatchSampler,
    EpochShuffleSampler,
    ShardedBatchSampler,
    sample_order,
)


def test_order_is_a_function_of_seed_and_epoch():
    a, b = EpochShuffleSampler(100, seed=3), EpochShuffleSampler(100, seed=3)
    a.set_epoch(5)
    b.set_epoch(5)
    np.testing.assert_array_equal(a.order(), b.order())
    b.set_epoch(6)
    assert not np.array_equal(a.order(), b.order())
    assert not np.array_equal(
        EpochShuffleSampler(100, seed=4).order(), EpochShuffleSampler(100, seed=3).order()
    )


def test_each_epoch_is_a_permutation_and_epochs_advance_without_set_epoch():
    sampler = EpochShuffleSampler(50, seed=0)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != second
    reference = EpochShuffleSampler(50, seed=0)
    reference.set_epoch(1)
    assert second == reference.order().tolist()


def test_array_batch_sampler_yields_arrays_and_honours_drop_last():
    sampler = SequentialSampler(range(10))
    batches = list(ArrayBatchSampler(sampler, 4, drop_last=False))
    assert all(isinstance(b, np.ndarray) and b.dtype == np.int64 for b in batches)
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [b.tolist() for b in ArrayBatchSampler(sampler, 4, drop_last=True)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
    ]
    assert len(ArrayBatchSampler(sampler, 4, drop_last=False)) == 3


def test_batches_of_a_shuffled_epoch_cover_it_once():
    sampler = EpochShuffleSampler(103, seed=1)
    batches = list(ArrayBatchSampler(sampler, 10, drop_last=False))
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(103))


def test_unknown_samplers_are_read_by_iteration():
    class Reversed:
        def __iter__(self):
            return iter(range(4, -1, -1))

        def __len__(self):
            return 5

    assert sample_order(Reversed()).tolist() == [4, 3, 2, 1, 0]


def test_the_hint_holds_the_next_batches_of_the_same_worker():
    """lookahead batches, lookahead_stride apart: what a worker taking every W-th reads next."""
    order = list(ShardedBatchSampler(EpochShuffleSampler(40, seed=1), 4))
    plans = list(
        ShardedBatchSampler(EpochShuffleSampler(40, seed=1), 4, lookahead=2, lookahead_stride=3)
    )
    assert [plan.ids.tolist() for plan in plans] == [batch.tolist() for batch in order]
    for number, plan in enumerate(plans):
        coming = order[number + 3 : number + 9 : 3]  # the same worker's next two, of three
        if not coming:
            assert plan.upcoming is None
        else:
            np.testing.assert_array_equal(plan.upcoming, np.concatenate(coming))
