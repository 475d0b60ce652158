#!/usr/bin/env bash
# Creates the collector's TLS Secret (flowproof-collector-tls: tls.crt, tls.key, ca.crt) with a
# CA of its own made here and thrown away (its key is deleted): the agents trust only that CA.
# Without cert-manager (docs/install.md has its Certificate). Re-run to rotate, then restart both.
#
#   scripts/collector-tls.sh [NAMESPACE]      (default: flowproof; needs openssl and kubectl)
set -euo pipefail
namespace="${1:-flowproof}"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
cd "$dir"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
  -subj "/CN=flowproof CA" -keyout ca.key -out ca.crt \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=flowproof-collector" \
  -keyout tls.key -out tls.csr 2>/dev/null
names="DNS:flowproof-collector,DNS:flowproof-collector.$namespace,DNS:flowproof-collector.$namespace.svc"
printf "subjectAltName=%s\nextendedKeyUsage=serverAuth\n" "$names" > ext.cnf
openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 \
  -extfile ext.cnf -out tls.crt 2>/dev/null
kubectl -n "$namespace" create secret generic flowproof-collector-tls --type kubernetes.io/tls \
  --from-file=tls.crt --from-file=tls.key --from-file=ca.crt --dry-run=client -o yaml |
  kubectl apply -f -
