"""From xbatcher: an existing ``BatchGenerator``'s windows as the datamodule's arguments.

xbatcher windows ``input_dims`` with stride ``input_dims - input_overlap`` from position 0,
full windows only; every dim *not* in ``input_dims`` is a sample dim: each of its positions is
one ML sample (xbatcher stacks them into ``sample``). The datamodule folds non-windowed dims
into channels instead, so :func:`xbatcher_arguments` windows each sample dim with length 1:
every sample is then one (window, sample position) pair, exactly xbatcher's. ``batch_dims``
and ``concat_input_dims`` only group samples into batches; the batch size is taken from them.
What the datamodule cannot honour (xbatcher's batch cache and its preprocessing) is refused.

xbatcher is not imported here: the generator is read through its public attributes.

Example:
    >>> import numpy as np, xarray as xr
    >>> ds = xr.Dataset({"t": (("time", "lat", "lon"), np.zeros((10, 8, 8)))})
    >>> class Generator:  # what xbatcher.BatchGenerator(ds, {"lat": 4, "lon": 4}) holds
    ...     ds, input_dims, input_overlap, batch_dims = ds, {"lat": 4, "lon": 4}, {}, {}
    ...     concat_input_dims, preload_batch, cache, cache_preprocess = False, True, None, None
    >>> arguments = xbatcher_arguments(Generator())
    >>> arguments["input_dims"], arguments["batch_size"]
    ({'time': 1, 'lat': 4, 'lon': 4}, 10)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import xarray as xr

__all__ = ["xbatcher_arguments"]

# What a BatchGenerator holds that from_xbatcher reads (all public attributes of xbatcher 0.4).
GENERATOR_ATTRIBUTES = ("ds", "input_dims", "input_overlap", "batch_dims", "concat_input_dims")
# Arguments the generator decides; given again they would contradict it.
FROM_GENERATOR = ("data", "input_dims", "input_overlap")


def xbatcher_arguments(generator: Any, target: Any = None, **options: Any) -> dict[str, Any]:
    """The :class:`~xr_datamodule.XarrayDataModule` arguments for a ``BatchGenerator``.

    Args:
        generator: An ``xbatcher.BatchGenerator`` over the inputs.
        target: What ``y`` holds: ``None`` (the inputs, as an autoencoder's), variable names,
            or a second ``BatchGenerator`` with the same windows (xbatcher's ``y_generator``).
        **options: Any other datamodule argument (``splits``, ``batch_size``,
            ``num_workers``, ``normalize``, ...); they take precedence over the generator's
            batch size. ``input_vars`` picks among the generator's variables.

    Raises:
        TypeError: ``generator`` or ``target`` is not a BatchGenerator; an argument the
            generator decides is given again.
        ValueError: The generator caches or preprocesses batches, or the target generator
            has other windows or data.
    """
    _check_generator(generator, "generator")
    repeated = [name for name in FROM_GENERATOR if name in options]
    if repeated:
        raise TypeError(
            f"from_xbatcher: {', '.join(repeated)} come(s) from the generator; build the "
            "generator with the values you want, or call XarrayDataModule(...) directly"
        )
    ds = _as_dataset(generator.ds)
    input_dims = dict(generator.input_dims)
    sample_dims = [str(dim) for dim in ds.dims if dim not in input_dims]
    arguments: dict[str, Any] = {
        "input_vars": [str(name) for name in ds.data_vars],
        "input_dims": {**{dim: 1 for dim in sample_dims}, **input_dims},
        "input_overlap": {dim: n for dim, n in dict(generator.input_overlap).items() if n},
        "batch_size": samples_per_batch(generator, ds),
    }
    if target is not None:
        ds, arguments["target_vars"] = _with_target(ds, generator, target)
    _check_sample_dims(ds, sample_dims)
    return {"data": ds, **arguments, **options}


def samples_per_batch(generator: Any, ds: xr.Dataset) -> int:
    """How many samples (window and sample position) one of the generator's batches holds.

    Without ``concat_input_dims`` a batch is one window and, along each sample dim, its
    ``batch_dims`` length (else the whole dim); with it, the windows that fit the
    ``batch_dims`` length along each input dim (else all of them) are concatenated too.
    """
    input_dims = dict(generator.input_dims)
    overlap = dict(generator.input_overlap)
    batch_dims = dict(generator.batch_dims)
    samples = math.prod(
        min(batch_dims.get(dim, size), size)
        for dim, size in ds.sizes.items()
        if dim not in input_dims
    )
    if not generator.concat_input_dims:
        return max(1, samples)
    for dim, window in input_dims.items():
        stride = window - overlap.get(dim, 0)
        windows = (ds.sizes[dim] - window) // stride + 1
        if dim in batch_dims:
            windows = min(windows, math.ceil(batch_dims[dim] / stride))
        samples *= windows
    return max(1, samples)


def _check_generator(generator: Any, role: str) -> None:
    missing = [name for name in GENERATOR_ATTRIBUTES if not hasattr(generator, name)]
    if missing:
        raise TypeError(
            f"from_xbatcher: {role} must be an xbatcher.BatchGenerator; got "
            f"{type(generator).__name__}, which has no {', '.join(missing)}"
        )
    if getattr(generator, "cache", None) is not None:
        raise ValueError(
            f"from_xbatcher: the {role} caches batches (cache={generator.cache!r}); the "
            "datamodule reads windows straight from the data and has no batch cache: build "
            "the generator without cache="
        )
    if getattr(generator, "cache_preprocess", None) is not None:
        raise ValueError(
            f"from_xbatcher: the {role} preprocesses batches (cache_preprocess="
            f"{generator.cache_preprocess!r}), which the datamodule would not do: pass the "
            "function as transform= (with transform_on='batch' for whole batches) instead"
        )


def _check_sample_dims(ds: xr.Dataset, sample_dims: Sequence[str]) -> None:
    """Each variable has every sample dim (a static field may lack ``time`` only)."""
    for name, variable in ds.data_vars.items():
        missing = [dim for dim in sample_dims if dim not in variable.dims and dim != "time"]
        if missing:
            dim = missing[0]
            raise ValueError(
                f"from_xbatcher: variable {name!r} has no {dim!r}, a dim whose positions "
                f"xbatcher makes samples of (it repeats {name!r} at each one); give it the "
                f"dim (ds[{name!r}].expand_dims({dim}=ds.{dim})) or leave it out of the "
                "generator's data"
            )


def _as_dataset(data: xr.Dataset | xr.DataArray) -> xr.Dataset:
    if isinstance(data, xr.DataArray):
        return data.to_dataset(name=data.name if data.name is not None else "data")
    if not isinstance(data, xr.Dataset):
        raise TypeError(
            f"from_xbatcher: the generator's ds is a {type(data).__name__}; xbatcher "
            "generators hold an xr.Dataset or xr.DataArray"
        )
    return data


def _with_target(ds: xr.Dataset, generator: Any, target: Any) -> tuple[xr.Dataset, list[str]]:
    """The data with the target's variables in it, and the target's variable names."""
    if isinstance(target, str):
        return ds, [target]
    if isinstance(target, Sequence):
        return ds, [str(name) for name in target]
    _check_generator(target, "target generator")
    for name in ("input_dims", "input_overlap"):
        ours, theirs = _nonzero(getattr(generator, name)), _nonzero(getattr(target, name))
        if ours != theirs:
            raise ValueError(
                f"from_xbatcher: the target generator's {name} {theirs} differ from the "
                f"inputs' {ours}; targets of another window size or position are "
                "target_dims= and target_offset= of XarrayDataModule(...)"
            )
    target_ds = _as_dataset(target.ds)
    dims, target_dims = sorted(map(str, ds.dims)), sorted(map(str, target_ds.dims))
    if dims != target_dims:
        raise ValueError(
            f"from_xbatcher: the target generator's data have dims {target_dims}, the "
            f"inputs' {dims}: xbatcher would pair batches of different samples; to fold a target's "
            "extra dim into channels, give its data to the inputs' generator and name it in "
            "target="
        )
    new = [name for name in target_ds.data_vars if name not in ds.data_vars]
    try:
        merged = xr.merge([ds, target_ds[new]], join="exact", compat="override")
    except ValueError as error:
        raise ValueError(
            "from_xbatcher: the target generator's data are not on the inputs' coordinates "
            f"({error}); both generators must window the same dataset"
        ) from error
    merged.attrs = ds.attrs
    return merged, [str(name) for name in target_ds.data_vars]


def _nonzero(sizes: Mapping[Any, int]) -> dict[Any, int]:
    return {dim: n for dim, n in dict(sizes).items() if n}
