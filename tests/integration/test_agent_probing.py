"""Real probes from inside a real pod namespace: every outcome produced by real packets.

The destination pod runs real servers (TCP, HTTP through aiohttp, UDP echo, a DNS server made with
dnspython), opened in its namespace from this process; nftables in the destination drops or rejects
chosen ports, nftables in the source drops chosen egress ports, and routes in the source make
addresses unreachable or prohibited. Responders are opened by the agent's own code.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from aiohttp import web
from test_agent_netlab import Bed, needs_netlab, two_pods

from agent.netns import NetnsSockets, NetnsTarget, SocketSpec, sctp_supported
from agent.probing import Prober
from agent.resolving import PodResolver
from agent.responders import Responders
from flowproof.probes import (
    Assignment,
    Outcome,
    PodRef,
    ProbeKind,
    Protocol,
    ResponderRequest,
    ResponderState,
)

pytestmark = needs_netlab

DST_RULES = """
table inet fptest {
  chain input {
    type filter hook input priority 0; policy accept;
    tcp dport 8082 drop
    tcp dport 8083 reject with icmpx admin-prohibited
    tcp dport 8084 reject with tcp reset
    udp dport 9002 drop
    udp dport 9003 reject with icmpx admin-prohibited
  }
}
"""
SRC_RULES = """
table inet fptest {
  chain output {
    type filter hook output priority 0; policy accept;
    tcp dport 8086 drop
    udp dport 9004 drop
  }
}
"""
DNS_NAME = "api.shop.svc.cluster.local."
DNS_ADDRESS = "10.96.0.42"


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    with two_pods() as built:
        built.nft(built.dst, DST_RULES)
        built.nft(built.src, SRC_RULES)
        yield built


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector transport is not registered as a DatagramTransport subclass in 3.11.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


class _Dns(asyncio.DatagramProtocol):
    """Answers A queries for DNS_NAME with DNS_ADDRESS, NXDOMAIN for anything else."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector transport is not registered as a DatagramTransport subclass in 3.11.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        query = dns.message.from_wire(data)
        reply = dns.message.make_response(query)
        question = query.question[0]
        if question.name.to_text() == DNS_NAME and question.rdtype == dns.rdatatype.A:
            reply.answer.append(dns.rrset.from_text(DNS_NAME, 30, "IN", "A", DNS_ADDRESS))
        else:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        self.transport.sendto(reply.to_wire(), addr)


async def _bound(sockets: NetnsSockets, ns: str, kind: int, port: int) -> socket.socket:
    sock = await sockets.create(NetnsTarget(f"/run/netns/{ns}"), SocketSpec(socket.AF_INET, kind))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    if kind == socket.SOCK_STREAM:
        sock.listen(128)
    return sock


@contextlib.asynccontextmanager
async def destination_servers(bed: Bed, sockets: NetnsSockets) -> AsyncIterator[None]:
    """TCP on 8080 (and behind the nft rules on 8082-8084), HTTP on 8085, UDP echo on 9000 and
    9002-9003, DNS on 53: all inside the destination pod's namespace."""
    loop = asyncio.get_running_loop()
    servers: list[asyncio.Server] = []
    transports: list[asyncio.BaseTransport] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    app = web.Application()

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        for port in (8080, 8082, 8083, 8084):
            sock = await _bound(sockets, bed.dst.netns, socket.SOCK_STREAM, port)
            servers.append(await asyncio.start_server(accept, sock=sock))
        http_sock = await _bound(sockets, bed.dst.netns, socket.SOCK_STREAM, 8085)
        await web.SockSite(runner, http_sock).start()
        for port in (9000, 9002, 9003):
            sock = await _bound(sockets, bed.dst.netns, socket.SOCK_DGRAM, port)
            transport, _ = await loop.create_datagram_endpoint(_UdpEcho, sock=sock)
            transports.append(transport)
        sock = await _bound(sockets, bed.dst.netns, socket.SOCK_DGRAM, 53)
        transport, _ = await loop.create_datagram_endpoint(_Dns, sock=sock)
        transports.append(transport)
        yield
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
        for transport in transports:
            transport.close()
        await runner.cleanup()


