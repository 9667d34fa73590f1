"""What a pipeline will feed a model, as a dict, plain text (``repr``) and HTML (notebooks)."""

from __future__ import annotations

import html
import os
from typing import Any

import xarray as xr

from xr_datamodule.pipeline import DataPipeline
from xr_datamodule.plan import skipped_starts

__all__ = ["summary", "summary_html", "summary_text"]


def summary(pipeline: DataPipeline) -> dict[str, Any]:
    """Source, variables, shapes, windows, splits and loader of a pipeline.

    Opens the source lazily (nothing is loaded).
    """
    spec, geometry, plan = pipeline.given, pipeline.geometry, pipeline.plan
    source, channels = pipeline.layout.source, pipeline.channels
    splits = {}
    for name, bounds in plan.split_bounds.items():
        ranges = []
        for dim, (lo, hi) in bounds.items():
            if (lo, hi) != (0, source.sizes[dim]):
                labels = source.indexes[dim] if dim in source.indexes else None
                first = labels[lo] if labels is not None else lo
                last = labels[hi - 1] if labels is not None else hi - 1
                ranges.append(f"{dim} {first} … {last}")
        count = len(plan.indices[name])
        left_out = plan.gap_samples.get(name, 0)
        where = ", ".join(ranges) or "all"
        splits[name] = (
            f"{where}; {left_out:,} left out at time gaps" if left_out else where,
            count,
        )
    data = spec.data
    return {
        "source": "xr.Dataset" if isinstance(data, xr.Dataset) else os.fspath(data),
        "reading": _reading(pipeline),
        "inputs": (", ".join(channels.input_variables), channels.input_shape),
        "targets": (", ".join(channels.target_variables), channels.target_shape),
        "windows": ", ".join(
            f"{dim} {size} (stride {stride}{_used(pipeline, dim, stride)}, target {tsize} at "
            f"{offset:+d})"
            for dim, size, stride, tsize, offset in zip(
                geometry.dims,
                geometry.input_size,
                geometry.stride,
                geometry.target_size,
                geometry.target_offset,
                strict=True,
            )
        ),
        "axes": "; ".join(
            f"{dim} step {axis.step_text}"
            + (f", {axis.gap_after.size} irregular step(s)" if axis.gap_after.size else "")
            for dim, axis in plan.axes.items()
            if axis.unit in ("ns", "months")
        ),
        "grids": _grids(pipeline),
        "splits": splits,
        "loader": (
            f"batch {spec.batch_size}, workers {pipeline.resources.num_workers}, style "
            f"{spec.style}, dtype {spec.dtype}, normalize {_normalize(pipeline)}, nan_policy "
            f"{spec.nan_policy}"
        ),
    }


def _used(pipeline: DataPipeline, dim: str, stride: int) -> str:
    """``: 1 in 2 start times`` along time where a forecast skips start times."""
    skipped = dim == pipeline.layout.time_dim and skipped_starts(pipeline.layout, pipeline.geometry)
    return f": 1 in {stride} start times" if skipped and stride > 1 else ""


def _grids(pipeline: DataPipeline) -> list[str]:
    """One line per other grid: its variables, where they go, its window and how it follows."""
    lines = []
    for stages in pipeline.families:
        family, geometry = stages.family, stages.geometry
        ratios = ", ".join(
            f"{a.dim} x{a.num}/{a.den} of {a.follows}" if a.den > 1 else f"{a.dim} x{a.num}"
            for a in family.alignments
            if a.dim != a.follows
        )
        sides = [("x_" + family.name, family.input_vars, geometry.input_size)]
        if family.is_series and pipeline.given.series_as == "channels":
            sides = [("X channels", family.input_vars, geometry.input_size)]
        sides.append(("y", family.target_vars, geometry.target_size))
        for key, names, size in sides:
            if names:
                shape = (stages.n_channels(names), *size)
                where = f"on {family.dims}" + (f" ({ratios})" if ratios else "")
                lines.append(f"{key}: {', '.join(names)} -> {shape} {where}")
    return lines


def _reading(pipeline: DataPipeline) -> str:
    """In memory, or out of core and (once chosen) with which decoder and why."""
    if pipeline.resources.loads_into_memory:
        return "in memory"
    chosen = pipeline.backend_chosen
    return "out of core, by chunk" + (f", through {chosen.description}" if chosen else "")


def _normalize(pipeline: DataPipeline) -> str:
    """The method, and where the statistics came from once they are known."""
    method = pipeline.given.normalize
    origin = pipeline.statistics_origin
    return f"{method} (statistics {origin})" if method is not None and origin else str(method)


def summary_text(pipeline: DataPipeline, title: str = "XarrayDataModule") -> str:
    """The summary as lines of text; what is wrong instead when the spec does not fit the data.

    A repr must not raise, so an error is shown rather than raised.
    """
    try:
        info = summary(pipeline)
    except Exception as err:
        return f"{title}(data={pipeline.given.data!r}) — not usable yet: {err}"
    lines = [f"{title}: {info['source']} ({info['reading']})"]
    lines.append(f"  X: {info['inputs'][0]} -> {info['inputs'][1]}")
    lines.append(f"  y: {info['targets'][0]} -> {info['targets'][1]}")
    lines.extend(f"  grid {line}" for line in info["grids"])
    lines.append(f"  windows: {info['windows']}")
    if info["axes"]:
        lines.append(f"  time axis: {info['axes']}")
    for name, (where, count) in info["splits"].items():
        lines.append(f"  {name}: {where} ({count:,} samples)")
    lines.append(f"  loader: {info['loader']}")
    return "\n".join(lines)


def summary_html(pipeline: DataPipeline, title: str = "XarrayDataModule") -> str:
    """The summary as an HTML table (Jupyter's rich display)."""
    try:
        info = summary(pipeline)
    except Exception:
        return f"<pre>{html.escape(summary_text(pipeline, title))}</pre>"
    rows = [
        ("source", f"{info['source']} ({info['reading']})"),
        ("X", f"{info['inputs'][0]} → {info['inputs'][1]}"),
        ("y", f"{info['targets'][0]} → {info['targets'][1]}"),
        *(("grid", line) for line in info["grids"]),
        ("windows", info["windows"]),
        *((("time axis", info["axes"]),) if info["axes"] else ()),
        *((f"split {n}", f"{w} ({c:,} samples)") for n, (w, c) in info["splits"].items()),
        ("loader", info["loader"]),
    ]
    body = "".join(
        f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
        f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>"
        for k, v in rows
    )
    return f"<b>{html.escape(title)}</b><table>{body}</table>"
