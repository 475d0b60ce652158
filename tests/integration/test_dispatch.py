"""The dispatcher and real agents over a real gRPC stream, probing real pod namespaces.

A real `grpc.aio` server on a loopback port 0, real agents (`agent.runtime.serve`) in this process,
and between them a small TCP proxy that the tests cut to break the stream as a network would. The
probes are real: from a pod namespace to a TCP server in another (fast, CONNECTED) or to a port
whose packets nftables drops (slow, TIMEOUT), so some are always in flight when a stream breaks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_agent_netlab import Bed, needs_netlab, two_pods

from agent.netns import NetnsSockets, NetnsTarget, SocketSpec
from agent.runtime import serve
from agent.settings import AgentSettings
from collector.dispatching import Dispatcher
from flowproof import convert
from flowproof.probes import (
    PROTOCOL_VERSION,
    STANDBY_REFUSAL,
    AgentCapabilities,
    AgentHello,
    Assignment,
    DestinationPolicy,
    Outcome,
    PodRef,
    ProbeKind,
    ProbeResult,
    ResponderSpec,
    ResponderState,
)
from flowproof.v1 import agent_pb2 as pb
from flowproof.v1.agent_pb2_grpc import AgentServiceStub
from tests.support.tls import ca_pem, server_tls, write_tls

pytestmark = needs_netlab

TOKEN = "s3cret-token"
DROP_RULES = """
table inet fptest {
  chain input {
    type filter hook input priority 0; policy accept;
    tcp dport 8082 drop
  }
}
"""


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    with two_pods() as built:
        built.nft(built.dst, DROP_RULES)
        yield built


@pytest.fixture
async def tcp_server(bed: Bed) -> AsyncIterator[None]:
    """A TCP server on 8080 inside the destination pod."""
    sockets = NetnsSockets()
    sock = await sockets.create(
        NetnsTarget(bed.dst.netns_path), SocketSpec(socket.AF_INET, socket.SOCK_STREAM)
    )
    sockets.close()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", 8080))
    sock.listen(1024)

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(accept, sock=sock)
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


class Proxy:
    """A loopback TCP relay the tests cut to break a stream the way a network does."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 5)
        if self._server is not None:
            await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                writer.transport.abort()
                return
            self._writers.update((writer, up_writer))
            await asyncio.gather(
                self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True
            )
        finally:
            self._tasks.discard(task)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()


async def eventually(check: Callable[[], bool], *, within: float = 15.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.02)


@dataclasses.dataclass
class Loop:
    """A dispatcher, a proxy in front of it, and the results it delivered."""

    bed: Bed
    dispatcher: Dispatcher
    port: int
    proxy: Proxy
    proxy_port: int
    results: list[ProbeResult]
    agents: list[tuple[asyncio.Event, asyncio.Task[int]]]
    ca_file: str = ""

    def by_assignment(self) -> collections.Counter[str]:
        return collections.Counter(r.assignment_id for r in self.results)

    async def start_agent(self, node: str = "node-a", **overrides: Any) -> asyncio.Event:
        fields: dict[str, Any] = {
            "node_name": node,
            "collector_address": f"127.0.0.1:{self.proxy_port}",
            "token": TOKEN,
            "ca_file": self.ca_file,
            "reconnect_initial_seconds": 0.05,
            "reconnect_max_seconds": 0.3,
            "hello_timeout_seconds": 5.0,
            "shutdown_grace_seconds": 5.0,
            "destination_rate_per_second": 10_000.0,
            "destination_burst": 10_000,
            "health_port": 0,
            "metrics_port": 0,
        }
        fields.update(overrides)
        stop = asyncio.Event()
        task = asyncio.create_task(serve(AgentSettings(**fields), stop), name=f"agent {node}")
        self.agents.append((stop, task))
        return stop

    async def restart_server(self, down_seconds: float = 0.3) -> None:
        await self.dispatcher.stop(grace_seconds=0)
        await asyncio.sleep(down_seconds)
        await self.dispatcher.start(f"127.0.0.1:{self.port}")


