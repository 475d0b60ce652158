"""RBAC of the policy kinds: each list and watch deploy/ grants on another policy kind is needed.

deploy/base/collector.yaml grants list and watch on the Network Policy API's cluster policy kinds
(modelled) and on other plugins' policy kinds (read for their presence): WATCHED_POLICY_RESOURCES.
A control plane of this module's own (so the kinds it installs never reach other tests) gets a
CRD for each of those resources and one object of each. As the collector's ServiceAccount with
every shipped grant, the Kubernetes source reads every object and sees a new one at once. With the
list of one resource taken away it cannot read that kind's objects (the model is then unknown
everywhere, an UnmodelledPolicy without a name); with its watch taken away a new object is not seen.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from collector.core.model import Snapshot
from collector.kube import KubernetesSource, load_kube_config
from collector.reading.clusterpolicies import CLUSTER_POLICY_GROUP
from collector.reading.objects import WATCHED_POLICY_RESOURCES
from lab.controlplane import ControlPlane
from tests.support.kubetools import (
    grants,
    install_crd,
    namespace,
    ok,
    render,
    service_account,
    unique,
    until,
    wait_established,
)
from tests.support.sourcetools import FAST

pytestmark = pytest.mark.timeout(600)

SYNC_SECONDS = 8.0
CHANGE_SECONDS = 4.0
AT_ONCE = 6  # sources running at the same time (the control plane shares two cores)

# resource -> (Kind, version, namespaced): as each project serves it.
KINDS: dict[tuple[str, str], tuple[str, str, bool]] = {
    (CLUSTER_POLICY_GROUP, "clusternetworkpolicies"): ("ClusterNetworkPolicy", "v1alpha2", False),
    (CLUSTER_POLICY_GROUP, "adminnetworkpolicies"): ("AdminNetworkPolicy", "v1alpha1", False),
    (CLUSTER_POLICY_GROUP, "baselineadminnetworkpolicies"): (
        "BaselineAdminNetworkPolicy",
        "v1alpha1",
        False,
    ),
    ("cilium.io", "ciliumnetworkpolicies"): ("CiliumNetworkPolicy", "v2", True),
    ("cilium.io", "ciliumclusterwidenetworkpolicies"): (
        "CiliumClusterwideNetworkPolicy",
        "v2",
        False,
    ),
    ("cilium.io", "ciliumegressgatewaypolicies"): ("CiliumEgressGatewayPolicy", "v2", False),
    ("cilium.io", "ciliumlocalredirectpolicies"): ("CiliumLocalRedirectPolicy", "v2", True),
    ("crd.antrea.io", "networkpolicies"): ("NetworkPolicy", "v1beta1", True),
    ("crd.antrea.io", "clusternetworkpolicies"): ("ClusterNetworkPolicy", "v1beta1", False),
    ("k8s.ovn.org", "egressfirewalls"): ("EgressFirewall", "v1", True),
    ("k8s.ovn.org", "adminpolicybasedexternalroutes"): (
        "AdminPolicyBasedExternalRoute",
        "v1",
        False,
    ),
    ("network.openshift.io", "egressnetworkpolicies"): ("EgressNetworkPolicy", "v1", True),
    ("networking.gke.io", "fqdnnetworkpolicies"): ("FQDNNetworkPolicy", "v1alpha3", True),
    ("crd.nsx.vmware.com", "securitypolicies"): ("SecurityPolicy", "v1alpha1", True),
    **{
        (group, plural): (kind, version, plural in ("networkpolicies", "stagednetworkpolicies"))
        for group, version in (("crd.projectcalico.org", "v1"), ("projectcalico.org", "v3"))
        for plural, kind in (
            ("networkpolicies", "NetworkPolicy"),
            ("globalnetworkpolicies", "GlobalNetworkPolicy"),
            ("stagednetworkpolicies", "StagedNetworkPolicy"),
            ("stagedglobalnetworkpolicies", "StagedGlobalNetworkPolicy"),
            ("stagedkubernetesnetworkpolicies", "StagedKubernetesNetworkPolicy"),
        )
    },
}
Resource = tuple[str, str]
BANP: Resource = (CLUSTER_POLICY_GROUP, "baselineadminnetworkpolicies")
RESOURCES: list[Resource] = sorted(
    (group, plural) for group, plurals in WATCHED_POLICY_RESOURCES.items() for plural in plurals
)


def test_every_watched_policy_resource_is_granted_list_and_watch_and_has_a_kind_here() -> None:
    shipped = set()
    for doc in render("overlays/plain"):
        if doc["kind"] == "ClusterRole" and doc["metadata"]["name"].startswith("flowproof"):
            shipped |= grants(doc["rules"])
    for group, plural in RESOURCES:
        assert {(group, plural, "list"), (group, plural, "watch")} <= shipped, (group, plural)
    assert set(KINDS) == set(RESOURCES)


def _crd(group: str, plural: str) -> dict[str, Any]:
    kind, version, namespaced = KINDS[(group, plural)]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{group}",
            # A *.k8s.io group needs this, as the Network Policy API's own CRDs carry it.
            "annotations": {
                "api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/network-policy-api/pull/30"
            },
        },
        "spec": {
            "group": group,
            "scope": "Namespaced" if namespaced else "Cluster",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind},
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }


def _object(resource: Resource, name: str, where: str) -> tuple[str, dict[str, Any]]:
    """(the collection's path, an object of the resource named `name`)."""
    group, plural = resource
    kind, version, namespaced = KINDS[resource]
    spec: dict[str, Any] = {}
    if group == CLUSTER_POLICY_GROUP:  # a policy the reader takes as it is
        subject = {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": where}}}
        specs: dict[str, dict[str, Any]] = {
            "ClusterNetworkPolicy": {"tier": "Admin", "priority": 10, "subject": subject},
            "AdminNetworkPolicy": {"priority": 10, "subject": subject},
            "BaselineAdminNetworkPolicy": {"subject": subject},
        }
        spec = specs[kind]
        if kind == "BaselineAdminNetworkPolicy":
            name = "default"  # the only name a BaselineAdminNetworkPolicy may have
    base = f"/apis/{group}/{version}"
    path = f"{base}/namespaces/{where}/{plural}" if namespaced else f"{base}/{plural}"
    meta: dict[str, Any] = {"name": name}
    if namespaced:
        meta["namespace"] = where
    return path, {"apiVersion": f"{group}/{version}", "kind": kind, "metadata": meta, "spec": spec}


def _holds(snapshot: Snapshot, resource: Resource, name: str, where: str) -> bool:
    """Does the snapshot hold the object (modelled, or as a plugin's object by name)?"""
    group, _ = resource
    kind, _, namespaced = KINDS[resource]
    if group == CLUSTER_POLICY_GROUP:
        return any(p.kind == kind and p.name == name for p in snapshot.cluster_policies)
    return any(
        u.group == group
        and u.kind == kind
        and u.name == name
        and u.namespace == (where if namespaced else "")
        for u in snapshot.unmodelled
    )


@pytest.fixture(scope="module")
def kinds_plane(controlplane_bin: Path) -> Iterator[ControlPlane]:
    """A control plane of this module's own with every watched policy kind installed."""
    with ControlPlane(controlplane_bin) as cp:
        install_crd(cp)
        for group, plural in RESOURCES:
            crd = _crd(group, plural)
            ok(cp.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd))
        for group, plural in RESOURCES:
            wait_established(cp, f"{plural}.{group}")
        yield cp


@dataclass
class Scenario:
    cp: ControlPlane
    without: tuple[Resource, str] | None
    tmp: Path
    home: str = field(default_factory=lambda: unique("fp"))
    shop: str = field(default_factory=lambda: unique("shop"))
    works: dict[str, bool] = field(default_factory=dict)

    @property
    def resources(self) -> list[Resource]:
        """The resources this scenario checks: every one with all grants, else the one."""
        return RESOURCES if self.without is None else [self.without[0]]

    def setup(self) -> str:
        shipped = set()
        for doc in render("overlays/plain"):
            if doc["kind"] == "ClusterRole" and doc["metadata"]["name"].startswith("flowproof"):
                shipped |= grants(doc["rules"])
        if self.without is not None:
            (group, plural), verb = self.without
            shipped.discard((group, plural, verb))
        token = service_account(self.cp, self.home, "flowproof-collector", cluster=shipped)
        namespace(self.cp, self.shop)
        for resource in self.resources:
            path, doc = _object(resource, f"first-{self.shop}", self.shop)
            if resource == BANP:  # one per cluster, named default: this scenario's own
                self.cp.request("DELETE", f"{path}/default")
            ok(self.cp.request("POST", path, doc), f"create {path}")
        kubeconfig = self.tmp / f"{self.home}.kubeconfig"
        return str(self.cp.write_kubeconfig(kubeconfig, token, "flowproof-collector"))


async def _seen(check: Any, within: float) -> bool:
    with contextlib.suppress(AssertionError):
        await until(check, within)
        return True
    return False


async def exercise(s: Scenario, gate: asyncio.Semaphore) -> None:
    async with gate:
        kubeconfig = await asyncio.to_thread(s.setup)
        settings = replace(FAST, backoff_max_seconds=0.3)
        async with KubernetesSource(load_kube_config(kubeconfig), settings=settings) as source:
            task = asyncio.create_task(source.run())
            try:
                try:
                    await asyncio.wait_for(source.wait_synced(), SYNC_SECONDS)
                    s.works["sync"] = True
                except TimeoutError:
                    s.works["sync"] = False
                checks: dict[str, Any] = {}
                for resource in s.resources:
                    path, doc = _object(resource, f"first-{s.shop}", s.shop)
                    name = doc["metadata"]["name"]
                    s.works[f"{resource} read"] = _holds(source.snapshot, resource, name, s.shop)
                    if resource == BANP:  # one per cluster: the change is its deletion
                        await asyncio.to_thread(s.cp.request, "DELETE", f"{path}/{name}")
                        checks[f"{resource} changes"] = lambda r=resource: (
                            not _holds(source.snapshot, r, "default", s.shop)
                        )
                        continue
                    path, doc = _object(resource, f"late-{s.shop}", s.shop)
                    await asyncio.to_thread(s.cp.request, "POST", path, doc)
                    checks[f"{resource} changes"] = lambda r=resource, n=doc["metadata"]["name"]: (
                        _holds(source.snapshot, r, n, s.shop)
                    )
                results = await asyncio.gather(*(_seen(c, CHANGE_SECONDS) for c in checks.values()))
                s.works |= dict(zip(checks, results, strict=True))
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


async def test_each_list_and_watch_of_a_policy_kind_is_needed(
    kinds_plane: ControlPlane, tmp_path: Path
) -> None:
    # The baseline first, alone; the scenarios of BaselineAdminNetworkPolicy (one per cluster)
    # one after the other; the others side by side.
    everything = Scenario(kinds_plane, None, tmp_path)
    await exercise(everything, asyncio.Semaphore(1))
    expected = {"sync": True} | {
        f"{r} {part}": True for r in RESOURCES for part in ("read", "changes")
    }
    assert everything.works == expected, f"with every grant: {everything.works}"

    removals = [(r, verb) for r in RESOURCES for verb in ("list", "watch")]
    scenarios = [Scenario(kinds_plane, removal, tmp_path) for removal in removals]
    gate = asyncio.Semaphore(AT_ONCE)
    await asyncio.gather(
        *(exercise(s, gate) for s in scenarios if s.without and s.without[0] != BANP)
    )
    for s in scenarios:
        if s.without and s.without[0] == BANP:
            await exercise(s, asyncio.Semaphore(1))
    for s in scenarios:
        assert s.without is not None
        resource, verb = s.without
        assert s.works["sync"], f"without {verb} on {resource} the source still syncs"
        if verb == "list":
            assert not s.works[f"{resource} read"], f"without list: {resource} read ({s.works})"
        else:
            assert s.works[f"{resource} read"], f"without watch it still lists: {s.works}"
            assert not s.works[f"{resource} changes"], (
                f"without watch: {resource} changes still seen ({s.works})"
            )
