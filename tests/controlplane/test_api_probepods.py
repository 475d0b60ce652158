"""Probe pods in a cluster: KubernetesProbePods and the collector against the real API server.

The manager runs as the collector's ServiceAccount with the ClusterRole of deploy/overlays/plain and
the probe-pods Role bound in the test's own `shop` namespace (as deploy/overlays/probe-pods binds it
in shop); its `other` namespace has no such Role. The test plays scheduler and kubelet where a pod
must run (binding, status). A control plane of its own: the manager deletes every probe pod in the
namespaces it may use when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from collector.cluster import (
    KubernetesProbePods,
    OwnerReference,
    expectations_needing,
    kubernetes_probe_pods,
    probe_pod_manifest,
)
from collector.core.changes import diff_snapshots
from collector.core.model import Snapshot
from collector.core.probepods import ProbePodRequest
from collector.kube import (
    InventoryUpdate,
    KubeClient,
    KubernetesSource,
    KubeSourceSettings,
    load_kube_config,
)
from collector.loop import Collector
from collector.settings import CollectorSettings
from flowproof.probes import SourceKind
from lab.controlplane import ControlPlane
from tests.support.apiobjects import make_expectations, make_flow, make_policy
from tests.support.kubetools import (
    FE_API,
    apply,
    apply_all,
    create_pod,
    delete,
    namespace,
    ok,
    path_of,
    render,
    set_pod_status,
    unique,
    until,
)

IMAGE = "registry.k8s.io/pause:3.10"
PROBE = ("flowproof.dev/probe-pod", "true")


@pytest.fixture(scope="module")
def plane(
    controlplane_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ControlPlane, str]]:
    """The control plane and a kubeconfig of the collector's ServiceAccount."""
    with ControlPlane(controlplane_bin) as cp:
        kinds = ("Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding")
        crds = [d for d in render("overlays/plain") if d["kind"] == "CustomResourceDefinition"]
        apply_all(cp, crds + [d for d in render("overlays/plain") if d["kind"] in kinds])
        token = cp.service_account_token("flowproof", "flowproof-collector", create=False)
        path = cp.write_kubeconfig(tmp_path_factory.mktemp("probe") / "kubeconfig", token, "c")
        yield cp, str(path)


@dataclass
class Place:
    """A test's namespaces: `shop` (probe pods allowed) and `other` (not)."""

    cp: ControlPlane
    shop: str
    other: str

    def request(self, app: str, where: str | None = None) -> ProbePodRequest:
        return ProbePodRequest(where or self.shop, tuple(sorted([("app", app), PROBE])))

    def probe_pods(self) -> list[str]:
        found = []
        for ns in (self.shop, self.other):
            for pod in ok(self.cp.request("GET", path_of("Pod", "", ns)))["items"]:
                meta = pod["metadata"]
                probe = meta.get("labels", {}).get("flowproof.dev/probe-pod") == "true"
                if probe and not meta.get("deletionTimestamp"):
                    found.append(f"{ns}/{meta['name']}")
        return sorted(found)

    def uid(self, kind: str, name: str, ns: str = "") -> str:
        return str(ok(self.cp.request("GET", path_of(kind, name, ns)))["metadata"]["uid"])


@pytest.fixture
def place(plane: tuple[ControlPlane, str]) -> Place:
    cp, _ = plane
    found = Place(cp, unique("shop"), unique("other"))
    namespace(cp, found.shop)
    namespace(cp, found.other)
    for doc in render("overlays/probe-pods"):
        if doc["kind"] in ("Role", "RoleBinding"):
            doc["metadata"]["namespace"] = found.shop
            ok(apply(cp, doc))
    return found


