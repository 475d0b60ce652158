"""KubernetesSource under faults the real API server cannot be made to show on demand (tests/fakeapi).

Everything else the source does is tested against a real kube-apiserver in
tests/controlplane/test_api_source.py. Here: a connection dropped mid-stream while the server
keeps its history, a missed event only a resync repairs, 5xx answers in a row, a stalling server,
and objects the real API server would never store. Also the client configuration, without a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from collector.core.model import Snapshot
from collector.kube import (
    KubernetesSource,
    KubeSourceSettings,
    load_kube_config,
)
from flowproof.aio import Backoff
from flowproof.errors import ConfigurationError
from tests.fakeapi import FakeApiServer
from tests.support.sourcetools import Updates, changed

TOKEN = "fake-sa-token"
FAST = KubeSourceSettings(
    watch_timeout_seconds=30,
    resync_interval_seconds=0,
    backoff_initial_seconds=0.05,
    backoff_max_seconds=0.2,
    request_timeout_seconds=5,
    list_page_size=500,
    missing_crd_retry_seconds=0.3,
    stop_timeout_seconds=3,
)

# --- builders -------------------------------------------------------------------------------------


def make_namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": labels or {}},
    }


def make_pod(
    name: str,
    namespace: str = "shop",
    *,
    labels: dict[str, str] | None = None,
    ip: str | None = "10.244.1.10",
    phase: str = "Running",
    host_network: bool = False,
    terminating: bool = False,
    node: str = "node-1",
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if ip is not None:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": labels or {"app": name},
    }
    if terminating:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        metadata["deletionGracePeriodSeconds"] = 30
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "nodeName": node,
            "hostNetwork": host_network,
            "containers": [
                {"name": "main", "image": "app", "ports": [{"containerPort": 8080, "name": "http"}]}
            ],
        },
        "status": status,
    }


def make_policy(name: str, namespace: str = "shop", *, port: int = 8080) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": {"app": "api"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                    "ports": [{"protocol": "TCP", "port": port}],
                }
            ],
        },
    }


def make_expectations(
    name: str, namespace: str = "shop", *, expect: str = "allow", port: str = "8080/TCP"
) -> dict[str, Any]:
    return {
        "apiVersion": "flowproof.dev/v1alpha1",
        "kind": "FlowExpectations",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "flows": [
                {
                    "name": "web-to-api",
                    "from": {"podSelector": {"matchLabels": {"app": "web"}}},
                    "to": {"podSelector": {"matchLabels": {"app": "api"}}},
                    "ports": [port],
                    "expect": expect,
                }
            ]
        },
    }


def seed(server: FakeApiServer) -> None:
    server.create(make_namespace("shop", {"team": "shop"}))
    server.create(make_namespace("other"))
    server.create(make_pod("web", labels={"app": "web"}, ip="10.244.1.10"))
    server.create(make_pod("api", labels={"app": "api"}, ip="10.244.1.11"))
    server.create(make_pod("db", "other", labels={"app": "db"}, ip="10.244.2.12", node="node-2"))
    server.create(make_policy("api-ingress"))
    server.create(make_expectations("shop-flows"))


# --- harness --------------------------------------------------------------------------------------


async def eventually(condition: Callable[[], bool], within: float = 2.0) -> None:
    """Poll `condition` (state of the fake server or the source) until it holds."""
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


def write_kubeconfig(path: Path, server: str, token: str | None = TOKEN) -> Path:
    user = f"{{token: {token}}}" if token else "{}"
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{server}"}}}}]
users: [{{name: tester, user: {user}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: tester}}}}]
current-context: fake
"""
    )
    return path


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer(token=TOKEN) as fake:
        yield fake


@pytest.fixture
def kubeconfig(tmp_path: Path, server: FakeApiServer) -> str:
    return str(write_kubeconfig(tmp_path / "kubeconfig", server.url))


