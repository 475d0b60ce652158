"""Realistic synthetic clusters for benchmarks: namespaces, pods and NetworkPolicies from a seed.

Owns `make_cluster` (a deterministic `Snapshot`) and `write_manifests` (the same cluster as
Kubernetes YAML, to feed another analyzer side by side). Pods draw their labels from small
vocabularies, so many pods are alike, as in real clusters. It must never touch a real cluster or
the network, and never use randomness other than the seeded generator it is given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import itertools
import random
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from collector.core.model import (
    NAMESPACE_NAME_LABEL,
    ContainerPort,
    Direction,
    Expectations,
    FlowExpectation,
    IPBlock,
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
from lab.cluster import policy_manifest

TEAMS = ("payments", "search", "identity", "checkout", "platform", "data")
ENVS = ("prod", "staging", "dev")
VERSIONS = ("v1", "v2", "v3")
VERSION_WEIGHTS = (6, 3, 1)
# app -> (tier, container ports, relative frequency)
APPS: dict[str, tuple[str, tuple[ContainerPort, ...], int]] = {
    "web": (
        "frontend",
        (ContainerPort(80, "TCP", "http"), ContainerPort(9090, "TCP", "metrics")),
        6,
    ),
    "api": (
        "backend",
        (ContainerPort(8080, "TCP", "http"), ContainerPort(9090, "TCP", "metrics")),
        8,
    ),
    "worker": ("backend", (ContainerPort(9090, "TCP", "metrics"),), 5),
    "auth": ("backend", (ContainerPort(8080, "TCP", "http"),), 2),
    "cache": ("data", (ContainerPort(8080, "TCP"),), 2),
    "db": (
        "data",
        (ContainerPort(5432, "TCP", "postgres"), ContainerPort(9090, "TCP", "metrics")),
        3,
    ),
    "queue": ("data", (ContainerPort(5432, "TCP"), ContainerPort(8080, "UDP", "gossip")), 1),
}
# Who usually talks to whom: (source app, destination app).
CALLS = (
    ("web", "api"),
    ("api", "db"),
    ("api", "cache"),
    ("api", "auth"),
    ("worker", "db"),
    ("worker", "queue"),
    ("web", "auth"),
    ("api", "queue"),
)
POD_NETWORK = ipaddress.IPv4Network("10.0.0.0/8")
PODS_PER_NODE = 30


def make_cluster(pods: int, namespaces: int, policies: int, seed: int) -> Snapshot:
    """A cluster of `pods` pods in `namespaces` namespaces with `policies` NetworkPolicies.

    The same arguments always give the same snapshot. About one pod in a hundred is Pending with no
    IP yet; the rest have IPs from 10.0.0.0/8.
    """
    if pods < 0 or policies < 0 or namespaces < 1:
        raise ValueError("need pods >= 0, policies >= 0 and at least one namespace")
    rng = random.Random(seed)
    ns_objects = _namespaces(rng, namespaces)
    pod_objects = _pods(rng, pods, list(ns_objects))
    policy_objects = _policies(rng, policies, ns_objects)
    return Snapshot(namespaces=ns_objects, pods=pod_objects, policies=policy_objects)


def write_manifests(snapshot: Snapshot, directory: Path) -> None:
    """Write the snapshot as Kubernetes YAML: namespaces.yaml, pods.yaml, networkpolicies.yaml."""
    directory.mkdir(parents=True, exist_ok=True)
    _dump(
        directory / "namespaces.yaml", [_namespace_doc(ns) for ns in snapshot.namespaces.values()]
    )
    _dump(directory / "pods.yaml", [_pod_doc(pod) for pod in snapshot.pods])
    _dump(directory / "networkpolicies.yaml", [policy_manifest(p) for p in snapshot.policies])


# --- generation -----------------------------------------------------------------------------------


def _namespaces(rng: random.Random, count: int) -> dict[str, Namespace]:
    result: dict[str, Namespace] = {}
    for i in range(count):
        team, env = rng.choice(TEAMS), rng.choices(ENVS, weights=(3, 2, 1))[0]
        name = f"{team}-{env}-{i}"
        labels = {"team": team, "env": env, NAMESPACE_NAME_LABEL: name}
        if rng.random() < 0.2:
            labels["monitoring"] = "enabled"
        result[name] = Namespace(name, labels)
    return result


def _pods(rng: random.Random, count: int, namespaces: Sequence[str]) -> tuple[Pod, ...]:
    # A few namespaces hold most pods (Zipf-like), as in real clusters.
    weights = [1.0 / (rank + 1) for rank in range(len(namespaces))]
    apps = list(APPS)
    app_weights = [APPS[a][2] for a in apps]
    nodes = max(1, (count + PODS_PER_NODE - 1) // PODS_PER_NODE)
    base = int(POD_NETWORK.network_address) + 2
    result = []
    for i in range(count):
        namespace = rng.choices(namespaces, weights=weights)[0]
        app = rng.choices(apps, weights=app_weights)[0]
        tier, ports, _ = APPS[app]
        labels = {
            "app": app,
            "tier": tier,
            "version": rng.choices(VERSIONS, weights=VERSION_WEIGHTS)[0],
        }
        pending = rng.random() < 0.01
        uid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        result.append(
            Pod(
                namespace=namespace,
                name=f"{app}-{i:06d}",
                labels=labels,
                ports=ports,
                ips=() if pending else (str(ipaddress.IPv4Address(base + i)),),
                uid=uid,
                node=f"node-{rng.randrange(nodes)}",
                phase="Pending" if pending else "Running",
            )
        )
    return tuple(result)


def _selector(labels: dict[str, str] | None = None, *requirements: Requirement) -> LabelSelector:
    return LabelSelector(tuple(sorted((labels or {}).items())), tuple(requirements))


def _policies(
    rng: random.Random, count: int, namespaces: dict[str, Namespace]
) -> tuple[NetworkPolicy, ...]:
    names = list(namespaces)
    makers = (
        (_default_deny_ingress, 2),
        (_default_deny_egress_but_dns, 1),
        (_app_to_app, 8),
        (_cross_namespace, 4),
        (_tier_expressions, 2),
        (_ip_blocks, 2),
        (_metrics_scrape, 2),
        (_port_range, 1),
    )
    funcs = [m for m, _ in makers]
    weights = [w for _, w in makers]
    result = []
    for i in range(count):
        namespace = rng.choice(names)
        # The first policies of a cluster are its default denies, as teams usually start.
        maker = _default_deny_ingress if i < min(count // 10, len(names)) else None
        if maker is None:
            maker = rng.choices(funcs, weights=weights)[0]
        result.append(
            maker(rng, f"{maker.__name__.strip('_').replace('_', '-')}-{i}", namespace, namespaces)
        )
    return tuple(result)


def _policy(
    namespace: str,
    name: str,
    selector: LabelSelector,
    types: tuple[Direction, ...],
    ingress: tuple[Rule, ...] = (),
    egress: tuple[Rule, ...] = (),
) -> NetworkPolicy:
    return NetworkPolicy(namespace, name, selector, types, ingress, egress)


def _default_deny_ingress(
    rng: random.Random, name: str, namespace: str, namespaces: dict[str, Namespace]
) -> NetworkPolicy:
    return _policy(namespace, name, _selector(), ("ingress",))


def _default_deny_egress_but_dns(
    rng: random.Random, name: str, namespace: str, namespaces: dict[str, Namespace]
) -> NetworkPolicy:
    dns = Rule(ports=(PolicyPort("UDP", 53), PolicyPort("TCP", 53)))
    return _policy(namespace, name, _selector(), ("egress",), egress=(dns,))


def _port_of(app: str, rng: random.Random) -> PolicyPort:
    ports = [p for p in APPS[app][1] if p.name != "metrics"] or list(APPS[app][1])
    chosen = rng.choice(ports)
    if chosen.name is not None and rng.random() < 0.5:
        return PolicyPort(chosen.protocol, chosen.name)
    return PolicyPort(chosen.protocol, chosen.port)


def _app_to_app(
    rng: random.Random, name: str, namespace: str, namespaces: dict[str, Namespace]
) -> NetworkPolicy:
    source, destination = rng.choice(CALLS)
    peer = Peer(pod_selector=_selector({"app": source}))
    rule = Rule(peers=(peer,), ports=(_port_of(destination, rng),))
    if rng.random() < 0.3:
        # The client side too: egress from the source app to the destination app.
        to = Peer(pod_selector=_selector({"app": destination}))
        egress = Rule(peers=(to,), ports=(_port_of(destination, rng),))
        return _policy(namespace, name, _selector({"app": source}), ("egress",), egress=(egress,))
    return _policy(namespace, name, _selector({"app": destination}), ("ingress",), ingress=(rule,))


def _cross_namespace(
    rng: random.Random, name: str, namespace: str, namespaces: dict[str, Namespace]
) -> NetworkPolicy:
    source, destination = rng.choice(CALLS)
    team = rng.choice(TEAMS)
    peer = Peer(
        pod_selector=_selector({"app": source}),
        namespace_selector=_selector({"team": team}),
    )
    peers: tuple[Peer, ...] = (peer,)
    if rng.random() < 0.3:
        # The same app from any namespace of the same environment, as a second peer.
        env = namespaces[namespace].labels.get("env", "prod")
        peers += (
            Peer(
                pod_selector=_selector({"app": source}),
                namespace_selector=_selector({"env": env}),
            ),
        )
    rule = Rule(peers=peers, ports=(_port_of(destination, rng),))
    return _policy(namespace, name, _selector({"app": destination}), ("ingress",), ingress=(rule,))


def _tier_expressions(
    rng: random.Random, name: str, namespace: str, namespaces: dict[str, Namespace]
) -> NetworkPolicy:
    target = _selector(None, Requirement("tier", "In", ("data",)))
    peer = Peer(
        pod_selector=_selector(None, Requirement("tier", "In", ("backend", "frontend"))),
        namespace_selector=_selector(None, Requirement("env", "NotIn", ("dev",))),
    )
    canary = Peer(pod_selector=_selector(None, Requirement("version", "DoesNotExist")))
    rule = Rule(peers=(peer, canary))
    if rng.random() < 0.5:
        target = _selector({"app": "db"}, Requirement("version", "Exists"))
    return _policy(namespace, name, target, ("ingress",), ingress=(rule,))


def _ip_blocks(
    rng: random.Random, name: str, namespace: str, namespaces: dict[str, Namespace]
) -> NetworkPolicy:
    if rng.random() < 0.5:
        # Egress to the internet but not to private ranges, plus the pod network's first /16.
        internet = IPBlock(
            ipaddress.IPv4Network("0.0.0.0/0"),
            (
                ipaddress.IPv4Network("10.0.0.0/8"),
                ipaddress.IPv4Network("172.16.0.0/12"),
                ipaddress.IPv4Network("192.168.0.0/16"),
            ),
        )
        first = IPBlock(
            ipaddress.IPv4Network("10.0.0.0/16"), (ipaddress.IPv4Network("10.0.0.0/24"),)
        )
        egress = Rule(peers=(Peer(ip_block=internet), Peer(ip_block=first)))
        return _policy(namespace, name, _selector({"app": "web"}), ("egress",), egress=(egress,))
    prefix = rng.choice((16, 20, 24))
    third = rng.randrange(0, 4)
    cidr = ipaddress.IPv4Network(f"10.0.{third * 16}.0/{prefix}", strict=False)
    excepts = tuple(cidr.subnets(new_prefix=min(prefix + 2, 32)))[:1]
    rule = Rule(peers=(Peer(ip_block=IPBlock(cidr, excepts)),), ports=(PolicyPort("TCP", 8080),))
    return _policy(namespace, name, _selector({"app": "api"}), ("ingress",), ingress=(rule,))


def _metrics_scrape(
    rng: random.Random, name: str, namespace: str, namespaces: dict[str, Namespace]
) -> NetworkPolicy:
    peer = Peer(namespace_selector=_selector({"monitoring": "enabled"}))
    rule = Rule(peers=(peer,), ports=(PolicyPort("TCP", "metrics"),))
    return _policy(namespace, name, _selector(), ("ingress",), ingress=(rule,))


def _port_range(
    rng: random.Random, name: str, namespace: str, namespaces: dict[str, Namespace]
) -> NetworkPolicy:
    start = rng.choice((5000, 8000, 9000))
    ports = (PolicyPort("TCP", start, start + rng.choice((100, 1000))), PolicyPort("UDP", 8080))
    peer = Peer(namespace_selector=_selector({"team": rng.choice(TEAMS)}))
    types: tuple[Direction, ...] = ("ingress", "egress")
    return _policy(
        namespace,
        name,
        _selector({"tier": "backend"}),
        types,
        ingress=(Rule(peers=(peer,), ports=ports),),
        egress=(Rule(ports=ports), Rule(ports=(PolicyPort("UDP", 53),))),
    )


# --- manifests ------------------------------------------------------------------------------------


def _namespace_doc(ns: Namespace) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": ns.name, "labels": dict(ns.labels)},
    }


def _pod_doc(pod: Pod) -> dict[str, Any]:
    container_ports = []
    for cp in pod.ports:
        entry: dict[str, Any] = {"containerPort": cp.port, "protocol": cp.protocol}
        if cp.name is not None:
            entry["name"] = cp.name
        container_ports.append(entry)
    spec: dict[str, Any] = {
        "containers": [{"name": "app", "image": "registry.example/app:1", "ports": container_ports}]
    }
    if pod.node:
        spec["nodeName"] = pod.node
    if pod.host_network:
        spec["hostNetwork"] = True
    status: dict[str, Any] = {"phase": pod.phase}
    if pod.ips:
        status["podIP"] = pod.ips[0]
        status["podIPs"] = [{"ip": ip} for ip in pod.ips]
    metadata: dict[str, Any] = {
        "name": pod.name,
        "namespace": pod.namespace,
        "labels": dict(pod.labels),
    }
    if pod.uid:
        metadata["uid"] = pod.uid
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec, "status": status}


def _dump(path: Path, docs: list[dict[str, Any]]) -> None:
    with path.open("w") as handle:
        yaml.dump_all(docs, handle, Dumper=_Dumper, sort_keys=False, explicit_start=True)


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    """The safe dumper (libyaml's when present), never writing anchors for shared objects."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


# --- a cluster whose selectors do not repeat across namespaces --------------------------------------


def make_distinct_cluster(pods: int, namespaces: int, policies: int, seed: int) -> Snapshot:
    """A cluster where every namespace has its own apps, selectors, ports and external addresses.

    Each namespace runs a few apps labelled `app: <app>-<n>` (so no selector of one namespace
    selects pods of another), and its policies cycle through four kinds: an app-to-app ingress with
    `matchExpressions`, an ingress from named partner namespaces on an `endPort` range of its own,
    an egress to an `ipBlock` with an `except` of its own (one in ten into the pod network) plus DNS,
    and a metrics ingress from monitoring namespaces on a range of its own. Policy i goes to
    namespace i mod `namespaces`, so every namespace has `policies / namespaces` of them. Pods
    carry a `pod-template-hash` per (app, version), as ReplicaSet pods do. Same arguments, same
    snapshot.
    """
    if pods < 0 or policies < 0 or namespaces < 1:
        raise ValueError("need pods >= 0, policies >= 0 and at least one namespace")
    rng = random.Random(seed)
    ns_objects = _namespaces(rng, namespaces)
    names = list(ns_objects)
    apps_of = {name: _namespace_apps(rng, i) for i, name in enumerate(names)}
    pod_objects = _distinct_pods(rng, pods, names, apps_of)
    made: list[NetworkPolicy] = []
    kinds = (_own_app_ingress, _partner_ingress, _own_egress, _own_metrics)
    for i in range(policies):
        n = i % namespaces
        maker = kinds[(i // namespaces) % len(kinds)]
        made.append(
            maker(
                rng,
                f"{maker.__name__.strip('_').replace('_', '-')}-{i}",
                n,
                names,
                apps_of[names[n]],
            )
        )
    return Snapshot(namespaces=ns_objects, pods=pod_objects, policies=tuple(made))


def _namespace_apps(rng: random.Random, index: int) -> list[str]:
    """The apps of one namespace: three to six of the vocabulary, named after the namespace."""
    apps = rng.sample(list(APPS), rng.randint(3, 6))
    return [f"{app}-{index}" for app in apps]


def _base_app(app: str) -> str:
    return app.rsplit("-", 1)[0]


def _distinct_pods(
    rng: random.Random,
    count: int,
    namespaces: Sequence[str],
    apps_of: dict[str, list[str]],
) -> tuple[Pod, ...]:
    # Milder skew than `_pods`: with a thousand namespaces, a few are large and none is empty-heavy.
    weights = list(itertools.accumulate(1.0 / (rank + 1) ** 0.5 for rank in range(len(namespaces))))
    nodes = max(1, (count + PODS_PER_NODE - 1) // PODS_PER_NODE)
    base = int(POD_NETWORK.network_address) + 2
    result = []
    for i in range(count):
        namespace = rng.choices(namespaces, cum_weights=weights)[0]
        app = rng.choice(apps_of[namespace])
        tier, ports, _ = APPS[_base_app(app)]
        version = rng.choices(VERSIONS, weights=VERSION_WEIGHTS)[0]
        template = hashlib.blake2b(f"{namespace}/{app}/{version}".encode()).hexdigest()[:10]
        labels = {"app": app, "tier": tier, "version": version, "pod-template-hash": template}
        pending = rng.random() < 0.01
        uid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        result.append(
            Pod(
                namespace=namespace,
                name=f"{app}-{template}-{i:06d}",
                labels=labels,
                ports=ports,
                ips=() if pending else (str(ipaddress.IPv4Address(base + i)),),
                uid=uid,
                node=f"node-{rng.randrange(nodes)}",
                phase="Pending" if pending else "Running",
            )
        )
    return tuple(result)


def _own_app_ingress(
    rng: random.Random, name: str, n: int, names: Sequence[str], apps: Sequence[str]
) -> NetworkPolicy:
    target, *callers = rng.sample(list(apps), min(3, len(apps)))
    selector = _selector({"app": target}, Requirement("version", "In", ("v1", "v2")))
    peer = Peer(
        pod_selector=_selector(None, Requirement("app", "In", tuple(sorted(callers or [target]))))
    )
    rule = Rule(peers=(peer,), ports=(_port_of(_base_app(target), rng),))
    return _policy(names[n], name, selector, ("ingress",), ingress=(rule,))


def _partner_ingress(
    rng: random.Random, name: str, n: int, names: Sequence[str], apps: Sequence[str]
) -> NetworkPolicy:
    partners = tuple(sorted(rng.sample(list(names), min(3, len(names)))))
    peer = Peer(
        pod_selector=_selector(None, Requirement("tier", "In", ("backend", "frontend"))),
        namespace_selector=_selector(None, Requirement(NAMESPACE_NAME_LABEL, "In", partners)),
    )
    start = 8000 + (n % 97) * 10
    ports = (PolicyPort("TCP", start, start + 5 + n % 7), PolicyPort("TCP", 8080))
    target = rng.choice(list(apps))
    return _policy(
        names[n],
        name,
        _selector({"app": target}),
        ("ingress",),
        ingress=(Rule(peers=(peer,), ports=ports),),
    )


def _own_egress(
    rng: random.Random, name: str, n: int, names: Sequence[str], apps: Sequence[str]
) -> NetworkPolicy:
    if n % 10 == 9:
        # Into the pod network: one of four /16s with a /20 cut out (splits pods by address).
        third = rng.randrange(4)
        cidr = ipaddress.IPv4Network(f"10.{third}.0.0/16")
        excepts: tuple[ipaddress.IPv4Network, ...] = (
            ipaddress.IPv4Network(f"10.{third}.{rng.randrange(4) * 16}.0/20"),
        )
    else:
        # An external service of this namespace: its own /24 with a /28 cut out.
        cidr = ipaddress.IPv4Network(f"{100 + n // 65536 % 27}.{n // 256 % 256}.{n % 256}.0/24")
        excepts = (ipaddress.IPv4Network(f"{cidr.network_address + 16 * rng.randrange(16)}/28"),)
    source, destination = rng.sample(list(apps), 2)
    rules = (
        Rule(peers=(Peer(ip_block=IPBlock(cidr, excepts)),), ports=(PolicyPort("TCP", 443),)),
        Rule(ports=(PolicyPort("UDP", 53), PolicyPort("TCP", 53))),
        Rule(
            peers=(Peer(pod_selector=_selector({"app": destination})),),
            ports=(_port_of(_base_app(destination), rng),),
        ),
    )
    return _policy(names[n], name, _selector({"app": source}), ("egress",), egress=rules)


def _own_metrics(
    rng: random.Random, name: str, n: int, names: Sequence[str], apps: Sequence[str]
) -> NetworkPolicy:
    peer = Peer(
        namespace_selector=_selector(None, Requirement("monitoring", "Exists")),
        pod_selector=_selector(None, Requirement("version", "NotIn", ("v3",))),
    )
    start = 9000 + n % 89
    ports = (PolicyPort("TCP", start, start + 100), PolicyPort("TCP", "metrics"))
    return _policy(
        names[n], name, _selector(), ("ingress",), ingress=(Rule(peers=(peer,), ports=ports),)
    )


def with_expectations(snapshot: Snapshot, flows: int, seed: int) -> Snapshot:
    """The snapshot with `flows` declared flows, one FlowExpectations document per namespace used:
    from one app of a namespace to another of the same namespace, on a port the destination
    declares, half expected allowed and half denied. Same arguments, same flows."""
    rng = random.Random(seed)
    apps: dict[str, dict[str, Pod]] = {}
    for pod in snapshot.pods:
        if pod.ports and pod.ips:
            apps.setdefault(pod.namespace, {}).setdefault(pod.labels["app"], pod)
    usable = sorted(ns for ns, found in apps.items() if len(found) >= 2)
    documents: dict[str, list[FlowExpectation]] = {}
    for i in range(flows):
        namespace = usable[i % len(usable)]
        source, destination = rng.sample(sorted(apps[namespace]), 2)
        target = apps[namespace][destination].ports[0]
        documents.setdefault(namespace, []).append(
            FlowExpectation(
                name=f"flow-{i}",
                source=PodTarget(namespace, pod_selector=_selector({"app": source})),
                destination=PodTarget(namespace, pod_selector=_selector({"app": destination})),
                ports=(PortSpec(target.protocol, target.port),),
                expect="allow" if i % 2 == 0 else "deny",
            )
        )
    expectations = tuple(
        Expectations(namespace, "bench", tuple(found)) for namespace, found in documents.items()
    )
    return dataclasses.replace(snapshot, expectations=expectations)
