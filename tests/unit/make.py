"""Small builders for engine tests: a sentence of test data each, keyword overrides for the rest."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from collector.core.model import (
    NAMESPACE_NAME_LABEL,
    ClusterNetworkPolicy,
    ClusterPeer,
    ClusterPort,
    ClusterRule,
    ContainerPort,
    IPBlock,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyPort,
    Requirement,
    Rule,
    Snapshot,
)


def sel(
    labels: Mapping[str, str] | None = None, *exprs: tuple[str, str, tuple[str, ...]]
) -> LabelSelector:
    return LabelSelector(
        match_labels=tuple(sorted((labels or {}).items())),
        match_expressions=tuple(Requirement(k, op, vals) for k, op, vals in exprs),  # type: ignore[arg-type]
    )


def make_pod(
    ref: str = "x/a",
    *,
    labels: Mapping[str, str] | None = None,
    ports: Iterable[tuple[int, str, str | None]] = ((80, "TCP", "serve-80-tcp"),),
    ip: str | None = "auto",
    host_network: bool = False,
) -> Pod:
    namespace, name = ref.split("/")
    if ip == "auto":
        ip = f"10.244.{ord(namespace[0]) % 200}.{ord(name[0]) % 200}"
    return Pod(
        namespace=namespace,
        name=name,
        labels=dict(labels if labels is not None else {"pod": name}),
        ports=tuple(ContainerPort(p, proto, n) for p, proto, n in ports),  # type: ignore[arg-type]
        ips=(ip,) if ip else (),
        host_network=host_network,
    )


def make_namespace(name: str, **labels: str) -> Namespace:
    return Namespace(name, {"ns": name, **labels, NAMESPACE_NAME_LABEL: name})


def peer(
    pods: Mapping[str, str] | LabelSelector | None = None,
    namespaces: Mapping[str, str] | LabelSelector | None = None,
    cidr: str | None = None,
    excepts: Iterable[str] = (),
) -> Peer:
    if cidr is not None:
        return Peer(
            ip_block=IPBlock(
                ipaddress.ip_network(cidr), tuple(ipaddress.ip_network(e) for e in excepts)
            )
        )

    def as_sel(value: Mapping[str, str] | LabelSelector | None) -> LabelSelector | None:
        if value is None or isinstance(value, LabelSelector):
            return value
        return sel(value)

    return Peer(pod_selector=as_sel(pods), namespace_selector=as_sel(namespaces))


def port(
    number: int | str | None = 80, protocol: str = "TCP", end: int | None = None
) -> PolicyPort:
    return PolicyPort(protocol=protocol, port=number, end_port=end)  # type: ignore[arg-type]


def rule(*peers: Peer, ports: Iterable[PolicyPort] = ()) -> Rule:
    return Rule(peers=tuple(peers), ports=tuple(ports))


def make_policy(
    name: str = "np",
    namespace: str = "x",
    *,
    selector: LabelSelector | None = None,
    ingress: Iterable[Rule] | None = None,
    egress: Iterable[Rule] | None = None,
    types: Iterable[str] | None = None,
) -> NetworkPolicy:
    ingress_rules = tuple(ingress or ())
    egress_rules = tuple(egress or ())
    if types is None:
        inferred: tuple[str, ...] = ("ingress", "egress") if egress_rules else ("ingress",)
    else:
        inferred = tuple(types)
    return NetworkPolicy(
        namespace=namespace,
        name=name,
        pod_selector=selector or LabelSelector(),
        policy_types=inferred,  # type: ignore[arg-type]
        ingress=ingress_rules,
        egress=egress_rules,
    )


def cpeer(
    namespaces: Mapping[str, str] | None = None,
    pods: Mapping[str, str] | None = None,
    *,
    networks: Iterable[str] = (),
    nodes: Mapping[str, str] | None = None,
    domains: Iterable[str] = (),
) -> ClusterPeer:
    """A cluster policy peer: `namespaces` alone, `pods` (in `namespaces`, default all), networks,
    nodes or domain names."""
    networks = tuple(ipaddress.ip_network(n) for n in networks)
    if networks:
        return ClusterPeer(networks=networks)
    if nodes is not None:
        return ClusterPeer(nodes=sel(nodes))
    if domains:
        return ClusterPeer(domain_names=tuple(domains))
    if pods is not None:
        return ClusterPeer(namespace_selector=sel(namespaces), pod_selector=sel(pods))
    return ClusterPeer(namespace_selector=sel(namespaces))


def cport(
    number: int | None = 80,
    protocol: str | None = "TCP",
    end: int | None = None,
    *,
    name: str | None = None,
) -> ClusterPort:
    if name is not None:
        return ClusterPort(protocol=None, name=name)
    return ClusterPort(protocol=protocol, port=number, end_port=end)  # type: ignore[arg-type]


def crule(
    action: str, *peers: ClusterPeer, ports: Iterable[ClusterPort] = (), name: str = ""
) -> ClusterRule:
    return ClusterRule(
        action=action, peers=tuple(peers) or (cpeer(),), ports=tuple(ports), name=name
    )  # type: ignore[arg-type]


def make_cnp(
    name: str = "cnp",
    *,
    tier: str = "Admin",
    priority: int = 10,
    namespaces: Mapping[str, str] | None = None,
    pods: Mapping[str, str] | None = None,
    ingress: Iterable[ClusterRule] = (),
    egress: Iterable[ClusterRule] = (),
    kind: str = "ClusterNetworkPolicy",
) -> ClusterNetworkPolicy:
    """A cluster policy whose subject is the pods `pods` selects (all) in `namespaces` (all)."""
    return ClusterNetworkPolicy(
        name=name,
        tier=tier,  # type: ignore[arg-type]
        priority=priority,
        subject_namespaces=sel(namespaces),
        subject_pods=sel(pods) if pods is not None else None,
        ingress=tuple(ingress),
        egress=tuple(egress),
        kind=kind,
    )


def make_snapshot(
    pods: Iterable[Pod],
    policies: Iterable[NetworkPolicy] = (),
    *,
    cluster_policies: Iterable[ClusterNetworkPolicy] = (),
    **ns_labels: Mapping[str, str],
) -> Snapshot:
    pods = tuple(pods)
    names = sorted({p.namespace for p in pods} | set(ns_labels))
    namespaces = {}
    for n in names:
        extra = dict(ns_labels.get(n, {}))
        namespaces[n] = make_namespace(n, **extra)
    return Snapshot(
        namespaces=namespaces,
        pods=pods,
        policies=tuple(policies),
        cluster_policies=tuple(cluster_policies),
    )
