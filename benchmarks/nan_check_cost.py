"""What the default NaN check (``nan_policy="check"``) costs, against ``nan_policy="keep"``.

    python benchmarks/nan_check_cost.py [--epochs 3] [--dir /tmp/nancheck]

The global scenario of ``benchmarks/throughput.py`` (82 channels on 64 x 128, zarr v3, chunks of
one time step, full-field samples, batches of 8, chunk-aware order), out of core, with 0 and 2
workers: whole epochs with the check and without it, alternating so that both see the same
disk and cache conditions. The check looks at every decoded cell once (``max`` propagates
NaN), so its cost is one pass over the decoded bytes, not over the delivered ones. In memory
the loaded copy is looked at once, in ``setup``: nothing per batch.

Prints MB/s of both and their ratio (target: the check costs at most 5 %).
"""

from __future__ import annotations

import time
from pathlib import Path

from bench_common import in_child
from global_fields import alternating_cli, ours_module


def epoch_rates(path: Path, workers: int, policy: str, epochs: int) -> list[float]:
    """MB/s of each whole epoch after the first (which starts the workers)."""
    dm = ours_module(path, workers, "chunks", nan_policy=policy)
    dm.setup("fit")
    loader = dm.train_dataloader()
    rates = []
    for _ in range(epochs + 1):
        began, total = time.perf_counter(), 0
        for X, y in loader:
            total += X.nbytes + y.nbytes
        rates.append(total / (time.perf_counter() - began) / 1e6)
    return rates[1:]


def main() -> None:
    args, path = alternating_cli(__doc__, "/tmp/xr_datamodule_nancheck")
    print("| workers | keep MB/s | check MB/s | check/keep |")
    print("|---|---|---|---|")
    for workers in (0, 2):
        rates: dict[str, list[float]] = {"keep": [], "check": []}
        for _ in range(args.rounds):
            for policy in rates:
                # A child per run: TensorStore's threads do not survive the fork of workers.
                rates[policy] += in_child(epoch_rates, path, workers, policy, args.epochs)
        keep, check = (sum(r) / len(r) for r in (rates["keep"], rates["check"]))
        print(f"| {workers} | {keep:.0f} | {check:.0f} | {check / keep:.3f} |")


if __name__ == "__main__":
    main()
