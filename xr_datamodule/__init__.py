"""xr_datamodule: Xarray data as fast, leak-free PyTorch Lightning DataModules.

The names below are imported on first use, so that ``import xr_datamodule.windows`` (or
sources, samplers, the reading layer) does not load Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xr_datamodule.collate import collate_batch
    from xr_datamodule.datamodule import XarrayDataModule
    from xr_datamodule.datasets import Batch, XarrayIterableDataset, XarrayWindowDataset
    from xr_datamodule.samplers import (
        ArrayBatchSampler,
        BlockInterleavedSampler,
        ChunkShuffleSampler,
        EpochShuffleSampler,
        ShardedBatchSampler,
    )
    from xr_datamodule.sources import SYNTHETIC_SOURCE
    from xr_datamodule.statcache import write_statistics
    from xr_datamodule.synthetic import make_weather
    from xr_datamodule.windows import SampleIndex, WindowGeometry, build_index

_HOMES = {
    "SYNTHETIC_SOURCE": "sources",
    "ArrayBatchSampler": "samplers",
    "Batch": "datasets",
    "BlockInterleavedSampler": "samplers",
    "ChunkShuffleSampler": "samplers",
    "EpochShuffleSampler": "samplers",
    "SampleIndex": "windows",
    "ShardedBatchSampler": "samplers",
    "WindowGeometry": "windows",
    "XarrayDataModule": "datamodule",
    "XarrayIterableDataset": "datasets",
    "XarrayWindowDataset": "datasets",
    "build_index": "windows",
    "write_statistics": "statcache",
    "collate_batch": "collate",
    "make_weather": "synthetic",
}

__all__ = [
    "SYNTHETIC_SOURCE",
    "ArrayBatchSampler",
    "Batch",
    "BlockInterleavedSampler",
    "ChunkShuffleSampler",
    "EpochShuffleSampler",
    "SampleIndex",
    "ShardedBatchSampler",
    "WindowGeometry",
    "XarrayDataModule",
    "XarrayIterableDataset",
    "XarrayWindowDataset",
    "build_index",
    "collate_batch",
    "make_weather",
    "write_statistics",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'xr_datamodule' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"xr_datamodule.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
