"""The Network Policy API's cluster policies as API-shaped dicts -> the model's tiered policies.

Owns reading ClusterNetworkPolicy (policy.networking.k8s.io v1alpha2 and v1beta1, one schema) and
the older AdminNetworkPolicy and BaselineAdminNetworkPolicy (v1alpha1), validated the way their
CRDs validate them (the OpenAPI schema and CEL rules of sigs.k8s.io/network-policy-api v0.3.0,
experimental channel, so that `nodes`, `domainNames` and named ports are read too), and mapped onto
`collector.core.model.ClusterNetworkPolicy`. Label selectors are validated as metav1 validates
them: a CRD only types them, but no implementation can evaluate a malformed one. Never reads files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from collector.core.model import (
    ADMIN_NETWORK_POLICY,
    BASELINE_ADMIN_NETWORK_POLICY,
    CLUSTER_NETWORK_POLICY,
    PROTOCOLS,
    ClusterNetworkPolicy,
    ClusterPeer,
    ClusterPort,
    ClusterRule,
    Direction,
    IPNetwork,
    LabelSelector,
    Protocol,
    RuleAction,
    Tier,
)
from collector.reading.fields import (
    FieldPath,
    Reader,
    Where,
    _unsupported,
    describe_type,
    dns_subdomain_problem,
    parse_cidr,
    port_name_problem,
    raise_problems,
    read_selector,
)

CLUSTER_POLICY_GROUP: Final = "policy.networking.k8s.io"
CLUSTER_POLICY_KINDS: Final[Mapping[str, tuple[str, ...]]] = {
    CLUSTER_NETWORK_POLICY: ("v1beta1", "v1alpha2"),
    ADMIN_NETWORK_POLICY: ("v1alpha1",),
    BASELINE_ADMIN_NETWORK_POLICY: ("v1alpha1",),
}
"""kind -> the versions served, preferred first (v1beta1 is the storage version of v0.3.0)."""

_OBJECT_FIELDS: Final = ("apiVersion", "kind", "metadata", "spec", "status")
_TIERS: Final[tuple[Tier, ...]] = ("Admin", "Baseline")
# v1alpha2/v1beta1 "Accept"; v1alpha1 AdminNetworkPolicy "Allow", BaselineAdminNetworkPolicy
# "Allow"/"Deny" only ("+kubebuilder:validation:Enum").
_ACTIONS: Final[Mapping[str, Mapping[str, RuleAction]]] = {
    CLUSTER_NETWORK_POLICY: {"Accept": "Accept", "Deny": "Deny", "Pass": "Pass"},
    ADMIN_NETWORK_POLICY: {"Allow": "Accept", "Deny": "Deny", "Pass": "Pass"},
    BASELINE_ADMIN_NETWORK_POLICY: {"Allow": "Accept", "Deny": "Deny"},
}
# "A maximum of 25 rules is allowed in this block" (v1alpha2); v1alpha1: MaxItems=100.
_MAX_RULES: Final = {CLUSTER_NETWORK_POLICY: 25}
_MAX_ITEMS_V1ALPHA1: Final = 100
_MAX_NETWORKS: Final = 25  # networks and domainNames, every version
_MAX_RULE_NAME: Final = 100
_MAX_CIDR_LENGTH: Final = 43
# The CRD's DomainName pattern (wildcard only as a whole first label).
_DOMAIN_NAME: Final = re.compile(
    r"(\*\.)?([a-zA-Z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?\.)+[a-zA-Z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?\.?"
)
_CNP_PROTOCOL_KEYS: Final = {"tcp": "TCP", "udp": "UDP", "sctp": "SCTP"}


def _max_items(kind: str) -> int:
    return _MAX_RULES.get(kind, _MAX_ITEMS_V1ALPHA1)


def _exactly_one(
    r: Reader, obj: Mapping[str, Any], path: FieldPath, fields: Sequence[str], what: str
) -> str | None:
    """The one field of `fields` set in `obj` ("MinProperties=1, MaxProperties=1")."""
    present = [key for key in fields if key in obj]
    if not obj:
        r.problem(path, f"must set exactly one of {', '.join(fields)} ({what})")
        return None
    if len(present) > 1:
        r.problem(path, f"must set exactly one of {', '.join(fields)}, not {' and '.join(present)}")
        return None
    return present[0] if present else None


def _items(
    r: Reader, value: object, path: FieldPath, *, required: bool, max_items: int
) -> Sequence[Any]:
    """A list with the CRD's MinItems=1 (when present or required) and MaxItems."""
    items = r.sequence(value, path)
    if value is None:
        if required:
            r.problem(path, "required field is missing")
        return ()
    if isinstance(value, list) and not items:
        r.problem(path, "must have at least 1 item")
    if len(items) > max_items:
        r.problem(path, f"must have at most {max_items} items, not {len(items)}")
    return items


