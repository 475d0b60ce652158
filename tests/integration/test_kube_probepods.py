"""Probe pods in a cluster: KubernetesProbePods through the real `kubernetes` client and the fake API.

The fake API server records every POST and DELETE body as received, so the pod the collector asks
for is checked exactly; a test plays the kubelet by giving a created pod a node and an IP.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from collector.cluster import (
    KubernetesProbePods,
    expectations_needing,
    kubernetes_probe_pods,
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
from tests.fakeapi import FakeApiServer
from tests.support.apiobjects import (
    TOKEN,
    kubeconfig_for,
    make_expectations,
    make_flow,
    make_namespace,
    make_pod,
    make_policy,
)

IMAGE = "registry.k8s.io/pause:3.10"
WEB = ProbePodRequest("shop", (("app", "web"), ("flowproof.dev/probe-pod", "true")))
CACHE = ProbePodRequest("shop", (("app", "cache"), ("flowproof.dev/probe-pod", "true")))
ELSEWHERE = ProbePodRequest("other", (("app", "web"), ("flowproof.dev/probe-pod", "true")))
PODS_PATH = "/api/v1/namespaces/shop/pods"


async def eventually(condition: Callable[[], object], within: float = 3.0) -> None:
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer(token=TOKEN) as fake:
        fake.create(make_namespace("shop"))
        fake.create(make_namespace("other"))
        yield fake


@pytest.fixture
def kubeconfig(tmp_path: Path, server: FakeApiServer) -> str:
    return kubeconfig_for(tmp_path / "kubeconfig", server.url)


@contextlib.asynccontextmanager
async def managing(
    kubeconfig: str,
    *,
    namespaces: Sequence[str] = ("shop",),
    needed_by: Callable[[ProbePodRequest], Sequence[str]] | None = None,
    resync_seconds: float = 30.0,
) -> AsyncIterator[tuple[KubernetesProbePods, asyncio.Event]]:
    """A running manager; stopped (so deleting its pods) on exit unless the test stopped it."""
    manager = KubernetesProbePods(
        KubeClient(load_kube_config(kubeconfig)),
        namespaces=namespaces,
        image=IMAGE,
        needed_by=needed_by,
        resync_seconds=resync_seconds,
        retry_seconds=0.05,
        stop_timeout_seconds=3,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(manager.run(stop), name="probe-pods-under-test")
    try:
        yield manager, stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def tell(manager: KubernetesProbePods, requests: Sequence[ProbePodRequest]) -> None:
    """Hand `requests` to the manager and wait for the pass that follows."""
    before = manager.passes
    await manager(requests)
    await eventually(lambda: manager.passes > before)


def probe_pods(server: FakeApiServer) -> list[str]:
    return [
        f"{p['metadata']['namespace']}/{p['metadata']['name']}"
        for p in server.objects("Pod")
        if p["metadata"].get("labels", {}).get("flowproof.dev/probe-pod") == "true"
    ]


def owner(kind: str, name: str, uid: str, *, controller: bool = True) -> dict[str, Any]:
    api_version = "v1" if kind == "Namespace" else "flowproof.dev/v1alpha1"
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": controller,
    }


def uid_of(server: FakeApiServer, kind: str, namespace: str, name: str) -> str:
    found = server.get(kind, namespace, name)
    assert found is not None, f"{kind} {namespace}/{name}"
    return str(found["metadata"]["uid"])


def schedule(server: FakeApiServer, namespace: str, name: str, ip: str) -> None:
    """Play scheduler and kubelet: the pod gets a node, an IP and phase Running (never Ready)."""
    pod = server.get("Pod", namespace, name)
    assert pod is not None
    pod = copy.deepcopy(pod)
    pod["spec"]["nodeName"] = "node-1"
    pod["status"] = {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [
            {"type": "flowproof.dev/never-ready", "status": "False"},
            {"type": "Ready", "status": "False"},
        ],
    }
    server.update(pod)


# --- the pod --------------------------------------------------------------------------------------


async def test_a_requested_probe_pod_is_created_exactly_as_specified(
    server: FakeApiServer, kubeconfig: str
) -> None:
    async with managing(kubeconfig) as (manager, _):
        await tell(manager, [WEB])
        [(path, body)] = server.creations
    assert path == PODS_PATH
    description = body["metadata"].pop("annotations")["kubernetes.io/description"]
    assert "flowproof probe pod" in description
    assert body == {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": WEB.name,
            "namespace": "shop",
            "labels": {
                "app": "web",
                "flowproof.dev/probe-pod": "true",
                "app.kubernetes.io/managed-by": "flowproof",
            },
            "ownerReferences": [
                owner("Namespace", "shop", uid_of(server, "Namespace", "", "shop"))
            ],
        },
        "spec": {
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "readinessGates": [{"conditionType": "flowproof.dev/never-ready"}],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 1,
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 65535,
                "runAsGroup": 65535,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "probe",
                    "image": IMAGE,
                    "imagePullPolicy": "IfNotPresent",
                    "resources": {
                        "requests": {"cpu": "1m", "memory": "8Mi"},
                        "limits": {"cpu": "10m", "memory": "16Mi"},
                    },
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }
    assert manager.problems == {}


OWNER_CASES = [
    pytest.param(
        ["shop/shop-flows"],
        [("FlowExpectations", "shop-flows")],
        id="a FlowExpectations in the pod's namespace that needs it is its controller owner",
    ),
    pytest.param(
        ["shop/shop-flows", "shop/more-flows"],
        [("FlowExpectations", "more-flows"), ("FlowExpectations", "shop-flows")],
        id="several FlowExpectations that need it all own it, the first is the controller",
    ),
    pytest.param(
        ["other/other-flows"],
        [("Namespace", "shop")],
        id="a FlowExpectations in another namespace cannot own it: the Namespace does",
    ),
    pytest.param(
        ["shop/from-a-configmap"],
        [("Namespace", "shop")],
        id="a document that is no custom resource cannot own it: the Namespace does",
    ),
    pytest.param(
        [],
        [("Namespace", "shop")],
        id="without a known document the Namespace owns it",
    ),
]


@pytest.mark.parametrize(("needed", "owners"), OWNER_CASES)
async def test_the_owner_is_a_valid_controller_reference(
    server: FakeApiServer,
    kubeconfig: str,
    needed: list[str],
    owners: list[tuple[str, str]],
) -> None:
    server.create(make_expectations("shop-flows", "shop"))
    server.create(make_expectations("more-flows", "shop"))
    server.create(make_expectations("other-flows", "other"))
    async with managing(kubeconfig, needed_by=lambda r: sorted(needed)) as (manager, _):
        await tell(manager, [WEB])
    [(_, body)] = server.creations
    expected = []
    for i, (kind, name) in enumerate(owners):
        namespace = "" if kind == "Namespace" else "shop"
        uid = uid_of(server, kind, namespace, name)
        expected.append(owner(kind, name, uid, controller=i == 0))
    assert body["metadata"]["ownerReferences"] == expected


# --- what is refused ------------------------------------------------------------------------------

REFUSED_CASES = [
    pytest.param(
        ELSEWHERE,
        "namespace 'other' is not in probe_pod_namespaces (shop)",
        id="a namespace that is not allowed gets no probe pod",
    ),
    pytest.param(
        ProbePodRequest(
            "shop",
            (("app.kubernetes.io/managed-by", "helm"), ("flowproof.dev/probe-pod", "true")),
        ),
        "its pods need label app.kubernetes.io/managed-by=helm",
        id="pods that must be managed by someone else cannot be stood for",
    ),
]


@pytest.mark.parametrize(("request_", "reason"), REFUSED_CASES)
async def test_a_refused_request_is_logged_once_and_nothing_is_created(
    server: FakeApiServer,
    kubeconfig: str,
    caplog: pytest.LogCaptureFixture,
    request_: ProbePodRequest,
    reason: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="collector.cluster")
    async with managing(kubeconfig) as (manager, _):
        await tell(manager, [request_, WEB])
        await tell(manager, [request_, WEB])
        assert reason in manager.problems[request_.key]
        assert "INCONCLUSIVE" in manager.problems[request_.key]
        assert probe_pods(server) == [WEB.key]
        assert [path for path, _ in server.creations] == [PODS_PATH]
        await tell(manager, [WEB])
        assert manager.problems == {}, "a request no longer made is no longer a problem"
    logged = [r.getMessage() for r in caplog.records if reason in r.getMessage()]
    assert len(logged) == 1, logged
    assert request_.key in logged[0]


# --- deleting -------------------------------------------------------------------------------------


def stale_probe_pod(namespace: str, name: str) -> dict[str, Any]:
    pod = make_pod(name, namespace, labels={"app": "old"}, ip=None)
    pod["metadata"]["labels"].update(
        {"flowproof.dev/probe-pod": "true", "app.kubernetes.io/managed-by": "flowproof"}
    )
    return pod


async def test_probe_pods_no_longer_requested_are_deleted_and_nothing_else(
    server: FakeApiServer, kubeconfig: str
) -> None:
    server.create(stale_probe_pod("shop", "flowproof-probe-0000000000"))
    server.create(stale_probe_pod("other", "flowproof-probe-1111111111"))  # not ours to touch
    server.create(make_pod("api", labels={"app": "api"}))
    stale_uid = uid_of(server, "Pod", "shop", "flowproof-probe-0000000000")
    async with managing(kubeconfig) as (manager, _):
        await tell(manager, [WEB, CACHE])
        assert probe_pods(server) == sorted(
            ["other/flowproof-probe-1111111111", WEB.key, CACHE.key]
        )
        assert server.deletions == [
            (
                f"{PODS_PATH}/flowproof-probe-0000000000",
                {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": stale_uid}},
            )
        ]
        cache_uid = uid_of(server, "Pod", "shop", CACHE.name)
        await tell(manager, [WEB])
        assert probe_pods(server) == sorted(["other/flowproof-probe-1111111111", WEB.key])
        assert server.deletions[-1] == (
            f"{PODS_PATH}/{CACHE.name}",
            {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": cache_uid}},
        )
    assert [p["metadata"]["name"] for p in server.objects("Pod")] == [
        "flowproof-probe-1111111111",
        "api",
    ], "on shutdown every probe pod in an allowed namespace goes, nothing else"


async def test_shutdown_deletes_every_probe_pod_and_closes(
    server: FakeApiServer, kubeconfig: str
) -> None:
    async with managing(kubeconfig) as (manager, stop):
        await tell(manager, [WEB, CACHE])
        assert probe_pods(server) == sorted([WEB.key, CACHE.key])
        stop.set()
        await eventually(lambda: probe_pods(server) == [])
    assert len(server.deletions) == 2


async def test_a_probe_pod_deleted_by_someone_else_comes_back_at_the_next_resync(
    server: FakeApiServer, kubeconfig: str
) -> None:
    async with managing(kubeconfig, resync_seconds=0.2) as (manager, _):
        await tell(manager, [WEB])
        first = uid_of(server, "Pod", "shop", WEB.name)
        server.delete("Pod", "shop", WEB.name)
        await eventually(lambda: probe_pods(server) == [WEB.key], within=2)
        assert uid_of(server, "Pod", "shop", WEB.name) != first


async def test_api_errors_are_retried_and_never_end_the_loop(
    server: FakeApiServer, kubeconfig: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="collector.cluster")
    server.fail_next(1, status=500, path_contains="/api/v1/pods")  # the list
    server.fail_next(2, status=500, path_contains=PODS_PATH)  # two creates
    async with managing(kubeconfig) as (manager, _):
        await manager([WEB])
        await eventually(lambda: probe_pods(server) == [WEB.key])
        assert manager.problems == {}
        server.forbid(PODS_PATH, method="POST")
        await tell(manager, [WEB, CACHE])
        await tell(manager, [WEB, CACHE])
        assert "403" in manager.problems[CACHE.key]
        assert probe_pods(server) == [WEB.key]
    refusals = [
        r for r in caplog.records if CACHE.key in r.getMessage() and "403" in r.getMessage()
    ]
    assert len(refusals) == 1, "a persistent refusal is logged once"


# --- with the collector ---------------------------------------------------------------------------


async def test_the_collector_creates_probes_from_and_deletes_a_probe_pod(
    server: FakeApiServer, kubeconfig: str
) -> None:
    """FlowExpectations whose `from` matches no running pod → a probe pod (owned by it) → once
    running, the planner probes from it like any pod → the expectation goes → the pod goes."""
    server.create(make_pod("api", labels={"app": "api"}, ip="10.244.1.11"))
    server.create(make_policy("api-ingress"))
    server.create(
        make_expectations("shop-flows", flows=[make_flow(source="web", destination="api")])
    )
    settings = CollectorSettings(
        token="t",
        probe_pods="kubernetes",
        probe_pod_namespaces=("shop",),
        probe_pod_image=IMAGE,
    )
    configuration = load_kube_config(kubeconfig)
    manager = kubernetes_probe_pods(configuration, settings)
    manager.retry_seconds = 0.05
    collector = Collector(settings, probe_pods=manager)
    manager.needed_by = expectations_needing(collector)
    previous: list[Snapshot | None] = [None]

    async def on_update(update: InventoryUpdate) -> None:
        change = diff_snapshots(
            previous[0], update.snapshot, generation=1, at=collector.clock.time()
        )
        previous[0] = update.snapshot
        await collector.on_snapshot(update.snapshot, change)

    stop = asyncio.Event()
    async with KubernetesSource(
        configuration,
        settings=KubeSourceSettings(backoff_initial_seconds=0.05),
        on_update=on_update,
    ) as source:
        tasks = [asyncio.create_task(source.run()), asyncio.create_task(manager.run(stop))]
        try:
            await eventually(lambda: probe_pods(server) == [WEB.key])
            [(_, body)] = server.creations
            assert body["metadata"]["ownerReferences"] == [
                owner(
                    "FlowExpectations",
                    "shop-flows",
                    uid_of(server, "FlowExpectations", "shop", "shop-flows"),
                )
            ]
            schedule(server, "shop", WEB.name, "10.244.1.50")

            def probing_from_it() -> bool:
                plan = collector.planner.plan
                return plan.probe_pods == () and any(
                    f.source.name == WEB.name for f in plan.flows.values()
                )

            await eventually(probing_from_it)
            [flow] = [f for f in collector.planner.plan.flows.values() if f.kind == "declared"]
            assert flow.source.uid == uid_of(server, "Pod", "shop", WEB.name)
            assert flow.source.node == "node-1"
            assert flow.source.ips == ("10.244.1.50",)
            assert flow.template.source_kind == SourceKind.PROBE_POD
            await manager.reconcile()
            assert probe_pods(server) == [WEB.key], "a running probe pod that is needed stays"

            server.delete("FlowExpectations", "shop", "shop-flows")
            await eventually(lambda: probe_pods(server) == [])
            assert server.deletions[-1][0] == f"{PODS_PATH}/{WEB.name}"
        finally:
            stop.set()
            tasks[0].cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
