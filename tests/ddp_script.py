"""Run by tests/test_exactly_once.py: a real 2-process DDP fit on CPU that records sample ids.

    python tests/ddp_script.py OUT_DIR [N_SAMPLES] [BATCH] [STYLE] [WORKERS] [SAMPLES_PER_EPOCH]

Each rank writes the ids of the samples it trained on, batch by batch, to OUT_DIR/rank{R}.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import xarray as xr

from xr_datamodule import XarrayDataModule


class Recorder(pl.LightningModule):
    """Records the sample ids (the input values) of every training batch."""

    def __init__(self, out_dir: str | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.out_dir = out_dir
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        inputs, _ = batch
        self.seen.append(inputs.reshape(len(inputs)).long().tolist())
        return self.layer(inputs.reshape(-1, 1).float()).pow(2).mean()

    def on_train_end(self) -> None:
        if self.out_dir is None:  # in-process tests read `seen` instead
            return
        path = Path(self.out_dir) / f"rank{self.global_rank}.json"
        path.write_text(json.dumps({"epochs": self.seen, "world": self.trainer.world_size}))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def ids_dataset(n: int) -> xr.Dataset:
    return xr.Dataset({"x": (("time",), np.arange(n, dtype=np.float64))})


def main() -> None:
    out_dir = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 101
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    style = sys.argv[4] if len(sys.argv) > 4 else "map"
    workers = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    per_epoch = int(sys.argv[6]) if len(sys.argv) > 6 else None  # samples_per_epoch
    dm = XarrayDataModule(
        ids_dataset(n),
        input_vars=["x"],
        input_dims={"time": 1},
        splits={"train": 1.0},
        batch_size=batch,
        dtype="float64",
        num_workers=workers,
        style=style,
        samples_per_epoch=per_epoch,
    )
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Recorder(out_dir), datamodule=dm)
    # Tear the process group down before the interpreter exits: left to interpreter
    # shutdown, gloo's threads were once seen aborting the process after a clean fit.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
