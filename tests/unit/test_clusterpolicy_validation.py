"""ClusterNetworkPolicy as its CRD accepts it: one case per schema or CEL rule, from a table.

The table (tests/conformance/apiserver/clusternetworkpolicy-validation.yaml) mirrors the CRD of
sigs.k8s.io/network-policy-api v0.3.0 (experimental channel) and records what a real
kube-apiserver v1.37.2 with that CRD answered. Every case goes through the manifest reader:
flowproof accepts and refuses as the API server does, naming the field, except where the table
says why it is stricter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from collector.reading.manifests import load_snapshot
from flowproof.errors import InputError

TABLE_FILE = (
    Path(__file__).resolve().parents[1]
    / "conformance"
    / "apiserver"
    / "clusternetworkpolicy-validation.yaml"
)
TABLE: dict[str, Any] = yaml.safe_load(TABLE_FILE.read_text())


def _spec(case: dict[str, Any]) -> dict[str, Any]:
    spec = dict(TABLE["base"])
    for key, value in case["spec"].items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return spec


def test_the_table_records_the_api_server_and_says_why_flowproof_differs() -> None:
    ids = [case["id"] for case in TABLE["cases"]]
    assert len(ids) == len(set(ids))
    for case in TABLE["cases"]:
        assert case["cites"], case["id"]
        if case["flowproof"] != case["apiserver"]:
            assert case.get("deviation"), case["id"]


@pytest.mark.parametrize("version", ["v1beta1", "v1alpha2"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in TABLE["cases"]])
def test_the_reader_accepts_and_refuses_what_the_crd_does(
    case: dict[str, Any], version: str, tmp_path: Path
) -> None:
    body = {
        "apiVersion": f"policy.networking.k8s.io/{version}",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "p"},
        "spec": _spec(case),
    }
    path = tmp_path / "cnp.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    if case["flowproof"] == "refused":
        with pytest.raises(InputError) as caught:
            load_snapshot([path])
        problems = caught.value.problems or (caught.value,)
        assert case["field"] in [p.field for p in problems], caught.value.render()
        found = next(p for p in problems if p.field == case["field"])
        assert case["says"] in found.reason, found.render()
        assert found.file == str(path) and found.line is not None
        return
    snapshot = load_snapshot([path])
    (policy,) = snapshot.cluster_policies
    assert (policy.key, policy.tier) == ("ClusterNetworkPolicy/p", _spec(case)["tier"])
    assert snapshot.warnings == ()