@contextlib.asynccontextmanager
async def running(
    server: FakeApiServer, kubeconfig: str, settings: KubeSourceSettings = FAST, *, watches: int = 4
) -> AsyncIterator[tuple[KubernetesSource, Updates]]:
    """A source from the kubeconfig, running, synced, its `watches` open; stopped and closed on
    exit. The fake server is found through the kubeconfig."""
    updates = Updates()
    async with KubernetesSource(
        load_kube_config(kubeconfig), settings=settings, on_update=updates
    ) as source:
        task = asyncio.create_task(source.run(), name="kube-source-under-test")
        try:
            synced = asyncio.ensure_future(source.wait_synced())
            done, _ = await asyncio.wait({synced, task}, timeout=5, return_when="FIRST_COMPLETED")
            if synced not in done:
                synced.cancel()
                if task in done:
                    task.result()  # raises what ended run()
                raise AssertionError("the source did not sync within 5 s")
            await eventually(lambda: server.open_watches() == watches)
            yield source, updates
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def pod_keys(snapshot: Snapshot) -> list[str]:
    return [p.key for p in snapshot.pods]


# --- the initial list -----------------------------------------------------------------------------


# --- every change of every kind -------------------------------------------------------------------


# --- resourceVersion, bookmarks, 410, dropped connections ------------------------------------------


async def test_dropped_connections_reconnect_and_catch_up_without_relisting(
    server: FakeApiServer, kubeconfig: str
) -> None:
    seed(server)
    async with running(server, kubeconfig) as (source, updates):
        resume_from = source.resource_versions["pods"]
        mark = updates.mark
        with server.hold():
            assert server.drop_connections() == 4
            server.create(make_pod("late", labels={"app": "late"}, ip="10.244.1.40"))
            server.delete("Pod", "other", "db")
        update = await updates.after(mark, changed("Pod", "shop/late", "added"), within=2.0)
        if update.snapshot.pod("other/db") is not None:
            update = await updates.after(mark, changed("Pod", "other/db", "deleted"))
        assert pod_keys(update.snapshot) == ["shop/api", "shop/late", "shop/web"]
        assert updates.pods_changes >= 1, "pods only: checked against a diff of the snapshots"
        assert server.requests_for("Pod", watch=True)[1].query["resourceVersion"] == resume_from
        assert len(server.requests_for("Pod", watch=False)) == 1


async def test_resync_relists_and_repairs_a_missed_event(
    server: FakeApiServer, kubeconfig: str
) -> None:
    seed(server)
    async with running(server, kubeconfig, replace(FAST, resync_interval_seconds=1)) as (
        _,
        updates,
    ):
        mark = updates.mark
        server.update(make_pod("web", labels={"app": "web", "missed": "yes"}), silent=True)
        update = await updates.after(mark, changed("Pod", "shop/web", "modified"), within=3)
        web = update.snapshot.pod("shop/web")
        assert web is not None and web.labels.get("missed") == "yes"
        assert updates.pods_changes >= 1, "a relist's changes too: checked against a diff"
        assert len(server.requests_for("Pod", watch=False)) >= 2


async def test_failures_back_off_exponentially_then_recover(
    server: FakeApiServer, kubeconfig: str, caplog: pytest.LogCaptureFixture
) -> None:
    seed(server)
    server.fail_next(4, status=500, path_contains="/api/v1/pods")
    settings = replace(FAST, backoff_initial_seconds=0.05, backoff_max_seconds=1, backoff_jitter=0)
    with caplog.at_level(logging.WARNING, logger="collector.kube"):
        async with running(server, kubeconfig, settings) as (source, _):
            assert len(source.snapshot.pods) == 3
    lists = server.requests_for("Pod", watch=False)
    assert len(lists) == 5
    gaps = [b.at - a.at for a, b in itertools.pairwise(lists)]
    for gap, expected in zip(gaps, [0.05, 0.1, 0.2, 0.4], strict=True):
        assert expected <= gap < expected + 0.5, gaps
    assert sum("listing pods failed: HTTP 500" in r.getMessage() for r in caplog.records) == 4