@dataclasses.dataclass
class Rig:
    bed: Bed
    prober: Prober
    responders: Responders
    sockets: NetnsSockets
    resolver: PodResolver


@pytest.fixture
async def rig(bed: Bed) -> AsyncIterator[Rig]:
    sockets = NetnsSockets(batch_size=64)
    resolver = PodResolver("/proc")
    sctp = sctp_supported()
    prober = Prober(
        node_name="node-a",
        resolver=resolver,
        sockets=sockets,
        max_concurrency=64,
        destination_rate_per_second=10_000,
        destination_burst=10_000,
        max_timeout_seconds=30,
        sctp_supported=sctp,
    )
    responders = Responders(
        resolver=resolver,
        sockets=sockets,
        max_open=16,
        max_lifetime_seconds=30,
        sctp_supported=sctp,
    )
    try:
        async with destination_servers(bed, sockets):
            yield Rig(bed, prober, responders, sockets, resolver)
    finally:
        responders.close_all()
        sockets.close()


def assignment(bed: Bed, **overrides: Any) -> Assignment:
    fields: dict[str, Any] = {
        "id": f"a-{time.monotonic_ns()}",
        "source": PodRef(uid=bed.src.uid, namespace="shop", name="frontend"),
        "source_node": "node-a",
        "destination_ip": bed.dst.ip,
        "destination": PodRef(uid=bed.dst.uid, namespace="shop", name="api"),
        "port": 8080,
        "protocol": "TCP",
        "kind": ProbeKind.TCP,
        "timeout_seconds": 1.0,
    }
    fields.update(overrides)
    if isinstance(fields["destination_ip"], str) and fields["destination_ip"].startswith("@"):
        fields["destination_ip"] = getattr(bed, fields["destination_ip"][1:])
    return Assignment(**fields)


TCP = {"kind": ProbeKind.TCP, "protocol": "TCP"}
UDP = {"kind": ProbeKind.UDP, "protocol": "UDP"}