@pytest.fixture
async def loop_(bed: Bed, tcp_server: None, tmp_path: Path) -> AsyncIterator[Loop]:
    results: list[ProbeResult] = []
    dispatcher = Dispatcher(
        token=TOKEN,
        tls=server_tls(),
        on_result=results.append,
        heartbeat_interval_seconds=0.5,
        responder_wait_seconds=1.0,
    )
    # The agents probe only what the policy covers: the destination pod of the bed.
    dispatcher.set_destination_policy(DestinationPolicy(networks=(f"{bed.dst.ip}/32",)))
    port = await dispatcher.start("127.0.0.1:0")
    proxy = Proxy(port)
    proxy_port = await proxy.start()
    built = Loop(bed, dispatcher, port, proxy, proxy_port, results, [], str(write_tls(tmp_path).ca))
    try:
        yield built
    finally:
        for stop, _ in built.agents:
            stop.set()
        for _, task in built.agents:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)
        await proxy.close()
        await dispatcher.stop(grace_seconds=0)


def make_assignments(bed: Bed, n: int, *, slow_every: int = 0, node: str = "node-a",
                     **overrides: Any) -> list[Assignment]:  # fmt: skip
    made = []
    for i in range(n):
        slow = slow_every and i % slow_every == 0
        fields: dict[str, Any] = {
            "id": f"{uuid.uuid4().hex[:8]}-{i}",
            "source": PodRef(uid=bed.src.uid, namespace="shop", name="frontend"),
            "source_node": node,
            "destination_ip": bed.dst.ip,
            "destination": PodRef(uid=bed.dst.uid, namespace="shop", name="api"),
            "port": 8082 if slow else 8080,
            "protocol": "TCP",
            "kind": ProbeKind.TCP,
            "timeout_seconds": 1.0,
        }
        fields.update(overrides)
        made.append(Assignment(**fields))
    return made


# --- the loop --------------------------------------------------------------------------------------


async def test_assignments_come_back_as_results_once_each(loop_: Loop) -> None:
    await loop_.start_agent()
    await eventually(lambda: len(loop_.dispatcher.agents()) == 1, what="the agent connects")
    batch = make_assignments(loop_.bed, 100, slow_every=10)
    loop_.dispatcher.submit(batch)
    await eventually(lambda: len(loop_.results) == 100, what="100 results")
    assert loop_.by_assignment() == collections.Counter(a.id for a in batch)
    outcomes = collections.Counter(r.outcome for r in loop_.results)
    assert outcomes == {Outcome.CONNECTED: 90, Outcome.TIMEOUT: 10}
    assert all(r.assignment == next(a for a in batch if a.id == r.assignment_id)
               for r in loop_.results)  # fmt: skip
    [info] = loop_.dispatcher.agents()
    assert info.node == "node-a"
    assert info.capabilities.sctp_supported is False
    assert ProbeKind.SCTP not in info.capabilities.probe_kinds
    assert info.capabilities.max_in_flight == 1024
    assert loop_.dispatcher.pending_count() == 0


async def test_reconnects_of_either_side_lose_no_result_and_count_none_twice(loop_: Loop) -> None:
    await loop_.start_agent()
    await eventually(lambda: len(loop_.dispatcher.agents()) == 1, what="the agent connects")
    batch = make_assignments(loop_.bed, 400, slow_every=4)
    for chunk in range(4):
        loop_.dispatcher.submit(batch[chunk * 100 : (chunk + 1) * 100])
        await asyncio.sleep(0.3)
        if chunk % 2 == 0:
            loop_.proxy.cut()  # the network breaks the agent's stream
        else:
            await loop_.restart_server()  # the collector's server goes away and comes back
    await eventually(lambda: len(loop_.results) >= 400, within=30, what="400 results")
    await asyncio.sleep(0.5)  # anything counted twice would arrive by now
    assert loop_.by_assignment() == collections.Counter(a.id for a in batch)
    assert len({r.id for r in loop_.results}) == 400


