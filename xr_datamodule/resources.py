"""Resources and backend: in memory or out of core, workers, threads, and which decoder.

Decided once per pipeline from the spec, the layout and the machine (:func:`choose_resources`),
before anything is read. Out of core, :func:`choose_decoder` picks the fastest exact reader
of a zarr store and says why when it declines a faster one (logged once, shown by
``print(dm)``):

* a local store whose every variable zarr describes as plain compressed chunks (sharded or
  not): :class:`~xr_datamodule.chunkfiles.ChunkFileDecoder`, straight from the files;
* another local store: :class:`~xr_datamodule.decode.TensorStoreDecoder` where it pays (see
  :func:`tensorstore_pays`), else zarr-python's asynchronous API
  (:class:`~xr_datamodule.decode.ZarrDecoder`), also for remote stores;
* anything else (netCDF, a selection, encodings zarr decodes differently): through xarray.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from xr_datamodule.chunkfiles import ChunkFileDecoder, chunk_files
from xr_datamodule.decode import (
    CellDecoder,
    TensorStoreDecoder,
    ZarrDecoder,
    tensorstore_available,
    zarr_decoding,
)
from xr_datamodule.layout import SourceLayout
from xr_datamodule.missing import absent_chunks
from xr_datamodule.remotechunks import RemoteChunkDecoder, remote_chunk_folder
from xr_datamodule.sources import is_in_memory, local_zarr_group, zarr_opener
from xr_datamodule.spec import DataSpec
from xr_datamodule.stores import open_remote_store

if TYPE_CHECKING:
    from xr_datamodule.windows import WindowGeometry

__all__ = ["Backend", "Resources", "batch_bytes", "choose_decoder", "choose_resources"]

logger = logging.getLogger(__name__)

LOAD_BUDGET_SHARE = 0.25  # load="auto" loads when the data take at most this share of free RAM
# A batch this large is loaded one ahead per worker, not torch's two: each batch ahead is a
# ring slot of shared memory per worker (at 0.25 deg, 24 variables, 2 steps -> 1: 299 MB a
# sample), and with two or more workers one ahead each already keeps every worker busy
# (benchmarks/hires.py: the same MB/s, one sample less per worker).
BIG_BATCH_BYTES = 128 * 2**20
DECODE_THREADS_MAX = 4  # threads decoding cells in parallel without workers
AUTO_WORKERS_MAX = 4  # most decoding workers num_workers="auto" picks for out-of-core data
TENSORSTORE_MAX_CHUNK_BYTES_IN_WORKERS = 2 * 2**20  # see tensorstore_pays


def available_memory() -> int:
    """Bytes of memory available to new allocations (``MemAvailable`` on Linux)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Resources:
    """How a pipeline reads: in memory or not, and with how many processes and threads.

    Args:
        loads_into_memory: Whether the selected variables are (or will be) held in memory.
        num_workers: DataLoader worker processes.
        decode_threads: Threads a process decodes cells with (1 inside workers, which
            already decode in parallel with each other; the main process without workers
            decodes a batch's cells in parallel and the next batch's in the background).
        ring_slots: Hand-off slots per worker: one per batch of ``prefetch_factor`` plus two
            held by the training loop (see :mod:`xr_datamodule.handoff`).
        prefetch_factor: Batches each worker loads ahead: the spec's, else one for batches
            of ``BIG_BATCH_BYTES`` or more, else None (torch's default, two).
    """

    loads_into_memory: bool
    num_workers: int
    decode_threads: int
    ring_slots: int
    prefetch_factor: int | None = None


def usable_cores() -> int:
    """How many CPUs this process may run on (its affinity), not the node's ``os.cpu_count()``.

    A Slurm job, a container or ``taskset`` gives a process a share of the node's cores; the
    decoding threads and the workers ``"auto"`` picks fit that share.
    """
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def batch_bytes(spec: DataSpec, layout: SourceLayout, geometry: WindowGeometry) -> int:
    """Bytes of a batch's read inputs and targets (what a worker's ring slot holds, about)."""
    inputs = layout.n_channels(layout.dynamic(spec.input_vars)) * np.prod(geometry.input_size)
    targets = layout.n_channels(layout.dynamic(spec.targets)) * np.prod(geometry.target_size)
    return int(spec.batch_size * (inputs + targets) * spec.array_dtype.itemsize)