@pytest.mark.parametrize(
    ("overrides", "outcome", "detail"),
    [
        pytest.param({**TCP, "port": 8080}, Outcome.CONNECTED, "connected",
                     id="TCP to a listening port connects"),
        pytest.param({**TCP, "port": 8081}, Outcome.REFUSED, "ECONNREFUSED",
                     id="TCP to a port nothing listens on is refused"),
        pytest.param({**TCP, "port": 8082}, Outcome.TIMEOUT, "no answer within 1 s",
                     id="TCP dropped on ingress times out"),
        pytest.param({**TCP, "port": 8083}, Outcome.UNREACHABLE, "EHOSTUNREACH",
                     id="TCP rejected with ICMP admin-prohibited is unreachable"),
        pytest.param({**TCP, "port": 8084}, Outcome.REFUSED, "ECONNREFUSED",
                     id="TCP rejected with a reset is refused, like no listener"),
        pytest.param({**TCP, "port": 8086}, Outcome.TIMEOUT, "no answer",
                     id="TCP dropped by an egress rule in the source times out"),
        pytest.param({**TCP, "destination_ip": "@unreachable_ip"}, Outcome.UNREACHABLE,
                     "EHOSTUNREACH", id="TCP to an unreachable route is unreachable"),
        pytest.param({**TCP, "destination_ip": "@prohibited_ip"}, Outcome.UNREACHABLE, "EACCES",
                     id="TCP to a prohibited route is unreachable (EACCES)"),
        pytest.param({**UDP, "port": 9000}, Outcome.CONNECTED, "nonce echoed",
                     id="UDP to an echo server gets its nonce back"),
        pytest.param({**UDP, "port": 9001}, Outcome.REFUSED, "ECONNREFUSED",
                     id="UDP to a port nothing listens on is refused (ICMP port unreachable)"),
        pytest.param({**UDP, "port": 9002}, Outcome.TIMEOUT, "no reply within 1 s",
                     id="UDP dropped on ingress times out"),
        pytest.param({**UDP, "port": 9003}, Outcome.UNREACHABLE, "EHOSTUNREACH",
                     id="UDP rejected with ICMP admin-prohibited is unreachable"),
        pytest.param({**UDP, "port": 9004}, Outcome.UNREACHABLE, "EPERM",
                     id="UDP dropped by an egress rule in the source is unreachable (EPERM)"),
        pytest.param({"kind": ProbeKind.HTTP, "protocol": "TCP", "port": 8085,
                      "http_path": "/healthz"}, Outcome.HTTP_STATUS, "HTTP 200",
                     id="HTTP GET reads the status code"),
        pytest.param({"kind": ProbeKind.HTTP, "protocol": "TCP", "port": 8085,
                      "http_path": "/missing?x=1"}, Outcome.HTTP_STATUS, "HTTP 404",
                     id="HTTP GET of a missing path reads 404"),
        pytest.param({"kind": ProbeKind.HTTP, "protocol": "TCP", "port": 8081},
                     Outcome.REFUSED, "ECONNREFUSED", id="HTTP to a closed port is refused"),
        pytest.param({"kind": ProbeKind.HTTP, "protocol": "TCP", "port": 8082},
                     Outcome.TIMEOUT, "no answer", id="HTTP dropped on ingress times out"),
        pytest.param({"kind": ProbeKind.HTTP, "protocol": "TCP", "port": 8083},
                     Outcome.UNREACHABLE, "EHOSTUNREACH",
                     id="HTTP rejected with admin-prohibited is unreachable"),
        pytest.param({"kind": ProbeKind.HTTP, "protocol": "TCP", "port": 8080},
                     Outcome.CONNECTED, "no HTTP response",
                     id="HTTP to a non-HTTP listener still proves the path open"),
        pytest.param({"kind": ProbeKind.DNS, "protocol": "UDP", "port": 53,
                      "dns_query_name": DNS_NAME}, Outcome.CONNECTED, f"NOERROR: {DNS_ADDRESS}",
                     id="DNS query from inside the pod gets the A record"),
        pytest.param({"kind": ProbeKind.DNS, "protocol": "UDP", "port": 53,
                      "dns_query_name": "nope.example."}, Outcome.CONNECTED, "NXDOMAIN",
                     id="DNS NXDOMAIN still proves the DNS server reachable"),
        pytest.param({"kind": ProbeKind.DNS, "protocol": "UDP", "port": 9002,
                      "dns_query_name": DNS_NAME}, Outcome.TIMEOUT, "no reply",
                     id="DNS to a dropped port times out"),
        pytest.param({**TCP, "port": 0}, Outcome.ERROR, "invalid assignment: port 0",
                     id="an invalid assignment is an ERROR result, never an exception"),
    ],
)  # fmt: skip
async def test_probe_outcome(
    rig: Rig, overrides: dict[str, Any], outcome: Outcome, detail: str
) -> None:
    a = assignment(rig.bed, **overrides)
    result = await rig.prober.probe(a)
    assert (result.outcome, result.assignment) == (outcome, a), result.detail
    assert detail in result.detail
    assert result.node == "node-a"
    if outcome is Outcome.HTTP_STATUS:
        assert result.http_status == int(detail.split()[-1])
    if outcome is Outcome.TIMEOUT:
        assert 0.9 < result.latency_seconds < 2.5
    elif outcome is not Outcome.ERROR:
        assert result.latency_seconds < 0.9


async def test_sctp_is_reported_as_unsupported_where_the_kernel_lacks_it(rig: Rig) -> None:
    result = await rig.prober.probe(
        assignment(rig.bed, kind=ProbeKind.SCTP, protocol="SCTP", port=8080)
    )
    if sctp_supported():
        assert result.outcome in (Outcome.REFUSED, Outcome.CONNECTED)
    else:
        assert result.outcome is Outcome.ERROR
        assert result.detail == "kernel has no SCTP module (EPROTONOSUPPORT)"


