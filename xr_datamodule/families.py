"""The stages of one grid family: its spec, layout, geometry, statistics and reader.

A family (:mod:`~xr_datamodule.grids`) is read like the primary grid, with the same stage
functions on a spec of its own (its variables, its dims, the window in its own cells): in
memory or cell by cell with the fastest decoder for its store, normalised per variable
with statistics over the training split's span on its grid. What it does not have is a
sample index: its windows follow the primary one (:class:`~xr_datamodule.familyread.GridRead`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from xr_datamodule.cells import CellGrid, cell_grid
from xr_datamodule.familyread import GridRead
from xr_datamodule.gather import Preparation, WindowReader
from xr_datamodule.grids import GridFamily, family_spec
from xr_datamodule.layout import source_layout
from xr_datamodule.normalize import Normalisation, Statistics, normalisation_of
from xr_datamodule.reading import read_by_cell, read_in_memory
from xr_datamodule.resources import Backend, choose_decoder, choose_resources
from xr_datamodule.spec import DataSpec
from xr_datamodule.windows import SampleIndex, WindowGeometry

__all__ = ["FamilyStages", "family_reads", "merged_statistics"]


class FamilyStages:
    """One grid family read beside the primary grid.

    Args:
        family: The family.
        spec: The user's whole spec.
        source: The opened source.
        primary: The primary window geometry.
    """

    def __init__(
        self, family: GridFamily, spec: DataSpec, source: xr.Dataset, primary: WindowGeometry
    ) -> None:
        self.family = family
        self.geometry = family.geometry(primary)
        self.spec: DataSpec = family_spec(spec, family, primary)  # type: ignore[assignment]
        self.layout = source_layout(self.spec, source)
        self.primary_dims = primary.dims
        self.normalisation: Normalisation | None = None
        self.backend: Backend | None = None
        self._reader: WindowReader | None = None

    def statistics_over(self, train: Mapping[str, tuple[int, int]] | None) -> Normalisation:
        """Its statistics: given, restored, or computed over ``train`` (primary positions)."""
        if self.normalisation is None:
            bounds = None if train is None else self.family.bounds(train)
            self.normalisation = normalisation_of(
                self.spec, self.layout.source, self.layout.window_dims, bounds
            )
        return self.normalisation

    def restore(self, statistics: dict[str, Any]) -> None:
        """Use a checkpoint's statistics (the reader is built anew)."""
        given = Statistics.from_dict(statistics)
        self.normalisation = Normalisation(self.spec, given, "checkpoint")
        self.close()
        self._reader = None

    def reader(
        self,
        train: Mapping[str, tuple[int, int]] | None,
        cache_cells: Callable[[int, int], int],
        threads: int,
        primary_cells: CellGrid | None = None,
    ) -> WindowReader:
        """Its reader (built once): in memory when it fits, else by cell.

        Args:
            train: The training split's primary bounds (for statistics).
            cache_cells: Cells to cache, from (cells a sample touches, bytes per cell).
            threads: Decode threads out of core.
            primary_cells: The primary grid's cells out of core: along a shared first dim
                (time) its cells are cut alike, so the chunk-aware order walks both.
        """
        if self._reader is None:
            self._reader = self._build(train, cache_cells, threads, primary_cells)
        return self._reader

    def _build(
        self,
        train: Mapping[str, tuple[int, int]] | None,
        cache_cells: Callable[[int, int], int],
        threads: int,
        primary_cells: CellGrid | None,
    ) -> WindowReader:
        spec, layout = self.spec, self.layout
        normalised = spec.normalize is not None
        affine = self.statistics_over(train).affine(layout.reader_vars) if normalised else None
        prepare = Preparation(
            affine=affine,
            fill_value=spec.fill_value if spec.nan_policy == "fill" else None,
            find_nan=spec.nan_policy == "check",
        )
        resources = choose_resources(spec, layout)
        if resources.loads_into_memory:
            return read_in_memory(spec, layout, prepare)
        names = layout.reader_vars
        shared = primary_cells is not None and layout.window_dims[0] == self.primary_dims[0]
        cells = cell_grid(
            layout.source,
            names,
            layout.window_dims,
            self.geometry.extent,
            layout.n_channels(names),
            spec.array_dtype.itemsize,
            primary_cells.edges[0] if shared else None,  # type: ignore[union-attr]
        )
        self.backend = choose_decoder(spec, layout, resources)
        cache = cache_cells(cells.cells_per_sample, cells.cell_bytes)
        return read_by_cell(spec, layout, prepare, cells, cache, threads, self.backend.decoder)

    def reads(self, reader: WindowReader, series_as: str, first_channel: int) -> list[GridRead]:
        """Its :class:`GridRead` per side: ``y``, ``x_<name>``, or channels of ``X``."""
        family, layout = self.family, self.layout
        common = dict(
            family=family,
            primary_dims=self.primary_dims,
            reader=reader,
            geometry=self.geometry,
            labels=layout.window_labels,
        )
        out = []
        if family.input_vars:
            channels = reader.channels_of(family.input_vars)
            if family.is_series and series_as == "channels":
                out.append(GridRead("x", channels=channels, into=first_channel, **common))
            else:
                out.append(GridRead(f"x_{family.name}", channels=channels, **common))
        if family.target_vars:
            channels = reader.channels_of(family.target_vars)
            out.append(GridRead("y", channels=channels, target=True, **common))
        return out

    def mapped(
        self, index: SampleIndex, bounds: Mapping[str, tuple[int, int]]
    ) -> tuple[SampleIndex, WindowGeometry, dict[str, tuple[int, int]]]:
        """A primary split's index and bounds in the family's cells (to put ``y`` back)."""
        family = self.family
        if family.is_series:
            raise ValueError(
                f"targets {family.target_vars} are series (dims {family.dims}): to_xarray puts "
                "predictions back on a grid; pair the predictions with batch['target_time'] "
                "instead"
            )
        axis_starts = tuple(
            a.positions(index.axis_starts[index.dims.index(a.follows)]) for a in family.alignments
        )
        if tuple(a.follows for a in family.alignments) != index.dims:
            raise ValueError(
                f"to_xarray needs the target grid's dims {family.dims} in the order of the "
                f"windowed ones {index.dims}: transpose the variables first"
            )
        own = SampleIndex(family.dims, axis_starts, index.selected)
        return own, self.geometry, family.bounds(bounds)

    def scale(self, values: Any, names: list[str], inverse: bool = False) -> Any:
        """Normalise (or, ``inverse``, denormalise) ``(batch, channel, ...)`` values."""
        if self.spec.normalize is None or self.normalisation is None:
            return values
        return self.normalisation.scale(values, names, inverse)

    def channel_names(self, names: list[str]) -> list[str]:
        """Readable name of each channel of ``names`` (``u[level=200]``)."""
        source = self.layout.source
        return [n for each in self.layout.layouts(names) for n in each.channel_names(source)]

    def n_channels(self, names: list[str]) -> int:
        """Channels of ``names``."""
        return int(np.sum([each.n_channels for each in self.layout.layouts(names)]))

    def close(self) -> None:
        """Stop its reader's threads and free its cache."""
        if self._reader is not None:
            self._reader.close()


def family_reads(
    families: Sequence[FamilyStages],
    train: Mapping[str, tuple[int, int]] | None,
    cache_cells: Callable[[int, int], int],
    threads: int,
    primary_cells: CellGrid | None,
    series_as: str,
    first_channel: int,
) -> list[GridRead]:
    """Every family's reads, their readers built (see :meth:`FamilyStages.reader`).

    ``first_channel``: where in ``X`` the first series repeated as channels goes.
    """
    reads = []
    for stages in families:
        reader = stages.reader(train, cache_cells, threads, primary_cells)
        new = stages.reads(reader, series_as, first_channel)
        first_channel += sum(read.n_channels for read in new if read.into is not None)
        reads += new
    return reads


def merged_statistics(
    primary: Statistics,
    families: Sequence[FamilyStages],
    train: Mapping[str, tuple[int, int]] | None,
) -> Statistics:
    """The primary grid's statistics and every family's, as one :class:`Statistics`."""
    if not families:
        return primary
    merged = primary.to_dict()
    for stages in families:
        for key, values in stages.statistics_over(train).statistics.to_dict().items():
            merged.setdefault(key, {}).update(values)
    return Statistics.from_dict(merged)