def test_backoff_doubles_up_to_its_maximum_with_jitter_below_each_step() -> None:
    backoff = Backoff(0.5, 4.0, 0.5, random.Random(7))
    delays = [backoff.next_delay() for _ in range(6)]
    for delay, step in zip(delays, [0.5, 1, 2, 4, 4, 4], strict=True):
        assert step * 0.5 <= delay <= step
    assert len(set(delays)) == 6, "jitter spreads the waits"
    backoff.reset()
    assert backoff.next_delay() <= 0.5


# --- slow API -------------------------------------------------------------------------------------


async def test_a_slow_api_server_does_not_block_the_event_loop(
    server: FakeApiServer, kubeconfig: str
) -> None:
    seed(server)
    server.latency_seconds = 0.6
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    try:
        started = time.monotonic()
        async with running(server, kubeconfig) as (source, updates):
            assert time.monotonic() - started >= 0.6, "the lists were slow"
            mark = updates.mark
            server.create(make_pod("slowpoke", ip="10.244.1.60"))  # events stream at once
            await updates.after(mark, changed("Pod", "shop/slowpoke", "added"))
            assert len(source.snapshot.pods) == 4
    finally:
        ticking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticking
    assert len(gaps) > 40
    assert max(gaps) < 0.1, f"the loop stalled for {max(gaps):.3f} s"


# --- pods in every state, malformed objects ---------------------------------------------------------


async def test_a_malformed_object_is_logged_once_and_left_out(
    server: FakeApiServer, kubeconfig: str, caplog: pytest.LogCaptureFixture
) -> None:
    seed(server)
    bad_pod = make_pod("broken", ip="10.244.1.300")
    bad_expectations = make_expectations("broken", port="99999/TCP")
    server.create(bad_pod)
    with caplog.at_level(logging.WARNING, logger="collector.kube"):
        async with running(server, kubeconfig) as (source, updates):
            assert pod_keys(source.snapshot) == ["other/db", "shop/api", "shop/web"]
            mark = updates.mark
            bad_pod["metadata"]["labels"] = {"app": "still-broken"}
            server.update(bad_pod)  # same problem again: not logged again
            server.create(bad_expectations)
            server.update(make_pod("web", labels={"app": "web", "after": "bad"}))
            await updates.after(mark, changed("Pod", "shop/web", "modified"))
            assert sorted(source.problems) == [
                "FlowExpectations shop/broken",
                "Pod shop/broken",
            ]
            assert "10.244.1.300" in source.problems["Pod shop/broken"]
            assert [e.key for e in source.snapshot.expectations] == ["shop/shop-flows"]

            mark = updates.mark
            server.update(make_pod("broken", ip="10.244.1.31"))  # repaired
            await updates.after(mark, changed("Pod", "shop/broken", "added"))
            assert "Pod shop/broken" not in source.problems
    logged = [
        r.getMessage() for r in caplog.records if "left out of the snapshot" in r.getMessage()
    ]
    assert len(logged) == 2, logged


async def test_a_valid_object_turning_malformed_is_removed(
    server: FakeApiServer, kubeconfig: str
) -> None:
    seed(server)
    async with running(server, kubeconfig) as (source, updates):
        mark = updates.mark
        server.update(make_pod("api", labels={"app": "api"}, ip="not-an-ip"))
        update = await updates.after(mark, changed("Pod", "shop/api", "deleted"))
        assert update.snapshot.pod("shop/api") is None
        assert "Pod shop/api" in source.problems


# --- status ---------------------------------------------------------------------------------------


# --- configuration --------------------------------------------------------------------------------


