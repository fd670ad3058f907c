#!/usr/bin/env bash
# Create .venv and install imgclust into it, from scratch, on a CPU machine.
#   bash scripts/setup.sh          # the package
#   bash scripts/setup.sh --test   # the package and the test tools
# torch is installed first and alone, pinned to 2.13.0 (a CPU build on our machines); every
# later install is constrained to that version, so no dependency can pull a CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e ".${extras}"
