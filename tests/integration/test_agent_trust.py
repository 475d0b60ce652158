"""Agents trust only their collector: TLS against the CA they were given, the token sent only over a
connection that verified, and assignments only inside the destination policy the collector
announced (never loopback, link-local or the metadata address unless declared).

Real agents (`agent.runtime.serve`) in this process, a real dispatcher on a loopback port, and
for the attacker's side a plain TCP listener and a dispatcher with a certificate of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.runtime import serve
from agent.settings import AgentSettings
from collector.dispatching import Dispatcher, ServerTLS
from flowproof.probes import (
    Assignment,
    DestinationPolicy,
    Outcome,
    PodRef,
    ProbeKind,
    ProbeResult,
)
from lab.certs import issue
from tests.support.tls import ca_pem, server_tls, write_tls

TOKEN = "the-agents-secret-token-3f9a"
POD_NETWORK = DestinationPolicy(networks=("10.244.0.0/16", "10.96.0.10/32"))


async def eventually(check: Callable[[], bool], within: float = 15.0, what: str = "") -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def agent(tmp_path: Path, port: int, **overrides: Any) -> AsyncIterator[None]:
    fields: dict[str, Any] = {
        "node_name": "node-t",
        "collector_address": f"127.0.0.1:{port}",
        "token": TOKEN,
        "ca_file": str(write_tls(tmp_path / "tls").ca),
        "reconnect_initial_seconds": 0.05,
        "reconnect_max_seconds": 0.2,
        "hello_timeout_seconds": 2.0,
        "shutdown_grace_seconds": 1.0,
        "health_port": 0,
        "metrics_port": 0,
        "proc_root": str(tmp_path),  # no pod is ever found: nothing accepted is really sent
    }
    fields.update(overrides)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(AgentSettings(**fields), stop), name="agent under test")
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


# --- the token goes only to the collector --------------------------------------------------------


async def test_a_plain_listener_on_the_collectors_port_never_receives_the_token(
    tmp_path: Path,
) -> None:
    received = bytearray()
    connections = 0

    async def capture(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(ConnectionError):
            received.extend(await asyncio.wait_for(reader.read(65536), 2))
            writer.write(b"\x00" * 64)  # whatever an impostor answers, it is no TLS
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(capture, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with agent(tmp_path, port):
            await eventually(lambda: connections >= 3, what="the agent to try a few times")
    finally:
        server.close()
        await server.wait_closed()
    assert received, "the agent connected and sent its TLS hello"
    assert TOKEN.encode() not in received and b"Bearer" not in received


@pytest.mark.parametrize(
    ("served_for", "agents_trust"),
    [
        pytest.param("127.0.0.1", "their own CA", id="a certificate from another CA"),
        pytest.param("evil.example", "the CA that signed it", id="the right CA, another name"),
    ],
)
async def test_a_collector_the_ca_did_not_vouch_for_gets_no_stream_and_no_token(
    tmp_path: Path, served_for: str, agents_trust: str
) -> None:
    impostor = issue([served_for])
    rogue = Dispatcher(
        token=TOKEN,
        tls=ServerTLS(certificate_chain=impostor.certificate, private_key=impostor.key),
        on_result=lambda _: None,
    )
    port = await rogue.start("127.0.0.1:0")
    ca_file = tmp_path / "agents-ca.crt"
    ca_file.write_bytes(ca_pem() if agents_trust == "their own CA" else impostor.ca)
    try:
        async with agent(tmp_path, port, ca_file=str(ca_file)):
            await asyncio.sleep(2.0)  # several connection attempts
            assert rogue.agents() == []
            assert rogue.refused_total == 0, "not even a refused stream: no call was made"
    finally:
        await rogue.stop(grace_seconds=0)


async def test_the_collector_its_ca_vouches_for_gets_the_stream(tmp_path: Path) -> None:
    dispatcher = Dispatcher(token=TOKEN, tls=server_tls(), on_result=lambda _: None)
    port = await dispatcher.start("127.0.0.1:0")
    try:
        async with agent(tmp_path, port):
            await eventually(lambda: bool(dispatcher.agents()), what="the agent to connect")
    finally:
        await dispatcher.stop(grace_seconds=0)


# --- the destination policy ------------------------------------------------------------------------


def assignment(destination: str, port: int, kind: ProbeKind = ProbeKind.TCP) -> Assignment:
    return Assignment(
        id=f"{uuid.uuid4().hex[:8]}-{destination}",
        source=PodRef(uid="0b0b0b0b-0000-4000-8000-000000000000", namespace="shop", name="a"),
        source_node="node-t",
        destination_ip=destination,
        port=port,
        protocol="UDP" if kind is ProbeKind.DNS else "TCP",
        kind=kind,
        timeout_seconds=0.5,
        dns_query_name="example.org" if kind is ProbeKind.DNS else None,
    )


async def results_for(
    tmp_path: Path, policy: DestinationPolicy, assignments: list[Assignment]
) -> dict[str, ProbeResult]:
    results: dict[str, ProbeResult] = {}

    def take(result: ProbeResult) -> None:
        results[result.assignment.destination_ip] = result

    dispatcher = Dispatcher(token=TOKEN, tls=server_tls(), on_result=take)
    dispatcher.set_destination_policy(policy)
    port = await dispatcher.start("127.0.0.1:0")
    try:
        async with agent(tmp_path, port):
            await eventually(lambda: bool(dispatcher.agents()), what="the agent to connect")
            dispatcher.submit(assignments)
            await eventually(lambda: len(results) == len(assignments), what="every result")
    finally:
        await dispatcher.stop(grace_seconds=0)
    return results


REFUSED = "refused by the agent's destination policy"


async def test_an_assignment_outside_the_policy_is_refused_without_a_packet(tmp_path: Path) -> None:
    assignments = [
        assignment("8.8.8.8", 53, ProbeKind.DNS),
        assignment("169.254.169.254", 80),
        assignment("127.0.0.1", 22),
        assignment("10.244.1.5", 8080),
    ]
    results = await results_for(tmp_path, POD_NETWORK, assignments)
    for destination, why in (
        ("8.8.8.8", "not in the destination policy"),
        ("169.254.169.254", "the cloud metadata address"),
        ("127.0.0.1", "the node's loopback"),
    ):
        result = results[destination]
        assert result.outcome is Outcome.ERROR
        assert REFUSED in result.detail and why in result.detail, result.detail
        assert result.latency_seconds == 0.0
    # Inside the policy: accepted and handed to the prober (which finds no such pod here).
    inside = results["10.244.1.5"]
    assert inside.outcome is Outcome.ERROR and REFUSED not in inside.detail, inside.detail


async def test_a_special_address_is_probed_only_when_an_expectation_declares_it(
    tmp_path: Path,
) -> None:
    declared = DestinationPolicy(
        networks=("169.254.169.254/32", "0.0.0.0/0"), declared=("169.254.169.254/32", "0.0.0.0/0")
    )
    results = await results_for(
        tmp_path,
        declared,
        [assignment("169.254.169.254", 80), assignment("127.0.0.1", 22), assignment("8.8.8.8", 53)],
    )
    assert REFUSED not in results["169.254.169.254"].detail
    assert REFUSED not in results["8.8.8.8"].detail  # 0.0.0.0/0 is declared
    # ... but 0.0.0.0/0 does not open the node's loopback: only a network within it would.
    assert "the node's loopback" in results["127.0.0.1"].detail


async def test_a_policy_change_reaches_connected_agents(tmp_path: Path) -> None:
    results: dict[str, ProbeResult] = {}
    dispatcher = Dispatcher(
        token=TOKEN, tls=server_tls(), on_result=lambda r: results.setdefault(r.assignment.id, r)
    )
    dispatcher.set_destination_policy(POD_NETWORK)
    port = await dispatcher.start("127.0.0.1:0")
    try:
        async with agent(tmp_path, port):
            await eventually(lambda: bool(dispatcher.agents()), what="the agent to connect")
            first = assignment("203.0.113.7", 443)
            dispatcher.submit([first])
            await eventually(lambda: first.id in results)
            assert REFUSED in results[first.id].detail
            dispatcher.set_destination_policy(
                DestinationPolicy(networks=(*POD_NETWORK.networks, "203.0.113.0/24"))
            )
            second = assignment("203.0.113.7", 443)
            dispatcher.submit([second])
            await eventually(lambda: second.id in results)
            assert REFUSED not in results[second.id].detail, results[second.id].detail
    finally:
        await dispatcher.stop(grace_seconds=0)