def _integer(r: Reader, value: object, path: FieldPath, low: int, high: int) -> int | None:
    number = r.integer(value, path)
    if number is not None and not low <= number <= high:
        r.problem(path, f"must be between {low} and {high}, inclusive, not {number}")
        return None
    return number


def _selector(r: Reader, value: object, path: FieldPath) -> LabelSelector:
    if value is not None and not isinstance(value, Mapping):
        r.problem(path, f"must be a label selector (a mapping), not {describe_type(value)}")
        return LabelSelector()
    return read_selector(r, value, path)


def _namespaced_pod(
    r: Reader, value: object, path: FieldPath
) -> tuple[LabelSelector, LabelSelector]:
    """A NamespacedPod: (namespaceSelector, podSelector); "podSelector" is required."""
    obj = r.mapping(value, path, ("namespaceSelector", "podSelector"))
    if isinstance(value, Mapping) and "podSelector" not in value:
        r.problem((*path, "podSelector"), "required field is missing")
    return (
        _selector(r, obj.get("namespaceSelector"), (*path, "namespaceSelector")),
        _selector(r, obj.get("podSelector"), (*path, "podSelector")),
    )


def _read_subject(
    r: Reader, value: object, path: FieldPath
) -> tuple[LabelSelector, LabelSelector | None]:
    obj = r.mapping(value, path, ("namespaces", "pods"))
    if value is None:
        r.problem(path, "required field is missing")
        return LabelSelector(), None
    form = _exactly_one(r, obj, path, ("namespaces", "pods"), "the pods the policy applies to")
    if form == "namespaces":
        return _selector(r, obj["namespaces"], (*path, "namespaces")), None
    if form == "pods":
        return _namespaced_pod(r, obj["pods"], (*path, "pods"))
    return LabelSelector(), None


def _read_networks(r: Reader, value: object, path: FieldPath) -> tuple[IPNetwork, ...]:
    networks: list[IPNetwork] = []
    for i, raw in enumerate(_items(r, value, path, required=True, max_items=_MAX_NETWORKS)):
        here = (*path, i)
        text = r.string(raw, here)
        if text is None:
            continue
        if len(text) > _MAX_CIDR_LENGTH:
            r.problem(here, f"must be at most {_MAX_CIDR_LENGTH} characters")
            continue
        # "isCIDR(self) && cidr(self) == cidr(self).masked()": host bits are refused here.
        parsed = parse_cidr(text, masked_only=True)
        if parsed.problem is not None or parsed.network is None:
            r.problem(here, parsed.problem or f"{text!r} is not a valid CIDR")
            continue
        networks.append(parsed.network)
    return tuple(dict.fromkeys(networks))


def _read_domain_names(r: Reader, value: object, path: FieldPath) -> tuple[str, ...]:
    names: list[str] = []
    for i, raw in enumerate(_items(r, value, path, required=True, max_items=_MAX_NETWORKS)):
        text = r.string(raw, (*path, i))
        if text is None:
            continue
        if not _DOMAIN_NAME.fullmatch(text):
            r.problem(
                (*path, i),
                f"{text!r} is not a domain name (e.g. kubernetes.io or *.kubernetes.io)",
            )
            continue
        names.append(text)
    return tuple(names)


def _peer_forms(kind: str, direction: Direction) -> tuple[str, ...]:
    if direction == "ingress":
        return ("namespaces", "pods")
    if kind == BASELINE_ADMIN_NETWORK_POLICY:
        return ("namespaces", "pods", "nodes", "networks")
    return ("namespaces", "pods", "nodes", "networks", "domainNames")


