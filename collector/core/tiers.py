"""The tiers of the Network Policy API over equivalence classes of pods (for collector.core.classes).

Owns what the class model needs of cluster policies and other plugins' policy objects: a per-pod
feature (`TierFeature`: two pods with the same feature are alike for every tier, as a subject and as
a peer) and, over the class representatives, the tier-ordered decision of every direction for one
port as K x K matrices (`TierModel`), with the cells whose model is unknown. Same semantics as
collector.core.engine (its `tier_order`), vectorised with numpy; pure, no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from collector.core.engine import accepts, tier_order
from collector.core.model import (
    PROTOCOLS,
    ClusterNetworkPolicy,
    ClusterPeer,
    ClusterPort,
    ClusterRule,
    Direction,
    Pod,
    Protocol,
    Snapshot,
    Tier,
)

BoolArray = npt.NDArray[np.bool_]
CodeArray = npt.NDArray[np.int8]

UNDECIDED, ACCEPT, DENY, PASS = 0, 1, 2, 3


def _code(action: str) -> int:
    if accepts(action):
        return ACCEPT
    return DENY if action == "Deny" else PASS


class TierFeature:
    """The per-pod feature of the tiers: equal for two pods that every cluster policy subject,
    every cluster policy peer, every named port they reference and every other plugin's object
    treats alike. Build once per snapshot; call with each pod."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.policies = tuple(snapshot.cluster_policies)
        self.peers = tuple(
            dict.fromkeys(
                peer
                for policy in self.policies
                for rule in policy.ingress + policy.egress
                for peer in rule.peers
            )
        )
        self.names = tuple(
            dict.fromkeys(
                port.name
                for policy in self.policies
                for rule in policy.ingress + policy.egress
                for port in rule.ports
                if port.name is not None
            )
        )
        self.unsure = any(not peer.modelled for peer in self.peers)
        self.has_networks = any(peer.form == "networks" for peer in self.peers)
        self.covered_namespaces = {u.namespace for u in snapshot.unmodelled}
        self.active = bool(self.policies or snapshot.unmodelled)
        self._selectors: dict[tuple[str, frozenset[tuple[str, str]], bool], tuple[bool, ...]] = {}

    def __call__(self, pod: Pod) -> Hashable:
        if not self.active:
            return ()
        key = (pod.namespace, frozenset(pod.labels.items()), pod.host_network)
        selected = self._selectors.get(key)
        if selected is None:
            selected = self._selector_bits(pod)
            self._selectors[key] = selected
        addresses = _addresses(pod) if self.has_networks else ()
        networks = tuple(
            _in_networks(peer, addresses) for peer in self.peers if peer.form == "networks"
        )
        named = tuple(
            next((cp.port, cp.protocol) for cp in pod.ports if cp.name == name)
            if any(cp.name == name for cp in pod.ports)
            else None
            for name in self.names
        )
        covered = "" in self.covered_namespaces or pod.namespace in self.covered_namespaces
        host = pod.host_network if self.unsure else False
        return (selected, networks, named, covered, host)

    def _selector_bits(self, pod: Pod) -> tuple[bool, ...]:
        labels = self.snapshot.namespace_labels(pod.namespace)
        subjects = tuple(_subject(policy, pod, labels) for policy in self.policies)
        peers = tuple(
            _selects(peer, pod, labels)
            for peer in self.peers
            if peer.form in ("pods", "namespaces")
        )
        return subjects + peers


def _subject(policy: ClusterNetworkPolicy, pod: Pod, ns_labels: Mapping[str, str]) -> bool:
    if pod.host_network or not policy.subject_namespaces.matches(ns_labels):
        return False
    return policy.subject_pods is None or policy.subject_pods.matches(pod.labels)


def _selects(peer: ClusterPeer, pod: Pod, ns_labels: Mapping[str, str]) -> bool:
    if pod.host_network or peer.namespace_selector is None:
        return False
    if not peer.namespace_selector.matches(ns_labels):
        return False
    return peer.pod_selector is None or peer.pod_selector.matches(pod.labels)


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _addresses(pod: Pod) -> tuple[Address, ...]:
    return tuple(ipaddress.ip_address(text) for text in pod.ips)


