"""The lab's cluster as data: desired objects, pod placement, DNS records and cluster manifests.

Owns turning manifests (namespaces, pods and workload templates, policies, expectations) into the
concrete pods the lab runs (names, nodes, addresses, uids) and back into the API-shaped manifests
the collector reads. Pure: no I/O, no system calls; bad input is an InputError and nothing else.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import secrets
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from collector.core.model import (
    CLUSTER_NETWORK_POLICY,
    NAMESPACE_NAME_LABEL,
    ClusterNetworkPolicy,
    ClusterPeer,
    ClusterPort,
    ClusterRule,
    ContainerPort,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyPort,
    Rule,
)
from collector.core.probepods import PROBE_POD_LABEL
from collector.reading.fields import Where
from collector.reading.objects import synthetic_uid
from flowproof.errors import InputError, shown
from lab.config import UID_PATTERN, AddressPlan, LabSettings, Names
from lab.state import PodRecord

DNS_NAMESPACE = "kube-system"
DNS_LABEL = ("k8s-app", "kube-dns")
DNS_PORT = 53
MANAGED_DNS_POD = Pod(
    namespace=DNS_NAMESPACE,
    name="coredns",
    labels={"k8s-app": "kube-dns"},
    ports=(
        ContainerPort(port=53, protocol="UDP", name="dns"),
        ContainerPort(port=53, protocol="TCP", name="dns-tcp"),
    ),
)
_NODE_NAME = re.compile(r"node-(\d+)")


@dataclass(frozen=True)
class Manifests:
    """What a set of manifest files declares, as the lab needs it.

    `pods` may hold workload templates (`workload` set, `replicas` pods each); `policies` and
    `cluster_policies` are model policies (stored as their manifests); `expectations` are
    FlowExpectations documents, passed through untouched (the lab never interprets them);
    `warnings` what reading them accepted with a warning (file and line first).
    """

    namespaces: Mapping[str, Namespace] = field(default_factory=dict)
    declared_namespaces: frozenset[str] = frozenset()
    pods: tuple[Pod, ...] = ()
    policies: tuple[NetworkPolicy, ...] = ()
    expectations: tuple[Mapping[str, Any], ...] = ()
    cluster_policies: tuple[ClusterNetworkPolicy, ...] = ()
    warnings: tuple[str, ...] = ()
    sources: Mapping[str, Where] = field(default_factory=dict)
    """Where each pod or workload was read (by the key of its model pod), for problems."""


@dataclass(frozen=True)
class PodSpec:
    """One concrete pod the manifests ask for (a workload template expands into several)."""

    namespace: str
    name: str
    labels: Mapping[str, str]
    ports: tuple[ContainerPort, ...]
    workload: str | None = None
    host_network: bool = False
    ip: str | None = None  # status.podIP given: the pod keeps it
    uid: str | None = None  # metadata.uid given (not the inventory's synthetic one)
    node: int | None = None  # spec.nodeName given, or the DaemonSet's node
    managed: bool = False
    where: Where | None = field(default=None, compare=False)  # the manifest, for problems

    def error(self, path: tuple[str, ...], reason: str) -> InputError:
        """A problem with the field at `path` of this pod's manifest (file and line if read)."""
        if self.where is not None:
            return self.where.error(path, reason)
        return InputError(reason, field=f"{self.key} {'.'.join(path)}")

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def is_dns_pod(namespace: str, labels: Mapping[str, str], host_network: bool = False) -> bool:
    """Does the lab run its DNS server in this pod? (kube-system, `k8s-app: kube-dns`)."""
    return (
        namespace == DNS_NAMESPACE and labels.get(DNS_LABEL[0]) == DNS_LABEL[1] and not host_network
    )


def workload_name(workload: str) -> str:
    """`Deployment/api` -> `api`."""
    return workload.split("/", 1)[1] if "/" in workload else workload


def parse_node_name(text: str, settings: LabSettings, where: Where | None, key: str = "") -> int:
    match = _NODE_NAME.fullmatch(text)
    if match is None or not 1 <= int(match.group(1)) <= settings.nodes:
        reason = f"{shown(text)} is not a node of this lab (node-1 … node-{settings.nodes})"
        if where is not None:
            raise where.error(("spec", "nodeName"), reason)
        raise InputError(reason, field=f"{key} spec.nodeName")
    return int(match.group(1))


