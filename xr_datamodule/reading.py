"""The readers a pipeline builds: the read variables in memory or by cell, and extra channels.

Functions of the stages before them (spec, layout, cell grid, resources, backend), so that
every setting a reader takes is decided before it exists; the reader classes themselves are
in :mod:`~xr_datamodule.gather`, the static fields and forcings in
:mod:`~xr_datamodule.extras`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np

from xr_datamodule.cells import CellGrid
from xr_datamodule.decode import CellDecoder
from xr_datamodule.extras import ExtraChannels
from xr_datamodule.gather import ChunkedReader, InMemoryReader, Preparation
from xr_datamodule.layout import SourceLayout
from xr_datamodule.sources import is_remote, open_selected
from xr_datamodule.spec import DataSpec

__all__ = ["extra_channels", "read_by_cell", "read_in_memory"]


def read_in_memory(spec: DataSpec, layout: SourceLayout, prepare: Preparation) -> InMemoryReader:
    """The read variables stacked once in memory (shared by every split)."""
    names, dims = layout.reader_vars, layout.window_dims
    return InMemoryReader(
        layout.source, names, dims, spec.array_dtype, prepare, origin=layout.origin
    )


def read_by_cell(
    spec: DataSpec,
    layout: SourceLayout,
    prepare: Preparation,
    cells: CellGrid,
    cache_cells: int,
    decode_threads: int,
    decoder: CellDecoder | None,
    prefetch_batches: int = 1,
    whole_batches: bool = False,
) -> ChunkedReader:
    """The read variables decoded cell by cell into an arena of ``cache_cells`` slots.

    ``prefetch_batches``: batches whose cells may be fetched at once in the background.
    ``whole_batches``: its datasets read each next batch whole in the background instead
    (:mod:`xr_datamodule.ahead`).
    """
    reader = ChunkedReader(
        layout.source,
        layout.reader_vars,
        layout.window_dims,
        spec.array_dtype,
        cells,
        cache_cells=cache_cells,
        prepare=prepare,
        decode_threads=decode_threads,
        decoder=decoder,
        origin=layout.origin,
        prefetch_batches=prefetch_batches,
    )
    reader.whole_batches = whole_batches
    if is_remote(spec.data):  # each DataLoader worker opens the store anew
        reader.reopen = partial(open_selected, spec.data, spec.open_kwargs, spec.select)
    return reader


def extra_channels(
    spec: DataSpec,
    layout: SourceLayout,
    statics: Sequence[str],
    forcings: Sequence[str],
    affine: tuple[np.ndarray, np.ndarray] | None,
) -> ExtraChannels | None:
    """Static fields and forcings of one side, checked for missing values; None if none."""
    if not statics and not forcings:
        return None
    extras = ExtraChannels(
        layout.source,
        layout.window_dims,
        list(statics),
        layout.static_dim,
        forcings,
        spec.array_dtype,
        affine=affine,
        coordinates=spec.coordinates,
    )
    if spec.nan_policy in ("check", "error"):
        extras.fail_on_nan(layout.source)
    return extras
