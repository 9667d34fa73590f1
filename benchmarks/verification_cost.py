"""What the trust checks cost: the time-axis checks at archive size, the target mask per batch.

    python benchmarks/verification_cost.py [--epochs 3] [--rounds 2] [--dir /tmp/xr_datamodule_mask]

1. **Time axis** (targets: well under a second). A decade of hourly steps (87,600, with two
   gaps) checked for order and gaps, and the samples crossing a gap found over a sample
   index of about 1M samples (87,600 start times x 12 patch positions), as ``setup`` does.
2. **Target mask** (target: at most 5 % of the batch time). The global scenario of
   ``benchmarks/throughput.py`` (82 channels on 64 x 128, zarr v3, one step per chunk,
   full-field samples, batches of 8, chunk-aware order), out of core, with 0 and 2 workers,
   under the default ``nan_policy="check"`` and under ``"fill"`` (where the reader keeps the
   targets' masks): dict batches, which carry ``target_mask`` (and the labels), against
   tuple batches, which carry neither; whole epochs, alternating in fresh processes. The
   difference is an upper bound of what the mask costs.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from bench_common import in_child
from global_fields import alternating_cli, ours_module


def time_axis_figures() -> None:
    from xr_datamodule.timeaxis import check_axis, spans_with_gaps
    from xr_datamodule.windows import WindowGeometry, build_index

    times = pd.date_range("2000-01-01", periods=87_600, freq="h").delete([1_000, 50_000])
    began = time.perf_counter()
    axis = check_axis("time", times.values)
    checked = time.perf_counter() - began
    geometry = WindowGeometry(
        ("time", "lat", "lon"), (2, 32, 32), (1, 32, 32), (1, 32, 32), (2, 0, 0)
    )
    index = build_index(geometry, {"time": (0, len(times)), "lat": (0, 96), "lon": (0, 128)})
    began = time.perf_counter()
    crossing = spans_with_gaps(index, geometry, {"time": axis})
    kept = index.keep(~crossing)
    dropped = time.perf_counter() - began
    print(
        f"time axis: {len(times):,} hourly steps checked in {checked * 1e3:.1f} ms "
        f"(step {axis.step_text}, {axis.gap_after.size} gaps)"
    )
    print(
        f"gap drop: {len(index):,} samples, {int(crossing.sum())} crossing a gap, "
        f"left out in {dropped * 1e3:.1f} ms ({len(kept):,} kept)"
    )


def epoch_rates(
    path: Path, workers: int, batch_format: str, policy: str, epochs: int
) -> list[float]:
    """Batches per second of each whole epoch after the first (which starts the workers)."""
    dm = ours_module(path, workers, "chunks", nan_policy=policy, batch_format=batch_format)
    dm.setup("fit")
    loader = dm.train_dataloader()
    rates = []
    for _ in range(epochs + 1):
        began, batches = time.perf_counter(), 0
        for batch in loader:
            if isinstance(batch, dict):
                assert batch["target_mask"].shape == batch["y"].shape
            batches += 1
        rates.append(batches / (time.perf_counter() - began))
    return rates[1:]


def main() -> None:
    args, path = alternating_cli(__doc__, "/tmp/xr_datamodule_mask")
    time_axis_figures()
    print("| nan_policy | workers | tuple batches/s | dict + target_mask batches/s | dict/tuple |")
    print("|---|---|---|---|---|")
    for policy in ("check", "fill"):
        for workers in (0, 2):
            rates: dict[str, list[float]] = {"tuple": [], "dict": []}
            for _ in range(args.rounds):
                for batch_format in rates:
                    rates[batch_format] += in_child(
                        epoch_rates, path, workers, batch_format, policy, args.epochs
                    )
            plain, masked = (float(np.mean(r)) for r in (rates["tuple"], rates["dict"]))
            print(
                f"| {policy} | {workers} | {plain:.1f} | {masked:.1f} | {masked / plain:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