def choose_resources(spec: DataSpec, layout: SourceLayout, batch_bytes: int = 0) -> Resources:
    """Resolve ``load``, ``num_workers``, the threads and the prefetch for this data and machine.

    ``load="auto"`` compares the selected variables in the output dtype with a quarter of
    the memory available now. ``batch_bytes`` (a batch's inputs and targets) decides the
    workers' prefetch when the spec leaves it open (see ``BIG_BATCH_BYTES``).
    """
    loads, cores = _loads_into_memory(spec, layout), usable_cores()
    if spec.num_workers != "auto":
        workers = int(spec.num_workers)
    elif loads:
        workers = 0
    else:
        workers = min(AUTO_WORKERS_MAX, max(2, cores // 2)) if cores >= 2 else 0
    threads = 1 if workers > 0 else min(DECODE_THREADS_MAX, cores)
    # Imported here: choosing a decoder (below) needs no torch; handing batches over does.
    from xr_datamodule.handoff import DEFAULT_RING_SLOTS

    prefetch = spec.prefetch_factor or (1 if batch_bytes >= BIG_BATCH_BYTES else None)
    slots = (prefetch or DEFAULT_RING_SLOTS - 2) + 2
    return Resources(loads, workers, threads, slots, prefetch)


def _loads_into_memory(spec: DataSpec, layout: SourceLayout) -> bool:
    load, names, source = spec.load, layout.reader_vars, layout.source
    if load is True or load is False:
        return load
    if is_in_memory(source, names):
        return True
    space = int(np.prod([source.sizes[d] for d in layout.window_dims]))
    nbytes = layout.n_channels(names) * space * spec.array_dtype.itemsize
    return nbytes <= LOAD_BUDGET_SHARE * available_memory()


@dataclass(frozen=True)
class Backend:
    """The decoder a reader uses (None: through xarray) and a line that says which and why."""

    decoder: CellDecoder | None
    description: str


def choose_decoder(spec: DataSpec, layout: SourceLayout, resources: Resources) -> Backend:
    """The fastest exact reader of the spec's store, or None (read through xarray)."""
    names, source = layout.reader_vars, layout.source
    if spec.select:
        return _declined("a selection's positions are not the store's")
    opener = zarr_opener(spec.data, spec.open_kwargs, names)
    if opener is None:
        return Backend(None, "xarray")  # not a zarr store: xarray is the reader
    try:
        arrays = opener()
    except Exception as error:  # xarray opened it; read through xarray then
        return _declined(f"zarr could not open the store ({error})")
    decodings = {}
    for name in names:
        decoding = zarr_decoding(source[name], arrays[name], spec.array_dtype)
        if decoding is None:
            return _declined(f"variable {name!r} has an encoding zarr reads differently")
        decodings[name] = decoding
    layouts = layout.layouts(names)
    dims = {name: tuple(map(str, source[name].dims)) for name in names}
    decoder = ZarrDecoder(opener, layouts, layout.window_dims, dims, decodings)
    decoder.opened.put(arrays)  # opened already in this process
    folder = local_zarr_group(spec.data, spec.open_kwargs)
    if folder is None:
        return _remote_decoder(spec, arrays, decoder, layout, dims, decodings, resources)
    if spec.nan_policy != "keep":
        _report_absent_chunks(layout.origin, arrays)
    files = {name: chunk_files(arrays[name], os.path.join(folder, name)) for name in names}
    threads = resources.decode_threads
    if all(files.values()):
        return Backend(
            ChunkFileDecoder(files, layouts, layout.window_dims, dims, decodings, threads),
            "its zarr chunk files",
        )
    plain = [name for name, described in files.items() if described is None]
    why = f"chunk files declined for {plain} (codecs zarr must decode)"
    if not tensorstore_available():
        return _declined(why + ", TensorStore not installed", decoder, "zarr-python")
    if not tensorstore_pays(arrays, resources.num_workers):
        return _declined(why + ", chunks too large for TensorStore in workers", decoder)
    specs = {
        name: {
            "driver": "zarr3" if arrays[name].metadata.zarr_format == 3 else "zarr",
            "kvstore": {"driver": "file", "path": os.path.join(folder, name)},
        }
        for name in names
    }
    tensorstore = TensorStoreDecoder(
        specs, layouts, layout.window_dims, dims, decodings, threads, decoder
    )
    return _declined(why, tensorstore, "TensorStore")


def _remote_decoder(
    spec: DataSpec,
    arrays: Mapping[str, Any],
    decoder: ZarrDecoder,
    layout: SourceLayout,
    dims: Mapping[str, tuple[str, ...]],
    decodings: Mapping[str, Any],
    resources: Resources,
) -> Backend:
    """A remote store: its chunks fetched at once and decoded by us where they are plain."""
    decoder.retries_each_request = True  # its store does (xr_datamodule.stores)
    kwargs = dict(spec.open_kwargs or {})
    group = kwargs.get("group")
    names = layout.reader_vars
    files = {name: chunk_files(arrays[name], remote_chunk_folder(group, name)) for name in names}
    plain = [name for name, described in files.items() if described is None]
    sharded = [name for name, described in files.items() if described and described.per_shard]
    if plain or sharded:
        why = f"codecs zarr must decode: {plain}" if plain else f"sharded: {sharded}"
        return _declined(f"a remote store ({why})", decoder)
    opener = partial(open_remote_store, str(spec.data), kwargs.get("storage_options"))
    return Backend(
        RemoteChunkDecoder(
            files,  # type: ignore[arg-type]
            opener,
            layout.layouts(names),
            layout.window_dims,
            dims,
            decodings,
            resources.decode_threads,
        ),
        "its chunks, fetched from the remote store and decoded by us",
    )


def _declined(
    reason: str, decoder: CellDecoder | None = None, name: str = "zarr-python"
) -> Backend:
    """A slower reader than the store could have, logged with the reason."""
    reader = name if decoder is not None else "xarray"
    logger.info("reading through %s: %s", reader, reason)
    return Backend(decoder, f"{reader} ({reason})")


def tensorstore_pays(arrays: Mapping[str, Any], num_workers: int) -> bool:
    """Whether TensorStore's speed is worth its memory here.

    Each process that reads loads its own TensorStore (~30 MB of library, threads and malloc
    arenas per DataLoader worker, whatever the size of the store). Its gain over
    zarr-python is the per-chunk overhead it saves, which shrinks as chunks grow and
    decompression dominates (figures in ``benchmarks/README.md``). With workers it is used
    for chunks under 2 MiB on average.
    """
    if num_workers == 0:
        return True
    sizes = [int(np.prod(array.chunks)) * array.dtype.itemsize for array in arrays.values()]
    return float(np.mean(sizes)) < TENSORSTORE_MAX_CHUNK_BYTES_IN_WORKERS


def _report_absent_chunks(origin: str, arrays: Mapping[str, Any]) -> None:
    """Warn of chunks a local store lacks (they read as the fill value)."""
    for name, (absent, total, fill) in absent_chunks(arrays).items():
        logger.warning(
            "%s lacks %d of the %d chunks of variable %r: they read as its fill value "
            "(%s)%s; an interrupted write or copy, or chunks left out because they held "
            "only the fill value",
            origin,
            absent,
            total,
            name,
            fill,
            ", and the first batch that touches one fails under nan_policy='check'"
            if np.asarray(fill).dtype.kind == "f" and np.isnan(fill)
            else "",
        )
