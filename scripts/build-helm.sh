#!/usr/bin/env bash
# Build the `helm` binary the chart tests use (tests/integration/test_chart.py), from its Go module
# helm.sh/helm/v4 at the version tools/helm/go.mod pins (a `tool` directive; go.sum is the truth).
#
# The binary goes to a cache outside the repository, keyed by a hash of the module files and the
# Go version:
#     ${FLOWPROOF_CACHE:-/var/cache/flowproof}/helm/<key>/bin/helm
# A cached build is reused as it is (a no-op run). A build goes to a temporary directory beside
# the cache entry and is renamed into place only when the binary runs, so an interrupted build
# never leaves a half entry. Concurrent runs for the same key wait on a lock.
#
# Progress goes to stderr; the last line on stdout is the bin directory.
#
# Environment: FLOWPROOF_CACHE (cache root; without it /var/cache/flowproof when writable, else
# ~/.cache/flowproof), GO (the go command, default: go). GOCACHE and GOMODCACHE are the go
# command's defaults unless set. The first build downloads about 100 MB of modules from the Go
# module proxy and compiles for a few minutes on two cores.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mod="$repo/tools/helm"
go_cmd="${GO:-go}"
if [ -n "${FLOWPROOF_CACHE:-}" ]; then
    cache_root="$FLOWPROOF_CACHE/helm"
elif mkdir -p /var/cache/flowproof 2>/dev/null && [ -w /var/cache/flowproof ]; then
    cache_root=/var/cache/flowproof/helm
else  # not root: the user's own cache
    cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/flowproof/helm"
fi

if ! command -v "$go_cmd" >/dev/null 2>&1; then
    echo "build-helm: no Go toolchain ('$go_cmd' not found)" >&2
    exit 2
fi

cd "$mod"
go_version="$("$go_cmd" env GOVERSION)"
helm_version="$(awk '$1 == "helm.sh/helm/v4" { print $2 }' go.mod)"  # offline, unlike go list -m
case "$helm_version" in
    v[0-9]*.[0-9]*.[0-9]*) ;;
    *) echo "build-helm: no helm.sh/helm/v4 version in $mod/go.mod" >&2; exit 2 ;;
esac
# Stamp the release as upstream's Makefile does (a plain build says only "v4.3").
ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$helm_version"
ldflags="$ldflags -X helm.sh/helm/v4/internal/version.gitTreeState=clean"
go_platform="$("$go_cmd" env GOOS)/$("$go_cmd" env GOARCH)"
key="$(
    {
        printf 'go=%s %s\nbuild=-trimpath -ldflags=%s\n' "$go_version" "$go_platform" "$ldflags"
        cat go.mod go.sum
    } | sha256sum | cut -c1-16
)"
dest="$cache_root/$key"

complete() {
    [ -x "$dest/bin/helm" ]
}

if complete; then
    echo "build-helm: cached ($helm_version, $go_version, key $key)" >&2
    echo "$dest/bin"
    exit 0
fi

mkdir -p "$cache_root"
exec 9>"$cache_root/.lock-$key"
flock 9
if complete; then  # another run built it while we waited
    echo "build-helm: built by a concurrent run (key $key)" >&2
    echo "$dest/bin"
    exit 0
fi

# Leftovers of builds that were killed outright (we hold the lock: nobody else builds this key).
rm -rf "$cache_root/.build-$key".*
tmp="$(mktemp -d "$cache_root/.build-$key.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir "$tmp/bin"

echo "build-helm: building helm $helm_version with $go_version into $dest" >&2
start=$(date +%s)
# -mod=readonly: go.sum in the repository is the truth; a build never rewrites it.
GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0 \
    "$go_cmd" build -trimpath -ldflags="$ldflags" -o "$tmp/bin/helm" helm.sh/helm/v4/cmd/helm >&2
end=$(date +%s)

"$tmp/bin/helm" version >&2
{
    echo "key=$key"
    echo "go=$go_version $go_platform"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "build_seconds=$((end - start))"
    echo "helm.sh/helm/v4 $helm_version"
} >"$tmp/BUILD-INFO"

chmod 755 "$tmp"
rm -rf "$dest"  # only an incomplete leftover can be here: a complete one returned above
mv -T "$tmp" "$dest"
trap - EXIT
echo "build-helm: done in $((end - start)) s" >&2
echo "$dest/bin"