def check_uid(uid: str, where: Where | None, key: str) -> str:
    """`uid` if it is one the API server could have issued; else InputError naming the field."""
    if UID_PATTERN.fullmatch(uid):
        return uid
    reason = (
        f"{shown(uid)} is not a uid as the API server issues it (a lowercase UUID such as "
        "0b0b0b0b-0000-4000-8000-000000000000); leave metadata.uid out to get a fresh one"
    )
    if where is not None:
        raise where.error(("metadata", "uid"), reason)
    raise InputError(reason, field=f"{key} metadata.uid")


def concrete_pods(
    pods: Sequence[Pod], settings: LabSettings, sources: Mapping[str, Where] | None = None
) -> list[PodSpec]:
    """The pods to run: pods as given, workload templates expanded to `<name>-<i>`.

    A DaemonSet gets one pod per node (`<name>-<node>`, pinned to that node); other workloads get
    `replicas` pods. A uid is kept only when the manifest gave one.
    """
    specs: list[PodSpec] = []
    for pod in pods:
        where = (sources or {}).get(pod.key)
        uid = pod.uid if pod.uid and pod.uid != synthetic_uid(pod.namespace, pod.name) else None
        if uid is not None:
            check_uid(uid, where, pod.key)
        if pod.workload is None:
            node = parse_node_name(pod.node, settings, where, pod.key) if pod.node else None
            ip = pod.ips[0] if pod.ips else None
            specs.append(
                PodSpec(
                    namespace=pod.namespace,
                    name=pod.name,
                    labels=dict(pod.labels),
                    ports=pod.ports,
                    host_network=pod.host_network,
                    ip=ip,
                    uid=uid,
                    node=node,
                    where=where,
                )
            )
            continue
        base = workload_name(pod.workload)
        kind = pod.workload.split("/", 1)[0]
        instances: list[tuple[str, int | None]]
        if kind == "DaemonSet":
            instances = [(f"{base}-{n}", n) for n in range(1, settings.nodes + 1)]
        else:
            instances = [(f"{base}-{i}", None) for i in range(pod.replicas)]
        for name, node in instances:
            specs.append(
                PodSpec(
                    namespace=pod.namespace,
                    name=name,
                    labels=dict(pod.labels),
                    ports=pod.ports,
                    workload=pod.workload,
                    host_network=pod.host_network,
                    node=node,
                    where=where,
                )
            )
    seen: dict[str, PodSpec] = {}
    for spec in specs:
        if spec.key in seen:
            raise spec.error(
                ("metadata", "name"),
                f"two pods would be named {spec.key} "
                f"({seen[spec.key].workload or 'Pod'} and {spec.workload or 'Pod'}); rename one",
            )
        seen[spec.key] = spec
    return specs


def managed_dns_spec() -> PodSpec:
    pod = MANAGED_DNS_POD
    return PodSpec(
        namespace=pod.namespace,
        name=pod.name,
        labels=dict(pod.labels),
        ports=pod.ports,
        managed=True,
    )


