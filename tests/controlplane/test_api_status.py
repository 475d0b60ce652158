"""FlowExpectations status written by the collector to a real API server.

A real Collector is fed by a KubernetesSource (as the runtime feeds it) running as the collector's
ServiceAccount with the ClusterRole deploy/ ships; probe results are handed to it as an agent's
would be. Each write is a merge patch of `/status` made against the resourceVersion the source read:
when the object changed meanwhile the API server answers 409 and the write is made again once the
source has the new version; when it was deleted, 404, and nothing is written. What was sent is read
from the API server's audit log. A control plane of its own: the publisher writes every object it
sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from collector.cluster import publish_statuses, status_publisher
from collector.core.changes import diff_snapshots
from collector.core.model import Snapshot
from collector.kube import InventoryUpdate, KubernetesSource, KubeSourceSettings, load_kube_config
from collector.loop import Collector
from collector.settings import CollectorSettings
from flowproof.probes import Outcome, ProbeResult
from lab.controlplane import ControlPlane
from tests.support.apiobjects import make_expectations, make_flow, make_policy
from tests.support.clock import ManualClock
from tests.support.kubetools import (
    COLLECTOR_USER,
    FE_API,
    apply,
    apply_all,
    audited,
    create_pod,
    delete,
    install_crd,
    namespace,
    ok,
    render,
    service_account,
    unique,
    until,
)

NOW = 1_800_000_000.0
NOW_TEXT = "2027-01-15T08:00:00Z"
ZERO = dict.fromkeys(
    (
        "PASS",
        "REQUIRED_BLOCKED",
        "FORBIDDEN_OPEN",
        "POLICY_MISMATCH",
        "ENFORCEMENT_DRIFT",
        "INCONCLUSIVE",
        "MODEL_INCOMPLETE",
        "PENDING",
        "STALE",
    ),
    0,
)


@pytest.fixture(scope="module")
def plane(
    controlplane_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ControlPlane, str]]:
    with ControlPlane(controlplane_bin, audit_log=True) as cp:
        install_crd(cp)
        kinds = ("Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding")
        apply_all(cp, [d for d in render("overlays/plain") if d["kind"] in kinds])
        token = cp.service_account_token("flowproof", "flowproof-collector", create=False)
        path = cp.write_kubeconfig(tmp_path_factory.mktemp("status") / "kubeconfig", token, "c")
        yield cp, str(path)


@pytest.fixture
def shop(plane: tuple[ControlPlane, str]) -> str:
    """A namespace with pods web and api, and a policy letting web reach api on 8080."""
    cp, _ = plane
    name = unique("shop")
    namespace(cp, name)
    for pod, ip in (("web", "10.244.1.10"), ("api", "10.244.1.11")):
        create_pod(
            cp,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": pod, "namespace": name, "labels": {"app": pod}},
                "spec": {
                    "nodeName": "node-1",
                    "containers": [
                        {"name": "c", "image": "app", "ports": [{"containerPort": 8080}]}
                    ],
                },
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
            },
        )
    ok(apply(cp, make_policy("api-ingress", name)))
    return name


@dataclass
class Loop:
    collector: Collector
    source: KubernetesSource
    stop: asyncio.Event
    runner: asyncio.Task[None] | None = None

    def resume(self) -> None:
        self.runner = asyncio.create_task(self.source.run())

    async def pause(self) -> None:
        """Stop the source's list and watch: its view of the objects stays as it is."""
        assert self.runner is not None
        self.runner.cancel()
        await asyncio.gather(self.runner, return_exceptions=True)
        self.runner = None


@contextlib.asynccontextmanager
async def collecting(kubeconfig: str, *, interval: float = 60.0) -> AsyncIterator[Loop]:
    """A collector fed by a running source (no publisher: a test starts one or calls a pass)."""
    collector = Collector(
        CollectorSettings(token="t", status_interval_seconds=interval), clock=ManualClock(NOW)
    )
    previous: list[Snapshot | None] = [None]
    generation = [0]

    async def on_update(update: InventoryUpdate) -> None:
        generation[0] += 1
        change = diff_snapshots(previous[0], update.snapshot, generation=generation[0], at=NOW)
        previous[0] = update.snapshot
        await collector.on_snapshot(update.snapshot, change)

    settings = KubeSourceSettings(backoff_initial_seconds=0.05, backoff_max_seconds=0.2)
    async with KubernetesSource(
        load_kube_config(kubeconfig), settings=settings, on_update=on_update
    ) as source:
        loop = Loop(collector, source, asyncio.Event())
        loop.resume()
        try:
            await asyncio.wait_for(source.wait_synced(), 10)
            yield loop
        finally:
            loop.stop.set()
            if loop.runner is not None:
                await loop.pause()


