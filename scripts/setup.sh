#!/usr/bin/env sh
# Create .venv with a CPU build of torch and fluxlab installed in editable mode; with --test, also what the test
# suite needs. A second run with nothing changed is quiet and returns at once.
#
# torch is installed first and pinned: with no torch present, pip would otherwise resolve the plain `torch`
# requirement to the newest build with several GB of CUDA packages.
set -eu
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
EXTRAS=""
[ "${1:-}" = "--test" ] && EXTRAS="[test]"
TORCH="${FLUXLAB_TORCH:-2.13.0}"
STAMP=.venv/.fluxlab-setup
BASE="$(cat pyproject.toml scripts/setup.sh | cksum | cut -d' ' -f1) torch=$TORCH"
WANT="$BASE extras=$EXTRAS"
# Done already: this setup, or (for a plain one) the test setup, which installs everything a plain one does.
if [ -x .venv/bin/python ] && [ -f "$STAMP" ] \
    && { grep -qxF "$WANT" "$STAMP" || { [ -z "$EXTRAS" ] && grep -qxF "$BASE extras=[test]" "$STAMP"; }; } \
    && { [ -z "$EXTRAS" ] || [ -f tests/node/node_modules/replicate/package.json ]; } \
    && .venv/bin/python -c "import fluxlab, importlib.metadata as m; m.version('torch')" 2>/dev/null; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
fi
# pip's and the build backend's notes go to a log, shown only when something fails.
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@" >.venv/pip.log 2>&1 \
  || { cat .venv/pip.log >&2; exit 1; }; }
.venv/bin/python -c "import torch" 2>/dev/null || pip_install "torch==$TORCH"
pip_install -e ".$EXTRAS"
[ -z "$EXTRAS" ] || [ -x /usr/bin/chromium ] || scripts/browser.sh
[ -z "$EXTRAS" ] || scripts/node.sh
echo "$WANT" >> "$STAMP"
