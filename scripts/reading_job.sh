#!/usr/bin/env bash
# CI's second job: the reading layer on what users install. A fresh virtual environment on
# Python 3.13 (override with $READING_PYTHON) with the newest zarr, numcodecs and xarray,
# and no torch (the reading layer does not need it), runs the chunk-file tests (the property
# test against zarr's own reads, sharded stores) and the decoder-choice tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${READING_PYTHON:-}"
if [ -z "$PY" ]; then
    for candidate in "$(command -v python3.13 || true)" \
        "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.13*/bin/python3.13; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then PY="$candidate"; fi
    done
fi
if [ -z "$PY" ]; then
    echo "reading job: no Python 3.13 found (set READING_PYTHON)" >&2
    exit 1
fi
VENV="${READING_VENV:-.venv-reading}"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q --upgrade zarr numcodecs xarray "dask[array]" pandas \
    google-crc32c zstandard pytest pytest-timeout hypothesis
"$VENV/bin/python" - <<'PY'
import sys, numpy, xarray, zarr, numcodecs
print(f"reading job: Python {sys.version.split()[0]}, zarr {zarr.__version__}, numcodecs "
      f"{numcodecs.__version__}, xarray {xarray.__version__}, numpy {numpy.__version__}")
PY
PYTHONPATH=. "$VENV/bin/python" -m pytest -q -o addopts="" -p no:cacheprovider \
    tests/test_chunkfiles.py tests/test_decoder_choice.py
