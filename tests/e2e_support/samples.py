"""Flow states filled with real probe results, for the web, metrics and bench without a lab.

`SampleLoop` wires the real planner and flow state on a snapshot and answers every planned probe
with a real `ProbeResult` whose outcome a simulated network decides (by default it enforces the
model exactly: allowed -> CONNECTED, denied -> TIMEOUT). Retries that confirm a failing result are
answered at once. Every status change and result is handed to `listener(event)` (collector.loop's events) the way the
runtime publishes them. Nothing here sends a packet: addresses are data only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from collector.core.changes import diff_snapshots
from collector.core.flowstate import FlowState, StatusChange
from collector.core.model import (
    ContainerPort,
    Expectations,
    ExternalTarget,
    FlowExpectation,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Peer,
    Pod,
    PodTarget,
    PolicyPort,
    PortSpec,
    Requirement,
    Rule,
    Snapshot,
)
from collector.core.planning import PlannedFlow
from collector.core.scheduling import Planner
from collector.core.settings import PlannerSettings
from collector.loop import Listener, LoopEvent, ResultRecorded, SnapshotApplied, StatusChanged
from flowproof.aio import SYSTEM_CLOCK, Clock
from flowproof.probes import Outcome, ProbeResult

SAMPLE_SETTINGS = PlannerSettings(freshness_seconds=3600.0)


def _sel(**labels: str) -> LabelSelector:
    return LabelSelector(match_labels=tuple(sorted(labels.items())))


def _pod(
    ref: str,
    labels: Mapping[str, str],
    ip: str,
    node: str,
    ports: Iterable[tuple[int, str]] = ((8080, "TCP"),),
) -> Pod:
    namespace, name = ref.split("/")
    return Pod(
        namespace=namespace,
        name=name,
        labels=dict(labels),
        ports=tuple(ContainerPort(p, proto) for p, proto in ports),  # type: ignore[arg-type]
        ips=(ip,),
        uid=f"uid-{namespace}-{name}",
        node=node,
    )


def _namespaces(*names: str) -> dict[str, Namespace]:
    return {n: Namespace(n, {"kubernetes.io/metadata.name": n}) for n in names}


def _allow(name: str, to: Mapping[str, str], port: int, **source: Any) -> NetworkPolicy:
    peer = Peer(
        pod_selector=_sel(**source.get("pods", {})),
        namespace_selector=_sel(**source["namespaces"]) if "namespaces" in source else None,
    )
    return NetworkPolicy(
        namespace="shop",
        name=name,
        pod_selector=_sel(**to),
        ingress=(Rule(peers=(peer,), ports=(PolicyPort("TCP", port),)),),
    )


DEFAULT_DENY = NetworkPolicy(namespace="shop", name="default-deny", pod_selector=LabelSelector())
FRONTEND_TO_API = _allow("frontend-to-api", {"app": "api"}, 8080, pods={"app": "frontend"})
API_TO_DB = _allow("api-to-db", {"app": "db"}, 5432, pods={"app": "api"})
MONITORING_TO_API = _allow(
    "monitoring-to-api",
    {"app": "api"},
    9090,
    pods={"app": "prometheus"},
    namespaces={"kubernetes.io/metadata.name": "monitoring"},
)
SHOP_POLICIES = (DEFAULT_DENY, FRONTEND_TO_API, API_TO_DB, MONITORING_TO_API)


def _flow(
    name: str,
    source: Mapping[str, str],
    destination: Mapping[str, str] | ExternalTarget,
    port: int,
    expect: str,
    *,
    source_namespace: str = "shop",
) -> FlowExpectation:
    target: PodTarget | ExternalTarget
    if isinstance(destination, ExternalTarget):
        target = destination
    else:
        target = PodTarget(namespace="shop", pod_selector=_sel(**destination))
    return FlowExpectation(
        name=name,
        source=PodTarget(namespace=source_namespace, pod_selector=_sel(**source)),
        destination=target,
        ports=(PortSpec("TCP", port),),
        expect=expect,  # type: ignore[arg-type]
    )


SHOP_FLOWS = (
    _flow("frontend-to-api", {"app": "frontend"}, {"app": "api"}, 8080, "allow"),
    _flow("api-to-db", {"app": "api"}, {"app": "db"}, 5432, "allow"),
    _flow(
        "monitoring-scrapes-api",
        {"app": "prometheus"},
        {"app": "api"},
        9090,
        "allow",
        source_namespace="monitoring",
    ),
    _flow("frontend-not-to-db", {"app": "frontend"}, {"app": "db"}, 5432, "deny"),
    _flow("batch-not-to-api", {"app": "batch"}, {"app": "api"}, 8080, "deny"),
)


def shop_snapshot(policies: Iterable[NetworkPolicy] = SHOP_POLICIES) -> Snapshot:
    """A small shop: frontend (2 pods), api (2), db, batch, and prometheus in monitoring."""
    pods = (
        _pod("shop/frontend-0", {"app": "frontend"}, "10.244.1.10", "node-1"),
        _pod("shop/frontend-1", {"app": "frontend"}, "10.244.2.10", "node-2"),
        _pod("shop/api-0", {"app": "api"}, "10.244.1.20", "node-1", ((8080, "TCP"), (9090, "TCP"))),
        _pod("shop/api-1", {"app": "api"}, "10.244.2.20", "node-2", ((8080, "TCP"), (9090, "TCP"))),
        _pod("shop/db-0", {"app": "db"}, "10.244.1.30", "node-1", ((5432, "TCP"),)),
        _pod("shop/batch-0", {"app": "batch"}, "10.244.2.40", "node-2", ()),
        _pod("monitoring/prometheus-0", {"app": "prometheus"}, "10.244.1.50", "node-1", ()),
    )
    return Snapshot(
        namespaces=_namespaces("shop", "monitoring", "kube-system"),
        pods=pods,
        policies=tuple(policies),
        expectations=(Expectations("shop", "shop", SHOP_FLOWS),),
    )


def without(snapshot: Snapshot, policy: str) -> Snapshot:
    """The snapshot with the named policy removed (a required flow breaks)."""
    return dataclasses.replace(
        snapshot, policies=tuple(p for p in snapshot.policies if p.name != policy)
    )


def large_snapshot(
    *,
    namespaces: int = 10,
    workloads: int = 20,
    pods_per_workload: int = 5,
    flows_per_namespace: int = 100,
    sources_per_flow: int = 2,
) -> Snapshot:
    """A bigger cluster: each declared flow goes from `sources_per_flow` pods of one workload to
    every pod of another, so it stands for sources_per_flow × pods_per_workload concrete flows."""
    names = [f"team-{i:02d}" for i in range(namespaces)]
    pods: list[Pod] = []
    policies: list[NetworkPolicy] = []
    documents: list[Expectations] = []
    for n, namespace in enumerate(names):
        for w in range(workloads):
            for p in range(pods_per_workload):
                labels = {"app": f"svc-{w:02d}", "slot": str(p)}
                ip = f"10.244.{n * workloads + w}.{p + 1}"
                pods.append(
                    _pod(f"{namespace}/svc-{w:02d}-{p}", labels, ip, f"node-{(w + p) % 4 + 1}")
                )
        policies.append(
            NetworkPolicy(namespace=namespace, name="default-deny", pod_selector=LabelSelector())
        )
        for w in range(0, workloads, 2):  # every other workload accepts anything in its namespace
            policies.append(
                NetworkPolicy(
                    namespace=namespace,
                    name=f"allow-svc-{w:02d}",
                    pod_selector=_sel(app=f"svc-{w:02d}"),
                    ingress=(Rule(peers=(Peer(pod_selector=LabelSelector()),)),),
                )
            )
        flows = []
        pairs = [(a, b) for a in range(workloads) for b in range(workloads) if a != b]
        for i, (a, b) in enumerate(pairs[:flows_per_namespace]):
            slots = tuple(str(s) for s in range(sources_per_flow))
            source = PodTarget(
                namespace=namespace,
                pod_selector=LabelSelector(
                    match_labels=(("app", f"svc-{a:02d}"),),
                    match_expressions=(Requirement("slot", "In", slots),),
                ),
            )
            flows.append(
                FlowExpectation(
                    name=f"flow-{i:04d}",
                    source=source,
                    destination=PodTarget(
                        namespace=namespace, pod_selector=_sel(app=f"svc-{b:02d}")
                    ),
                    ports=(PortSpec("TCP", 8080),),
                    expect="allow" if b % 2 == 0 or i % 3 else "deny",
                )
            )
        documents.append(Expectations(namespace, "expectations", tuple(flows)))
    return Snapshot(
        namespaces=_namespaces(*names),
        pods=tuple(pods),
        policies=tuple(policies),
        expectations=tuple(documents),
    )


def enforcing(planned: PlannedFlow) -> Outcome:
    """A network that enforces the model exactly."""
    return Outcome.CONNECTED if planned.model else Outcome.TIMEOUT


class SampleLoop:
    """The real planner and flow state on a snapshot, with a simulated network answering probes."""

    def __init__(
        self,
        snapshot: Snapshot | None = None,
        *,
        settings: PlannerSettings = SAMPLE_SETTINGS,
        clock: Clock = SYSTEM_CLOCK,
        listener: Listener | None = None,
        network: Callable[[PlannedFlow], Outcome] = enforcing,
    ) -> None:
        self.clock = clock
        self.planner = Planner(settings, seed=1, id_prefix="sample")
        self.state = FlowState(settings, clock=clock)
        self.listener = listener
        self.network = network
        self.snapshot: Snapshot | None = None
        self.generation = 0
        self.results: list[ProbeResult] = []
        self._sequence = 0
        self.apply(snapshot if snapshot is not None else shop_snapshot())

    def _emit(self, event: LoopEvent) -> None:
        if self.listener is not None:
            self.listener(event)

    def _emit_changes(self, changes: Iterable[StatusChange]) -> None:
        for change in changes:
            self._emit(StatusChanged(change))

    def apply(self, snapshot: Snapshot) -> list[StatusChange]:
        """A new snapshot: re-plan and re-judge, as the runtime does."""
        self.generation += 1
        now = self.clock.time()
        change = diff_snapshots(self.snapshot, snapshot, generation=self.generation, at=now)
        update = self.planner.update(snapshot, change, now)
        self.snapshot = snapshot
        changes = self.state.sync(update)
        self._emit_changes(changes)
        self._emit(SnapshotApplied(self.generation, change.describe()))
        return changes

    def answer(
        self, planned: PlannedFlow, outcome: Outcome | None = None, attempt: int = 1
    ) -> list[StatusChange]:
        """Probe one planned flow once (and its confirming retry); the status changes."""
        assert planned.template is not None, planned.unprobeable
        self._sequence += 1
        assignment = dataclasses.replace(
            planned.template, id=f"sample-{self._sequence}", attempt=attempt
        )
        started = self.clock.time()
        outcome = outcome if outcome is not None else self.network(planned)
        result = ProbeResult(
            id=f"result-{self._sequence}",
            assignment=assignment,
            outcome=outcome,
            latency_seconds=0.0004
            if outcome is Outcome.CONNECTED
            else planned.template.timeout_seconds,
            node=assignment.source_node,
            started_at=started,
        )
        self.results.append(result)
        self._emit(ResultRecorded(result))
        effect = self.state.record_result(result)
        if effect is None:
            return []
        changes = list(effect.changes)
        self._emit_changes(effect.changes)
        if effect.retry_attempt is not None:
            changes += self.answer(planned, outcome, effect.retry_attempt)
        return changes

    def probe_all(self, *, kind: str | None = None, flow: str | None = None) -> list[StatusChange]:
        """Answer one probe of every probeable flow (of `kind`, of the declared flow `flow`)."""
        changes: list[StatusChange] = []
        for planned in list(self.planner.plan.flows.values()):
            if planned.template is None:
                continue
            if kind is not None and planned.kind != kind:
                continue
            if flow is not None and planned.flow != flow:
                continue
            changes += self.answer(planned)
        return changes


__all__ = [
    "API_TO_DB",
    "FRONTEND_TO_API",
    "SAMPLE_SETTINGS",
    "SHOP_POLICIES",
    "SampleLoop",
    "enforcing",
    "large_snapshot",
    "shop_snapshot",
    "without",
]
