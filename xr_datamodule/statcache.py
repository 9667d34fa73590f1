"""Statistics computed once per archive: a cache keyed by what determines them.

A scan of the training split costs about a second per 300 MB on two cores: days on an
archive of decades. The statistics are therefore kept in a JSON file per key in a cache
directory (``stats_cache``; default ``$XR_DATAMODULE_CACHE`` or the user's cache folder) and
reused by any later ``fit``, ``validate`` or ``predict`` with the same key:

* the source: its path or URL, and its files' metadata — a zarr store's metadata documents
  (root and each array: content, size, modification time), each netCDF file's size and
  modification time; the opened variables' shapes, dtypes, chunks and attributes, and every
  windowed dim's labels (an appended step changes them);
* what is described: the variables, ``select``, the windowed dims, the split's bounds, the
  normalisation methods, the NaN policy and the sampling of a sampled estimate.

Any change to one of these is a miss (the statistics are computed again and stored). A file
that does not parse, or whose stored key differs from the one asked for, is never trusted:
it is computed again and overwritten. Not seen: chunks rewritten in place without touching
any metadata (``stats_cache=False`` or ``xr-datamodule stats`` then). An in-memory
``xr.Dataset`` has no identity to key on: its statistics are always computed.

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> key = {"source": "era5.zarr", "variables": ["t2m"]}
    >>> load_cached(key, folder) is None
    True
    >>> path = store_cached(key, {"mean": {"t2m": [280.0]}, "std": {"t2m": [20.0]}}, folder)
    >>> load_cached(key, folder)[0]["mean"]
    {'t2m': [280.0]}
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

__all__ = [
    "cache_directory",
    "load_cached",
    "statistics_key",
    "store_cached",
    "write_statistics",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "XR_DATAMODULE_CACHE"
# Bumped when what the statistics hold or how they are computed changes.
FORMAT = 1
# zarr's metadata documents (v3, then v2's and consolidated metadata).
METADATA_NAMES = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")


def cache_directory(setting: bool | str | os.PathLike) -> Path | None:
    """The folder statistics are cached in, or None when caching is off.

    Args:
        setting: ``True`` (``$XR_DATAMODULE_CACHE``, else ``$XDG_CACHE_HOME`` or
            ``~/.cache``, then ``xr_datamodule/statistics``), ``False``, or a folder.
    """
    if setting is False:
        return None
    if setting is not True:
        return Path(setting).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "xr_datamodule" / "statistics"


def statistics_key(
    data: Any,
    source: xr.Dataset,
    names: Sequence[str],
    window_dims: Sequence[str],
    bounds: Mapping[str, tuple[int, int]],
    described: Mapping[str, Any],
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """What determines the statistics, as JSON-able values; None for an in-memory Dataset.

    Args:
        data: What the user gave as ``data`` (a path, glob or URL).
        source: The opened (and selected) source.
        names: The variables described.
        window_dims: The dims reduced over.
        bounds: The region's positions per windowed dim.
        described: The rest of the key (methods, NaN policy, ``select``, sampling).
        storage_options: For a URL: how to reach it (its metadata is read through fsspec).
    """
    if isinstance(data, xr.Dataset):
        return None
    location = os.fspath(data)
    return {
        "format": FORMAT,
        "source": location if "://" in location else os.path.abspath(location),
        "files": _files_of(location, storage_options or {}),
        "schema": _schema_digest(source, names, window_dims),
        "variables": list(names),
        "window_dims": list(window_dims),
        "bounds": {dim: [int(lo), int(hi)] for dim, (lo, hi) in bounds.items()},
        **{name: _jsonable(value) for name, value in described.items()},
    }


def load_cached(key: Mapping[str, Any], folder: Path | str) -> tuple[dict, Path] | None:
    """The statistics stored under ``key`` and their file, or None (absent or not trusted)."""
    path = _path_of(key, folder)
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
        if stored["key"] != json.loads(json.dumps(key)):
            raise ValueError("its key differs from the one asked for")
        return stored["statistics"], path
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning(
            "statistics cache %s could not be used (%s: %s); computing them again",
            path,
            type(error).__name__,
            error,
        )
        return None


def store_cached(key: Mapping[str, Any], statistics: Mapping[str, Any], folder: Path | str) -> Path:
    """Write the statistics under ``key`` (atomically: a reader never sees half a file)."""
    path = _path_of(key, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"key": key, "statistics": statistics}, indent=1)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_statistics(datamodule: Any, path: str | os.PathLike) -> Path:
    """Write a datamodule's statistics to the JSON file that ``stats=`` takes.

    Computes them if need be (or loads them from the cache), on the dask scheduler in
    effect: a ``distributed.Client`` created before spreads the pass over its cluster.

    Args:
        datamodule: An :class:`~xr_datamodule.XarrayDataModule` (with ``normalize``).
        path: The file to write (its folder is made).

    Example (not run)::

        dm = XarrayDataModule("era5.zarr", ["t2m"], {"time": 1}, normalize="zscore")
        write_statistics(dm, "era5_stats.json")  # later: XarrayDataModule(..., stats=path)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(datamodule.statistics.to_dict(), indent=1) + "\n")
    return target


