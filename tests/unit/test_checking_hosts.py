"""Offline check of a flow to a host name: reported INCONCLUSIVE with the reason, never an error."""

from __future__ import annotations

from pathlib import Path

from flowproof.cli import main

MANIFESTS = """
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop, labels: {app: api}}
spec: {containers: [{name: c, image: x}]}
---
apiVersion: flowproof.dev/v1alpha1
kind: FlowExpectations
metadata: {name: shop, namespace: shop}
spec:
  flows:
    - name: api-to-payments
      from: {podSelector: {matchLabels: {app: api}}}
      to: {host: payments.example}
      ports: ["443/TCP"]
      expect: allow
"""


def test_a_host_flow_is_inconclusive_offline_and_does_not_fail_the_check(tmp_path: Path, capsys):
    (tmp_path / "all.yaml").write_text(MANIFESTS)
    assert main(["check", "-f", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "INCONCLUSIVE" in out
    assert "payments.example" in out
    assert "1 INCONCLUSIVE" in out
