"""What a global model's full input list costs: static fields and forcings beside the variables.

    python benchmarks/extras_cost.py [--epochs 3] [--rounds 2] [--dir /tmp/extras]

The global scenario of ``benchmarks/throughput.py`` (82 channels on 64 x 128, zarr v3, chunks of
one time step, full-field samples at 2 input steps -> the next, batches of 8, chunk-aware
order), out of core, with 0 and 2 workers, read twice: the variables alone, and with what
GraphCast-like models add to them, two static fields (orography, land-sea mask: variables
without the time dim in the same store) and all ten forcings computed from the coordinates
(94 input channels instead of 82). Whole epochs, alternating in fresh processes so that both
see the same disk and cache conditions.

Prints batches per second of both and their ratio, and the delivered MB/s (the extra
channels are 15 % more bytes per batch).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import xarray as xr
from bench_common import in_child
from global_fields import BATCH, INPUT_STEPS, N_LAT, N_LON, VARIABLES, alternating_cli

from xr_datamodule import XarrayDataModule
from xr_datamodule.forcings import FORCINGS

STATICS = ["orography", "land_sea_mask"]


def add_statics(path: Path) -> None:
    """Write the two static fields into the store (once)."""
    opened = xr.open_zarr(path, consolidated=False)
    if all(name in opened for name in STATICS):
        return
    rng = np.random.default_rng(1)
    statics = xr.Dataset(
        {
            "orography": (("lat", "lon"), rng.gamma(2.0, 300.0, (N_LAT, N_LON))),
            "land_sea_mask": (("lat", "lon"), (rng.random((N_LAT, N_LON)) < 0.3) * 1.0),
        },
        coords={"lat": opened.lat, "lon": opened.lon},
    ).astype(np.float32)
    statics.to_zarr(path, mode="a", consolidated=False)


def batch_rates(path: Path, workers: int, extras: bool, epochs: int) -> list[tuple[float, float]]:
    """(batches/s, MB/s) of each whole epoch after the first (which starts the workers)."""
    dm = XarrayDataModule(
        str(path),
        input_vars=[*VARIABLES, *STATICS] if extras else VARIABLES,
        target_vars=VARIABLES,
        input_dims={"time": INPUT_STEPS, "lat": N_LAT, "lon": N_LON},
        input_overlap={"time": INPUT_STEPS - 1},
        target_dims={"time": 1, "lat": N_LAT, "lon": N_LON},
        target_offset={"time": INPUT_STEPS},
        forcings=list(FORCINGS) if extras else None,
        splits={"train": 1.0},
        batch_size=BATCH,
        num_workers=workers,
        load=False,
        seed=0,
        shuffle="chunks",
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    rates = []
    for _ in range(epochs + 1):
        began, total, batches = time.perf_counter(), 0, 0
        for X, y in loader:
            total += X.nbytes + y.nbytes
            batches += 1
        seconds = time.perf_counter() - began
        rates.append((batches / seconds, total / seconds / 1e6))
    return rates[1:]


def main() -> None:
    args, path = alternating_cli(__doc__, "/tmp/xr_datamodule_extras")
    add_statics(path)
    print("| workers | variables batches/s | + statics, forcings batches/s | ratio | MB/s | MB/s |")
    print("|---|---|---|---|---|---|")
    for workers in (0, 2):
        rates: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for _ in range(args.rounds):
            for extras in rates:
                rates[extras] += in_child(batch_rates, path, workers, extras, args.epochs)
        plain, full = (np.mean(rates[key], axis=0) for key in (False, True))
        print(
            f"| {workers} | {plain[0]:.1f} | {full[0]:.1f} | {full[0] / plain[0]:.3f}"
            f" | {plain[1]:.0f} | {full[1]:.0f} |"
        )


if __name__ == "__main__":
    main()
