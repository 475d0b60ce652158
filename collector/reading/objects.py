"""Kubernetes objects as API-shaped dicts -> the model: Namespaces, Pods, workloads, policies.

Owns the converters (also used by the Kubernetes source), the kinds the snapshot reads (KINDS),
the other network plugins' policy kinds it detects but does not model (PLUGIN_DOMAINS), and the
snapshot of a set of Documents, each problem named by file, line, field and reason; a bad input is
rejected as a whole, so nothing downstream ever sees a half-read input. What is accepted but should
be known (a kind that is ignored, a CIDR with host bits) becomes a warning with file and line.
Never reads files.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from collector.core.model import (
    NAMESPACE_NAME_LABEL,
    ClusterNetworkPolicy,
    ContainerPort,
    Direction,
    Expectations,
    IPBlock,
    IPNetwork,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Peer,
    Pod,
    PodTarget,
    PolicyPort,
    Rule,
    Snapshot,
    UnmodelledPolicy,
)
from collector.reading import expectations as expectations_format
from collector.reading.clusterpolicies import (
    CLUSTER_POLICY_GROUP,
    CLUSTER_POLICY_KINDS,
    read_cluster_policy,
)
from collector.reading.documents import Document
from collector.reading.fields import (
    FieldPath,
    Reader,
    Where,
    _unsupported,
    close_spelling,
    describe_type,
    dns_label_problem,
    dns_subdomain_problem,
    parse_cidr,
    port_name_problem,
    port_number_problem,
    raise_problems,
    read_labels,
    read_protocol,
    read_selector,
    render_field,
)
from flowproof.errors import InputError

# kind -> (API group, served versions) for the kinds the snapshot reads. A kind of the same name in
# another group (Calico's crd.projectcalico.org NetworkPolicy) is a different object: a plugin's
# policy kind (PLUGIN_DOMAINS) is detected, anything else is ignored with a warning.
KINDS: Final[Mapping[str, tuple[str, tuple[str, ...]]]] = {
    "Namespace": ("", ("v1",)),
    "Pod": ("", ("v1",)),
    "ReplicationController": ("", ("v1",)),
    "NetworkPolicy": ("networking.k8s.io", ("v1",)),
    "Deployment": ("apps", ("v1",)),
    "StatefulSet": ("apps", ("v1",)),
    "DaemonSet": ("apps", ("v1",)),
    "ReplicaSet": ("apps", ("v1",)),
    "Job": ("batch", ("v1",)),
    "CronJob": ("batch", ("v1",)),
    "FlowExpectations": ("flowproof.dev", ("v1alpha1",)),
    **{kind: (CLUSTER_POLICY_GROUP, versions) for kind, versions in CLUSTER_POLICY_KINDS.items()},
}


PLUGIN_DOMAINS: Final[Mapping[str, str]] = {
    "cilium.io": "Cilium",
    "projectcalico.org": "Calico",
    "antrea.io": "Antrea",
    "k8s.ovn.org": "OVN-Kubernetes",
    "kubeovn.io": "Kube-OVN",
    "network.openshift.io": "OpenShift SDN",
    "networking.gke.io": "GKE Dataplane V2",
    "nsx.vmware.com": "VMware NSX",
}
"""API group domains of network plugins with policy kinds of their own (a group is theirs when it
is the domain or ends in `.domain`: `crd.projectcalico.org`, `crd.antrea.io`)."""


WATCHED_POLICY_RESOURCES: Final[Mapping[str, tuple[str, ...]]] = {
    CLUSTER_POLICY_GROUP: (
        "clusternetworkpolicies",
        "adminnetworkpolicies",
        "baselineadminnetworkpolicies",
    ),
    "cilium.io": (
        "ciliumnetworkpolicies",
        "ciliumclusterwidenetworkpolicies",
        "ciliumegressgatewaypolicies",
        "ciliumlocalredirectpolicies",
    ),
    "crd.projectcalico.org": (
        "networkpolicies",
        "globalnetworkpolicies",
        "stagednetworkpolicies",
        "stagedglobalnetworkpolicies",
        "stagedkubernetesnetworkpolicies",
    ),
    "projectcalico.org": (
        "networkpolicies",
        "globalnetworkpolicies",
        "stagednetworkpolicies",
        "stagedglobalnetworkpolicies",
        "stagedkubernetesnetworkpolicies",
    ),
    "crd.antrea.io": ("networkpolicies", "clusternetworkpolicies"),
    "k8s.ovn.org": ("egressfirewalls", "adminpolicybasedexternalroutes"),
    "network.openshift.io": ("egressnetworkpolicies",),
    "networking.gke.io": ("fqdnnetworkpolicies",),
    "crd.nsx.vmware.com": ("securitypolicies",),
}
"""The policy resources the collector's read-only RBAC grants (deploy/base/collector.yaml): the
cluster policy kinds and the plugins' policy kinds known today. API discovery may find more in a
plugin's group; one that RBAC does not let the collector list makes the model unknown until it is
granted."""


_PLUGIN_POLICY_KINDS: Final = frozenset({"EgressFirewall"})
"""Plugin kinds that filter traffic without "Policy" in their name."""


def plugin_of(group: str) -> str | None:
    """The network plugin whose domain `group` ends in, if any."""
    for domain, plugin in PLUGIN_DOMAINS.items():
        if group == domain or group.endswith("." + domain):
            return plugin
    return None


def is_plugin_policy_kind(group: str, kind: str) -> bool:
    """Whether a kind is another plugin's policy: its group is a plugin's and it filters traffic
    (its name says Policy, as CiliumNetworkPolicy, GlobalNetworkPolicy, ClusterNetworkPolicy do)."""
    return plugin_of(group) is not None and ("Policy" in kind or kind in _PLUGIN_POLICY_KINDS)


def plugin_kind_is_cluster_scoped(kind: str) -> bool:
    """For manifests, which carry no scope: plugin policy kinds named Global*, *Cluster* are
    cluster-scoped (CiliumClusterwideNetworkPolicy, GlobalNetworkPolicy, ClusterNetworkPolicy).
    The Kubernetes source takes the scope from API discovery instead."""
    return kind.startswith("Global") or "Cluster" in kind


WORKLOAD_KINDS: Final = frozenset(
    {
        "Deployment",
        "StatefulSet",
        "DaemonSet",
        "ReplicaSet",
        "ReplicationController",
        "Job",
        "CronJob",
    }
)


_SELECTOR_REQUIRED: Final = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"})


# Groups that once served these kinds; reading such a manifest as "some other object" would silently
# drop a policy or workload, so it is an error instead.
_RETIRED_GROUPS: Final = frozenset({"extensions"})


_POLICY_FIELDS: Final = ("apiVersion", "kind", "metadata", "spec", "status")


_POLICY_SPEC_FIELDS: Final = ("podSelector", "policyTypes", "ingress", "egress")


_INGRESS_RULE_FIELDS: Final = ("from", "ports")


_EGRESS_RULE_FIELDS: Final = ("to", "ports")


_PEER_FIELDS: Final = ("podSelector", "namespaceSelector", "ipBlock")


_IPBLOCK_FIELDS: Final = ("cidr", "except")


_POLICY_PORT_FIELDS: Final = ("protocol", "port", "endPort")


_POLICY_TYPES: Final[Mapping[str, Direction]] = {"Ingress": "ingress", "Egress": "egress"}


_RULE_HINTS: Final[Mapping[str, Mapping[str, str]]] = {
    "ingress": {"to": "ingress rules name their sources in 'from'"},
    "egress": {"from": "egress rules name their destinations in 'to'"},
}


def _metadata(
    r: Reader, obj: Mapping[str, Any], *, namespaced: bool = True
) -> tuple[str, str, Mapping[str, Any]]:
    """(namespace, name, metadata); a missing namespace is `default`, as kubectl applies it."""
    meta = r.mapping(obj.get("metadata"), ("metadata",))
    name = r.required_string(meta.get("name"), ("metadata", "name")) or ""
    namespace = ""
    if namespaced:
        namespace = r.string(meta.get("namespace"), ("metadata", "namespace")) or "default"
        if (problem := dns_label_problem(namespace)) is not None:
            r.problem(("metadata", "namespace"), problem)
    return namespace, name, meta


def _check_name(r: Reader, name: str, *, label: bool = False) -> None:
    if name:
        problem = dns_label_problem(name) if label else dns_subdomain_problem(name)
        if problem is not None:
            r.problem(("metadata", "name"), problem)


def _read_policy(r: Reader, obj: Mapping[str, Any]) -> NetworkPolicy:
    r.mapping(obj, (), _POLICY_FIELDS)
    namespace, name, _ = _metadata(r, obj)
    _check_name(r, name)
    spec = r.mapping(obj.get("spec"), ("spec",), _POLICY_SPEC_FIELDS)
    pod_selector = read_selector(r, spec.get("podSelector"), ("spec", "podSelector"))

    ingress = _read_rules(r, spec.get("ingress"), "ingress")
    egress = _read_rules(r, spec.get("egress"), "egress")

    given: set[Direction] = set()
    types_path: FieldPath = ("spec", "policyTypes")
    raw_types = r.sequence(spec.get("policyTypes"), types_path)
    for i, raw in enumerate(raw_types):
        direction = _POLICY_TYPES.get(raw) if isinstance(raw, str) else None
        if direction is None:
            r.problem((*types_path, i), _unsupported(raw, _POLICY_TYPES))
        else:
            given.add(direction)
    if len(raw_types) > 2:
        r.problem(types_path, "may not specify more than two policyTypes")
    policy_types: tuple[Direction, ...]
    if raw_types:
        policy_types = tuple(d for d in ("ingress", "egress") if d in given)
    else:
        # The API server's default: Ingress always, Egress iff the egress list is non-empty
        # (an explicit `egress: []` does not make the policy an egress policy).
        has_egress = isinstance(spec.get("egress"), list) and len(spec["egress"]) != 0
        policy_types = ("ingress", "egress") if has_egress else ("ingress",)

    return NetworkPolicy(
        namespace=namespace,
        name=name,
        pod_selector=pod_selector,
        policy_types=policy_types,
        ingress=ingress,
        egress=egress,
        source=r.where.source,
    )


def _read_rules(r: Reader, value: object, direction: Direction) -> tuple[Rule, ...]:
    path: FieldPath = ("spec", direction)
    peers_key = "from" if direction == "ingress" else "to"
    fields = _INGRESS_RULE_FIELDS if direction == "ingress" else _EGRESS_RULE_FIELDS
    rules: list[Rule] = []
    for i, raw in enumerate(r.sequence(value, path)):
        here = (*path, i)
        rule = r.mapping(raw, here, fields, _RULE_HINTS[direction])
        peers = tuple(
            _read_peer(r, peer, (*here, peers_key, j))
            for j, peer in enumerate(r.sequence(rule.get(peers_key), (*here, peers_key)))
        )
        ports = tuple(
            _read_policy_port(r, port, (*here, "ports", j))
            for j, port in enumerate(r.sequence(rule.get("ports"), (*here, "ports")))
        )
        rules.append(Rule(peers=peers, ports=ports))
    return tuple(rules)


def _read_peer(r: Reader, value: object, path: FieldPath) -> Peer:
    obj = r.mapping(value, path, _PEER_FIELDS)
    pod_selector = namespace_selector = None
    ip_block = None
    if obj.get("podSelector") is not None:
        pod_selector = read_selector(r, obj["podSelector"], (*path, "podSelector"))
    if obj.get("namespaceSelector") is not None:
        namespace_selector = read_selector(
            r, obj["namespaceSelector"], (*path, "namespaceSelector")
        )
    if obj.get("ipBlock") is not None:
        ip_block = _read_ip_block(r, obj["ipBlock"], (*path, "ipBlock"))
        if pod_selector is not None or namespace_selector is not None:
            r.problem(
                path,
                "may not specify both ipBlock and another peer (podSelector or "
                "namespaceSelector); use two entries",
            )
    elif (
        pod_selector is None
        and namespace_selector is None
        and isinstance(value, Mapping)
        and all(key in _PEER_FIELDS for key in value)  # else the unknown field says it all
    ):
        r.problem(path, "must specify a peer: podSelector, namespaceSelector or ipBlock")
    return Peer(pod_selector=pod_selector, namespace_selector=namespace_selector, ip_block=ip_block)


def _read_cidr(r: Reader, value: object, path: FieldPath) -> IPNetwork | None:
    """A NetworkPolicy CIDR as the API server reads it (collector.reading.fields.parse_cidr)."""
    text = r.string(value, path)
    if text is None:
        return None
    parsed = parse_cidr(text, served=r.served)
    if parsed.problem is not None:
        r.problem(path, parsed.problem)
    elif parsed.warning is not None:
        r.warn(path, parsed.warning)
    return parsed.network


def _read_ip_block(r: Reader, value: object, path: FieldPath) -> IPBlock | None:
    obj = r.mapping(value, path, _IPBLOCK_FIELDS)
    cidr: IPNetwork | None = None
    # validation.go ValidateIPBlock: "cidr" is required, then IsValidCIDRForLegacyField.
    if r.required_string(obj.get("cidr"), (*path, "cidr")) is not None:
        cidr = _read_cidr(r, obj["cidr"], (*path, "cidr"))
    excepts: list[IPNetwork] = []
    for i, raw in enumerate(r.sequence(obj.get("except"), (*path, "except"))):
        here = (*path, "except", i)
        ex = _read_cidr(r, raw, here)
        if ex is None:
            continue
        if cidr is not None:
            # "if !cidrIPNet.Contains(exceptCIDR.IP) || cidrMaskLen >= exceptMaskLen": "must be a
            # strict subset of `cidr`" (of the masked networks, as ParseCIDRSloppy returns them).
            if ex.version != cidr.version:
                r.problem(
                    here, f"{raw!r} must be a strict subset of cidr {cidr} (another IP family)"
                )
                continue
            if not (ex.subnet_of(cidr) and ex.prefixlen > cidr.prefixlen):  # type: ignore[arg-type]
                r.problem(here, f"{raw!r} must be a strict subset of cidr {cidr}")
                continue
        excepts.append(ex)
    if cidr is None:
        return None
    return IPBlock(cidr=cidr, excepts=tuple(excepts))


def _read_policy_port(r: Reader, value: object, path: FieldPath) -> PolicyPort:
    """validation.go ValidateNetworkPolicyPort, on the port as it arrives (an IntOrString)."""
    obj = r.mapping(value, path, _POLICY_PORT_FIELDS)
    # "protocol ... If not specified, this field defaults to TCP" (defaults.go); TCP, UDP, SCTP.
    protocol = read_protocol(r, obj.get("protocol"), (*path, "protocol"))
    raw_port = obj.get("port")
    port: int | str | None = None
    if isinstance(raw_port, int) and not isinstance(raw_port, bool):
        # An int: IsValidPortNum (1-65535).
        port = raw_port
        if (problem := port_number_problem(raw_port)) is not None:
            r.problem((*path, "port"), problem)
    elif isinstance(raw_port, str):
        # A string is always a name, also "8080": IsValidPortName (an IANA_SVC_NAME).
        port = raw_port
        if (problem := port_name_problem(raw_port)) is not None:
            if raw_port.isdigit():
                problem += f" (a quoted number is a name; write the number unquoted: {raw_port})"
            r.problem((*path, "port"), problem)
    elif raw_port is not None:
        r.problem(
            (*path, "port"),
            f"must be a port number (an integer) or a port name, not {describe_type(raw_port)}"
            + (f" ({raw_port!r})" if isinstance(raw_port, float) else ""),
        )
    end_port = r.integer(obj.get("endPort"), (*path, "endPort"))
    if end_port is not None:
        here = (*path, "endPort")
        if raw_port is None:
            r.problem(here, "may not be specified when port is not specified")
        elif isinstance(port, str):
            r.problem(here, "may not be specified when port is non-numeric")
        elif (problem := port_number_problem(end_port)) is not None:
            r.problem(here, problem)
        elif isinstance(port, int) and end_port < port:
            r.problem(here, f"must be greater than or equal to port ({port})")
    return PolicyPort(protocol=protocol, port=port, end_port=end_port)


def policy_from_dict(
    obj: Mapping[str, Any],
    where: Where,
    *,
    served: bool = False,
    warnings: list[str] | None = None,
) -> NetworkPolicy:
    """A networking.k8s.io/v1 NetworkPolicy from its API dict; raises InputError (every problem).

    `served`: the object comes from the API server (legacy CIDR forms are read, with a warning);
    `warnings` receives what was accepted but should be changed.
    """
    r = Reader(where, warnings=warnings, served=served)
    policy = _read_policy(r, obj)
    raise_problems(r.problems)
    return policy


def selector_from_dict(obj: object, where: Where, field: FieldPath = ()) -> LabelSelector:
    """A LabelSelector read at `field` of the object `where` names; raises InputError."""
    r = Reader(where)
    selector = read_selector(r, obj, field)
    raise_problems(r.problems)
    return selector


_UID_NAMESPACE = uuid.UUID("6f0b3c1e-64d4-4d55-9f0c-9a6f4e1b2c7d")  # flowproof's uuid5 namespace


def synthetic_uid(namespace: str, name: str) -> str:
    """A deterministic uid for a pod that has none (manifests, workload templates)."""
    return str(uuid.uuid5(_UID_NAMESPACE, f"{namespace}/{name}"))


def _read_container_ports(
    r: Reader, spec: Mapping[str, Any], path: FieldPath
) -> tuple[ContainerPort, ...]:
    ports: list[ContainerPort] = []
    names: dict[str, FieldPath] = {}
    containers_path = (*path, "containers")
    for i, raw in enumerate(r.sequence(spec.get("containers"), containers_path)):
        container = r.mapping(raw, (*containers_path, i))
        ports_path = (*containers_path, i, "ports")
        for j, raw_port in enumerate(r.sequence(container.get("ports"), ports_path)):
            here = (*ports_path, j)
            item = r.mapping(raw_port, here)
            number = r.integer(item.get("containerPort"), (*here, "containerPort"))
            if number is None:
                if isinstance(raw_port, Mapping) and "containerPort" not in item:
                    r.problem((*here, "containerPort"), "required field is missing")
                continue
            if (problem := port_number_problem(number)) is not None:
                r.problem((*here, "containerPort"), problem)
                continue
            protocol = read_protocol(r, item.get("protocol"), (*here, "protocol"))
            name = r.string(item.get("name"), (*here, "name")) or None
            if name is not None:
                if (problem := port_name_problem(name)) is not None:
                    r.problem((*here, "name"), problem)
                    name = None
                elif name in names:
                    r.problem(
                        (*here, "name"),
                        f"duplicate port name {name!r} in the pod "
                        f"(also {render_field(r.where.prefix + names[name])})",
                    )
                    name = None
                else:
                    names[name] = (*here, "name")
            ports.append(ContainerPort(port=number, protocol=protocol, name=name))
    return tuple(ports)


def _read_pod(r: Reader, obj: Mapping[str, Any]) -> Pod:
    namespace, name, meta = _metadata(r, obj)
    _check_name(r, name)
    labels = read_labels(r, meta.get("labels"), ("metadata", "labels"))
    spec = r.mapping(obj.get("spec"), ("spec",))
    status = r.mapping(obj.get("status"), ("status",))
    ips: list[str] = []
    raw_ips: list[tuple[object, FieldPath]] = [(status.get("podIP"), ("status", "podIP"))]
    for i, item in enumerate(r.sequence(status.get("podIPs"), ("status", "podIPs"))):
        entry = r.mapping(item, ("status", "podIPs", i))
        raw_ips.append((entry.get("ip"), ("status", "podIPs", i, "ip")))
    for raw, path in raw_ips:
        text = r.string(raw, path)
        if not text:
            continue
        try:
            address = str(ipaddress.ip_address(text))
        except ValueError:
            r.problem(path, f"{text!r} is not a valid IP address")
            continue
        if address not in ips:
            ips.append(address)
    uid = r.string(meta.get("uid"), ("metadata", "uid")) or synthetic_uid(namespace, name)
    return Pod(
        namespace=namespace,
        name=name,
        labels=labels,
        ports=_read_container_ports(r, spec, ("spec",)),
        ips=tuple(ips),
        uid=uid,
        node=r.string(spec.get("nodeName"), ("spec", "nodeName")) or "",
        host_network=bool(r.boolean(spec.get("hostNetwork"), ("spec", "hostNetwork"))),
        phase=r.string(status.get("phase"), ("status", "phase")) or "Running",
    )


def pod_from_dict(obj: Mapping[str, Any], where: Where) -> Pod:
    """A v1 Pod from its API dict; raises InputError with every problem."""
    r = Reader(where)
    pod = _read_pod(r, obj)
    raise_problems(r.problems)
    return pod


@dataclass(frozen=True)
class _Workload:
    """What a workload says about its pods: its template pod and the selector of its real pods."""

    kind: str
    pod: Pod
    selector: LabelSelector | None  # None: cannot tell which pods are its own (never "given")
    owners: tuple[tuple[str, str], ...]  # (kind, name) of its controllers


def _template_path(kind: str) -> FieldPath:
    if kind == "CronJob":
        return ("spec", "jobTemplate", "spec", "template")
    return ("spec", "template")


def _peek(obj: Mapping[str, Any], path: FieldPath) -> Mapping[str, Any]:
    """The mapping at `path`, or empty (a reader reports a wrong type where it reads it)."""
    current: Mapping[str, Any] = obj
    for step in path:
        value = current.get(str(step))
        current = value if isinstance(value, Mapping) else {}
    return current


def _dig(r: Reader, obj: Mapping[str, Any], path: FieldPath) -> Mapping[str, Any]:
    current: Mapping[str, Any] = obj
    for i, step in enumerate(path):
        current = r.mapping(current.get(str(step)), path[: i + 1])
    return current


def _read_workload(r: Reader, obj: Mapping[str, Any], kind: str) -> _Workload:
    namespace, name, meta = _metadata(r, obj)
    _check_name(r, name)
    spec = _peek(obj, ("spec",))
    template_path = _template_path(kind)
    template = _dig(r, obj, template_path)
    has_template = _peek(obj, template_path[:-1]).get("template") is not None
    if not has_template:
        r.problem(template_path, "required field is missing")
    template_meta = r.mapping(template.get("metadata"), (*template_path, "metadata"))
    labels = read_labels(r, template_meta.get("labels"), (*template_path, "metadata", "labels"))
    pod_spec = r.mapping(template.get("spec"), (*template_path, "spec"))

    replicas = 1
    if kind in ("Deployment", "StatefulSet", "ReplicaSet", "ReplicationController", "Job"):
        key = "parallelism" if kind == "Job" else "replicas"
        value = r.integer(spec.get(key), ("spec", key))
        if value is not None and value < 0:
            r.problem(("spec", key), f"must be greater than or equal to 0, not {value}")
        elif value is not None:
            replicas = value

    selector: LabelSelector | None
    selector_path: FieldPath = (*template_path[:-1], "selector")
    raw_selector = _peek(obj, selector_path[:-1]).get("selector")
    if kind == "ReplicationController":
        # A plain label map, defaulting to the template's labels.
        given = read_labels(r, raw_selector, selector_path) or labels
        selector = LabelSelector(tuple(sorted(given.items()))) if given else None
    elif raw_selector is None and kind in _SELECTOR_REQUIRED:
        r.problem(selector_path, "required field is missing")
        selector = None
    elif raw_selector is not None:
        selector = read_selector(r, raw_selector, selector_path)
        if selector.is_empty and kind not in ("Job", "CronJob"):
            r.problem(selector_path, f"empty selector is invalid for a {kind}")
    else:
        # Jobs get a generated controller-uid selector; their template labels find their pods.
        selector = LabelSelector(tuple(sorted(labels.items()))) if labels else None
    if (
        has_template
        and selector is not None
        and not selector.is_empty
        and not selector.matches(labels)
    ):
        r.problem(
            (*template_path, "metadata", "labels"),
            f"selector {selector.describe()} does not match the template labels",
        )

    owners: list[tuple[str, str]] = []
    for i, raw in enumerate(
        r.sequence(meta.get("ownerReferences"), ("metadata", "ownerReferences"))
    ):
        ref = r.mapping(raw, ("metadata", "ownerReferences", i))
        if ref.get("controller") is True and isinstance(ref.get("kind"), str):
            owners.append((ref["kind"], str(ref.get("name", ""))))

    pod = Pod(
        namespace=namespace,
        name=name,
        labels=labels,
        ports=_read_container_ports(r, pod_spec, (*template_path, "spec")),
        uid=synthetic_uid(namespace, name),
        host_network=bool(
            r.boolean(pod_spec.get("hostNetwork"), (*template_path, "spec", "hostNetwork"))
        ),
        workload=f"{kind}/{name}",
        replicas=replicas,
    )
    return _Workload(kind=kind, pod=pod, selector=selector, owners=tuple(owners))


def pods_from_workload(obj: Mapping[str, Any], where: Where) -> tuple[Pod, ...]:
    """The pod a workload's template stands for (one Pod, `replicas` set); raises InputError.

    Deciding whether real Pods are given for the workload needs the other objects; that is
    `snapshot_from_documents`' job.
    """
    r = Reader(where)
    kind = obj.get("kind")
    if kind not in WORKLOAD_KINDS:
        r.problem(("kind",), _unsupported(kind, sorted(WORKLOAD_KINDS)))
        raise_problems(r.problems)
    workload = _read_workload(r, obj, str(kind))
    raise_problems(r.problems)
    return (workload.pod,)


def _read_namespace(r: Reader, obj: Mapping[str, Any]) -> Namespace:
    _, name, meta = _metadata(r, obj, namespaced=False)
    _check_name(r, name, label=True)
    labels = read_labels(r, meta.get("labels"), ("metadata", "labels"))
    labels[NAMESPACE_NAME_LABEL] = name  # set by the API server on every namespace, overriding
    return Namespace(name=name, labels=labels)


def namespace_from_dict(obj: Mapping[str, Any], where: Where) -> Namespace:
    """A v1 Namespace with the automatic `kubernetes.io/metadata.name` label; raises InputError."""
    r = Reader(where)
    namespace = _read_namespace(r, obj)
    raise_problems(r.problems)
    return namespace


def _split_api_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def _ignored_reason(kind: str, group: str) -> str:
    """Why a document is ignored, with the known kind it most likely means."""
    close = close_spelling(kind, KINDS)
    if kind in KINDS:
        want = KINDS[kind][0]
        return (
            f"{kind} of {group or 'the core group'!r} is not {want or 'the core group'}'s {kind}: "
            f"ignored (did you mean apiVersion {f'{want}/{KINDS[kind][1][0]}'.lstrip('/')}?)"
        )
    if close is not None:
        return f"{kind!r} is not a kind flowproof knows: ignored (did you mean {close!r}?)"
    return f"{kind!r} is ignored: flowproof does not read this kind"


def _unmodelled(r: Reader, doc: Document, kind: str, group: str, version: str) -> UnmodelledPolicy:
    meta = doc.obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    name = str(meta.get("name") or "")
    namespace = ""
    if not plugin_kind_is_cluster_scoped(kind):
        namespace = str(meta.get("namespace") or "default")
    found = UnmodelledPolicy(group, version, kind, namespace, name, r.where.source)
    scope = f"pods of namespace {namespace}" if namespace else "every pod"
    r.warn(
        ("kind",),
        f"{found.describe()} is a policy of {plugin_of(group)} that flowproof does not model: "
        f"flows of {scope} get an unknown model (MODEL_INCOMPLETE), never drift",
    )
    return found


@dataclass(frozen=True)
class _Ignored:
    """A document of a kind flowproof does not read: why, and the field the warning names."""

    reason: str
    field: str


_SHOWN_PER_KIND: Final = 3  # ignored objects of one kind warned about one by one; then counted


def _check_header(r: Reader, doc: Document) -> str | UnmodelledPolicy | _Ignored | None:
    """The kind to read the document as, a plugin's policy, what is ignored and why, or None
    (header problems recorded)."""
    obj = doc.obj
    kind = r.required_string(obj.get("kind"), ("kind",))
    api_version = r.required_string(obj.get("apiVersion"), ("apiVersion",))
    if kind is None or api_version is None:
        return None
    group, version = _split_api_version(api_version)
    if is_plugin_policy_kind(group, kind):
        return _unmodelled(r, doc, kind, group, version)
    known = KINDS.get(kind)
    if known is None:
        return _Ignored(_ignored_reason(kind, group), "kind")
    want_group, versions = known
    if group == want_group and version not in versions:
        served = ", ".join(f"{want_group}/{v}".lstrip("/") for v in versions)
        r.problem(("apiVersion",), f"{api_version!r} is not supported for {kind}: use {served}")
        return None
    if group in _RETIRED_GROUPS:
        r.problem(
            ("apiVersion",),
            f"{api_version!r} no longer serves {kind}: use {want_group}/{versions[0]}",
        )
        return None
    if group != want_group:
        return _Ignored(_ignored_reason(kind, group), "apiVersion")
    return kind


class _IgnoredKinds:
    """Warnings about ignored objects: one per object with file and line, and past a few of one
    kind, one more that counts the rest and names where they are."""

    def __init__(self, warnings: list[str]) -> None:
        self._warnings = warnings
        self._rest: dict[str, list[tuple[_Ignored, Document]]] = {}
        self._seen: dict[str, int] = {}

    def add(self, what: _Ignored, doc: Document) -> None:
        count = self._seen[what.reason] = self._seen.get(what.reason, 0) + 1
        if count <= _SHOWN_PER_KIND:
            self._warnings.append(doc.where.warning((what.field,), what.reason))
        else:
            self._rest.setdefault(what.reason, []).append((what, doc))

    def finish(self) -> None:
        for reason, rest in self._rest.items():
            places = ", ".join(doc.where.source for _, doc in rest[:_SHOWN_PER_KIND])
            more = f" and {len(rest) - _SHOWN_PER_KIND} more" if len(rest) > _SHOWN_PER_KIND else ""
            first, doc = rest[0]
            self._warnings.append(
                doc.where.warning(
                    (first.field,), f"{reason}: {len(rest)} more such objects ({places}{more})"
                )
            )


def _index_pods(pods: Iterable[Pod]) -> dict[str, list[Mapping[str, str]]]:
    """Per namespace, each distinct label set once (pods of one workload share their labels)."""
    seen: dict[str, dict[frozenset[tuple[str, str]], Mapping[str, str]]] = {}
    for pod in pods:
        seen.setdefault(pod.namespace, {}).setdefault(frozenset(pod.labels.items()), pod.labels)
    return {ns: list(sets.values()) for ns, sets in seen.items()}


_Converted = (
    Namespace | Pod | NetworkPolicy | ClusterNetworkPolicy | Expectations | _Workload | None
)


def _convert(r: Reader, kind: str, doc: Document) -> tuple[_Converted, tuple[str, str, str]]:
    """The object a document holds, and its identity (kind, namespace, name) for duplicates."""

    if kind == "Namespace":
        namespace = _read_namespace(r, doc.obj)
        return namespace, ("Namespace", "", namespace.name)
    if kind == "Pod":
        pod = _read_pod(r, doc.obj)
        return pod, ("Pod", pod.namespace, pod.name)
    if kind == "NetworkPolicy":
        policy = _read_policy(r, doc.obj)
        return policy, ("NetworkPolicy", policy.namespace, policy.name)
    if kind == "FlowExpectations":
        return expectations_format.read_expectations(r, doc.obj), doc.key
    if kind in CLUSTER_POLICY_KINDS:
        cluster_policy = read_cluster_policy(r, doc.obj, kind)
        return cluster_policy, (kind, "", cluster_policy.name)
    workload = _read_workload(r, doc.obj, kind)
    return workload, (kind, workload.pod.namespace, workload.pod.name)


def build_snapshot(
    docs: Sequence[Document], problems: list[InputError], warnings: list[str] | None = None
) -> Snapshot:
    """The snapshot of `docs`; problems go to `problems`, warnings to `warnings` and the
    snapshot's own `warnings`."""
    declared: dict[str, Namespace] = {}
    pods: list[Pod] = []
    workloads: list[tuple[_Workload, Document]] = []
    policies: list[NetworkPolicy] = []
    cluster_policies: list[ClusterNetworkPolicy] = []
    unmodelled: list[UnmodelledPolicy] = []
    expectation_sets: list[Expectations] = []
    found_warnings: list[str] = [] if warnings is None else warnings
    ignored = _IgnoredKinds(found_warnings)
    first_seen: dict[tuple[str, str, str], str] = {}

    for doc in docs:
        r = Reader(doc.where, problems, warnings=found_warnings)
        kind = _check_header(r, doc)
        if isinstance(kind, UnmodelledPolicy):
            unmodelled.append(kind)
            continue
        if isinstance(kind, _Ignored):
            ignored.add(kind, doc)
            continue
        if kind is None:
            continue
        before = len(problems)
        converted, identity = _convert(r, kind, doc)
        if identity[2]:
            previous = first_seen.get(identity)
            if previous is not None:
                name = "/".join(filter(None, identity[1:]))
                r.problem(("metadata", "name"), f"duplicate {kind} {name} (first at {previous})")
                continue
            first_seen[identity] = r.where.source
        if len(problems) != before:
            continue
        if isinstance(converted, Namespace):
            declared[converted.name] = converted
        elif isinstance(converted, Pod):
            pods.append(converted)
        elif isinstance(converted, NetworkPolicy):
            policies.append(converted)
        elif isinstance(converted, ClusterNetworkPolicy):
            cluster_policies.append(converted)
        elif isinstance(converted, Expectations):
            expectation_sets.append(converted)
        elif isinstance(converted, _Workload):
            workloads.append((converted, doc))
    ignored.finish()

    pods += _workload_pods(workloads, pods, problems)
    referenced = {pod.namespace for pod in pods} | {policy.namespace for policy in policies}
    for expectation_set in expectation_sets:
        referenced.add(expectation_set.namespace)
        for flow in expectation_set.flows:
            for target in (flow.source, flow.destination):
                if isinstance(target, PodTarget) and target.namespace:
                    referenced.add(target.namespace)
    namespaces = dict(declared)
    for name in referenced - declared.keys():
        namespaces[name] = Namespace(name=name, labels={NAMESPACE_NAME_LABEL: name})
    return Snapshot(
        namespaces={name: namespaces[name] for name in sorted(namespaces)},
        pods=tuple(pods),
        policies=tuple(policies),
        expectations=tuple(expectation_sets),
        cluster_policies=tuple(cluster_policies),
        unmodelled=tuple(unmodelled),
        warnings=tuple(found_warnings),
    )