async def test_an_agent_restart_reprobes_what_it_lost(loop_: Loop) -> None:
    stop = await loop_.start_agent()
    await eventually(lambda: len(loop_.dispatcher.agents()) == 1, what="the agent connects")
    first = loop_.dispatcher.agents()[0].instance_id
    batch = make_assignments(loop_.bed, 50, slow_every=1, timeout_seconds=2.0)
    loop_.dispatcher.submit(batch)
    await eventually(lambda: loop_.dispatcher.agents()[0].assignments_in_flight == 50,
                     what="all 50 in flight")  # fmt: skip
    # The agent dies with every probe in flight: its results are gone with it.
    _, task = loop_.agents.pop()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    stop.set()
    await loop_.start_agent()
    await eventually(lambda: len(loop_.results) == 50, within=20, what="50 results")
    assert loop_.dispatcher.agents()[0].instance_id != first
    assert loop_.by_assignment() == collections.Counter(a.id for a in batch)


async def test_results_measured_while_disconnected_wait_in_a_buffer_that_fits(loop_: Loop) -> None:
    await loop_.start_agent(result_buffer_size=5)
    await eventually(lambda: len(loop_.dispatcher.agents()) == 1, what="the agent connects")
    # The agent accepts no more assignments than its buffer can keep results for.
    assert loop_.dispatcher.agents()[0].capabilities.max_in_flight == 5
    batch = make_assignments(loop_.bed, 20, slow_every=1)
    loop_.dispatcher.submit(batch)
    await eventually(lambda: loop_.dispatcher.agents()[0].assignments_in_flight == 5,
                     what="5 in flight")  # fmt: skip
    assert loop_.dispatcher.agents()[0].assignments_queued == 15
    await loop_.dispatcher.stop(grace_seconds=0)
    await asyncio.sleep(1.5)  # the 5 probes time out while the collector is away
    await loop_.dispatcher.start(f"127.0.0.1:{loop_.port}")
    await eventually(lambda: len(loop_.results) == 20, within=20, what="20 results")
    assert loop_.by_assignment() == collections.Counter(a.id for a in batch)
    assert loop_.dispatcher.agents()[0].results_dropped_total == 0


async def test_the_agents_drop_counter_reaches_the_collector(loop_: Loop) -> None:
    async with raw_stream(loop_.port) as call:
        await call.write(hello("node-h"))
        await read_until(call, "hello_ack")
        await call.write(pb.AgentMessage(heartbeat=pb.Heartbeat(sequence=1,
                                                                results_dropped_total=7)))  # fmt: skip
        await eventually(lambda: [i.results_dropped_total for i in loop_.dispatcher.agents()] == [7],
                         what="the heartbeat's counter")  # fmt: skip


async def test_assignments_go_only_to_the_agent_on_their_source_node(loop_: Loop) -> None:
    await loop_.start_agent("node-a")
    await loop_.start_agent("node-b")
    await eventually(lambda: len(loop_.dispatcher.agents()) == 2, what="both agents connect")
    for_a = make_assignments(loop_.bed, 10, node="node-a")
    for_b = make_assignments(loop_.bed, 10, node="node-b")
    for_c = make_assignments(loop_.bed, 10, node="node-c")  # no agent there
    loop_.dispatcher.submit(for_a + for_b + for_c)
    await eventually(lambda: len(loop_.results) == 20, what="20 results")
    assert {r.assignment_id: r.node for r in loop_.results} == {
        **{a.id: "node-a" for a in for_a},
        **{a.id: "node-b" for a in for_b},
    }
    assert loop_.dispatcher.pending_count() == 10
    assert [i.assignments_queued for i in loop_.dispatcher.agents()] == [0, 0]
    await loop_.start_agent("node-c")
    await eventually(lambda: len(loop_.results) == 30, what="node-c's results")


