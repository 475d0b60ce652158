#!/usr/bin/env bash
# Build a real Kubernetes control plane for tests: kube-apiserver (k8s.io/kubernetes) and etcd
# (go.etcd.io/etcd/server/v3), from the Go module in tests/controlplane/.
#
# The binaries go to a cache outside the repository, keyed by a hash of the module files and the
# Go version:
#     ${FLOWPROOF_CACHE:-/var/cache/flowproof}/controlplane/<key>/bin/{kube-apiserver,etcd}
# and beside them the third-party CRDs the tests install (tests/controlplane/third-party-crds.txt,
# each taken from its Go module and checked against the module hash pinned there):
#     ${FLOWPROOF_CACHE:-/var/cache/flowproof}/controlplane/<key>/crds/*.yaml
# A cached build is reused as it is (a no-op run). A build goes to a temporary directory beside the
# cache entry and is renamed into place only when both binaries are there, so an interrupted build
# never leaves a half entry. Concurrent runs for the same key wait on a lock.
#
# Progress goes to stderr; the last line on stdout is the bin directory.
#
# Environment: FLOWPROOF_CACHE (cache root; without it /var/cache/flowproof when writable, else
# ~/.cache/flowproof), GO (the go command, default: go). GOCACHE and
# GOMODCACHE are the go command's defaults unless set. The first build downloads about 140 MB of
# modules from the Go module proxy and compiles for several minutes on two cores.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mod="$repo/tests/controlplane"
go_cmd="${GO:-go}"
if [ -n "${FLOWPROOF_CACHE:-}" ]; then
    cache_root="$FLOWPROOF_CACHE/controlplane"
elif mkdir -p /var/cache/flowproof 2>/dev/null && [ -w /var/cache/flowproof ]; then
    cache_root=/var/cache/flowproof/controlplane
else  # not root: the user's own cache
    cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/flowproof/controlplane"
fi
ldflags='-s -w'  # no symbol table or DWARF: the binaries are about a third smaller

if ! command -v "$go_cmd" >/dev/null 2>&1; then
    echo "build-controlplane: no Go toolchain ('$go_cmd' not found)" >&2
    exit 2
fi

cd "$mod"
go_version="$("$go_cmd" env GOVERSION)" || {
    echo "build-controlplane: '$go_cmd env GOVERSION' failed: no working Go toolchain" >&2
    exit 2
}
# Stamp the release into the binary as upstream's build does (a plain go build reports
# v0.0.0-master, which /version, kubectl's skew check and version-gated code would see).
k8s_version="$(awk '$1 == "k8s.io/kubernetes" { print $2 }' go.mod)"  # offline, unlike go list -m
case "$k8s_version" in
    v[0-9]*.[0-9]*.[0-9]*) ;;
    *) echo "build-controlplane: no k8s.io/kubernetes version in $mod/go.mod" >&2; exit 2 ;;
esac
k8s_minor="${k8s_version#v*.}"
k8s_minor="${k8s_minor%%.*}"
k8s_major="${k8s_version#v}"
k8s_major="${k8s_major%%.*}"
v=k8s.io/component-base/version
ldflags="$ldflags -X $v.gitVersion=$k8s_version -X $v.gitMajor=$k8s_major -X $v.gitMinor=$k8s_minor"
ldflags="$ldflags -X $v.gitTreeState=clean"
go_platform="$("$go_cmd" env GOOS)/$("$go_cmd" env GOARCH)"
key="$(
    {
        printf 'go=%s %s\nbuild=-trimpath -ldflags=%s\n' "$go_version" "$go_platform" "$ldflags"
        cat go.mod go.sum cmd/kube-apiserver/main.go cmd/etcd/main.go third-party-crds.txt
    } | sha256sum | cut -c1-16
)"
dest="$cache_root/$key"

complete() {
    [ -x "$dest/bin/kube-apiserver" ] && [ -x "$dest/bin/etcd" ] && [ -f "$dest/crds/.complete" ]
}

# Copy the files each line of third-party-crds.txt names out of its Go module into $1.
fetch_crds() {
    local out="$1" module version sum files dir got
    mkdir -p "$out"
    while read -r module version sum files; do
        case "$module" in '' | '#'*) continue ;; esac
        # Outside any module: the download is verified against the checksum database.
        dir="$(cd "$out" && GOFLAGS=-mod=mod "$go_cmd" mod download -json "$module@$version")"
        got="$(printf '%s' "$dir" | sed -n 's/^[[:space:]]*"Sum": "\(.*\)",\{0,1\}$/\1/p')"
        if [ "$got" != "$sum" ]; then
            echo "build-controlplane: $module@$version has hash '$got', not the pinned $sum" >&2
            return 1
        fi
        dir="$(printf '%s' "$dir" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
        for file in $files; do
            cp "$dir/$file" "$out/"
            chmod 644 "$out/$(basename "$file")"
        done
    done <third-party-crds.txt
    touch "$out/.complete"
}

if complete; then
    echo "build-controlplane: cached ($go_version, key $key)" >&2
    echo "$dest/bin"
    exit 0
fi

mkdir -p "$cache_root"
exec 9>"$cache_root/.lock-$key"
flock 9
if complete; then  # another run built it while we waited
    echo "build-controlplane: built by a concurrent run (key $key)" >&2
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

echo "build-controlplane: building kube-apiserver and etcd with $go_version into $dest" >&2
start=$(date +%s)
# -mod=readonly: go.sum in the repository is the truth; a build never rewrites it.
GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0 \
    "$go_cmd" build -trimpath -ldflags="$ldflags" -o "$tmp/bin/" ./cmd/kube-apiserver ./cmd/etcd >&2
end=$(date +%s)

"$tmp/bin/kube-apiserver" --version >&2
"$tmp/bin/etcd" --version >&2
fetch_crds "$tmp/crds"
{
    echo "key=$key"
    echo "go=$go_version $go_platform"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "build_seconds=$((end - start))"
    grep -E '^\s*(k8s.io/kubernetes|go.etcd.io/etcd/server/v3) ' go.mod | sed 's/^[[:space:]]*//'
} >"$tmp/BUILD-INFO"

chmod 755 "$tmp"
rm -rf "$dest"  # only an incomplete leftover can be here: a complete one returned above
mv -T "$tmp" "$dest"
trap - EXIT
echo "build-controlplane: done in $((end - start)) s" >&2
echo "$dest/bin"
