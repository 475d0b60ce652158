"""The snapshot: small immutable domain types for pods, namespaces, policies and expectations.

Owns the shapes every other part agrees on (DESIGN.md's words): NetworkPolicies, the tiered
ClusterNetworkPolicies of the Network Policy API (with the older AdminNetworkPolicy and
BaselineAdminNetworkPolicy mapped onto the same tiers), the presence of other plugins' policy
objects the model does not know, and label-selector matching. It must never do I/O or import
`kubernetes`, `grpc`, `aiohttp` or protobuf: sources convert into these types at the border, once.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from operator import attrgetter
from typing import Literal

Protocol = Literal["TCP", "UDP", "SCTP"]
PROTOCOLS: tuple[Protocol, ...] = ("TCP", "UDP", "SCTP")
Operator = Literal["In", "NotIn", "Exists", "DoesNotExist"]
Direction = Literal["ingress", "egress"]
Tier = Literal["Admin", "Baseline"]
RuleAction = Literal["Accept", "Deny", "Pass"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


@dataclass(frozen=True)
class Requirement:
    """One matchExpressions entry."""

    key: str
    operator: Operator
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "In":
            return present and labels[self.key] in self.values
        if self.operator == "NotIn":
            # "NotIn" matches when the key is absent too (apimachinery labels.Requirement).
            return not present or labels[self.key] not in self.values
        if self.operator == "Exists":
            return present
        return not present


@dataclass(frozen=True)
class LabelSelector:
    """A metav1.LabelSelector: the AND of matchLabels and matchExpressions; empty selects everything."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, value in self.match_labels:
            if labels.get(key) != value:
                return False
        return all(req.matches(labels) for req in self.match_expressions)

    def describe(self) -> str:
        """The selector in kubectl's string form (`app=api,tier in (a,b)`); `{}` selects all."""
        parts = [f"{k}={v}" for k, v in self.match_labels]
        for req in self.match_expressions:
            if req.operator == "Exists":
                parts.append(req.key)
            elif req.operator == "DoesNotExist":
                parts.append(f"!{req.key}")
            else:
                op = "in" if req.operator == "In" else "notin"
                parts.append(f"{req.key} {op} ({','.join(req.values)})")
        return ",".join(parts) if parts else "{}"


@dataclass(frozen=True)
class ContainerPort:
    port: int
    protocol: Protocol = "TCP"
    name: str | None = None


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Pod:
    """A pod, or a workload's pod template standing for its pods (then `workload` is set)."""

    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[ContainerPort, ...] = ()
    ips: tuple[str, ...] = ()
    uid: str = ""
    node: str = ""
    host_network: bool = False
    workload: str | None = None  # "Deployment/api" when the pod comes from a workload template
    replicas: int = 1  # how many pods a workload template stands for (the lab starts that many)
    phase: str = "Running"

    @cached_property
    def key(self) -> str:
        """`namespace/name`, made once per pod object (planning reads it for every pod)."""
        return f"{self.namespace}/{self.name}"

    def named_port(self, name: str, protocol: Protocol) -> int | None:
        """The container port number behind `name` for `protocol`, or None."""
        for cp in self.ports:
            if cp.name == name and cp.protocol == protocol:
                return cp.port
        return None


