"""DataSpec: the datamodule's arguments, validated once, with their defaults.

Everything a user configures (in Python, YAML or on the command line) is checked here, before
any data is opened, with an error that names the argument and the valid choices. What needs
the data to be checked (variable names, window sizes against dims, splits against labels) is
checked by :class:`~xr_datamodule.pipeline.DataPipeline` when it opens the source.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from xr_datamodule.estimate import check_sample
from xr_datamodule.forcings import check_forcing_names
from xr_datamodule.grids import SERIES_AS
from xr_datamodule.missing import NAN_POLICIES
from xr_datamodule.normalize import METHODS
from xr_datamodule.sources import check_source_exists
from xr_datamodule.splits import DEFAULT_SPLITS, check_splits
from xr_datamodule.timeaxis import GAP_POLICIES
from xr_datamodule.transforms import TRANSFORM_ON

__all__ = ["DataSpec", "hyperparameters", "plain"]

DTYPES = ("float16", "float32", "float64")
STYLES = ("map", "iterable")
BATCH_FORMATS = ("tuple", "dict")
SHUFFLES = ("auto", "chunks", "full")
NORMALIZATIONS = (None, *METHODS)
NORMALIZE_ON = ("gather", "device")
LOAD_CHOICES = ("auto", True, False)
CONTEXTS = (None, "fork", "spawn", "forkserver")
STAGE_SPLITS = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("predict",),
}


def _positive_int(value: Any, what: str, minimum: int = 1, what_else: str = "") -> int:
    number = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not number or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        kind = f"{kind} {what_else}" if what_else else kind
        raise (TypeError if not number else ValueError)(f"{what} must be {kind}, got {value!r}")
    return int(value)


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be True or False, got {value!r}")
    return bool(value)


def _int_mapping(mapping: Any, what: str, minimum: int | None) -> dict[str, int]:
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{what} must be a mapping of dim name to integer, got {mapping!r}")
    out = {}
    for dim, value in mapping.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{what}[{dim!r}] must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            kind = "positive" if minimum == 1 else f">= {minimum}"
            raise ValueError(f"{what}[{dim!r}] must be {kind}, got {value}")
        out[str(dim)] = int(value)
    return out


def _check_keys(mapping: Mapping[str, int], valid: Mapping[str, int], what: str) -> None:
    for dim in mapping:
        if dim not in valid:
            raise KeyError(f"{what}: dim {dim!r} is not in input_dims. Valid: {tuple(valid)}")


def _names(names: Any, what: str) -> list[str]:
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        raise TypeError(f"{what} must be a list of variable names, got {names!r}")
    return list(names)


def _refuse_lead_time_lists(offsets: Any, target_dims: Mapping[str, int]) -> None:
    """Several target offsets along a dim: say how to get them with one target window."""
    if not isinstance(offsets, Mapping):
        return
    for dim, value in offsets.items():
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
            first, last = min(value), max(value)
            length = target_dims.get(dim, 1)
            steps = sorted({v - first + k for v in value for k in range(length)})
            raise TypeError(
                f"target_offset[{dim!r}] must be one integer, got {list(value)}: for lead times "
                f"that are not consecutive, take one target window that spans them, "
                f"target_offset={{{dim!r}: {first}}} and target_dims={{{dim!r}: "
                f"{last - first + length}}}, and keep positions {steps} of y's {dim!r} axis "
                "in the model or the loss"
            )


def _forcing_names(forcings: Any) -> list[str]:
    if forcings is None:
        return []
    if not isinstance(forcings, (list, tuple)) or not all(isinstance(n, str) for n in forcings):
        raise TypeError(f"forcings must be a list of forcing names, got {forcings!r}")
    check_forcing_names(forcings)
    return list(forcings)


def _selection(select: Any) -> dict[str, Any]:
    """What ``Dataset.sel`` takes, per dim: a label, a list of labels, or a range.

    A range is a ``slice`` (Python) or ``{"start": a, "stop": b}`` (YAML), inclusive as in
    ``.sel``, descending for a descending coordinate; a single label keeps its dim, as size 1
    (``{"level": 500}`` is ``{"level": [500]}``), so channel names still say ``level=500``.
    """
    if select is None:
        return {}
    if not isinstance(select, Mapping):
        raise TypeError(f"select must be a mapping of dim to labels, got {select!r}")
    out: dict[str, Any] = {}
    for dim, labels in select.items():
        if isinstance(labels, Mapping):
            unknown = set(labels) - {"start", "stop"}
            if unknown:
                raise ValueError(
                    f"select[{dim!r}]: a range has the keys 'start' and 'stop', "
                    f"got {sorted(unknown)}"
                )
            labels = slice(labels.get("start"), labels.get("stop"))
        if isinstance(labels, slice):
            if labels.step is not None:
                raise ValueError(
                    f"select[{dim!r}]: a range takes no step, got {labels!r}; select every "
                    "k-th label with a list, or window with a stride instead"
                )
            out[str(dim)] = labels
        elif isinstance(labels, (list, tuple, np.ndarray)) and len(labels):
            out[str(dim)] = list(labels)
        elif isinstance(labels, (str, int, float, np.generic, np.datetime64)) and not isinstance(
            labels, bool
        ):
            out[str(dim)] = [labels]  # one label: the dim stays, as size 1
        else:
            raise TypeError(
                f"select[{dim!r}] must be a label, a non-empty list of labels, a slice or "
                f"{{'start': ..., 'stop': ...}}, got {labels!r}"
            )
    return out


def _normalization(value: Any) -> str | dict[str, str] | None:
    """``None``, one method for all variables, or ``{variable: method, "default": method}``."""
    if value is None or (isinstance(value, str) and value in METHODS):
        return value
    if isinstance(value, Mapping):
        for name, method in value.items():
            if method not in METHODS:
                raise ValueError(
                    f"normalize[{name!r}]: unknown method {method!r}. Valid: {METHODS}"
                )
        return {str(name): str(method) for name, method in value.items()}
    raise ValueError(
        f"normalize must be one of {NORMALIZATIONS} or a mapping of variable to method "
        f"(with an optional 'default'), got {value!r}"
    )


WEIGHT_STATISTICS = tuple(
    f"{side}_{stat}" for side in ("input", "target") for stat in ("max", "min", "mean")
)


def _weights_setting(value: Any) -> Any:
    """Check ``sample_weights``: None, a callable, or ``{"by", "quantile"|"above", "boost"}``."""
    if value is None or callable(value):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(
            "sample_weights must be a mapping such as {'by': 'target_max', 'quantile': 0.99, "
            f"'boost': 10}} or a callable of the window statistics, got {value!r}"
        )
    unknown = set(value) - {"by", "quantile", "above", "boost"}
    if unknown:
        raise ValueError(
            f"sample_weights: unknown keys {sorted(unknown)}. Valid: by, quantile, above, boost"
        )
    _choice(value.get("by"), WEIGHT_STATISTICS, "sample_weights['by']")
    if ("quantile" in value) == ("above" in value):
        raise ValueError("sample_weights needs exactly one of 'quantile' and 'above'")
    for key in ("quantile", "above", "boost"):
        if key in value and (
            isinstance(value[key], bool) or not isinstance(value[key], (int, float))
        ):
            raise TypeError(f"sample_weights[{key!r}] must be a number, got {value[key]!r}")
    if "quantile" in value and not 0 <= value["quantile"] <= 1:
        raise ValueError(f"sample_weights['quantile'] must be in [0, 1], got {value['quantile']}")
    boost = value.get("boost", 10.0)
    if not boost > 0 or not np.isfinite(boost):
        raise ValueError(f"sample_weights['boost'] must be positive, got {boost}")
    return {**value, "boost": float(boost)}


def _sampler_setting(value: Any) -> Any:
    """Check ``sampler``: None, a class, its path, ``{"class_path", "init_args"}``, a callable."""
    if value is None or callable(value):
        return value
    if isinstance(value, str):
        return {"class_path": value, "init_args": {}}
    if isinstance(value, Mapping) and "class_path" in value:
        unknown = set(value) - {"class_path", "init_args"}
        if unknown or not isinstance(value.get("init_args", {}), Mapping):
            raise ValueError(
                "sampler: a mapping has 'class_path' and an optional 'init_args' mapping, "
                f"got {dict(value)!r}"
            )
        init_args = dict(value.get("init_args") or {})
        return {"class_path": str(value["class_path"]), "init_args": init_args}
    raise TypeError(
        "sampler must be a torch Sampler class, its import path, {'class_path': ..., "
        f"'init_args': {{...}}}} or a callable f(index, rng), got {value!r}"
    )


def _time_step(value: Any) -> Any:
    """``None``, one step (``"6h"``, ``"1D"``, ``"1M"``, a number) or ``{dim: step}``."""
    scalar = isinstance(value, (str, int, float, np.number)) and not isinstance(value, bool)
    if value is None or scalar:
        return value
    if isinstance(value, Mapping):
        for dim, step in value.items():
            if isinstance(step, bool) or not isinstance(step, (str, int, float, np.number)):
                raise TypeError(
                    f"time_step[{dim!r}] must be a duration such as '6h' or a number, got {step!r}"
                )
        return {str(dim): step for dim, step in value.items()}
    raise TypeError(
        "time_step must be a duration such as '6h', '1D' or '1M', a number, or a mapping of "
        f"dim to step, got {value!r}"
    )


def _choice(value: Any, choices: tuple, what: str) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {choices}, got {value!r}")


@dataclass
class DataSpec:
    """What to read and how to serve it: :class:`~xr_datamodule.XarrayDataModule`'s arguments.

    The fields and their meaning are those of the datamodule's constructor (see its
    docstring); constructing a spec validates them and fills in the defaults that do not need
    the data (``target_vars`` from ``input_vars``, ``target_dims`` from ``input_dims``, the
    default splits, ``normalize="zscore"`` when ``stats`` are given).

    Example:
        >>> spec = DataSpec("synthetic://weather", input_vars=["t2m"],
        ...                 input_dims={"time": 2, "lat": 32, "lon": 32})
        >>> spec.target_vars, spec.target_dims["lat"], spec.array_dtype
        (['t2m'], 32, dtype('float32'))
        >>> DataSpec("synthetic://weather", ["t2m"], {"time": 2}, batch_size=0)
        Traceback (most recent call last):
        ...
        ValueError: batch_size must be a positive integer, got 0
    """

    data: str | os.PathLike | xr.Dataset
    input_vars: list[str]
    input_dims: dict[str, int]
    target_vars: list[str] | None = None
    input_overlap: dict[str, int] | None = None
    target_dims: dict[str, int] | None = None
    target_offset: dict[str, int] | None = None
    splits: dict[str, Any] | None = None
    split_dim: str | None = None
    batch_size: int = 32
    seed: int = 0
    num_workers: int | str = "auto"
    pin_memory: bool | None = None
    persistent_workers: bool | None = None
    prefetch_factor: int | None = None
    multiprocessing_context: str | None = None
    drop_last: bool = False
    load: bool | str = "auto"
    shuffle_chunks: int | str = "auto"
    style: str = "map"
    dtype: str = "float32"
    transform: Callable[[xr.Dataset], xr.Dataset] | None = field(default=None, repr=False)
    target_transform: Callable[[xr.Dataset], xr.Dataset] | None = field(default=None, repr=False)
    open_kwargs: dict[str, Any] | None = None
    normalize: str | dict[str, str] | None = None
    normalize_on: str = "gather"
    stats: dict[str, Any] | str | None = None
    stats_cache: bool | str = True
    stats_sample: dict[str, Any] | None = None
    nan_policy: str | None = "check"
    fill_value: float = 0.0
    nan_mask: bool = False
    shuffle: str = "auto"
    transform_on: str = "sample"
    forcings: list[str] | None = None
    select: dict[str, Any] | None = None
    batch_format: str = "tuple"
    sampler: Any = field(default=None, repr=False)
    sample_weights: Any = field(default=None, repr=False)
    replacement: bool = True
    samples_per_epoch: int | None = None
    random_offsets: bool = False
    gaps: str = "drop"
    time_step: Any = None
    mask: str | None = None
    strict_store: bool = False
    align_dims: dict[str, str] | None = None
    coordinates: dict[str, str] | None = None
    series_as: str = "vector"

    def __post_init__(self) -> None:
        check_source_exists(self.data)
        self._windows()
        self._loading()
        self._values()
        self._sampling()

    def _windows(self) -> None:
        self.input_vars = _names(self.input_vars, "input_vars")
        self.target_vars = _names(
            self.input_vars if self.target_vars is None else self.target_vars, "target_vars"
        )
        self.input_dims = _int_mapping(self.input_dims, "input_dims", minimum=1)
        if not self.input_dims:
            raise ValueError("input_dims must give a window length for at least one dim")
        self.input_overlap = _int_mapping(self.input_overlap, "input_overlap", minimum=0)
        _check_keys(self.input_overlap, self.input_dims, "input_overlap")
        for dim, overlap in self.input_overlap.items():
            if overlap >= self.input_dims[dim]:
                raise ValueError(
                    f"input_overlap[{dim!r}] = {overlap} must be smaller than the window "
                    f"input_dims[{dim!r}] = {self.input_dims[dim]}"
                )
        self.target_dims = _int_mapping(self.target_dims, "target_dims", minimum=1) or dict(
            self.input_dims
        )
        if set(self.target_dims) != set(self.input_dims):
            raise KeyError(
                f"target_dims must have the same dims as input_dims {tuple(self.input_dims)}, "
                f"got {tuple(self.target_dims)} (use length 1 for a dim the target does not span)"
            )
        _refuse_lead_time_lists(self.target_offset, self.target_dims)
        self.target_offset = _int_mapping(self.target_offset, "target_offset", minimum=None)
        _check_keys(self.target_offset, self.input_dims, "target_offset")
        if self.split_dim is not None and not isinstance(self.split_dim, str):
            raise TypeError(f"split_dim must be a dim name or None, got {self.split_dim!r}")
        if self.splits is not None and not isinstance(self.splits, Mapping):
            raise TypeError(
                "splits must be a mapping of split name to a fraction, a (start, stop) label "
                f"range or {{dim: [lo, hi]}} positions, got {self.splits!r}"
            )
        self.splits = dict(DEFAULT_SPLITS if self.splits is None else self.splits)
        check_splits(self.splits)

    def _loading(self) -> None:
        self.batch_size = _positive_int(self.batch_size, "batch_size")
        self.seed = _positive_int(self.seed, "seed", minimum=0)
        if self.num_workers != "auto":
            _positive_int(self.num_workers, "num_workers", minimum=0, what_else="or 'auto'")
        if self.prefetch_factor is not None:
            _positive_int(self.prefetch_factor, "prefetch_factor")
            if self.num_workers == 0:
                raise ValueError("prefetch_factor needs num_workers > 0 (workers prefetch)")
        if self.multiprocessing_context not in CONTEXTS:
            raise ValueError(
                f"multiprocessing_context must be one of {CONTEXTS[1:]}, "
                f"got {self.multiprocessing_context!r}"
            )
        self.drop_last = _flag(self.drop_last, "drop_last")
        _choice(self.style, STYLES, "style")
        if self.style == "iterable" and self.persistent_workers:
            raise ValueError(
                "style='iterable' needs persistent_workers=False: each epoch starts workers "
                "that see the new epoch"
            )
        if not (self.load == "auto" or isinstance(self.load, bool)):
            raise ValueError(f"load must be one of {LOAD_CHOICES}, got {self.load!r}")
        if self.shuffle_chunks != "auto":
            _positive_int(self.shuffle_chunks, "shuffle_chunks", what_else="or 'auto'")
        _choice(self.shuffle, SHUFFLES, "shuffle")
        _choice(self.dtype, DTYPES, "dtype")

    def _sampling(self) -> None:
        self.replacement = _flag(self.replacement, "replacement")
        self.random_offsets = _flag(self.random_offsets, "random_offsets")
        if self.samples_per_epoch is not None:
            self.samples_per_epoch = _positive_int(self.samples_per_epoch, "samples_per_epoch")
        self.sample_weights = _weights_setting(self.sample_weights)
        self.sampler = _sampler_setting(self.sampler)
        _choice(self.gaps, GAP_POLICIES, "gaps")
        self.time_step = _time_step(self.time_step)
        if self.random_offsets and self.nan_policy == "drop":
            raise ValueError(
                "random_offsets=True cannot be combined with nan_policy='drop': windows with "
                "NaN are left out on the stride grid, a moved window may hold one; use "
                "nan_policy='fill' (or 'check')"
            )

    def _values(self) -> None:
        self.open_kwargs = dict(self.open_kwargs or {})
        _choice(self.transform_on, TRANSFORM_ON, "transform_on")
        _choice(self.batch_format, BATCH_FORMATS, "batch_format")
        self.forcings = _forcing_names(self.forcings)
        self.select = _selection(self.select)
        if self.forcings and (self.transform or self.target_transform):
            raise ValueError(
                "forcings cannot be combined with a transform yet: compute them inside the "
                "transform instead"
            )
        self.normalize = _normalization(self.normalize)
        _choice(self.normalize_on, NORMALIZE_ON, "normalize_on")
        if self.normalize is not None and (self.transform or self.target_transform):
            raise ValueError(
                "normalize works on the variables' channels; with a transform the channels "
                "are the transform's: normalise inside the transform instead"
            )
        if self.stats is not None and not isinstance(self.stats, (Mapping, str, os.PathLike)):
            raise TypeError(
                f"stats must be a mapping or the path of a JSON file, got {self.stats!r}"
            )
        if self.stats is not None and self.normalize is None:
            self.normalize = "zscore"  # explicit statistics mean: normalise with them
        if not isinstance(self.stats_cache, (bool, str, os.PathLike)):
            raise TypeError(
                f"stats_cache must be True, False or a folder, got {self.stats_cache!r}"
            )
        check_sample(self.stats_sample)
        if self.stats_sample is not None and self.stats is not None:
            raise ValueError("stats_sample estimates statistics; with stats= none are computed")
        self.strict_store = _flag(self.strict_store, "strict_store")
        _choice(self.series_as, SERIES_AS, "series_as")
        if self.align_dims is not None and not (
            isinstance(self.align_dims, Mapping)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in self.align_dims.items())
        ):
            raise TypeError(
                "align_dims must map a dim of another grid to the windowed dim it follows, "
                f"e.g. {{'lat_hr': 'lat'}}, got {self.align_dims!r}"
            )
        self.align_dims = dict(self.align_dims or {})
        if self.coordinates is not None and not (
            isinstance(self.coordinates, Mapping)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in self.coordinates.items())
        ):
            raise TypeError(
                "coordinates must map a role ('lat', 'lon', 'area') to a variable's name, "
                f"e.g. {{'lat': 'nav_lat', 'lon': 'nav_lon'}}, got {self.coordinates!r}"
            )
        if self.coordinates is not None:
            self.coordinates = dict(self.coordinates)
        if self.mask is not None and not isinstance(self.mask, str):
            raise TypeError(f"mask must be the name of a variable or None, got {self.mask!r}")
        _choice(self.nan_policy, NAN_POLICIES, "nan_policy")
        self.nan_policy = self.nan_policy or "check"  # None: the default
        if isinstance(self.fill_value, bool) or not isinstance(
            self.fill_value, (int, float, np.integer, np.floating)
        ):
            raise TypeError(f"fill_value must be a number, got {self.fill_value!r}")
        self.fill_value = float(self.fill_value)
        if self.nan_mask and self.nan_policy != "fill":
            raise ValueError(
                f"nan_mask=True needs nan_policy='fill' (got {self.nan_policy!r}): the mask "
                "marks the values that were filled"
            )
        self.nan_mask = _flag(self.nan_mask, "nan_mask")

    def method_of(self, name: str) -> str:
        """The normalisation method of a variable (``"none"`` without normalisation)."""
        if self.normalize is None:
            return "none"
        if isinstance(self.normalize, str):
            return self.normalize
        return self.normalize.get(name, self.normalize.get("default", "zscore"))

    @property
    def array_dtype(self) -> np.dtype:
        """The numpy dtype of the batches."""
        return np.dtype(self.dtype)

    @property
    def targets(self) -> list[str]:
        """The target variables (``target_vars``; the input variables when not given)."""
        return self.input_vars if self.target_vars is None else self.target_vars

    @property
    def all_vars(self) -> list[str]:
        """Input variables, then the target variables that are not inputs."""
        return self.input_vars + [v for v in self.targets if v not in self.input_vars]


def plain(value: Any) -> Any:
    """A value as the plain types a ``weights_only`` checkpoint holds.

    Paths become strings, dates ISO strings, numpy scalars and arrays Python numbers and
    lists, tuples lists; mappings and lists are converted item by item.

    Example:
        >>> import pandas as pd
        >>> from pathlib import Path
        >>> plain({"data": Path("era5.zarr"), "train": [pd.Timestamp("2020-01-01"), None]})
        {'data': 'era5.zarr', 'train': ['2020-01-01T00:00:00', None]}
    """
    if isinstance(value, Mapping):
        return {str(k) if not isinstance(k, (int, str)) else k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (np.datetime64, datetime.datetime, datetime.date)):
        return pd.Timestamp(value).isoformat()
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, slice):
        return {"start": plain(value.start), "stop": plain(value.stop)}
    return value


def hyperparameters(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments a checkpoint can store, as plain types (``weights_only`` loading).

    Functions (transforms, a callable sampler or weights) and an in-memory ``xr.Dataset``
    are left out: they are given again when the datamodule is rebuilt.
    """
    unsaved = {"transform", "target_transform"}
    unsaved |= {name for name in ("sampler", "sample_weights") if callable(arguments.get(name))}
    if isinstance(arguments.get("data"), xr.Dataset):
        unsaved.add("data")
    return {name: plain(value) for name, value in arguments.items() if name not in unsaved}
