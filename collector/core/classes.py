"""Whole-cluster reachability through equivalence classes of pods (the engine's fast path).

Two pods that every policy selector, every peer and every ipBlock treats alike, and whose container
ports carry the same referenced names, get the same verdict towards any third pod. Such pods form
one class. The verdicts are computed once per pair of classes as boolean matrix products (numpy), and
counts are weighted by class sizes. The tiers of cluster policies (and other plugins' objects) are
collector.core.tiers': one more per-pod feature, and a tier-ordered combination in
`allowed_matrix`. Same semantics as `collector.core.engine`; pure, no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from collector.core.model import LabelSelector, Peer, Pod, Protocol, Snapshot
from collector.core.tiers import TierFeature, TierModel

BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Counts:
    """Allowed and denied ordered pod pairs (self pairs included) on one port."""

    allowed: int
    denied: int
    classes: int
    pods: int
    unknown: int = 0  # pairs whose model is unknown (counted in allowed or denied as modelled)


@dataclass(frozen=True)
class _RuleRow:
    policy: int
    peers: tuple[int, ...] | None  # peer column indices; None = every peer
    ports: tuple[tuple[Protocol, int | str | None, int | None], ...]  # empty = every port


class ClassModel:
    """Pods grouped into classes, with everything a port query needs precomputed."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        pods = snapshot.pods
        policies = snapshot.policies
        self.pod_count = len(pods)

        # Distinct selectors, label sets and namespaces, so each selector runs once per label set.
        pod_selectors: dict[LabelSelector, int] = {}
        ns_selectors: dict[LabelSelector, int] = {}
        peers: dict[tuple[str | None, Peer], int] = {}
        ip_blocks: dict[Peer, int] = {}

        def pod_sel(sel: LabelSelector) -> int:
            return pod_selectors.setdefault(sel, len(pod_selectors))

        def ns_sel(sel: LabelSelector) -> int:
            return ns_selectors.setdefault(sel, len(ns_selectors))

        policy_sel = [pod_sel(p.pod_selector) for p in policies]
        rules_in: list[_RuleRow] = []
        rules_eg: list[_RuleRow] = []
        named: dict[tuple[str, Protocol], int] = {}
        for pi, policy in enumerate(policies):
            for direction, rules, out in (
                ("ingress", policy.ingress, rules_in),
                ("egress", policy.egress, rules_eg),
            ):
                if direction not in policy.policy_types:
                    continue
                for rule in rules:
                    cols: list[int] = []
                    for peer in rule.peers:
                        if peer.ip_block is not None:
                            ip_blocks.setdefault(peer, len(ip_blocks))
                            key: tuple[str | None, Peer] = (None, peer)
                        else:
                            if peer.pod_selector is not None:
                                pod_sel(peer.pod_selector)
                            if peer.namespace_selector is not None:
                                ns_sel(peer.namespace_selector)
                            scope = policy.namespace if peer.namespace_selector is None else None
                            key = (scope, peer)
                        cols.append(peers.setdefault(key, len(peers)))
                    ports = tuple((e.protocol, e.port, e.end_port) for e in rule.ports)
                    for protocol, port, _ in ports:
                        if isinstance(port, str):
                            named.setdefault((port, protocol), len(named))
                    out.append(_RuleRow(pi, tuple(cols) if rule.peers else None, ports))
        self.rules_in = rules_in
        self.rules_eg = rules_eg
        self.named = named

        # Per pod: namespace, label-set and named-port indices; ipBlock membership.
        namespaces: dict[str, int] = {}
        label_sets: dict[frozenset[tuple[str, str]], int] = {}
        label_list: list[dict[str, str]] = []
        ns_idx = np.empty(len(pods), dtype=np.int64)
        ls_idx = np.empty(len(pods), dtype=np.int64)
        host = np.zeros(len(pods), dtype=np.bool_)
        named_ports = np.full((len(pods), max(len(named), 1)), -1, dtype=np.int64)
        for i, pod in enumerate(pods):
            ns_idx[i] = namespaces.setdefault(pod.namespace, len(namespaces))
            key_ls = frozenset(pod.labels.items())
            if key_ls not in label_sets:
                label_sets[key_ls] = len(label_list)
                label_list.append(dict(pod.labels))
            ls_idx[i] = label_sets[key_ls]
            host[i] = pod.host_network
            for cp in pod.ports:
                col = named.get((cp.name, cp.protocol)) if cp.name else None
                if col is not None and named_ports[i, col] < 0:
                    named_ports[i, col] = cp.port

        ns_names = list(namespaces)
        pod_sel_match = np.array(
            [[sel.matches(labels) for sel in pod_selectors] for labels in label_list],
            dtype=np.bool_,
        ).reshape(len(label_list), len(pod_selectors))
        ns_sel_match = np.array(
            [
                [sel.matches(snapshot.namespace_labels(name)) for sel in ns_selectors]
                for name in ns_names
            ],
            dtype=np.bool_,
        ).reshape(len(ns_names), len(ns_selectors))

        # Columns of the class signature: policies selecting the pod, peers matching it, names.
        selected = np.zeros((len(pods), len(policies)), dtype=np.bool_)
        for pi, policy in enumerate(policies):
            ns = namespaces.get(policy.namespace)
            if ns is None:
                continue
            selected[:, pi] = (ns_idx == ns) & pod_sel_match[ls_idx, policy_sel[pi]] & ~host
        block_match = _ip_block_matrix(pods, list(ip_blocks))
        peer_match = np.zeros((len(pods), len(peers)), dtype=np.bool_)
        for (scope, peer), col in peers.items():
            if peer.ip_block is not None:
                peer_match[:, col] = block_match[:, ip_blocks[peer]]
                continue
            match = ~host
            if scope is not None:
                ns = namespaces.get(scope)
                match = match & (ns_idx == ns) if ns is not None else np.zeros_like(match)
            if peer.namespace_selector is not None:
                match = match & ns_sel_match[ns_idx, ns_selectors[peer.namespace_selector]]
            if peer.pod_selector is not None:
                match = match & pod_sel_match[ls_idx, pod_selectors[peer.pod_selector]]
            peer_match[:, col] = match

        signature = np.concatenate(
            [
                selected.view(np.uint8),
                peer_match.view(np.uint8),
                named_ports[:, : len(named)],
                _tier_column(snapshot, pods),
            ],
            axis=1,
        ).astype(np.int64)
        if len(pods):
            _, first, inverse, sizes = np.unique(
                signature, axis=0, return_index=True, return_inverse=True, return_counts=True
            )
        else:
            first = inverse = sizes = np.zeros(0, dtype=np.int64)
        self.class_of = inverse.reshape(-1)
        self.sizes = sizes.astype(np.float64)
        self.selected = selected[first]
        self.peer_match = peer_match[first]
        self.named_ports = named_ports[first]
        self.policies = policies
        self.classes = len(first)
        self._tiers = TierModel(snapshot, [pods[int(i)] for i in first])

    def representative(self, cls: int) -> Pod:
        return self.snapshot.pods[int(np.flatnonzero(self.class_of == cls)[0])]

    def _port_ok(self, row: _RuleRow, port: int, protocol: Protocol) -> BoolArray:
        """For each class as the destination: does some port entry of the rule admit the port?"""
        if not row.ports:
            return np.ones(self.classes, dtype=np.bool_)
        ok = np.zeros(self.classes, dtype=np.bool_)
        for proto, entry, end in row.ports:
            if proto != protocol:
                continue
            if entry is None:
                return np.ones(self.classes, dtype=np.bool_)
            if isinstance(entry, str):
                ok |= self.named_ports[:, self.named[(entry, proto)]] == port
            elif (end is None and entry == port) or (end is not None and entry <= port <= end):
                return np.ones(self.classes, dtype=np.bool_)
        return ok

    def _peers(self, row: _RuleRow) -> BoolArray:
        if row.peers is None:
            return np.ones(self.classes, dtype=np.bool_)
        return np.asarray(self.peer_match[:, list(row.peers)].any(axis=1), dtype=np.bool_)

    def allowed_matrix(self, port: int, protocol: Protocol) -> BoolArray:
        """allowed[s, d]: may a pod of class s reach a pod of class d (self pairs aside)."""
        return self._matrices(port, protocol)[0]

    def unknown_matrix(self, port: int, protocol: Protocol) -> BoolArray:
        """unknown[s, d]: is the model unknown for a pod of class s to a pod of class d."""
        return self._matrices(port, protocol)[1]

    def _matrices(self, port: int, protocol: Protocol) -> tuple[BoolArray, BoolArray]:
        """(allowed, unknown) as [source class, destination class] matrices."""
        k = self.classes
        iso_in = self._isolated("ingress")
        iso_eg = self._isolated("egress")
        # ingress[d, s] = not isolated(d) or some rule of a policy selecting d admits (s, port).
        sel_rules = np.zeros((k, len(self.rules_in)), dtype=np.float32)
        peers_rules = np.zeros((len(self.rules_in), k), dtype=np.float32)
        for j, row in enumerate(self.rules_in):
            sel_rules[:, j] = self.selected[:, row.policy] & self._port_ok(row, port, protocol)
            peers_rules[j] = self._peers(row)
        ingress = (sel_rules @ peers_rules) > 0
        # egress[s, d] = not isolated(s) or some rule of a policy selecting s admits (d, port).
        sel_rules = np.zeros((k, len(self.rules_eg)), dtype=np.float32)
        peers_rules = np.zeros((len(self.rules_eg), k), dtype=np.float32)
        for j, row in enumerate(self.rules_eg):
            sel_rules[:, j] = self.selected[:, row.policy]
            peers_rules[j] = self._peers(row) & self._port_ok(row, port, protocol)
        egress = (sel_rules @ peers_rules) > 0
        if not self._tiers.active:
            ingress |= ~iso_in[:, None]
            egress |= ~iso_eg[:, None]
            unknown = np.zeros((k, k), dtype=np.bool_)
            return np.asarray(egress & ingress.T, dtype=np.bool_), unknown
        return _tiered(self._tiers, port, protocol, ingress, iso_in, egress, iso_eg)

    def _isolated(self, direction: str) -> BoolArray:
        cols = [i for i, p in enumerate(self.policies) if direction in p.policy_types]
        if not cols:
            return np.zeros(self.classes, dtype=np.bool_)
        return np.asarray(self.selected[:, cols].any(axis=1), dtype=np.bool_)

    def counts(self, port: int, protocol: Protocol) -> Counts:
        allowed_matrix, unknown_matrix = self._matrices(port, protocol)
        allowed = allowed_matrix.astype(np.float64)
        sizes = self.sizes
        total = float(sizes @ allowed @ sizes)
        unknown = round(float(sizes @ unknown_matrix.astype(np.float64) @ sizes))
        # Self pairs: a pod cannot block access to itself, whatever its class's verdict says.
        diagonal = np.diagonal(allowed)
        total += float(sizes.sum() - (sizes * diagonal).sum())
        n = self.pod_count
        allowed_pairs = round(total)
        return Counts(allowed_pairs, n * n - allowed_pairs, self.classes, n, unknown)


