"""Probe domain types shared by agent and collector: assignments, results, responders, hellos.

Small frozen dataclasses in DESIGN.md's words (assignment, outcome, result). They are what both
services pass around; `flowproof.convert` alone turns them into protobuf messages and back. This
module must never do I/O or import protobuf, grpc or aiohttp.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

PROTOCOL_VERSION = 1
"""The contract version of proto/flowproof/v1 that both sides speak."""

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


@dataclass(frozen=True)
class HelloAck:
    protocol_version: int
    collector_version: str
    heartbeat_interval_seconds: float


@dataclass(frozen=True)
class Heartbeat:
    sequence: int
    sent_at: float
    assignments_in_flight: int
    results_buffered: int
    results_dropped_total: int
    responders_open: int
