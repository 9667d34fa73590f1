"""Open a source lazily and describe its variables: which dims are windowed, which are channels.

A source is a zarr store, a netCDF file, a glob of netCDF files, an fsspec URL, an in-memory
``xr.Dataset`` or the embedded synthetic dataset (``"synthetic://weather"``). Nothing is
loaded here: zarr stores and single netCDF files come back as xarray's lazily indexed
arrays (no dask unless ``open_kwargs`` asks for ``chunks``), multi-file globs dask-backed.

Channel rule: every dim of a variable that is not windowed is folded into channels, in the
variable's own dim order (C order). ``u(level=3, lat, lon)`` windowed on lat/lon gives three
channels ``u[level=200]``, ``u[level=500]``, ``u[level=850]``. To get samples along a dim
instead of channels, window it with length 1.
"""

from __future__ import annotations

import difflib
import glob
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from xr_datamodule.anemoi import is_anemoi, labelled
from xr_datamodule.retries import retrying

__all__ = [
    "SYNTHETIC_GLOBAL",
    "SYNTHETIC_SOURCE",
    "DataSource",
    "VariableLayout",
    "channel_layouts",
    "check_source_exists",
    "check_store_tree",
    "check_variables",
    "is_in_memory",
    "is_remote",
    "label_range",
    "local_zarr_group",
    "open_selected",
    "open_source",
    "select_labels",
    "static_variables",
    "window_dim_order",
    "zarr_opener",
]

SYNTHETIC_SOURCE = "synthetic://weather"
"""Source string that selects the embedded synthetic dataset (:mod:`xr_datamodule.synthetic`)."""
SYNTHETIC_GLOBAL = "synthetic://global"
"""Source string of the embedded synthetic global dataset (levels, static fields, dates)."""

DataSource = str | os.PathLike | xr.Dataset


def _is_url(path: str) -> bool:
    return "://" in path


def _is_glob(path: str) -> bool:
    return any(char in path for char in "*?[")


def _is_zarr(path: str) -> bool:
    stripped = path.rstrip("/")
    if stripped.endswith(".zarr"):
        return True
    local = Path(stripped)
    return local.is_dir() and any(
        (local / marker).exists() for marker in ("zarr.json", ".zgroup", ".zmetadata")
    )


def check_source_exists(data: DataSource) -> None:
    """Fail early, before anything is opened, when a local path or glob points at nothing.

    Raises:
        FileNotFoundError: If a local path does not exist or a glob matches no file.
        TypeError: If ``data`` is neither a path, a URL nor an ``xr.Dataset``.
    """
    if isinstance(data, xr.Dataset):
        return
    if not isinstance(data, (str, os.PathLike)):
        raise TypeError(
            f"data must be a path, glob, URL, {SYNTHETIC_SOURCE!r} or an xarray.Dataset, "
            f"got {type(data).__name__}"
        )
    path = os.fspath(data)
    if path in (SYNTHETIC_SOURCE, SYNTHETIC_GLOBAL) or _is_url(path):
        return
    if _is_glob(path):
        if not glob.glob(path):
            raise FileNotFoundError(f"data: no file matches the pattern {path!r}")
        return
    if not os.path.exists(path):
        raise FileNotFoundError(f"data: no such file or store {path!r}")


