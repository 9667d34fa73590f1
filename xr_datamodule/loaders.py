"""DataLoaders of a pipeline: the training order's batches, evaluation in order, worker start.

The last arrow before the Trainer: a :class:`~xr_datamodule.pipeline.DataPipeline`'s datasets,
a batch sampler (training: :class:`~xr_datamodule.order.TrainingOrder`; evaluation: in order),
the zero-copy collate of :mod:`~xr_datamodule.collate`, and the worker, pinning and prefetch
settings. Works without Lightning:

Example:
    >>> from xr_datamodule.pipeline import DataPipeline
    >>> from xr_datamodule.spec import DataSpec
    >>> pipeline = DataPipeline(DataSpec("synthetic://weather", input_vars=["t2m"],
    ...                                  input_dims={"time": 1, "lat": 32, "lon": 32}))
    >>> X, y = next(iter(train_loader(pipeline, epoch=0)))
    >>> tuple(X.shape)
    (32, 1, 1, 32, 32)
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, SequentialSampler
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from xr_datamodule import decode as decode_module
from xr_datamodule.collate import collate_batch
from xr_datamodule.datasets import XarrayIterableDataset, XarrayWindowDataset
from xr_datamodule.decode import TensorStoreDecoder
from xr_datamodule.gather import ChunkedReader
from xr_datamodule.pipeline import DataPipeline
from xr_datamodule.samplers import ArrayBatchSampler, BlockInterleavedSampler

__all__ = [
    "XarrayDataLoader",
    "eval_loader",
    "loader_settings",
    "on_cuda",
    "train_loader",
    "trained_so_far",
    "world_of",
]

logger = logging.getLogger(__name__)
_warned_tensorstore_fork = False  # the warning of _warn_if_workers_lose_tensorstore, once


WORKER_DIED_ADVICE = (
    "a DataLoader worker died, most often killed by the system for lack of memory (see "
    "`dmesg`). Try fewer workers (num_workers), a smaller batch_size or shuffle_chunks, or "
    "prefetch_factor=1; with num_workers=0 an error in reading shows in the main process"
)
_advising: Any = None  # the advising SIGCHLD handler of this process, once made


def _worker_died(error: RuntimeError) -> bool:
    message = str(error)  # torch's two messages: a failed worker, its SIGCHLD handler's
    return "exited unexpectedly" in message or "is killed by signal" in message


def _advise_on_sigchld() -> None:
    """Wrap the SIGCHLD handler (torch's, once it set one) so its error carries the advice.

    torch raises "DataLoader worker ... is killed by signal" from its SIGCHLD handler,
    wherever the main thread is then (in the training step, not in the loader): only the
    handler itself can add the advice. Made once per process, from the main thread, and put
    back whenever the handler was reset: torch sets its own only once per process, and a
    ``Trainer.fit`` restores every signal's handler as it was when it began, so without
    this a later fit in the same process (a notebook) would have no handler at all.
    """
    global _advising
    if not hasattr(signal, "SIGCHLD"):
        return
    current = signal.getsignal(signal.SIGCHLD)
    if current is _advising and _advising is not None:
        return
    if _advising is None:
        if not callable(current):
            return  # no handler of torch's to wrap
        _advising = _advising_handler(current)
    elif callable(current):
        return  # someone else's handler since: leave it
    try:
        signal.signal(signal.SIGCHLD, _advising)
    except ValueError:  # not the main thread: torch's message stays as it is
        return


def _advising_handler(previous: Callable[[int, Any], Any]) -> Callable[[int, Any], None]:
    def advising(signum: int, frame: Any) -> None:
        try:
            previous(signum, frame)
        except RuntimeError as error:
            if not _worker_died(error):
                raise
            raise RuntimeError(f"{error}: {WORKER_DIED_ADVICE}") from error

    return advising


class _AdvisingIterator(_MultiProcessingDataLoaderIter):
    """torch's worker iterator; a worker that died ends the epoch with what to try."""

    def __init__(self, loader: DataLoader) -> None:
        super().__init__(loader)  # sets torch's SIGCHLD handler
        _advise_on_sigchld()

    def _next_data(self) -> Any:
        try:
            return super()._next_data()
        except RuntimeError as error:
            if not _worker_died(error) or WORKER_DIED_ADVICE in str(error):
                raise
            raise RuntimeError(f"{error}: {WORKER_DIED_ADVICE}") from error


class XarrayDataLoader(DataLoader):
    """A DataLoader whose worker deaths end with advice instead of torch's bare message."""

    def _get_iterator(self) -> Any:
        if self.num_workers == 0:
            return super()._get_iterator()
        self.check_worker_number_rationality()
        return _AdvisingIterator(self)


class _Resumable:
    """A training loader resumable in Lightning's eyes: ``state_dict``, ``load_state_dict``.

    Lightning asks the training DataLoader for them (and warns "not resumable" without them
    when it resumes mid-epoch). The position itself is the datamodule's to keep: its
    ``state_dict`` holds the data epoch and the batches done, and on resume it is restored
    before this loader is built, whose sampler starts where the checkpoint stopped (tested
    batch for batch in ``tests/test_exactly_once.py``). So ``state_dict`` reports that same
    position, and ``load_state_dict`` has nothing left to restore.
    """

    _position: Callable[[], dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The training order's position (a copy of what the datamodule's state keeps)."""
        return {} if self._position is None else self._position()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to do: the datamodule restored the position before this loader was built."""


class _TrainLoader(_Resumable, XarrayDataLoader):
    """The map-style training loader (see :class:`_Resumable`)."""


class _EpochLoader(_Resumable, XarrayDataLoader):
    """A DataLoader over an :class:`XarrayIterableDataset` that sets its epoch on each pass.

    Lightning calls ``set_epoch`` only on samplers, and an iterable dataset has none; the
    epoch is therefore asked of ``epoch_of`` (the trainer's epoch) when a pass starts, in the
    main process, before the pass's workers are started.
    """

    def __init__(self, dataset: XarrayIterableDataset, epoch_of: Callable[[], int], **kwargs: Any):
        self._epoch_of = epoch_of
        super().__init__(dataset, **kwargs)

    def __iter__(self) -> Any:
        self.dataset.set_epoch(self._epoch_of())  # type: ignore[attr-defined]
        return super().__iter__()


def _init_worker(worker_id: int) -> None:
    """Worker start: synchronous dask, one zarr thread, own file handles and remote stores.

    - Dask runs synchronously: no thread pool after fork.
    - Zarr decodes with one thread: a worker reads one chunk at a time anyway, and each extra
      thread kept its own malloc arena (2 workers held 35 MB less on the benchmark, at the
      same speed).
    - ``gc.freeze()``: the collector no longer walks the objects inherited from the parent,
      so their pages stay shared instead of being copied into each worker.
    - Files opened by the parent are forgotten (not closed) by xarray's file cache here, so
      the worker opens its own: a netCDF3 handle shared across a fork shares its file
      offset, and two processes reading through it failed with "Inappropriate ioctl for
      device" or "Resource temporarily unavailable".
    - A remote store (fsspec URL) is opened anew: the parent's is bound to its event loop.
    - numpy's legacy global generator is seeded.
    """
    import dask
    from torch.utils.data import get_worker_info
    from xarray.backends.file_manager import FILE_CACHE

    gc.freeze()
    for key in list(FILE_CACHE):
        del FILE_CACHE[key]  # deleting does not close (eviction would)
    dask.config.set(scheduler="synchronous")
    if "zarr" in sys.modules:
        sys.modules["zarr"].config.set({"threading.max_workers": 1})
    # A remote store's fsspec file system is bound to the parent's event loop: open anew.
    info = get_worker_info()
    dataset = getattr(info, "dataset", None)
    reader = getattr(dataset, "reader", None) or getattr(
        getattr(dataset, "dataset", None), "reader", None
    )
    if reader is not None:
        reader.reopen_source()
    # Seed the legacy global RNG too: user transforms commonly draw from it.
    np.random.seed(torch.initial_seed() % 2**32)  # noqa: NPY002


def loader_settings(pipeline: DataPipeline, pin_memory: bool = False) -> dict[str, Any]:
    """DataLoader keyword arguments (workers, pinning, prefetching) of the pipeline's spec.

    Args:
        pipeline: The pipeline (its spec and resolved number of workers).
        pin_memory: Whether to page-lock batches when the spec leaves it open (``None``).
    """
    spec, workers = pipeline.spec, pipeline.resources.num_workers
    pinned = pin_memory if spec.pin_memory is None else spec.pin_memory
    settings: dict[str, Any] = {"num_workers": workers, "pin_memory": pinned}
    if workers > 0:
        persistent = spec.persistent_workers
        settings["persistent_workers"] = True if persistent is None else persistent
        settings["worker_init_fn"] = _init_worker
        if pipeline.resources.prefetch_factor is not None:
            settings["prefetch_factor"] = pipeline.resources.prefetch_factor
        if spec.multiprocessing_context is not None:
            settings["multiprocessing_context"] = spec.multiprocessing_context
    return settings


def train_loader(
    pipeline: DataPipeline,
    epoch: int | None = None,
    epoch_of: Callable[[], int] | None = None,
    pin_memory: bool = False,
    position: Callable[[], dict[str, Any]] | None = None,
) -> DataLoader:
    """The training loader: shuffled whole batches in the pipeline's training order.

    Args:
        pipeline: The pipeline.
        epoch: The epoch the sampler starts in (a trainer's current epoch); Lightning calls
            ``set_epoch`` afterwards, a plain loop may too.
        epoch_of: ``style="iterable"``: returns the epoch of each new pass.
        pin_memory: Page-lock batches when the spec leaves it open.
        position: Returns the order's position for the loader's ``state_dict``.
    """
    dataset = pipeline.dataset("train")
    _warn_if_workers_lose_tensorstore(pipeline, dataset)
    # Out of core, without workers the reader decodes the next batches' cells in the
    # background; a remote store's reader also in each worker, its own next batches.
    lookahead, workers = 0, pipeline.resources.num_workers
    if isinstance(dataset.reader, ChunkedReader):
        ahead = dataset.reader.prefetch_batches
        lookahead = ahead if workers == 0 or ahead > 1 else 0
    sampler = pipeline.order.batch_sampler(
        pipeline.sampling.train_split(),
        pipeline.world(),
        epoch,
        lookahead,
        plans=pipeline.spec.random_offsets,  # the batches carry their epoch
        lookahead_stride=max(1, workers),  # workers take the batches in turn
    )
    settings = loader_settings(pipeline, pin_memory)
    collate = partial(collate_batch, ring_slots=pipeline.resources.ring_slots)
    if pipeline.spec.style == "iterable":
        # Lightning warns that an IterableDataset's length may be wrong with several workers;
        # ours shards itself over workers and ranks, so its length is exact.
        warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__`")
        if pipeline.resources.num_workers > 0:
            settings["persistent_workers"] = False  # each pass must see the new epoch
        passes = iter(range(sys.maxsize))
        loader: _Resumable = _EpochLoader(
            XarrayIterableDataset(dataset, sampler),
            epoch_of=epoch_of or (lambda: next(passes)),
            batch_size=None,
            collate_fn=collate,
            **settings,
        )
    else:
        loader = _TrainLoader(
            dataset,
            sampler=sampler,
            batch_size=None,  # the sampler yields whole batches
            collate_fn=collate,  # one Batch, not a list
            **settings,
        )
    loader._position = position
    return loader  # type: ignore[return-value]


def eval_loader(
    pipeline: DataPipeline, stage: str, pin_memory: bool = False, in_order: bool = False
) -> DataLoader:
    """Batches of ``stage``'s split (``val``, ``test`` or ``predict``) in sample order.

    Out of core with workers, validation and test deal one contiguous run of batches to
    each worker, so that each cell is decoded once, not once per worker. Prediction (and
    ``in_order``)
    stays in order: ``to_xarray`` and prediction writers expect it.
    """
    dataset = pipeline.dataset(stage)
    _warn_if_workers_lose_tensorstore(pipeline, dataset)
    workers, batch_size = pipeline.resources.num_workers, pipeline.spec.batch_size
    order: Any = SequentialSampler(dataset)
    dealt = stage in ("val", "test") and not in_order
    if dealt and workers > 1 and isinstance(dataset.reader, ChunkedReader):
        order = BlockInterleavedSampler(len(dataset), batch_size, workers)
    return XarrayDataLoader(
        dataset,
        batch_sampler=ArrayBatchSampler(order, batch_size, False),
        collate_fn=partial(collate_batch, ring_slots=pipeline.resources.ring_slots),
        **loader_settings(pipeline, pin_memory),
    )


def _warn_if_workers_lose_tensorstore(pipeline: DataPipeline, dataset: XarrayWindowDataset) -> None:
    """Forked workers cannot use TensorStore once this process has: say so, once."""
    global _warned_tensorstore_fork
    decoder = getattr(dataset.reader, "decoder", None)
    context = pipeline.spec.multiprocessing_context
    forked = context in (None, "fork") and sys.platform != "win32"
    if (
        pipeline.resources.num_workers > 0
        and forked
        and isinstance(decoder, TensorStoreDecoder)
        and not decode_module.forked_workers_may_use_tensorstore()
        and not _warned_tensorstore_fork
    ):
        _warned_tensorstore_fork = True
        logger.warning(
            "this process has read through TensorStore, which does not survive a fork: "
            "DataLoader workers forked from it read through zarr-python instead, which "
            "decodes 2-3x slower. Read only in workers (num_workers > 0 throughout), or pass "
            "multiprocessing_context='forkserver'."
        )


def world_of(trainer: Any) -> tuple[int, int]:
    """(world size, global rank): the trainer's, else torch.distributed's, else (1, 0)."""
    if trainer is not None:
        return int(trainer.world_size), int(trainer.global_rank)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def on_cuda(trainer: Any) -> bool:
    """Whether the trainer runs on CUDA GPUs (then pinned memory pays)."""
    if trainer is None:
        return False
    from lightning.pytorch.accelerators import CUDAAccelerator

    return isinstance(trainer.accelerator, CUDAAccelerator)


def trained_so_far(trainer: Any) -> tuple[int | None, int | None]:
    """(batches of the epoch trained on, epoch) while a trainer fits, else (None, None).

    ``processed``, not ``completed``: a checkpoint written in ``on_train_batch_end`` (as
    ``ModelCheckpoint(every_n_train_steps=...)`` does) counts the current batch as done,
    and Lightning resumes after it.
    """
    if trainer is None:
        return None, None
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return int(progress.processed), int(trainer.current_epoch)