def _in_networks(peer: ClusterPeer, addresses: Sequence[Address]) -> bool:
    return any(
        address.version == net.version and address in net
        for address in addresses
        for net in peer.networks
    )


@dataclass(frozen=True)
class _Rule:
    action: int
    subjects: BoolArray  # per class: is the policy's subject
    peers: BoolArray  # per class (as the remote side): does some peer select it
    unsure: BoolArray  # per class: may a peer the model does not know (nodes, domains) select it
    ports: tuple[ClusterPort, ...]


class TierModel:
    """Cluster policy decisions between classes (their representatives `reps`), per direction."""

    def __init__(self, snapshot: Snapshot, reps: Sequence[Pod]) -> None:
        self.k = len(reps)
        self.reps = tuple(reps)
        self.active = bool(snapshot.cluster_policies or snapshot.unmodelled)
        ns_labels = [snapshot.namespace_labels(p.namespace) for p in reps]
        host = np.array([p.host_network for p in reps], dtype=np.bool_)
        covered_ns = {u.namespace for u in snapshot.unmodelled}
        self.covered = np.array(
            [bool(covered_ns) and ("" in covered_ns or p.namespace in covered_ns) for p in reps],
            dtype=np.bool_,
        )
        self._named: dict[tuple[str, Protocol], npt.NDArray[np.int64]] = {}
        self._addresses = [_addresses(p) for p in reps]
        self._peers: dict[ClusterPeer, BoolArray] = {}
        self.groups: dict[tuple[Tier, Direction], list[list[list[_Rule]]]] = {}
        for tier, policies in tier_order(snapshot.cluster_policies).items():
            for direction in ("ingress", "egress"):
                groups: list[list[list[_Rule]]] = []
                last: tuple[int, int] | None = None
                for policy in policies:
                    rules = policy.ingress if direction == "ingress" else policy.egress
                    if not rules:
                        continue
                    subjects = np.array(
                        [_subject(policy, p, ns_labels[i]) for i, p in enumerate(reps)],
                        dtype=np.bool_,
                    )
                    built = [self._rule(rule, subjects, reps, ns_labels, host) for rule in rules]
                    if policy.order != last:
                        groups.append([])
                        last = policy.order
                    groups[-1].append(built)
                self.groups[(tier, direction)] = groups

    def _rule(
        self,
        rule: ClusterRule,
        subjects: BoolArray,
        reps: Sequence[Pod],
        ns_labels: Sequence[Mapping[str, str]],
        host: BoolArray,
    ) -> _Rule:
        peers = np.zeros(self.k, dtype=np.bool_)
        unsure = np.zeros(self.k, dtype=np.bool_)
        for peer in rule.peers:
            if peer.form in ("nodes", "domainNames"):
                unsure |= host  # never a pod of the pod network; maybe an address, a node
                continue
            mask = self._peers.get(peer)
            if mask is None:
                if peer.form == "networks":
                    found = [_in_networks(peer, a) for a in self._addresses]
                else:
                    found = [_selects(peer, p, ns_labels[i]) for i, p in enumerate(reps)]
                mask = self._peers[peer] = np.array(found, dtype=np.bool_)
            peers |= mask
        for port in rule.ports:
            if port.name is not None:
                for protocol in PROTOCOLS:
                    self._named.setdefault(
                        (port.name, protocol),
                        np.array(
                            [
                                next(
                                    (
                                        cp.port
                                        for cp in p.ports
                                        if cp.name == port.name and cp.protocol == protocol
                                    ),
                                    -1,
                                )
                                for p in reps
                            ],
                            dtype=np.int64,
                        ),
                    )
        return _Rule(_code(rule.action), subjects, peers, unsure & ~peers, rule.ports)

    def _port_ok(self, rule: _Rule, port: int, protocol: Protocol) -> BoolArray:
        """Per class as the destination: does some entry of the rule's protocols admit it?"""
        if not rule.ports:
            return np.ones(self.k, dtype=np.bool_)
        ok = np.zeros(self.k, dtype=np.bool_)
        for entry in rule.ports:
            if entry.name is not None:
                ok |= self._named[(entry.name, protocol)] == port
            elif entry.protocol == protocol and entry.port is not None:
                end = entry.end_port if entry.end_port is not None else entry.port
                if entry.port <= port <= end:
                    return np.ones(self.k, dtype=np.bool_)
        return ok

    def decide(
        self, tier: Tier, direction: Direction, port: int, protocol: Protocol
    ) -> tuple[CodeArray, BoolArray]:
        """(decision, unknown) as [subject class, remote class] matrices of one tier.

        Groups are the policies of one precedence; in each, a policy's first matching rule
        decides for it, and policies of the group that disagree make the cell unknown. A rule
        whose unmodelled peer may select the remote, reached before any match, does too.
        """
        k = self.k
        decision = np.zeros((k, k), dtype=np.int8)
        unknown = np.zeros((k, k), dtype=np.bool_)
        for group in self.groups.get((tier, direction), ()):
            open_cells = decision == UNDECIDED
            if not open_cells.any():
                break
            group_action = np.zeros((k, k), dtype=np.int8)
            group_set = np.zeros((k, k), dtype=np.bool_)
            conflict = np.zeros((k, k), dtype=np.bool_)
            for rules in group:
                # Only the policy's subjects' rows can change: work on those rows alone.
                rows = np.flatnonzero(rules[0].subjects)
                if rows.size == 0:
                    continue
                action = np.zeros((rows.size, k), dtype=np.int8)
                done = np.zeros((rows.size, k), dtype=np.bool_)
                row_open = open_cells[rows]
                for rule in rules:
                    port_ok = self._port_ok(rule, port, protocol)
                    if direction == "ingress":  # the destination is the subject (the row)
                        active = port_ok[rows][:, None]
                        peers, unsure = rule.peers[None, :], rule.unsure[None, :]
                    else:  # the destination is the remote side (the column)
                        active = np.ones((rows.size, 1), dtype=np.bool_)
                        peers = (rule.peers & port_ok)[None, :]
                        unsure = (rule.unsure & port_ok)[None, :]
                    hit = active & peers & ~done
                    if rule.unsure.any():
                        unknown[rows] |= active & unsure & ~done & row_open
                    action[hit] = rule.action
                    done |= hit
                seen = group_set[rows]
                conflict[rows] |= done & seen & (action != group_action[rows])
                new = done & ~seen
                group_action[rows] = np.where(new, action, group_action[rows])
                group_set[rows] = seen | new
            cells = group_set & open_cells
            unknown |= conflict & cells
            decision[cells] = group_action[cells]
        return decision, unknown

    def direction(
        self,
        direction: Direction,
        port: int,
        protocol: Protocol,
        network_policies: BoolArray,
        isolated: BoolArray,
    ) -> tuple[BoolArray, BoolArray]:
        """(allowed, unknown) of one direction as [subject class, remote class] matrices.

        `network_policies[s, r]` is what the NetworkPolicy rules allow, `isolated[s]` whether
        NetworkPolicies isolate the subject: Admin, then the NetworkPolicy tier's final decision
        for isolated pods, then Baseline, then allow.
        """
        admin, admin_unknown = self.decide("Admin", direction, port, protocol)
        baseline, baseline_unknown = self.decide("Baseline", direction, port, protocol)
        reaches_np = (admin == UNDECIDED) | (admin == PASS)
        iso = isolated[:, None]
        allowed = np.where(
            admin == ACCEPT,
            True,
            np.where(admin == DENY, False, np.where(iso, network_policies, baseline != DENY)),
        )
        unknown = admin_unknown | (reaches_np & ~iso & baseline_unknown)
        return np.asarray(allowed, dtype=np.bool_), unknown

    def unmodelled(self) -> BoolArray:
        """[source, destination]: may another plugin's object select either pod."""
        return np.asarray(self.covered[:, None] | self.covered[None, :], dtype=np.bool_)


__all__ = ["TierFeature", "TierModel"]