def open_source(data: DataSource, open_kwargs: Mapping[str, Any] | None = None) -> xr.Dataset:
    """Open a source lazily.

    An anemoi-datasets store gets its labels (:mod:`xr_datamodule.anemoi`).

    Args:
        data: A zarr store (path or URL ending in ``.zarr``, or a folder with zarr metadata),
            a netCDF file, a glob of netCDF files, another fsspec URL (opened with zarr), an
            ``xr.Dataset`` (returned as is) or :data:`SYNTHETIC_SOURCE`.
        open_kwargs: Extra keyword arguments for the xarray opener (``engine``, ``chunks``,
            ``storage_options``, ...).

    Returns:
        The dataset, unloaded.

    Example:
        >>> ds = open_source("synthetic://weather")
        >>> sorted(ds.data_vars)
        ['t2m', 'u10', 'v10']
    """
    check_source_exists(data)
    if isinstance(data, xr.Dataset):
        return data
    kwargs = dict(open_kwargs or {})
    path = os.fspath(data)
    if path == SYNTHETIC_SOURCE:
        from xr_datamodule.synthetic import make_weather

        return make_weather(**kwargs)
    if path == SYNTHETIC_GLOBAL:
        from xr_datamodule.synthetic import make_global

        return make_global(**kwargs)
    try:
        opened = retrying(partial(_open_path, path, kwargs), repr(path))
        return labelled(opened) if is_anemoi(opened) else opened
    except OSError as err:
        raise OSError(f"data: could not open {path!r}: {err}") from err
    except ValueError as err:
        raise ValueError(f"data: could not open {path!r}: {err}") from err
    except TypeError as err:  # e.g. zarr's "Failed to decode fill_value" of odd metadata
        raise ValueError(
            f"data: could not open {path!r}: its metadata do not parse ({err}); check the "
            "array's dtype, byte order and fill_value in its zarr.json / .zarray"
        ) from err


def _local_without_consolidated(path: str) -> bool:
    """A local zarr store that has no consolidated metadata (v2 ``.zmetadata`` or v3)."""
    folder = Path(path)
    if not folder.is_dir() or (folder / ".zmetadata").exists():
        return False
    root = folder / "zarr.json"
    if not root.exists():
        return (folder / ".zgroup").exists()
    try:
        return json.loads(root.read_text()).get("consolidated_metadata") is None
    except (OSError, ValueError):
        return False


def _opens_as_zarr(path: str) -> bool:
    return _is_zarr(path) or (_is_url(path) and not path.endswith((".nc", ".nc4")))


def zarr_opener(
    data: DataSource, open_kwargs: Mapping[str, Any] | None, names: Sequence[str]
) -> Callable[[], dict[str, Any]] | None:
    """A picklable function that opens the named variables as zarr-python 3 arrays, or None.

    Only for a zarr store given by path or URL (what :func:`open_source` opens with
    ``xr.open_zarr``), with zarr-python 3 installed: readers then decode chunks through
    zarr's asynchronous API instead of through xarray (see :mod:`xr_datamodule.decode`).
    Nothing is opened here.
    """
    if isinstance(data, xr.Dataset) or not isinstance(data, (str, os.PathLike)):
        return None
    path = os.fspath(data)
    if path in (SYNTHETIC_SOURCE, SYNTHETIC_GLOBAL) or _is_glob(path):
        return None
    if not _opens_as_zarr(path):
        return None
    try:
        import zarr
    except ImportError:
        return None
    if int(zarr.__version__.split(".")[0]) < 3:
        return None
    kwargs = dict(open_kwargs or {})
    return partial(
        _open_zarr_arrays, path, kwargs.get("group"), kwargs.get("storage_options"), tuple(names)
    )


def local_zarr_group(data: DataSource, open_kwargs: Mapping[str, Any] | None) -> str | None:
    """The local folder of the zarr group ``data`` opens, or None for URLs and other sources."""
    if zarr_opener(data, open_kwargs, []) is None:
        return None
    path = os.fspath(data)  # type: ignore[arg-type]
    if _is_url(path) and not path.startswith("file://"):
        return None
    folder = Path(path.removeprefix("file://")).resolve()
    group = (open_kwargs or {}).get("group")
    return str(folder / group if group else folder)


def _open_zarr_arrays(
    path: str, group: str | None, storage_options: dict[str, Any] | None, names: Sequence[str]
) -> dict[str, Any]:
    import zarr

    if _is_url(path) and not path.startswith("file://"):
        from xr_datamodule.stores import open_remote_group

        root = open_remote_group(path, group, storage_options)
    else:
        options = {"storage_options": storage_options} if storage_options else {}
        root = zarr.open_group(path, mode="r", path=group, **options)
    return {name: root[name] for name in names}