# --- the tiers (collector.core.tiers) ----------------------------------------------------------


def _tier_column(snapshot: Snapshot, pods: Sequence[Pod]) -> npt.NDArray[np.int64]:
    """One signature column: pods with equal tier features share an id (zeros without tiers)."""
    feature = TierFeature(snapshot)
    ids: dict[object, int] = {}
    return np.array(
        [[ids.setdefault(feature(pod), len(ids))] for pod in pods], dtype=np.int64
    ).reshape(len(pods), 1)


def _tiered(
    tiers: TierModel,
    port: int,
    protocol: Protocol,
    ingress: BoolArray,
    iso_in: BoolArray,
    egress: BoolArray,
    iso_eg: BoolArray,
) -> tuple[BoolArray, BoolArray]:
    """(allowed, unknown) [source, destination] with the tiers around the NetworkPolicy tier;
    `ingress[d, s]` and `egress[s, d]` are what NetworkPolicy rules allow."""
    ingress_allowed, ingress_unknown = tiers.direction("ingress", port, protocol, ingress, iso_in)
    egress_allowed, egress_unknown = tiers.direction("egress", port, protocol, egress, iso_eg)
    allowed = egress_allowed & ingress_allowed.T
    unknown = egress_unknown | ingress_unknown.T | tiers.unmodelled()
    return np.asarray(allowed, dtype=np.bool_), np.asarray(unknown, dtype=np.bool_)


