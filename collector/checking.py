"""Intent vs model: resolve expectations to concrete flows, compare them with the engine's verdict.

Owns the resolution of a FlowExpectation (selectors, ports, external targets) into concrete flows
and the offline statuses (`PASS`, `POLICY_MISMATCH`). The live loop adds reality on top of the
same flows. Pure: no I/O; an expectation that matches nothing is an InputError unless it
says `allowEmpty`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from collector.engine import Endpoint, Engine, Verdict, endpoint_name
from collector.errors import InputError
from collector.model import (
    Expectations,
    ExternalTarget,
    FlowExpectation,
    LabelSelector,
    Pod,
    PodTarget,
    PortSpec,
    Protocol,
    Snapshot,
)

Status = Literal[
    "PASS",
    "REQUIRED_BLOCKED",
    "FORBIDDEN_OPEN",
    "POLICY_MISMATCH",
    "ENFORCEMENT_DRIFT",
    "INCONCLUSIVE",
    "PENDING",
    "STALE",
]
# Worst first: the order in which reports group and the status an expectation takes from its flows.
STATUS_ORDER: tuple[Status, ...] = (
    "REQUIRED_BLOCKED",
    "FORBIDDEN_OPEN",
    "POLICY_MISMATCH",
    "ENFORCEMENT_DRIFT",
    "INCONCLUSIVE",
    "STALE",
    "PENDING",
    "PASS",
)
FAILING: frozenset[Status] = frozenset(
    {"REQUIRED_BLOCKED", "FORBIDDEN_OPEN", "POLICY_MISMATCH", "ENFORCEMENT_DRIFT"}
)

CLUSTER_DNS_NAMESPACE = "kube-system"
CLUSTER_DNS_SELECTOR = LabelSelector(match_labels=(("k8s-app", "kube-dns"),))
DEFAULT_CLUSTER_DNS_IP = "10.96.0.10"
MAX_PORTS_PER_RANGE = 16


@dataclass(frozen=True)
class ConcreteFlow:
    """One (source pod, destination, port, protocol) that a declared flow stands for."""

    expectation: str  # "namespace/name" of the FlowExpectations document
    flow: str  # the flow's name in that document
    source: Pod
    destination: Endpoint
    port: int
    protocol: Protocol
    intent: bool  # expect: allow
    http_path: str | None = None
    dns_name: str | None = None  # set for `to: {dns: ...}` flows: the name a probe queries

    @property
    def key(self) -> str:
        return (
            f"{self.expectation}/{self.flow}:{self.source.key}->"
            f"{endpoint_name(self.destination)}:{self.port}/{self.protocol}"
        )


@dataclass(frozen=True)
class FlowCheck:
    """A concrete flow with the model's verdict and the offline status."""

    flow: ConcreteFlow
    verdict: Verdict | None
    status: Status
    detail: str = ""


@dataclass(frozen=True)
class CheckReport:
    checks: tuple[FlowCheck, ...]
    problems: tuple[str, ...] = field(default=())  # expectations that resolved to nothing, etc.

    @property
    def failed(self) -> bool:
        return any(c.status in FAILING for c in self.checks)


def status_rank(status: Status) -> int:
    return STATUS_ORDER.index(status)


def select_pods(snapshot: Snapshot, target: PodTarget, default_namespace: str) -> list[Pod]:
    """Pods a `from`/`to` pod target selects, in snapshot order."""
    pods = []
    for pod in snapshot.pods:
        if target.namespace_selector is not None:
            if not target.namespace_selector.matches(snapshot.namespace_labels(pod.namespace)):
                continue
        elif pod.namespace != (target.namespace or default_namespace):
            continue
        if target.pod_selector.matches(pod.labels):
            pods.append(pod)
    return pods


def external_address(target: ExternalTarget) -> str | None:
    """A representative address inside a CIDR target: its first host (the address of a /32)."""
    if target.cidr is None:
        return None
    net = target.cidr
    if net.num_addresses == 1:
        return str(net.network_address)
    return str(net.network_address + 1)


def expand_ports(spec: PortSpec, destination: Endpoint) -> list[tuple[int, Protocol]] | str:
    """Concrete ports of a spec on a destination, or the reason there are none."""
    if spec.name is not None:
        if not isinstance(destination, Pod):
            return f"named port {spec.name!r} needs a destination pod"
        number = destination.named_port(spec.name, spec.protocol)
        if number is None:
            return f"{destination.key} has no container port named {spec.name}/{spec.protocol}"
        return [(number, spec.protocol)]
    assert spec.port is not None
    if spec.end_port is None:
        return [(spec.port, spec.protocol)]
    span = list(range(spec.port, spec.end_port + 1))
    if len(span) > MAX_PORTS_PER_RANGE:
        # The two ends and evenly spread points between: ranges break at their edges.
        step = (len(span) - 1) / (MAX_PORTS_PER_RANGE - 1)
        span = sorted({span[round(i * step)] for i in range(MAX_PORTS_PER_RANGE)})
    return [(p, spec.protocol) for p in span]