async def test_a_responder_opens_on_the_destination_node_before_the_probe(loop_: Loop) -> None:
    await loop_.start_agent("node-a")
    await loop_.start_agent("node-b")
    await eventually(lambda: len(loop_.dispatcher.agents()) == 2, what="both agents connect")
    responder = ResponderSpec(pod=PodRef(uid=loop_.bed.dst.uid, namespace="shop", name="api"),
                              node="node-b")  # fmt: skip
    free, taken, nobody = (
        make_assignments(loop_.bed, 1, port=8095, responder=responder)[0],
        make_assignments(loop_.bed, 1, port=8080, responder=responder)[0],
        make_assignments(
            loop_.bed, 1, port=8096, responder=dataclasses.replace(responder, node="node-z")
        )[0],
    )
    loop_.dispatcher.submit([free, taken, nobody])
    await eventually(lambda: len(loop_.results) == 3, what="3 results")
    got = {r.assignment_id: r for r in loop_.results}
    assert got[free.id].outcome is Outcome.CONNECTED
    assert got[free.id].responder is not None
    assert got[free.id].responder.state is ResponderState.OPENED
    assert got[taken.id].outcome is Outcome.CONNECTED
    assert got[taken.id].responder is not None
    assert got[taken.id].responder.state is ResponderState.LISTENER_PRESENT
    # No agent on node-z: after the wait the probe goes ahead, and the refusal is not a proof.
    assert got[nobody.id].outcome is Outcome.REFUSED
    assert got[nobody.id].responder is not None
    assert got[nobody.id].responder.state is ResponderState.UNAVAILABLE
    # The responder closes when its assignment has its result.
    probe_again = make_assignments(loop_.bed, 1, port=8095)
    await asyncio.sleep(0.2)
    loop_.dispatcher.submit(probe_again)
    await eventually(lambda: len(loop_.results) == 4, what="the second probe")
    assert loop_.results[-1].outcome is Outcome.REFUSED


async def test_a_cancelled_assignment_never_reports(loop_: Loop) -> None:
    await loop_.start_agent()
    await eventually(lambda: len(loop_.dispatcher.agents()) == 1, what="the agent connects")
    slow = make_assignments(loop_.bed, 5, slow_every=1, timeout_seconds=3.0)
    loop_.dispatcher.submit(slow)
    await eventually(lambda: loop_.dispatcher.agents()[0].assignments_in_flight == 5,
                     what="all 5 in flight")  # fmt: skip
    loop_.dispatcher.cancel([a.id for a in slow[:3]])
    await eventually(lambda: len(loop_.results) == 2, within=6, what="the 2 not cancelled")
    await asyncio.sleep(0.3)
    assert set(loop_.by_assignment()) == {a.id for a in slow[3:]}


async def test_sigterm_path_finishes_running_probes_and_delivers_them(loop_: Loop) -> None:
    stop = await loop_.start_agent()
    await eventually(lambda: len(loop_.dispatcher.agents()) == 1, what="the agent connects")
    loop_.dispatcher.submit(make_assignments(loop_.bed, 10, slow_every=1))
    await eventually(lambda: loop_.dispatcher.agents()[0].assignments_in_flight == 10,
                     what="all 10 in flight")  # fmt: skip
    stop.set()
    _, task = loop_.agents[-1]
    assert await asyncio.wait_for(task, 10) == 0
    assert len(loop_.results) == 10


# --- the contract, spoken by hand ------------------------------------------------------------------


async def test_forgotten_assignments_of_a_node_without_agent_are_never_sent_nor_kept(
    loop_: Loop,
) -> None:
    """What the planner gave up on (lost: no agent on the node) leaves the dispatcher: nothing
    of it is kept, and an agent that comes later is sent only what is still wanted."""
    given_up = make_assignments(loop_.bed, 50, node="node-z")
    loop_.dispatcher.submit(given_up)
    assert loop_.dispatcher.pending_count() == 50
    loop_.dispatcher.forget([a.id for a in given_up])
    assert loop_.dispatcher.pending_count() == 0
    assert loop_.dispatcher.agents() == []
    [wanted] = make_assignments(loop_.bed, 1, node="node-z")
    loop_.dispatcher.submit([wanted])
    async with raw_stream(loop_.port) as call:
        await call.write(hello("node-z"))
        msg = await read_until(call, "assignments")
        assert [a.id for a in msg.assignments.assignments] == [wanted.id]


async def test_a_forgotten_assignment_already_sent_still_delivers_its_result_once(
    loop_: Loop,
) -> None:
    [a] = make_assignments(loop_.bed, 1, node="node-y")
    loop_.dispatcher.submit([a])
    async with raw_stream(loop_.port) as call:
        await call.write(hello("node-y"))
        msg = await read_until(call, "assignments")
        [received] = msg.assignments.assignments
        loop_.dispatcher.forget([a.id])
        assert loop_.dispatcher.pending_count() == 0
        await call.write(result_for(received, "late-1"))
        ack = await read_until(call, "result_ack")
        assert list(ack.result_ack.result_ids) == ["late-1"]
    assert [r.id for r in loop_.results] == ["late-1"]


