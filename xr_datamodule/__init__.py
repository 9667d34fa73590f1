"""xr_datamodule: Xarray data as fast, leak-free PyTorch Lightning DataModules."""

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
from xr_datamodule.synthetic import make_weather
from xr_datamodule.windows import SampleIndex, WindowGeometry, build_index

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
]

__version__ = "0.1.0"
