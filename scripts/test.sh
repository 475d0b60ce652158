#!/usr/bin/env bash
# The test command of the README: installs what it needs, then lint, types and every test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

echo "== lint and types"
ruff check .
ruff format --check .
mypy
lint-imports

echo "== helm for the chart tests (built from its Go module into a cache outside the repository)"
FLOWPROOF_HELM="$(bash scripts/build-helm.sh)/helm"
export FLOWPROOF_HELM

echo "== tests"
mkdir -p test-artifacts
export FLOWPROOF_NO_SKIPS=1  # tests/conftest.py: a skip fails the run unless the kernel lacks it
exec pytest -q -p no:cacheprovider --junitxml=test-artifacts/junit.xml "$@"
