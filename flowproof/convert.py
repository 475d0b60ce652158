"""The one border between the protobuf contract (flowproof.v1) and the probe domain types.

Every `*_to_proto` builds a message from a `flowproof.probes` type and every `*_from_proto` reads
one back, raising `ContractError` for a message the contract does not allow (an unspecified enum, a
missing probe kind). Nothing else in the agent or collector touches protobuf messages' fields; this
module must never do I/O.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from flowproof.probes import (
    AgentCapabilities,
    AgentHello,
    Assignment,
    DestinationPolicy,
    Heartbeat,
    HelloAck,
    Outcome,
    PodRef,
    ProbeKind,
    ProbeResult,
    Protocol,
    ResponderReport,
    ResponderRequest,
    ResponderSpec,
    ResponderState,
    SourceKind,
)
from flowproof.v1 import agent_pb2 as pb

K = TypeVar("K")
V = TypeVar("V")


class ContractError(ValueError):
    """A message that breaks the contract; says which field and why."""


_PROTOCOLS: dict[Protocol, pb.Protocol.ValueType] = {
    "TCP": pb.PROTOCOL_TCP,
    "UDP": pb.PROTOCOL_UDP,
    "SCTP": pb.PROTOCOL_SCTP,
}
_PROTOCOLS_BACK = {v: k for k, v in _PROTOCOLS.items()}

_KINDS: dict[ProbeKind, pb.ProbeKind.ValueType] = {
    ProbeKind.TCP: pb.PROBE_KIND_TCP,
    ProbeKind.UDP: pb.PROBE_KIND_UDP,
    ProbeKind.HTTP: pb.PROBE_KIND_HTTP,
    ProbeKind.DNS: pb.PROBE_KIND_DNS,
    ProbeKind.SCTP: pb.PROBE_KIND_SCTP,
}
_KINDS_BACK = {v: k for k, v in _KINDS.items()}

_SOURCE_KINDS: dict[SourceKind, pb.SourceKind.ValueType] = {
    SourceKind.POD: pb.SOURCE_KIND_POD,
    SourceKind.PROBE_POD: pb.SOURCE_KIND_PROBE_POD,
}
_SOURCE_KINDS_BACK = {v: k for k, v in _SOURCE_KINDS.items()}

_OUTCOMES: dict[Outcome, pb.Outcome.ValueType] = {
    Outcome.CONNECTED: pb.OUTCOME_CONNECTED,
    Outcome.REFUSED: pb.OUTCOME_REFUSED,
    Outcome.TIMEOUT: pb.OUTCOME_TIMEOUT,
    Outcome.UNREACHABLE: pb.OUTCOME_UNREACHABLE,
    Outcome.HTTP_STATUS: pb.OUTCOME_HTTP_STATUS,
    Outcome.ERROR: pb.OUTCOME_ERROR,
}
_OUTCOMES_BACK = {v: k for k, v in _OUTCOMES.items()}

_RESPONDER_STATES: dict[ResponderState, pb.ResponderState.ValueType] = {
    ResponderState.OPENED: pb.RESPONDER_STATE_OPENED,
    ResponderState.LISTENER_PRESENT: pb.RESPONDER_STATE_LISTENER_PRESENT,
    ResponderState.FAILED: pb.RESPONDER_STATE_FAILED,
    ResponderState.UNAVAILABLE: pb.RESPONDER_STATE_UNAVAILABLE,
}
_RESPONDER_STATES_BACK = {v: k for k, v in _RESPONDER_STATES.items()}


def _lookup(table: dict[K, V], key: K, field: str) -> V:
    try:
        return table[key]
    except KeyError:
        raise ContractError(f"{field}: unspecified or unknown value {key!r}") from None


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def _seconds(duration: Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def _timestamp(epoch_seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(epoch_seconds * 1e9))
    return ts


def _epoch(ts: Timestamp) -> float:
    return ts.ToNanoseconds() / 1e9


# --- pods and assignments ----------------------------------------------------------------------


def pod_to_proto(pod: PodRef) -> pb.PodRef:
    return pb.PodRef(uid=pod.uid, namespace=pod.namespace, name=pod.name)


def pod_from_proto(msg: pb.PodRef) -> PodRef:
    return PodRef(uid=msg.uid, namespace=msg.namespace, name=msg.name)


def assignment_to_proto(a: Assignment) -> pb.Assignment:
    msg = pb.Assignment(
        id=a.id,
        source=pod_to_proto(a.source),
        source_node=a.source_node,
        source_kind=_SOURCE_KINDS[a.source_kind],
        destination_ip=a.destination_ip,
        port=a.port,
        protocol=_PROTOCOLS[a.protocol],
        timeout=_duration(a.timeout_seconds),
        attempt=a.attempt,
        flow_key=a.flow_key,
    )
    if a.destination is not None:
        msg.destination.CopyFrom(pod_to_proto(a.destination))
    if a.responder is not None:
        msg.responder.CopyFrom(
            pb.ResponderSpec(pod=pod_to_proto(a.responder.pod), node_name=a.responder.node)
        )
    if a.kind is ProbeKind.TCP:
        msg.tcp.SetInParent()
    elif a.kind is ProbeKind.UDP:
        msg.udp.SetInParent()
    elif a.kind is ProbeKind.SCTP:
        msg.sctp.SetInParent()
    elif a.kind is ProbeKind.HTTP:
        msg.http.CopyFrom(pb.HttpProbe(path=a.http_path or "/", host=a.http_host or ""))
    else:
        msg.dns.CopyFrom(pb.DnsProbe(query_name=a.dns_query_name or ""))
    return msg


def assignment_from_proto(msg: pb.Assignment) -> Assignment:
    if not msg.id:
        raise ContractError("assignment.id: empty")
    which = msg.WhichOneof("probe")
    if which is None:
        raise ContractError(f"assignment {msg.id}: probe: no probe kind set")
    kind = ProbeKind[which.upper()]
    return Assignment(
        id=msg.id,
        source=pod_from_proto(msg.source),
        source_node=msg.source_node,
        source_kind=_lookup(_SOURCE_KINDS_BACK, msg.source_kind, "assignment.source_kind"),
        destination=pod_from_proto(msg.destination) if msg.HasField("destination") else None,
        destination_ip=msg.destination_ip,
        port=msg.port,
        protocol=_lookup(_PROTOCOLS_BACK, msg.protocol, "assignment.protocol"),
        kind=kind,
        timeout_seconds=_seconds(msg.timeout),
        http_path=(msg.http.path or "/") if kind is ProbeKind.HTTP else None,
        http_host=(msg.http.host or None) if kind is ProbeKind.HTTP else None,
        dns_query_name=msg.dns.query_name if kind is ProbeKind.DNS else None,
        responder=(
            ResponderSpec(pod=pod_from_proto(msg.responder.pod), node=msg.responder.node_name)
            if msg.HasField("responder")
            else None
        ),
        attempt=msg.attempt or 1,
        flow_key=msg.flow_key,
    )


# --- results -----------------------------------------------------------------------------------


def result_to_proto(r: ProbeResult, assignment_msg: pb.Assignment | None = None) -> pb.ProbeResult:
    """The agent's part of a result; `responder` is collector-side and not sent.

    `assignment_msg`, when given, is the message `r.assignment` was read from: it is echoed as is
    instead of being built again (the agent's hot path).
    """
    return pb.ProbeResult(
        id=r.id,
        assignment=assignment_msg
        if assignment_msg is not None
        else assignment_to_proto(r.assignment),
        outcome=_OUTCOMES[r.outcome],
        latency=_duration(r.latency_seconds),
        detail=r.detail,
        http_status=r.http_status or 0,
        node_name=r.node,
        started_at=_timestamp(r.started_at),
    )


def result_from_proto(msg: pb.ProbeResult) -> ProbeResult:
    if not msg.id:
        raise ContractError("result.id: empty")
    outcome = _lookup(_OUTCOMES_BACK, msg.outcome, f"result {msg.id}: outcome")
    return ProbeResult(
        id=msg.id,
        assignment=assignment_from_proto(msg.assignment),
        outcome=outcome,
        latency_seconds=_seconds(msg.latency),
        node=msg.node_name,
        started_at=_epoch(msg.started_at),
        detail=msg.detail,
        http_status=msg.http_status if outcome is Outcome.HTTP_STATUS else None,
    )


# --- responders --------------------------------------------------------------------------------


def responder_request_to_proto(r: ResponderRequest) -> pb.ResponderRequest:
    return pb.ResponderRequest(
        assignment_id=r.assignment_id,
        pod=pod_to_proto(r.pod),
        port=r.port,
        protocol=_PROTOCOLS[r.protocol],
        ttl=_duration(r.ttl_seconds),
    )


def responder_request_from_proto(msg: pb.ResponderRequest) -> ResponderRequest:
    if not msg.assignment_id:
        raise ContractError("responder_request.assignment_id: empty")
    return ResponderRequest(
        assignment_id=msg.assignment_id,
        pod=pod_from_proto(msg.pod),
        port=msg.port,
        protocol=_lookup(_PROTOCOLS_BACK, msg.protocol, "responder_request.protocol"),
        ttl_seconds=_seconds(msg.ttl),
    )


def responder_report_to_proto(r: ResponderReport) -> pb.ResponderReport:
    return pb.ResponderReport(
        assignment_id=r.assignment_id, state=_RESPONDER_STATES[r.state], detail=r.detail
    )


def responder_report_from_proto(msg: pb.ResponderReport) -> ResponderReport:
    return ResponderReport(
        assignment_id=msg.assignment_id,
        state=_lookup(_RESPONDER_STATES_BACK, msg.state, "responder_report.state"),
        detail=msg.detail,
    )


# --- session -----------------------------------------------------------------------------------


def hello_to_proto(h: AgentHello) -> pb.AgentHello:
    caps = h.capabilities
    return pb.AgentHello(
        node_name=h.node_name,
        agent_version=h.agent_version,
        protocol_version=h.protocol_version,
        instance_id=h.instance_id,
        known_assignment_ids=list(h.known_assignment_ids),
        capabilities=pb.Capabilities(
            sctp_supported=caps.sctp_supported,
            probe_kinds=[_KINDS[k] for k in caps.probe_kinds],
            responders_supported=caps.responders_supported,
            max_in_flight=caps.max_in_flight,
        ),
    )


def hello_from_proto(msg: pb.AgentHello) -> AgentHello:
    if not msg.node_name:
        raise ContractError("hello.node_name: empty")
    caps = msg.capabilities
    return AgentHello(
        node_name=msg.node_name,
        agent_version=msg.agent_version,
        protocol_version=msg.protocol_version,
        instance_id=msg.instance_id,
        known_assignment_ids=tuple(msg.known_assignment_ids),
        capabilities=AgentCapabilities(
            sctp_supported=caps.sctp_supported,
            probe_kinds=tuple(_KINDS_BACK[k] for k in caps.probe_kinds if k in _KINDS_BACK),
            responders_supported=caps.responders_supported,
            max_in_flight=caps.max_in_flight,
        ),
    )


def destination_policy_to_proto(p: DestinationPolicy) -> pb.DestinationPolicy:
    return pb.DestinationPolicy(networks=list(p.networks), declared=list(p.declared))


def destination_policy_from_proto(msg: pb.DestinationPolicy) -> DestinationPolicy:
    return DestinationPolicy(networks=tuple(msg.networks), declared=tuple(msg.declared))


def hello_ack_to_proto(a: HelloAck) -> pb.HelloAck:
    return pb.HelloAck(
        protocol_version=a.protocol_version,
        collector_version=a.collector_version,
        heartbeat_interval=_duration(a.heartbeat_interval_seconds),
        destination_policy=destination_policy_to_proto(a.destination_policy),
    )


def hello_ack_from_proto(msg: pb.HelloAck) -> HelloAck:
    return HelloAck(
        protocol_version=msg.protocol_version,
        collector_version=msg.collector_version,
        heartbeat_interval_seconds=_seconds(msg.heartbeat_interval),
        destination_policy=destination_policy_from_proto(msg.destination_policy),
    )


def heartbeat_to_proto(h: Heartbeat) -> pb.Heartbeat:
    return pb.Heartbeat(
        sequence=h.sequence,
        sent_at=_timestamp(h.sent_at),
        assignments_in_flight=h.assignments_in_flight,
        results_buffered=h.results_buffered,
        results_dropped_total=h.results_dropped_total,
        responders_open=h.responders_open,
    )


def heartbeat_from_proto(msg: pb.Heartbeat) -> Heartbeat:
    return Heartbeat(
        sequence=msg.sequence,
        sent_at=_epoch(msg.sent_at),
        assignments_in_flight=msg.assignments_in_flight,
        results_buffered=msg.results_buffered,
        results_dropped_total=msg.results_dropped_total,
        responders_open=msg.responders_open,
    )