def is_in_memory(ds: xr.Dataset, names: Sequence[str]) -> bool:
    """Whether all the named variables are held as numpy arrays (not dask, not lazy files)."""
    # ``Variable._in_memory`` is the one test that tells lazily indexed file arrays from
    # numpy without touching the data (``.data`` would load them).
    return all(getattr(ds[name].variable, "_in_memory", False) for name in names)


def did_you_mean(name: str, valid: Sequence[str]) -> str:
    """``; did you mean 'lat'?`` for the closest of ``valid``, or nothing when none is close."""
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_names(ds: xr.Dataset, variables: Mapping[str, Any], dims: Mapping[str, Any]) -> None:
    """Unknown variables and dims, each named with the valid ones and the closest of them.

    Run where the datamodule is constructed, before the arguments are checked against each
    other, so that a misspelled name is reported for what it is (and not, say, as
    ``target_dims`` disagreeing with ``input_dims``).

    Args:
        ds: The source.
        variables: ``{argument: names}``, e.g. ``{"input_vars": ["t2m"]}``.
        dims: ``{argument: {dim: ...}}``, e.g. ``{"input_dims": {"time": 2}}``.

    Raises:
        KeyError: The first unknown name.
    """
    valid_vars = tuple(str(name) for name in ds.data_vars)
    for role, names in variables.items():
        for name in names if isinstance(names, (list, tuple)) else ():
            if isinstance(name, str) and name not in ds.data_vars:
                raise KeyError(
                    f"{role}: variable {name!r} is not in the data. Valid: {valid_vars}"
                    + did_you_mean(name, valid_vars)
                )
    valid_dims = tuple(str(dim) for dim in ds.dims)
    for role, given in dims.items():
        for dim in given if isinstance(given, Mapping) else ():
            if dim not in ds.dims:
                raise KeyError(
                    f"{role}: dimension {dim!r} does not exist. Expected one or more of "
                    f"{valid_dims}" + did_you_mean(dim, valid_dims)
                )


def check_variables(ds: xr.Dataset, names: Sequence[str], role: str) -> list[str]:
    """Check that the named variables exist, are numeric and are not listed twice.

    Args:
        ds: The source dataset.
        names: Variable names as given by the user.
        role: Argument name for error messages (``"input_vars"``, ``"target_vars"``).

    Returns:
        The names as a list.

    Raises:
        KeyError: For an unknown variable (the message lists the valid ones).
        TypeError: For a non-numeric variable.
        ValueError: For an empty list or a variable listed twice.
    """
    names = list(names)
    if not names:
        raise ValueError(f"{role} must name at least one variable")
    valid = tuple(str(name) for name in ds.data_vars)
    for name in names:
        if name not in ds.data_vars:
            raise KeyError(
                f"{role}: variable {name!r} is not in the data. Valid: {valid}"
                + did_you_mean(name, valid)
            )
        dtype = ds[name].dtype
        if not (np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)):
            raise TypeError(
                f"{role}: variable {name!r} has dtype {dtype}, which is not numeric; "
                "only numeric (or boolean) variables can become tensors"
            )
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"{role}: variable(s) {twice} listed more than once")
    return names


def window_dim_order(
    ds: xr.Dataset,
    names: Sequence[str],
    window_dims: Sequence[str],
    static_dim: str | None = None,
) -> tuple[str, ...]:
    """Windowed dims in the order of the first variable that has them all; check the others.

    A variable may lack ``static_dim`` (the time dim) and no other windowed dim: it is a
    static field (e.g. a land-sea mask), broadcast along that dim.

    Raises:
        KeyError: If a windowed dim is not a dim of the data.
        ValueError: If a variable lacks a windowed dim it may not lack.
    """
    for dim in window_dims:
        if dim not in ds.dims:
            raise KeyError(
                f"input_dims: dimension {dim!r} does not exist. "
                f"Expected one or more of {tuple(str(d) for d in ds.dims)}"
            )
    for name in names:
        missing = [dim for dim in window_dims if dim not in ds[name].dims]
        if missing and missing != [static_dim]:
            allowed = (
                f"only {static_dim!r} may be missing (a static field, broadcast along it)"
                if static_dim in window_dims
                else f"every selected variable must have all of {tuple(window_dims)}"
            )
            raise ValueError(
                f"variable {name!r} has dims {ds[name].dims} and lacks the windowed dim(s) "
                f"{missing}; {allowed}"
            )
    full = [name for name in names if all(dim in ds[name].dims for dim in window_dims)]
    # Only static fields: the given order (the layout refuses such a side, naming it).
    first = ds[full[0]].dims if full else window_dims
    return tuple(str(dim) for dim in first if dim in window_dims)


