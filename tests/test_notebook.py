"""The quickstart notebook runs top to bottom (code cells in one namespace, no kernel)."""

from __future__ import annotations

import json
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs_and_has_no_outputs(capsys):
    notebook = json.loads(NOTEBOOK.read_text())
    code_cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code_cells and all(not c["outputs"] for c in code_cells)
    namespace: dict = {}
    for cell in code_cells:
        exec(compile("".join(cell["source"]), str(NOTEBOOK), "exec"), namespace)
    assert namespace["X"].shape[1:] == namespace["dm"].input_shape
    assert "val_loss:" in capsys.readouterr().out
