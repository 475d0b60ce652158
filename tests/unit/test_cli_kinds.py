"""The offline commands with other plugins' policies and ignored kinds: warnings with file and
line on stderr, MODEL_INCOMPLETE in `check` (undecided, not a failure), '?' and `unknown` in
`matrix`, the reasons in `explain`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowproof.cli import main

MANIFESTS = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop, labels: {app: api}}
spec: {containers: [{name: api, ports: [{containerPort: 8080}]}]}
status: {podIP: 10.244.1.11}
---
apiVersion: networking.k8s.io/v1
kind: Networkpolicy
metadata: {name: deny-all, namespace: shop}
spec: {podSelector: {}}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7, namespace: shop}
spec: {endpointSelector: {}}
---
apiVersion: flowproof.dev/v1alpha1
kind: FlowExpectations
metadata: {name: shop, namespace: shop}
spec:
  flows:
    - name: web-to-api
      from: {podSelector: {matchLabels: {app: web}}}
      to: {podSelector: {matchLabels: {app: api}}}
      ports: ["8080/TCP"]
      expect: allow
"""


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    path = tmp_path / "shop.yaml"
    path.write_text(MANIFESTS)
    return path


def test_check_reports_model_incomplete_and_warns_with_file_and_line(
    manifests: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["check", "-f", str(manifests), "-o", "json"])
    out, err = capsys.readouterr()
    assert rc == 0, "MODEL_INCOMPLETE is undecided, not a violation"
    (flow,) = json.loads(out)["flows"]
    assert (flow["status"], flow["model"]) == ("MODEL_INCOMPLETE", "unknown")
    assert (
        "CiliumNetworkPolicy shop/l7 (cilium.io/v2) may select the source shop/web and the destination shop/api"
        in flow["reason"]
    )
    text = MANIFESTS.splitlines()
    misspelt = text.index("kind: Networkpolicy") + 1
    cilium = text.index("kind: CiliumNetworkPolicy") + 1
    lines = err.splitlines()
    assert lines[0] == (
        f"flowproof check: warning: {manifests}:{misspelt}: kind: 'Networkpolicy' is not a kind "
        "flowproof knows: ignored (did you mean 'NetworkPolicy'?)"
    )
    assert lines[1].startswith(
        f"flowproof check: warning: {manifests}:{cilium}: kind: CiliumNetworkPolicy"
    )


def test_matrix_marks_unknown_cells(manifests: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["matrix", "-f", str(manifests), "--port", "8080/TCP"]) == 0
    table = capsys.readouterr().out
    assert "'?' unknown to the model" in table
    assert "0 of 4 pairs allowed, 0 denied, 4 unknown" in table
    assert main(["matrix", "-f", str(manifests), "--port", "8080/TCP", "-o", "json"]) == 0
    cells = json.loads(capsys.readouterr().out)
    assert {c["model"] for c in cells} == {"unknown"}
    assert all(c["incomplete"] for c in cells)


def test_explain_says_why_the_model_is_unknown(
    manifests: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["explain", "-f", str(manifests), "--from", "shop/web", "--to", "shop/api"]
    assert main([*argv, "--port", "8080/TCP"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("shop/web -> shop/api on 8080/TCP: UNKNOWN")
    assert (
        "the model is incomplete for this flow (the policies flowproof models say allowed)" in text
    )
