"""Every overlay in deploy/overlays, applied to a real API server as a server-side dry run.

`kubectl apply --server-side --dry-run=server -k deploy/overlays/<name>` runs every object
through the API server's own validation, defaulting and admission without storing it. The API
server has what an installation finds in place: the namespaces the manifests live in (a dry run
creates none), and the CRDs of the Prometheus Operator the prometheus-operator overlay uses
(taken from the operator's Go module by scripts/build-controlplane.sh, the real schemas). A new
overlay directory is picked up by itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from lab.controlplane import ControlPlane
from tests.support.kubetools import DEPLOY, kubectl, namespace, render, wait_established

OVERLAYS = sorted(p.parent.name for p in (DEPLOY / "overlays").glob("*/kustomization.yaml"))


def test_the_overlays_are_found() -> None:
    assert {"plain", "probe-pods", "prometheus-operator", "configmap-expectations"} <= set(OVERLAYS)


@pytest.fixture(scope="module")
def cp(controlplane_bin: Path) -> Iterator[ControlPlane]:
    crds = sorted((controlplane_bin.parent / "crds").glob("*.yaml"))
    assert crds, f"no third-party CRDs beside {controlplane_bin} (scripts/build-controlplane.sh)"
    with ControlPlane(controlplane_bin) as plane:
        for crd in crds:
            kubectl(plane, "apply", "--server-side", "-f", str(crd))
            wait_established(plane, yaml.safe_load(crd.read_text())["metadata"]["name"])
        namespaces = {
            d["metadata"].get("namespace")
            for overlay in OVERLAYS
            for d in render(f"overlays/{overlay}")
        }
        for name in sorted(n for n in namespaces if n):
            namespace(plane, name)
        yield plane


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_api_server_accepts_every_object_of_the_overlay(cp: ControlPlane, overlay: str) -> None:
    path = DEPLOY / "overlays" / overlay
    done = kubectl(cp, "apply", "--server-side", "--dry-run=server", "-k", str(path), check=False)
    assert done.returncode == 0, f"{overlay}:\n{done.stdout}\n{done.stderr}"
    applied = [line for line in done.stdout.splitlines() if line.strip()]
    assert all(line.endswith("serverside-applied (server dry run)") for line in applied), applied
    assert len(applied) == len(render(f"overlays/{overlay}")), "every object went to the server"
    assert "Warning" not in done.stderr, done.stderr
