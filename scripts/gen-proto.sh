#!/usr/bin/env bash
# Regenerates the agent–collector contract's Python code (flowproof/v1/) from proto/flowproof/v1/.
#
#   scripts/gen-proto.sh            write into the repository (what `make proto` runs)
#   scripts/gen-proto.sh OUT_DIR    write the tree flowproof/v1/ under OUT_DIR instead (the staleness test)
#
# Uses grpcio-tools' bundled protoc and mypy-protobuf from the Python in $PYTHON (default: the
# repository's .venv if there is one, else python3 on PATH). Pinned versions of both make the output
# byte-identical, which the staleness test relies on. The generated files are never edited by hand.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root}"
default_python=python3
[[ -x "$root/.venv/bin/python" ]] && default_python="$root/.venv/bin/python"
python="${PYTHON:-$default_python}"
bindir="$(dirname "$("$python" -c 'import sys; print(sys.executable)')")"

for plugin in protoc-gen-mypy protoc-gen-mypy_grpc; do
  if [[ ! -x "$bindir/$plugin" ]]; then
    echo "gen-proto: $bindir/$plugin not found: pip install mypy-protobuf into $python's environment" >&2
    exit 1
  fi
done

target="$out/flowproof/v1"
mkdir -p "$target"
find "$target" -maxdepth 1 -type f \( -name '*_pb2*.py' -o -name '*_pb2*.pyi' \) -delete

"$python" -m grpc_tools.protoc \
  --proto_path="$root/proto" \
  --plugin=protoc-gen-mypy="$bindir/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$bindir/protoc-gen-mypy_grpc" \
  --python_out="$out" \
  --grpc_python_out="$out" \
  --mypy_out="$out" \
  --mypy_grpc_out="$out" \
  "$root"/proto/flowproof/v1/*.proto

cat > "$target/__init__.py" <<'PY'
"""Generated from proto/flowproof/v1/ by scripts/gen-proto.sh: the agent–collector contract, v1.

Do not edit; change the .proto file and run `make proto`. Only flowproof.convert turns these
messages into domain types.
"""
PY
touch "$target/py.typed"
