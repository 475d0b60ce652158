#!/usr/bin/env bash
# The README's first command: set up, then run the whole feedback loop on the example shop in a
# lab (network namespaces, nftables, real agents and a collector), break it twice and watch.
# Needs root. The lab stays up at the end; `flowproof lab --name demo down` removes it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
export FLOWPROOF_LAB_NAME=${FLOWPROOF_LAB_NAME:-demo}
LAB=$FLOWPROOF_LAB_NAME

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "offline: intent vs model (flowproof check -f examples/shop)"
flowproof check -f examples/shop

step "which flows prove each policy is enforced? (flowproof evidence)"
flowproof evidence -f examples/shop | tail -n 12

step "why may the frontend not reach the database? (flowproof explain)"
flowproof explain -f examples/shop --from shop/frontend --to shop/db --port 5432/TCP

step "the lab: the shop in network namespaces, policies in nftables, an agent per node, a collector"
flowproof lab --name "$LAB" down >/dev/null 2>&1 || true
flowproof lab --name "$LAB" up -f examples/shop
flowproof lab --name "$LAB" status

step "reality: every declared flow probed with real packets (flowproof verify --once)"
flowproof verify --once

step "break a required path: db-ingress now admits only the batch job"
flowproof lab --name "$LAB" apply -f examples/breaks/db-ingress-only-batch.yaml
flowproof verify --once || echo "(verify exited $? — REQUIRED_BLOCKED above)"
flowproof lab --name "$LAB" apply -f examples/shop/policies/api-to-db.yaml

step "open a forbidden path: the frontend may now reach the database"
flowproof lab --name "$LAB" apply -f examples/breaks/allow-frontend-to-db.yaml
flowproof verify --once || echo "(verify exited $? — FORBIDDEN_OPEN above)"
flowproof lab --name "$LAB" delete -f examples/breaks/allow-frontend-to-db.yaml

step "fixed again"
flowproof verify --once

url=$(python3 -c "from lab.state import collector_url; print(collector_url('$LAB', '/var/lib/flowproof/lab') or '')" 2>/dev/null || true)
cat <<MSG

The lab "$LAB" is still up, its loop running:
  web view and API:  ${url:-the collector URL in 'flowproof lab --name $LAB status'}
  every policy:      flowproof evidence -f examples/shop   (shop/default-deny is redundant:
                     the other policies isolate every pod, so ignoring it changes nothing)
  try a fault:       flowproof lab --name $LAB fault ignore-policy shop/db-ingress
  then:              flowproof verify --once --lab $LAB
                     (api-to-db ENFORCEMENT_DRIFT; shop/db-ingress NOT_ENFORCED, and the
                     egress policies whose witnesses go through it: a drop cannot tell the side)
  clear it:          flowproof lab --name $LAB fault clear
  remove the lab:    flowproof lab --name $LAB down
MSG
