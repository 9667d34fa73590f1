"""Grid families: variables on other grids than the windowed one, aligned by coordinates.

The user gives the window on one grid, the *primary* one: the dims of ``input_dims``. A
selected variable that lacks some of them lives on another grid (a *family* of variables
that share their dims):

* on other dims that follow the primary ones, e.g. ``(time, lat_hr, lon_hr)`` beside
  ``(time, lat, lon)`` (downscaling), or a 20 m band beside 10 m ones: its window is the same
  region at the same times, its size scaled by the ratio of the grid spacings;
* on a part of the primary dims only, e.g. ``co2(time)`` beside maps: a *series*, one value
  per step and window position.

Which dim follows which is found from the coordinates' kind (latitude, longitude, CF
``axis`` X/Y; by name, ``standard_name`` or ``units``) or given as ``align_dims``. Along
each followed dim the family's position is an exact affine function of the primary one,
``own = (primary * num + shift) / den`` (:class:`Alignment`), derived from the 1-D regular
coordinates, which must nest: each cell of the coarser grid covers a whole number of cells
of the finer one. The sample index stays the primary one; a family's window starts are
computed from it per batch (:meth:`GridFamily.starts`), whole arrays at a time.

Example:
    >>> import numpy as np, xarray as xr
    >>> coarse = np.arange(4) * 2.0 + 1.0     # cell centres 1, 3, 5, 7 (spacing 2)
    >>> fine = np.arange(8) * 1.0 + 0.5       # 0.5, 1.5, ..., 7.5 (spacing 1)
    >>> ds = xr.Dataset({"x": ("lat", coarse), "y": ("lat_hr", fine)},
    ...                 coords={"lat": coarse, "lat_hr": fine})
    >>> alignment = align_dim(ds, "lat_hr", "lat")
    >>> alignment.num, alignment.den, alignment.shift, alignment.positions(np.array([0, 3]))
    (2, 1, 0, array([0, 6]))
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction

import numpy as np
import xarray as xr

from xr_datamodule.forcings import LATITUDE_NAMES, LONGITUDE_NAMES
from xr_datamodule.windows import WindowGeometry

__all__ = [
    "SERIES_AS",
    "Alignment",
    "GridFamily",
    "GridPlan",
    "align_dim",
    "check_grid_options",
    "dim_kind",
    "family_spec",
    "grid_plan",
    "primary_spec",
]

SERIES_AS = ("vector", "channels")  # a series: its own (batch, n, time) tensor, or channels of X

_LAT_UNITS = ("degrees_north", "degree_north", "degrees_n", "degree_n")
_LON_UNITS = ("degrees_east", "degree_east", "degrees_e", "degree_e")


def dim_kind(source: xr.Dataset, dim: str) -> str | None:
    """What a dim's coordinate measures: ``"lat"``, ``"lon"``, ``"x"``, ``"y"`` or None.

    By name (``lat``, ``latitude``, ``lat_*``…), CF ``standard_name``, ``units`` (degrees
    north/east) or ``axis`` (X/Y).
    """
    attrs = source[dim].attrs if dim in source.coords else {}
    name, standard = str(dim).lower(), str(attrs.get("standard_name", ""))
    units, axis = str(attrs.get("units", "")).lower(), str(attrs.get("axis", "")).upper()
    if name in LATITUDE_NAMES or standard == "latitude" or units in _LAT_UNITS:
        return "lat"
    if name in LONGITUDE_NAMES or standard == "longitude" or units in _LON_UNITS:
        return "lon"
    if name.startswith(("lat_", "latitude_")):
        return "lat"
    if name.startswith(("lon_", "longitude_")):
        return "lon"
    if axis == "X" or standard == "projection_x_coordinate":
        return "x"
    if axis == "Y" or standard == "projection_y_coordinate":
        return "y"
    return None


@dataclass(frozen=True)
class Alignment:
    """Where one of a family's dims lies against the primary dim it follows.

    Position ``p`` of the primary dim starts where position ``(p * num + shift) / den`` of the
    family's dim starts; one primary cell is ``num / den`` family cells.

    Args:
        dim: The family's dim.
        follows: The primary dim.
        num: Numerator of the ratio of spacings (primary over family).
        den: Its denominator (> 1 when the family's grid is the coarser one).
        shift: Numerator of the offset, in family cells times ``den``.
    """

    dim: str
    follows: str
    num: int = 1
    den: int = 1
    shift: int = 0

    def positions(self, primary: np.ndarray) -> np.ndarray:
        """The family positions where the given (aligned) primary positions start."""
        return (np.asarray(primary, dtype=np.int64) * self.num + self.shift) // self.den

    def length(self, size: int, what: str) -> int:
        """A primary length in family cells; an error unless it is a whole number of them."""
        if (size * self.num) % self.den:
            raise ValueError(
                f"{what} = {size} along {self.follows!r} is {size * self.num}/{self.den} "
                f"cells of {self.dim!r}, whose cells are {self.den // math.gcd(self.den, size)}"
                f" times as large: give {self.follows!r} a multiple of {self.den} (the ratio "
                f"of the grids' spacings is {self.num}/{self.den})"
            )
        return size * self.num // self.den

    def residue(self) -> int:
        """Primary positions ``p`` with ``p % den == residue`` start at a family cell edge."""
        return (-self.shift * pow(self.num, -1, self.den)) % self.den if self.den > 1 else 0

    def inside(self, length: int) -> tuple[int, int]:
        """The primary positions whose cells lie inside the family's ``length`` cells."""
        lower = -((self.shift) // self.num)  # ceil(-shift / num)
        upper = (length * self.den - self.shift) // self.num
        return lower, upper


def _regular_axis(source: xr.Dataset, dim: str) -> tuple[float, float]:
    """First label and step of a dim's 1-D numeric coordinate; an error unless regular."""
    if dim not in source.coords or source[dim].ndim != 1:
        raise ValueError(
            f"dim {dim!r} needs a 1-D coordinate to be aligned with another grid (grids are "
            "matched by their coordinates)"
        )
    values = np.asarray(source[dim].values)
    if not np.issubdtype(values.dtype, np.number) or len(values) < 2:
        raise ValueError(
            f"dim {dim!r}: aligning grids needs a numeric coordinate of at least 2 labels, "
            f"got {len(values)} of dtype {values.dtype}"
        )
    steps = np.diff(values.astype(np.float64))
    if not np.allclose(steps, steps[0], rtol=1e-4, atol=0):
        raise ValueError(
            f"dim {dim!r}: its labels are not evenly spaced (steps from {steps.min():g} to "
            f"{steps.max():g}); grids are aligned on regular coordinates only, regrid first"
        )
    return float(values[0]), float(steps.mean())


def align_dim(source: xr.Dataset, dim: str, follows: str) -> Alignment:
    """The :class:`Alignment` of ``dim`` against the primary dim ``follows``, checked.

    Raises:
        ValueError: Coordinates that are missing, irregular, run the other way, or whose
            cells do not nest (each coarse cell a whole number of fine cells).
    """
    first, step = _regular_axis(source, follows)
    own_first, own_step = _regular_axis(source, dim)
    ratio = step / own_step
    if ratio < 0:
        raise ValueError(
            f"{dim!r} runs the other way from {follows!r} ({own_step:+g} against {step:+g} "
            f"per position): sort one of them first, e.g. ds.sortby({dim!r})"
        )
    fraction = Fraction(ratio).limit_denominator(64)
    if abs(float(fraction) - ratio) > 1e-6 * ratio:
        raise ValueError(
            f"the spacings of {follows!r} ({step:g}) and {dim!r} ({own_step:g}) are not in a "
            "ratio of small whole numbers: regrid one of them first"
        )
    num, den = fraction.numerator, fraction.denominator
    # Where the lower edge of primary cell 0 lies, in family cells (cell-centred labels).
    edge = (first - own_first) / own_step - 0.5 * ratio + 0.5
    shift = edge * den
    if abs(shift - round(shift)) > 1e-3:
        raise ValueError(
            f"the cells of {follows!r} and {dim!r} do not nest: the first cell of {follows!r} "
            f"begins {edge:g} cells into {dim!r}, not at a cell edge (labels are taken as "
            "cell centres); regrid one of them, or select labels so that they nest"
        )
    return Alignment(dim, follows, num, den, round(shift))


@dataclass(frozen=True)
class GridFamily:
    """Variables on one grid other than the primary one, and how their windows follow.

    Args:
        name: Its name in batches and displays: the family's own dims joined by ``_``
            (``"lat_hr_lon_hr"``), or ``"series"``.
        dims: Its windowed dims, in the order of its first variable.
        alignments: One per dim of ``dims``.
        input_vars: Its input variables.
        target_vars: Its target variables.
    """

    name: str
    dims: tuple[str, ...]
    alignments: tuple[Alignment, ...]
    input_vars: list[str] = field(default_factory=list)
    target_vars: list[str] = field(default_factory=list)

    @property
    def is_series(self) -> bool:
        """Whether it lies on a part of the primary dims only (no other grid)."""
        return all(a.dim == a.follows for a in self.alignments)

    def geometry(self, primary: WindowGeometry) -> WindowGeometry:
        """The family's window geometry, the primary one in its own cells (checked)."""
        axes = [primary.dims.index(a.follows) for a in self.alignments]
        pairs = list(zip(self.alignments, axes, strict=True))
        return WindowGeometry(
            dims=self.dims,
            input_size=tuple(a.length(primary.input_size[i], "input_dims") for a, i in pairs),
            stride=tuple(a.length(primary.stride[i], "the stride") for a, i in pairs),
            target_size=tuple(a.length(primary.target_size[i], "target_dims") for a, i in pairs),
            target_offset=tuple(
                a.length(primary.target_offset[i], "target_offset") for a, i in pairs
            ),
        )

    def starts(self, primary_dims: Sequence[str], starts: np.ndarray) -> np.ndarray:
        """Its window starts ``(batch, len(dims))`` for the primary ones ``(batch, ...)``."""
        out = np.empty((len(starts), len(self.dims)), dtype=np.int64)
        for axis, alignment in enumerate(self.alignments):
            out[:, axis] = alignment.positions(starts[:, primary_dims.index(alignment.follows)])
        return out

    def bounds(self, primary: Mapping[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        """Primary position bounds (aligned, see :meth:`GridPlan.restrict`) in its cells."""
        return {
            a.dim: tuple(int(v) for v in a.positions(np.array(primary[a.follows])))
            for a in self.alignments
        }


@dataclass(frozen=True)
class GridPlan:
    """The primary grid's variables and the other families.

    Args:
        primary_inputs: Input variables on the primary grid.
        primary_targets: Target variables on the primary grid.
        families: The other grids' families.
        lengths: Length of every family dim.
    """

    primary_inputs: list[str]
    primary_targets: list[str]
    families: tuple[GridFamily, ...] = ()
    lengths: dict[str, int] = field(default_factory=dict)

    @property
    def target_family(self) -> GridFamily | None:
        """The family holding the targets, or None when they are on the primary grid."""
        return next((f for f in self.families if f.target_vars), None)

    def restrict(
        self, bounds: Mapping[str, tuple[int, int]], geometry: WindowGeometry
    ) -> dict[str, tuple[int, int]]:
        """A split's primary bounds where every family's window fits and starts on a cell edge.

        Along a dim that a coarser grid follows, the lower bound moves up to the first
        position whose sample span starts on an edge of every coarser grid's cells.
        """
        out = dict(bounds)
        for axis, dim in enumerate(geometry.dims):
            followers = [a for f in self.families for a in f.alignments if a.follows == dim]
            followers = [a for a in followers if a.dim != dim]
            if not followers:
                continue
            lower, upper = out[dim]
            for a in followers:
                inside = a.inside(self.lengths[a.dim])
                lower, upper = max(lower, inside[0]), min(upper, inside[1])
            below = geometry.reach_below[axis]
            period = math.lcm(*(a.den for a in followers))
            first = next(
                (
                    p
                    for p in range(lower + below, lower + below + period)
                    if all(p % a.den == a.residue() for a in followers)
                ),
                lower + below,
            )
            out[dim] = (first - below, max(upper, first - below))
        return out


def _kind_match(source: xr.Dataset, dim: str, lacking: Sequence[str]) -> str | None:
    kind = dim_kind(source, dim)
    if kind is None:
        return None
    same = [p for p in lacking if dim_kind(source, p) == kind]
    return same[0] if len(same) == 1 else None


def _family_dims(
    source: xr.Dataset,
    name: str,
    primary_dims: Sequence[str],
    align: Mapping[str, str],
) -> tuple[Alignment, ...]:
    """The windowed dims of a variable that lacks primary dims, with their alignments."""
    dims = source[name].dims
    lacking = [d for d in primary_dims if d not in dims]
    out = []
    for dim in dims:
        if dim in primary_dims:
            out.append(Alignment(str(dim), str(dim)))
            continue
        follows = align.get(str(dim)) or _kind_match(source, str(dim), lacking)
        if follows is not None:
            out.append(align_dim(source, str(dim), follows))
    return tuple(out)


def _check_dims_exist(primary: Sequence[str], source: xr.Dataset) -> None:
    """An unknown windowed dim, with the closest of the data's dims."""
    dims = tuple(str(d) for d in source.dims)
    for dim in primary:
        if dim not in source.dims:
            close = difflib.get_close_matches(dim, dims, n=1, cutoff=0.5)
            raise KeyError(
                f"input_dims: dimension {dim!r} does not exist. Expected one or more of {dims}"
                + (f"; did you mean {close[0]!r}?" if close else "")
            )


def _check_align(align: Mapping[str, str], source: xr.Dataset, primary: Sequence[str]) -> None:
    for dim, follows in align.items():
        if dim not in source.dims:
            raise KeyError(
                f"align_dims: {dim!r} is not a dim of the data. Valid: "
                f"{tuple(str(d) for d in source.dims)}"
            )
        if follows not in primary:
            raise KeyError(
                f"align_dims[{dim!r}] = {follows!r} is not a windowed dim. Valid: {tuple(primary)}"
            )


def grid_plan(spec: object, source: xr.Dataset, static_dim: str | None) -> GridPlan:
    """Sort the spec's variables into the primary grid and the other families.

    A variable with every windowed dim (or all but ``static_dim``: a static field) is on
    the primary grid; one with dims that follow windowed ones is in their family; one with
    a part of the windowed dims only, ``static_dim`` among them, is a series.

    Raises:
        KeyError: ``align_dims`` naming an unknown dim.
        ValueError: A variable that lacks windowed dims without following them, a static
            field on another grid, or targets on more than one grid.
    """
    primary = tuple(spec.input_dims)  # type: ignore[attr-defined]
    _check_dims_exist(primary, source)
    align = dict(getattr(spec, "align_dims", None) or {})
    _check_align(align, source, primary)
    groups: dict[tuple[Alignment, ...], GridFamily] = {}
    on_primary: set[str] = set()
    inputs, targets = spec.input_vars, spec.targets  # type: ignore[attr-defined]
    for name in spec.all_vars:  # type: ignore[attr-defined]
        dims = source[name].dims
        missing = [d for d in primary if d not in dims]
        if not missing or missing == [static_dim]:
            on_primary.add(name)
            continue
        alignments = _family_dims(source, name, primary, align)
        followed = {a.follows for a in alignments}
        elsewhere = any(a.dim != a.follows for a in alignments)
        extra = [d for d in dims if d not in followed and d not in primary]
        lacking = [d for d in primary if d not in followed]
        # A series has few dims beyond time (channels, e.g. ``gas``); as many as the dims it
        # lacks is a grid whose coordinates were not recognised: ask, do not guess.
        series = followed == {static_dim} and len(extra) < len(lacking)
        if not elsewhere and not series:
            raise ValueError(_lacking_message(source, name, dims, primary, followed, static_dim))
        if elsewhere and static_dim is not None and static_dim not in followed:
            raise ValueError(
                f"variable {name!r} has dims {dims}: a static field on another grid than "
                f"{primary} is not supported yet; interpolate it onto the windowed grid"
            )
        if elsewhere and set(primary) - followed:
            raise ValueError(_lacking_message(source, name, dims, primary, followed, static_dim))
        family = groups.get(alignments)
        if family is None:
            label = "_".join(a.dim for a in alignments if a.dim != a.follows) or "series"
            family = groups[alignments] = GridFamily(
                label, tuple(a.dim for a in alignments), alignments
            )
        if name in inputs:
            family.input_vars.append(name)
        if name in targets:
            family.target_vars.append(name)
    families = tuple(groups.values())
    holders = [f.name for f in families if f.target_vars]
    targets_here = [n for n in spec.targets if n in on_primary]  # type: ignore[attr-defined]
    if len(holders) + bool(targets_here) > 1:
        raise ValueError(
            f"target_vars lie on several grids ({['primary'] * bool(targets_here) + holders}): "
            "y is one tensor, so its variables must share a grid; train one datamodule per "
            "target grid"
        )
    if families and not any(n in on_primary for n in inputs):
        raise ValueError(
            f"input_dims {primary} is the grid of no input variable: give the window on "
            f"the grid of the inputs (the other grids' windows follow it); inputs are on "
            f"{[f.dims for f in families if f.input_vars]}"
        )
    lengths = {a.dim: source.sizes[a.dim] for f in families for a in f.alignments}
    return GridPlan(
        [n for n in spec.input_vars if n in on_primary],  # type: ignore[attr-defined]
        targets_here,
        families,
        lengths,
    )


def _suggested_pairs(source: xr.Dataset, others: Sequence[str], lacking: Sequence[str]) -> str:
    """``'a': 'lat', ...`` for dims that may follow lacking ones (kinds that do not clash)."""
    pairs, free = [], list(lacking)
    for other in others:
        kind = dim_kind(source, other)
        fits = [p for p in free if kind is None or dim_kind(source, p) in (kind, None)]
        if fits:
            pairs.append(f"{other!r}: {fits[0]!r}")
            free.remove(fits[0])
    return ", ".join(pairs) if len(pairs) == len(lacking) else ""


def _lacking_message(
    source: xr.Dataset,
    name: str,
    dims: Sequence[str],
    primary: Sequence[str],
    followed: set[str],
    static_dim: str | None = None,
) -> str:
    lacking = [d for d in primary if d not in followed]
    others = [d for d in dims if d not in primary]
    hint = (
        f"; only {static_dim!r} may be missing (a static field, broadcast along it), or all "
        f"the others (a series along {static_dim!r})"
        if static_dim
        else f"; every selected variable must have all of {tuple(primary)}"
    )
    pairs = _suggested_pairs(source, others, lacking)
    if pairs:
        hint += (
            f"; if {tuple(others)} are another grid of the same region, say which windowed "
            f"dim each follows: align_dims={{{pairs}}}"
        )
    return f"variable {name!r} has dims {tuple(dims)} and lacks the windowed dim(s) {lacking}{hint}"


def family_spec(spec: object, family: GridFamily, geometry: WindowGeometry) -> object:
    """The spec of a family's variables on its own dims (for its layout, reader, statistics)."""
    sizes = family.geometry(geometry)
    dims = family.dims
    inputs = family.input_vars or family.target_vars
    return _narrowed(
        spec,
        inputs,
        family.target_vars or family.input_vars,
        input_dims=dict(zip(dims, sizes.input_size, strict=True)),
        input_overlap={
            d: size - stride
            for d, size, stride in zip(dims, sizes.input_size, sizes.stride, strict=True)
            if size > stride
        },
        target_dims=dict(zip(dims, sizes.target_size, strict=True)),
        target_offset=dict(zip(dims, sizes.target_offset, strict=True)),
        split_dim=spec.split_dim if spec.split_dim in dims else None,  # type: ignore[attr-defined]
    )


def primary_spec(spec: object, plan: GridPlan) -> object:
    """The spec of the primary grid's variables (the spec itself with one grid)."""
    if not plan.families:
        return spec
    return _narrowed(spec, plan.primary_inputs, plan.primary_targets)


def _narrowed(spec: object, inputs: list[str], targets: list[str], **changes: object) -> object:
    names = set(inputs) | set(targets)
    normalize = spec.normalize  # type: ignore[attr-defined]
    if isinstance(normalize, dict):
        normalize = {k: v for k, v in normalize.items() if k in names or k == "default"}
    return replace(
        spec,  # type: ignore[type-var]
        input_vars=list(inputs),
        target_vars=list(targets),
        normalize=normalize,
        **changes,
    )


def check_grid_options(spec: object, plan: GridPlan) -> None:
    """Refuse, with the reason, options that do not combine with variables on other grids.

    Raises:
        ValueError: The first such option.
    """
    get = lambda name: getattr(spec, name)  # noqa: E731
    own_inputs = [f"x_{f.name}" for f in plan.families if f.input_vars]
    if get("series_as") == "channels":
        own_inputs = [f"x_{f.name}" for f in plan.families if f.input_vars and not f.is_series]
    target_family = plan.target_family
    refused = [
        (get("transform") or get("target_transform"), "a transform"),
        (get("random_offsets"), "random_offsets=True (other grids' windows start on cells)"),
        (get("nan_policy") in ("drop", "error"), f"nan_policy={get('nan_policy')!r}"),
        (get("normalize_on") == "device", "normalize_on='device'"),
        (get("nan_mask") and own_inputs, "nan_mask=True with inputs on other grids"),
        (target_family and get("mask"), "mask with targets on another grid"),
        (
            target_family and isinstance(get("sample_weights"), Mapping),
            "sample_weights by a window statistic with targets on another grid",
        ),
        (
            target_family and get("nan_policy") == "fill" and get("batch_format") == "dict",
            "nan_policy='fill' with dict batches and targets on another grid (the target "
            "mask would not show the filled values)",
        ),
    ]
    for given, what in refused:
        if given:
            raise ValueError(
                f"{what} cannot be combined with variables on other grids yet "
                f"({[f.dims for f in plan.families]}): leave it out, or put the variables "
                "on the windowed grid first"
            )
    if own_inputs and get("batch_format") != "dict":
        raise ValueError(
            f"inputs on other grids come as tensors of their own ({own_inputs}): use "
            "batch_format='dict'"
            + (", or series_as='channels' for series" if "x_series" in own_inputs else "")
        )
