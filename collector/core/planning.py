"""The plan: declared flows, every policy's witnesses and the truth table -> what to verify.

Owns `build_plan` (snapshot -> Plan: expectations resolved with collector.core.resolving; every
pod pair while a declared flow is small, representatives per (source class, destination class)
when it is large, with coverage; the witnesses of every policy and rule (collector.core.evidence);
the truth table the sweep walks (collector.core.sweeping); probe pod requests for flows whose
`from` matches no running pod). When to send each one is collector.core.scheduling's. Pure: no
I/O, no clock, no grpc, aiohttp or protobuf.

Decisions: a source is a running pod with an IP on a node, real pods before probe pods (label
`flowproof.dev/probe-pod`); probe pods are never destinations nor sweep cells. `dns: cluster`
flows probe the cluster DNS address (`cluster_dns_ip`) with a DNS query, one concrete flow per DNS
pod as the model sees it. A destination pod that declares no container port for the flow's port
gets a responder (the agent on its node listens there). Witness and sweep flows take the model's
verdict as their intent: they pass or show enforcement drift; so a flow whose model is unknown
is never a witness, and a sweep cell whose model is unknown is not probed.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from collector.core.changes import ChangeEvent, FlowFacts
from collector.core.classes import ClassModel
from collector.core.engine import Endpoint, Engine, Verdict, endpoint_name
from collector.core.evidence import EvidencePlan, pending_evidence, plan_evidence
from collector.core.model import (
    Expectations,
    FlowExpectation,
    Pod,
    PodTarget,
    Protocol,
    Snapshot,
)
from collector.core.probepods import (
    MANAGED_BY_LABEL,
    ProbePodRequest,
    is_probe_pod,
    probe_pod_request,
)
from collector.core.resolving import (
    CLUSTER_DNS_NAMESPACE,
    DNS_TARGET,
    ConcreteFlow,
    resolution,
    select_pods,
    target_selects,
)
from collector.core.settings import PlannerSettings
from collector.core.sweeping import SWEEP_EXPECTATION, SweepCell, SweepTable
from flowproof.probes import (
    Assignment,
    PodRef,
    ProbeKind,
    ResponderSpec,
    SourceKind,
)

FlowKind = Literal["declared", "witness", "sweep"]
FLOW_KINDS: tuple[FlowKind, ...] = ("declared", "witness", "sweep")

WITNESS_EXPECTATION = "(policy evidence)"


# --- the plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedFlow:
    """A concrete flow to verify: the three truths' inputs and how to probe it.

    `template` is the assignment to send (id and attempt are filled in when it is issued); it is
    None when the flow cannot be probed, and `unprobeable` says why. For witness and sweep flows
    `intent` is the model's verdict: they can only pass or drift; `subject` says what a witness
    proves (`shop/db-ingress ingress[0]`), `cell` which truth-table cell a sweep flow probes.
    """

    key: str
    kind: FlowKind
    expectation: str
    flow: str
    source: Pod
    destination: Endpoint
    port: int
    protocol: Protocol
    intent: bool
    verdict: Verdict
    template: Assignment | None
    unprobeable: str = ""
    listener_declared: bool = False
    expect_status: tuple[int, ...] = ()
    subject: str = ""
    cell: str = ""

    @property
    def model(self) -> bool:
        return self.verdict.allowed

    @property
    def declared_id(self) -> str:
        return f"{self.expectation}/{self.flow}"

    @property
    def destination_name(self) -> str:
        return endpoint_name(self.destination)

    def facts(self) -> FlowFacts:
        template = dataclasses.replace(self.template, id="") if self.template else None
        fingerprint = json.dumps(
            [self.intent, self.verdict.to_dict(), repr(template), self.unprobeable],
            sort_keys=True,
        )
        return FlowFacts(self.source.key, self.destination_name, fingerprint)


@dataclass(frozen=True)
class DeclaredFlowPlan:
    """One declared flow (an expectation's flow) and the concrete flows that stand for it."""

    expectation: str
    namespace: str
    flow: str
    intent: bool
    source_text: str
    destination_text: str
    keys: tuple[str, ...]
    pairs_total: int
    pairs_covered: int
    problems: tuple[str, ...] = ()
    allow_empty: bool = False
    probe_pod: ProbePodRequest | None = None

    @property
    def id(self) -> str:
        return f"{self.expectation}/{self.flow}"

    @property
    def coverage(self) -> float:
        """Pod pairs probed over pod pairs the flow stands for (1.0 when it has none)."""
        return self.pairs_covered / self.pairs_total if self.pairs_total else 1.0


@dataclass(frozen=True)
class Plan:
    """Everything to verify for one snapshot generation."""

    generation: int
    flows: Mapping[str, PlannedFlow]
    declared: tuple[DeclaredFlowPlan, ...]
    probe_pods: tuple[ProbePodRequest, ...] = ()
    evidence: EvidencePlan = field(default_factory=EvidencePlan)
    sweep: SweepTable | None = field(default=None, compare=False, repr=False)
    engine: Engine | None = field(default=None, compare=False, repr=False)
    basis: int | None = None
    """The generation whose whole plan this one's evidence and sweep table come from: None when
    they are this plan's own (`build_plan`), else an earlier one's (`update_plan`)."""
    classes: ClassModel | None = field(default=None, compare=False, repr=False)
    """The classes of a snapshot before (the basis's, or those an update for changed policies
    made of its own), for updates of this plan; None when that update needed none."""
    moved: frozenset[str] = frozenset()
    """Pods added, removed or changed since that snapshot (their class there is not theirs)."""

    def facts(self) -> dict[str, FlowFacts]:
        return {key: flow.facts() for key, flow in self.flows.items()}


def is_running(pod: Pod) -> bool:
    """Whether a pod can send or receive probes: running, with an IP, on a node."""
    return pod.phase == "Running" and bool(pod.ips) and bool(pod.node) and pod.workload is None


def _pod_ref(pod: Pod) -> PodRef:
    return PodRef(uid=pod.uid, namespace=pod.namespace, name=pod.name)


def _declares(pod: Endpoint, port: int, protocol: Protocol) -> bool:
    return isinstance(pod, Pod) and any(
        cp.port == port and cp.protocol == protocol for cp in pod.ports
    )


def _probe_kind(flow: ConcreteFlow) -> ProbeKind:
    if flow.dns_name is not None and flow.protocol == "UDP":
        return ProbeKind.DNS
    if flow.http_path is not None and flow.protocol == "TCP":
        return ProbeKind.HTTP
    return ProbeKind(flow.protocol)


def _template(
    flow: ConcreteFlow, key: str, settings: PlannerSettings
) -> tuple[Assignment | None, str, bool]:
    """(assignment template, why it cannot be probed, whether a listener is declared)."""
    source, destination = flow.source, flow.destination
    listener = _declares(destination, flow.port, flow.protocol)
    if not is_running(source):
        why = "no running source pod"
        if is_probe_pod(source):
            why += f": probe pod {source.key} requested"
        return None, why, listener
    kind = _probe_kind(flow)
    responder: ResponderSpec | None = None
    if flow.dns_name is not None:
        address = settings.cluster_dns_ip
    elif isinstance(destination, Pod):
        if not is_running(destination):
            return None, f"destination {destination.key} is not running with an IP", listener
        address = destination.ips[0]
    else:
        address = destination
    if (
        isinstance(destination, Pod)
        and not listener
        and kind is not ProbeKind.DNS
        and not destination.host_network
        and destination.node
    ):
        responder = ResponderSpec(pod=_pod_ref(destination), node=destination.node)
    template = Assignment(
        id="",
        source=_pod_ref(source),
        source_node=source.node,
        destination_ip=address,
        port=flow.port,
        protocol=flow.protocol,
        kind=kind,
        timeout_seconds=settings.probe_timeout_seconds,
        source_kind=SourceKind.PROBE_POD if is_probe_pod(source) else SourceKind.POD,
        destination=_pod_ref(destination) if isinstance(destination, Pod) else None,
        http_path=flow.http_path if kind is ProbeKind.HTTP else None,
        dns_query_name=flow.dns_name if kind is ProbeKind.DNS else None,
        responder=responder,
        flow_key=key,
    )
    return template, "", listener


class NeedsClasses(Exception):
    """An update cannot re-plan without the snapshot's classes: only a whole plan can."""


class _Classes:
    """Equivalence classes of the snapshot's pods, computed once, when first needed; in an
    update (`basis`) the basis plan's, and never the snapshot's own (NeedsClasses)."""

    def __init__(
        self, snapshot: Snapshot, *, basis: Plan | None = None, moved: frozenset[str] = frozenset()
    ) -> None:
        self._snapshot = snapshot
        self._basis = basis
        self._moved = moved
        self._model: ClassModel | None = None
        self._known: dict[str, tuple[str, int | str]] = {}

    @property
    def built(self) -> ClassModel | None:
        """The snapshot's own classes if something needed them (never the basis plan's)."""
        return self._model

    def model(self) -> ClassModel:
        if self._model is None:
            if self._basis is not None:
                raise NeedsClasses()
            self._model = ClassModel(self._snapshot)
        return self._model

    def keys(self, endpoints: Mapping[str, Endpoint]) -> dict[str, tuple[str, int | str]]:
        """`of` for every endpoint; in an update, from the basis plan's classes.

        A pod unchanged since the basis snapshot has its class there. A pod changed since is
        classed with its peers by a model of a few pods: the changed ones and one pod of each
        basis class among the others (a class depends only on the pod, its namespace and the
        policies, so pods share a class there exactly when they would in a whole model).
        """
        basis = self._basis
        if basis is None:
            return {name: self.of(name, endpoint) for name, endpoint in endpoints.items()}
        model = basis.classes
        if model is None:
            raise NeedsClasses()
        index = model.pod_index
        found: dict[str, tuple[str, int | str]] = {}
        moved: list[Pod] = []
        for name, endpoint in endpoints.items():
            if not isinstance(endpoint, Pod):
                found[name] = ("address", endpoint)
            elif name in self._moved or name not in index:
                if self._snapshot.pods_by_key.get(name) is endpoint:
                    moved.append(endpoint)
                else:
                    found[name] = ("pod", name)  # a planned probe pod: a class of its own
            else:
                found[name] = ("class", int(model.class_of[index[name]]))
        if moved:
            olds = sorted({int(c) for kind, c in found.values() if kind == "class"})
            members = [model.representative(c) for c in olds]
            few = ClassModel(
                dataclasses.replace(self._snapshot, pods=(*members, *moved)), like=model
            )
            basis_of = {int(few.class_of[i]): c for i, c in enumerate(olds)}
            for i, pod in enumerate(moved, start=len(members)):
                cls = int(few.class_of[i])
                found[pod.key] = ("class", basis_of[cls]) if cls in basis_of else ("new", cls)
        return found

    def of(self, name: str, endpoint: Endpoint) -> tuple[str, int | str]:
        known = self._known.get(name)
        if known is not None:
            return known
        index = self.model().pod_index.get(name) if isinstance(endpoint, Pod) else None
        if not isinstance(endpoint, Pod):
            known = ("address", endpoint)
        elif index is None:  # a planned probe pod: a class of its own
            known = ("pod", name)
        else:
            known = ("class", int(self.model().class_of[index]))
        self._known[name] = known
        return known


def _representatives(
    sources: Sequence[Pod],
    destinations: Mapping[str, Endpoint],
    classes: _Classes,
    per_class_pair: int,
) -> dict[str, list[str]]:
    """The first pairs (in sorted order) of each (source class, destination class), by source.

    A flow's pairs are every source x destination, so the first pairs of a class pair are among
    its first sources and first destinations: the pairs themselves are never made (a large flow
    has millions; one list of them held the GIL, and the event loop, in every collection).
    """
    endpoints: dict[str, Endpoint] = {pod.key: pod for pod in sources}
    endpoints.update(destinations)
    keys = classes.keys(endpoints)
    first_sources = _first_by_class((p.key for p in sources), keys, per_class_pair)
    first_destinations = _first_by_class(destinations, keys, per_class_pair)
    chosen: dict[str, list[str]] = defaultdict(list)
    for src in first_sources:
        for dst in first_destinations:
            pairs = [(s, d) for s in src for d in dst]
            for s, d in (
                pairs if len(pairs) <= per_class_pair else heapq.nsmallest(per_class_pair, pairs)
            ):
                chosen[s].append(d)
    return chosen


def _first_by_class(
    names: Iterable[str], keys: Mapping[str, tuple[str, int | str]], count: int
) -> list[list[str]]:
    """The `count` smallest names of each class, in sorted order."""
    groups: dict[tuple[str, int | str], list[str]] = defaultdict(list)
    for name in names:
        groups[keys[name]].append(name)
    if count == 1:
        return [[min(members)] for members in groups.values()]
    return [heapq.nsmallest(count, members) for members in groups.values()]


def _plan_declared(
    snapshot: Snapshot,
    engine: Engine,
    classes: _Classes,
    document: Expectations,
    declared: FlowExpectation,
    settings: PlannerSettings,
) -> tuple[DeclaredFlowPlan, list[PlannedFlow]]:
    candidates = select_pods(snapshot, declared.source, document.namespace)
    real = [p for p in candidates if is_running(p) and not is_probe_pod(p)]
    probes = [p for p in candidates if is_running(p) and is_probe_pod(p)]
    sources = real or probes
    request: ProbePodRequest | None = None
    problems: list[str] = []
    resolving = snapshot
    if not sources:
        made = probe_pod_request(snapshot, declared.source, document.namespace)
        if isinstance(made, str):
            problems.append(
                f"{document.source or document.key}: flow {declared.name!r}: `from` "
                f"({declared.source.describe()}) matches no running pod and no probe pod can "
                f"stand for it: {made}"
            )
        else:
            request = made
            planned_pod = made.as_pod()
            sources = [planned_pod]
            resolving = dataclasses.replace(snapshot, pods=(*snapshot.pods, planned_pod))
    found = resolution(resolving, document, declared, cluster_dns_ip=settings.cluster_dns_ip)
    problems += found.problems() if sources else []
    source_keys = {p.key for p in sources}
    froms = [p for p in found.sources if p.key in source_keys]
    tos = {
        endpoint_name(d): i
        for i, d in enumerate(found.destinations)
        if found.ports[i] and not (isinstance(d, Pod) and is_probe_pod(d))
    }
    if sources and not (froms and tos) and not problems and not declared.allow_empty:
        problems.append(
            f"{document.source or document.key}: flow {declared.name!r}: `to` matches no pod "
            "that can be probed"
        )
    pairs_total = len(froms) * len(tos)
    if pairs_total > settings.max_pairs_per_flow:
        destinations = {name: found.destinations[i] for name, i in tos.items()}
        chosen = _representatives(
            froms, destinations, classes, settings.representatives_per_class_pair
        )
        pairs_covered = sum(map(len, chosen.values()))
        concrete = [
            c
            for source in froms
            if source.key in chosen
            for i in sorted(tos[name] for name in chosen[source.key])
            for c in found.between(source, i)
        ]
    else:
        pairs_covered = pairs_total
        concrete = [c for source in froms for i in tos.values() for c in found.between(source, i)]
    expect_status = declared.http.expect_status if declared.http else ()
    flows: list[PlannedFlow] = []
    for c in concrete:
        template, unprobeable, listener = _template(c, c.key, settings)
        flows.append(
            PlannedFlow(
                key=c.key,
                kind="declared",
                expectation=c.expectation,
                flow=c.flow,
                source=c.source,
                destination=c.destination,
                port=c.port,
                protocol=c.protocol,
                intent=c.intent,
                verdict=engine.evaluate(c.source, c.destination, c.port, c.protocol),
                template=template,
                unprobeable=unprobeable,
                listener_declared=listener,
                expect_status=expect_status,
            )
        )
    plan = DeclaredFlowPlan(
        expectation=document.key,
        namespace=document.namespace,
        flow=declared.name,
        intent=declared.expect == "allow",
        source_text=declared.source.describe(),
        destination_text=declared.destination.describe(),
        keys=tuple(dict.fromkeys(f.key for f in flows)),
        pairs_total=pairs_total,
        pairs_covered=pairs_covered,
        problems=tuple(problems),
        allow_empty=declared.allow_empty,
        probe_pod=request,
    )
    return plan, flows


def witness_flows(
    snapshot: Snapshot, engine: Engine, evidence: EvidencePlan, settings: PlannerSettings
) -> list[PlannedFlow]:
    """One planned flow per concrete flow that probes some witness (several may share one)."""
    flows: dict[str, PlannedFlow] = {}
    for key, witnesses in evidence.by_flow().items():
        w = witnesses[0]
        verdict = engine.evaluate(w.source, w.destination, w.port, w.protocol)
        if not verdict.known:
            continue  # a model that cannot say what the policies do cannot witness one of them
        if verdict.allowed != w.model:
            if snapshot.cluster_policies:
                # A cluster policy tier decides this flow, which the witness computation (over
                # NetworkPolicies alone) does not know: it witnesses no NetworkPolicy.
                continue
            # The witness computation and the engine must agree.
            raise AssertionError(f"witness {w.describe()} but the engine says {verdict.summary()}")
        subject = ", ".join(dict.fromkeys(x.subject for x in witnesses))
        flow = ConcreteFlow(
            WITNESS_EXPECTATION, "witness", w.source, w.destination, w.port, w.protocol, w.model
        )
        template, unprobeable, listener = _template(flow, key, settings)
        flows[key] = PlannedFlow(
            key=key,
            kind="witness",
            expectation=WITNESS_EXPECTATION,
            flow="witness",
            source=w.source,
            destination=w.destination,
            port=w.port,
            protocol=w.protocol,
            intent=w.model,
            verdict=verdict,
            template=template,
            unprobeable=unprobeable,
            listener_declared=listener,
            subject=subject,
        )
    return list(flows.values())


def sweep_flow(cell: SweepCell, engine: Engine, settings: PlannerSettings) -> PlannedFlow:
    """The planned flow that probes one cell of the truth table (intent: the model's verdict)."""
    verdict = engine.evaluate(cell.source, cell.destination, cell.port, cell.protocol)
    key = cell.flow_key
    flow = ConcreteFlow(
        SWEEP_EXPECTATION,
        "sweep",
        cell.source,
        cell.destination,
        cell.port,
        cell.protocol,
        verdict.allowed,
    )
    template, unprobeable, listener = _template(flow, key, settings)
    if not verdict.known:
        # Its intent would be a model that cannot say what the policies do: never probed.
        template, unprobeable = None, f"the model is unknown for this cell: {verdict.incomplete[0]}"
    return PlannedFlow(
        key=key,
        kind="sweep",
        expectation=SWEEP_EXPECTATION,
        flow="sweep",
        source=cell.source,
        destination=cell.destination,
        port=cell.port,
        protocol=cell.protocol,
        intent=verdict.allowed,
        verdict=verdict,
        template=template,
        unprobeable=unprobeable,
        listener_declared=listener,
        subject=("random pick of " if cell.random_pick else "") + "cell " + str(cell.index),
        cell=cell.cell_key,
    )


def _plan_every_declared(
    snapshot: Snapshot, engine: Engine, classes: _Classes, settings: PlannerSettings
) -> tuple[dict[str, PlannedFlow], list[DeclaredFlowPlan], dict[str, ProbePodRequest]]:
    """Every declared flow of the snapshot: (planned flows by key, the declared flows, the probe
    pods they request)."""
    flows: dict[str, PlannedFlow] = {}
    declared: list[DeclaredFlowPlan] = []
    requests: dict[str, ProbePodRequest] = {}
    for document in snapshot.expectations:
        for item in document.flows:
            plan, planned = _plan_declared(snapshot, engine, classes, document, item, settings)
            declared.append(plan)
            if plan.probe_pod is not None:
                requests.setdefault(plan.probe_pod.key, plan.probe_pod)
            for flow in planned:
                flows.setdefault(flow.key, flow)
    return flows, declared, requests


def build_plan(snapshot: Snapshot, settings: PlannerSettings, *, generation: int = 0) -> Plan:
    """Every flow to verify for `snapshot`: declared flows, every policy's witnesses, and the
    truth table the sweep walks (its flows are added by the scheduler, a batch at a time)."""
    engine = Engine(snapshot)
    classes = _Classes(snapshot)
    flows, declared, requests = _plan_every_declared(snapshot, engine, classes, settings)
    model = classes.model()
    evidence = plan_evidence(snapshot, model=model) if settings.witnesses else EvidencePlan()
    for flow in witness_flows(snapshot, engine, evidence, settings):
        flows.setdefault(flow.key, flow)
    return Plan(
        generation=generation,
        flows=flows,
        declared=tuple(declared),
        probe_pods=tuple(requests.values()),
        evidence=evidence,
        sweep=SweepTable(snapshot, model),
        engine=engine,
        classes=model,
    )


MAX_UPDATE_PODS = 64
"""Pods a change may add, remove or alter for `update_plan`; more, and the plan is built whole."""
MAX_MOVED_PODS = 512
"""Pods changed since the last whole plan that updates may carry; more, and it is built whole."""
_NOT_PODS = tuple(
    f"{kind}_{verb}"
    for kind in ("namespaces", "policies", "expectations")
    for verb in ("added", "removed", "changed")
)


def _targets(document: Expectations, declared: FlowExpectation) -> list[tuple[PodTarget, str]]:
    """The pod targets a declared flow selects pods with: `from`, and `to` when it names pods."""
    found = [(declared.source, document.namespace)]
    if isinstance(declared.destination, PodTarget):
        found.append((declared.destination, document.namespace))
    elif declared.destination.dns is not None:
        found.append((DNS_TARGET, CLUSTER_DNS_NAMESPACE))
    return found


def _rejudged(
    flow: PlannedFlow, snapshot: Snapshot, engine: Engine, settings: PlannerSettings
) -> PlannedFlow | None:
    """A witness flow whose pod changed, on the new snapshot; None when it is gone or no longer
    has the verdict it was chosen for (the next whole plan chooses again)."""
    source = snapshot.pods_by_key.get(flow.source.key)
    destination: Endpoint | None = flow.destination
    if isinstance(flow.destination, Pod):
        destination = snapshot.pods_by_key.get(flow.destination.key)
    if source is None or destination is None:
        return None
    verdict = engine.evaluate(source, destination, flow.port, flow.protocol)
    if not verdict.known or verdict.allowed != flow.intent:
        return None
    concrete = ConcreteFlow(
        flow.expectation, flow.flow, source, destination, flow.port, flow.protocol, flow.intent
    )
    template, unprobeable, listener = _template(concrete, flow.key, settings)
    return dataclasses.replace(
        flow,
        source=source,
        destination=destination,
        verdict=verdict,
        template=template,
        unprobeable=unprobeable,
        listener_declared=listener,
    )


def update_plan(
    previous: Plan,
    snapshot: Snapshot,
    change: ChangeEvent,
    settings: PlannerSettings,
    *,
    generation: int,
) -> Plan | None:
    """The plan of `snapshot` made from `previous` (the plan of the snapshot `change` starts
    from) before its whole plan; None when it must be built whole.

    When policies, namespaces or expectations changed, every declared flow is planned again
    without the evidence (`_rules_update`). When only pods changed, a few of them:

    Declared flows that select none of the changed pods (before or after the change) are kept
    as they are; the others are planned again, exactly as `build_plan` would (one that would
    need the snapshot's classes, a flow sampled by class pair, gives up: None). The evidence and
    the sweep's truth table are carried over from the previous whole plan (`basis`): a witness
    flow with a changed pod is judged again on the new snapshot and left out when it no longer
    has the verdict it was chosen for. The next whole plan chooses witnesses afresh.
    """
    if previous.engine is None or change.initial:
        return None
    if any(getattr(change, f) for f in _NOT_PODS):
        return _rules_update(previous, snapshot, settings, generation=generation)
    before = previous.engine.snapshot
    changed = change.pods_added | change.pods_removed | change.pods_changed
    moved = previous.moved | changed
    if len(changed) > MAX_UPDATE_PODS or len(moved) > MAX_MOVED_PODS:
        return None
    snapshot.index_after(before, changed)
    versions = [
        (shot, pod)
        for shot in (before, snapshot)
        for key in sorted(changed)
        if (pod := shot.pods_by_key.get(key)) is not None
    ]
    engine = previous.engine.with_pods(snapshot)  # only pods changed: the same policies
    classes = _Classes(snapshot, basis=previous, moved=moved)
    kept = {(d.expectation, d.flow): d for d in previous.declared}
    flows: dict[str, PlannedFlow] = {}
    declared: list[DeclaredFlowPlan] = []
    requests: dict[str, ProbePodRequest] = {}
    for document in snapshot.expectations:
        for item in document.flows:
            old = kept.get((document.key, item.name))
            touched = old is None or any(
                target_selects(shot, target, namespace, pod)
                for target, namespace in _targets(document, item)
                for shot, pod in versions
            )
            if old is not None and not touched:
                plan, planned = old, [previous.flows[key] for key in old.keys]
            else:
                try:
                    plan, planned = _plan_declared(
                        snapshot, engine, classes, document, item, settings
                    )
                except NeedsClasses:
                    return None
            declared.append(plan)
            if plan.probe_pod is not None:
                requests.setdefault(plan.probe_pod.key, plan.probe_pod)
            for flow in planned:
                flows.setdefault(flow.key, flow)
    for key, flow in previous.flows.items():
        if flow.kind != "witness":
            continue
        if flow.source.key in changed or flow.destination_name in changed:
            redone = _rejudged(flow, snapshot, engine, settings)
            if redone is not None:
                flows.setdefault(key, redone)
        else:
            flows.setdefault(key, flow)
    return Plan(
        generation=generation,
        flows=flows,
        declared=tuple(declared),
        probe_pods=tuple(requests.values()),
        evidence=previous.evidence,
        sweep=previous.sweep,
        engine=engine,
        basis=previous.generation if previous.basis is None else previous.basis,
        classes=previous.classes,
        moved=moved,
    )


RULES_CHANGED = "the policies, namespaces or expectations changed: witnesses are chosen again"


def _rules_update(
    previous: Plan, snapshot: Snapshot, settings: PlannerSettings, *, generation: int
) -> Plan:
    """The plan of a snapshot whose policies, namespaces or expectations changed, before its
    evidence (the slow part of a whole plan): every declared flow planned exactly as
    `build_plan` plans it (a new engine; the snapshot's own classes, made only when a large
    flow needs them), no witness flows (every policy PENDING until the whole plan chooses
    them: a witness chosen before may no longer depend on its policy alone), the sweep's table
    kept (its cells are judged by this plan's engine when they are probed)."""
    engine = Engine(snapshot)
    classes = _Classes(snapshot)
    flows, declared, requests = _plan_every_declared(snapshot, engine, classes, settings)
    return Plan(
        generation=generation,
        flows=flows,
        declared=tuple(declared),
        probe_pods=tuple(requests.values()),
        evidence=pending_evidence(snapshot, RULES_CHANGED)
        if settings.witnesses
        else EvidencePlan(),
        sweep=previous.sweep,
        engine=engine,
        basis=previous.generation if previous.basis is None else previous.basis,
        classes=classes.built,
        moved=frozenset(),
    )


def needed_probe_pods(plan: Plan) -> list[ProbePodRequest]:
    """Every probe pod the plan needs: those it requests and those it already probes from.

    `plan.probe_pods` holds only the ones not running yet; a running probe pod that still stands
    for a flow's `from` must be kept, so the manager can delete exactly the rest.
    """
    requests = {r.key: r for r in plan.probe_pods}
    for flow in plan.flows.values():
        source = flow.source
        if flow.kind != "declared" or not is_probe_pod(source) or not is_running(source):
            continue
        # A cluster probe pod also carries the managed-by label, which no request asks for.
        labels = {k: v for k, v in source.labels.items() if k != MANAGED_BY_LABEL}
        request = ProbePodRequest(source.namespace, tuple(sorted(labels.items())))
        if request.key == source.key:  # one made from a request (not someone else's pod)
            requests.setdefault(request.key, request)
    return [requests[key] for key in sorted(requests)]


__all__ = [
    "FLOW_KINDS",
    "MAX_UPDATE_PODS",
    "RULES_CHANGED",
    "SWEEP_EXPECTATION",
    "WITNESS_EXPECTATION",
    "DeclaredFlowPlan",
    "NeedsClasses",
    "Plan",
    "PlannedFlow",
    "build_plan",
    "is_running",
    "needed_probe_pods",
    "sweep_flow",
    "update_plan",
    "witness_flows",
]
