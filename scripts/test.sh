#!/usr/bin/env bash
# Set everything up, then run the test suite (what CI runs).
#
#   scripts/test.sh                      # extra arguments go to pytest, e.g. -k trainer
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
exec python -m pytest -q "$@"
