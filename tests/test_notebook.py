"""The quickstart notebook runs top to bottom in a real kernel, and is committed clean."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_notebook_is_committed_without_outputs():
    notebook = json.loads(NOTEBOOK.read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code and all(not cell["outputs"] and cell["execution_count"] is None for cell in code)


@pytest.mark.timeout(600)
def test_quickstart_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    pytest.importorskip("matplotlib")
    pytest.importorskip("ipykernel")
    pytest.importorskip("nbconvert")
    # What the README says to run (nbconvert executes it through nbclient).
    executed = tmp_path / "quickstart.ipynb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "jupyter",
            "nbconvert",
            "--to",
            "notebook",
            "--execute",
            "--ExecutePreprocessor.timeout=600",
            f"--output-dir={tmp_path}",
            str(NOTEBOOK),
        ],
        check=True,  # a failing cell fails the command
        cwd=tmp_path,
        capture_output=True,
    )
    notebook = nbformat.read(executed, as_version=4)
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 4  # splits, windows, prediction beside the truth, rare-event weights
    text = "".join(out.get("text", "") for out in outputs if out.get("output_type") == "stream")
    shares = re.search(r"boosted: ([\d.]+)% of the windows, ([\d.]+)% of the draws", text)
    assert shares and float(shares[2]) > 3 * float(shares[1])  # oversampled, as drawn
    html = [out["data"]["text/html"] for out in outputs if "text/html" in out.get("data", {})]
    assert any("XarrayDataModule" in page and "samples" in page for page in html)
    # Keep the pictures next to the test run, for a person to look at.
    for number, out in enumerate(images):
        (tmp_path / f"figure{number}.png").write_bytes(base64.b64decode(out["data"]["image/png"]))
