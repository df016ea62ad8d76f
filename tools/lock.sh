#!/usr/bin/env bash
# Regenerate requirements/runtime.lock: the runtime dependencies of pyproject.toml pinned with sha256
# hashes, one file for every Python the appliance runs on (3.10 on the Jetson, 3.11 here). uv is a
# build-time tool only (pip install uv); the appliance never needs it.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-$(command -v uv || true)}
[[ -n "$UV" ]] || { echo "lock.sh: uv not found (pip install uv, or set UV=/path/to/uv)" >&2; exit 2; }
header=$(sed -n '1,3p' requirements/runtime.lock)
"$UV" pip compile pyproject.toml --generate-hashes --universal --python-version 3.10 --no-header \
  --quiet -o requirements/runtime.lock.new
{ echo "$header"; cat requirements/runtime.lock.new; } > requirements/runtime.lock
rm requirements/runtime.lock.new
echo "lock.sh: $(grep -c '==' requirements/runtime.lock) pins written to requirements/runtime.lock"