def resolve(
    snapshot: Snapshot,
    document: Expectations,
    flow: FlowExpectation,
    *,
    cluster_dns_ip: str = DEFAULT_CLUSTER_DNS_IP,
) -> tuple[list[ConcreteFlow], list[str]]:
    """Concrete flows of one declared flow, and the problems that kept some from resolving."""
    problems: list[str] = []
    where = f"{document.source or document.key}: flow {flow.name!r}"
    sources = select_pods(snapshot, flow.source, document.namespace)
    if not sources:
        problems.append(f"{where}: `from` ({flow.source.describe()}) matches no pod")
    destinations: list[Endpoint]
    dns_name: str | None = None
    target = flow.destination
    if isinstance(target, PodTarget):
        destinations = list(select_pods(snapshot, target, document.namespace))
        if not destinations:
            problems.append(f"{where}: `to` ({target.describe()}) matches no pod")
    elif target.dns is not None:
        dns_pods = select_pods(
            snapshot,
            PodTarget(namespace=CLUSTER_DNS_NAMESPACE, pod_selector=CLUSTER_DNS_SELECTOR),
            CLUSTER_DNS_NAMESPACE,
        )
        destinations = list(dns_pods) or [cluster_dns_ip]
        dns_name = "kubernetes.default.svc.cluster.local"
    elif target.cidr is not None:
        address = external_address(target)
        assert address is not None
        destinations = [address]
    else:
        destinations = []
        problems.append(
            f"{where}: host {target.host!r} is resolved when probed; offline it cannot be checked"
        )
    flows: list[ConcreteFlow] = []
    for source in sources:
        for destination in destinations:
            for spec in flow.ports:
                ports = expand_ports(spec, destination)
                if isinstance(ports, str):
                    problems.append(f"{where}: {ports}")
                    continue
                for port, protocol in ports:
                    flows.append(
                        ConcreteFlow(
                            expectation=document.key,
                            flow=flow.name,
                            source=source,
                            destination=destination,
                            port=port,
                            protocol=protocol,
                            intent=flow.expect == "allow",
                            http_path=flow.http.path if flow.http else None,
                            dns_name=dns_name,
                        )
                    )
    if flow.allow_empty and not flows:
        problems = []
    return flows, problems


def _host_checks(
    snapshot: Snapshot, document: Expectations, flow: FlowExpectation
) -> list[FlowCheck]:
    """A `to: {host: ...}` flow offline: INCONCLUSIVE per source pod and port, never an error.

    The host's addresses are known only when it is resolved at probe time, so no ipBlock can be
    matched against it here; the live loop decides these flows.
    """
    assert isinstance(flow.destination, ExternalTarget)
    host = flow.destination.host or ""
    detail = f"host {host} is resolved when probed; offline its addresses are unknown"
    checks = []
    for source in select_pods(snapshot, flow.source, document.namespace):
        for spec in flow.ports:
            if spec.port is None:
                continue
            item = ConcreteFlow(
                expectation=document.key,
                flow=flow.name,
                source=source,
                destination=host,
                port=spec.port,
                protocol=spec.protocol,
                intent=flow.expect == "allow",
            )
            checks.append(FlowCheck(item, None, "INCONCLUSIVE", detail))
    return checks


def model_status(intent: bool, model_allowed: bool) -> Status:
    """Offline status: intent against the model."""
    return "PASS" if intent == model_allowed else "POLICY_MISMATCH"


def check(
    snapshot: Snapshot,
    documents: Sequence[Expectations] | None = None,
    *,
    cluster_dns_ip: str = DEFAULT_CLUSTER_DNS_IP,
    strict: bool = True,
) -> CheckReport:
    """Resolve every declared flow and compare intent with the model.

    With `strict` (the default), any expectation that resolves to nothing raises InputError: a typo
    in a selector must not pass silently.
    """
    engine = Engine(snapshot)
    documents = snapshot.expectations if documents is None else documents
    checks: list[FlowCheck] = []
    problems: list[str] = []
    for document in documents:
        for flow in document.flows:
            if isinstance(flow.destination, ExternalTarget) and flow.destination.host:
                checks.extend(_host_checks(snapshot, document, flow))
                continue
            concrete, flow_problems = resolve(
                snapshot, document, flow, cluster_dns_ip=cluster_dns_ip
            )
            problems.extend(flow_problems)
            for item in concrete:
                verdict = engine.evaluate(item.source, item.destination, item.port, item.protocol)
                checks.append(FlowCheck(item, verdict, model_status(item.intent, verdict.allowed)))
    if strict and problems:
        raise InputError(
            "expectations do not resolve",
            problems=tuple(InputError(p) for p in problems),
        )
    return CheckReport(tuple(checks), tuple(problems))


def parse_port(text: str) -> tuple[int | str, Protocol]:
    """`80/TCP`, `80` (TCP), `53/udp`, or a name `http/TCP`, as given on a command line."""
    value, _, proto = text.partition("/")
    protocol = (proto or "TCP").upper()
    if protocol not in ("TCP", "UDP", "SCTP"):
        raise InputError(f"protocol must be TCP, UDP or SCTP, not {proto!r}", field="--port")
    if value.isdigit():
        number = int(value)
        if not 1 <= number <= 65535:
            raise InputError(f"port {number} is outside 1-65535", field="--port")
        return number, protocol  # type: ignore[return-value]
    if not value:
        raise InputError(f"{text!r} is not a port: use NUMBER/PROTOCOL", field="--port")
    return value, protocol  # type: ignore[return-value]


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
