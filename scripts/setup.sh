#!/usr/bin/env sh
# Create .venv with a CPU build of torch and fluxlab installed in editable mode.
# torch is installed first and pinned: with no torch present, pip would otherwise resolve the
# plain `torch` requirement to the newest build with several GB of CUDA packages.
set -eu
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==${FLUXLAB_TORCH:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"
