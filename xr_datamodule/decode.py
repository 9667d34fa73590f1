"""Cells of a store and how they are decoded into memory.

Out of core, the windowed dims are cut into *cells*: whole storage chunks (see
:mod:`xr_datamodule.cells`). A decoder fills a cell of every selected variable into a channel-major
block ``(channel, *cell)`` that the reader provides (a slot of its arena), so that nothing is
copied twice. Four decoders:

* :class:`XarrayDecoder` reads each variable's region through xarray (``isel(...).values``):
  any backend xarray opens (netCDF, zarr, dask, in-memory data). Several cells may be decoded
  in parallel threads.
* :class:`ZarrDecoder` reads zarr stores through zarr-python 3's asynchronous API: the chunks
  of every variable of every requested cell are in flight at once on zarr's event loop and
  decode straight into the block (no temporary array, no per-call round trip). Remote
  stores are read so.
* :class:`~xr_datamodule.chunkfiles.ChunkFileDecoder` (in :mod:`xr_datamodule.chunkfiles`)
  reads local zarr stores whose chunks are plain compressed arrays (also inside shards), the
  common layout: each chunk decompressed by numcodecs straight into the block. It beat both
  others on every benchmark store (see that module).
* :class:`TensorStoreDecoder` reads the other local zarr stores (codec chains such as
  checksummed chunks, gzip) with TensorStore, whose C++ pipeline decodes straight into the
  block too, without zarr-python's per-chunk asyncio and thread hand-offs (which cost more
  than the decompression of small chunks). TensorStore cannot be used in a process forked
  after it ran (its threads do not survive a fork): such a process (a DataLoader worker
  forked from a main process that read data) reads through zarr-python instead.

For all of them, xarray still provides the metadata and labels; the variables' encodings are
checked so that the values are exactly what xarray would decode (``_FillValue`` and
``missing_value`` become NaN, ``scale_factor``/``add_offset`` are applied); any other encoding
falls back to xarray.

Nothing here knows about samples or Lightning.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, Protocol

import numpy as np
import xarray as xr

from xr_datamodule.perprocess import PerProcess, thread_pool
from xr_datamodule.retries import retrying, worker_place
from xr_datamodule.sources import VariableLayout, label_range
from xr_datamodule.stores import gather_requests

__all__ = [
    "ArrayDecoder",
    "CellDecoder",
    "CfDecoding",
    "ChunkError",
    "DecodeJob",
    "ReadError",
    "TensorStoreDecoder",
    "XarrayDecoder",
    "ZarrDecoder",
    "channel_slices",
    "decode_with_retries",
    "variable_view",
    "zarr_decoding",
]


def variable_view(
    block: np.ndarray,
    channels: slice,
    layout: VariableLayout,
    window_dims: Sequence[str],
    variable_dims: Sequence[str],
) -> np.ndarray:
    """The channels of one variable in ``block`` as a view in the variable's own dim order.

    ``block`` is ``(channel, *window)``; the variable's channels are its non-windowed dims in
    C order (:mod:`xr_datamodule.sources`). Writing the variable's values into the view
    writes them into the block.
    """
    part = block[channels]
    shaped = part.reshape(*layout.extra_shape, *part.shape[1:])
    if not np.shares_memory(shaped, block):  # cannot happen for a channel split; be sure
        raise RuntimeError("internal error: a variable's channels are not a view of the block")
    current = (*layout.extra_dims, *window_dims)
    return shaped.transpose([current.index(dim) for dim in variable_dims])


def channel_slices(layouts: Sequence[VariableLayout]) -> list[slice]:
    """Where each variable's channels lie in a block, in layout order."""
    ends = np.cumsum([layout.n_channels for layout in layouts])
    return [
        slice(int(end - layout.n_channels), int(end))
        for layout, end in zip(layouts, ends, strict=True)
    ]


@dataclass(frozen=True)
class DecodeJob:
    """One cell to decode: its region per windowed dim and the block to fill."""

    region: dict[str, slice]
    out: np.ndarray


