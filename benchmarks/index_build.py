"""Time to build the sample index of 1M samples (and to materialise all their starts).

python benchmarks/index_build.py
"""

from __future__ import annotations

import time

import numpy as np

from xr_datamodule.windows import WindowGeometry, build_index


def main() -> None:
    geometry = WindowGeometry(
        dims=("time", "lat", "lon"),
        input_size=(4, 32, 32),
        stride=(1, 1, 1),
        target_size=(1, 32, 32),
        target_offset=(4, 0, 0),
    )
    bounds = {"time": (0, 1004), "lat": (0, 131), "lon": (0, 41)}
    runs = []
    for _ in range(5):
        began = time.perf_counter()
        index = build_index(geometry, bounds)
        built = time.perf_counter()
        starts = index.starts(np.arange(len(index)))
        done = time.perf_counter()
        runs.append((built - began, done - built))
    build, starts_time = min(runs)
    print(f"samples: {len(index):,}  index arrays: {sum(a.nbytes for a in index.axis_starts)} B")
    print(f"build index: {build * 1e3:.3f} ms  (best of 5)")
    print(
        f"all {len(index):,} starts as one int64 array ({starts.nbytes / 1e6:.0f} MB): "
        f"{starts_time * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
