"""collate: a gathered batch becomes tensors that share its memory (no copy)."""

from __future__ import annotations

import numpy as np
import torch

from xr_datamodule.collate import collate_batch
from xr_datamodule.datasets import Batch


def test_tuple_batches_share_the_gathered_memory():
    inputs = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    targets = np.ones((2, 1, 4), dtype=np.float32)
    X, y = collate_batch(Batch(inputs, targets))
    assert X.data_ptr() == inputs.__array_interface__["data"][0]  # a view, not a copy
    np.testing.assert_array_equal(X.numpy(), inputs)
    np.testing.assert_array_equal(y.numpy(), targets)


def test_dict_batches_carry_the_mask_and_the_metadata_as_tensors():
    inputs = np.zeros((2, 1, 3), dtype=np.float32)
    targets = np.zeros((2, 1, 3), dtype=np.float32)
    mask = np.array([[[True, False, True]], [[True, True, True]]])
    meta = {"sample": np.array([4, 7]), "input_time": np.array([[10], [20]])}
    batch = collate_batch(Batch(inputs, targets, meta, mask))
    assert set(batch) == {"x", "y", "target_mask", "sample", "input_time"}
    assert batch["target_mask"].dtype == torch.bool
    assert batch["sample"].tolist() == [4, 7]
    assert batch["input_time"].tolist() == [[10], [20]]


def test_without_metadata_the_mask_is_not_sent():
    inputs = np.zeros((1, 1, 2), dtype=np.float32)
    out = collate_batch(Batch(inputs, inputs, None, np.ones((1, 1, 2), bool)))
    assert isinstance(out, tuple) and len(out) == 2