class CellDecoder(Protocol):
    """Fills blocks ``(channel, *cell)`` with the raw (undecoded-by-us) variable values."""

    def decode(self, jobs: Sequence[DecodeJob]) -> None:
        """Fill every job's block; raise if any read fails (blocks are then undefined)."""


class VariableTarget(NamedTuple):
    """One variable of one job: where its values go and which part of its array they are."""

    name: str
    view: np.ndarray  # the block's channels of the variable, in the variable's dim order
    selection: tuple[slice, ...]  # per dim of the variable's array


class ArrayDecoder:
    """What the zarr decoders share: where each variable of a job goes, and its CF decoding.

    Args:
        layouts: Channel layout of each variable, in channel order.
        window_dims: Windowed dims, in block axis order.
        variable_dims: Each variable's own dim order (the array's).
        decodings: What to do to each variable's raw values (see :func:`zarr_decoding`).
    """

    def __init__(
        self,
        layouts: Sequence[VariableLayout],
        window_dims: Sequence[str],
        variable_dims: Mapping[str, tuple[str, ...]],
        decodings: Mapping[str, CfDecoding],
    ) -> None:
        self.layouts = list(layouts)
        self.window_dims = tuple(window_dims)
        self.variable_dims = dict(variable_dims)
        self.decodings = dict(decodings)
        self._channels = channel_slices(self.layouts)

    def targets(self, jobs: Sequence[DecodeJob]) -> list[VariableTarget]:
        """Every variable of every job, in order."""
        targets = []
        for job in jobs:
            for layout, channels in zip(self.layouts, self._channels, strict=True):
                dims = self.variable_dims[layout.name]
                view = variable_view(job.out, channels, layout, self.window_dims, dims)
                selection = tuple(job.region.get(dim, slice(None)) for dim in dims)
                targets.append(VariableTarget(layout.name, view, selection))
        return targets

    def finish(self, targets: Sequence[VariableTarget]) -> None:
        """Apply each variable's CF decoding (fill values to NaN, scale and offset) in place."""
        for target in targets:
            decoding = self.decodings[target.name]
            if not decoding.is_identity:
                decoding.apply(target.view)


class XarrayDecoder:
    """Reads each variable's region through xarray; cells in parallel threads if asked.

    Args:
        ds: The source dataset (any backend).
        layouts: Channel layout of each variable, in channel order.
        window_dims: Windowed dims, in block axis order.
        threads: Cells decoded at once (zarr's and netCDF's decompressors release the GIL).
    """

    def __init__(
        self,
        ds: xr.Dataset,
        layouts: Sequence[VariableLayout],
        window_dims: Sequence[str],
        threads: int = 1,
    ) -> None:
        self.dataset = ds[[layout.name for layout in layouts]]
        self.layouts = list(layouts)
        self.window_dims = tuple(window_dims)
        self.threads = max(1, int(threads))
        self.pool = thread_pool(self.threads)
        self._channels = channel_slices(self.layouts)

    def decode(self, jobs: Sequence[DecodeJob]) -> None:
        """Decode the jobs, several at once when there are threads for them."""
        if len(jobs) > 1 and self.threads > 1:
            list(self.pool.get().map(self._decode_one, jobs))
        else:
            for job in jobs:
                self._decode_one(job)

    def _decode_one(self, job: DecodeJob) -> None:
        for layout, channels in zip(self.layouts, self._channels, strict=True):
            # One variable at a time: only one variable's decoded region is alive beside
            # the block.
            variable = self.dataset[layout.name]
            # Always through isel, also for everything: reading a lazily indexed variable
            # whole with .values would cache it in the source dataset.
            whole = {dim: slice(None) for dim in self.window_dims}
            values = variable.isel({**whole, **job.region}).values
            view = variable_view(job.out, channels, layout, self.window_dims, variable.dims)
            view[...] = values
            del values

    def close(self) -> None:
        """Stop this process's decoding threads."""
        self.pool.close()


