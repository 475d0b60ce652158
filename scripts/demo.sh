#!/usr/bin/env bash
# The README's first command: set up, then check the shipped example shop offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo
echo "== flowproof check -f examples/shop   (intent vs model, no cluster)"
flowproof check -f examples/shop
echo
echo "== flowproof explain: why may frontend not reach db?"
flowproof explain -f examples/shop --from shop/frontend --to shop/db --port 5432/TCP