def _read_peer(
    r: Reader, value: object, path: FieldPath, kind: str, direction: Direction
) -> ClusterPeer | None:
    forms = _peer_forms(kind, direction)
    hints = {"ipBlock": "use networks", "podSelector": "use pods", "namespaceSelector": "use pods"}
    obj = r.mapping(value, path, forms, hints)
    if not isinstance(value, Mapping) or any(key not in forms for key in value):
        return None
    form = _exactly_one(r, obj, path, forms, "whom the rule applies to")
    if form == "namespaces":
        return ClusterPeer(namespace_selector=_selector(r, obj[form], (*path, form)))
    if form == "pods":
        namespaces, pods = _namespaced_pod(r, obj[form], (*path, form))
        return ClusterPeer(namespace_selector=namespaces, pod_selector=pods)
    if form == "nodes":
        return ClusterPeer(nodes=_selector(r, obj[form], (*path, form)))
    if form == "networks":
        return ClusterPeer(networks=_read_networks(r, obj[form], (*path, form)))
    if form == "domainNames":
        return ClusterPeer(domain_names=_read_domain_names(r, obj[form], (*path, form)))
    return None


def _read_range(r: Reader, obj: Mapping[str, Any], path: FieldPath) -> tuple[int, int] | None:
    """start and end of a PortRange (`obj` already read as a mapping)."""
    for key in ("start", "end"):
        if key not in obj:
            r.problem((*path, key), "required field is missing")
    start = _integer(r, obj.get("start"), (*path, "start"), 1, 65535)
    end = _integer(r, obj.get("end"), (*path, "end"), 1, 65535)
    if start is None or end is None:
        return None
    if not start < end:
        # "self.start < self.end": "Start port must be less than End port".
        r.problem(path, f"start ({start}) must be less than end ({end})")
        return None
    return start, end


def _read_protocol_entry(r: Reader, value: object, path: FieldPath) -> ClusterPort | None:
    """One v1alpha2/v1beta1 `protocols` item: tcp, udp or sctp with a destinationPort, or a
    destinationNamedPort."""
    fields = (*_CNP_PROTOCOL_KEYS, "destinationNamedPort")
    obj = r.mapping(value, path, fields, {"port": "use tcp: {destinationPort: {number: N}}"})
    if not isinstance(value, Mapping) or any(key not in fields for key in value):
        return None
    form = _exactly_one(r, obj, path, fields, "what traffic the rule matches")
    if form is None:
        return None
    if form == "destinationNamedPort":
        return _named_port(r, obj[form], (*path, form))
    here = (*path, form)
    proto_obj = r.mapping(obj[form], here, ("destinationPort",))
    if not proto_obj:
        r.problem(here, "must set destinationPort")
        return None
    dest_path = (*here, "destinationPort")
    dest = r.mapping(proto_obj.get("destinationPort"), dest_path, ("number", "range"))
    which = _exactly_one(r, dest, dest_path, ("number", "range"), "a port or a range")
    protocol: Protocol = _CNP_PROTOCOL_KEYS[form]  # type: ignore[assignment]
    if which == "number":
        number = _integer(r, dest["number"], (*dest_path, "number"), 1, 65535)
        return None if number is None else ClusterPort(protocol, number)
    if which == "range":
        range_path = (*dest_path, "range")
        span = _read_range(r, r.mapping(dest["range"], range_path, ("start", "end")), range_path)
        return None if span is None else ClusterPort(protocol, span[0], span[1])
    return None


def _named_port(r: Reader, value: object, path: FieldPath) -> ClusterPort | None:
    name = r.string(value, path)
    if name is None:
        return None
    if (problem := port_name_problem(name)) is not None:
        r.problem(path, problem)
        return None
    return ClusterPort(protocol=None, name=name)


