#!/usr/bin/env bash
# Writes requirements/images.lock: every runtime dependency of flowproof (pyproject.toml's
# [project] dependencies, not the dev extras) pinned to one version with the hashes of all its
# files, for every platform and Python 3.11. The image builds install exactly these files
# (scripts/install-venv.sh, pip --require-hashes), so an image rebuilt from the same commit gets
# the same packages. Run it after changing the dependencies; tests/integration/test_images.py
# fails while the lock does not satisfy pyproject.toml.
#
#   scripts/lock-images.sh            re-resolve (newest versions pyproject.toml allows)
#   scripts/lock-images.sh --upgrade-package NAME   move one package only
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-$(command -v uv || echo .venv/bin/uv)}
if [ ! -x "$uv" ] && ! command -v "$uv" >/dev/null 2>&1; then
    echo "lock-images: needs uv (pip install uv)" >&2
    exit 2
fi
exec "$uv" pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes \
    --no-header --quiet -o requirements/images.lock "$@"