@contextlib.asynccontextmanager
async def managing(
    kubeconfig: str,
    place: Place,
    *,
    needed_by: Callable[[ProbePodRequest], Sequence[str]] | None = None,
    resync_seconds: float = 30.0,
) -> AsyncIterator[tuple[KubernetesProbePods, asyncio.Event]]:
    """A running manager; stopped (so deleting its pods) on exit unless the test stopped it."""
    manager = KubernetesProbePods(
        KubeClient(load_kube_config(kubeconfig)),
        namespaces=[place.shop],
        image=IMAGE,
        needed_by=needed_by,
        resync_seconds=resync_seconds,
        retry_seconds=0.1,
        stop_timeout_seconds=5,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(manager.run(stop), name="probe-pods-under-test")
    try:
        yield manager, stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def tell(manager: KubernetesProbePods, requests: Sequence[ProbePodRequest]) -> None:
    """Hand `requests` to the manager and wait for the pass that follows."""
    before = manager.passes
    await manager(requests)
    await until(lambda: manager.passes > before, 10)


def contains(stored: Any, sent: Any, where: str = "") -> list[str]:
    """Where `stored` lacks or changed what was `sent` (what the API server added is fine)."""
    if isinstance(sent, Mapping):
        if not isinstance(stored, Mapping):
            return [f"{where}: {stored!r}"]
        return [p for k, v in sent.items() for p in contains(stored.get(k), v, f"{where}.{k}")]
    if isinstance(sent, list):
        if not isinstance(stored, list) or len(stored) != len(sent):
            return [f"{where}: {stored!r} for {sent!r}"]
        return [
            p
            for i, (a, b) in enumerate(zip(stored, sent, strict=True))
            for p in contains(a, b, f"{where}[{i}]")
        ]
    return [] if stored == sent else [f"{where}: {stored!r} for {sent!r}"]


async def test_a_requested_probe_pod_is_stored_exactly_as_specified(
    plane: tuple[ControlPlane, str], place: Place
) -> None:
    _, kubeconfig = plane
    web = place.request("web")
    async with managing(kubeconfig, place) as (manager, _):
        await tell(manager, [web])
        stored = ok(place.cp.request("GET", path_of("Pod", web.name, place.shop)))
        owner = OwnerReference("v1", "Namespace", place.shop, place.uid("Namespace", place.shop))
        sent = probe_pod_manifest(web, image=IMAGE, owners=[owner])
        assert contains(stored, sent) == [], "the API server kept every field the collector sent"
        assert manager.problems == {}


OWNER_CASES = [
    pytest.param(
        ["{shop}/shop-flows"],
        [("FlowExpectations", "shop-flows")],
        id="a FlowExpectations in the pod's namespace that needs it is its controller owner",
    ),
    pytest.param(
        ["{shop}/shop-flows", "{shop}/more-flows"],
        [("FlowExpectations", "more-flows"), ("FlowExpectations", "shop-flows")],
        id="several FlowExpectations that need it all own it, the first is the controller",
    ),
    pytest.param(
        ["{other}/other-flows"],
        [("Namespace", "{shop}")],
        id="a FlowExpectations in another namespace cannot own it: the Namespace does",
    ),
    pytest.param(
        ["{shop}/from-a-configmap"],
        [("Namespace", "{shop}")],
        id="a document that is no custom resource cannot own it: the Namespace does",
    ),
    pytest.param(
        [], [("Namespace", "{shop}")], id="without a known document the Namespace owns it"
    ),
]


@pytest.mark.parametrize(("needed", "owners"), OWNER_CASES)
async def test_the_owner_is_a_valid_controller_reference(
    plane: tuple[ControlPlane, str], place: Place, needed: list[str], owners: list[tuple[str, str]]
) -> None:
    cp, kubeconfig = plane
    for name, ns in (
        ("shop-flows", place.shop),
        ("more-flows", place.shop),
        ("other-flows", place.other),
    ):
        ok(apply(cp, make_expectations(name, ns)))
    keys = sorted(n.format(shop=place.shop, other=place.other) for n in needed)
    web = place.request("web")
    async with managing(kubeconfig, place, needed_by=lambda r: keys) as (manager, _):
        await tell(manager, [web])
        stored = ok(cp.request("GET", path_of("Pod", web.name, place.shop)))
    expected = []
    for i, (kind, name) in enumerate(owners):
        name = name.format(shop=place.shop)
        uid = place.uid(kind, name, "" if kind == "Namespace" else place.shop)
        api_version = "v1" if kind == "Namespace" else "flowproof.dev/v1alpha1"
        expected.append(
            {
                "apiVersion": api_version,
                "kind": kind,
                "name": name,
                "uid": uid,
                "controller": i == 0,
            }
        )
    assert stored["metadata"]["ownerReferences"] == expected


async def test_a_refused_request_is_logged_once_and_nothing_is_created(
    plane: tuple[ControlPlane, str], place: Place, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="collector.cluster")
    _, kubeconfig = plane
    web = place.request("web")
    elsewhere = place.request("web", place.other)
    helm = ProbePodRequest(place.shop, (("app.kubernetes.io/managed-by", "helm"), PROBE))
    reasons = {
        elsewhere.key: f"namespace {place.other!r} is not in probe_pod_namespaces ({place.shop})",
        helm.key: "its pods need label app.kubernetes.io/managed-by=helm",
    }
    async with managing(kubeconfig, place) as (manager, _):
        await tell(manager, [elsewhere, helm, web])
        await tell(manager, [elsewhere, helm, web])
        for key, reason in reasons.items():
            assert reason in manager.problems[key] and "INCONCLUSIVE" in manager.problems[key]
        assert place.probe_pods() == [web.key]
        await tell(manager, [web])
        assert manager.problems == {}, "a request no longer made is no longer a problem"
    for reason in reasons.values():
        assert len([r for r in caplog.records if reason in r.getMessage()]) == 1


async def test_probe_pods_no_longer_requested_are_deleted_and_nothing_else(
    plane: tuple[ControlPlane, str], place: Place
) -> None:
    cp, kubeconfig = plane

    def stale(ns: str, name: str) -> dict[str, Any]:
        labels = {
            "app": "old",
            "flowproof.dev/probe-pod": "true",
            "app.kubernetes.io/managed-by": "flowproof",
        }
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"containers": [{"name": "c", "image": IMAGE}]},
        }

    create_pod(cp, stale(place.shop, "flowproof-probe-0000000000"))
    create_pod(cp, stale(place.other, "flowproof-probe-1111111111"))  # not ours to touch
    create_pod(
        cp,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "api", "namespace": place.shop, "labels": {"app": "api"}},
            "spec": {"containers": [{"name": "c", "image": IMAGE}]},
        },
    )
    web, cache = place.request("web"), place.request("cache")
    async with managing(kubeconfig, place) as (manager, _):
        await tell(manager, [web, cache])
        assert place.probe_pods() == sorted(
            [f"{place.other}/flowproof-probe-1111111111", web.key, cache.key]
        )
        await tell(manager, [web])
        assert place.probe_pods() == sorted([f"{place.other}/flowproof-probe-1111111111", web.key])
    left = {
        p["metadata"]["name"]
        for ns in (place.shop, place.other)
        for p in ok(cp.request("GET", path_of("Pod", "", ns)))["items"]
    }
    assert left == {"flowproof-probe-1111111111", "api"}, (
        "on shutdown every probe pod in an allowed namespace goes, nothing else"
    )


