"""`POST /api/v1/verify` makes agents send traffic, so it needs the collector's token; every other
HTTP route stays read-only and open to whoever may reach the port."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from collector.dispatching import Dispatcher
from collector.leading import LeaseElector, LeaseStore
from collector.loop import Collector
from collector.runtime import build_http_app
from collector.settings import CollectorSettings
from flowproof.verifying import CollectorStandby, read_token, request_verification
from tests.support.tls import server_tls


@pytest.fixture
async def client() -> AsyncIterator[TestClient[Any, Any]]:
    settings = CollectorSettings(token="agents-token", verify_token="verify-token")
    collector = Collector(settings)
    dispatcher = Dispatcher(token=settings.token, tls=server_tls(), on_result=collector.on_result)
    app = build_http_app(collector, dispatcher, verify_tokens=settings.verify_tokens)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no token"),
        pytest.param({"Authorization": "Bearer wrong"}, id="a wrong token"),
        pytest.param(
            {"Authorization": "Bearer agents-token"},
            id="the agents' token when a verify token is set",
        ),
        pytest.param({"Authorization": "verify-token"}, id="the token without Bearer"),
    ],
)
async def test_verify_without_the_token_is_refused(
    client: TestClient[Any, Any], headers: dict[str, str]
) -> None:
    response = await client.post("/api/v1/verify", json={"timeout_seconds": 0.1}, headers=headers)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "needs Authorization: Bearer" in (await response.json())["error"]


async def test_verify_with_the_token_runs(client: TestClient[Any, Any]) -> None:
    response = await client.post(
        "/api/v1/verify",
        json={"timeout_seconds": 0.1},
        headers={"Authorization": "Bearer verify-token"},
    )
    assert response.status == 200
    answer = await response.json()
    assert answer["decided"] is False and answer["reasons"] == [
        "the collector has no inventory yet"
    ]


async def test_read_only_routes_need_no_token(client: TestClient[Any, Any]) -> None:
    for path in ("/healthz", "/metrics", "/api/v1/flows", "/api/v1/debug/loop"):
        response = await client.get(path)
        assert response.status in (200, 503), path


def test_without_a_verify_token_the_agents_token_is_the_one() -> None:
    assert CollectorSettings(token="t").verify_tokens == ("t",)
    assert CollectorSettings(token="t", verify_token="v").verify_tokens == ("v",)


def test_the_verify_client_finds_its_token_in_order(tmp_path: Any) -> None:
    flag, env_file, lab_file = (tmp_path / n for n in ("flag", "env", "lab"))
    for path, text in (
        (flag, "from-flag\n"),
        (env_file, "from-env-file\n"),
        (lab_file, "from-lab\n"),
    ):
        path.write_text(text)
    assert read_token(str(flag), {"FLOWPROOF_VERIFY_TOKEN": "v"}, str(lab_file)) == "from-flag"
    assert read_token(None, {"FLOWPROOF_VERIFY_TOKEN": "v"}, str(lab_file)) == "v"
    environ = {"FLOWPROOF_VERIFY_TOKEN_FILE": str(env_file), "FLOWPROOF_TOKEN": "t"}
    assert read_token(None, environ, str(lab_file)) == "from-env-file"
    assert read_token(None, {"FLOWPROOF_TOKEN": "t"}, str(lab_file)) == "t"
    assert read_token(None, {}, str(lab_file)) == "from-lab"
    assert read_token(None, {}, None) == ""


def standby_app() -> tuple[web.Application, LeaseElector]:
    """A collector's HTTP app with leader election on, a standby while the Lease is held by
    collector-0 (its elector, to make it lead)."""
    settings = CollectorSettings(token="agents-token", leader_election=True)
    collector = Collector(settings)
    dispatcher = Dispatcher(token=settings.token, tls=server_tls(), on_result=collector.on_result)
    elector = LeaseElector(
        cast(LeaseStore, None), namespace="flowproof", name="flowproof-collector", identity="me"
    )
    elector.holder = "collector-0"
    app = build_http_app(
        collector, dispatcher, verify_tokens=settings.verify_tokens, elector=elector
    )
    return app, elector


async def test_a_standby_refuses_verify_naming_the_leader_and_says_so_in_its_summary() -> None:
    app, elector = standby_app()
    async with TestClient(TestServer(app)) as client:
        response = await client.post(
            "/api/v1/verify",
            json={"timeout_seconds": 0.1},
            headers={"Authorization": "Bearer agents-token"},
        )
        assert response.status == 503
        assert response.headers["Retry-After"] == "2"
        assert "standby" in (error := (await response.json())["error"])
        assert "the leader is collector-0" in error
        summary = await (await client.get("/api/v1/summary")).json()
        assert (summary["role"], summary["leader"]) == ("standby", "collector-0")
        metrics = await (await client.get("/metrics")).text()
        assert "flowproof_collector_leader 0.0" in metrics
        assert "flowproof_flows{" not in metrics

        elector.leading.set()
        elector.holder = "me"
        summary = await (await client.get("/api/v1/summary")).json()
        assert (summary["role"], summary["leader"]) == ("leader", "me")
        response = await client.post(
            "/api/v1/verify",
            json={"timeout_seconds": 0.1},
            headers={"Authorization": "Bearer agents-token"},
        )
        assert response.status == 200


async def test_verify_asks_again_past_a_standby_and_says_so_when_none_leads() -> None:
    app, elector = standby_app()
    async with TestServer(app) as server:
        url = str(server.make_url("/"))
        with pytest.raises(CollectorStandby, match="the leader is collector-0"):
            await request_verification(url, 2.5, token="agents-token")
        asyncio.get_running_loop().call_later(1.0, elector.leading.set)
        started = time.monotonic()
        answer = await request_verification(url, 4.0, token="agents-token")
        assert answer["reasons"] == ["the collector has no inventory yet"]
        assert time.monotonic() - started >= 1.0, "the first answers came from the standby"
