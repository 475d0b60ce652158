#!/bin/sh
# Builds flowproof and everything it needs as wheels, then installs them into a fresh virtualenv
# that has no pip of its own. The image builds (Dockerfile.agent, Dockerfile.collector) run exactly
# this, and tests/integration/test_images.py runs it on the host, so what the test proves is what
# the images get.
#
#   scripts/install-venv.sh SOURCE_DIR WHEEL_DIR VENV_DIR
#
# The dependencies are SOURCE_DIR/requirements/images.lock (scripts/lock-images.sh): one version
# each, every file checked against its hash (pip --require-hashes), so a rebuild gets the same
# packages; flowproof itself is built from SOURCE_DIR and installed from the wheels alone.
# $PYTHON (default python3) needs pip >= 22.3 (for --python). The usual PIP_* variables apply:
# PIP_FIND_LINKS and PIP_NO_INDEX=1 make it work from a local wheelhouse with no index.
set -eu
if [ "$#" -ne 3 ]; then
  echo "usage: $0 SOURCE_DIR WHEEL_DIR VENV_DIR" >&2
  exit 2
fi
src=$1
wheels=$2
venv=$3
python=${PYTHON:-python3}
lock="$src/requirements/images.lock"

"$python" -m pip wheel --disable-pip-version-check --wheel-dir "$wheels" --require-hashes \
  --only-binary=:all: -r "$lock"
"$python" -m pip wheel --disable-pip-version-check --wheel-dir "$wheels" --no-deps "$src"
"$python" -m venv --without-pip "$venv"
"$python" -m pip --python "$venv/bin/python" install --disable-pip-version-check \
  --no-index --find-links "$wheels" flowproof