def _path_of(key: Mapping[str, Any], folder: Path | str) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return Path(folder) / f"{digest[:32]}.json"


def _files_of(location: str, storage_options: Mapping[str, Any]) -> dict[str, Any]:
    """Size, modification time (and for metadata, a digest) of the files the source is."""
    if "://" in location:
        return _remote_metadata(location, storage_options)
    paths = sorted(glob.glob(location)) if glob.has_magic(location) else [location]
    files: dict[str, Any] = {}
    for path in paths:
        if os.path.isdir(path):
            files.update(_store_metadata(path))
        elif os.path.exists(path):
            stat = os.stat(path)
            files[os.path.abspath(path)] = [stat.st_size, stat.st_mtime_ns]
    return files


def _store_metadata(store: str) -> dict[str, Any]:
    """A local zarr store's metadata documents: the root's and each array's (not chunks)."""
    found: dict[str, Any] = {}
    arrays = (entry.path for entry in os.scandir(store) if entry.is_dir(follow_symlinks=False))
    folders = [store, *sorted(arrays)]
    for folder in folders:
        for name in METADATA_NAMES:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                stat = os.stat(path)
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                found[os.path.relpath(path, store)] = [stat.st_size, stat.st_mtime_ns, digest]
    return found


def _remote_metadata(url: str, storage_options: Mapping[str, Any]) -> dict[str, Any]:
    """A remote store's root metadata documents (digest and what the server says of them)."""
    import fsspec

    found: dict[str, Any] = {}
    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        for name in METADATA_NAMES:
            path = f"{root.rstrip('/')}/{name}"
            if fs.exists(path):
                info = fs.info(path)
                stamp = info.get("LastModified") or info.get("mtime") or info.get("ETag")
                digest = hashlib.sha256(fs.cat_file(path)).hexdigest()
                found[name] = [info.get("size"), str(stamp), digest]
    except Exception as error:  # the schema digest still keys the source
        logger.info("statistics cache: metadata of %s not read (%s)", url, error)
    return found


def _schema_digest(source: xr.Dataset, names: Sequence[str], window_dims: Sequence[str]) -> str:
    """A digest of the variables' shapes, dtypes, chunks and attrs and the windowed labels."""
    digest = hashlib.sha256()
    for name in names:
        var = source[name]
        digest.update(
            repr((name, var.dims, var.shape, str(var.dtype), var.chunks, var.attrs)).encode()
        )
        digest.update(repr(sorted(map(str, var.encoding.items()))).encode())
    for dim in window_dims:
        if dim in source.coords:
            digest.update(np.ascontiguousarray(source[dim].values).tobytes())
        digest.update(repr((dim, source.sizes[dim])).encode())
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    """A key component as JSON: mappings and lists kept, anything else by its repr."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
