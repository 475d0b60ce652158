"""The policy engine: snapshot + flow -> verdict, with the tier, policy, rule and action that decided it.

Implements the tiers of the Network Policy API for one flow at a time: the Admin tier of
ClusterNetworkPolicies (and v1alpha1 AdminNetworkPolicies), then networking.k8s.io/v1
NetworkPolicies, then the Baseline tier (ClusterNetworkPolicies and the v1alpha1
BaselineAdminNetworkPolicy), then the default (allowed). Every answer is explained, and a verdict
the model cannot be sure of (another plugin's policy objects, peers it does not model, two
policies of one priority that disagree) says so in `incomplete`. It is pure: no I/O, no clocks,
no `kubernetes`/`grpc`/`aiohttp`/protobuf. For whole-cluster counts use `collector.core.classes`,
which computes the same semantics over equivalence classes of pods.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from collector.core.model import (
    ClusterNetworkPolicy,
    ClusterPeer,
    ClusterPort,
    ClusterRule,
    Direction,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyPort,
    Protocol,
    Rule,
    RuleAction,
    Snapshot,
    Tier,
    UnmodelledPolicy,
)

Endpoint = Pod | str  # a pod, or an IP address outside the pod network
DecidingTier = Literal["Admin", "NetworkPolicy", "Baseline", "none"]
"""The tier whose rule (or isolation) decided a direction; "none": nothing did (allowed)."""

SELF_NOTE = "a pod cannot block access to itself: traffic from a pod to itself is always allowed"
MAX_LISTED = 3  # unmodelled objects named in one reason; the rest are counted


@dataclass(frozen=True)
class RuleMatch:
    """A rule that matched the flow: its tier, policy, direction, rule index, peer, port and action.

    NetworkPolicy rules only allow (`action` "Allow"); cluster policy rules Accept, Deny or Pass
    (v1alpha1 kinds say "Allow" for Accept) and carry their optional `name` and `priority`.
    """

    policy: str
    direction: Direction
    rule: int
    peer: int | None  # index in from/to; None when the rule lists no peers (every peer)
    port: int | None  # index in ports; None when the rule lists no ports (every port)
    peer_text: str = ""
    port_text: str = ""
    tier: DecidingTier = "NetworkPolicy"
    action: str = "Allow"
    name: str = ""
    priority: int | None = None

    def describe(self) -> str:
        field_name = "from" if self.direction == "ingress" else "to"
        who = (
            f"{field_name}[{self.peer}] {self.peer_text}"
            if self.peer is not None
            else f"any {field_name}"
        )
        port = f"ports[{self.port}] {self.port_text}" if self.port is not None else "any port"
        if self.tier != "NetworkPolicy" and self.port is not None:
            port = f"protocols[{self.port}] {self.port_text}"
        policy = (
            self.policy if self.priority is None else f"{self.policy} (priority {self.priority})"
        )
        name = f" {self.name!r}" if self.name else ""
        return (
            f"{self.tier} tier: {policy} {self.direction}[{self.rule}]{name} ({who}; {port}) "
            f"-> {self.action}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "tier": self.tier,
            "policy": self.policy,
            "priority": self.priority,
            "rule": self.rule,
            "name": self.name or None,
            "action": self.action,
            "peer": self.peer,
            "port": self.port,
            "text": self.describe(),
        }


@dataclass(frozen=True)
class DirectionVerdict:
    """What one direction (egress at the source, ingress at the destination) says about a flow.

    `tier` is the tier that decided: a cluster policy rule (`decided_by`) of the Admin or Baseline
    tier, the NetworkPolicies isolating the pod (`isolated`, `policies`, `allowed_by`), or "none".
    `passed` are the Pass rules that handed the flow on to the next tier; `cluster_policies` the
    cluster policies whose subject is the pod; `incomplete` why the answer may be wrong.
    """

    direction: Direction
    applies: bool  # False when that side is outside the pod network or uses the host network
    isolated: bool
    policies: tuple[str, ...]  # the NetworkPolicies that select the pod for this direction
    allowed: bool
    allowed_by: tuple[RuleMatch, ...]
    reason: str
    tier: DecidingTier = "none"
    decided_by: RuleMatch | None = None
    passed: tuple[RuleMatch, ...] = ()
    cluster_policies: tuple[str, ...] = ()
    incomplete: tuple[str, ...] = ()

    @property
    def deciding(self) -> tuple[RuleMatch, ...]:
        """The rules that decided, in the order they were met (Pass rules first)."""
        if self.decided_by is not None:
            return (*self.passed, self.decided_by)
        return (*self.passed, *self.allowed_by)

    def to_dict(self) -> dict[str, Any]:
        return {
            "applies": self.applies,
            "tier": self.tier,
            "isolated": self.isolated,
            "policies": list(self.policies),
            "clusterPolicies": list(self.cluster_policies),
            "allowed": self.allowed,
            "allowedBy": [m.to_dict() for m in self.allowed_by],
            "decidedBy": self.decided_by.to_dict() if self.decided_by else None,
            "passed": [m.to_dict() for m in self.passed],
            "incomplete": list(self.incomplete),
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Verdict:
    """The model's answer for one flow. `allowed` needs both egress at the source and ingress.

    `incomplete` lists why the model cannot be sure (empty: it is): `allowed` is then what the
    policies flowproof models say, and the flow's model is UNKNOWN.
    """

    allowed: bool
    ingress: DirectionVerdict
    egress: DirectionVerdict
    notes: tuple[str, ...] = ()
    incomplete: tuple[str, ...] = field(default=())

    @property
    def known(self) -> bool:
        return not self.incomplete

    @property
    def model(self) -> Literal["allow", "deny", "unknown"]:
        if self.incomplete:
            return "unknown"
        return "allow" if self.allowed else "deny"

    @property
    def deciding(self) -> tuple[RuleMatch, ...]:
        return self.egress.deciding + self.ingress.deciding

    def summary(self) -> str:
        """One line: allowed, denied or unknown, and by what."""
        known = self._known_summary()
        if not self.incomplete:
            return known
        more = len(self.incomplete) - 1
        extra = f" (and {more} more reason{'s' if more > 1 else ''})" if more > 0 else ""
        return f"unknown: {self.incomplete[0]}{extra}; the modelled policies say {known}"

    def _known_summary(self) -> str:
        if self.notes and self.notes[0] == SELF_NOTE:
            return "allowed: " + SELF_NOTE
        if not self.egress.allowed:
            return "denied: " + self.egress.reason
        if not self.ingress.allowed:
            return "denied: " + self.ingress.reason
        parts = [d.reason for d in (self.egress, self.ingress) if d.tier != "none" or d.passed]
        return "allowed: " + ("; ".join(parts) if parts else "no policy isolates either side")

    def to_dict(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "model": self.model,
            "ingress": self.ingress.to_dict(),
            "egress": self.egress.to_dict(),
            "notes": list(self.notes),
            "incomplete": list(self.incomplete),
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


@dataclass(frozen=True)
class TierOutcome:
    """What one tier of cluster policies says about a direction of a flow.

    `match` is the rule that took effect (None: no rule of the tier matched); `incomplete` why the
    answer may be wrong (a rule whose peers the model cannot match, or policies of one priority
    that disagree).
    """

    match: RuleMatch | None
    subjects: tuple[str, ...]
    incomplete: tuple[str, ...] = ()


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
        self._tiers: Mapping[Tier, Sequence[ClusterNetworkPolicy]] = tier_order(
            snapshot.cluster_policies
        )
        # (tier, namespace, labels, host network) -> the tier's policies whose subject it is
        self._subjects: dict[
            tuple[Tier, str, frozenset[tuple[str, str]], bool], list[ClusterNetworkPolicy]
        ] = {}
        unmodelled: dict[str, list[UnmodelledPolicy]] = defaultdict(list)
        for item in snapshot.unmodelled:
            unmodelled[item.namespace].append(item)
        self._unmodelled: Mapping[str, Sequence[UnmodelledPolicy]] = dict(unmodelled)

    def with_pods(self, snapshot: Snapshot) -> Engine:
        """An engine for `snapshot`, which has this one's policies and namespaces and other
        pods: the policy indices are shared (they depend on no pod), nothing is rebuilt."""
        engine = object.__new__(Engine)
        engine.__dict__.update(self.__dict__)
        engine.snapshot = snapshot
        return engine

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

    def cluster_subject(self, policy: ClusterNetworkPolicy, pod: Pod) -> bool:
        """Whether `pod` is a subject of a cluster policy.

        "Subject defines the pods to which this ClusterNetworkPolicy applies": `namespaces` selects
        every pod of the selected namespaces, `pods` the selected pods of the selected namespaces.
        "Note that host-networked pods are not included in subject selection."
        """
        if pod.host_network:
            return False
        if not policy.subject_namespaces.matches(self.snapshot.namespace_labels(pod.namespace)):
            return False
        return policy.subject_pods is None or policy.subject_pods.matches(pod.labels)

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

    def cluster_peer_matches(self, peer: ClusterPeer, other: Endpoint) -> bool | None:
        """Whether `other` is selected by a cluster policy peer; None when the model cannot tell.

        `namespaces` "defines a way to select all pods within a set of Namespaces"; `pods` "a set
        of pods in a set of namespaces"; both: "host-networked pods are not included". `networks`
        selects "peers via CIDR blocks ... cluster-internal traffic will be checked against the rule
        as well", so pods match through their IPs. `nodes` and `domainNames` (experimental) are not
        modelled: they never select a pod of the pod network, anything else is unknown.
        """
        form = peer.form
        if form == "networks":
            addresses = other.ips if isinstance(other, Pod) else (other,)
            for text in addresses:
                address = ipaddress.ip_address(text)
                if any(address.version == net.version and address in net for net in peer.networks):
                    return True
            return False
        pod_network = isinstance(other, Pod) and not other.host_network
        if form in ("nodes", "domainNames"):
            return False if pod_network else None
        if not isinstance(other, Pod) or not pod_network:
            return False
        assert peer.namespace_selector is not None
        if not peer.namespace_selector.matches(self.snapshot.namespace_labels(other.namespace)):
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

    @staticmethod
    def cluster_port_matches(
        entry: ClusterPort, port: int, protocol: Protocol, destination: Endpoint
    ) -> bool:
        """Whether an entry of a cluster rule's `protocols` admits `port`/`protocol`.

        A protocol entry matches its protocol and "DestinationPort" number, or a "PortRange ... an
        inclusive range of ports from the assigned Start value to End value". A
        "DestinationNamedPort selects a destination port on a pod based on the ContainerPort name",
        so it matches what that container port declares, on destination pods only.
        """
        if entry.name is not None:
            if not isinstance(destination, Pod):
                return False
            return any(
                cp.name == entry.name and cp.port == port and cp.protocol == protocol
                for cp in destination.ports
            )
        if entry.protocol != protocol or entry.port is None:
            return False
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

    # -- the cluster policy tiers ----------------------------------------------------------------

    def _cluster_rule_match(
        self,
        policy: ClusterNetworkPolicy,
        direction: Direction,
        index: int,
        rule: ClusterRule,
        other: Endpoint,
        port: int,
        protocol: Protocol,
        destination: Endpoint,
    ) -> tuple[RuleMatch | None, bool]:
        """(the match, whether an unmodelled peer might have matched instead)."""
        port_index: int | None = None
        if rule.ports:
            # "If unspecified, protocol-specific attributes will not be used to match traffic."
            port_index = next(
                (
                    i
                    for i, entry in enumerate(rule.ports)
                    if self.cluster_port_matches(entry, port, protocol, destination)
                ),
                None,
            )
            if port_index is None:
                return None, False
        # "If any element matches the source/destination ... then the specified action is applied."
        unsure = False
        for peer_index, peer in enumerate(rule.peers):
            hit = self.cluster_peer_matches(peer, other)
            if hit is None:
                unsure = True
            elif hit:
                return (
                    RuleMatch(
                        policy=policy.key,
                        direction=direction,
                        rule=index,
                        peer=peer_index,
                        port=port_index,
                        peer_text=peer.describe(),
                        port_text=rule.ports[port_index].describe()
                        if port_index is not None
                        else "",
                        tier=policy.tier,
                        action=policy.action_word(rule.action),
                        name=rule.name,
                        priority=None if policy.kind.startswith("Baseline") else policy.priority,
                    ),
                    False,
                )
        return None, unsure

    def tier_outcome(
        self,
        tier: Tier,
        direction: Direction,
        subject: Pod,
        other: Endpoint,
        port: int,
        protocol: Protocol,
        destination: Endpoint,
    ) -> TierOutcome:
        """The rule of one tier that takes effect for a direction of a flow, if any.

        "Policies with lower priority values have higher precedence"; within a policy "the relative
        precedence of rules ... will be determined by the order in which the rule is written". "If
        two (or more) policies in the same tier with the same priority could match a connection,
        then the implementation can apply any of the matching policies": when they disagree, the
        verdict is incomplete.
        """
        cache_key = (
            tier,
            subject.namespace,
            frozenset(subject.labels.items()),
            subject.host_network,
        )
        subjects = self._subjects.get(cache_key)
        if subjects is None:
            subjects = [p for p in self._tiers.get(tier, ()) if self.cluster_subject(p, subject)]
            self._subjects[cache_key] = subjects
        incomplete: list[str] = []
        group: list[RuleMatch] = []
        group_order: tuple[int, int] | None = None
        for policy in subjects:
            if group and policy.order != group_order:
                break  # a decision was found at a higher precedence
            rules = policy.ingress if direction == "ingress" else policy.egress
            for index, rule in enumerate(rules):
                match, unsure = self._cluster_rule_match(
                    policy, direction, index, rule, other, port, protocol, destination
                )
                if unsure:
                    incomplete.append(
                        f"{tier} tier: {policy.key} {direction}[{index}] has a peer flowproof "
                        f"does not model (nodes, domainNames) that may match "
                        f"{endpoint_name(other)}"
                    )
                if match is not None:
                    group.append(match)
                    group_order = policy.order
                    break
        keys = tuple(p.key for p in subjects if (p.ingress if direction == "ingress" else p.egress))
        if not group:
            return TierOutcome(None, keys, tuple(incomplete))
        actions = {m.action for m in group}
        if len(actions) > 1:
            said = ", ".join(f"{m.policy} says {m.action}" for m in group)
            incomplete.append(
                f"{tier} tier: policies of the same priority disagree ({said}); the API lets an "
                "implementation apply either"
            )
        return TierOutcome(group[0], keys, tuple(incomplete))

    # -- one direction ---------------------------------------------------------------------------

    def direction_verdict(
        self,
        direction: Direction,
        subject: Endpoint,
        other: Endpoint,
        port: int,
        protocol: Protocol,
        destination: Endpoint,
    ) -> DirectionVerdict:
        """The verdict of one direction: ingress at `subject` from `other`, or egress to it.

        Tiers in the API's order: "Admin tier, NetworkPolicy tier, Baseline tier"; "If a given
        connection wasn't allowed or denied by any of the tiers, the default kubernetes policy is
        applied, which says that all pods can communicate with each other."
        """
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
                f"{subject.key} uses the host network: no policy selects it",
            )
        passed: list[RuleMatch] = []
        incomplete: list[str] = []
        cluster_keys: list[str] = []
        admin = self.tier_outcome("Admin", direction, subject, other, port, protocol, destination)
        incomplete += admin.incomplete
        cluster_keys += admin.subjects
        if admin.match is not None:
            if admin.match.action != "Pass":
                return self._cluster_decision(
                    direction, subject, admin.match, cluster_keys, passed, incomplete
                )
            # "Pass: Skips all further ClusterNetworkPolicy rules in the current tier ... and
            # passes evaluation to the next tier."
            passed.append(admin.match)
        verdict = self._network_policy_verdict(
            direction, subject, other, port, protocol, destination
        )
        if verdict.isolated:
            # "v1.NetworkPolicy always makes a final decision for selected pods."
            return self._with(verdict, passed, cluster_keys, incomplete)
        baseline = self.tier_outcome(
            "Baseline", direction, subject, other, port, protocol, destination
        )
        incomplete += baseline.incomplete
        cluster_keys += baseline.subjects
        if baseline.match is not None:
            if baseline.match.action != "Pass":
                return self._cluster_decision(
                    direction, subject, baseline.match, cluster_keys, passed, incomplete
                )
            passed.append(baseline.match)
        return self._with(verdict, passed, cluster_keys, incomplete)

    @staticmethod
    def _with(
        verdict: DirectionVerdict,
        passed: Sequence[RuleMatch],
        cluster_keys: Sequence[str],
        incomplete: Sequence[str],
    ) -> DirectionVerdict:
        if not passed and not cluster_keys and not incomplete:
            return verdict
        reason = verdict.reason
        if passed:
            reason = "; ".join(m.describe() for m in passed) + "; then " + reason
        return DirectionVerdict(
            verdict.direction,
            verdict.applies,
            verdict.isolated,
            verdict.policies,
            verdict.allowed,
            verdict.allowed_by,
            reason,
            tier=verdict.tier,
            passed=tuple(passed),
            cluster_policies=tuple(dict.fromkeys(cluster_keys)),
            incomplete=tuple(dict.fromkeys(incomplete)),
        )

    @staticmethod
    def _cluster_decision(
        direction: Direction,
        subject: Pod,
        match: RuleMatch,
        cluster_keys: Sequence[str],
        passed: Sequence[RuleMatch],
        incomplete: Sequence[str],
    ) -> DirectionVerdict:
        # "Accept: Accepts the selected traffic ... No further ... rules will be processed."
        # "Deny: Drops the selected traffic. No further ... rules will be processed."
        allowed = accepts(match.action)
        word = "allowed" if allowed else "denied"
        steps = [m.describe() for m in passed] + [match.describe()]
        reason = f"{direction} of {subject.key} {word} by " + "; then ".join(steps)
        return DirectionVerdict(
            direction,
            True,
            False,
            (),
            allowed,
            (),
            reason,
            tier=match.tier,
            decided_by=match,
            passed=tuple(passed),
            cluster_policies=tuple(dict.fromkeys(cluster_keys)),
            incomplete=tuple(dict.fromkeys(incomplete)),
        )

    def _network_policy_verdict(
        self,
        direction: Direction,
        subject: Pod,
        other: Endpoint,
        port: int,
        protocol: Protocol,
        destination: Endpoint,
    ) -> DirectionVerdict:
        """The NetworkPolicy tier: isolation and the rules that allow."""
        what = "ingress" if direction == "ingress" else "egress"
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
            return DirectionVerdict(
                direction, True, True, names, True, tuple(matches), reason, tier="NetworkPolicy"
            )
        # "the pod is isolated for <direction> ... the only allowed connections are those allowed
        # by the <direction> list of some NetworkPolicy that applies to the pod".
        reason = (
            f"NetworkPolicy tier: {subject.key} is isolated for {what} by {', '.join(names)} and "
            f"no rule allows {'from' if direction == 'ingress' else 'to'} {endpoint_name(other)} "
            f"on {port}/{protocol}"
        )
        return DirectionVerdict(
            direction, True, True, names, False, (), reason, tier="NetworkPolicy"
        )

    # -- a flow ----------------------------------------------------------------------------------

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
        incomplete = (
            *self.unmodelled_reasons(source, destination),
            *egress.incomplete,
            *ingress.incomplete,
        )
        return Verdict(
            allowed=allowed,
            ingress=ingress,
            egress=egress,
            notes=notes,
            incomplete=tuple(dict.fromkeys(incomplete)),
        )

    def unmodelled_reasons(self, source: Endpoint, destination: Endpoint) -> tuple[str, ...]:
        """Why other plugins' policy objects make a flow's model unknown: objects that may select
        either pod (those of its namespace, and every cluster-scoped one)."""
        if not self._unmodelled:
            return ()
        sides: dict[tuple[UnmodelledPolicy, ...], list[str]] = {}
        for side, endpoint in (("source", source), ("destination", destination)):
            if not isinstance(endpoint, Pod):
                continue
            found = (*self._unmodelled.get("", ()), *self._unmodelled.get(endpoint.namespace, ()))
            if found:
                sides.setdefault(found, []).append(f"the {side} {endpoint.key}")
        reasons = []
        for found, which in sides.items():
            names = ", ".join(u.describe() for u in found[:MAX_LISTED])
            if len(found) > MAX_LISTED:
                names += f" and {len(found) - MAX_LISTED} more"
            reasons.append(
                f"{names} may select {' and '.join(which)}; flowproof does not model "
                f"{'this kind' if len({u.kind for u in found}) == 1 else 'these kinds'}"
            )
        return tuple(reasons)

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


def tier_order(
    policies: Sequence[ClusterNetworkPolicy],
) -> dict[Tier, list[ClusterNetworkPolicy]]:
    """The cluster policies of each tier in precedence order (priority, then name for stability)."""
    tiers: dict[Tier, list[ClusterNetworkPolicy]] = {"Admin": [], "Baseline": []}
    for policy in policies:
        tiers[policy.tier].append(policy)
    for items in tiers.values():
        items.sort(key=lambda p: (p.order, p.key))
    return tiers


def accepts(action: RuleAction | str) -> bool:
    """Whether a cluster rule's action lets traffic through (Accept; v1alpha1's Allow)."""
    return action in ("Accept", "Allow")
