"""Probe domain types shared by agent and collector: assignments, results, responders, hellos.

Small frozen dataclasses in DESIGN.md's words (assignment, outcome, result). They are what both
services pass around; `flowproof.convert` alone turns them into protobuf messages and back. This
module must never do I/O or import protobuf, grpc or aiohttp.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

PROTOCOL_VERSION = 1
"""The contract version of proto/flowproof/v1 that both sides speak."""
STANDBY_REFUSAL = "standby: this collector is not the leader"
"""The details of the UNAVAILABLE status a standby collector (one not holding the Lease) ends an
agent's stream with at once: the agent tries again soon, without backing off further (through a
Service the next connection may reach the leader)."""

Protocol = Literal["TCP", "UDP", "SCTP"]


@functools.lru_cache(maxsize=4096)
def ip_version(address: str) -> int | None:
    """4 or 6 for an IP address literal, None for anything else (cached: probes repeat them)."""
    try:
        return ipaddress.ip_address(address).version
    except ValueError:
        return None


class Outcome(StrEnum):
    """The raw fate of a probe (DESIGN.md); the verdict is derived from it elsewhere."""

    CONNECTED = "CONNECTED"
    """A TCP/SCTP connection was made, a UDP nonce came back, a DNS server answered."""
    REFUSED = "REFUSED"
    """TCP reset or ICMP port unreachable: a deny only if something is known to listen."""
    TIMEOUT = "TIMEOUT"
    """No answer within the timeout: dropped."""
    UNREACHABLE = "UNREACHABLE"
    """ICMP admin-prohibited or host/net unreachable, or EPERM/EACCES from a local egress filter."""
    HTTP_STATUS = "HTTP_STATUS"
    """An HTTP response came back; `http_status` holds its code."""
    ERROR = "ERROR"
    """The probe could not be made (source pod gone, no SCTP in the kernel, bad assignment)."""


class ProbeKind(StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    HTTP = "HTTP"
    DNS = "DNS"
    SCTP = "SCTP"


class SourceKind(StrEnum):
    """Which kind of pod a probe is sent from."""

    POD = "POD"
    """A real running pod that the flow's `from` selects."""
    PROBE_POD = "PROBE_POD"
    """A sidecar-free probe pod carrying the selected namespace and labels."""


class ResponderState(StrEnum):
    OPENED = "OPENED"
    """The agent listens in the destination pod until the assignment ends."""
    LISTENER_PRESENT = "LISTENER_PRESENT"
    """The port was taken (EADDRINUSE): something already listens there."""
    FAILED = "FAILED"
    """The agent could not open a listener (pod gone, limit reached, ...)."""
    UNAVAILABLE = "UNAVAILABLE"
    """No agent answered for the destination's node in time."""


@dataclass(frozen=True)
class PodRef:
    """A pod by uid (what the agent resolves) with namespace and name for messages."""

    uid: str
    namespace: str = ""
    name: str = ""

    def describe(self) -> str:
        if self.namespace or self.name:
            return f"{self.namespace}/{self.name}"
        return f"uid {self.uid}"


@dataclass(frozen=True)
class ResponderSpec:
    """Open a responder in `pod` (on `node`) on the assignment's port and protocol first."""

    pod: PodRef
    node: str


@dataclass(frozen=True)
class Assignment:
    """One probe for the agent on `source_node`: from `source` to `destination_ip:port`.

    `http_path` is set for HTTP probes, `dns_query_name` for DNS probes (the DNS server is the
    destination). Assignment ids are unique and chosen by the collector; a retry is a new assignment
    with `attempt` > 1.
    """

    id: str
    source: PodRef
    source_node: str
    destination_ip: str
    port: int
    protocol: Protocol
    kind: ProbeKind
    timeout_seconds: float
    source_kind: SourceKind = SourceKind.POD
    destination: PodRef | None = None
    http_path: str | None = None
    http_host: str | None = None
    dns_query_name: str | None = None
    responder: ResponderSpec | None = None
    attempt: int = 1
    flow_key: str = ""

    def problems(self) -> list[str]:
        """Why the assignment cannot be probed as given; empty when it is well formed."""
        found: list[str] = []
        if not self.id:
            found.append("empty assignment id")
        if not self.source.uid:
            found.append("empty source pod uid")
        if ip_version(self.destination_ip) is None:
            found.append(f"destination {self.destination_ip!r} is not an IP address")
        if not 1 <= self.port <= 65535:
            found.append(f"port {self.port} is outside 1-65535")
        if not self.timeout_seconds > 0:
            found.append(f"timeout {self.timeout_seconds} s is not positive")
        expected = _KIND_PROTOCOL[self.kind]
        if self.protocol != expected:
            found.append(f"a {self.kind} probe needs protocol {expected}, not {self.protocol}")
        if self.kind is ProbeKind.HTTP and not (self.http_path or "/").startswith("/"):
            found.append(f"HTTP path {self.http_path!r} does not start with '/'")
        if self.kind is ProbeKind.DNS and not self.dns_query_name:
            found.append("a DNS probe needs a query name")
        return found

    def describe(self) -> str:
        target = self.destination.describe() if self.destination else self.destination_ip
        return f"{self.source.describe()} -> {target} {self.port}/{self.protocol} ({self.kind})"


