"""A real control plane (etcd + kube-apiserver, built from Go modules) for the tests here.

`controlplane_bin` (tests/conftest.py) builds or finds the binaries; a failed build fails these
tests, never skips them. The session's control plane keeps ConfigMaps out of the watch cache (so
`compact_etcd()` gives them 410 Gone) and has the FlowExpectations CRD from deploy/crds applied;
tests that need another shape (pods and policies uncached, an audit log) start their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client

from lab.controlplane import ControlPlane
from tests.support.kubetools import apply_all, install_crd, render

ClientFactory = Callable[..., client.ApiClient]


@pytest.fixture(scope="session")
def controlplane(controlplane_bin: Path) -> Iterator[ControlPlane]:
    """One control plane for the session, the FlowExpectations CRD installed."""
    with ControlPlane(controlplane_bin, uncached_resources=["configmaps"], audit_log=True) as cp:
        install_crd(cp)
        yield cp


@pytest.fixture
def make_client(controlplane: ControlPlane) -> Iterator[ClientFactory]:
    """Official-client ApiClients for the control plane: the admin token unless told another."""
    made: list[client.ApiClient] = []

    def make(token: str | None = None) -> client.ApiClient:
        cfg = client.Configuration(
            host=controlplane.url,
            ssl_ca_cert=str(controlplane.ca_path),
            api_key={"authorization": token or controlplane.admin_token},
            api_key_prefix={"authorization": "Bearer"},
        )
        api = client.ApiClient(cfg)
        made.append(api)
        return api

    yield make
    for api in made:
        api.close()


@pytest.fixture
def core(make_client: ClientFactory) -> client.CoreV1Api:
    """CoreV1Api of the official client, as the admin."""
    return client.CoreV1Api(make_client())


COLLECTOR_KINDS = ("Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding")


@pytest.fixture(scope="session")
def collector_kubeconfig(
    controlplane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """A kubeconfig with the token of the collector's ServiceAccount, bound to exactly the
    ClusterRole that deploy/overlays/plain ships (the collector as it runs in a cluster)."""
    apply_all(controlplane, [d for d in render("overlays/plain") if d["kind"] in COLLECTOR_KINDS])
    token = controlplane.service_account_token("flowproof", "flowproof-collector", create=False)
    path = tmp_path_factory.mktemp("collector") / "kubeconfig"
    return str(controlplane.write_kubeconfig(path, token, "flowproof-collector"))