class Placement:
    """Hands out nodes, addresses, indexes and uids to new pods, given the pods already placed."""

    def __init__(
        self, settings: LabSettings, existing: Iterable[PodRecord], next_index: int
    ) -> None:
        self.settings = settings
        self.plan = AddressPlan(settings)
        self.names = Names(settings.name)
        self.used: dict[str, str] = {}
        self.counts = dict.fromkeys(range(1, settings.nodes + 1), 0)
        self.next_index = next_index
        for record in existing:
            self._take(record.ip, record.key, record.node, record.host_network)

    def _take(self, ip: str, key: str, node: int, host_network: bool) -> None:
        if not host_network:
            self.used[ip] = key
        self.counts[node] = self.counts.get(node, 0) + 1

    def check_fixed(self, spec: PodSpec) -> None:
        """InputError unless the pod's given address can be used (call for all, then `place`)."""
        if spec.ip is None or spec.host_network:
            return
        try:
            address = ipaddress.ip_address(spec.ip)
        except ValueError as exc:
            raise spec.error(("status", "podIP"), f"{shown(spec.ip)} is not an IP address") from exc
        node = self.plan.node_of(spec.ip)
        if node is None or spec.ip not in self.plan.pod_addresses(node):
            raise spec.error(
                ("status", "podIP"),
                f"{address} is not a pod address of any node of this lab (node N has "
                f"{self.plan.node_subnet(1)} … {self.plan.node_subnet(self.settings.nodes)}, "
                "from .2)",
            )
        if spec.node is not None and spec.node != node:
            raise spec.error(
                ("spec", "nodeName"),
                f"status.podIP {spec.ip} is on {Names.node_name(node)}, but spec.nodeName says "
                f"{Names.node_name(spec.node)}",
            )
        owner = self.used.get(spec.ip)
        if owner is not None and owner != spec.key:
            raise spec.error(("status", "podIP"), f"{spec.ip} is already the address of {owner}")
        self.used[spec.ip] = spec.key

    def place(self, spec: PodSpec) -> PodRecord:
        """A new record for `spec` (its fixed address must have passed `check_fixed`)."""
        if spec.ip is not None and not spec.host_network:
            node = self.plan.node_of(spec.ip)
            assert node is not None
            ip = spec.ip
        else:
            node = spec.node or min(self.counts, key=lambda n: (self.counts[n], n))
            if spec.host_network:
                ip = self.plan.gateway(node)
            else:
                free = [a for a in self.plan.pod_addresses(node) if a not in self.used]
                if not free:
                    raise spec.error(
                        ("spec", "nodeName"),
                        f"{Names.node_name(node)} has no pod address left for {spec.key}",
                    )
                ip = free[0]
        self._take(ip, spec.key, node, spec.host_network)
        index = self.next_index
        self.next_index += 1
        uid = spec.uid or str(uuid.uuid4())
        container_id = secrets.token_hex(32)
        netns = (
            self.names.node_netns(node)
            if spec.host_network
            else self.names.pod_netns(spec.namespace, spec.name, index)
        )
        return PodRecord(
            namespace=spec.namespace,
            name=spec.name,
            uid=uid,
            node=node,
            ip=ip,
            index=index,
            container_id=container_id,
            netns=netns,
            veth="" if spec.host_network else self.names.pod_veth(index),
            cgroup=self.names.pod_cgroup(self.settings.cgroup_driver, uid, container_id),
            labels=dict(spec.labels),
            ports=[(p.port, p.protocol, p.name) for p in spec.ports],
            workload=spec.workload,
            host_network=spec.host_network,
            managed=spec.managed,
        )


def needs_new_pod(record: PodRecord, spec: PodSpec) -> bool:
    """Does changing `record` into `spec` need a new pod (address, node, network or uid changes)?"""
    if record.host_network != spec.host_network:
        return True
    if spec.ip is not None and spec.ip != record.ip:
        return True
    if spec.uid is not None and spec.uid != record.uid:  # deleted and made again under its name
        return True
    return spec.node is not None and spec.node != record.node


# --- DNS -----------------------------------------------------------------------------------------


def dns_records(pods: Sequence[PodRecord], settings: LabSettings) -> dict[str, list[str]]:
    """The cluster DNS zone: `A` records by lower-case name (no trailing dot).

    `<ip-dashed>.<ns>.pod.<domain>` for every pod; `<name>.<ns>.svc.<domain>` for every workload
    (its pods' addresses, like a Service) and every pod; `<pod>.<sts>.<ns>.svc.<domain>` for
    StatefulSet pods; `kube-dns.kube-system.svc.<domain>`; `outside.example` and
    `outside-<i>.example` for the outside addresses.
    """
    domain = settings.cluster_domain
    records: dict[str, list[str]] = {}

    def add(name: str, ip: str) -> None:
        ips = records.setdefault(name.lower(), [])
        if ip not in ips:
            ips.append(ip)

    for pod in sorted(pods, key=lambda p: (p.namespace, p.name)):
        if not pod.host_network:
            add(f"{pod.ip.replace('.', '-')}.{pod.namespace}.pod.{domain}", pod.ip)
        add(f"{pod.name}.{pod.namespace}.svc.{domain}", pod.ip)
        if pod.workload is not None:
            service = workload_name(pod.workload)
            add(f"{service}.{pod.namespace}.svc.{domain}", pod.ip)
            if pod.workload.startswith("StatefulSet/"):
                add(f"{pod.name}.{service}.{pod.namespace}.svc.{domain}", pod.ip)
    add(f"kube-dns.{DNS_NAMESPACE}.svc.{domain}", settings.dns_service_ip)
    # The API server's service, which DNS probes commonly ask for (10.96.0.1 in the default plan).
    service_network = ipaddress.ip_network(settings.service_cidr)
    add(f"kubernetes.default.svc.{domain}", str(service_network.network_address + 1))
    for i, ip in enumerate(settings.outside_ips):
        if i == 0:
            add("outside.example", ip)
        add(f"outside-{i}.example", ip)
    return records