@dataclass(frozen=True)
class IPBlock:
    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()

    def contains(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        if ip.version != self.cidr.version or ip not in self.cidr:
            return False
        return not any(ip in ex for ex in self.excepts)

    def describe(self) -> str:
        text = str(self.cidr)
        if self.excepts:
            text += " except " + ", ".join(str(e) for e in self.excepts)
        return text


@dataclass(frozen=True)
class Peer:
    """One entry of a rule's `from` or `to`.

    Exactly one of the forms is set: a pod and/or namespace selector, or an ipBlock. A peer with only
    `pod_selector` selects pods in the policy's own namespace; with only `namespace_selector`, every
    pod in the selected namespaces; with both, the selected pods in the selected namespaces.
    """

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None

    def describe(self) -> str:
        if self.ip_block is not None:
            return f"ipBlock {self.ip_block.describe()}"
        parts = []
        if self.namespace_selector is not None:
            parts.append(f"namespaceSelector {self.namespace_selector.describe()}")
        if self.pod_selector is not None:
            parts.append(f"podSelector {self.pod_selector.describe()}")
        return " and ".join(parts)


@dataclass(frozen=True)
class PolicyPort:
    """One entry of a rule's `ports`. `port` None means every port of the protocol."""

    protocol: Protocol = "TCP"
    port: int | str | None = None
    end_port: int | None = None

    def describe(self) -> str:
        if self.port is None:
            return f"all/{self.protocol}"
        if self.end_port is not None:
            return f"{self.port}-{self.end_port}/{self.protocol}"
        return f"{self.port}/{self.protocol}"


@dataclass(frozen=True)
class Rule:
    """One ingress or egress rule.

    `peers` is the `from`/`to` list; an empty tuple means the list was absent or empty, which matches
    every source or destination. `ports` empty likewise matches every port.
    """

    peers: tuple[Peer, ...] = ()
    ports: tuple[PolicyPort, ...] = ()


@dataclass(frozen=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: LabelSelector = LabelSelector()
    policy_types: tuple[Direction, ...] = ("ingress",)
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    source: str = ""  # "file.yaml:12" where it was read, for messages

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# --- the Network Policy API's tiers (policy.networking.k8s.io) -----------------------------------

CLUSTER_NETWORK_POLICY = "ClusterNetworkPolicy"
ADMIN_NETWORK_POLICY = "AdminNetworkPolicy"
BASELINE_ADMIN_NETWORK_POLICY = "BaselineAdminNetworkPolicy"


@dataclass(frozen=True)
class ClusterPeer:
    """One entry of a cluster policy rule's `from`/`to`; exactly one form is set.

    `namespaces` sets only `namespace_selector` (every pod of the selected namespaces); `pods`
    sets both selectors (the selected pods in the selected namespaces); `networks` (egress) holds
    CIDRs; `nodes` and `domain_names` (egress, experimental) are read but not modelled: a flow
    they could decide has an unknown model.
    """

    namespace_selector: LabelSelector | None = None
    pod_selector: LabelSelector | None = None
    networks: tuple[IPNetwork, ...] = ()
    nodes: LabelSelector | None = None
    domain_names: tuple[str, ...] = ()

    @property
    def form(self) -> str:
        if self.pod_selector is not None:
            return "pods"
        if self.namespace_selector is not None:
            return "namespaces"
        if self.networks:
            return "networks"
        if self.nodes is not None:
            return "nodes"
        return "domainNames"

    @property
    def modelled(self) -> bool:
        """False for the peers whose match the model cannot tell (nodes, domain names)."""
        return self.form in ("pods", "namespaces", "networks")

    def describe(self) -> str:
        form = self.form
        if form == "pods":
            assert self.pod_selector is not None
            assert self.namespace_selector is not None
            return (
                f"pods {self.pod_selector.describe()} in namespaces "
                f"{self.namespace_selector.describe()}"
            )
        if form == "namespaces":
            assert self.namespace_selector is not None
            return f"namespaces {self.namespace_selector.describe()}"
        if form == "networks":
            return "networks " + ", ".join(str(n) for n in self.networks)
        if form == "nodes":
            assert self.nodes is not None
            return f"nodes {self.nodes.describe()}"
        return "domainNames " + ", ".join(self.domain_names)


@dataclass(frozen=True)
class ClusterPort:
    """One entry of a cluster policy rule's `protocols` (or v1alpha1 `ports`).

    A protocol with a port (`end_port` for an inclusive range), or a named container port of the
    destination pod (`name`, `protocol` None: the named port's own protocol).
    """

    protocol: Protocol | None = "TCP"
    port: int | None = None
    end_port: int | None = None
    name: str | None = None

    def describe(self) -> str:
        if self.name is not None:
            return f"named port {self.name}"
        if self.end_port is not None:
            return f"{self.port}-{self.end_port}/{self.protocol}"
        return f"{self.port}/{self.protocol}"


@dataclass(frozen=True)
class ClusterRule:
    """One ingress or egress rule: its action applies to traffic from/to any of `peers` on any of
    `ports` (empty: all traffic). `name` is the rule's optional name."""

    action: RuleAction
    peers: tuple[ClusterPeer, ...]
    ports: tuple[ClusterPort, ...] = ()
    name: str = ""


@dataclass(frozen=True)
class ClusterNetworkPolicy:
    """A cluster-scoped policy of the Admin or Baseline tier.

    A `ClusterNetworkPolicy` (v1alpha2, v1beta1) as written, or an `AdminNetworkPolicy` (Admin
    tier; `Allow` read as `Accept`) or `BaselineAdminNetworkPolicy` (Baseline tier, no priority:
    evaluated after every Baseline ClusterNetworkPolicy) of v1alpha1, named by `kind`. The subject
    is the pods of the namespaces `subject_namespaces` selects that `subject_pods` selects (None:
    all of them); host-network pods are never a subject.
    """

    name: str
    tier: Tier
    priority: int
    subject_namespaces: LabelSelector = LabelSelector()
    subject_pods: LabelSelector | None = None
    ingress: tuple[ClusterRule, ...] = ()
    egress: tuple[ClusterRule, ...] = ()
    kind: str = CLUSTER_NETWORK_POLICY
    source: str = ""

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.name}"

    @property
    def order(self) -> tuple[int, int]:
        """Precedence within the tier: lower first (a BaselineAdminNetworkPolicy comes last)."""
        if self.kind == BASELINE_ADMIN_NETWORK_POLICY:
            return (1, 0)
        return (0, self.priority)

    def action_word(self, action: RuleAction) -> str:
        """The action as this kind writes it (v1alpha1 says `Allow` for `Accept`)."""
        if action == "Accept" and self.kind != CLUSTER_NETWORK_POLICY:
            return "Allow"
        return action

    def describe(self) -> str:
        if self.kind == BASELINE_ADMIN_NETWORK_POLICY:
            return self.key
        return f"{self.key} (priority {self.priority})"


# --- other plugins' policies: presence only -----------------------------------------------------


@dataclass(frozen=True)
class UnmodelledPolicy:
    """An object of a policy kind the model does not know (Cilium, Calico, Antrea, ...).

    Only its presence is known. A namespaced object may select any pod of its namespace, a
    cluster-scoped one any pod: flows of those pods have an unknown model. An empty `name` stands
    for the objects of a kind that could not be listed (their presence itself is unknown).
    """

    group: str
    version: str
    kind: str
    namespace: str = ""
    name: str = ""
    source: str = ""

    @property
    def key(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind}.{self.group} {where or '*'}"

    def covers(self, namespace: str) -> bool:
        """Whether it may select pods of `namespace`."""
        return not self.namespace or self.namespace == namespace

    def describe(self) -> str:
        if not self.name:
            return f"{self.kind} ({self.group}), which could not be listed"
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind} {where} ({self.group}/{self.version})"