@contextlib.asynccontextmanager
async def publishing(kubeconfig: str, *, interval: float) -> AsyncIterator[Loop]:
    async with collecting(kubeconfig, interval=interval) as loop:
        task = asyncio.create_task(
            status_publisher(
                loop.collector,
                loop.source,
                loop.stop,
                debounce_seconds=0.05,
                conflict_retry_seconds=0.2,
            )
        )
        try:
            yield loop
        finally:
            loop.stop.set()
            await asyncio.wait_for(task, 5)


def full_status_of(cp: ControlPlane, ns: str, name: str) -> dict[str, Any]:
    found = ok(cp.request("GET", f"{FE_API}/namespaces/{ns}/flowexpectations/{name}"))
    return dict(found.get("status") or {})


def status_of(cp: ControlPlane, ns: str, name: str) -> dict[str, Any]:
    """The status without its conditions (`condition` reads those)."""
    return {k: v for k, v in full_status_of(cp, ns, name).items() if k != "conditions"}


def condition(cp: ControlPlane, ns: str, name: str, kind: str) -> dict[str, Any]:
    conditions = full_status_of(cp, ns, name).get("conditions", [])
    [found] = [c for c in conditions if c["type"] == kind]
    return dict(found)


def events_about(cp: ControlPlane, ns: str, name: str) -> list[dict[str, Any]]:
    """The events.k8s.io Events in `ns` about the FlowExpectations `name`, as the API stores them."""
    found = ok(cp.request("GET", f"/apis/events.k8s.io/v1/namespaces/{ns}/events"))
    return [e for e in found.get("items", []) if e["regarding"]["name"] == name]


def patches(cp: ControlPlane, ns: str, name: str) -> list[dict[str, Any]]:
    """The collector's PATCH requests of the object's status, answered or refused."""
    return [
        r
        for r in audited(cp, COLLECTOR_USER, "flowexpectations", "patch", namespace=ns)
        if r["uri"].split("?")[0].endswith(f"/flowexpectations/{name}/status")
    ]


def probe_everything(collector: Collector, outcome: Outcome) -> None:
    for i, assignment in enumerate(collector.planner.due(NOW + 3600)):
        collector.on_result(
            ProbeResult(
                id=f"r-{assignment.id}-{i}",
                assignment=assignment,
                outcome=outcome,
                latency_seconds=0.001,
                node="node-1",
                started_at=NOW,
            )
        )


