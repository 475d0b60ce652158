"""The FlowExpectations CRD from deploy/crds, as the real API server takes it.

Applied with `kubectl apply --server-side -k deploy/crds` to a control plane of its own: the
schema is accepted as structural, the names and the short name `fe` are served, every printer
column shows in `kubectl get fe` with the value its jsonPath names, and status is a subresource
(the main resource cannot change it, `/status` cannot change the spec, only the spec moves the
generation). Unknown fields are pruned, or refused under strict field validation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab.controlplane import ControlPlane
from tests.support.apiobjects import make_expectations, make_flow
from tests.support.kubetools import (
    CRD_FILE,
    DEPLOY,
    FE_API,
    eventually,
    kubectl,
    namespace,
    ok,
    path_of,
    unique,
    wait_established,
)

CRD_NAME = "flowexpectations.flowproof.dev"


@pytest.fixture(scope="module")
def cp(controlplane_bin: Path) -> Iterator[ControlPlane]:
    with ControlPlane(controlplane_bin) as plane:
        kubectl(plane, "apply", "--server-side", "-k", str(DEPLOY / "crds"))
        wait_established(plane, CRD_NAME)
        yield plane


@pytest.fixture
def ns(cp: ControlPlane) -> str:
    name = unique("crd")
    namespace(cp, name)
    return name


def crd_of(cp: ControlPlane) -> dict[str, Any]:
    found: dict[str, Any] = ok(cp.request("GET", path_of("CustomResourceDefinition", CRD_NAME)))
    return found


def test_the_schema_is_accepted_as_structural_and_the_names_are_served(cp: ControlPlane) -> None:
    crd = crd_of(cp)
    conditions = {c["type"]: c for c in crd["status"]["conditions"]}
    assert conditions["Established"]["status"] == "True"
    assert conditions["NamesAccepted"]["status"] == "True"
    assert "NonStructuralSchema" not in conditions, conditions.get("NonStructuralSchema")
    assert crd["status"]["acceptedNames"]["shortNames"] == ["fe"]
    assert crd["spec"].get("preserveUnknownFields", False) is False
    shipped = yaml.safe_load(CRD_FILE.read_text())
    [version] = crd["spec"]["versions"]
    assert version["schema"] == shipped["spec"]["versions"][0]["schema"], "stored as shipped"
    resources = ok(cp.request("GET", FE_API))["resources"]
    assert {r["name"] for r in resources} == {"flowexpectations", "flowexpectations/status"}
    # The published OpenAPI (what `kubectl explain` reads) follows the CRD within seconds.
    explained = eventually(
        lambda: (
            (r := kubectl(cp, "explain", "fe.spec.flows.ports", check=False)).returncode == 0
            and r.stdout
        ),
        30,
        0.5,
    )
    assert "FIELD: ports" in explained and "the ports of the flow" in explained


def _column_value(obj: dict[str, Any], json_path: str) -> Any:
    value: Any = obj
    for step in json_path.strip(".").split("."):
        value = value.get(step) if isinstance(value, dict) else None
    return value


def test_every_printer_column_shows_in_kubectl_get_fe(cp: ControlPlane, ns: str) -> None:
    ok(
        cp.request(
            "POST", f"{FE_API}/namespaces/{ns}/flowexpectations", make_expectations("shop", ns)
        )
    )
    status = {
        "observedGeneration": 1,
        "flows": 1,
        "failing": 1,
        "lastVerified": "2026-12-06T12:00:00Z",
        "problem": "a problem for the wide column",
        "counts": {"REQUIRED_BLOCKED": 1},
        "failures": [{"name": "web-to-api", "status": "REQUIRED_BLOCKED"}],
        "conditions": [
            {
                "type": "Verified",
                "status": "False",
                "reason": "FlowsFailing",
                "message": "1 of 1 flows fail: web-to-api (REQUIRED_BLOCKED)",
                "observedGeneration": 1,
                "lastTransitionTime": "2026-12-06T12:00:00Z",
            },
            {
                "type": "Ready",
                "status": "True",
                "reason": "Decided",
                "message": "every flow has a verdict",
                "observedGeneration": 1,
                "lastTransitionTime": "2026-12-06T12:00:00Z",
            },
        ],
    }
    stored = ok(
        cp.request(
            "PATCH",
            f"{FE_API}/namespaces/{ns}/flowexpectations/shop/status",
            {"status": status},
            content_type="application/merge-patch+json",
        )
    )
    columns = crd_of(cp)["spec"]["versions"][0]["additionalPrinterColumns"]
    assert columns, "the CRD has printer columns"
    table = kubectl(cp, "get", "fe", "-n", ns, "-o", "wide").stdout.splitlines()
    header = table[0].split()
    # kubectl prints NAME first, then each column, upper-cased (multi-word names keep spaces).
    names = ["NAME"] + [c["name"].upper() for c in columns]
    assert " ".join(header) == " ".join(names), table
    listed = json.loads(kubectl(cp, "get", "fe", "shop", "-n", ns, "-o", "json").stdout)
    row = table[1]
    for column in columns:
        if column["type"] == "date" or column["name"] == "Age":
            continue  # printed as an age ("5s"), not as the value
        if "?(" in column["jsonPath"]:  # a filter: as kubectl's own JSONPath reads it
            value = (
                kubectl(
                    cp, "get", "fe", "shop", "-n", ns, "-o", f"jsonpath={{{column['jsonPath']}}}"
                ).stdout
                or None
            )
        else:
            value = _column_value(listed, column["jsonPath"])
        assert value is not None, f"{column['name']}: {column['jsonPath']} is empty"
        assert str(value) in row, f"{column['name']} = {value!r} is not in {row!r}"
    assert stored["status"] == status
    plain = kubectl(cp, "get", "fe", "-n", ns).stdout.splitlines()[0]
    wide_only = [c["name"].upper() for c in columns if c.get("priority", 0) > 0]
    assert wide_only and not [name for name in wide_only if name in plain], "priority > 0: -o wide"
    categorized = kubectl(cp, "get", "flowproof", "-n", ns, "-o", "name").stdout.split()
    assert categorized == ["flowexpectations.flowproof.dev/shop"]


def test_status_is_a_subresource(cp: ControlPlane, ns: str) -> None:
    base = f"{FE_API}/namespaces/{ns}/flowexpectations"
    doc = make_expectations("shop", ns)
    created = ok(cp.request("POST", base, {**doc, "status": {"flows": 99}}))
    assert "status" not in created or created["status"] == {}, "create ignores status"
    assert created["metadata"]["generation"] == 1

    # The main resource cannot change the status...
    ok(
        cp.request(
            "PATCH",
            f"{base}/shop",
            {"status": {"flows": 7}},
            content_type="application/merge-patch+json",
        )
    )
    assert "status" not in ok(cp.request("GET", f"{base}/shop"))
    # ... and /status cannot change the spec, nor the generation.
    after = ok(
        cp.request(
            "PATCH",
            f"{base}/shop/status",
            {"spec": {"flows": [make_flow(name="sneaked-in")]}, "status": {"flows": 1}},
            content_type="application/merge-patch+json",
        )
    )
    assert [f["name"] for f in after["spec"]["flows"]] == ["web-to-api"]
    assert after["status"] == {"flows": 1}
    assert after["metadata"]["generation"] == 1
    # A spec change moves the generation and keeps the status.
    changed = ok(
        cp.request(
            "PATCH",
            f"{base}/shop",
            {"spec": {"flows": [make_flow(expect="deny")]}},
            content_type="application/merge-patch+json",
        )
    )
    assert changed["metadata"]["generation"] == 2
    assert changed["status"] == {"flows": 1}


def test_unknown_fields_are_pruned_or_refused_when_strict(cp: ControlPlane, ns: str) -> None:
    base = f"{FE_API}/namespaces/{ns}/flowexpectations"
    doc = make_expectations("pruned", ns, flows=[{**make_flow(), "expected": "allow"}])
    strict = cp.request("POST", base, doc, query={"fieldValidation": "Strict"})
    assert strict.status == 400, strict.body
    assert 'unknown field "spec.flows[0].expected"' in strict.body["message"]
    kept = ok(cp.request("POST", base, doc, query={"fieldValidation": "Ignore"}))
    assert "expected" not in kept["spec"]["flows"][0]
    assert eventually(lambda: ok(cp.request("GET", f"{base}/pruned")))