def _read_v1alpha1_port(r: Reader, value: object, path: FieldPath) -> ClusterPort | None:
    """One v1alpha1 `ports` item: portNumber, namedPort or portRange (protocol defaults to TCP)."""
    fields = ("portNumber", "namedPort", "portRange")
    obj = r.mapping(value, path, fields)
    if not isinstance(value, Mapping) or any(key not in fields for key in value):
        return None
    form = _exactly_one(r, obj, path, fields, "what traffic the rule matches")
    if form is None:
        return None
    here = (*path, form)
    if form == "namedPort":
        return _named_port(r, obj[form], here)
    if form == "portNumber":
        entry = r.mapping(obj[form], here, ("protocol", "port"))
        protocol = _protocol(r, entry.get("protocol"), (*here, "protocol"))
        if isinstance(obj[form], Mapping) and "port" not in entry:
            r.problem((*here, "port"), "required field is missing")
        number = _integer(r, entry.get("port"), (*here, "port"), 1, 65535)
        return None if number is None or protocol is None else ClusterPort(protocol, number)
    entry = r.mapping(obj[form], here, ("protocol", "start", "end"))
    protocol = _protocol(r, entry.get("protocol"), (*here, "protocol"))
    span = _read_range(r, entry, here)
    if span is None or protocol is None:
        return None
    return ClusterPort(protocol, span[0], span[1])


def _protocol(r: Reader, value: object, path: FieldPath) -> Protocol | None:
    """`protocol` of a v1alpha1 port: "+kubebuilder:default=TCP"; TCP, UDP or SCTP."""
    text = r.string(value, path)
    if text is None:
        return "TCP" if value is None else None
    for protocol in PROTOCOLS:
        if text == protocol:
            return protocol
    r.problem(path, _unsupported(text, PROTOCOLS))
    return None


def _read_rule(
    r: Reader, value: object, path: FieldPath, kind: str, direction: Direction
) -> ClusterRule | None:
    peers_key = "from" if direction == "ingress" else "to"
    ports_key = "protocols" if kind == CLUSTER_NETWORK_POLICY else "ports"
    hints = {
        ("to" if direction == "ingress" else "from"): f"{direction} rules name their peers in "
        f"{peers_key!r}",
        (
            "ports" if ports_key == "protocols" else "protocols"
        ): f"this version calls it {ports_key!r}",
    }
    obj = r.mapping(value, path, ("name", "action", peers_key, ports_key), hints)
    if not isinstance(value, Mapping):
        return None
    name = r.string(obj.get("name"), (*path, "name")) or ""
    if len(name) > _MAX_RULE_NAME:
        r.problem((*path, "name"), f"must be at most {_MAX_RULE_NAME} characters")
    actions = _ACTIONS[kind]
    raw_action = r.required_string(obj.get("action"), (*path, "action"))
    action = actions.get(raw_action) if raw_action is not None else None
    if raw_action is not None and action is None:
        r.problem((*path, "action"), _unsupported(raw_action, actions))
    peers: list[ClusterPeer] = []
    peers_path = (*path, peers_key)
    for i, raw in enumerate(
        _items(r, obj.get(peers_key), peers_path, required=True, max_items=_max_items(kind))
    ):
        peer = _read_peer(r, raw, (*peers_path, i), kind, direction)
        if peer is not None:
            peers.append(peer)
    ports: list[ClusterPort] = []
    ports_path = (*path, ports_key)
    read_port = _read_protocol_entry if kind == CLUSTER_NETWORK_POLICY else _read_v1alpha1_port
    for i, raw in enumerate(
        _items(r, obj.get(ports_key), ports_path, required=False, max_items=_max_items(kind))
    ):
        port = read_port(r, raw, (*ports_path, i))
        if port is not None:
            ports.append(port)
    if any(p.name is not None for p in ports) and any(
        p.form in ("networks", "nodes", "domainNames") for p in peers
    ):
        # The CRD's rule: "networks/nodes/domainNames peer cannot be set with namedPorts since
        # there are no namedPorts for networks/nodes/domainNames".
        r.problem(
            path,
            "a named port cannot be used with networks, nodes or domainNames peers (they have no "
            "named ports)",
        )
    if any(p.form == "domainNames" for p in peers) and action not in (None, "Accept"):
        # "DomainNames is only supported for Accept rules" (Allow in v1alpha1).
        r.problem((*path, "action"), "domainNames peers are only supported for Accept rules")
    if action is None:
        return None
    return ClusterRule(action=action, peers=tuple(peers), ports=tuple(ports), name=name)


