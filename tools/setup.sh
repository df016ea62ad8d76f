#!/usr/bin/env bash
# Set up this checkout on a fresh Debian/Ubuntu machine: system packages, a venv with the appliance
# (and, with --dev, every tool and test dependency), and the display's build-time npm packages.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=0
[[ "${1:-}" == "--dev" ]] && DEV=1

need_apt=()
command -v mosquitto >/dev/null || [[ -x /usr/sbin/mosquitto ]] || need_apt+=(mosquitto mosquitto-clients)
command -v openssl >/dev/null || need_apt+=(openssl)
# venv needs ensurepip, which Debian ships apart from python3.
"${PYTHON:-python3}" -c "import ensurepip" 2>/dev/null || need_apt+=(python3-venv)
if [[ $DEV == 1 ]]; then
  command -v chromium >/dev/null || need_apt+=(chromium chromium-driver)
  command -v systemd-analyze >/dev/null || need_apt+=(systemd)
  command -v rsync >/dev/null || need_apt+=(rsync)
  command -v npm >/dev/null || need_apt+=(nodejs npm)
  command -v dciodvfy >/dev/null || need_apt+=(dicom3tools)  # validates the SR/SC the tests write
fi
if ((${#need_apt[@]})); then
  echo "==> installing Debian packages: ${need_apt[*]}"
  SUDO=""; [[ $(id -u) == 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python || ! -x .venv/bin/pip ]]; then
  # (a venv made without pip, when python3-venv was missing, is made again)
  echo "==> creating .venv"
  "$PY" -m venv --clear .venv
  .venv/bin/pip install -q --upgrade pip
fi
extras="."
[[ $DEV == 1 ]] && extras=".[tools,test]"
# The pip steps take ~15 s even when nothing changed: skip them while pyproject.toml and the lock are
# the ones last installed (an editable install picks up code changes by itself).
stamp=.venv/.setup-stamp
want="$(cat pyproject.toml requirements/runtime.lock | sha256sum | cut -d' ' -f1) dev=$DEV"
if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
  echo "==> .venv up to date with pyproject.toml and requirements/runtime.lock"
else
  echo "==> installing the locked runtime dependencies, then the appliance ($extras) into .venv"
  # The lock (hashes checked) first, so this checkout runs and tests exactly what install.sh installs.
  .venv/bin/pip install -q --require-hashes -r requirements/runtime.lock
  # torch==2.13.0 is the CPU build on this machine's disk; a looser pin would pull a multi-GB CUDA build.
  .venv/bin/pip install -q -e "$extras"
  if [[ $DEV == 1 ]]; then
    # The Triton client and a CPU tritonserver (inside the nvidia-pytriton wheel) for the Triton tests.
    # --no-deps: their pins (ml-dtypes<=0.5.4, numpy<2, protobuf<7) would downgrade what onnx/ORT use,
    # and the parts we use work with the newer versions (tests/backends/test_triton.py proves it).
    .venv/bin/pip install -q geventhttpclient grpcio python-rapidjson
    .venv/bin/pip install -q --no-deps tritonclient==2.73.0 nvidia-pytriton==0.7.0
  fi
  echo "$want" > "$stamp"
fi

if [[ $DEV == 1 && -f web/package.json ]]; then
  echo "==> npm packages for the display tests (build-time only)"
  (cd web && { [[ -d node_modules/playwright-core ]] || npm ci --no-audit --no-fund --loglevel=error; })
fi
echo "==> setup done"
