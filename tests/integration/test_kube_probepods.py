"""Probe pods under 5xx answers on demand (tests/fakeapi); the rest against a real API server.

KubernetesProbePods and the collector's probe pods are tested against a real kube-apiserver in
tests/controlplane/test_api_probepods.py and test_api_admission.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest

from collector.cluster import (
    KubernetesProbePods,
)
from collector.core.probepods import ProbePodRequest
from collector.kube import (
    KubeClient,
    load_kube_config,
)
from tests.fakeapi import FakeApiServer
from tests.support.apiobjects import (
    TOKEN,
    kubeconfig_for,
    make_namespace,
)

IMAGE = "registry.k8s.io/pause:3.10"
WEB = ProbePodRequest("shop", (("app", "web"), ("flowproof.dev/probe-pod", "true")))
CACHE = ProbePodRequest("shop", (("app", "cache"), ("flowproof.dev/probe-pod", "true")))
ELSEWHERE = ProbePodRequest("other", (("app", "web"), ("flowproof.dev/probe-pod", "true")))
PODS_PATH = "/api/v1/namespaces/shop/pods"


async def eventually(condition: Callable[[], object], within: float = 3.0) -> None:
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer(token=TOKEN) as fake:
        fake.create(make_namespace("shop"))
        fake.create(make_namespace("other"))
        yield fake


@pytest.fixture
def kubeconfig(tmp_path: Path, server: FakeApiServer) -> str:
    return kubeconfig_for(tmp_path / "kubeconfig", server.url)


@contextlib.asynccontextmanager
async def managing(
    kubeconfig: str,
    *,
    namespaces: Sequence[str] = ("shop",),
    needed_by: Callable[[ProbePodRequest], Sequence[str]] | None = None,
    resync_seconds: float = 30.0,
) -> AsyncIterator[tuple[KubernetesProbePods, asyncio.Event]]:
    """A running manager; stopped (so deleting its pods) on exit unless the test stopped it."""
    manager = KubernetesProbePods(
        KubeClient(load_kube_config(kubeconfig)),
        namespaces=namespaces,
        image=IMAGE,
        needed_by=needed_by,
        resync_seconds=resync_seconds,
        retry_seconds=0.05,
        stop_timeout_seconds=3,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(manager.run(stop), name="probe-pods-under-test")
    try:
        yield manager, stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def tell(manager: KubernetesProbePods, requests: Sequence[ProbePodRequest]) -> None:
    """Hand `requests` to the manager and wait for the pass that follows."""
    before = manager.passes
    await manager(requests)
    await eventually(lambda: manager.passes > before)


def probe_pods(server: FakeApiServer) -> list[str]:
    return [
        f"{p['metadata']['namespace']}/{p['metadata']['name']}"
        for p in server.objects("Pod")
        if p["metadata"].get("labels", {}).get("flowproof.dev/probe-pod") == "true"
    ]


# --- the pod --------------------------------------------------------------------------------------


# --- what is refused ------------------------------------------------------------------------------


# --- deleting -------------------------------------------------------------------------------------


async def test_api_errors_are_retried_and_never_end_the_loop(
    server: FakeApiServer, kubeconfig: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="collector.cluster")
    server.fail_next(1, status=500, path_contains="/api/v1/pods")  # the list
    server.fail_next(2, status=500, path_contains=PODS_PATH)  # two creates
    async with managing(kubeconfig) as (manager, _):
        await manager([WEB])
        # The fake stores the pod before the create's answer reaches the manager: wait for both.
        await eventually(lambda: probe_pods(server) == [WEB.key] and not manager.problems)
        assert manager.problems == {}
        server.forbid(PODS_PATH, method="POST")
        await tell(manager, [WEB, CACHE])
        await tell(manager, [WEB, CACHE])
        assert "403" in manager.problems[CACHE.key]
        assert probe_pods(server) == [WEB.key]
    refusals = [
        r for r in caplog.records if CACHE.key in r.getMessage() and "403" in r.getMessage()
    ]
    assert len(refusals) == 1, "a persistent refusal is logged once"


# --- with the collector ---------------------------------------------------------------------------