async def test_a_source_pod_not_on_this_node_is_an_error_result(rig: Rig) -> None:
    ghost = PodRef(uid="0b0b0b0b-0000-4000-8000-000000000000", namespace="shop", name="ghost")
    result = await rig.prober.probe(assignment(rig.bed, source=ghost))
    assert result.outcome is Outcome.ERROR
    assert "source pod shop/ghost not found" in result.detail


async def test_probes_leave_through_the_source_pod_address(rig: Rig) -> None:
    seen: list[str] = []
    sock = await _bound(rig.sockets, rig.bed.dst.netns, socket.SOCK_STREAM, 8091)

    async def note_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("peername")[0])
        writer.close()

    server = await asyncio.start_server(note_peer, sock=sock)
    try:
        result = await rig.prober.probe(assignment(rig.bed, port=8091))
        await asyncio.sleep(0.05)
    finally:
        server.close()
        await server.wait_closed()
    assert result.outcome is Outcome.CONNECTED
    assert seen == [rig.bed.src.ip]


async def test_many_probes_share_few_trips_into_the_namespace(rig: Rig) -> None:
    before = rig.sockets.trips
    batch = [assignment(rig.bed, id=f"b{i}") for i in range(200)]
    results = await asyncio.gather(*(rig.prober.probe(a) for a in batch))
    assert {r.outcome for r in results} == {Outcome.CONNECTED}
    assert len({r.id for r in results}) == 200
    # One trip per socket would be 200; the first 64 (the concurrency) go in one trip, the rest in
    # batches of whatever finished in the same loop iteration.
    assert rig.sockets.trips - before <= 20


# --- responders -----------------------------------------------------------------------------------


def responder_request(bed: Bed, aid: str, port: int, protocol: Protocol) -> ResponderRequest:
    return ResponderRequest(
        assignment_id=aid,
        pod=PodRef(uid=bed.dst.uid, namespace="shop", name="api"),
        port=port,
        protocol=protocol,
        ttl_seconds=10,
    )


@pytest.mark.parametrize(
    ("kind", "protocol", "port", "while_open", "extra"),
    [
        pytest.param(ProbeKind.TCP, "TCP", 8090, Outcome.CONNECTED, {},
                     id="a TCP responder turns a refusal into a connection"),
        pytest.param(ProbeKind.UDP, "UDP", 9010, Outcome.CONNECTED, {},
                     id="a UDP responder echoes the nonce"),
        pytest.param(ProbeKind.HTTP, "TCP", 8092, Outcome.HTTP_STATUS, {"http_path": "/x"},
                     id="a TCP responder answers HTTP with 204"),
    ],
)  # fmt: skip
async def test_responder_answers_while_open_and_the_port_is_free_after(
    rig: Rig,
    kind: ProbeKind,
    protocol: Protocol,
    port: int,
    while_open: Outcome,
    extra: dict[str, Any],
) -> None:
    probe = assignment(rig.bed, kind=kind, protocol=protocol, port=port, **extra)
    before = await rig.prober.probe(probe)
    assert before.outcome is Outcome.REFUSED

    report = await rig.responders.open(responder_request(rig.bed, "r1", port, protocol))
    assert report.state is ResponderState.OPENED, report.detail
    during = await rig.prober.probe(probe)
    assert during.outcome is while_open, during.detail
    if while_open is Outcome.HTTP_STATUS:
        assert during.http_status == 204

    rig.responders.release("r1")
    assert rig.responders.open_count == 0
    after = await rig.prober.probe(probe)
    assert after.outcome is Outcome.REFUSED