def read_cluster_policy(r: Reader, obj: Mapping[str, Any], kind: str) -> ClusterNetworkPolicy:
    """One ClusterNetworkPolicy, AdminNetworkPolicy or BaselineAdminNetworkPolicy (`kind`)."""
    r.mapping(obj, (), _OBJECT_FIELDS)
    meta = r.mapping(obj.get("metadata"), ("metadata",))
    name = r.required_string(meta.get("name"), ("metadata", "name")) or ""
    if name and (problem := dns_subdomain_problem(name)) is not None:
        r.problem(("metadata", "name"), problem)
    if kind == BASELINE_ADMIN_NETWORK_POLICY and name and name != "default":
        # "Only one baseline admin network policy with metadata.name="default" can be created".
        r.problem(("metadata", "name"), f"must be 'default', not {name!r} (there is only one)")
    if "namespace" in meta:
        r.warn(("metadata", "namespace"), f"a {kind} is cluster-scoped: namespace is ignored")
    spec_fields = ["subject", "ingress", "egress"]
    if kind == CLUSTER_NETWORK_POLICY:
        spec_fields[:0] = ["tier", "priority"]
    elif kind == ADMIN_NETWORK_POLICY:
        spec_fields[:0] = ["priority"]
    spec = r.mapping(obj.get("spec"), ("spec",), spec_fields)
    if obj.get("spec") is None:
        r.problem(("spec",), "required field is missing")
    tier: Tier = "Baseline" if kind == BASELINE_ADMIN_NETWORK_POLICY else "Admin"
    if kind == CLUSTER_NETWORK_POLICY:
        raw_tier = r.required_string(spec.get("tier"), ("spec", "tier"))
        found = next((t for t in _TIERS if t == raw_tier), None)
        if raw_tier is not None and found is None:
            r.problem(("spec", "tier"), _unsupported(raw_tier, _TIERS))
        tier = found or "Admin"
    priority = 0
    if kind != BASELINE_ADMIN_NETWORK_POLICY:
        if "priority" not in spec and isinstance(obj.get("spec"), Mapping):
            r.problem(("spec", "priority"), "required field is missing")
        priority = _integer(r, spec.get("priority"), ("spec", "priority"), 0, 1000) or 0
    namespaces, pods = _read_subject(r, spec.get("subject"), ("spec", "subject"))
    rules: dict[Direction, list[ClusterRule]] = {"ingress": [], "egress": []}
    for direction in ("ingress", "egress"):
        path: FieldPath = ("spec", direction)
        raw_rules = r.sequence(spec.get(direction), path)
        if len(raw_rules) > _max_items(kind):
            r.problem(path, f"must have at most {_max_items(kind)} rules, not {len(raw_rules)}")
        for i, raw in enumerate(raw_rules):
            rule = _read_rule(r, raw, (*path, i), kind, direction)
            if rule is not None:
                rules[direction].append(rule)
    return ClusterNetworkPolicy(
        name=name,
        tier=tier,
        priority=priority,
        subject_namespaces=namespaces,
        subject_pods=pods,
        ingress=tuple(rules["ingress"]),
        egress=tuple(rules["egress"]),
        kind=kind,
        source=r.where.source,
    )


def cluster_policy_from_dict(
    obj: Mapping[str, Any], where: Where, *, warnings: list[str] | None = None
) -> ClusterNetworkPolicy:
    """A cluster policy from its API dict (kind from `obj`); raises InputError (every problem)."""
    r = Reader(where, warnings=warnings)
    kind = obj.get("kind")
    if not isinstance(kind, str) or kind not in CLUSTER_POLICY_KINDS:
        r.problem(("kind",), _unsupported(kind, CLUSTER_POLICY_KINDS))
        raise_problems(r.problems)
    policy = read_cluster_policy(r, obj, str(kind))
    raise_problems(r.problems)
    return policy


__all__ = [
    "CLUSTER_POLICY_GROUP",
    "CLUSTER_POLICY_KINDS",
    "cluster_policy_from_dict",
    "read_cluster_policy",
]