async def test_status_is_written_per_object_and_follows_its_flows(
    plane: tuple[ControlPlane, str], shop: str
) -> None:
    cp, kubeconfig = plane
    ok(apply(cp, make_expectations("shop-flows", shop)))
    ok(
        apply(
            cp,
            make_expectations("wrong-flows", shop, flows=[make_flow("web-not-api", expect="deny")]),
        )
    )
    async with publishing(kubeconfig, interval=60) as loop:
        await until(
            lambda: status_of(cp, shop, "shop-flows") and status_of(cp, shop, "wrong-flows")
        )
        assert status_of(cp, shop, "shop-flows") == {
            "observedGeneration": 1,
            "flows": 1,
            "failing": 0,
            "counts": {**ZERO, "PENDING": 1},
            "failures": [],
        }
        assert condition(cp, shop, "shop-flows", "Verified")["reason"] == "Pending"
        assert condition(cp, shop, "shop-flows", "Ready")["status"] == "False"
        assert events_about(cp, shop, "shop-flows") == [], "a first Pending is no transition"
        wrong = status_of(cp, shop, "wrong-flows")
        assert wrong["failing"] == 1
        assert wrong["counts"] == {**ZERO, "POLICY_MISMATCH": 1}
        [failure] = wrong["failures"]
        assert failure["name"] == "web-not-api" and failure["status"] == "POLICY_MISMATCH"
        assert condition(cp, shop, "wrong-flows", "Verified")["status"] == "False"
        # The Events the API server stored (`kubectl describe fe` shows them).
        await until(lambda: len(events_about(cp, shop, "wrong-flows")) == 2)
        [warning] = [e for e in events_about(cp, shop, "wrong-flows") if e["type"] == "Warning"]
        assert warning["reason"] == "FlowsFailing"
        assert "web-not-api (POLICY_MISMATCH)" in warning["note"]
        stored = ok(cp.request("GET", f"{FE_API}/namespaces/{shop}/flowexpectations/wrong-flows"))
        assert warning["regarding"]["uid"] == stored["metadata"]["uid"]
        assert warning["reportingController"] == "flowproof.dev/collector"

        probe_everything(loop.collector, Outcome.CONNECTED)  # a status change: written soon
        await until(lambda: status_of(cp, shop, "shop-flows")["counts"]["PASS"] == 1)
        verified = condition(cp, shop, "shop-flows", "Verified")
        assert (verified["status"], verified["reason"]) == ("True", "AllFlowsPass")
        assert verified["observedGeneration"] == 1
        assert verified["lastTransitionTime"] == NOW_TEXT
        assert condition(cp, shop, "shop-flows", "Ready")["reason"] == "Decided"
        await until(lambda: len(events_about(cp, shop, "shop-flows")) == 2)
        assert sorted((e["type"], e["reason"]) for e in events_about(cp, shop, "shop-flows")) == [
            ("Normal", "AllFlowsPass"),
            ("Normal", "Decided"),
        ]
        assert status_of(cp, shop, "shop-flows") == {
            "observedGeneration": 1,
            "lastVerified": NOW_TEXT,
            "flows": 1,
            "failing": 0,
            "counts": {**ZERO, "PASS": 1},
            "failures": [],
        }

        ok(apply(cp, make_expectations("shop-flows", shop, flows=[make_flow(port="9090/TCP")])))
        await until(lambda: status_of(cp, shop, "shop-flows")["observedGeneration"] == 2)
        changed = status_of(cp, shop, "shop-flows")
        assert changed["counts"] == {**ZERO, "POLICY_MISMATCH": 1}
        assert "lastVerified" not in changed, "a flow waiting for its first probe has none"
        turned = condition(cp, shop, "shop-flows", "Verified")
        assert (turned["status"], turned["observedGeneration"]) == ("False", 2)
        assert {p["code"] for p in patches(cp, shop, "shop-flows")} == {200}


async def test_an_unchanged_status_is_not_written_again(
    plane: tuple[ControlPlane, str], shop: str
) -> None:
    cp, kubeconfig = plane
    ok(apply(cp, make_expectations("shop-flows", shop)))
    async with publishing(kubeconfig, interval=0.05) as loop:
        await until(lambda: len(patches(cp, shop, "shop-flows")) == 1)
        written = status_of(cp, shop, "shop-flows")
        await asyncio.sleep(0.5)  # ten intervals
        assert len(patches(cp, shop, "shop-flows")) == 1
        assert loop.source.snapshot is loop.collector.snapshot, "our own write is no new snapshot"

        # A restarted collector finds the status in place and writes nothing either.
        again = asyncio.Event()
        restarted = asyncio.create_task(
            status_publisher(loop.collector, loop.source, again, debounce_seconds=0.05)
        )
        await asyncio.sleep(0.3)
        again.set()
        await asyncio.wait_for(restarted, 5)
        assert len(patches(cp, shop, "shop-flows")) == 1
        assert status_of(cp, shop, "shop-flows") == written


async def test_a_status_made_for_a_version_that_changed_meanwhile_is_refused_409_and_made_again(
    plane: tuple[ControlPlane, str], shop: str
) -> None:
    cp, kubeconfig = plane
    ok(apply(cp, make_expectations("shop-flows", shop)))
    async with collecting(kubeconfig) as loop:
        await until(lambda: f"{shop}/shop-flows" in loop.source.expectation_objects())
        await loop.pause()  # the source still holds generation 1 at its resourceVersion
        two = [make_flow(), make_flow("web-to-api-metrics", port="9090/TCP")]
        ok(apply(cp, make_expectations("shop-flows", shop, flows=two)))
        written: dict[tuple[str, str, str], dict[str, Any]] = {}
        outcome = await publish_statuses(loop.collector, loop.source, written)
        assert outcome.conflicts >= 1
        refused = patches(cp, shop, "shop-flows")
        assert [p["code"] for p in refused] == [409], "a real conflict, from the API server"
        assert status_of(cp, shop, "shop-flows") == {}, "nothing written for generation 1"

        loop.resume()  # the watch brings generation 2, and the next pass writes for it
        await until(lambda: loop.source.expectation_objects()[f"{shop}/shop-flows"].generation == 2)
        outcome = await publish_statuses(loop.collector, loop.source, written)
        assert outcome.patched >= 1 and outcome.conflicts == 0
        status = status_of(cp, shop, "shop-flows")
        assert (status["observedGeneration"], status["flows"]) == (2, 2)