def _ip_block_matrix(pods: Sequence[Pod], blocks: Sequence[Peer]) -> BoolArray:
    """match[pod, block]: does any IP of the pod fall in the block (and outside its excepts)."""
    out = np.zeros((len(pods), len(blocks)), dtype=np.bool_)
    if not blocks:
        return out
    for family, width, dtype in ((4, 32, np.uint64), (6, 128, object)):
        rows: list[int] = []
        values: list[int] = []
        for i, pod in enumerate(pods):
            for ip in pod.ips:
                addr = ipaddress.ip_address(ip)
                if addr.version == family:
                    rows.append(i)
                    values.append(int(addr))
        if not rows:
            continue
        addrs = np.array(values, dtype=dtype)
        row_idx = np.array(rows, dtype=np.int64)
        for col, peer in enumerate(blocks):
            block = peer.ip_block
            assert block is not None
            if block.cidr.version != family:
                continue
            hit = _in_network(addrs, block.cidr, width, dtype)
            for ex in block.excepts:
                if ex.version == family:
                    hit &= ~_in_network(addrs, ex, width, dtype)
            np.logical_or.at(out[:, col], row_idx, hit)
    return out


def _in_network(
    addrs: npt.NDArray[np.generic],
    net: ipaddress.IPv4Network | ipaddress.IPv6Network,
    width: int,
    dtype: type,
) -> BoolArray:
    mask = ((1 << net.prefixlen) - 1) << (width - net.prefixlen)
    base = int(net.network_address)
    if dtype is object:
        return np.array([(int(a) & mask) == base for a in addrs], dtype=np.bool_)
    masked = np.bitwise_and(addrs.astype(np.uint64), np.uint64(mask))
    return np.asarray(masked == np.uint64(base), dtype=np.bool_)


def reachability_counts(snapshot: Snapshot, port: int, protocol: Protocol) -> Counts:
    """Allowed and denied ordered pod pairs on one port, computed over classes of pods."""
    return ClassModel(snapshot).counts(port, protocol)


__all__ = ["ClassModel", "Counts", "reachability_counts"]
