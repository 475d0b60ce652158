"""The generated contract code is fresh, importable as flowproof.v1, and never a top-level `proto`."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "flowproof" / "v1"


def _generated_files(base: Path) -> set[str]:
    return {p.name for p in base.iterdir() if p.is_file()}


def test_generated_code_matches_the_proto_files(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-proto.sh"), str(tmp_path)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    fresh = tmp_path / "flowproof" / "v1"
    assert _generated_files(fresh) == _generated_files(GENERATED), (
        "flowproof/v1 has other files than the generator makes: run `make proto`"
    )
    stale = [
        name
        for name in sorted(_generated_files(fresh))
        if not filecmp.cmp(fresh / name, GENERATED / name, shallow=False)
    ]
    assert stale == [], f"flowproof/v1 is stale ({', '.join(stale)}): run `make proto`"


def test_contract_is_importable_as_flowproof_v1_only() -> None:
    from flowproof.v1 import agent_pb2, agent_pb2_grpc

    assert agent_pb2.DESCRIPTOR.package == "flowproof.v1"
    assert agent_pb2_grpc.AgentServiceStub.__module__ == "flowproof.v1.agent_pb2_grpc"
    assert "proto" not in sys.modules
    text = (GENERATED / "agent_pb2_grpc.py").read_text()
    assert "from flowproof.v1 import agent_pb2" in text


def test_enums_follow_buf_style() -> None:
    from flowproof.v1 import agent_pb2

    for enum in agent_pb2.DESCRIPTOR.enum_types_by_name.values():
        prefix = "".join("_" + c if c.isupper() else c for c in enum.name).lstrip("_").upper()
        assert enum.values[0].name == f"{prefix}_UNSPECIFIED"
        assert enum.values[0].number == 0
        assert all(v.name.startswith(prefix + "_") for v in enum.values), enum.name
