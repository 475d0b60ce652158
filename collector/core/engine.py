"""The policy engine: snapshot + flow -> verdict, with the policies and rules that decided it.

Implements networking.k8s.io/v1 NetworkPolicy semantics for one flow at a time and explains every
answer (which policies isolate each side, which rule allowed it, or that none did). It is pure: no
I/O, no clocks, no `kubernetes`/`grpc`/`aiohttp`/protobuf. For whole-cluster counts use
`collector.core.classes`, which computes the same semantics over equivalence classes of pods.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from collector.core.model import (
    Direction,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyPort,
    Protocol,
    Rule,
    Snapshot,
)

Endpoint = Pod | str  # a pod, or an IP address outside the pod network

SELF_NOTE = "a pod cannot block access to itself: traffic from a pod to itself is always allowed"


@dataclass(frozen=True)
class RuleMatch:
    """A rule that allowed the flow: policy, direction, rule index, the matching peer and port."""

    policy: str
    direction: Direction
    rule: int
    peer: int | None  # index in from/to; None when the rule lists no peers (every peer)
    port: int | None  # index in ports; None when the rule lists no ports (every port)
    peer_text: str = ""
    port_text: str = ""

    def describe(self) -> str:
        field = "from" if self.direction == "ingress" else "to"
        who = f"{field}[{self.peer}] {self.peer_text}" if self.peer is not None else f"any {field}"
        port = f"ports[{self.port}] {self.port_text}" if self.port is not None else "any port"
        return f"{self.policy} {self.direction}[{self.rule}] ({who}; {port})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "rule": self.rule,
            "peer": self.peer,
            "port": self.port,
            "text": self.describe(),
        }


@dataclass(frozen=True)
class DirectionVerdict:
    """What one direction (egress at the source, ingress at the destination) says about a flow."""

    direction: Direction
    applies: bool  # False when that side is outside the pod network or uses the host network
    isolated: bool
    policies: tuple[str, ...]  # the policies that select the pod for this direction
    allowed: bool
    allowed_by: tuple[RuleMatch, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "applies": self.applies,
            "isolated": self.isolated,
            "policies": list(self.policies),
            "allowed": self.allowed,
            "allowedBy": [m.to_dict() for m in self.allowed_by],
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Verdict:
    """The model's answer for one flow. `allowed` needs both egress at the source and ingress."""

    allowed: bool
    ingress: DirectionVerdict
    egress: DirectionVerdict
    notes: tuple[str, ...] = ()

    @property
    def deciding(self) -> tuple[RuleMatch, ...]:
        return self.egress.allowed_by + self.ingress.allowed_by

    def summary(self) -> str:
        """One line: allowed or denied, and by what."""
        if self.notes and self.notes[0] == SELF_NOTE:
            return "allowed: " + SELF_NOTE
        if not self.egress.allowed:
            return "denied: " + self.egress.reason
        if not self.ingress.allowed:
            return "denied: " + self.ingress.reason
        parts = [d.reason for d in (self.egress, self.ingress) if d.isolated]
        return "allowed: " + ("; ".join(parts) if parts else "no policy isolates either side")

    def to_dict(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "ingress": self.ingress.to_dict(),
            "egress": self.egress.to_dict(),
            "notes": list(self.notes),
        }


def suspects(verdict: Verdict) -> frozenset[str]:
    """The policies whose failure to be enforced would make the network contradict `verdict`:
    for an allowed flow the policies of the rules that allow it on either side, for a denied one
    the policies that isolate the side that denies it."""
    if verdict.allowed:
        return frozenset(m.policy for m in verdict.deciding)
    found: set[str] = set()
    for side in (verdict.egress, verdict.ingress):
        if not side.allowed:
            found.update(side.policies)
    return frozenset(found)


def endpoint_name(endpoint: Endpoint) -> str:
    return endpoint.key if isinstance(endpoint, Pod) else endpoint


def infer_policy_types(has_egress_rules: bool) -> tuple[Direction, ...]:
    """policyTypes when the field is absent, exactly as the API server defaults it.

    "If this field is not specified, it will default based on the existence of ingress or egress
    rules; policies that contain an egress section are assumed to affect egress, and all policies
    (whether or not they contain an ingress section) are assumed to affect ingress." The API server
    tests `len(spec.egress) != 0`, so an empty `egress: []` does not add Egress.
    """
    return ("ingress", "egress") if has_egress_rules else ("ingress",)


