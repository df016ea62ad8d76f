#!/usr/bin/env bash
# Set up everything the tests need (Debian packages, venv with tools+test extras, npm packages),
# then run the whole suite: lint, types, and every test (real Mosquitto, Chromium, ONNX Runtime,
# DICOMs from ../shared/data/cxr or $CXR_DATA).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh --dev
echo "==> ruff"
.venv/bin/ruff check appliance tools testsupport tests
.venv/bin/ruff format --check appliance tools testsupport tests
echo "==> mypy"
.venv/bin/mypy
echo "==> pytest"
.venv/bin/python -m pytest -ra "$@"