def test_kubeconfig_precedence(server: FakeApiServer, tmp_path: Path) -> None:
    explicit = write_kubeconfig(tmp_path / "explicit", "http://127.0.0.1:1")
    from_env = write_kubeconfig(tmp_path / "from-env", "http://127.0.0.1:2")
    token_path = tmp_path / "token"
    token_path.write_text(TOKEN)
    ca_path = tmp_path / "ca.crt"
    ca_path.write_text(trustme.CA().cert_pem.bytes().decode())
    in_cluster = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "3"}
    paths = {"token_path": str(token_path), "ca_path": str(ca_path)}

    def host(kubeconfig: str | None, environ: dict[str, str]) -> str:
        return str(load_kube_config(kubeconfig, environ=environ, **paths).host)

    both = {**in_cluster, "KUBECONFIG": str(from_env)}
    assert host(str(explicit), both) == "http://127.0.0.1:1", "the flag wins"
    assert host(None, both) == "http://127.0.0.1:2", "then $KUBECONFIG"
    assert host(None, in_cluster) == "https://127.0.0.1:3", "then the service account"


@pytest.mark.parametrize(
    ("environ", "missing", "reason"),
    [
        pytest.param(
            {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "443"},
            "token",
            "token",
            id="in cluster without a token file names the token",
        ),
        pytest.param(
            {"KUBECONFIG": "BROKEN"},
            None,
            "kubeconfig",
            id="a kubeconfig that is not YAML names the kubeconfig",
        ),
        pytest.param(
            {"KUBECONFIG": "/nonexistent/kubeconfig"},
            None,
            "kubeconfig",
            id="a kubeconfig that does not exist names the kubeconfig",
        ),
    ],
)
def test_configuration_problems_are_configuration_errors(
    tmp_path: Path, environ: dict[str, str], missing: str | None, reason: str
) -> None:
    if environ.get("KUBECONFIG") == "BROKEN":
        broken = tmp_path / "broken"
        broken.write_text("clusters: [unclosed\n")
        environ = {"KUBECONFIG": str(broken)}
    with pytest.raises(ConfigurationError, match=reason):
        load_kube_config(
            environ=environ,
            token_path=str(tmp_path / "token"),
            ca_path=str(tmp_path / "ca.crt"),
        )


def test_settings_are_validated() -> None:
    with pytest.raises(ConfigurationError, match="backoff_jitter"):
        KubeSourceSettings(backoff_jitter=1.0)
    with pytest.raises(ConfigurationError, match="watch_timeout_seconds"):
        KubeSourceSettings(watch_timeout_seconds=0)


# --- the fake itself, on the wire -----------------------------------------------------------------


async def test_the_fake_serves_namespaced_lists_and_watches_and_version(
    server: FakeApiServer,
) -> None:
    seed(server)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(server.url, headers=headers) as http:
        async with http.get("/version") as response:
            assert (await response.json())["major"] == "1"
        async with http.get("/api/v1/namespaces/shop/pods") as response:
            body = await response.json()
        assert body["kind"] == "PodList"
        assert [p["metadata"]["name"] for p in body["items"]] == ["api", "web"]
        assert "kind" not in body["items"][0], "typed list items carry no kind, as in the API"
        version = body["metadata"]["resourceVersion"]

        query = {"watch": "true", "resourceVersion": version, "timeoutSeconds": "1"}
        async with http.get("/api/v1/namespaces/other/pods", params=query) as response:
            server.create(make_pod("in-shop", ip="10.244.1.70"))
            server.create(make_pod("in-other", "other", ip="10.244.2.70"))
            lines = [line async for line in response.content if line.strip()]
        events = [json.loads(line) for line in lines]
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
            ("ADDED", "in-other")
        ]
        async with http.get("/apis/networking.k8s.io/v1/namespaces/shop/networkpolicies") as r:
            assert [p["metadata"]["name"] for p in (await r.json())["items"]] == ["api-ingress"]
        async with http.get("/api/v1/pods", headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
