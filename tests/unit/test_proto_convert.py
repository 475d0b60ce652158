"""flowproof.convert: domain types survive the trip through the contract; bad messages are refused."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from flowproof import convert
from flowproof.probes import (
    AgentCapabilities,
    AgentHello,
    Assignment,
    Heartbeat,
    HelloAck,
    Outcome,
    PodRef,
    ProbeKind,
    ProbeResult,
    ResponderReport,
    ResponderRequest,
    ResponderSpec,
    ResponderState,
    SourceKind,
)
from flowproof.v1 import agent_pb2 as pb

SRC = PodRef(uid="11111111-2222-3333-4444-555555555555", namespace="shop", name="frontend-0")
DST = PodRef(uid="66666666-7777-8888-9999-000000000000", namespace="shop", name="api-0")


def make_assignment(**overrides: Any) -> Assignment:
    fields: dict[str, Any] = {
        "id": "a1",
        "source": SRC,
        "source_node": "node-1",
        "destination_ip": "10.244.1.7",
        "port": 8080,
        "protocol": "TCP",
        "kind": ProbeKind.TCP,
        "timeout_seconds": 1.5,
    }
    fields.update(overrides)
    return Assignment(**fields)


@pytest.mark.parametrize(
    "assignment",
    [
        pytest.param(make_assignment(), id="a plain TCP probe"),
        pytest.param(
            make_assignment(kind=ProbeKind.HTTP, http_path="/healthz?full=1", http_host="api"),
            id="an HTTP probe keeps path, query and host",
        ),
        pytest.param(
            make_assignment(
                kind=ProbeKind.DNS,
                protocol="UDP",
                port=53,
                dns_query_name="api.shop.svc.cluster.local.",
            ),
            id="a DNS probe keeps its query name",
        ),
        pytest.param(make_assignment(kind=ProbeKind.UDP, protocol="UDP"), id="a UDP probe"),
        pytest.param(make_assignment(kind=ProbeKind.SCTP, protocol="SCTP"), id="an SCTP probe"),
        pytest.param(
            make_assignment(
                destination=DST,
                responder=ResponderSpec(pod=DST, node="node-2"),
                source_kind=SourceKind.PROBE_POD,
                attempt=2,
                flow_key="shop/frontend-to-api",
            ),
            id="responder, probe pod source, retry and flow key survive",
        ),
        pytest.param(
            make_assignment(destination_ip="fd00::7", timeout_seconds=0.25),
            id="an IPv6 destination and a sub-second timeout",
        ),
    ],
)
def test_assignment_round_trip(assignment: Assignment) -> None:
    wire = convert.assignment_to_proto(assignment).SerializeToString()
    assert convert.assignment_from_proto(pb.Assignment.FromString(wire)) == assignment


@pytest.mark.parametrize("outcome", list(Outcome), ids=lambda o: f"outcome {o}")
def test_every_outcome_round_trips(outcome: Outcome) -> None:
    result = ProbeResult(
        id="r1",
        assignment=make_assignment(),
        outcome=outcome,
        latency_seconds=0.000321,
        node="node-1",
        started_at=1_700_000_000.123456,
        detail="something",
        http_status=503 if outcome is Outcome.HTTP_STATUS else None,
    )
    back = convert.result_from_proto(
        pb.ProbeResult.FromString(convert.result_to_proto(result).SerializeToString())
    )
    assert back.started_at == pytest.approx(result.started_at, abs=1e-6)
    assert dataclasses.replace(back, started_at=result.started_at) == result


def test_responder_messages_round_trip() -> None:
    request = ResponderRequest(assignment_id="a1", pod=DST, port=5432, protocol="TCP",
                               ttl_seconds=12.5)  # fmt: skip
    assert convert.responder_request_from_proto(convert.responder_request_to_proto(request)) == (
        request
    )
    for state in ResponderState:
        report = ResponderReport(assignment_id="a1", state=state, detail="d")
        assert convert.responder_report_from_proto(convert.responder_report_to_proto(report)) == (
            report
        )


def test_session_messages_round_trip() -> None:
    hello = AgentHello(
        node_name="node-1",
        agent_version="0.1.0",
        protocol_version=1,
        capabilities=AgentCapabilities(
            sctp_supported=False,
            probe_kinds=(ProbeKind.TCP, ProbeKind.UDP, ProbeKind.HTTP, ProbeKind.DNS),
            responders_supported=True,
            max_in_flight=1024,
        ),
        instance_id="abc",
        known_assignment_ids=("a1", "a2"),
    )
    assert convert.hello_from_proto(convert.hello_to_proto(hello)) == hello
    ack = HelloAck(protocol_version=1, collector_version="0.1.0", heartbeat_interval_seconds=5.0)
    assert convert.hello_ack_from_proto(convert.hello_ack_to_proto(ack)) == ack
    beat = Heartbeat(sequence=3, sent_at=1_700_000_000.5, assignments_in_flight=7,
                     results_buffered=2, results_dropped_total=1, responders_open=4)  # fmt: skip
    assert convert.heartbeat_from_proto(convert.heartbeat_to_proto(beat)) == beat


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        pytest.param(lambda m: m.ClearField("probe"), "no probe kind set",
                     id="an assignment without a probe kind is refused"),
        pytest.param(lambda m: setattr(m, "protocol", pb.PROTOCOL_UNSPECIFIED),
                     "assignment.protocol", id="an unspecified protocol is refused"),
        pytest.param(lambda m: setattr(m, "source_kind", pb.SOURCE_KIND_UNSPECIFIED),
                     "assignment.source_kind", id="an unspecified source kind is refused"),
        pytest.param(lambda m: setattr(m, "id", ""), "assignment.id: empty",
                     id="an assignment without an id is refused"),
    ],
)  # fmt: skip
def test_malformed_assignments_are_refused(mutate: Any, message: str) -> None:
    msg = convert.assignment_to_proto(make_assignment())
    msg.tcp.SetInParent()
    mutate(msg)
    with pytest.raises(convert.ContractError, match=message):
        convert.assignment_from_proto(msg)


def test_a_result_with_an_unspecified_outcome_is_refused() -> None:
    msg = convert.result_to_proto(
        ProbeResult(
            id="r1",
            assignment=make_assignment(),
            outcome=Outcome.CONNECTED,
            latency_seconds=0,
            node="n",
            started_at=0,
        )
    )
    msg.outcome = pb.OUTCOME_UNSPECIFIED
    with pytest.raises(convert.ContractError, match="outcome"):
        convert.result_from_proto(msg)


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        pytest.param({"port": 0}, "port 0 is outside 1-65535", id="port zero"),
        pytest.param({"destination_ip": "api.shop"}, "is not an IP address",
                     id="a host name is not a destination"),
        pytest.param({"kind": ProbeKind.UDP}, "needs protocol UDP", id="kind and protocol disagree"),
        pytest.param({"kind": ProbeKind.DNS, "protocol": "UDP"}, "needs a query name",
                     id="a DNS probe without a name"),
        pytest.param({"timeout_seconds": 0}, "is not positive", id="a zero timeout"),
        pytest.param({"kind": ProbeKind.HTTP, "http_path": "healthz"}, "does not start with '/'",
                     id="an HTTP path without a slash"),
    ],
)  # fmt: skip
def test_assignment_problems_are_named(overrides: dict[str, Any], problem: str) -> None:
    problems = make_assignment(**overrides).problems()
    assert len(problems) == 1 and problem in problems[0], problems


def test_a_well_formed_assignment_has_no_problems() -> None:
    assert make_assignment().problems() == []
