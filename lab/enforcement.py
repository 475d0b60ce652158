"""Policies compiled into one nftables table per pod namespace: the lab's "network plugin".

Owns the lab's own reading of NetworkPolicy semantics and of the Network Policy API's tiers
(ClusterNetworkPolicy Admin rules, then NetworkPolicies, then Baseline rules, then allow), written
independently of the collector's engine (the lab is the reality the engine is checked against),
and the fault modes that make it deviate on purpose. Pure: it turns pods, namespaces, policies and
faults into nft text and never runs nft itself (see lab/system.py). `nodes` and `domainNames`
peers are not enforced (they match nothing here).
"""

from __future__ import annotations

import hashlib
import ipaddress
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from collector.core.model import (
    NAMESPACE_NAME_LABEL,
    ClusterNetworkPolicy,
    ClusterPort,
    ClusterRule,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyPort,
    Protocol,
    Rule,
)
from collector.core.resolving import DEFAULT_CLUSTER_DNS_IP
from lab.config import NFT_TABLE
from lab.state import Faults

ALL_PORTS = None  # a protocol with every port allowed
PortRanges = dict[Protocol, set[tuple[int, int]] | None]  # per protocol: port ranges, None = all


@dataclass(frozen=True)
class EnforcementInput:
    """Everything the rules depend on."""

    pods: Sequence[Pod]  # every lab pod, with its address in `ips`
    namespaces: Mapping[str, Mapping[str, str]]  # namespace name -> labels
    policies: Sequence[NetworkPolicy]
    faults: Faults = field(default_factory=Faults)
    cluster_policies: Sequence[ClusterNetworkPolicy] = ()
    dns_service_ip: str = DEFAULT_CLUSTER_DNS_IP
    dns_backends: Sequence[str] = ()  # addresses of the pods running the cluster DNS


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def transaction(body: str) -> str:
    """One `nft -f` file that replaces the pod's table atomically (create, delete, recreate)."""
    return f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n{body}"


def compile_rulesets(inp: EnforcementInput) -> dict[str, str]:
    """The table for every pod that has its own network namespace, by pod key."""
    compiler = _Compiler(inp)
    return {pod.key: compiler.table(pod) for pod in inp.pods if not pod.host_network and pod.ips}


def _quote(text: str) -> str:
    return '"' + text.replace('"', "'")[:120] + '"'