@pytest.mark.parametrize(
    ("port", "protocol"),
    [
        pytest.param(8080, "TCP", id="a TCP port with a server is left alone"),
        pytest.param(9000, "UDP", id="a UDP port with a server is left alone"),
    ],
)
async def test_responder_reports_a_listener_already_present(
    rig: Rig, port: int, protocol: Protocol
) -> None:
    report = await rig.responders.open(responder_request(rig.bed, "r2", port, protocol))
    assert report.state is ResponderState.LISTENER_PRESENT
    assert rig.responders.open_count == 0


async def test_one_responder_is_shared_and_closes_with_its_last_assignment(rig: Rig) -> None:
    for aid in ("s1", "s2"):
        report = await rig.responders.open(responder_request(rig.bed, aid, 8093, "TCP"))
        assert report.state is ResponderState.OPENED
    assert rig.responders.open_count == 1
    rig.responders.release("s1")
    assert (await rig.prober.probe(assignment(rig.bed, port=8093))).outcome is Outcome.CONNECTED
    rig.responders.release("s2")
    assert (await rig.prober.probe(assignment(rig.bed, port=8093))).outcome is Outcome.REFUSED


async def test_responder_closes_by_itself_after_its_time_to_live(rig: Rig) -> None:
    request = dataclasses.replace(responder_request(rig.bed, "t1", 8094, "TCP"), ttl_seconds=0.2)
    assert (await rig.responders.open(request)).state is ResponderState.OPENED
    await asyncio.sleep(0.4)
    assert rig.responders.open_count == 0
    assert (await rig.prober.probe(assignment(rig.bed, port=8094))).outcome is Outcome.REFUSED


async def test_responder_for_a_pod_not_on_this_node_fails_cleanly(rig: Rig) -> None:
    request = dataclasses.replace(
        responder_request(rig.bed, "g1", 8095, "TCP"),
        pod=PodRef(uid="0b0b0b0b-0000-4000-8000-000000000001", namespace="x", name="y"),
    )
    report = await rig.responders.open(request)
    assert report.state is ResponderState.FAILED
    assert "no running container" in report.detail


async def test_sctp_responder_says_why_it_cannot_open(rig: Rig) -> None:
    report = await rig.responders.open(responder_request(rig.bed, "c1", 8096, "SCTP"))
    if sctp_supported():
        assert report.state is ResponderState.OPENED
        rig.responders.release("c1")
    else:
        assert report.state is ResponderState.FAILED
        assert "kernel has no SCTP module" in report.detail


# --- resolving against the real /proc --------------------------------------------------------------


async def test_resolver_finds_the_pod_namespace_and_notices_when_the_pod_is_gone() -> None:
    with two_pods() as bed:
        resolver = PodResolver("/proc", miss_retry_seconds=0, recheck_seconds=0)
        found = await resolver.resolve(bed.src.uid)
        assert found.pid == bed.src.pid
        assert found.runtime == "containerd"
        assert found.inode == os.stat(bed.src.netns_path).st_ino
        assert (await resolver.resolve(bed.src.uid.upper())).pid == bed.src.pid

        bed.src.stop_process()
        assert not resolver.still_valid(found)
        with pytest.raises(Exception, match="no running container"):
            await resolver.resolve(bed.src.uid)
        # The other pod is unaffected.
        assert (await resolver.resolve(bed.dst.uid)).pid == bed.dst.pid


async def test_a_probe_from_a_pod_that_just_went_away_is_an_error_result() -> None:
    with two_pods() as bed:
        sockets = NetnsSockets()
        prober = Prober(
            node_name="node-a",
            resolver=PodResolver("/proc"),
            sockets=sockets,
            max_concurrency=4,
            destination_rate_per_second=100,
            destination_burst=100,
            max_timeout_seconds=5,
            sctp_supported=False,
        )
        try:
            first = await prober.probe(assignment(bed, port=8081))
            assert first.outcome is Outcome.REFUSED
            bed.src.stop_process()  # the cached namespace is now stale
            gone = await prober.probe(assignment(bed, port=8081))
        finally:
            sockets.close()
    assert gone.outcome is Outcome.ERROR
    assert "source pod shop/frontend not found" in gone.detail
