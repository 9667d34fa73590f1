#!/usr/bin/env bash
# Set everything up, then run the main job: train the demo model on the embedded synthetic
# data, keep the best checkpoint, log metrics and print the result beside the baselines.
#
#   scripts/demo.sh                      # extra arguments go to `xr-datamodule fit`
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
exec xr-datamodule fit --config examples/synthetic.yaml "$@"