class Engine:
    """Evaluates flows against one snapshot. Build once per snapshot; `evaluate` is cheap."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        by_namespace: dict[str, list[NetworkPolicy]] = defaultdict(list)
        for policy in snapshot.policies:
            by_namespace[policy.namespace].append(policy)
        self._policies_by_namespace: Mapping[str, Sequence[NetworkPolicy]] = dict(by_namespace)
        self._has_ip_blocks = any(
            peer.ip_block is not None
            for policy in snapshot.policies
            for rule in policy.ingress + policy.egress
            for peer in rule.peers
        )

    # -- selection and isolation ------------------------------------------------------------------

    def selecting_policies(self, pod: Pod) -> list[NetworkPolicy]:
        """Policies whose podSelector selects `pod`.

        "podSelector selects the pods to which this NetworkPolicy object applies ... An empty
        podSelector selects all pods in this namespace." hostNetwork pods are never selected: the
        API leaves them undefined and the documented common behaviour is to ignore them.
        """
        if pod.host_network:
            return []
        return [
            p
            for p in self._policies_by_namespace.get(pod.namespace, ())
            if p.pod_selector.matches(pod.labels)
        ]

    # -- peers and ports -------------------------------------------------------------------------

    def peer_matches(self, policy: NetworkPolicy, peer: Peer, other: Endpoint) -> bool:
        """Whether `other` (the remote side of the flow) is selected by `peer` of `policy`."""
        if peer.ip_block is not None:
            # "ipBlock defines policy on a particular IPBlock": it matches addresses, so a pod
            # matches only through its IPs; a pod with no IP yet cannot match any ipBlock.
            addresses = other.ips if isinstance(other, Pod) else (other,)
            return any(peer.ip_block.contains(ip) for ip in addresses)
        if not isinstance(other, Pod) or other.host_network:
            # Selectors match pods in the pod network only; host-network traffic is the node's.
            return False
        if peer.namespace_selector is None:
            # "podSelector ... selects particular Pods in the same namespace as the NetworkPolicy".
            if other.namespace != policy.namespace:
                return False
        elif not peer.namespace_selector.matches(self.snapshot.namespace_labels(other.namespace)):
            # "namespaceSelector ... selects particular namespaces"; with podSelector too, "selects
            # particular Pods within particular namespaces".
            return False
        return peer.pod_selector is None or peer.pod_selector.matches(other.labels)

    @staticmethod
    def port_matches(
        entry: PolicyPort, port: int, protocol: Protocol, destination: Endpoint
    ) -> bool:
        """Whether a rule's port entry admits `port`/`protocol` to `destination`.

        "protocol ... If not specified, this field defaults to TCP." "port ... If this field is not
        provided, this matches all port names and numbers." "endPort indicates that the range of
        ports from port to endPort if set, inclusive, should be allowed." A named port is resolved
        against the destination pod's container ports.
        """
        if entry.protocol != protocol:
            return False
        if entry.port is None:
            return True
        if isinstance(entry.port, str):
            if not isinstance(destination, Pod):
                return False
            return destination.named_port(entry.port, protocol) == port
        if entry.end_port is not None:
            return entry.port <= port <= entry.end_port
        return entry.port == port

    def _rule_matches(
        self,
        policy: NetworkPolicy,
        direction: Direction,
        index: int,
        rule: Rule,
        other: Endpoint,
        port: int,
        protocol: Protocol,
        destination: Endpoint,
    ) -> RuleMatch | None:
        # "If this field is empty or missing, this rule matches all sources/destinations."
        peer_index: int | None = None
        if rule.peers:
            peer_index = next(
                (i for i, peer in enumerate(rule.peers) if self.peer_matches(policy, peer, other)),
                None,
            )
            if peer_index is None:
                return None
        # "If this field is empty or missing, this rule matches all ports."
        port_index: int | None = None
        if rule.ports:
            port_index = next(
                (
                    i
                    for i, entry in enumerate(rule.ports)
                    if self.port_matches(entry, port, protocol, destination)
                ),
                None,
            )
            if port_index is None:
                return None
        return RuleMatch(
            policy=policy.key,
            direction=direction,
            rule=index,
            peer=peer_index,
            port=port_index,
            peer_text=rule.peers[peer_index].describe() if peer_index is not None else "",
            port_text=rule.ports[port_index].describe() if port_index is not None else "",
        )

    def direction_verdict(
        self,
        direction: Direction,
        subject: Endpoint,
        other: Endpoint,
        port: int,
        protocol: Protocol,
        destination: Endpoint,
    ) -> DirectionVerdict:
        """The verdict of one direction: ingress at `subject` from `other`, or egress to it."""
        what = "ingress" if direction == "ingress" else "egress"
        if not isinstance(subject, Pod):
            return DirectionVerdict(
                direction, False, False, (), True, (), f"{subject} is outside the pod network"
            )
        if subject.host_network:
            return DirectionVerdict(
                direction,
                False,
                False,
                (),
                True,
                (),
                f"{subject.key} uses the host network: NetworkPolicies do not select it",
            )
        isolating = [p for p in self.selecting_policies(subject) if direction in p.policy_types]
        if not isolating:
            # "By default, a pod is non-isolated for <direction>; all <direction> is allowed."
            return DirectionVerdict(
                direction,
                True,
                False,
                (),
                True,
                (),
                f"no policy selects {subject.key} for {what}: all {what} is allowed",
            )
        matches: list[RuleMatch] = []
        for policy in isolating:
            rules = policy.ingress if direction == "ingress" else policy.egress
            for index, rule in enumerate(rules):
                match = self._rule_matches(
                    policy, direction, index, rule, other, port, protocol, destination
                )
                if match is not None:
                    matches.append(match)
        names = tuple(p.key for p in isolating)
        if matches:
            reason = f"{what} of {subject.key} allowed by " + ", ".join(
                m.describe() for m in matches
            )
            return DirectionVerdict(direction, True, True, names, True, tuple(matches), reason)
        # "the pod is isolated for <direction> ... the only allowed connections are those allowed
        # by the <direction> list of some NetworkPolicy that applies to the pod".
        reason = (
            f"{subject.key} is isolated for {what} by {', '.join(names)} and no rule allows "
            f"{'from' if direction == 'ingress' else 'to'} {endpoint_name(other)} on "
            f"{port}/{protocol}"
        )
        return DirectionVerdict(direction, True, True, names, False, (), reason)

    def evaluate(
        self, source: Endpoint, destination: Endpoint, port: int, protocol: Protocol
    ) -> Verdict:
        """The model's verdict for a flow from `source` to `destination` on `port`/`protocol`.

        "For a connection from a source pod to a destination pod to be allowed, both the egress
        policy on the source pod and the ingress policy on the destination pod need to allow the
        connection." Endpoints outside the pod network (IP strings) have no policies of their own.
        """
        egress = self.direction_verdict("egress", source, destination, port, protocol, destination)
        ingress = self.direction_verdict(
            "ingress", destination, source, port, protocol, destination
        )
        notes = self._notes(source, destination)
        allowed = egress.allowed and ingress.allowed
        if (
            isinstance(source, Pod)
            and isinstance(destination, Pod)
            and source.key == destination.key
        ):
            notes = (SELF_NOTE, *notes)
            allowed = True
        return Verdict(allowed=allowed, ingress=ingress, egress=egress, notes=notes)

    def _notes(self, source: Endpoint, destination: Endpoint) -> tuple[str, ...]:
        notes = []
        for side, endpoint in (("source", source), ("destination", destination)):
            if not isinstance(endpoint, Pod):
                continue
            if not endpoint.ips and self._has_ip_blocks:
                notes.append(f"{side} {endpoint.key} has no IP address, so no ipBlock can match it")
            if endpoint.host_network:
                notes.append(
                    f"{side} {endpoint.key} uses the host network: policies do not select it and "
                    "pod or namespace selectors do not match it; only ipBlocks of its IPs do"
                )
        return tuple(notes)