def decode_with_retries(decoder: CellDecoder, jobs: Sequence[DecodeJob], what: str) -> None:
    """``decoder.decode(jobs)`` through :func:`retrying` (a decode is safe to repeat).

    A decoder whose store retries each chunk request itself (``retries_each_request``, a
    remote store's :class:`~xr_datamodule.stores.RetryingStore`) is called once: retrying
    the whole again would multiply the attempts.
    """
    if getattr(decoder, "retries_each_request", False):
        decoder.decode(jobs)
        return
    retrying(lambda: decoder.decode(jobs), what)


class ReadError(OSError):
    """Data could not be read: names the variable, the source and where, chaining the cause."""


class ChunkError(OSError):
    """A chunk of a known variable could not be read (its message names the file).

    Args:
        message: What went wrong, naming the file.
        variable: The variable the chunk belongs to.
    """

    def __init__(self, message: str, variable: str) -> None:
        super().__init__(message)
        self.variable = variable


def _named_variable(error: BaseException | None) -> str | None:
    """The variable a :class:`ChunkError` in ``error``'s chain of causes names, if any."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ChunkError):
            return error.variable
        error = error.__cause__ or error.__context__
    return None


def read_error(
    error: BaseException, dataset: xr.Dataset, regions: Sequence[Mapping[str, slice]], origin: str
) -> ReadError:
    """A :class:`ReadError` that says what failed to read, where, and in which process.

    The culprit variable is the one a :class:`ChunkError` names, or else found by reading
    each variable of the first region through xarray (only on this error path; never after
    a chunk error, which may be a decompression bomb); the region is given in labels and
    positions.
    """
    region = dict(regions[0]) if regions else {}
    culprits = []
    named = _named_variable(error)
    for name in dataset.data_vars if named is None else ():
        variable = dataset[name]
        try:
            variable.isel({d: s for d, s in region.items() if d in variable.dims}).values  # noqa: B018
        except Exception:
            culprits.append(str(name))
    if named is not None:
        culprits = [named]
    names = culprits or [str(name) for name in dataset.data_vars]
    where = (
        ", ".join(
            label_range(dataset, dim, *part.indices(dataset.sizes[dim])[:2])
            for dim, part in region.items()
        )
        or "everything"
    )
    place = worker_place()
    which = "variable" if len(names) == 1 else "variables"
    return ReadError(
        f"could not read {which} {', '.join(map(repr, names))} of {origin} at {where}"
        f"{place}: {type(error).__name__}: {error}"
    )


@dataclass(frozen=True)
class CfDecoding:
    """What xarray's CF decoding does to a variable's raw values, which we then do too.

    Args:
        fill_values: Raw values that become NaN (``_FillValue``, ``missing_value``); NaN
            itself needs nothing.
        scale: ``scale_factor``, or None.
        offset: ``add_offset``, or None.
    """

    fill_values: tuple[float, ...] = ()
    scale: float | None = None
    offset: float | None = None

    @property
    def is_identity(self) -> bool:
        """Whether raw values are already what xarray returns."""
        return not self.fill_values and self.scale is None and self.offset is None

    def apply(self, view: np.ndarray) -> None:
        """Decode raw values in place (the view holds them in a float dtype)."""
        for fill in self.fill_values:
            view[view == fill] = np.nan
        if self.scale is not None or self.offset is not None:
            # In float64, then cast once: the value xarray computes.
            values = view.astype(np.float64)
            if self.scale is not None:
                values *= self.scale
            if self.offset is not None:
                values += self.offset
            view[...] = values


_EXACT_INTS = {1: np.dtype("float16"), 2: np.dtype("float32"), 4: np.dtype("float64")}


def zarr_decoding(variable: xr.DataArray, array: Any, out_dtype: np.dtype) -> CfDecoding | None:
    """How to turn ``array``'s raw values into ``variable``'s, or None to leave it to xarray.

    Handled: the same dims and shape, and either no decoding, or fill values masked to NaN
    and scale/offset applied, when the raw values are exact in ``out_dtype``.
    """
    dims = getattr(getattr(array, "metadata", None), "dimension_names", None) or array.attrs.get(
        "_ARRAY_DIMENSIONS"
    )
    if dims is None or tuple(dims) != tuple(variable.dims) or array.shape != variable.shape:
        return None
    encoding = {**variable.attrs, **variable.encoding}
    if "_Unsigned" in encoding:
        return None
    raw = np.dtype(array.dtype)
    fills: list[float] = []
    for key in ("_FillValue", "missing_value"):
        value = variable.encoding.get(key)
        if value is None:
            continue
        for fill in np.atleast_1d(np.asarray(value)).tolist():
            if not (isinstance(fill, float) and np.isnan(fill)) and fill not in fills:
                fills.append(fill)
    decoding = CfDecoding(
        tuple(fills), variable.encoding.get("scale_factor"), variable.encoding.get("add_offset")
    )
    if decoding.is_identity:
        return decoding if raw.kind in "fiub" else None
    if not np.issubdtype(variable.dtype, np.floating) or out_dtype.kind != "f":
        return None
    if raw.kind in "iu":
        exact = _EXACT_INTS.get(raw.itemsize)
        if exact is None or out_dtype.itemsize < exact.itemsize:
            return None
    elif raw.kind == "f":
        if out_dtype.itemsize < raw.itemsize and fills:
            return None  # a fill value could collide with a rounded value
    else:
        return None
    return decoding


class ZarrDecoder(ArrayDecoder):
    """Reads cells from zarr arrays with every chunk of every variable in flight at once.

    Uses zarr-python 3's asynchronous arrays (``Array.async_array``) on zarr's own event
    loop: one round trip per request of cells, however many variables and chunks it holds,
    and each chunk decoded straight into the block.

    Args:
        open_arrays: Opens the zarr arrays by variable name; called once in each process
            (a forked DataLoader worker opens its own store).
        layouts: Channel layout of each variable, in channel order.
        window_dims: Windowed dims, in block axis order.
        variable_dims: Each variable's own dim order (the zarr array's).
        decodings: What to do to each variable's raw values (see :func:`zarr_decoding`).
    """

    def __init__(
        self,
        open_arrays: Callable[[], Mapping[str, Any]],
        layouts: Sequence[VariableLayout],
        window_dims: Sequence[str],
        variable_dims: Mapping[str, tuple[str, ...]],
        decodings: Mapping[str, CfDecoding],
    ) -> None:
        super().__init__(layouts, window_dims, variable_dims, decodings)
        self.open_arrays = open_arrays
        self.opened = PerProcess(open_arrays)  # zarr arrays, opened once in each process
        self.retries_each_request = False  # set for a remote store (see decode_with_retries)

    def arrays(self) -> Mapping[str, Any]:
        """This process's zarr arrays (opened on first use in each process)."""
        return self.opened.get()

    def close(self) -> None:
        """Forget this process's open arrays."""
        self.opened.close()

    def decode(self, jobs: Sequence[DecodeJob]) -> None:
        """Read every variable of every job in one round trip on zarr's event loop."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        arrays = self.arrays()
        prototype = default_buffer_prototype()
        targets = self.targets(jobs)
        requests = [
            partial(
                arrays[target.name].async_array.get_orthogonal_selection,
                target.selection,
                out=prototype.nd_buffer.from_numpy_array(target.view),
            )
            for target in targets
        ]
        if requests:
            sync(gather_requests(requests))
        self.finish(targets)


# The process that started TensorStore's threads, if any: a process forked from it must not
# use TensorStore (it aborts: "fork() use detected").
_tensorstore_pid: int | None = None


def forked_workers_may_use_tensorstore() -> bool:
    """Whether a process forked from this one now could use TensorStore (it has not run)."""
    return _tensorstore_pid is None


TENSORSTORE_SWITCH = "XR_DATAMODULE_TENSORSTORE"  # "0": read local zarr with zarr-python


def switched_off(variable: str) -> bool:
    """Whether the environment variable says ``0``/``false``/``no``/``off``."""
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")


def tensorstore_available() -> bool:
    """Whether TensorStore is installed and may be used in this process (not imported here).

    ``XR_DATAMODULE_TENSORSTORE=0`` in the environment turns it off (zarr-python reads).

    A process that only hands out work (the main process, with DataLoader workers) then
    never loads it.
    """
    if _tensorstore_pid not in (None, os.getpid()):
        return False
    if switched_off(TENSORSTORE_SWITCH):
        return False
    return importlib.util.find_spec("tensorstore") is not None


class TensorStoreDecoder(ArrayDecoder):
    """Reads cells of a local zarr store with TensorStore, straight into the blocks.

    Every variable of every requested cell is read at once, each written by TensorStore
    into the block's view of that variable (a numpy view TensorStore references, no copy).
    In a process where TensorStore cannot be used (forked after the parent used it), the
    ``fallback`` decoder reads instead.

    Args:
        specs: TensorStore spec of each variable's array (opened once in each process).
        layouts: Channel layout of each variable, in channel order.
        window_dims: Windowed dims, in block axis order.
        variable_dims: Each variable's own dim order (the array's).
        decodings: What to do to each variable's raw values (see :func:`zarr_decoding`).
        threads: Threads TensorStore decodes with.
        fallback: The decoder to use where TensorStore cannot run.
    """

    def __init__(
        self,
        specs: Mapping[str, dict[str, Any]],
        layouts: Sequence[VariableLayout],
        window_dims: Sequence[str],
        variable_dims: Mapping[str, tuple[str, ...]],
        decodings: Mapping[str, CfDecoding],
        threads: int,
        fallback: CellDecoder,
    ) -> None:
        super().__init__(layouts, window_dims, variable_dims, decodings)
        self.specs = dict(specs)
        self.threads = max(1, int(threads))
        self.fallback = fallback
        self.opened = PerProcess(partial(_open_tensorstore, self.specs, self.threads))

    def close(self) -> None:
        """Forget this process's open arrays; the fallback's too."""
        self.opened.close()
        close_decoder(self.fallback)

    def decode(self, jobs: Sequence[DecodeJob]) -> None:
        """Write every variable of every job into its block, all reads in flight at once."""
        arrays = self.opened.get()
        if arrays is None:
            self.fallback.decode(jobs)
            return
        import tensorstore as ts

        targets = self.targets(jobs)
        writes = []
        for target in targets:
            source = arrays[target.name][target.selection]
            into = ts.array(target.view, copy=False, write=True)
            if source.dtype != into.dtype:
                source = ts.cast(source, into.dtype)
            writes.append(into.write(source))
        for write in writes:
            write.result()
        self.finish(targets)


def _open_tensorstore(specs: Mapping[str, dict[str, Any]], threads: int) -> Any:
    """The arrays of ``specs`` opened with TensorStore, or None where it may not be used."""
    global _tensorstore_pid
    if not tensorstore_available():
        return None
    import tensorstore as ts

    _tensorstore_pid = os.getpid()
    context = ts.Context(
        {
            "data_copy_concurrency": {"limit": threads},
            # As many reading threads: each more keeps its own malloc arena.
            "file_io_concurrency": {"limit": threads},
            "cache_pool": {"total_bytes_limit": 0},  # cells are cached decoded, by us
        }
    )
    futures = {name: ts.open(spec, read=True, context=context) for name, spec in specs.items()}
    return {name: future.result() for name, future in futures.items()}


def close_decoder(decoder: CellDecoder) -> None:
    """Release a decoder's threads and open stores in this process (those that hold any)."""
    close = getattr(decoder, "close", None)
    if close is not None:
        close()
