#!/usr/bin/env bash
# Set up a virtual environment with everything the package, its tests and the demo need.
#
#   scripts/setup.sh            # into .venv (or $VENV)
#
# Only Python >= 3.11 is needed beforehand. PyTorch is installed first, and only when the
# environment has none: the CPU build of torch==2.13.0 from PyTorch's CPU index
# ($TORCH_INDEX), or, where that index cannot be reached, torch==2.13.0 from the default
# index (a CPU build on a machine whose index holds no CUDA wheels). For a CUDA build,
# install it into the environment first, e.g.
#   python3 -m venv .venv && .venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cu126
# and this script keeps it. Re-running is cheap: the package is installed again only when
# pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"

"$PYTHON" - <<'PY' || { echo "xr_datamodule needs Python >= 3.11" >&2; exit 1; }
import sys
sys.exit(sys.version_info < (3, 11))
PY
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating the virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.xr_datamodule-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && python -c "import torch, xr_datamodule" 2>/dev/null; then
    exit 0
fi
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    echo "installing $TORCH_SPEC, CPU build (no torch in $VENV)"
    python -m pip install -q --timeout 15 --retries 1 --index-url "$TORCH_INDEX" "$TORCH_SPEC" 2>/dev/null \
        || python -m pip install -q "$TORCH_SPEC"
fi
echo "installing xr_datamodule with its dev extra into $VENV"
# setuptools' banner about editable installs (a warning in its build backend) is left out.
PYTHONWARNINGS="ignore:Editable installation" python -m pip install -q -e ".[dev]"
touch "$stamp"