# --- manifests the collector reads ---------------------------------------------------------------


def namespace_manifest(name: str, labels: Mapping[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": dict(sorted(labels.items()))},
    }


def pod_manifest(pod: PodRecord, host_ip: str) -> dict[str, Any]:
    """A v1 Pod as the API server would report it once running (`host_ip`: its node's)."""
    metadata: dict[str, Any] = {
        "name": pod.name,
        "namespace": pod.namespace,
        "uid": pod.uid,
        "labels": dict(sorted(pod.labels.items())),
    }
    if pod.workload is not None:
        metadata["annotations"] = {"flowproof.dev/workload": pod.workload}
    ports = []
    for number, protocol, name in pod.ports:
        port: dict[str, Any] = {"containerPort": number, "protocol": protocol}
        if name:
            port["name"] = name
        ports.append(port)
    container: dict[str, Any] = {"name": "app", "image": "flowproof/podserver"}
    if ports:
        container["ports"] = ports
    spec: dict[str, Any] = {"nodeName": Names.node_name(pod.node), "containers": [container]}
    if pod.host_network:
        spec["hostNetwork"] = True
    # A probe pod (flowproof.dev/probe-pod) is never Ready, so no Service would send it traffic.
    ready = pod.labels.get(PROBE_POD_LABEL) != "true"
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": spec,
        "status": {
            "phase": "Running",
            "hostIP": host_ip,
            "podIP": pod.ip,
            "podIPs": [{"ip": pod.ip}],
            "conditions": conditions,
            "containerStatuses": [
                {"name": "app", "containerID": f"containerd://{pod.container_id}", "ready": ready}
            ],
        },
    }


def selector_manifest(selector: LabelSelector) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if selector.match_labels:
        data["matchLabels"] = dict(selector.match_labels)
    if selector.match_expressions:
        expressions = []
        for req in selector.match_expressions:
            item: dict[str, Any] = {"key": req.key, "operator": req.operator}
            if req.operator in ("In", "NotIn"):
                item["values"] = list(req.values)
            expressions.append(item)
        data["matchExpressions"] = expressions
    return data


def _peer_manifest(peer: Peer) -> dict[str, Any]:
    if peer.ip_block is not None:
        block: dict[str, Any] = {"cidr": str(peer.ip_block.cidr)}
        if peer.ip_block.excepts:
            block["except"] = [str(e) for e in peer.ip_block.excepts]
        return {"ipBlock": block}
    data: dict[str, Any] = {}
    if peer.pod_selector is not None:
        data["podSelector"] = selector_manifest(peer.pod_selector)
    if peer.namespace_selector is not None:
        data["namespaceSelector"] = selector_manifest(peer.namespace_selector)
    return data


def _port_manifest(port: PolicyPort) -> dict[str, Any]:
    data: dict[str, Any] = {"protocol": port.protocol}
    if port.port is not None:
        data["port"] = port.port
    if port.end_port is not None:
        data["endPort"] = port.end_port
    return data


def _rule_manifest(rule: Rule, peers_key: str) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if rule.peers:
        data[peers_key] = [_peer_manifest(p) for p in rule.peers]
    if rule.ports:
        data["ports"] = [_port_manifest(p) for p in rule.ports]
    return data


def policy_manifest(policy: NetworkPolicy) -> dict[str, Any]:
    """The networking.k8s.io/v1 manifest of a model policy (policyTypes always explicit)."""
    spec: dict[str, Any] = {
        "podSelector": selector_manifest(policy.pod_selector),
        "policyTypes": [d.capitalize() for d in policy.policy_types],
    }
    if policy.ingress:
        spec["ingress"] = [_rule_manifest(r, "from") for r in policy.ingress]
    if policy.egress:
        spec["egress"] = [_rule_manifest(r, "to") for r in policy.egress]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": policy.name, "namespace": policy.namespace},
        "spec": spec,
    }


def _cluster_peer_manifest(peer: ClusterPeer) -> dict[str, Any]:
    form = peer.form
    if form == "pods":
        assert peer.namespace_selector is not None
        assert peer.pod_selector is not None
        return {
            "pods": {
                "namespaceSelector": selector_manifest(peer.namespace_selector),
                "podSelector": selector_manifest(peer.pod_selector),
            }
        }
    if form == "namespaces":
        assert peer.namespace_selector is not None
        return {"namespaces": selector_manifest(peer.namespace_selector)}
    if form == "networks":
        return {"networks": [str(n) for n in peer.networks]}
    if form == "nodes":
        assert peer.nodes is not None
        return {"nodes": selector_manifest(peer.nodes)}
    return {"domainNames": list(peer.domain_names)}