def select_labels(ds: xr.Dataset, select: Mapping[str, Any]) -> xr.Dataset:
    """``ds.sel`` of the given labels (lists) or label ranges (slices), lazily, checked.

    Raises:
        KeyError: A dim is not in the data, or labels are not in its coordinate.
        ValueError: A range selects nothing.
    """
    for dim, labels in select.items():
        if dim not in ds.dims:
            raise KeyError(
                f"select: dim {dim!r} is not in the data. Valid: {tuple(map(str, ds.dims))}"
            )
        if isinstance(labels, slice):
            chosen = ds.sel({dim: labels})
            if chosen.sizes[dim] == 0:
                raise ValueError(
                    f"select[{dim!r}] = {labels.start!r} .. {labels.stop!r} selects nothing; "
                    f"{dim!r} runs from {ds[dim].values[0]} to {ds[dim].values[-1]}"
                )
        else:
            index = ds.indexes[dim] if dim in ds.indexes else None
            found = index.get_indexer(labels) if index is not None else np.full(len(labels), -1)
            absent = [label for label, at in zip(labels, found, strict=True) if at < 0]
            if absent:
                have = tuple(index) if index is not None and len(index) <= 50 else "..."
                raise KeyError(f"select[{dim!r}]: {absent} not in the data; it has {have}")
            chosen = ds.isel({dim: found})
        ds = chosen
    return ds


def open_selected(
    data: DataSource, open_kwargs: Mapping[str, Any] | None, select: Mapping[str, Any]
) -> xr.Dataset:
    """:func:`open_source`, then :func:`select_labels` (what a worker reopens)."""
    source = open_source(data, open_kwargs)
    return select_labels(source, select) if select else source


def check_store_tree(folder: str) -> None:
    """Refuse a local store holding links that lead outside it, or files that are not files.

    For stores of untrusted origin (``strict_store=True``): a symlink in a zarr store is
    followed by every reader, wherever it points (a chunk linked to ``/etc/shadow`` would be
    read into batches), and a FIFO would block the reader. One walk of the tree, in
    ``setup``.

    Raises:
        PermissionError: A link leading outside the store, or an entry that is neither a
            regular file nor a folder.
    """
    root = os.path.realpath(folder)
    for here, folders, files in os.walk(folder, followlinks=False):
        for name in folders + files:
            path = os.path.join(here, name)
            target = os.path.realpath(path)
            if os.path.islink(path) and os.path.commonpath([root, target]) != root:
                raise PermissionError(
                    f"strict_store: {path!r} links to {target!r}, outside the store {root!r}"
                )
            if not (os.path.isdir(target) or os.path.isfile(target)):
                raise PermissionError(
                    f"strict_store: {path!r} is neither a regular file nor a folder"
                )


def is_remote(data: DataSource) -> bool:
    """Whether ``data`` is an fsspec URL (a remote store or file)."""
    return isinstance(data, (str, os.PathLike)) and _is_url(os.fspath(data))


def label_range(ds: xr.Dataset, dim: str, lo: int, hi: int) -> str:
    """Positions ``[lo, hi)`` of ``dim`` as messages give them: labels, then positions."""
    if dim in ds.indexes and hi > lo:
        index = ds.indexes[dim]
        return f"{dim} {index[lo]} … {index[hi - 1]} (positions {lo}-{hi - 1})"
    return f"{dim} positions {lo}-{hi - 1}"