# --- expectations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodTarget:
    """`from`/`to` that selects pods: namespace by name or by selector, pods by selector."""

    namespace: str | None = None
    namespace_selector: LabelSelector | None = None
    pod_selector: LabelSelector = LabelSelector()

    def describe(self) -> str:
        ns = self.namespace or (
            f"namespaces {self.namespace_selector.describe()}" if self.namespace_selector else "*"
        )
        return f"{ns} pods {self.pod_selector.describe()}"


@dataclass(frozen=True)
class ExternalTarget:
    """`to` beyond the pods: a CIDR, a host name, or the cluster DNS (`dns: cluster`)."""

    cidr: IPNetwork | None = None
    host: str | None = None
    dns: str | None = None

    def describe(self) -> str:
        if self.cidr is not None:
            return f"cidr {self.cidr}"
        if self.host is not None:
            return f"host {self.host}"
        return f"dns {self.dns}"


@dataclass(frozen=True)
class PortSpec:
    """A declared port: a number, a range `8000-8080`, or a name resolved on the destination pod."""

    protocol: Protocol = "TCP"
    port: int | None = None
    end_port: int | None = None
    name: str | None = None

    def describe(self) -> str:
        if self.name is not None:
            return f"{self.name}/{self.protocol}"
        if self.end_port is not None:
            return f"{self.port}-{self.end_port}/{self.protocol}"
        return f"{self.port}/{self.protocol}"


