"""A burst of results never stalls the collector's other faces: results are taken a chunk at a
time with the event loop free in between, the next message of a stream is read only when the last
is done (gRPC's flow control holds the rest back at the agent), and one message may be at most
4 MiB. Real gRPC server (TLS) on a loopback port; the burst sent by hand with the token."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from bench.intake_bench import results
from collector.dispatching import Dispatcher
from flowproof import convert
from flowproof.probes import PROTOCOL_VERSION, AgentCapabilities, AgentHello, ProbeKind
from flowproof.v1 import agent_pb2 as pb
from flowproof.v1.agent_pb2_grpc import AgentServiceStub
from tests.support.tls import ca_pem, server_tls

TOKEN = "burst-token"


@contextlib.asynccontextmanager
async def served() -> AsyncIterator[tuple[Dispatcher, int]]:
    dispatcher = Dispatcher(token=TOKEN, tls=server_tls(), on_result=lambda _: None)
    port = await dispatcher.start("127.0.0.1:0")
    try:
        yield dispatcher, port
    finally:
        await dispatcher.stop(grace_seconds=0)


@contextlib.asynccontextmanager
async def stream(port: int) -> AsyncIterator[grpc.aio.StreamStreamCall]:  # type: ignore[type-arg]
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem())
    options = (("grpc.max_send_message_length", 64 << 20),)
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as ch:
        call = AgentServiceStub(ch).Connect(metadata=(("authorization", f"Bearer {TOKEN}"),))
        caps = AgentCapabilities(False, (ProbeKind.TCP,), False, 10)
        hello = AgentHello("node-1", "burst", PROTOCOL_VERSION, caps, uuid.uuid4().hex)
        await call.write(pb.AgentMessage(hello=convert.hello_to_proto(hello)))
        await asyncio.wait_for(call.read(), 5)
        try:
            yield call
        finally:
            call.cancel()


async def longest_pause(during: asyncio.Future[object]) -> float:
    """The longest the event loop went without running a 5 ms ticker while `during` ran."""
    longest = 0.0
    last = time.monotonic()
    while not during.done():
        await asyncio.sleep(0.005)
        now = time.monotonic()
        longest = max(longest, now - last)
        last = now
    return longest


async def test_taking_thousands_of_results_leaves_the_event_loop_free() -> None:
    async with served() as (dispatcher, port), stream(port) as call:
        burst = results(3_900, "shop/shop/f#0", sealed=True)  # each verified, then refused
        batches = [burst[i : i + 256] for i in range(0, len(burst), 256)]

        async def send_and_wait() -> None:
            for batch in batches:
                await call.write(pb.AgentMessage(results=pb.ResultBatch(results=batch)))
            acked = 0
            while acked < len(burst):
                msg = await asyncio.wait_for(call.read(), 30)
                if msg.WhichOneof("body") == "result_ack":
                    acked += len(msg.result_ack.result_ids)

        sending = asyncio.ensure_future(send_and_wait())
        pause = await longest_pause(sending)
        await sending
        assert dispatcher.results_refused["not issued by this collector"] == len(burst)
        assert pause < 0.5, f"the event loop stood still for {pause:.2f} s"


async def test_one_message_is_taken_a_chunk_at_a_time() -> None:
    async with served() as (_, port), stream(port) as call:
        burst = results(8_000, "shop/shop/f#0", sealed=True)  # one message of about 2.5 MB
        await call.write(pb.AgentMessage(results=pb.ResultBatch(results=burst)))
        waiting = asyncio.ensure_future(asyncio.wait_for(call.read(), 60))
        pause = await longest_pause(waiting)
        ack = await waiting
        assert len(ack.result_ack.result_ids) == len(burst)
        assert pause < 0.5, f"the event loop stood still for {pause:.2f} s"


async def read_until_broken(call: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
    for _ in range(100):
        await asyncio.wait_for(call.read(), 10)


async def test_a_message_over_the_bound_ends_the_stream_and_nothing_else() -> None:
    async with served() as (dispatcher, port):
        async with stream(port) as call:
            huge = results(30_000, "shop/shop/f#0")  # about 7 MB: over the 4 MiB bound
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call.write(pb.AgentMessage(results=pb.ResultBatch(results=huge)))
            with pytest.raises(grpc.aio.AioRpcError) as broken:
                await read_until_broken(call)
            assert broken.value.code() in (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.CANCELLED,
            )
        assert dispatcher.delivered_total == 0
        async with stream(port) as again:  # the next stream is served as ever
            await again.write(pb.AgentMessage(results=pb.ResultBatch(results=results(10, "k#0"))))
            ack = await asyncio.wait_for(again.read(), 10)
            assert ack.WhichOneof("body") == "result_ack"
