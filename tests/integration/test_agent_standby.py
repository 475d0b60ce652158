"""Agents and standby collectors: a standby's refusal is no failure, and several addresses are
tried in turn.

Real agents (`agent.runtime.serve`) in this process against real dispatchers on loopback ports
with TLS: a standby is a Dispatcher whose `serving()` is false (as the collector's runtime makes
one while another replica holds the Lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.runtime import serve
from agent.settings import AgentSettings
from collector.dispatching import Dispatcher
from flowproof.errors import ConfigurationError
from tests.support.tls import server_tls, write_tls

TOKEN = "standby-test-agents-token-51c2"


@contextlib.asynccontextmanager
async def dispatcher(
    serving: Callable[[], bool] | None = None,
) -> AsyncIterator[tuple[Dispatcher, int]]:
    found = Dispatcher(token=TOKEN, tls=server_tls(), on_result=lambda r: None, serving=serving)
    port = await found.start("127.0.0.1:0")
    try:
        yield found, port
    finally:
        await found.stop(grace_seconds=0)


@contextlib.asynccontextmanager
async def agent(tmp_path: Path, addresses: list[str], **overrides: Any) -> AsyncIterator[None]:
    fields: dict[str, Any] = {
        "node_name": "node-s",
        "collector_address": ",".join(addresses),
        "token": TOKEN,
        "ca_file": str(write_tls(tmp_path / "tls").ca),
        "reconnect_initial_seconds": 0.05,
        "reconnect_max_seconds": 5.0,
        "hello_timeout_seconds": 2.0,
        "shutdown_grace_seconds": 1.0,
        "health_port": 0,
        "metrics_port": 0,
        "proc_root": str(tmp_path),
    }
    fields.update(overrides)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(AgentSettings(**fields), stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def eventually(check: Callable[[], bool], within: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.02)


async def test_a_standbys_refusals_do_not_back_off_while_other_refusals_do(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Side by side for the same 3 s: one agent refused by a standby, one refused for its token.
    async with (
        dispatcher(serving=lambda: False) as (standby, standby_port),
        dispatcher() as (leader, leader_port),
        agent(tmp_path / "a", [f"127.0.0.1:{standby_port}"], node_name="node-a"),
        agent(tmp_path / "b", [f"127.0.0.1:{leader_port}"], node_name="node-b", token="wrong"),
    ):
        await asyncio.sleep(3.0)
        standby_tries = standby.intake_counters().standby_refusals_total
        refused_tries = leader.intake_counters().streams_refused_total
    # Backing off from 0.05 s (doubling, full jitter, up to 5 s) allows 7-9 tries in 3 s, more
    # than 9 in about 1 run of 120 and more than 12 in about 1 of 200,000 (simulated with the
    # same jitter; 10 once failed CI at a bound of 9); never backing off allows one every 0.05 s
    # at most (plus the TLS handshake), 20 or more.
    assert refused_tries <= 14, refused_tries
    assert standby_tries >= 20, standby_tries
    assert standby.agents() == [] and standby.intake_counters().streams_refused_total == 0
    # The standby reads the hello before it refuses: its refusal never crosses the agent's write
    # of it (which gRPC would report as INTERNAL, a broken stream, not as the refusal).
    broken = [r.getMessage() for r in caplog.records if "stream to the collector broke" in
              r.getMessage() and "UNAUTHENTICATED" not in r.getMessage()]  # fmt: skip
    assert broken == []


async def test_an_agent_given_both_replicas_reaches_the_leader_and_follows_a_takeover(
    tmp_path: Path,
) -> None:
    leads = {"first": False, "second": True}
    async with (
        dispatcher(serving=lambda: leads["first"]) as (first, first_port),
        dispatcher(serving=lambda: leads["second"]) as (second, second_port),
        agent(tmp_path, [f"127.0.0.1:{first_port}", f"127.0.0.1:{second_port}"]),
    ):
        await eventually(lambda: [a.node for a in second.agents()] == ["node-s"], 5, "second")
        assert first.intake_counters().standby_refusals_total >= 1, "tried in turn, first first"
        assert first.agents() == []

        # The leader goes (its stream ends) and the other replica takes the Lease.
        leads["first"] = True
        leads["second"] = False
        await second.stop(grace_seconds=0)
        await eventually(lambda: [a.node for a in first.agents()] == ["node-s"], 5, "takeover")
        assert second.agents() == []


@pytest.mark.parametrize(
    ("address", "named"),
    [
        pytest.param("10.0.0.1:9443,collector", "'collector' in", id="a bad entry is named"),
        pytest.param("10.0.0.1:9443,", "'' in", id="an empty entry is named"),
        pytest.param("collector", "'collector' is not host:port", id="a single bad address"),
    ],
)
def test_each_collector_address_must_be_host_and_port(
    tmp_path: Path, address: str, named: str
) -> None:
    settings = AgentSettings(
        node_name="n",
        collector_address=address,
        token="t",
        ca_file=str(write_tls(tmp_path).ca),
        proc_root=str(tmp_path),
    )
    with pytest.raises(ConfigurationError, match=f"collector_address: {named}"):
        settings.validate()


def test_several_addresses_are_kept_in_order(tmp_path: Path) -> None:
    settings = AgentSettings(collector_address="a:1, b:2,c:3")
    assert settings.collector_addresses == ("a:1", "b:2", "c:3")