@dataclass(frozen=True)
class HttpCheck:
    path: str = "/"
    expect_status: tuple[int, ...] = ()


@dataclass(frozen=True)
class FlowExpectation:
    """One declared flow of a FlowExpectations document."""

    name: str
    source: PodTarget
    destination: PodTarget | ExternalTarget
    ports: tuple[PortSpec, ...]
    expect: Literal["allow", "deny"]
    http: HttpCheck | None = None
    allow_empty: bool = False  # an expectation that matches no pods is an error unless set


@dataclass(frozen=True)
class Expectations:
    """A FlowExpectations document (file or custom resource)."""

    namespace: str
    name: str
    flows: tuple[FlowExpectation, ...]
    source: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Snapshot:
    """Everything the engine and planner know about the cluster at one moment."""

    namespaces: Mapping[str, Namespace] = field(default_factory=dict)
    pods: tuple[Pod, ...] = ()
    policies: tuple[NetworkPolicy, ...] = ()
    expectations: tuple[Expectations, ...] = ()
    cluster_policies: tuple[ClusterNetworkPolicy, ...] = ()
    unmodelled: tuple[UnmodelledPolicy, ...] = ()
    warnings: tuple[str, ...] = ()  # what reading accepted but a user should know, file:line first

    def namespace_labels(self, name: str) -> Mapping[str, str]:
        ns = self.namespaces.get(name)
        if ns is None:
            return {NAMESPACE_NAME_LABEL: name}
        return ns.labels

    def pod(self, key: str) -> Pod | None:
        return self.pods_by_key.get(key)

    @cached_property
    def pods_by_key(self) -> Mapping[str, Pod]:
        """Every pod by `namespace/name` (built once per snapshot, on first use)."""
        return {pod.key: pod for pod in self.pods}

    def index_after(self, earlier: Snapshot, changed: Iterable[str]) -> None:
        """Make `pods_by_key` from `earlier`'s when only the `changed` pods differ (added,
        removed or altered): a copy and a binary search per changed key in pods sorted by key,
        as the Kubernetes source publishes them; `pods_by_namespace` too, cutting the changed
        namespaces' runs again. When the pods are not in that order, or a count does not add up,
        nothing more is made here: the rest is built whole on first use."""
        if "pods_by_key" in self.__dict__:
            return
        known = earlier.pods_by_key
        pods = self.pods
        found = dict(known)
        for key in changed:
            i = bisect.bisect_left(pods, key, key=attrgetter("key"))
            if i < len(pods) and pods[i].key == key:
                found[key] = pods[i]
            else:
                found.pop(key, None)
        if len(found) != len(pods):
            return
        self.__dict__["pods_by_key"] = found
        grouped = earlier.__dict__.get("pods_by_namespace")
        if grouped is None:
            return
        # In key order a namespace's pods are one run: only the changed namespaces are cut again.
        by_namespace = dict(grouped)
        counts: dict[str, int] = {}
        for key in changed:
            namespace = key.partition("/")[0]
            counts.setdefault(namespace, len(grouped.get(namespace, ())))
            counts[namespace] += (key in found) - (key in known)
        for namespace, count in counts.items():
            first = bisect.bisect_left(pods, namespace + "/", key=attrgetter("key"))
            last = bisect.bisect_left(
                pods, namespace + "0", key=attrgetter("key")
            )  # "0" follows "/"
            run = pods[first:last]
            if len(run) != count or any(pod.namespace != namespace for pod in run):
                return  # not one run in key order: built whole on first use
            if run:
                by_namespace[namespace] = run
            else:
                by_namespace.pop(namespace, None)
        self.__dict__["pods_by_namespace"] = by_namespace

    @cached_property
    def pods_by_namespace(self) -> Mapping[str, tuple[Pod, ...]]:
        """The pods of each namespace, in snapshot order (built once per snapshot)."""
        found: dict[str, list[Pod]] = {}
        for pod in self.pods:
            found.setdefault(pod.namespace, []).append(pod)
        return {name: tuple(pods) for name, pods in found.items()}
