"""Preemption with real processes: killed mid-epoch, resumed from the last checkpoint.

A training process (tests/preempt_script.py, out of core, 0 or 2 workers) is killed with
SIGKILL (no chance to save anything) or stopped with SIGTERM (what a cluster scheduler sends)
after a periodic checkpoint; a new process resumes from the last checkpoint that loads. What
the first process trained on up to that checkpoint, then what the second trained on, must be
exactly the batches of an uninterrupted run, in order: each sample once per epoch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from tests.preempt_script import ids_module

ROOT = Path(__file__).resolve().parents[1]
N_SAMPLES = 60  # 10 batches of 6 per epoch, two epochs


def start(store: Path, out: Path, workers: int, checkpoint: Path | None = None):
    command = [sys.executable, str(ROOT / "tests" / "preempt_script.py"), str(store), str(out)]
    command += [str(workers)] + ([str(checkpoint)] if checkpoint else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)


def steps_of(process: subprocess.Popen, out: Path) -> list[dict]:
    path = out / f"steps-{process.pid}.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def last_loadable_checkpoint(out: Path) -> tuple[Path, int]:
    """The checkpoint of the highest step that loads (a kill may cut the last one short)."""
    found = sorted(
        (int(path.stem.split("=")[1]), path) for path in (out / "ckpt").glob("step=*.ckpt")
    )
    for step, path in reversed(found):
        try:
            torch.load(path, weights_only=False, map_location="cpu")
            return path, step
        except Exception:
            continue
    raise AssertionError("no checkpoint loads")


@pytest.mark.slow
@pytest.mark.timeout(240)
# Each signal once, each with another worker count (a run takes ~25 s: all four would be
# 100 s of the suite for what two show).
@pytest.mark.parametrize(
    ("how", "workers"), [(signal.SIGKILL, 0), (signal.SIGTERM, 2)], ids=["SIGKILL-0", "SIGTERM-2"]
)
def test_a_killed_run_resumes_with_exactly_the_remaining_samples(tmp_path, workers, how):
    store = tmp_path / "ids.zarr"
    xr.Dataset({"x": (("time",), np.arange(N_SAMPLES, dtype=np.float64))}).chunk(
        {"time": 8}
    ).to_zarr(store)
    out = tmp_path / "run"
    out.mkdir()
    first = start(store, out, workers)
    deadline = time.monotonic() + 150
    # Stop it mid-epoch, a little after its second checkpoint (step 6 of 10).
    while len(steps_of(first, out)) < 8:
        assert first.poll() is None, first.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the first run did not get going"
        time.sleep(0.05)
    first.send_signal(how)
    first.wait(timeout=60)
    assert not (out / f"done-{first.pid}").exists()  # it did not finish the run
    checkpoint, step = last_loadable_checkpoint(out)
    assert 6 <= step < 20
    second = start(store, out, workers, checkpoint)
    assert second.wait(timeout=180) == 0, second.stderr.read()[-3000:]
    before = [record["ids"] for record in steps_of(first, out)[:step]]
    after = [record["ids"] for record in steps_of(second, out)]
    dm = ids_module(str(store), workers)
    expected = [batch.tolist() for epoch in (0, 1) for batch in dm.train_batches(epoch=epoch)]
    assert before + after == expected
    for epoch in (0, 1):  # each sample once per epoch
        seen = sorted(i for ids in expected[epoch * 10 : (epoch + 1) * 10] for i in ids)
        assert seen == list(range(N_SAMPLES))
    assert steps_of(second, out)[0]["step"] == step  # it went on from the checkpoint's step