async def test_the_publisher_writes_again_soon_after_a_conflict(
    plane: tuple[ControlPlane, str], shop: str
) -> None:
    """Under a running publisher, a spec edited between the source's read and the write ends in
    the status of the new generation, within a second of the conflict."""
    cp, kubeconfig = plane
    ok(apply(cp, make_expectations("shop-flows", shop)))
    async with publishing(kubeconfig, interval=60) as loop:
        await until(lambda: status_of(cp, shop, "shop-flows"))
        for port in range(9000, 9010):  # edits in a burst, while statuses are being written
            flows = [make_flow(), make_flow("extra", port=f"{port}/TCP")]
            ok(apply(cp, make_expectations("shop-flows", shop, flows=flows)))
        generation = ok(
            cp.request("GET", f"{FE_API}/namespaces/{shop}/flowexpectations/shop-flows")
        )["metadata"]["generation"]
        await until(
            lambda: status_of(cp, shop, "shop-flows")["observedGeneration"] == generation, 10
        )
        assert not loop.stop.is_set()


async def test_an_object_deleted_meanwhile_gets_no_status_and_a_namesake_not_the_old_one(
    plane: tuple[ControlPlane, str], shop: str
) -> None:
    cp, kubeconfig = plane
    for name in ("gone", "again"):
        ok(apply(cp, make_expectations(name, shop)))
    async with collecting(kubeconfig) as loop:
        await until(
            lambda: {f"{shop}/gone", f"{shop}/again"} <= set(loop.source.expectation_objects())
        )
        await loop.pause()
        delete(cp, "FlowExpectations", "gone", shop)
        delete(cp, "FlowExpectations", "again", shop)
        ok(apply(cp, make_expectations("again", shop, flows=[make_flow("other", expect="deny")])))
        written: dict[tuple[str, str, str], dict[str, Any]] = {}
        outcome = await publish_statuses(loop.collector, loop.source, written)
        assert (outcome.gone, outcome.conflicts) == (1, 1)
        assert [p["code"] for p in patches(cp, shop, "gone")] == [404]
        assert [p["code"] for p in patches(cp, shop, "again")] == [409]
        assert status_of(cp, shop, "again") == {}, "the old object's status is not the namesake's"
        assert not [k for k in written if k[1] in ("gone", "again")]

        loop.resume()
        await until(lambda: f"{shop}/gone" not in loop.source.expectation_objects())
        # The namesake's flows planned (plans are built off the loop, the newest snapshot wins).
        await until(
            lambda: any(
                f.expectation == f"{shop}/again" and f.flow == "other"
                for f in loop.collector.state.declared()
            )
        )
        await publish_statuses(loop.collector, loop.source, written)
        status = status_of(cp, shop, "again")
        assert status["observedGeneration"] == 1
        assert status["counts"]["POLICY_MISMATCH"] == 1, "its own flow, denied by intent"


async def test_a_refused_write_is_logged_once_and_the_publisher_goes_on(
    plane: tuple[ControlPlane, str], shop: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cp, _ = plane
    caplog.set_level(logging.WARNING, logger="collector.kube")
    ok(apply(cp, make_expectations("shop-flows", shop)))
    everything_but_patch = (
        [("", r, v) for r in ("pods", "namespaces") for v in ("list", "watch")]
        + [("networking.k8s.io", "networkpolicies", v) for v in ("list", "watch")]
        + [("flowproof.dev", "flowexpectations", v) for v in ("list", "watch")]
    )
    home = unique("norights")
    token = service_account(cp, home, "flowproof-collector", cluster=everything_but_patch)
    kubeconfig = str(cp.write_kubeconfig(tmp_path / "kubeconfig", token, "c"))
    async with publishing(kubeconfig, interval=0.05) as loop:
        user = f"system:serviceaccount:{home}:flowproof-collector"
        await until(
            lambda: (
                len(
                    [
                        r
                        for r in audited(cp, user, "flowexpectations", "patch", namespace=shop)
                        if r["code"] == 403
                    ]
                )
                >= 3
            )
        )
        assert not loop.stop.is_set()
    refused = [
        r.getMessage() for r in caplog.records if "403" in r.getMessage() and shop in r.getMessage()
    ]
    assert len(refused) == 1, "a persistent refusal is logged once"
    assert status_of(cp, shop, "shop-flows") == {}
