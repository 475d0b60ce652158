"""An agent silent for three heartbeats is dropped, whatever state its stream is in: also one that
stopped reading while the collector had a lot to send it (its writes then block on flow control),
and one that still beats but never reads. Its assignments go back to the queue, and it leaves
`/api/v1/agents` and `flowproof_agents_connected`.

A real dispatcher (TLS) on a loopback port, the agent's side spoken by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from collector.dispatching import Dispatcher
from flowproof import convert
from flowproof.probes import (
    PROTOCOL_VERSION,
    AgentCapabilities,
    AgentHello,
    Assignment,
    Heartbeat,
    PodRef,
    ProbeKind,
)
from flowproof.v1 import agent_pb2 as pb
from flowproof.v1.agent_pb2_grpc import AgentServiceStub
from tests.support.tls import ca_pem, server_tls

TOKEN = "ghost-token"
HEARTBEAT = 0.2  # dropped after three silent ones: ~0.6 s


@contextlib.asynccontextmanager
async def dispatcher() -> AsyncIterator[tuple[Dispatcher, int]]:
    served = Dispatcher(
        token=TOKEN,
        tls=server_tls(),
        on_result=lambda _: None,
        heartbeat_interval_seconds=HEARTBEAT,
    )
    port = await served.start("127.0.0.1:0")
    try:
        yield served, port
    finally:
        await served.stop(grace_seconds=0)


@contextlib.asynccontextmanager
async def stream(port: int, node: str, max_in_flight: int = 10_000) -> AsyncIterator[Any]:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem())
    # A small receive window, as a slow or stuck reader would leave: writes block quickly.
    options = (("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 1 << 26))
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as ch:
        call = AgentServiceStub(ch).Connect(metadata=(("authorization", f"Bearer {TOKEN}"),))
        caps = AgentCapabilities(False, (ProbeKind.TCP,), False, max_in_flight)
        hello = AgentHello(node, "ghost", PROTOCOL_VERSION, caps, uuid.uuid4().hex)
        await call.write(pb.AgentMessage(hello=convert.hello_to_proto(hello)))
        try:
            yield call
        finally:
            call.cancel()


def assignments(node: str, count: int) -> list[Assignment]:
    # Long flow keys: every batch is large, so a reader that stops soon stops the writer.
    return [
        Assignment(
            id=f"{uuid.uuid4().hex}-{i}",
            source=PodRef(uid="0b0b0b0b-0000-4000-8000-000000000000", namespace="x", name="a"),
            source_node=node,
            destination_ip="10.244.1.5",
            port=8080,
            protocol="TCP",
            kind=ProbeKind.TCP,
            timeout_seconds=1.0,
            flow_key="x/x/" + "f" * 400 + f"#{i}",
        )
        for i in range(count)
    ]


async def until(check: Any, within: float, what: str) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < within, f"not within {within} s: {what}"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_an_agent_that_stops_reading_and_sending_is_dropped_and_its_work_requeued() -> None:
    async with dispatcher() as (served, port), stream(port, "node-g") as call:
        ack = await asyncio.wait_for(call.read(), 5)
        assert ack.WhichOneof("body") == "hello_ack"
        await until(lambda: [a.node for a in served.agents()] == ["node-g"], 5, "connected")
        served.submit(assignments("node-g", 5000))  # megabytes: more than the windows hold
        # The ghost reads nothing more and sends nothing more.
        took = await until(lambda: served.agents() == [], 5, "the silent agent to be dropped")
        assert took < 3 * HEARTBEAT + 2.0
        assert served.pending_count() == 5000, "nothing was answered, nothing lost"
        assert served.agents() == []
        # The next stream from that node is sent them again.
        async with stream(port, "node-g") as again:
            await asyncio.wait_for(again.read(), 5)
            first = await asyncio.wait_for(again.read(), 5)
            assert first.WhichOneof("body") == "assignments"


async def test_an_agent_that_beats_but_never_reads_is_dropped() -> None:
    async with dispatcher() as (served, port), stream(port, "node-b") as call:
        await asyncio.wait_for(call.read(), 5)
        await until(lambda: bool(served.agents()), 5, "connected")
        served.submit(assignments("node-b", 5000))
        beat = Heartbeat(1, time.time(), 0, 0, 0, 0)

        async def beating() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                while True:
                    await call.write(pb.AgentMessage(heartbeat=convert.heartbeat_to_proto(beat)))
                    await asyncio.sleep(HEARTBEAT / 2)

        beats = asyncio.create_task(beating())
        try:
            await until(lambda: served.agents() == [], 5, "the agent that never reads to go")
        finally:
            beats.cancel()
            await asyncio.gather(beats, return_exceptions=True)


async def test_a_quiet_agent_that_reads_and_beats_stays() -> None:
    async with dispatcher() as (served, port), stream(port, "node-q") as call:
        await asyncio.wait_for(call.read(), 5)
        beat = Heartbeat(1, time.time(), 0, 0, 0, 0)
        deadline = time.monotonic() + 8 * HEARTBEAT
        while time.monotonic() < deadline:
            await call.write(pb.AgentMessage(heartbeat=convert.heartbeat_to_proto(beat)))
            await asyncio.sleep(HEARTBEAT / 2)
        assert [a.node for a in served.agents()] == ["node-q"]


@pytest.mark.parametrize("streams", [50])
async def test_a_flood_of_streams_that_go_quiet_leaves_no_ghost(streams: int) -> None:
    async with dispatcher() as (served, port), contextlib.AsyncExitStack() as stack:
        calls = [await stack.enter_async_context(stream(port, f"node-{i}")) for i in range(streams)]
        for call in calls:
            await asyncio.wait_for(call.read(), 10)
        await until(lambda: len(served.agents()) == streams, 10, "all connected")
        served.submit([a for i in range(streams) for a in assignments(f"node-{i}", 600)])
        await until(lambda: served.agents() == [], 10, "every quiet stream to be dropped")
