"""The planner: declared flows and a drift sample -> probe assignments, and when to send each one.

Owns `build_plan` (snapshot -> Plan: expectations resolved with `checking.resolve`; every pod pair
while a declared flow is small, representatives per (source class, destination class) when it is
large, with coverage; a seeded sample of the model's truth table to catch enforcement drift; probe
pod requests for flows whose `from` matches no running pod) and `Planner`, the scheduler: retries
at once, touched flows first after a change, then a steady cadence with jitter, bounded per source
node and per destination. Pure: no I/O, no clock of its own (`now` is passed in), no grpc, aiohttp
or protobuf.

Decisions: a source is a running pod with an IP on a node, real pods before probe pods (label
`flowproof.dev/probe-pod`); probe pods are never destinations nor drift samples. `dns: cluster`
flows probe the cluster DNS address (`cluster_dns_ip`) with a DNS query, one concrete flow per DNS
pod as the model sees it. A destination pod that declares no container port for the flow's port
gets a responder (the agent on its node listens there). The drift sample is drawn again for every
snapshot generation, deterministically from (`drift_seed`, generation), half allowed, half denied.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import math
import random
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from collector.changes import ChangeEvent, FlowFacts, touched_flows
from collector.checking import (
    DEFAULT_CLUSTER_DNS_IP,
    ConcreteFlow,
    resolve,
    select_pods,
)
from collector.classes import ClassModel
from collector.engine import Endpoint, Engine, Verdict, endpoint_name
from collector.errors import ConfigurationError
from collector.model import (
    Expectations,
    FlowExpectation,
    LabelSelector,
    Pod,
    PodTarget,
    Protocol,
    Snapshot,
)
from flowproof.probes import (
    Assignment,
    PodRef,
    ProbeKind,
    ResponderSpec,
    SourceKind,
)

Clock = Callable[[], float]
FlowKind = Literal["declared", "drift"]

PROBE_POD_LABEL = "flowproof.dev/probe-pod"
"""Carried by every probe pod (value "true"): the planner uses such pods only as sources."""
PROBE_POD_PREFIX = "flowproof-probe-"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
"""Set on the probe pods a collector creates in a cluster (value "flowproof"); no request asks for it."""
DRIFT_EXPECTATION = "(drift sample)"


@dataclass(frozen=True)
class PlannerSettings:
    """How the live loop plans, schedules and judges probes (planner and flow state)."""

    probe_timeout_seconds: float = 2.0
    """How long a probe waits for an answer; no answer within it is a TIMEOUT (dropped)."""
    interval_seconds: float = 10.0
    """The steady cadence: every flow is probed again about this often."""
    jitter_fraction: float = 0.2
    """Each flow's next probe is `interval_seconds` times a random factor in 1 ± this."""
    max_pairs_per_flow: int = 16
    """A declared flow with at most this many pod pairs has every pair probed; above it,
    representatives per (source class, destination class) are."""
    representatives_per_class_pair: int = 1
    """How many pod pairs stand for one (source class, destination class) of a large flow."""
    drift_sample_size: int = 20
    """Undeclared pod pairs on declared container ports probed to catch enforcement drift."""
    drift_seed: int = 0
    """Seed of the drift sample, mixed with the snapshot generation: same inputs, same sample."""
    max_per_node_per_second: float = 200.0
    """At most this many assignments per second for one source node."""
    max_per_destination_per_second: float = 20.0
    """At most this many assignments per second towards one destination address."""
    result_grace_seconds: float = 10.0
    """An assignment with no result after its timeout plus this is taken as lost and redone."""
    freshness_seconds: float = 30.0
    """A flow whose last result is older than this is STALE."""
    results_kept: int = 10
    """Probe results kept per flow."""
    history_kept: int = 50
    """Status changes kept per flow."""
    cluster_dns_ip: str = DEFAULT_CLUSTER_DNS_IP
    """The cluster DNS service address that `dns: cluster` flows query."""

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "probe_timeout_seconds",
            "interval_seconds",
            "max_per_node_per_second",
            "max_per_destination_per_second",
        ):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be positive, not {getattr(self, name)}")
        if not 0 <= self.jitter_fraction < 1:
            problems.append(f"jitter_fraction must be in [0, 1), not {self.jitter_fraction}")
        for name in ("max_pairs_per_flow", "representatives_per_class_pair", "results_kept"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("drift_sample_size", "history_kept", "result_grace_seconds"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, not {getattr(self, name)}")
        longest_gap = (
            self.interval_seconds * (1 + self.jitter_fraction) + self.probe_timeout_seconds
        )
        if self.freshness_seconds <= longest_gap:
            problems.append(
                f"freshness_seconds ({self.freshness_seconds}) must exceed the longest gap between "
                f"two results of a flow, interval × (1 + jitter) + timeout = {longest_gap:g}"
            )
        if problems:
            raise ConfigurationError("; ".join(problems))


# --- the plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbePodRequest:
    """A sidecar-free probe pod to create: it carries `labels` in `namespace` (see DESIGN.md).

    The lab creates it on request; in a cluster the collector does when allowed. Its name is
    derived from namespace and labels, so the flows planned from it keep their keys once it runs.
    """

    namespace: str
    labels: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        digest = hashlib.sha256(
            json.dumps([self.namespace, list(self.labels)]).encode()
        ).hexdigest()
        return PROBE_POD_PREFIX + digest[:10]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    def as_pod(self) -> Pod:
        """The pod as planned: no IP or node yet, so its flows cannot be probed."""
        return Pod(
            namespace=self.namespace,
            name=self.name,
            labels=self.label_map(),
            phase="Pending",
        )


@dataclass(frozen=True)
class PlannedFlow:
    """A concrete flow to verify: the three truths' inputs and how to probe it.

    `template` is the assignment to send (id and attempt are filled in when it is issued); it is
    None when the flow cannot be probed, and `unprobeable` says why. For drift flows `intent` is the
    model's verdict: they can only pass or drift.
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
    drift_candidates: int = 0  # undeclared (pod, container port) pairs the sample was drawn from

    def facts(self) -> dict[str, FlowFacts]:
        return {key: flow.facts() for key, flow in self.flows.items()}


def is_probe_pod(pod: Pod) -> bool:
    return pod.labels.get(PROBE_POD_LABEL) == "true"


def is_running(pod: Pod) -> bool:
    """Whether a pod can send or receive probes: running, with an IP, on a node."""
    return pod.phase == "Running" and bool(pod.ips) and bool(pod.node) and pod.workload is None


def probe_pod_labels(selector: LabelSelector) -> dict[str, str] | None:
    """Labels a pod needs to be selected by `selector`, or None when no labels can be."""
    labels = dict(selector.match_labels)
    for req in selector.match_expressions:
        if req.key in labels:
            continue
        if req.operator == "In" and req.values:
            labels[req.key] = sorted(req.values)[0]
        elif req.operator == "Exists":
            labels[req.key] = "flowproof-probe"
    labels[PROBE_POD_LABEL] = "true"
    return labels if selector.matches(labels) else None


def probe_pod_request(
    snapshot: Snapshot, target: PodTarget, default_namespace: str
) -> ProbePodRequest | str:
    """The probe pod that stands for `target`'s pods, or why none can."""
    labels = probe_pod_labels(target.pod_selector)
    if labels is None:
        return f"no labels satisfy podSelector {target.pod_selector.describe()}"
    if target.namespace_selector is not None:
        names = sorted(
            name
            for name in snapshot.namespaces
            if target.namespace_selector.matches(snapshot.namespace_labels(name))
        )
        if not names:
            return f"no namespace matches {target.namespace_selector.describe()}"
        namespace = names[0]
    else:
        namespace = target.namespace or default_namespace
    return ProbePodRequest(namespace, tuple(sorted(labels.items())))


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


class _Classes:
    """Equivalence classes of the snapshot's pods, computed once and only when a flow is large."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self._model: ClassModel | None = None
        self._index = {pod.key: i for i, pod in enumerate(snapshot.pods)}
        self._known: dict[str, tuple[str, int | str]] = {}

    def of(self, name: str, endpoint: Endpoint) -> tuple[str, int | str]:
        known = self._known.get(name)
        if known is not None:
            return known
        index = self._index.get(name) if isinstance(endpoint, Pod) else None
        if not isinstance(endpoint, Pod):
            known = ("address", endpoint)
        elif index is None:  # a planned probe pod: a class of its own
            known = ("pod", name)
        else:
            if self._model is None:
                self._model = ClassModel(self._snapshot)
            known = ("class", int(self._model.class_of[index]))
        self._known[name] = known
        return known


def _representatives(
    pairs: Sequence[tuple[str, str]],
    endpoints: Mapping[str, Endpoint],
    classes: _Classes,
    per_class_pair: int,
) -> set[tuple[str, str]]:
    """The first pairs (in sorted order) of each (source class, destination class)."""
    groups: dict[tuple[object, object], list[tuple[str, str]]] = defaultdict(list)
    for pair in sorted(pairs):
        src, dst = pair
        groups[(classes.of(src, endpoints[src]), classes.of(dst, endpoints[dst]))].append(pair)
    chosen: set[tuple[str, str]] = set()
    for members in groups.values():
        chosen.update(members[:per_class_pair])
    return chosen


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
    concrete, resolve_problems = resolve(
        resolving, document, declared, cluster_dns_ip=settings.cluster_dns_ip
    )
    problems += resolve_problems if sources else []
    source_keys = {p.key for p in sources}
    concrete = [
        c
        for c in concrete
        if c.source.key in source_keys
        and not (isinstance(c.destination, Pod) and is_probe_pod(c.destination))
    ]
    if sources and not concrete and not problems and not declared.allow_empty:
        problems.append(
            f"{document.source or document.key}: flow {declared.name!r}: `to` matches no pod "
            "that can be probed"
        )
    endpoints: dict[str, Endpoint] = {}
    pair_of: list[tuple[str, str]] = []
    for c in concrete:
        src, dst = c.source.key, endpoint_name(c.destination)
        endpoints[src] = c.source
        endpoints[dst] = c.destination
        pair_of.append((src, dst))
    pairs = set(pair_of)
    chosen = pairs
    if len(pairs) > settings.max_pairs_per_flow:
        chosen = _representatives(
            sorted(pairs), endpoints, classes, settings.representatives_per_class_pair
        )
    expect_status = declared.http.expect_status if declared.http else ()
    flows: list[PlannedFlow] = []
    for c, pair in zip(concrete, pair_of, strict=True):
        if pair not in chosen:
            continue
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
        pairs_total=len(pairs),
        pairs_covered=len(chosen),
        problems=tuple(problems),
        allow_empty=declared.allow_empty,
        probe_pod=request,
    )
    return plan, flows


def drift_key(source: Pod, destination: Pod, port: int, protocol: Protocol) -> str:
    return f"drift:{source.key}->{destination.key}:{port}/{protocol}"


def _drift_sample(
    snapshot: Snapshot,
    engine: Engine,
    declared: Iterable[PlannedFlow],
    settings: PlannerSettings,
    generation: int,
) -> tuple[list[PlannedFlow], int]:
    """Up to `drift_sample_size` undeclared flows, half allowed and half denied when possible."""
    want = settings.drift_sample_size
    pods = [p for p in snapshot.pods if is_running(p) and not is_probe_pod(p)]
    pods = [p for p in pods if not p.host_network]
    targets = [(pod, cp.port, cp.protocol) for pod in pods for cp in pod.ports]
    taken = {(f.source.key, f.destination_name, f.port, f.protocol) for f in declared}
    universe = len(pods) * len(targets)
    if want == 0 or universe == 0:
        return [], 0
    rng = random.Random(f"{settings.drift_seed}:{generation}")

    def candidates() -> Iterable[tuple[Pod, Pod, int, Protocol]]:
        if universe <= max(want * 20, 2000):
            every = [(s, d, port, proto) for s in pods for d, port, proto in targets]
            rng.shuffle(every)
            yield from every
            return
        for _ in range(want * 40):  # bounded: a large cluster is sampled, never enumerated
            source = pods[rng.randrange(len(pods))]
            destination, port, proto = targets[rng.randrange(len(targets))]
            yield source, destination, port, proto

    half = math.ceil(want / 2)
    buckets: dict[bool, list[PlannedFlow]] = {True: [], False: []}
    seen: set[str] = set()
    for source, destination, port, proto in candidates():
        if source.key == destination.key or (source.key, destination.key, port, proto) in taken:
            continue
        key = drift_key(source, destination, port, proto)
        if key in seen:
            continue
        seen.add(key)
        verdict = engine.evaluate(source, destination, port, proto)
        bucket = buckets[verdict.allowed]
        if len(bucket) >= want:
            continue
        flow = ConcreteFlow(DRIFT_EXPECTATION, "drift", source, destination, port, proto, True)
        template, unprobeable, listener = _template(flow, key, settings)
        bucket.append(
            PlannedFlow(
                key=key,
                kind="drift",
                expectation=DRIFT_EXPECTATION,
                flow="drift",
                source=source,
                destination=destination,
                port=port,
                protocol=proto,
                intent=verdict.allowed,
                verdict=verdict,
                template=template,
                unprobeable=unprobeable,
                listener_declared=listener,
            )
        )
        if len(buckets[True]) >= half and len(buckets[False]) >= want - half:
            break
    allowed, denied = buckets[True], buckets[False]
    take_allowed = min(len(allowed), want - min(len(denied), want - half))
    take_denied = min(len(denied), want - take_allowed)
    undeclared = universe - len(targets) - len(taken)  # about: self pairs and declared ones out
    return allowed[:take_allowed] + denied[:take_denied], max(undeclared, 0)


def build_plan(snapshot: Snapshot, settings: PlannerSettings, *, generation: int = 0) -> Plan:
    """Every flow to verify for `snapshot`: declared flows first, then the drift sample."""
    engine = Engine(snapshot)
    classes = _Classes(snapshot)
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
    drift, universe = _drift_sample(snapshot, engine, list(flows.values()), settings, generation)
    for flow in drift:
        flows.setdefault(flow.key, flow)
    return Plan(
        generation=generation,
        flows=flows,
        declared=tuple(declared),
        probe_pods=tuple(requests.values()),
        drift_candidates=universe,
    )


# --- scheduling ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanUpdate:
    """What `Planner.update` changed: the new plan and which flow keys appeared, went or were
    touched (to be verified first; the feedback latency is measured on these)."""

    plan: Plan
    change: ChangeEvent | None
    added: frozenset[str]
    removed: frozenset[str]
    touched: frozenset[str]


class _TokenBucket:
    """`rate` per second with a burst of one second's worth (at least one)."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self.tokens = self.capacity
        self.updated = now

    def ready(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = max(self.updated, now)
        return self.tokens >= 1.0

    def take(self) -> None:
        self.tokens -= 1.0


@dataclass
class _InFlight:
    key: str
    issued_at: float
    deadline: float


@dataclass
class PlannerStats:
    issued_total: int = 0
    retries_total: int = 0
    lost_total: int = 0
    rate_limited_total: int = 0


URGENT_RETRY, URGENT_DECLARED, URGENT_DRIFT = 0, 1, 2


@dataclass(order=True)
class _Urgent:
    priority: int
    sequence: int
    key: str = field(compare=False)
    attempt: int = field(compare=False, default=1)


class Planner:
    """Holds the current plan and decides which assignments are due.

    Order: retries first, then flows touched by a change (declared before drift), then the cadence
    (`interval_seconds` ± jitter per flow, earliest first). A flow with a probe in flight is not
    sent again by the cadence; retries and touched flows are (the probe in flight may predate the
    change). Nothing is sent beyond `max_per_node_per_second` or `max_per_destination_per_second`:
    what is held back stays queued in its place.
    """

    def __init__(
        self,
        settings: PlannerSettings,
        *,
        seed: int | None = None,
        id_prefix: str | None = None,
    ) -> None:
        self.settings = settings
        self._rng = random.Random(seed)
        self._id_prefix = id_prefix if id_prefix is not None else uuid.uuid4().hex[:12]
        self._sequence = 0
        self.plan = Plan(generation=0, flows={}, declared=())
        self._facts: dict[str, FlowFacts] = {}
        self._next_due: dict[str, float] = {}
        self._cadence: list[tuple[float, int, str]] = []
        self._urgent: list[_Urgent] = []
        self._urgent_keys: dict[str, _Urgent] = {}
        self._in_flight: dict[str, _InFlight] = {}
        self._keys_in_flight: dict[str, int] = defaultdict(int)
        self._nodes: dict[str, _TokenBucket] = {}
        self._destinations: dict[str, _TokenBucket] = {}
        self.stats = PlannerStats()

    # -- plan --------------------------------------------------------------------------------------

    def update(self, snapshot: Snapshot, change: ChangeEvent | None, now: float) -> PlanUpdate:
        """Plan a new snapshot; keep the schedule of unchanged flows, queue the touched ones."""
        generation = change.generation if change is not None else self.plan.generation + 1
        plan = build_plan(snapshot, self.settings, generation=generation)
        facts = plan.facts()
        touched = set(touched_flows(change, self._facts, facts))
        added = facts.keys() - self._facts.keys()
        removed = self._facts.keys() - facts.keys()
        # A drift flow is new because the sample was drawn again, not because the change touched it.
        touched -= {k for k in added if plan.flows[k].kind == "drift"}
        self.plan = plan
        self._facts = facts
        for key in removed:
            self._next_due.pop(key, None)
            self._urgent_keys.pop(key, None)
        for key in sorted(added - touched):
            self._schedule(key, now + self._rng.uniform(0, self.settings.interval_seconds))
        for key in sorted(touched):
            flow = plan.flows[key]
            if flow.template is None:
                self._next_due.pop(key, None)
                continue
            self._push_urgent(key, URGENT_DECLARED if flow.kind == "declared" else URGENT_DRIFT)
            if key not in self._next_due:
                self._schedule(key, now + self._interval())
        live_nodes = {f.template.source_node for f in plan.flows.values() if f.template}
        live_destinations = {f.template.destination_ip for f in plan.flows.values() if f.template}
        self._nodes = {n: b for n, b in self._nodes.items() if n in live_nodes}
        self._destinations = {d: b for d, b in self._destinations.items() if d in live_destinations}
        return PlanUpdate(
            plan=plan,
            change=change,
            added=frozenset(added),
            removed=frozenset(removed),
            touched=frozenset(touched),
        )

    def expedite(self, keys: Iterable[str] | None = None) -> int:
        """Verify these flows (default: every declared flow) now, before the cadence; returns how
        many were queued. `verify` uses it to run every expectation at once."""
        chosen = (
            [k for k, f in self.plan.flows.items() if f.kind == "declared"]
            if keys is None
            else list(keys)
        )
        queued = 0
        for key in chosen:
            flow = self.plan.flows.get(key)
            if flow is None or flow.template is None:
                continue
            self._push_urgent(key, URGENT_DECLARED if flow.kind == "declared" else URGENT_DRIFT)
            queued += 1
        return queued

    def retry(self, key: str, *, attempt: int) -> None:
        """Probe `key` again at once (a result that would fail the flow is confirmed first)."""
        if key in self.plan.flows:
            self._push_urgent(key, URGENT_RETRY, attempt)

    def completed(self, assignment_id: str) -> str | None:
        """A result for `assignment_id` came: its flow is no longer in flight; returns its key."""
        entry = self._in_flight.pop(assignment_id, None)
        if entry is None:
            return None
        self._release(entry.key)
        return entry.key

    # -- due ---------------------------------------------------------------------------------------

    def due(self, now: float) -> list[Assignment]:
        """The assignments to send now, in order; what rate limits hold back stays queued."""
        self._expire(now)
        issued: list[Assignment] = []
        held: list[_Urgent] = []
        while self._urgent:
            item = heapq.heappop(self._urgent)
            if self._urgent_keys.get(item.key) is not item:
                continue  # superseded by a more urgent entry, or the flow went away
            flow = self.plan.flows.get(item.key)
            if flow is None or flow.template is None:
                del self._urgent_keys[item.key]
                continue
            if not self._admit(flow.template, now):
                held.append(item)
                continue
            del self._urgent_keys[item.key]
            if item.priority == URGENT_RETRY:
                self.stats.retries_total += 1
            issued.append(self._issue(flow.template, now, item.attempt))
        for item in held:
            heapq.heappush(self._urgent, item)
        later: list[tuple[float, int, str]] = []
        while self._cadence and self._cadence[0][0] <= now:
            entry = heapq.heappop(self._cadence)
            due_at, _, key = entry
            if self._next_due.get(key) != due_at:
                continue  # rescheduled since
            flow = self.plan.flows.get(key)
            if flow is None or flow.template is None:
                self._next_due.pop(key, None)
                continue
            if self._keys_in_flight.get(key) or key in self._urgent_keys:
                self._schedule(key, now + self._interval())
                continue
            if not self._admit(flow.template, now):
                later.append(entry)
                continue
            issued.append(self._issue(flow.template, now, 1))
        for entry in later:
            heapq.heappush(self._cadence, entry)
        return issued

    def next_wakeup(self, now: float) -> float | None:
        """When `due` may next return something (now if anything urgent is queued)."""
        if self._urgent_keys:
            return now
        while self._cadence:
            due_at, _, key = self._cadence[0]
            if self._next_due.get(key) == due_at:
                return min(due_at, self._earliest_deadline())
            heapq.heappop(self._cadence)
        deadline = self._earliest_deadline()
        return None if deadline == math.inf else deadline

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # -- internals ---------------------------------------------------------------------------------

    def _interval(self) -> float:
        jitter = self.settings.jitter_fraction
        return self.settings.interval_seconds * self._rng.uniform(1 - jitter, 1 + jitter)

    def _schedule(self, key: str, at: float) -> None:
        self._sequence += 1
        self._next_due[key] = at
        heapq.heappush(self._cadence, (at, self._sequence, key))

    def _push_urgent(self, key: str, priority: int, attempt: int = 1) -> None:
        current = self._urgent_keys.get(key)
        if current is not None and current.priority <= priority:
            return
        self._sequence += 1
        item = _Urgent(priority, self._sequence, key, attempt)
        self._urgent_keys[key] = item
        heapq.heappush(self._urgent, item)

    def _bucket(
        self, buckets: dict[str, _TokenBucket], name: str, rate: float, now: float
    ) -> _TokenBucket:
        bucket = buckets.get(name)
        if bucket is None:
            bucket = buckets[name] = _TokenBucket(rate, now)
        return bucket

    def _admit(self, template: Assignment, now: float) -> bool:
        node = self._bucket(
            self._nodes, template.source_node, self.settings.max_per_node_per_second, now
        )
        destination = self._bucket(
            self._destinations,
            template.destination_ip,
            self.settings.max_per_destination_per_second,
            now,
        )
        if not (node.ready(now) and destination.ready(now)):
            self.stats.rate_limited_total += 1
            return False
        node.take()
        destination.take()
        return True

    def _issue(self, template: Assignment, now: float, attempt: int) -> Assignment:
        self._sequence += 1
        assignment = dataclasses.replace(
            template, id=f"{self._id_prefix}-{self._sequence}", attempt=attempt
        )
        deadline = now + template.timeout_seconds + self.settings.result_grace_seconds
        self._in_flight[assignment.id] = _InFlight(template.flow_key, now, deadline)
        self._keys_in_flight[template.flow_key] += 1
        self._schedule(template.flow_key, now + self._interval())
        self.stats.issued_total += 1
        return assignment

    def _release(self, key: str) -> None:
        left = self._keys_in_flight.get(key, 0) - 1
        if left > 0:
            self._keys_in_flight[key] = left
        else:
            self._keys_in_flight.pop(key, None)

    def _earliest_deadline(self) -> float:
        return min((e.deadline for e in self._in_flight.values()), default=math.inf)

    def _expire(self, now: float) -> None:
        lost = [aid for aid, e in self._in_flight.items() if e.deadline <= now]
        for assignment_id in lost:
            entry = self._in_flight.pop(assignment_id)
            self._release(entry.key)
            self.stats.lost_total += 1
            if entry.key in self.plan.flows:
                self._schedule(entry.key, now)


__all__ = [
    "PROBE_POD_LABEL",
    "Clock",
    "DeclaredFlowPlan",
    "Plan",
    "PlanUpdate",
    "PlannedFlow",
    "Planner",
    "PlannerSettings",
    "PlannerStats",
    "ProbePodRequest",
    "build_plan",
    "is_probe_pod",
    "is_running",
    "probe_pod_request",
]
