#!/usr/bin/env bash
# The test command of the README: installs what it needs, then lint, types and every test suite.
#
# The real control plane (kube-apiserver and etcd, scripts/build-controlplane.sh, cached outside
# the repository) builds in the background while the suites that do not need it start (unit,
# integration, conformance); the lab and control-plane suites run beside them once the binaries
# are there. If the build failed, every test that needs them fails with the end of its log (none
# is skipped). Arguments go to both pytest runs (paths, -k, ...).
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

mkdir -p test-artifacts
build_out=test-artifacts/controlplane-build.out
build_log=test-artifacts/controlplane-build.log
echo "== the control plane builds in the background (log: $build_log)"
started=$(date +%s)
setsid bash scripts/build-controlplane.sh </dev/null >"$build_out" 2>"$build_log" &
build_pid=$!
# Interrupted or failed: the build goes too (its own process group, by its recorded pid).
trap 'kill -- "-$build_pid" 2>/dev/null || true' EXIT

export FLOWPROOF_NO_SKIPS=1  # tests/conftest.py: a skip fails the run unless the kernel lacks it
run() {  # pytest, where "no test selected" (exit 5) is no failure
    local code=0
    pytest -q -p no:cacheprovider "$@" || code=$?
    [ "$code" -eq 5 ] && code=0
    return "$code"
}

# The suites that need no control plane and no lab (CPU: unit, integration, conformance) run
# beside the lab and control-plane suites (mostly waiting on packets and servers): two cores, one
# each. The first writes to its own log, shown when both are done.
unit_log=test-artifacts/unit.log
echo "== tests: unit, integration, conformance, in the background (log: $unit_log)"
setsid pytest -q -p no:cacheprovider --junitxml=test-artifacts/junit.xml \
    -m "not controlplane and not lab" "$@" </dev/null >"$unit_log" 2>&1 &
unit_pid=$!
trap 'kill -- "-$build_pid" "-$unit_pid" 2>/dev/null || true' EXIT

if wait "$build_pid"; then
    export FLOWPROOF_CONTROLPLANE_BIN="$(tail -n 1 "$build_out")"
    echo "== control plane: $FLOWPROOF_CONTROLPLANE_BIN ($(($(date +%s) - started)) s after start)"
else
    export FLOWPROOF_CONTROLPLANE_BUILD_LOG="$PWD/$build_log"
    echo "== the control plane build FAILED (its tests will fail); the end of $build_log:"
    tail -n 20 "$build_log"
fi

echo "== tests: lab, control plane"
second=0
run --junitxml=test-artifacts/junit-lab-controlplane.xml -m "controlplane or lab" "$@" || second=$?

first=0
wait "$unit_pid" || first=$?
[ "$first" -eq 5 ] && first=0  # no test selected
trap - EXIT
echo "== tests: unit, integration, conformance ($unit_log)"
cat "$unit_log"
echo "== $(($(date +%s) - started)) s of tests; exit codes: unit $first, lab and control plane $second"
exit $((first > second ? first : second))
