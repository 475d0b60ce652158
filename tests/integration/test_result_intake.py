"""Results cannot be forged or future-dated: the dispatcher accepts a result only for an assignment
it sealed and sent to that node's stream, once, and dates it on its own clock.

A real dispatcher (TLS, a real gRPC server on a loopback port) feeding the real collector loop on
the shop example's snapshot; the agent's side is spoken by hand, as a client holding the token
would: results for ids never issued, from another node, changed on the way, an hour in the
future, and after a restart of the collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from collector.core.changes import diff_snapshots
from collector.dispatching import Dispatcher
from collector.ledger import DeliveryLedger
from collector.loop import Collector
from collector.settings import CollectorSettings
from flowproof import convert
from flowproof.probes import (
    PROTOCOL_VERSION,
    AgentCapabilities,
    AgentHello,
    Assignment,
    Outcome,
    ProbeKind,
    ProbeResult,
)
from flowproof.v1 import agent_pb2 as pb
from flowproof.v1.agent_pb2_grpc import AgentServiceStub
from tests.e2e_support.samples import SAMPLE_SETTINGS, shop_snapshot
from tests.support.tls import ca_pem, server_tls

TOKEN = "intake-token"
KEY = b"k" * 32


@contextlib.asynccontextmanager
async def stream(port: int, node: str) -> AsyncIterator[Any]:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem())
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        call = AgentServiceStub(channel).Connect(metadata=(("authorization", f"Bearer {TOKEN}"),))
        caps = AgentCapabilities(
            False, (ProbeKind.TCP, ProbeKind.HTTP, ProbeKind.DNS, ProbeKind.UDP), False, 1000
        )
        hello = AgentHello(node, "test", PROTOCOL_VERSION, caps, uuid.uuid4().hex)
        await call.write(pb.AgentMessage(hello=convert.hello_to_proto(hello)))
        try:
            yield call
        finally:
            call.cancel()


async def read_until(call: Any, body: str) -> pb.CollectorMessage:
    while True:
        msg = await asyncio.wait_for(call.read(), 5)
        assert msg is not grpc.aio.EOF, f"stream ended while waiting for {body}"
        if msg.WhichOneof("body") == body:
            return msg


def result(
    received: pb.Assignment, *, outcome: Outcome, started_at: float | None = None, **changes: Any
) -> pb.ProbeResult:
    """What an agent sends for an assignment message it received (echoed as is, unless a test
    changes a field of it on the way)."""
    assignment = convert.assignment_from_proto(received)
    r = ProbeResult(
        id=uuid.uuid4().hex,
        assignment=assignment,
        outcome=outcome,
        latency_seconds=0.001,
        node=assignment.source_node,
        started_at=time.time() if started_at is None else started_at,
    )
    message = convert.result_to_proto(r, assignment_msg=received)
    for name, value in changes.items():
        setattr(message.assignment, name, value)
    return message


async def send(call: Any, *results: pb.ProbeResult) -> None:
    await call.write(pb.AgentMessage(results=pb.ResultBatch(results=list(results))))
    acked: set[str] = set()
    while not {r.id for r in results} <= acked:
        acked.update((await read_until(call, "result_ack")).result_ack.result_ids)


@dataclass
class Served:
    collector: Collector
    dispatcher: Dispatcher
    port: int
    delivered: list[ProbeResult] = field(default_factory=list)
    streams: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    def issue(self) -> None:
        """Hand every due assignment of the plan to the dispatcher (the plan sender's job)."""
        self.collector.send(self.collector.planner.due(time.time()))

    def expected(self, assignment: Assignment) -> Outcome:
        """What a network enforcing the model would answer: allowed connects, denied drops."""
        planned = self.collector.planner.plan.flows[assignment.flow_key]
        return Outcome.CONNECTED if planned.model else Outcome.TIMEOUT


@contextlib.asynccontextmanager
async def serving(
    *, ledger: DeliveryLedger | None = None, key: bytes = KEY
) -> AsyncIterator[Served]:
    settings = CollectorSettings(token=TOKEN, planner=SAMPLE_SETTINGS)
    collector = Collector(settings)
    delivered: list[ProbeResult] = []

    def on_result(r: ProbeResult) -> None:
        delivered.append(r)
        collector.on_result(r)

    dispatcher = Dispatcher(
        token=TOKEN, tls=server_tls(), on_result=on_result, ledger=ledger, assignment_key=key
    )
    collector.send = dispatcher.submit
    snapshot = shop_snapshot()
    await collector.on_snapshot(
        snapshot, diff_snapshots(None, snapshot, generation=1, at=time.time())
    )
    port = await dispatcher.start("127.0.0.1:0")
    served = Served(collector, dispatcher, port, delivered)
    try:
        async with served.streams:
            yield served
    finally:
        await dispatcher.stop(grace_seconds=0)
        if ledger is not None:
            ledger.close()


async def first_batch(served: Served, node: str = "node-1") -> tuple[Any, list[pb.Assignment]]:
    """Open `node`'s stream (closed with the dispatcher) and take the first batch it is sent."""
    served.issue()
    call = await served.streams.enter_async_context(stream(served.port, node))
    got = await read_until(call, "assignments")
    return call, list(got.assignments.assignments)


async def first_assignment(served: Served, node: str = "node-1") -> tuple[Any, pb.Assignment]:
    call, batch = await first_batch(served, node)
    return call, batch[0]


# --- forged results --------------------------------------------------------------------------------


async def test_a_result_for_an_assignment_never_issued_changes_nothing() -> None:
    async with serving() as served:
        call, received = await first_assignment(served)
        flow = served.collector.state.flow(received.flow_key)
        assert flow is not None and flow.current is None
        forged = pb.Assignment()
        forged.CopyFrom(received)
        forged.ClearField("seal")
        forged.id = "never-issued-1"
        await send(call, result(forged, outcome=Outcome.CONNECTED))
        assert served.delivered == []
        assert served.dispatcher.results_refused["not issued by this collector"] == 1
        assert flow.current is None and flow.status in ("PENDING", "POLICY_MISMATCH")


@pytest.mark.parametrize(
    ("change", "value"),
    [
        pytest.param("attempt", 2, id="a retry that was never issued"),
        pytest.param("flow_key", "shop/shop/api-to-db#0", id="another flow"),
        pytest.param("destination_ip", "10.0.0.99", id="another destination"),
        pytest.param("id", "a-new-id", id="another assignment id"),
    ],
)
async def test_a_result_whose_assignment_was_changed_on_the_way_is_refused(
    change: str, value: Any
) -> None:
    async with serving() as served:
        call, received = await first_assignment(served)
        await send(call, result(received, outcome=Outcome.CONNECTED, **{change: value}))
        assert served.delivered == []
        assert served.dispatcher.results_refused["not issued by this collector"] == 1


async def test_a_result_from_another_nodes_stream_is_refused() -> None:
    async with serving() as served:
        _, received = await first_assignment(served, "node-1")
        async with stream(served.port, "node-2") as other:
            await read_until(other, "hello_ack")
            await send(
                other,
                result(received, outcome=served.expected(convert.assignment_from_proto(received))),
            )
        assert served.delivered == []
        assert served.dispatcher.results_refused["issued to another node"] == 1


async def test_an_assignment_is_answered_once_whatever_the_result_id() -> None:
    async with serving() as served:
        call, received = await first_assignment(served)
        outcome = served.expected(convert.assignment_from_proto(received))
        await send(call, result(received, outcome=outcome), result(received, outcome=outcome))
        assert len(served.delivered) == 1
        assert served.dispatcher.duplicates_total == 1


# --- timestamps on the collector's clock ----------------------------------------------------------


async def test_a_result_dated_an_hour_ahead_does_not_freeze_its_flow() -> None:
    async with serving() as served:
        call, received = await first_assignment(served)
        assignment = convert.assignment_from_proto(received)
        outcome = served.expected(assignment)
        before = time.time()
        await send(call, result(received, outcome=outcome, started_at=time.time() + 3600))
        [future] = served.delivered
        assert before - 1 <= future.started_at <= time.time(), "taken on the collector's clock"
        assert served.dispatcher.timestamps_adjusted_total == 1
        flow = served.collector.state.flow(assignment.flow_key)
        assert flow is not None and flow.current is not None
        # The flow is probed again: the real result that follows is the flow's reality.
        served.collector.planner.expedite()
        served.issue()
        while True:
            got = await read_until(call, "assignments")
            later = [m for m in got.assignments.assignments if m.flow_key == assignment.flow_key]
            if later:
                break
        await send(call, result(later[0], outcome=outcome))
        assert flow.current.assignment_id == later[0].id, "the later result counted"
        assert served.dispatcher.timestamps_adjusted_total == 1


async def test_a_result_dated_before_its_assignment_was_issued_is_brought_within() -> None:
    async with serving() as served:
        call, received = await first_assignment(served)
        issued = received.seal.issued_at.ToNanoseconds() / 1e9
        outcome = served.expected(convert.assignment_from_proto(received))
        await send(call, result(received, outcome=outcome, started_at=issued - 600))
        [delivered] = served.delivered
        assert delivered.started_at == pytest.approx(issued, abs=1e-6)
        assert served.dispatcher.timestamps_adjusted_total == 1


# --- across a restart of the collector --------------------------------------------------------------


async def test_after_a_restart_results_of_sealed_assignments_are_taken_once_and_forged_ones_not(
    tmp_path: Path,
) -> None:
    path = tmp_path / "delivered.jsonl"
    async with serving(ledger=DeliveryLedger(1000, path)) as first:
        call, batch = await first_batch(first)
        one, two = batch[:2]
        answered = result(one, outcome=first.expected(convert.assignment_from_proto(one)))
        await send(call, answered)
        assert len(first.delivered) == 1
    # A new collector with the same key and ledger: the result whose ack was lost comes again
    # (not delivered twice), the one measured meanwhile comes once, a forged one never.
    async with (
        serving(ledger=DeliveryLedger(1000, path)) as second,
        stream(second.port, "node-1") as call,
    ):
        await read_until(call, "hello_ack")
        await send(call, answered)
        assert second.delivered == []
        assert second.dispatcher.duplicates_total == 1
        measured = result(two, outcome=second.expected(convert.assignment_from_proto(two)))
        await send(call, measured, result(two, outcome=Outcome.CONNECTED))
        assert [r.id for r in second.delivered] == [measured.id]
        assert second.collector.results_unplanned_total == 1
    # A collector with another key cannot tell these from forgeries: it refuses them.
    async with (
        serving(ledger=DeliveryLedger(1000), key=b"x" * 32) as third,
        stream(third.port, "node-1") as call,
    ):
        await read_until(call, "hello_ack")
        await send(call, result(two, outcome=Outcome.CONNECTED))
        assert third.delivered == []
        assert third.dispatcher.results_refused["not issued by this collector"] == 1


async def test_the_refusals_are_counted_in_metrics() -> None:
    from prometheus_client import CollectorRegistry

    from collector.metrics import CollectorMetrics

    async with serving() as served:
        call, received = await first_assignment(served)
        await send(call, result(received, outcome=Outcome.CONNECTED, attempt=7))
        metrics = CollectorMetrics(
            CollectorRegistry(),
            state=served.collector.state,
            intake=served.dispatcher.intake_counters,
        )
        text = metrics.exposition().decode()
        assert 'flowproof_results_refused_total{reason="not issued by this collector"} 1.0' in text
        assert "flowproof_result_timestamps_adjusted_total 0.0" in text
