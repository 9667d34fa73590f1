"""Run by tests/test_preemption.py: a training process to be killed mid-epoch and resumed.

    python tests/preempt_script.py STORE OUT_DIR WORKERS [CHECKPOINT]

Trains two epochs over the ids store (``x[t] = t``, out of core), saving a checkpoint every 3
steps to OUT_DIR/ckpt and appending each step's sample ids, as one JSON line, to
OUT_DIR/steps-{pid}.jsonl (flushed at once: the process may be killed at any moment). With
CHECKPOINT, resumes from it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from xr_datamodule import XarrayDataModule


def ids_module(store: str, workers: int) -> XarrayDataModule:
    return XarrayDataModule(
        store,
        input_vars=["x"],
        input_dims={"time": 1},
        splits={"train": 1.0},
        batch_size=6,
        dtype="float64",
        num_workers=workers,
        load=False,
        seed=5,
    )


class StepLog(pl.LightningModule):
    """Appends every training batch's ids to a file; slow enough to be killed mid-epoch."""

    def __init__(self, log: Path) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.log_file = log.open("a", buffering=1)

    def training_step(self, batch, batch_idx):
        inputs, _ = batch
        ids = inputs.reshape(len(inputs)).long().tolist()
        record = {"step": self.global_step, "epoch": self.current_epoch, "ids": ids}
        self.log_file.write(json.dumps(record) + "\n")
        time.sleep(0.1)
        return self.layer(inputs.reshape(-1, 1).float()).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def main() -> None:
    store, out_dir, workers = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    checkpoint = sys.argv[4] if len(sys.argv) > 4 else None
    every = ModelCheckpoint(
        dirpath=out_dir / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}"
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        callbacks=[every],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = StepLog(out_dir / f"steps-{os.getpid()}.jsonl")
    trainer.fit(model, datamodule=ids_module(store, workers), ckpt_path=checkpoint)
    (out_dir / f"done-{os.getpid()}").touch()


if __name__ == "__main__":
    main()
