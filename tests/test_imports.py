"""Imports: the package has no import circle and loads Lightning only where it is used."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "xr_datamodule"


def test_the_geometry_sources_samplers_and_reading_layers_do_not_load_lightning():
    modules = ["windows", "sources", "samplers", "plan", "layout", "cells", "gather", "stitch"]
    code = (
        "import sys\n"
        + "".join(f"import xr_datamodule.{name}\n" for name in modules)
        + "print(sorted(m for m in ('lightning', 'lightning.pytorch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("xr_datamodule."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "xr_datamodule":
            found.update(alias.name for alias in node.names)
    return found & {p.stem for p in PACKAGE.glob("*.py")}


def test_no_import_circle_between_modules():
    graph = {path.stem: _imports(path) for path in PACKAGE.glob("*.py") if path.stem != "__init__"}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for step in graph.get(start, ()):
            if step == goal or (step not in seen and reaches(step, goal, seen | {step})):
                return True
        return False

    circles = sorted(name for name in graph if reaches(name, name, {name}))
    assert not circles, f"modules in an import circle: {circles}"


def test_the_forcing_formulas_are_a_leaf():
    assert _imports(PACKAGE / "forcings.py") == set()