def secure_channel(port: int) -> grpc.aio.Channel:
    """A channel to the dispatcher that checks its certificate against the test CA."""
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem())
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


@contextlib.asynccontextmanager
async def raw_stream(port: int, token: str = TOKEN) -> AsyncIterator[Any]:
    async with secure_channel(port) as channel:
        call = AgentServiceStub(channel).Connect(metadata=(("authorization", f"Bearer {token}"),))
        try:
            yield call
        finally:
            call.cancel()


def hello(node: str, known: tuple[str, ...] = ()) -> pb.AgentMessage:
    caps = AgentCapabilities(sctp_supported=False, probe_kinds=(ProbeKind.TCP,),
                             responders_supported=False, max_in_flight=10)  # fmt: skip
    msg = AgentHello(node_name=node, agent_version="test", protocol_version=PROTOCOL_VERSION,
                     capabilities=caps, instance_id="i1", known_assignment_ids=known)  # fmt: skip
    return pb.AgentMessage(hello=convert.hello_to_proto(msg))


async def read_until(call: Any, body: str) -> pb.CollectorMessage:
    while True:
        msg = await asyncio.wait_for(call.read(), 5)
        assert msg is not grpc.aio.EOF, f"stream ended while waiting for {body}"
        if msg.WhichOneof("body") == body:
            return msg


def result_for(received: pb.Assignment, rid: str) -> pb.AgentMessage:
    """A result as an agent sends it: the assignment message it received echoed as is (seal
    and all)."""
    a = convert.assignment_from_proto(received)
    r = ProbeResult(id=rid, assignment=a, outcome=Outcome.CONNECTED, latency_seconds=0.001,
                    node=a.source_node, started_at=time.time())  # fmt: skip
    result = convert.result_to_proto(r, assignment_msg=received)
    return pb.AgentMessage(results=pb.ResultBatch(results=[result]))


async def test_a_result_sent_again_is_acked_but_delivered_once(loop_: Loop) -> None:
    [a] = make_assignments(loop_.bed, 1, node="node-h")
    loop_.dispatcher.submit([a])
    async with raw_stream(loop_.port) as call:
        await call.write(hello("node-h"))
        await read_until(call, "hello_ack")
        got = await read_until(call, "assignments")
        assert [m.id for m in got.assignments.assignments] == [a.id]
        [received] = got.assignments.assignments
        await call.write(result_for(received, "r1"))
        ack = await read_until(call, "result_ack")
        assert list(ack.result_ack.result_ids) == ["r1"]
    # The ack was "lost": the agent reconnects and sends the same result again, and a second
    # result for the same assignment (a re-probe) as well.
    async with raw_stream(loop_.port) as call:
        await call.write(hello("node-h"))
        await read_until(call, "hello_ack")
        await call.write(result_for(received, "r1"))
        await call.write(result_for(received, "r2"))
        acked: list[str] = []
        while len(acked) < 2:
            acked += (await read_until(call, "result_ack")).result_ack.result_ids
        assert acked == ["r1", "r2"]
    assert [r.id for r in loop_.results] == ["r1"]
    assert loop_.dispatcher.duplicates_total == 2


async def test_a_reconnecting_agent_is_not_sent_what_it_still_holds(loop_: Loop) -> None:
    batch = make_assignments(loop_.bed, 3, node="node-h")
    loop_.dispatcher.submit(batch)
    async with raw_stream(loop_.port) as call:
        await call.write(hello("node-h"))
        await read_until(call, "hello_ack")
        got = await read_until(call, "assignments")
        assert len(got.assignments.assignments) == 3
    async with raw_stream(loop_.port) as call:
        await call.write(hello("node-h", known=(batch[0].id, batch[1].id)))
        await read_until(call, "hello_ack")
        got = await read_until(call, "assignments")
        assert [m.id for m in got.assignments.assignments] == [batch[2].id]