async def test_a_probe_pod_deleted_by_someone_else_comes_back_at_the_next_resync(
    plane: tuple[ControlPlane, str], place: Place
) -> None:
    cp, kubeconfig = plane
    web = place.request("web")
    async with managing(kubeconfig, place, resync_seconds=0.3) as (manager, _):
        await tell(manager, [web])
        first = place.uid("Pod", web.name, place.shop)
        delete(cp, "Pod", web.name, place.shop)
        await until(
            lambda: (
                place.probe_pods() == [web.key] and place.uid("Pod", web.name, place.shop) != first
            ),
            5,
        )


async def test_the_collector_creates_probes_from_and_deletes_a_probe_pod(
    plane: tuple[ControlPlane, str], place: Place
) -> None:
    """FlowExpectations whose `from` matches no running pod → a probe pod (owned by it) → once
    running, the planner probes from it like any pod → the expectation goes → the pod goes."""
    cp, kubeconfig = plane
    create_pod(
        cp,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "api", "namespace": place.shop, "labels": {"app": "api"}},
            "spec": {
                "nodeName": "node-1",
                "containers": [{"name": "c", "image": IMAGE, "ports": [{"containerPort": 8080}]}],
            },
            "status": {
                "phase": "Running",
                "podIP": "10.244.1.11",
                "podIPs": [{"ip": "10.244.1.11"}],
            },
        },
    )
    ok(apply(cp, make_policy("api-ingress", place.shop)))
    ok(
        apply(
            cp,
            make_expectations(
                "shop-flows", place.shop, flows=[make_flow(source="web", destination="api")]
            ),
        )
    )
    settings = CollectorSettings(
        token="t",
        probe_pods="kubernetes",
        probe_pod_namespaces=(place.shop,),
        probe_pod_image=IMAGE,
    )
    configuration = load_kube_config(kubeconfig)
    manager = kubernetes_probe_pods(configuration, settings)
    manager.retry_seconds = 0.1
    collector = Collector(settings, probe_pods=manager)
    manager.needed_by = expectations_needing(collector)
    previous: list[Snapshot | None] = [None]

    async def on_update(update: InventoryUpdate) -> None:
        change = diff_snapshots(
            previous[0], update.snapshot, generation=1, at=collector.clock.time()
        )
        previous[0] = update.snapshot
        await collector.on_snapshot(update.snapshot, change)

    web = place.request("web")
    stop = asyncio.Event()
    async with KubernetesSource(
        configuration,
        settings=KubeSourceSettings(backoff_initial_seconds=0.05),
        on_update=on_update,
    ) as source:
        tasks = [asyncio.create_task(source.run()), asyncio.create_task(manager.run(stop))]
        try:
            await until(lambda: web.key in place.probe_pods(), 30)
            stored = ok(cp.request("GET", path_of("Pod", web.name, place.shop)))
            assert [
                (o["kind"], o["name"], o["uid"]) for o in stored["metadata"]["ownerReferences"]
            ] == [
                (
                    "FlowExpectations",
                    "shop-flows",
                    place.uid("FlowExpectations", "shop-flows", place.shop),
                )
            ]
            # The scheduler binds it, the kubelet reports it running (never Ready).
            binding = {
                "apiVersion": "v1",
                "kind": "Binding",
                "metadata": {"name": web.name},
                "target": {"apiVersion": "v1", "kind": "Node", "name": "node-1"},
            }
            ok(cp.request("POST", path_of("Pod", web.name, place.shop) + "/binding", binding))
            set_pod_status(
                cp,
                place.shop,
                web.name,
                {
                    "phase": "Running",
                    "podIP": "10.244.1.50",
                    "podIPs": [{"ip": "10.244.1.50"}],
                    "conditions": [
                        {"type": "flowproof.dev/never-ready", "status": "False"},
                        {"type": "Ready", "status": "False"},
                    ],
                },
            )

            def probing_from_it() -> bool:
                return any(
                    f.source.name == web.name and f.template is not None
                    for f in collector.planner.plan.flows.values()
                )

            await until(probing_from_it, 30)
            [flow] = [
                f
                for f in collector.planner.plan.flows.values()
                if f.kind == "declared" and f.expectation == f"{place.shop}/shop-flows"
            ]
            assert flow.source.uid == place.uid("Pod", web.name, place.shop)
            assert (flow.source.node, flow.source.ips) == ("node-1", ("10.244.1.50",))
            assert flow.template is not None and flow.template.source_kind == SourceKind.PROBE_POD
            await manager.reconcile()
            assert place.probe_pods() == [web.key], "a running probe pod that is needed stays"

            delete(cp, "FlowExpectations", "shop-flows", place.shop)
            await until(lambda: place.probe_pods() == [], 30)  # deleted, Terminating (bound)
            gone = ok(cp.request("GET", path_of("Pod", web.name, place.shop)))
            assert gone["metadata"]["deletionTimestamp"], (
                "the collector deleted it; a kubelet ends it"
            )
        finally:
            stop.set()
            tasks[0].cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    assert (
        ok(cp.request("GET", f"{FE_API}/namespaces/{place.shop}/flowexpectations"))["items"] == []
    )
