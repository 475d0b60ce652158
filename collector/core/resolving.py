"""Resolving: a declared flow becomes concrete flows (source pod, destination, port, protocol).

Owns pod selection for `from`/`to`, port expansion (numbers, ranges, names resolved on the
destination pod), external targets (`cidr`, `dns: cluster`) and the cluster DNS defaults. Pure: no
I/O; what does not resolve is returned as a problem in words, never raised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from collector.core.engine import Endpoint, endpoint_name
from collector.core.model import (
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


def target_selects(snapshot: Snapshot, target: PodTarget, default_namespace: str, pod: Pod) -> bool:
    """Whether a `from`/`to` pod target selects `pod` (its namespace's labels from `snapshot`)."""
    if target.namespace_selector is not None:
        if not target.namespace_selector.matches(snapshot.namespace_labels(pod.namespace)):
            return False
    elif pod.namespace != (target.namespace or default_namespace):
        return False
    return target.pod_selector.matches(pod.labels)


def select_pods(snapshot: Snapshot, target: PodTarget, default_namespace: str) -> list[Pod]:
    """Pods a `from`/`to` pod target selects, in snapshot order."""
    if target.namespace_selector is None:
        # One namespace: only its pods (snapshot order is kept within a namespace, and the
        # order across namespaces does not matter when there is one).
        namespace = target.namespace or default_namespace
        candidates: Sequence[Pod] = snapshot.pods_by_namespace.get(namespace, ())
        return [pod for pod in candidates if target.pod_selector.matches(pod.labels)]
    return [
        pod for pod in snapshot.pods if target_selects(snapshot, target, default_namespace, pod)
    ]


DNS_TARGET = PodTarget(namespace=CLUSTER_DNS_NAMESPACE, pod_selector=CLUSTER_DNS_SELECTOR)
"""The cluster DNS pods, the destinations of a `dns: cluster` flow."""


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


@dataclass(frozen=True)
class Resolution:
    """A declared flow's sources, destinations and each destination's ports, before they are
    multiplied out: its concrete flows are every source x destination x port, in that order.

    A planner that samples a large flow picks its pairs here and makes only their concrete
    flows (`between`), where `flows()` makes every one."""

    document: Expectations
    flow: FlowExpectation
    sources: tuple[Pod, ...]
    destinations: tuple[Endpoint, ...]
    ports: tuple[tuple[tuple[int, Protocol], ...], ...]
    """Per destination (same index): its concrete ports, in the order of the flow's specs."""
    errors: tuple[tuple[str, ...], ...]
    """Per destination (same index): why some of the flow's port specs do not resolve on it."""
    targets: tuple[str, ...]
    """Problems of `from` and `to` themselves (no pod matches, a host that is never offline)."""
    dns_name: str | None = None

    def between(self, source: Pod, index: int) -> list[ConcreteFlow]:
        """The concrete flows from `source` to destination `index`, one per port."""
        destination = self.destinations[index]
        flow = self.flow
        intent = flow.expect == "allow"
        http_path = flow.http.path if flow.http else None
        return [
            ConcreteFlow(
                expectation=self.document.key,
                flow=flow.name,
                source=source,
                destination=destination,
                port=port,
                protocol=protocol,
                intent=intent,
                http_path=http_path,
                dns_name=self.dns_name,
            )
            for port, protocol in self.ports[index]
        ]

    def flows(self) -> list[ConcreteFlow]:
        """Every concrete flow: source x destination x port."""
        return [
            c
            for source in self.sources
            for index in range(len(self.destinations))
            for c in self.between(source, index)
        ]

    def problems(self) -> list[str]:
        """What kept some concrete flows from resolving, as `resolve` reports it: the targets'
        problems, then a port's once per source and destination it fails on."""
        where = f"{self.document.source or self.document.key}: flow {self.flow.name!r}"
        problems = list(self.targets)
        if any(self.errors):
            per_source = [f"{where}: {e}" for errors in self.errors for e in errors]
            problems += per_source * len(self.sources)
        if self.flow.allow_empty and not (self.sources and any(self.ports)):
            return []
        return problems


def resolution(
    snapshot: Snapshot,
    document: Expectations,
    flow: FlowExpectation,
    *,
    cluster_dns_ip: str = DEFAULT_CLUSTER_DNS_IP,
) -> Resolution:
    """What one declared flow selects: its sources, destinations and their ports."""
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
        dns_pods = select_pods(snapshot, DNS_TARGET, CLUSTER_DNS_NAMESPACE)
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
    ports: list[tuple[tuple[int, Protocol], ...]] = []
    errors: list[tuple[str, ...]] = []
    for destination in destinations:
        found: list[tuple[int, Protocol]] = []
        failed: list[str] = []
        for spec in flow.ports:
            expanded = expand_ports(spec, destination)
            if isinstance(expanded, str):
                failed.append(expanded)
            else:
                found += expanded
        ports.append(tuple(found))
        errors.append(tuple(failed))
    return Resolution(
        document,
        flow,
        tuple(sources),
        tuple(destinations),
        tuple(ports),
        tuple(errors),
        tuple(problems),
        dns_name,
    )


def resolve(
    snapshot: Snapshot,
    document: Expectations,
    flow: FlowExpectation,
    *,
    cluster_dns_ip: str = DEFAULT_CLUSTER_DNS_IP,
) -> tuple[list[ConcreteFlow], list[str]]:
    """Concrete flows of one declared flow, and the problems that kept some from resolving."""
    found = resolution(snapshot, document, flow, cluster_dns_ip=cluster_dns_ip)
    return found.flows(), found.problems()