async def test_the_collector_sends_no_more_than_the_agent_accepts(loop_: Loop) -> None:
    batch = make_assignments(loop_.bed, 25, node="node-h")
    loop_.dispatcher.submit(batch)
    async with raw_stream(loop_.port) as call:
        await call.write(hello("node-h"))  # max_in_flight 10
        await read_until(call, "hello_ack")
        got = await read_until(call, "assignments")
        assert len(got.assignments.assignments) == 10
        await call.write(result_for(got.assignments.assignments[0], "x1"))
        more = await read_until(call, "assignments")
        assert len(more.assignments.assignments) == 1


async def test_a_silent_agent_is_dropped_and_its_assignments_requeued(loop_: Loop) -> None:
    batch = make_assignments(loop_.bed, 2, node="node-h")
    loop_.dispatcher.submit(batch)
    async with raw_stream(loop_.port) as call:
        await call.write(hello("node-h"))
        await read_until(call, "hello_ack")
        await read_until(call, "assignments")
        # Heartbeat every 0.5 s, dropped after three missed: the stream ends within ~2 s.
        ended = await asyncio.wait_for(_drain(call), 5)
        assert ended
    assert [i.node for i in loop_.dispatcher.agents()] == []
    async with raw_stream(loop_.port) as call:
        await call.write(hello("node-h"))
        await read_until(call, "hello_ack")
        got = await read_until(call, "assignments")
        assert {m.id for m in got.assignments.assignments} == {a.id for a in batch}


async def _drain(call: Any) -> bool:
    while (await call.read()) is not grpc.aio.EOF:
        pass
    return True


@pytest.mark.parametrize(
    ("token", "first", "code"),
    [
        pytest.param("wrong", "hello", grpc.StatusCode.UNAUTHENTICATED,
                     id="a wrong token is refused"),
        pytest.param("", "hello", grpc.StatusCode.UNAUTHENTICATED, id="no token is refused"),
        pytest.param(TOKEN, "heartbeat", grpc.StatusCode.INVALID_ARGUMENT,
                     id="a stream must start with a hello"),
    ],
)  # fmt: skip
async def test_the_stream_is_refused(
    loop_: Loop, token: str, first: str, code: grpc.StatusCode
) -> None:
    async with raw_stream(loop_.port, token=token) as call:
        msg = hello("node-x") if first == "hello" else pb.AgentMessage(heartbeat=pb.Heartbeat())
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call.write(msg)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert caught.value.code() == code
    assert loop_.dispatcher.agents() == []


async def test_an_agent_with_a_wrong_token_never_gets_assignments(loop_: Loop) -> None:
    await loop_.start_agent(token="wrong")
    loop_.dispatcher.submit(make_assignments(loop_.bed, 3))
    await asyncio.sleep(1.0)
    assert loop_.dispatcher.agents() == []
    assert loop_.results == []


async def test_the_standard_health_service_answers_without_a_token(loop_: Loop) -> None:
    async with secure_channel(loop_.port) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "flowproof.v1.AgentService"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_standby_refuses_every_stream_until_it_leads_then_serves_it(tmp_path: Path) -> None:
    leading = False
    results: list[ProbeResult] = []
    dispatcher = Dispatcher(
        token=TOKEN, tls=server_tls(), on_result=results.append, serving=lambda: leading
    )
    port = await dispatcher.start("127.0.0.1:0")
    try:
        for _ in range(3):
            async with raw_stream(port) as call:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await call.write(hello("node-s"))
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call.read()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert caught.value.details() == STANDBY_REFUSAL
        assert dispatcher.agents() == []
        counters = dispatcher.intake_counters()
        assert (counters.standby_refusals_total, counters.streams_refused_total) == (3, 0)
        # A bad token still hears so. It is refused on its metadata alone, before any message:
        # a hello written meanwhile can cross the refusal (gRPC then reports INTERNAL, which once
        # failed CI), so none is written.
        async with raw_stream(port, token="wrong") as call:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call.read()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

        leading = True
        async with raw_stream(port) as call:
            await call.write(hello("node-s"))
            await read_until(call, "hello_ack")
            assert [a.node for a in dispatcher.agents()] == ["node-s"]
    finally:
        await dispatcher.stop(grace_seconds=0)