_KIND_PROTOCOL: dict[ProbeKind, Protocol] = {
    ProbeKind.TCP: "TCP",
    ProbeKind.HTTP: "TCP",
    ProbeKind.UDP: "UDP",
    ProbeKind.DNS: "UDP",
    ProbeKind.SCTP: "SCTP",
}


@dataclass(frozen=True)
class ResponderRequest:
    """Ask the agent on the destination's node to listen in `pod` on `port`/`protocol`."""

    assignment_id: str
    pod: PodRef
    port: int
    protocol: Protocol
    ttl_seconds: float


@dataclass(frozen=True)
class ResponderReport:
    assignment_id: str
    state: ResponderState
    detail: str = ""


@dataclass(frozen=True)
class ProbeResult:
    """What a probe found. `id` is unique per result (chosen by the agent).

    `responder` is filled in by the collector's dispatcher from the destination agent's report, so a
    refusal can be read: it proves a deny only when something is known to listen.
    """

    id: str
    assignment: Assignment
    outcome: Outcome
    latency_seconds: float
    node: str
    started_at: float
    """Wall-clock start, seconds since the epoch."""
    detail: str = ""
    http_status: int | None = None
    responder: ResponderReport | None = None

    @property
    def assignment_id(self) -> str:
        return self.assignment.id


@dataclass(frozen=True)
class AgentCapabilities:
    sctp_supported: bool
    probe_kinds: tuple[ProbeKind, ...]
    responders_supported: bool
    max_in_flight: int


@dataclass(frozen=True)
class AgentHello:
    node_name: str
    agent_version: str
    protocol_version: int
    capabilities: AgentCapabilities
    instance_id: str
    known_assignment_ids: tuple[str, ...] = ()


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SPECIAL_RANGES: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(cidr), what)
    for cidr, what in (
        ("169.254.169.254/32", "the cloud metadata address"),
        ("fd00:ec2::254/128", "the cloud metadata address"),
        ("127.0.0.0/8", "the node's loopback"),
        ("::1/128", "the node's loopback"),
        ("169.254.0.0/16", "link-local"),
        ("fe80::/10", "link-local"),
        ("0.0.0.0/8", "'this network'"),
        ("::/128", "the unspecified address"),
        ("224.0.0.0/4", "multicast"),
        ("ff00::/8", "multicast"),
        ("240.0.0.0/4", "reserved"),
    )
)
"""Destinations an agent refuses unless an expectation declares a network inside them."""


@dataclass(frozen=True)
class DestinationPolicy:
    """Where an agent may send probes, told by the collector at hello and on every change.

    `networks` is everything the plan probes (the pods, the cluster DNS, declared externals);
    `declared` the networks expectations name themselves. A special range (SPECIAL_RANGES) is
    reachable only through a declared network lying within it: `cidr: 0.0.0.0/0` never opens the
    metadata address, `cidr: 169.254.169.254/32` does.
    """

    networks: tuple[str, ...] = ()
    declared: tuple[str, ...] = ()

    @functools.cached_property
    def _ranges(self) -> dict[int, tuple[list[int], list[int]]]:
        """Per IP version, the policy's networks merged into sorted (starts, ends) for bisect:
        a look-up costs log(networks), also with one /32 per pod of a large cluster."""
        spans: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for net in _parsed(self.networks):
            spans[net.version].append((int(net.network_address), int(net.broadcast_address)))
        merged: dict[int, tuple[list[int], list[int]]] = {}
        for version, items in spans.items():
            starts: list[int] = []
            ends: list[int] = []
            for start, end in sorted(items):
                if ends and start <= ends[-1] + 1:
                    ends[-1] = max(ends[-1], end)
                else:
                    starts.append(start)
                    ends.append(end)
            merged[version] = (starts, ends)
        return merged

    @functools.cached_property
    def _declared(self) -> tuple[IPNetwork, ...]:
        return _parsed(self.declared)

    def refusal(self, destination: str) -> str | None:
        """Why `destination` may not be probed under this policy; None when it may."""
        try:
            address = ipaddress.ip_address(destination)
        except ValueError:
            return f"{destination[:64]!r} is not an IP address"
        for special, what in SPECIAL_RANGES:
            if address.version == special.version and address in special:
                opened = any(
                    address in net and net.version == special.version and net.subnet_of(special)  # type: ignore[arg-type]
                    for net in self._declared
                )
                if not opened:
                    return (
                        f"{address} is {what}: probed only when an expectation declares it "
                        "(a cidr within that range)"
                    )
                break
        starts, ends = self._ranges[address.version]
        value = int(address)
        i = bisect.bisect_right(starts, value) - 1
        if i >= 0 and value <= ends[i]:
            return None
        return f"{address} is not in the destination policy the collector announced"


def _parsed(texts: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """The networks among `texts` (one that is not a network is ignored: it allows nothing)."""
    parsed: list[IPNetwork] = []
    for text in texts:
        try:
            parsed.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            continue
    return tuple(parsed)


@dataclass(frozen=True)
class HelloAck:
    protocol_version: int
    collector_version: str
    heartbeat_interval_seconds: float
    destination_policy: DestinationPolicy = DestinationPolicy()


@dataclass(frozen=True)
class Heartbeat:
    sequence: int
    sent_at: float
    assignments_in_flight: int
    results_buffered: int
    results_dropped_total: int
    responders_open: int
