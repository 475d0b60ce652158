"""`python -m agent` as a process: exit codes, SIGTERM, and a root task that dies."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from collector.dispatching import Dispatcher
from flowproof.aio import run_root_tasks
from flowproof.probes import ProbeResult
from tests.support.tls import server_tls, write_tls

ROOT = Path(__file__).resolve().parents[2]


async def run_agent(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", *args,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def test_settings_that_cannot_work_exit_2_with_the_reason() -> None:
    proc = await run_agent("--collector-address", "127.0.0.1:1", env={"FLOWPROOF_TOKEN": "t"})
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert b"node_name: required" in err


async def test_sigterm_stops_a_connected_agent_gracefully_with_exit_0(tmp_path: Path) -> None:
    results: list[ProbeResult] = []
    dispatcher = Dispatcher(token="tok", tls=server_tls(), on_result=results.append)
    port = await dispatcher.start("127.0.0.1:0")
    token_file = tmp_path / "token"
    token_file.write_text("tok\n")
    proc = await run_agent(
        "--node-name", "node-r", "--collector-address", f"127.0.0.1:{port}",
        "--token-file", str(token_file), "--ca-file", str(write_tls(tmp_path).ca),
    )  # fmt: skip
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not dispatcher.agents():
            assert loop.time() < deadline, "the agent never connected"
            assert proc.returncode is None
            await asyncio.sleep(0.05)
        [info] = dispatcher.agents()
        assert (info.node, info.agent_version) == ("node-r", "0.1.0")
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        assert b"starting" in err and b"tok" not in err  # settings logged once, token never
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await dispatcher.stop(grace_seconds=0)


@pytest.mark.parametrize(
    ("behaviour", "code"),
    [
        pytest.param("raise", 1, id="a root task that fails stops the agent with exit 1"),
        pytest.param("return", 1, id="a root task that ends on its own is a failure too"),
        pytest.param("stop", 0, id="a stop request ends every root task with exit 0"),
        pytest.param("hang", 1, id="a root task that does not stop in time is a failure"),
    ],
)
async def test_root_tasks(behaviour: str, code: int) -> None:
    stop = asyncio.Event()
    drained: list[str] = []

    async def other() -> None:
        await asyncio.sleep(0.01)
        if behaviour == "raise":
            raise RuntimeError("boom")
        if behaviour in ("stop", "hang"):
            stop.set()
        if behaviour == "hang":
            await asyncio.sleep(3600)

    async def steady() -> None:
        await stop.wait()
        drained.append("steady")  # the graceful path: a root task returns after stop

    roots = {"other": other(), "steady": steady()}
    assert await asyncio.wait_for(run_root_tasks(roots, stop, grace_seconds=0.5), 5) == code
    assert drained == ["steady"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_health_follows_the_stream_and_metrics_are_served(tmp_path: Path) -> None:
    import aiohttp
    import grpc.aio
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    dispatcher = Dispatcher(token="tok", tls=server_tls(), on_result=lambda _: None)
    port = await dispatcher.start("127.0.0.1:0")
    health_port, metrics_port = free_port(), free_port()
    proc = await run_agent(
        "--node-name", "node-h", "--collector-address", f"127.0.0.1:{port}",
        "--ca-file", str(write_tls(tmp_path).ca),
        "--listen-address", "127.0.0.1", "--health-port", str(health_port),
        "--metrics-port", str(metrics_port), env={"FLOWPROOF_TOKEN": "tok"},
    )  # fmt: skip
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{health_port}")
    stub = health_pb2_grpc.HealthStub(channel)

    async def status(service: str) -> int:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return int(reply.status)

    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            try:
                if (
                    await status("flowproof.v1.AgentService")
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    break
            except grpc.aio.AioRpcError:
                pass
            assert loop.time() < deadline, "readiness never turned SERVING"
            await asyncio.sleep(0.1)
        assert await status("") == health_pb2.HealthCheckResponse.SERVING
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp,
        ):
            text = await resp.text()
        assert "flowproof_agent_collector_connected 1.0" in text
        assert 'flowproof_agent_build_info{node="node-h"' in text
        await dispatcher.stop(grace_seconds=0)  # the stream drops: readiness must follow
        deadline = loop.time() + 30
        while await status("flowproof.v1.AgentService") == health_pb2.HealthCheckResponse.SERVING:
            assert loop.time() < deadline, "readiness stayed SERVING without a collector"
            await asyncio.sleep(0.1)
        assert await status("") == health_pb2.HealthCheckResponse.SERVING  # still alive
    finally:
        await channel.close()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.communicate(), 30)
        await dispatcher.stop(grace_seconds=0)
