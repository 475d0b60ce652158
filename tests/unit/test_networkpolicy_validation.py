"""NetworkPolicy as the API server accepts it: one case per validation rule, from a table.

The table (tests/conformance/apiserver/networkpolicy-validation.yaml) mirrors k8s.io/kubernetes
v1.37.2's validation.go and defaults.go, each case citing the check it mirrors, and records what a
real kube-apiserver v1.37.2 answered. Here every case goes through the manifest reader: flowproof
must accept what the API server accepts (reading the defaults it stores), refuse what it refuses
with the field named, and warn where the table says it deliberately deviates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from collector.core.model import NetworkPolicy
from collector.reading.manifests import load_snapshot
from flowproof.errors import InputError

TABLE = (
    Path(__file__).resolve().parents[1]
    / "conformance"
    / "apiserver"
    / "networkpolicy-validation.yaml"
)
CASES: list[dict[str, Any]] = yaml.safe_load(TABLE.read_text())["cases"]


def _policy_file(tmp_path: Path, spec: dict[str, Any]) -> Path:
    body = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "t"},
        "spec": {"podSelector": {}, **spec},
    }
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _reads_as(policy: NetworkPolicy, defaulted: dict[str, Any]) -> None:
    """The model holds what the API server stores for the defaulted fields."""
    for key, value in defaulted.items():
        if key == "policyTypes":
            assert set(policy.policy_types) == {v.lower() for v in value}
        elif key == "ingress":
            for rule, stored in zip(policy.ingress, value, strict=True):
                for port, stored_port in zip(rule.ports, stored["ports"], strict=True):
                    assert (port.protocol, port.port) == (
                        stored_port["protocol"],
                        stored_port["port"],
                    )
        else:
            raise AssertionError(f"the table defaults {key!r}, which this test cannot compare")


def test_the_table_covers_every_rule_and_records_the_api_server() -> None:
    ids = [case["id"] for case in CASES]
    assert len(ids) == len(set(ids))
    for case in CASES:
        assert case["apiserver"] in ("accepted", "refused"), case["id"]
        assert case["flowproof"] in ("accepted", "refused", "warned"), case["id"]
        assert case["cites"], case["id"]
        if case["flowproof"] != case["apiserver"]:
            # flowproof differs from the API server only where the table says why.
            assert case["flowproof"] == "warned" and case.get("deviation"), case["id"]


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in CASES])
def test_the_reader_accepts_and_refuses_what_the_api_server_does(
    case: dict[str, Any], tmp_path: Path
) -> None:
    path = _policy_file(tmp_path, case["spec"])
    if case["flowproof"] == "refused":
        with pytest.raises(InputError) as caught:
            load_snapshot([path])
        problems = caught.value.problems or (caught.value,)
        assert [p.field for p in problems] == [case["field"]], caught.value.render()
        assert case["says"] in problems[0].reason
        assert problems[0].line is not None and problems[0].file == str(path)
        return
    snapshot = load_snapshot([path])
    (policy,) = snapshot.policies
    _reads_as(policy, case.get("defaulted", {}))
    if case["flowproof"] == "accepted":
        assert snapshot.warnings == ()
        return
    (warning,) = snapshot.warnings
    assert warning.startswith(f"{path}:"), warning
    assert f": {case['field']}: " in warning
    assert case["says"] in warning
