"""Values back from a model: (de)normalised in physical units, and put back on the grid.

:class:`PipelineOutputs` is the part of :class:`~xr_datamodule.pipeline.DataPipeline` that
turns what a model returns into what a scientist verifies: channels denormalised with the
statistics of their grid, predictions of every sample put back on the targets' own grid
(overlapping windows blended, :mod:`xr_datamodule.stitch`), masked where the truth is
missing. It reads the pipeline's stages and builds nothing of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import xarray as xr

from xr_datamodule.stitch import (
    DEFAULT_BLEND,
    is_forecast_layout,
    masked_like,
    put_back,
    truth_at,
)

if TYPE_CHECKING:
    from xr_datamodule.families import FamilyStages
    from xr_datamodule.grids import GridPlan
    from xr_datamodule.layout import SourceLayout
    from xr_datamodule.missing import StaticMask
    from xr_datamodule.normalize import Normalisation
    from xr_datamodule.plan import SamplePlan
    from xr_datamodule.spec import DataSpec
    from xr_datamodule.windows import WindowGeometry

__all__ = ["PipelineOutputs"]


class PipelineOutputs:
    """Denormalisation and :meth:`to_xarray` over a pipeline's stages (a mixin of it)."""

    spec: DataSpec
    grids: GridPlan
    layout: SourceLayout
    geometry: WindowGeometry
    plan: SamplePlan
    families: list[FamilyStages]
    normalisation: Normalisation
    static_mask: StaticMask | None

    def scale(
        self, values: Any, names: Sequence[str], inverse: bool = False, unscaled: int = 0
    ) -> Any:
        """Normalise (or, ``inverse``, denormalise) ``(batch, channel, ...)`` values.

        Identity without normalisation; ``unscaled`` last channels are left as they are.
        """
        if self.spec.normalize is None:
            return values
        for stages in self.families:  # variables of another grid: its statistics
            if names and set(names) <= set(stages.layout.reader_vars):
                stages.statistics_over(self.plan.split_bounds.get("train"))
                return stages.scale(values, list(names), inverse)
        return self.normalisation.scale(values, names, inverse, unscaled)

    @property
    def target_order(self) -> list[str]:
        """The variables of ``y``'s channels, on whichever grid ``y`` lies."""
        holder = self.grids.target_family
        return list(holder.target_vars) if holder is not None else self.layout.target_order

    def scale_batch(self, inputs: Any, targets: Any) -> tuple[Any, Any]:
        """Normalise a batch ``(X, y)`` (``normalize_on="device"``); forcings stay as they are."""
        unscaled = len(self.spec.forcings or []) + self.spec.nan_mask
        x = self.scale(inputs, self.layout.input_order, unscaled=unscaled)
        return x, self.scale(targets, self.layout.target_order)

    def to_xarray(
        self,
        predictions: Sequence[Any],
        split: str = "predict",
        layout: str = "auto",
        blend: str = DEFAULT_BLEND,
        blend_width: float | None = None,
    ) -> xr.Dataset:
        """Predictions of every sample of ``split`` in order, in physical units.

        On the grid (overlapping windows blended, see :mod:`xr_datamodule.stitch`) or, with
        several target steps after the last input step or ``layout="forecast"``, per init and
        lead time. NaN where the target itself was missing, under ``nan_policy`` ``"fill"``
        or ``"keep"``, and outside ``mask``.
        """
        index, source = self.plan.index(split), self.layout.source
        order, time_dim = self.layout.target_order, self.layout.time_dim
        bounds = self.plan.split_bounds[self.plan.split_for(split)]
        geometry, scale = self.geometry, self.scale
        holder = next((f for f in self.families if f.family.target_vars), None)
        if holder is not None:  # y lies on another grid: back onto that grid
            index, geometry, bounds = holder.mapped(index, bounds)
            order = holder.family.target_vars
        forecast = is_forecast_layout(layout, geometry, time_dim)
        physical = [scale(part, order, inverse=True) for part in predictions]
        out = put_back(
            physical,
            index,
            geometry,
            source,
            order,
            bounds,
            time_dim,
            forecast,
            blend,
            blend_width,
        )
        valid = None if self.static_mask is None else self.static_mask.field
        truth = self.spec.nan_policy in ("fill", "keep")  # only then can targets be missing
        return masked_like(out, source, time_dim, truth, valid)

    def truth_for(self, predicted: xr.DataArray) -> xr.DataArray:
        """The source's values where ``predicted`` (from :meth:`to_xarray`) lies, same shape."""
        return truth_at(self.layout.source, predicted, self.layout.time_dim)