def _workload_pods(
    workloads: Sequence[tuple[_Workload, Document]],
    pods: Sequence[Pod],
    problems: list[InputError],
) -> list[Pod]:
    """The template pods of the workloads whose pods are not given (and that no workload owns)."""
    label_sets = _index_pods(pods)
    names = {(w.kind, w.pod.namespace, w.pod.name) for w, _ in workloads}
    taken = {pod.key: "Pod" for pod in pods}
    result: list[Pod] = []
    for workload, doc in workloads:
        pod = workload.pod
        if any((kind, pod.namespace, name) in names for kind, name in workload.owners):
            continue  # a ReplicaSet of a listed Deployment, a Job of a listed CronJob
        selector = workload.selector
        if selector is not None and any(
            selector.matches(labels) for labels in label_sets.get(pod.namespace, ())
        ):
            continue  # its pods are given
        if pod.key in taken:
            problems.append(
                doc.where.error(
                    ("metadata", "name"),
                    f"{workload.kind} {pod.key} would stand for a pod named {pod.key}, but "
                    f"{taken[pod.key]} {pod.key} already does; rename one",
                )
            )
            continue
        taken[pod.key] = workload.kind
        result.append(pod)
    return result


def snapshot_from_documents(docs: Sequence[Document]) -> Snapshot:
    """The snapshot of the objects read; raises one InputError listing every problem.

    Reads Namespace, Pod, NetworkPolicy, the cluster policy kinds of policy.networking.k8s.io, the
    workload kinds (which stand for their pods through their template when no Pod of theirs is
    given) and flowproof.dev FlowExpectations; other plugins' policy kinds are kept as
    UnmodelledPolicy; every other kind is ignored with a warning in `Snapshot.warnings`.
    """
    problems: list[InputError] = []
    snapshot = build_snapshot(docs, problems)
    raise_problems(problems)
    return snapshot
