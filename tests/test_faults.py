"""Faults are reported with what and where: a corrupted chunk, in and out of workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xr_datamodule import XarrayDataModule, cells
from xr_datamodule.decode import ReadError

SETTINGS = dict(
    input_vars=["a", "b"],
    input_dims={"time": 3, "lat": 12, "lon": 10},
    splits={"train": 1.0},
    batch_size=4,
)


def corrupt_one_chunk(path: Path, name: str) -> Path:
    """Overwrite the first chunk file of a variable (zarr v3: ``name/c/...``) with garbage."""
    target = sorted(p for p in (path / name / "c").rglob("*") if p.is_file())[0]
    target.write_bytes(b"this is not a compressed chunk" * 4)
    return target


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupted_chunk_names_variable_store_and_dates(small_ds, tmp_path, workers, monkeypatch):
    monkeypatch.setattr(cells, "MIN_CELL_BYTES", 0)  # cells are the chunks of 10 steps
    path = tmp_path / "broken.zarr"
    small_ds.chunk({"time": 10}).to_zarr(path)
    corrupt_one_chunk(path, "b")
    dm = XarrayDataModule(str(path), **SETTINGS, load=False, num_workers=workers, shuffle="full")
    dm.setup("fit")
    with pytest.raises(Exception) as caught:  # torch re-raises a worker's error as its type
        for _ in dm.train_dataloader():
            pass
    message = str(caught.value)
    assert "could not read variable 'b' of" in message and "broken.zarr" in message
    assert "time 2020-01-01 00:00:00 … 2020-01-10 00:00:00 (positions 0-9)" in message
    if workers:
        assert "in DataLoader worker" in message
    else:
        assert isinstance(caught.value, ReadError)
        assert caught.value.__cause__ is not None  # the decoder's own error, chained


def test_a_corrupted_chunk_when_loading_in_memory(small_ds, tmp_path):
    path = tmp_path / "broken.zarr"
    small_ds.chunk({"time": 10}).to_zarr(path)
    corrupt_one_chunk(path, "a")
    dm = XarrayDataModule(str(path), **SETTINGS, load=True)
    with pytest.raises(ReadError, match=r"could not read variable 'a' of '.*broken.zarr' at"):
        dm.setup("fit")
    assert np.isfinite(small_ds.a.values).all()


def two_workers(ds, **settings) -> XarrayDataModule:
    """Small windows read by 2 DataLoader workers."""
    return XarrayDataModule(
        ds,
        input_vars=["a"],
        input_dims={"time": 3, "lat": 4, "lon": 5},
        splits={"train": 1.0},
        batch_size=4,
        num_workers=2,
        **settings,
    )


def _die_in_the_second_worker(ds):
    import os
    import signal

    from torch.utils.data import get_worker_info

    info = get_worker_info()
    if info is not None and info.id == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does
    return ds


def test_a_worker_that_dies_ends_the_epoch_with_what_to_try(small_ds):
    dm = two_workers(small_ds, transform=_die_in_the_second_worker)
    with pytest.raises(
        RuntimeError, match=r"(exited unexpectedly|killed by signal.*): a DataLoader worker died"
    ) as e:
        for _ in dm.train_dataloader():
            pass
    assert "Try fewer workers (num_workers)" in str(e.value)


def _sleep_in_workers(ds):
    import time

    from torch.utils.data import get_worker_info

    if get_worker_info() is not None:
        time.sleep(30)  # killed long before
    return ds


def test_a_worker_killed_by_a_signal_ends_with_what_to_try(small_ds):
    import os
    import signal
    import threading

    dm = two_workers(small_ds, transform=_sleep_in_workers)
    iterator = iter(dm.train_dataloader())
    pids = [worker.pid for worker in iterator._workers]  # what the out-of-memory killer sees

    def kill() -> None:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    threading.Timer(1.0, kill).start()
    with pytest.raises(RuntimeError, match="a DataLoader worker died") as raised:
        next(iterator)
    assert "Try fewer workers (num_workers)" in str(raised.value)


@pytest.mark.parametrize("after_a_fit", [False, True])
def test_a_worker_killed_while_the_main_process_trains_ends_with_what_to_try(small_ds, after_a_fit):
    import os
    import signal
    import time

    if after_a_fit:  # a fit restores every signal handler when it ends (a notebook's 2nd run)
        import lightning.pytorch as pl
        import torch

        from tests.conftest import cpu_trainer

        class Mean(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.bias = torch.nn.Parameter(torch.zeros(()))

            def training_step(self, batch, _):
                return ((batch[0] - self.bias) ** 2).mean()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        cpu_trainer(limit_train_batches=2).fit(
            Mean(), datamodule=two_workers(small_ds, persistent_workers=False)
        )
        # What the fit leaves when its loader was the process's first with workers (the
        # handler it saved at its start was the default one); made certain here.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    dm = two_workers(small_ds, persistent_workers=False)
    iterator = iter(dm.train_dataloader())
    next(iterator)  # the workers run; the main process goes on "training"
    with pytest.raises(RuntimeError, match="is killed by signal") as raised:
        os.kill(iterator._workers[0].pid, signal.SIGKILL)  # what the out-of-memory killer does
        time.sleep(5)  # torch's SIGCHLD handler raises here, outside the loader
    assert "a DataLoader worker died" in str(raised.value)
    assert "Try fewer workers (num_workers)" in str(raised.value)
    del iterator