def _elements(items: Iterable[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def _port_text(ranges: set[tuple[int, int]]) -> str:
    return _elements(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in sorted(ranges))


def _l4_matches(ports: PortRanges | None) -> list[str]:
    """nft matches for the ports (`[""]` when every protocol and port is allowed)."""
    if ports is None:
        return [""]
    matches = []
    for protocol in sorted(ports):
        ranges = ports[protocol]
        proto = protocol.lower()
        matches.append(
            f"meta l4proto {proto}" if ranges is None else f"{proto} dport {_port_text(ranges)}"
        )
    return matches


class _Compiler:
    def __init__(self, inp: EnforcementInput) -> None:
        self.inp = inp
        self.faults = inp.faults
        ignored = set(inp.faults.ignore_policies)
        self.policies = [p for p in inp.policies if p.key not in ignored]
        self.cluster_policies = [p for p in inp.cluster_policies if p.key not in ignored]
        self.pods = [p for p in inp.pods if not p.host_network and p.ips]

    def namespace_labels(self, name: str) -> Mapping[str, str]:
        labels = self.inp.namespaces.get(name)
        return labels if labels is not None else {NAMESPACE_NAME_LABEL: name}

    # --- selection -------------------------------------------------------------------------------

    def selecting(self, pod: Pod, direction: str) -> list[NetworkPolicy]:
        """Policies that isolate `pod` for `direction`: same namespace, podSelector matches, and
        the direction is in policyTypes. hostNetwork pods are never selected."""
        if pod.host_network:
            return []
        return [
            p
            for p in self.policies
            if p.namespace == pod.namespace
            and direction in p.policy_types
            and p.pod_selector.matches(pod.labels)
        ]

    def peer_pods(self, policy: NetworkPolicy, peer: Peer) -> list[Pod]:
        """Pods a podSelector/namespaceSelector peer selects (hostNetwork pods never)."""
        result = []
        for pod in self.pods:
            if peer.namespace_selector is not None:
                if not peer.namespace_selector.matches(self.namespace_labels(pod.namespace)):
                    continue
            elif pod.namespace != policy.namespace:
                continue  # only a podSelector: pods of the policy's own namespace
            if peer.pod_selector is not None and not peer.pod_selector.matches(pod.labels):
                continue
            result.append(pod)
        return result

    # --- ports -----------------------------------------------------------------------------------

    def resolve_ports(self, ports: Sequence[PolicyPort], destination: Pod | None) -> PortRanges:
        """Port ranges per protocol; named ports resolve on `destination` (none: match nothing)."""
        result: PortRanges = {}
        for entry in ports:
            protocol = entry.protocol
            if entry.port is None:
                result[protocol] = ALL_PORTS
                continue
            if isinstance(entry.port, str):
                if self.faults.ignore_named_ports or destination is None:
                    continue
                number = destination.named_port(entry.port, protocol)
                if number is None:
                    continue
                span = (number, number)
            else:
                end = entry.end_port
                if end is None or self.faults.ignore_endport:
                    end = entry.port
                span = (entry.port, end)
            if protocol in result and result[protocol] is ALL_PORTS:
                continue
            existing = result.setdefault(protocol, set())
            assert existing is not None
            existing.add(span)
        return result

    # --- rules -----------------------------------------------------------------------------------

    def address_groups(
        self, policy: NetworkPolicy, rule: Rule, addr: str
    ) -> list[tuple[str, list[Pod]]]:
        """The rule's peers as (address match, pods at those addresses for egress named ports)."""
        groups: list[tuple[str, list[Pod]]] = []
        if not rule.peers:
            groups.append(("", list(self.pods)))
        pod_ips: set[str] = set()
        pod_peers: dict[str, Pod] = {}
        for peer in rule.peers:
            block = peer.ip_block
            if block is not None:
                if not isinstance(block.cidr, ipaddress.IPv4Network):
                    continue  # the lab has no IPv6 traffic
                match = f"ip {addr} {block.cidr}"
                excepts = [str(e) for e in block.excepts if isinstance(e, ipaddress.IPv4Network)]
                if excepts:
                    match += f" ip {addr} != {_elements(excepts)}"
                inside = [p for p in self.pods if block.contains(p.ips[0])]
                groups.append((match, inside))
                continue
            for pod in self.peer_pods(policy, peer):
                pod_ips.add(pod.ips[0])
                pod_peers[pod.key] = pod
        if pod_ips:
            groups.append(
                (
                    f"ip {addr} {_elements(sorted(pod_ips, key=ipaddress.ip_address))}",
                    list(pod_peers.values()),
                )
            )
        return groups

    def rule_lines(
        self, subject: Pod, policy: NetworkPolicy, rule: Rule, direction: str, index: int
    ) -> list[str]:
        comment = f"comment {_quote(f'{policy.key} {direction}[{index}]')}"
        groups = self.address_groups(policy, rule, "saddr" if direction == "ingress" else "daddr")
        lines: list[str] = []
        if not rule.ports:
            for match, _ in groups:
                lines.append(" ".join(filter(None, (match, "accept", comment))))
            return lines
        if direction == "ingress" or not any(isinstance(p.port, str) for p in rule.ports):
            ports = self.resolve_ports(rule.ports, subject if direction == "ingress" else None)
            for match, _ in groups:
                for l4 in _l4_matches(ports):
                    lines.append(" ".join(filter(None, (match, l4, "accept", comment))))
            return lines
        # Egress with named ports: numbers hold for every destination; a name resolves on each
        # destination pod, so destinations are grouped by what their names resolve to.
        numeric = [p for p in rule.ports if not isinstance(p.port, str)]
        named = [p for p in rule.ports if isinstance(p.port, str)]
        numeric_ports = self.resolve_ports(numeric, None)
        for match, destinations in groups:
            for l4 in _l4_matches(numeric_ports) if numeric_ports else []:
                lines.append(" ".join(filter(None, (match, l4, "accept", comment))))
            # The destinations are already inside the group's peers (and outside any except).
            by_ports: dict[str, tuple[PortRanges, list[str]]] = {}
            for pod in destinations:
                resolved = self.resolve_ports(named, pod)
                if not resolved:
                    continue
                text = repr(sorted((k, sorted(v or ())) for k, v in resolved.items()))
                by_ports.setdefault(text, (resolved, []))[1].append(pod.ips[0])
            for resolved, ips in by_ports.values():
                dest = f"ip daddr {_elements(sorted(ips, key=ipaddress.ip_address))}"
                for l4 in _l4_matches(resolved):
                    lines.append(" ".join(filter(None, (dest, l4, "accept", comment))))
        return lines

    # --- the cluster policy tiers -------------------------------------------------------------

    def cluster_subjects(self, pod: Pod, tier: str, direction: str) -> list[ClusterNetworkPolicy]:
        """The tier's policies whose subject is `pod` and that have rules for `direction`, in
        precedence order: lower priority first, a BaselineAdminNetworkPolicy after the rest,
        then by name. Host-network pods are never a subject."""
        if pod.host_network:
            return []
        labels = self.namespace_labels(pod.namespace)
        found = [
            p
            for p in self.cluster_policies
            if p.tier == tier
            and (p.ingress if direction == "ingress" else p.egress)
            and p.subject_namespaces.matches(labels)
            and (p.subject_pods is None or p.subject_pods.matches(pod.labels))
        ]
        return sorted(
            found, key=lambda p: (p.kind == "BaselineAdminNetworkPolicy", p.priority, p.key)
        )

    def cluster_peer_groups(self, rule: ClusterRule, addr: str) -> list[tuple[str, list[Pod]]]:
        """The rule's peers as (address match, the pods at those addresses)."""
        groups: list[tuple[str, list[Pod]]] = []
        selected: dict[str, Pod] = {}
        for peer in rule.peers:
            if peer.networks:
                v4 = [n for n in peer.networks if isinstance(n, ipaddress.IPv4Network)]
                if v4:
                    inside = [
                        p for p in self.pods if any(ipaddress.ip_address(p.ips[0]) in n for n in v4)
                    ]
                    groups.append((f"ip {addr} {_elements(str(n) for n in v4)}", inside))
                continue
            if peer.namespace_selector is None:
                continue  # nodes, domainNames: not enforced by the lab
            for pod in self.pods:
                if not peer.namespace_selector.matches(self.namespace_labels(pod.namespace)):
                    continue
                if peer.pod_selector is not None and not peer.pod_selector.matches(pod.labels):
                    continue
                selected[pod.key] = pod
        if selected:
            ips = sorted({p.ips[0] for p in selected.values()}, key=ipaddress.ip_address)
            groups.append((f"ip {addr} {_elements(ips)}", list(selected.values())))
        return groups

    def resolve_cluster_ports(
        self, ports: Sequence[ClusterPort], destination: Pod | None
    ) -> PortRanges:
        """Port ranges per protocol; a named port takes the protocol and number its container
        port declares on `destination` (none: it matches nothing)."""
        result: PortRanges = {}
        for entry in ports:
            spans: list[tuple[Protocol, tuple[int, int]]] = []
            if entry.name is not None:
                if self.faults.ignore_named_ports or destination is None:
                    continue
                spans = [
                    (cp.protocol, (cp.port, cp.port))
                    for cp in destination.ports
                    if cp.name == entry.name
                ]
            elif entry.protocol is not None and entry.port is not None:
                end = entry.end_port
                if end is None or self.faults.ignore_endport:
                    end = entry.port
                spans = [(entry.protocol, (entry.port, end))]
            for protocol, span in spans:
                existing = result.setdefault(protocol, set())
                assert existing is not None
                existing.add(span)
        return result

    def verdict_lines(
        self, match: str, action: str, tier: str, direction: str, comment: str
    ) -> list[str]:
        """nft rules that give a matched packet the rule's action."""
        if action == "Accept":
            return [" ".join(filter(None, (match, "accept", comment)))]
        if action == "Pass":
            # The Admin tier hands over to the NetworkPolicy tier; the Baseline tier to the
            # default, which allows.
            target = f"goto {direction}_rest" if tier == "Admin" else "accept"
            return [" ".join(filter(None, (match, target, comment)))]
        if self.faults.reject:
            return [
                " ".join(filter(None, (match, "meta l4proto tcp reject with tcp reset", comment))),
                " ".join(filter(None, (match, "reject with icmpx admin-prohibited", comment))),
            ]
        return [" ".join(filter(None, (match, "drop", comment)))]

    def cluster_rule_lines(
        self,
        subject: Pod,
        policy: ClusterNetworkPolicy,
        rule: ClusterRule,
        direction: str,
        index: int,
    ) -> list[str]:
        comment = (
            f"comment {_quote(f'{policy.tier} {policy.key} {direction}[{index}] {rule.action}')}"
        )
        groups = self.cluster_peer_groups(rule, "saddr" if direction == "ingress" else "daddr")
        lines: list[str] = []
        if not rule.ports:
            for match, _ in groups:
                lines += self.verdict_lines(match, rule.action, policy.tier, direction, comment)
            return lines
        named = [p for p in rule.ports if p.name is not None]
        numeric = self.resolve_cluster_ports([p for p in rule.ports if p.name is None], None)
        for match, destinations in groups:
            for l4 in _l4_matches(numeric) if numeric else []:
                lines += self.verdict_lines(
                    f"{match} {l4}", rule.action, policy.tier, direction, comment
                )
            if not named:
                continue
            if direction == "ingress":
                resolved = self.resolve_cluster_ports(named, subject)
                for l4 in _l4_matches(resolved) if resolved else []:
                    lines += self.verdict_lines(
                        f"{match} {l4}", rule.action, policy.tier, direction, comment
                    )
                continue
            # Egress: a name resolves on each destination pod of the group.
            for pod in destinations:
                resolved = self.resolve_cluster_ports(named, pod)
                for l4 in _l4_matches(resolved) if resolved else []:
                    dest = f"ip daddr {pod.ips[0]}"
                    lines += self.verdict_lines(
                        f"{dest} {l4}", rule.action, policy.tier, direction, comment
                    )
        return lines

    # --- chains ----------------------------------------------------------------------------------

    def network_policy_lines(self, pod: Pod, direction: str) -> list[str]:
        """The NetworkPolicy tier: the allowing rules then the isolation's deny; [] if the pod is
        not isolated for `direction`."""
        policies = self.selecting(pod, direction)
        if not policies:
            return []
        rules: list[str] = []
        for policy in sorted(policies, key=lambda p: p.key):
            policy_rules = policy.ingress if direction == "ingress" else policy.egress
            for i, rule in enumerate(policy_rules):
                rules.extend(self.rule_lines(pod, policy, rule, direction, i))
        if self.faults.reject:
            rules.append("meta l4proto tcp reject with tcp reset")
            rules.append("reject with icmpx admin-prohibited")
        else:
            rules.append("drop")
        return rules

    def chain(self, pod: Pod, direction: str) -> list[str]:
        policies = self.selecting(pod, direction)
        admin = self.cluster_subjects(pod, "Admin", direction)
        baseline = self.cluster_subjects(pod, "Baseline", direction)
        if not (policies or admin or baseline):
            return []
        hook = "input" if direction == "ingress" else "output"
        lo = 'iif "lo"' if direction == "ingress" else 'oif "lo"'
        names = ", ".join(
            [*(p.key for p in admin), *(p.key for p in policies), *(p.key for p in baseline)]
        )
        lines = [
            f"\tchain {direction} {{",
            f"\t\ttype filter hook {hook} priority filter; policy accept;",
            f"\t\tcomment {_quote(('isolated by ' if policies else 'selected by ') + names)}",
            "\t\tct state established,related accept",
            f"\t\t{lo} accept",
        ]
        admin_lines = [
            line
            for policy in admin
            for i, rule in enumerate(policy.ingress if direction == "ingress" else policy.egress)
            for line in self.cluster_rule_lines(pod, policy, rule, direction, i)
        ]
        # "v1.NetworkPolicy always makes a final decision for selected pods"; else the Baseline
        # tier, else the default (allow).
        rest = self.network_policy_lines(pod, direction) or [
            line
            for policy in baseline
            for i, rule in enumerate(policy.ingress if direction == "ingress" else policy.egress)
            for line in self.cluster_rule_lines(pod, policy, rule, direction, i)
        ]
        if not admin and not baseline:
            lines += [f"\t\t{line}" for line in _unique(rest)]
            lines.append("\t}")
            return lines
        lines += [f"\t\t{line}" for line in _unique(admin_lines)]
        lines.append(f"\t\tgoto {direction}_rest")
        lines.append("\t}")
        lines.append(f"\tchain {direction}_rest {{")
        lines += [f"\t\t{line}" for line in _unique(rest)]
        lines.append("\t}")
        return lines

    def dns_chain(self, pod: Pod) -> list[str]:
        backends = sorted(self.inp.dns_backends, key=ipaddress.ip_address)
        if not backends:
            return []
        # A fixed choice per pod keeps probes repeatable; every backend gets its share of pods.
        target = backends[zlib.crc32(pod.key.encode()) % len(backends)]
        service = self.inp.dns_service_ip
        return [
            "\tchain dns {",
            "\t\ttype nat hook output priority -100; policy accept;",
            f"\t\tip daddr {service} udp dport 53 dnat ip to {target}",
            f"\t\tip daddr {service} tcp dport 53 dnat ip to {target}",
            "\t}",
        ]

    def table(self, pod: Pod) -> str:
        lines = [f"table inet {NFT_TABLE} {{"]
        lines += self.dns_chain(pod)
        lines += self.chain(pod, "ingress")
        lines += self.chain(pod, "egress")
        lines.append("}")
        return "\n".join(lines) + "\n"


def _unique(lines: Iterable[str]) -> list[str]:
    """The lines in order without repeats (a repeat can never match: the first one did)."""
    return list(dict.fromkeys(lines))


def isolation(inp: EnforcementInput) -> dict[str, tuple[bool, bool]]:
    """(ingress isolated, egress isolated) per pod key, for `lab status`."""
    compiler = _Compiler(inp)
    return {
        pod.key: (bool(compiler.selecting(pod, "ingress")), bool(compiler.selecting(pod, "egress")))
        for pod in inp.pods
    }


def changed(desired: Mapping[str, str], applied: Mapping[str, str]) -> dict[str, str]:
    """The rulesets whose digest differs from what was applied last."""
    return {key: text for key, text in desired.items() if applied.get(key) != digest(text)}
