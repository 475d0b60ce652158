"""Fuzzing the handlers of the agent–collector stream, both sides, with hypothesis.

Each side's real handler coroutine reads a stream of messages: the dispatcher's `_read` (what it
runs for every agent stream once the hello is in) and the agent's `CollectorLink._read` (what it
runs for its stream to the collector). The messages are built from the contract with any field
value (ids of any text and length, enum numbers outside the enums, timestamps and durations far
out of range, made-up seals, networks that are no networks), or parsed from random bytes. Whatever
comes, a handler never raises anything but the stream's own end (the agent's StreamBroken), the
dispatcher delivers nothing it did not seal, and the agent sends no probe outside its destination
policy: with no pod found on this "node", every accepted assignment ends in an ERROR result.
Bounded for CI (a few seconds); FLOWPROOF_FUZZ_EXAMPLES raises the count locally.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.netns import NetnsSockets
from agent.probing import Prober
from agent.resolving import PodResolver
from agent.responders import Responders
from agent.settings import AgentSettings
from agent.streaming import CollectorLink, StreamBroken
from collector.dispatching import Dispatcher, _Session
from flowproof import convert
from flowproof.probes import (
    AgentCapabilities,
    AgentHello,
    DestinationPolicy,
    ProbeKind,
    ProbeResult,
)
from flowproof.v1 import agent_pb2 as pb
from tests.support.tls import server_tls

EXAMPLES = int(os.environ.get("FLOWPROOF_FUZZ_EXAMPLES", "80"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize="FLOWPROOF_FUZZ_EXAMPLES" not in os.environ,
)

texts = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        ["", "node-1", "10.244.1.5", "169.254.169.254", "::1", "a" * 300, "\n", "é\x00"]
    ),
)
u32 = st.integers(min_value=0, max_value=2**32 - 1)
enum_numbers = st.integers(min_value=-5, max_value=20)  # in and out of every enum
seconds = st.integers(min_value=-(2**40), max_value=2**40)


@st.composite
def pod_refs(draw: st.DrawFn) -> pb.PodRef:
    return pb.PodRef(uid=draw(texts), namespace=draw(texts), name=draw(texts))


@st.composite
def assignments(draw: st.DrawFn) -> pb.Assignment:
    msg = pb.Assignment(
        id=draw(texts),
        source=draw(pod_refs()),
        source_node=draw(st.sampled_from(["node-f", "node-x", ""])),
        source_kind=draw(enum_numbers),
        destination_ip=draw(texts),
        port=draw(u32),
        protocol=draw(enum_numbers),
        attempt=draw(u32),
        flow_key=draw(texts),
    )
    msg.timeout.seconds = draw(st.integers(-100, 10**6))
    msg.timeout.nanos = draw(st.integers(-999_999_999, 999_999_999))
    probe = draw(st.sampled_from(["tcp", "udp", "http", "dns", "sctp", None]))
    if probe == "http":
        msg.http.path = draw(texts)
        msg.http.host = draw(texts)
    elif probe == "dns":
        msg.dns.query_name = draw(texts)
    elif probe is not None:
        getattr(msg, probe).SetInParent()
    if draw(st.booleans()):
        msg.destination.CopyFrom(draw(pod_refs()))
    if draw(st.booleans()):
        msg.responder.pod.CopyFrom(draw(pod_refs()))
        msg.responder.node_name = draw(texts)
    if draw(st.booleans()):
        msg.seal.issued_at.seconds = draw(seconds)
        msg.seal.mac = draw(st.binary(max_size=40))
    return msg


@st.composite
def results(draw: st.DrawFn) -> pb.ProbeResult:
    msg = pb.ProbeResult(
        id=draw(texts),
        assignment=draw(assignments()),
        outcome=draw(enum_numbers),
        detail=draw(texts),
        http_status=draw(u32),
        node_name=draw(texts),
    )
    msg.latency.seconds = draw(seconds)
    msg.started_at.seconds = draw(seconds)
    return msg


@st.composite
def agent_messages(draw: st.DrawFn) -> pb.AgentMessage:
    body = draw(st.sampled_from(["results", "heartbeat", "reports", "hello", "bytes", "empty"]))
    if body == "results":
        return pb.AgentMessage(
            results=pb.ResultBatch(results=draw(st.lists(results(), max_size=5)))
        )
    if body == "heartbeat":
        beat = pb.Heartbeat(
            sequence=draw(st.integers(0, 2**64 - 1)),
            results_dropped_total=draw(st.integers(0, 2**64 - 1)),
        )
        beat.sent_at.seconds = draw(seconds)
        return pb.AgentMessage(heartbeat=beat)
    if body == "reports":
        reports = [
            pb.ResponderReport(
                assignment_id=draw(texts), state=draw(enum_numbers), detail=draw(texts)
            )
            for _ in range(draw(st.integers(0, 3)))
        ]
        return pb.AgentMessage(responder_reports=pb.ResponderReportBatch(reports=reports))
    if body == "hello":  # a second hello on an open stream
        return pb.AgentMessage(hello=pb.AgentHello(node_name=draw(texts)))
    if body == "bytes":
        try:
            return pb.AgentMessage.FromString(draw(st.binary(max_size=200)))
        except Exception:  # not a message at all: the gRPC layer would refuse it
            return pb.AgentMessage()
    return pb.AgentMessage()


async def feed(messages: list[Any]) -> AsyncIterator[Any]:
    for message in messages:
        yield message


HELLO = AgentHello("node-f", "fuzz", 1, AgentCapabilities(False, (ProbeKind.TCP,), False, 10), "i")


@FUZZ
@given(st.lists(agent_messages(), max_size=8))
def test_the_dispatcher_survives_any_agent_stream(messages: list[pb.AgentMessage]) -> None:
    delivered: list[ProbeResult] = []

    async def run() -> None:
        dispatcher = Dispatcher(token="t", tls=server_tls(), on_result=delivered.append)
        session = _Session(
            hello=HELLO,
            peer="ipv4:127.0.0.1:1",
            connected_at=time.time(),
            last_seen=time.monotonic(),
            last_seen_at=time.time(),
            max_in_flight=10,
        )
        dispatcher._sessions[session.node] = session
        await dispatcher._read(session, feed(messages))
        # Whatever came, nothing is delivered that the dispatcher did not seal (it sealed none).
        assert dispatcher.delivered_total == 0
        # It answers with acks, and cancels for responders it never asked for; nothing else.
        assert {m.WhichOneof("body") for m in session.control} <= {"result_ack", "cancel"}

    asyncio.run(run())
    assert delivered == []


@FUZZ
@given(st.lists(agent_messages(), max_size=3))
def test_a_hello_of_any_shape_opens_a_session_or_is_refused(
    messages: list[pb.AgentMessage],
) -> None:
    for message in messages:
        if message.WhichOneof("body") != "hello":
            continue
        try:
            hello = convert.hello_from_proto(message.hello)
        except convert.ContractError:
            continue
        assert hello.node_name


@st.composite
def collector_messages(draw: st.DrawFn) -> pb.CollectorMessage:
    body = draw(st.sampled_from(["assignments", "responders", "cancel", "ack", "policy", "bytes"]))
    if body == "assignments":
        batch = draw(st.lists(assignments(), max_size=4))
        return pb.CollectorMessage(assignments=pb.AssignmentBatch(assignments=batch))
    if body == "responders":
        requests = []
        for _ in range(draw(st.integers(0, 2))):
            request = pb.ResponderRequest(
                assignment_id=draw(texts),
                pod=draw(pod_refs()),
                port=draw(u32),
                protocol=draw(enum_numbers),
            )
            request.ttl.seconds = draw(st.integers(-10, 10**6))
            requests.append(request)
        return pb.CollectorMessage(responder_requests=pb.ResponderRequestBatch(requests=requests))
    if body == "cancel":
        return pb.CollectorMessage(
            cancel=pb.Cancel(assignment_ids=draw(st.lists(texts, max_size=3)))
        )
    if body == "ack":
        return pb.CollectorMessage(
            result_ack=pb.ResultAck(result_ids=draw(st.lists(texts, max_size=3)))
        )
    if body == "policy":
        networks = draw(
            st.lists(
                st.one_of(
                    texts,
                    st.sampled_from(
                        ["0.0.0.0/0", "10.244.0.0/16", "::/0", "169.254.169.254/32", "x/99"]
                    ),
                ),
                max_size=4,
            )
        )
        return pb.CollectorMessage(
            destination_policy=pb.DestinationPolicy(networks=networks, declared=networks[:1])
        )
    try:
        return pb.CollectorMessage.FromString(draw(st.binary(max_size=200)))
    except Exception:
        return pb.CollectorMessage()


class Replay:
    """What CollectorLink._read reads from: the fuzz messages, then the end of the stream."""

    def __init__(self, messages: list[pb.CollectorMessage]) -> None:
        self._messages = list(messages)

    async def read(self) -> Any:
        await asyncio.sleep(0)
        return self._messages.pop(0) if self._messages else grpc.aio.EOF


@FUZZ
@given(st.lists(collector_messages(), max_size=8))
def test_the_agent_survives_any_collector_stream(messages: list[pb.CollectorMessage]) -> None:
    async def run() -> None:
        proc = tempfile.mkdtemp(prefix="fp-fuzz-proc-")  # no pod on this node: nothing is sent
        resolver = PodResolver(proc)
        sockets = NetnsSockets()
        settings_ = AgentSettings(
            node_name="node-f", collector_address="c:1", token="t", ca_file="x"
        )
        prober = Prober(
            node_name="node-f",
            resolver=resolver,
            sockets=sockets,
            max_concurrency=4,
            destination_rate_per_second=1000.0,
            destination_burst=1000,
            max_timeout_seconds=0.2,
            sctp_supported=False,
        )
        responders = Responders(
            resolver=resolver,
            sockets=sockets,
            max_open=4,
            max_lifetime_seconds=0.2,
            sctp_supported=False,
        )
        link = CollectorLink(
            settings=settings_,
            prober=prober,
            responders=responders,
            capabilities=AgentCapabilities(False, (ProbeKind.TCP,), True, 10),
            agent_version="fuzz",
            ca_certificates=b"",
            rng=random.Random(0),
        )
        link.destination_policy = DestinationPolicy(networks=("10.244.0.0/16",))
        stop = asyncio.Event()
        try:
            with pytest.raises(StreamBroken):
                await link._read(Replay(messages), stop)  # type: ignore[arg-type]
            # Every probe it started ends (no pod is found): wait for them, boundedly.
            for _ in range(200):
                if not link.in_flight:
                    break
                await asyncio.sleep(0.01)
            policy = link.destination_policy
            for rid in list(link.outbox._kept):
                kept = link.outbox._kept[rid]
                assert kept.outcome == pb.OUTCOME_ERROR, "nothing really probed here"
                if (
                    policy is not None
                    and policy.refusal(kept.assignment.destination_ip) is not None
                ):
                    assert "destination policy" in kept.detail or "malformed" in kept.detail
        finally:
            stop.set()
            await link._shutdown()
            sockets.close()
            shutil.rmtree(proc, ignore_errors=True)  # one per example: never left behind

    asyncio.run(run())
