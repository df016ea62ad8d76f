#!/usr/bin/env bash
# The main job: set up this checkout (Debian packages, venv), start a local Mosquitto if none runs,
# run the appliance on the bundled model with ONNX Runtime, drop a real chest X-ray from
# ../shared/data/cxr into its watched folder and show the message that went out. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
exec .venv/bin/python -m tools.deploy.demo "$@"