def _cluster_port_manifest(port: ClusterPort, v1alpha1: bool) -> dict[str, Any]:
    if port.name is not None:
        return {"namedPort": port.name} if v1alpha1 else {"destinationNamedPort": port.name}
    if v1alpha1:
        if port.end_port is not None:
            return {
                "portRange": {"protocol": port.protocol, "start": port.port, "end": port.end_port}
            }
        return {"portNumber": {"protocol": port.protocol, "port": port.port}}
    number: dict[str, Any] = (
        {"range": {"start": port.port, "end": port.end_port}}
        if port.end_port is not None
        else {"number": port.port}
    )
    return {str(port.protocol).lower(): {"destinationPort": number}}


def _cluster_rule_manifest(
    policy: ClusterNetworkPolicy, rule: ClusterRule, peers_key: str
) -> dict[str, Any]:
    v1alpha1 = policy.kind != CLUSTER_NETWORK_POLICY
    data: dict[str, Any] = {"action": policy.action_word(rule.action)}
    if rule.name:
        data["name"] = rule.name
    data[peers_key] = [_cluster_peer_manifest(p) for p in rule.peers]
    if rule.ports:
        data["ports" if v1alpha1 else "protocols"] = [
            _cluster_port_manifest(p, v1alpha1) for p in rule.ports
        ]
    return data


def cluster_policy_manifest(policy: ClusterNetworkPolicy) -> dict[str, Any]:
    """The manifest of a model cluster policy, in its kind's version (v1beta1, v1alpha1)."""
    subject: dict[str, Any]
    if policy.subject_pods is None:
        subject = {"namespaces": selector_manifest(policy.subject_namespaces)}
    else:
        subject = {
            "pods": {
                "namespaceSelector": selector_manifest(policy.subject_namespaces),
                "podSelector": selector_manifest(policy.subject_pods),
            }
        }
    spec: dict[str, Any] = {}
    if policy.kind == CLUSTER_NETWORK_POLICY:
        spec["tier"] = policy.tier
    if policy.kind != "BaselineAdminNetworkPolicy":
        spec["priority"] = policy.priority
    spec["subject"] = subject
    if policy.ingress:
        spec["ingress"] = [_cluster_rule_manifest(policy, r, "from") for r in policy.ingress]
    if policy.egress:
        spec["egress"] = [_cluster_rule_manifest(policy, r, "to") for r in policy.egress]
    version = "v1beta1" if policy.kind == CLUSTER_NETWORK_POLICY else "v1alpha1"
    return {
        "apiVersion": f"policy.networking.k8s.io/{version}",
        "kind": policy.kind,
        "metadata": {"name": policy.name},
        "spec": spec,
    }


def json_ready(doc: Mapping[str, Any], what: str) -> dict[str, Any]:
    """`doc` as the API server would store it (JSON): a YAML date or timestamp becomes its text,
    as kubectl sends it; any other value JSON cannot hold is an InputError naming the field.

    The lab stores documents in state.json and the cluster file: one that cannot be written
    there must be refused before anything changes, never found out half way through a change.
    """

    def convert(value: Any, path: str) -> Any:
        if value is None or isinstance(value, str | bool | int):
            return value
        if isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                raise InputError(f"{value} is not a number JSON can hold", file=what, field=path)
            return value
        if isinstance(value, datetime.datetime | datetime.date):
            return value.isoformat()
        if isinstance(value, Mapping):
            out: dict[str, Any] = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    raise InputError(
                        f"keys must be strings, not {type(key).__name__}", file=what, field=path
                    )
                out[key] = convert(item, f"{path}.{key}" if path else key)
            return out
        if isinstance(value, list | tuple):
            return [convert(item, f"{path}[{i}]") for i, item in enumerate(value)]
        raise InputError(
            f"a {type(value).__name__} cannot be stored (only what JSON holds)",
            file=what,
            field=path or None,
        )

    converted: dict[str, Any] = convert(doc, "")
    return converted


def expectations_key(doc: Mapping[str, Any]) -> str:
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name') or ''}"


def namespace_labels(name: str, labels: Mapping[str, str] | None = None) -> dict[str, str]:
    """A namespace's labels with the API server's automatic `kubernetes.io/metadata.name`."""
    result = dict(labels or {})
    result[NAMESPACE_NAME_LABEL] = name
    return result
