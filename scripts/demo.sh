#!/usr/bin/env bash
# The README's first command: set up, check the example shop offline, then bring it up as a lab
# (network namespaces, nftables) and show what the kernel enforces. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
LAB=${FLOWPROOF_LAB_NAME:-demo}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "offline: intent vs model (flowproof check -f examples/shop)"
flowproof check -f examples/shop

step "why may the frontend not reach the database?"
flowproof explain -f examples/shop --from shop/frontend --to shop/db --port 5432/TCP

step "the lab: the shop as network namespaces with kernel-enforced policies"
flowproof lab --name "$LAB" down >/dev/null 2>&1 || true
flowproof lab --name "$LAB" up -f examples/shop
flowproof lab --name "$LAB" status

cat <<MSG

The lab "$LAB" is up. Try:
  flowproof lab --name $LAB apply -f examples/shop/broken/allow-frontend-to-db.yaml
  flowproof lab --name $LAB status
  flowproof lab --name $LAB down
MSG
