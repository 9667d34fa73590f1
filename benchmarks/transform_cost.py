"""What a per-window ``transform`` costs per sample, against the vectorised path.

    python benchmarks/transform_cost.py

The README's example transform (wind speed from u10 and v10) on the synthetic data, 32x32
windows of 2 steps, batches of 64, in memory, no workers: per-sample milliseconds of the
training loader with the transform, without it, and of the transform function alone.
"""

from __future__ import annotations

import time

import numpy as np
import xarray as xr

from xr_datamodule import XarrayDataModule

SETTINGS = dict(
    input_vars=["t2m", "u10", "v10"],
    target_vars=["t2m"],
    input_dims={"time": 2, "lat": 32, "lon": 32},
    target_dims={"time": 1, "lat": 32, "lon": 32},
    target_offset={"time": 2},
    input_overlap={"lon": 16},
    batch_size=64,
    num_workers=0,
)


def wind_speed(ds: xr.Dataset) -> xr.Dataset:
    return ds.assign(speed=np.hypot(ds.u10, ds.v10))


def per_sample_ms(transform_on: str | None, batches: int = 10) -> float:
    extra = {} if transform_on is None else {"transform": wind_speed}
    if transform_on == "batch":
        extra["transform_on"] = "batch"
    dm = XarrayDataModule("synthetic://weather", **SETTINGS, **extra)
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    next(loader)
    began, samples = time.perf_counter(), 0
    for _ in range(batches):
        inputs, _ = next(loader)
        samples += len(inputs)
    return (time.perf_counter() - began) / samples * 1e3


def function_ms(repeats: int = 200) -> float:
    dm = XarrayDataModule("synthetic://weather", **SETTINGS)
    window = dm.source[SETTINGS["input_vars"]].isel(
        time=slice(0, 2), lat=slice(0, 32), lon=slice(0, 32)
    )
    began = time.perf_counter()
    for _ in range(repeats):
        wind_speed(window)
    return (time.perf_counter() - began) / repeats * 1e3


def main() -> None:
    plain = per_sample_ms(None)
    sample = per_sample_ms("sample")
    print(f"no transform:             {plain:.4f} ms per sample")
    print(f"transform per sample:     {sample:.3f} ms per sample ({sample / plain:.0f}x)")
    try:
        batch = per_sample_ms("batch")
        print(f"transform on the batch:   {batch:.4f} ms per sample ({batch / plain:.1f}x)")
    except TypeError:
        pass
    print(f"the function alone:       {function_ms():.3f} ms per window")


if __name__ == "__main__":
    main()