def _open_path(path: str, kwargs: dict[str, Any]) -> xr.Dataset:
    if _opens_as_zarr(path):
        # No dask by default: our reader decodes whole chunks itself, and xarray's lazily
        # indexed zarr arrays skip building a dask graph per read.
        if "consolidated" not in kwargs and _local_without_consolidated(path):
            kwargs["consolidated"] = False  # xarray would warn and fall back each time
        try:
            return xr.open_zarr(path, **{"chunks": None, **kwargs})
        except KeyError as error:
            # A zarr v3 store that names its dims the v2 way (an attribute per array), as
            # anemoi-datasets writes with zarr 3: xarray wants v3's dimension_names.
            if "dimension_names" not in str(error):
                raise
            return _open_by_array_dimensions(path, kwargs, error)
    if _is_glob(path):
        return xr.open_mfdataset(path, **kwargs)
    return xr.open_dataset(path, **kwargs)


def _open_by_array_dimensions(path: str, kwargs: dict[str, Any], error: KeyError) -> xr.Dataset:
    """A zarr group whose arrays name their dims in ``_ARRAY_DIMENSIONS``, lazily (dask)."""
    import dask.array as da
    import zarr

    group = zarr.open_group(
        path, mode="r", path=kwargs.get("group"), storage_options=kwargs.get("storage_options")
    )
    variables = {}
    for name, array in group.arrays():
        dims = array.attrs.get("_ARRAY_DIMENSIONS")
        if dims is None:
            raise KeyError(f"{error.args[0]} (array {name!r} names no dims either)") from error
        variables[name] = xr.Variable(tuple(dims), da.from_zarr(array))
    return xr.Dataset(variables, attrs=dict(group.attrs))


def label_at(ds: xr.Dataset, dims: Sequence[str], positions: Sequence[int]) -> str:
    """One grid point as messages give it: ``time=2020-01-06, lat=10.0, lon=4.0``."""
    parts = []
    for dim, position in zip(dims, positions, strict=True):
        label = ds.indexes[dim][int(position)] if dim in ds.indexes else int(position)
        parts.append(f"{dim}={label}")
    return ", ".join(parts)


def static_variables(ds: xr.Dataset, names: Sequence[str], static_dim: str | None) -> list[str]:
    """The variables among ``names`` that lack ``static_dim`` (static fields)."""
    if static_dim is None:
        return []
    return [name for name in names if static_dim not in ds[name].dims]


@dataclass(frozen=True)
class VariableLayout:
    """How one variable becomes channels: its non-windowed dims, flattened in C order."""

    name: str
    extra_dims: tuple[str, ...]
    extra_shape: tuple[int, ...]

    @property
    def n_channels(self) -> int:
        """Number of channels the variable contributes."""
        return int(np.prod(self.extra_shape, dtype=np.int64))

    def channel_names(self, ds: xr.Dataset) -> list[str]:
        """Readable names, e.g. ``u[level=200]``, one per channel."""
        if not self.extra_dims:
            return [self.name]
        labels = [
            ds[dim].values if dim in ds.coords else np.arange(size)
            for dim, size in zip(self.extra_dims, self.extra_shape, strict=True)
        ]
        names = []
        for position in np.ndindex(*self.extra_shape):
            parts = ",".join(
                f"{dim}={values[i]}"
                for dim, values, i in zip(self.extra_dims, labels, position, strict=True)
            )
            names.append(f"{self.name}[{parts}]")
        return names


def channel_layouts(
    ds: xr.Dataset, names: Sequence[str], window_dims: Sequence[str]
) -> list[VariableLayout]:
    """Channel layout of each variable (see the module docstring for the rule)."""
    layouts = []
    for name in names:
        var = ds[name]
        extra = tuple(str(dim) for dim in var.dims if dim not in window_dims)
        layouts.append(VariableLayout(name, extra, tuple(var.sizes[d] for d in extra)))
    return layouts
