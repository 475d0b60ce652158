"""The Lease elector's rules, against an in-memory store that answers as the API server does
(409 for a create of an existing Lease and for a write at an old resourceVersion).

Short real timings (a lease of 1 s): the rules are about elapsed time on the elector's own
monotonic clock. The same elector against a real kube-apiserver, in two collector processes,
is tests/controlplane/test_api_leader_election.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest

from collector.kube import (
    SERVICE_ACCOUNT_NAMESPACE,
    KubeApiError,
    KubeClient,
    LeaseRecord,
    micro_time,
)
from collector.leading import LeadershipLost, LeaseElector, LeaseTiming, when_leading
from collector.runtime import lease_elector
from collector.settings import CollectorSettings
from flowproof.errors import ConfigurationError

NS, NAME = "flowproof", "flowproof-collector"
TIMING = LeaseTiming(duration_seconds=1.0, renew_deadline_seconds=0.5, retry_period_seconds=0.05)


class Store:
    """One Lease, versioned; `failing` makes every request fail as an unreachable API would."""

    def __init__(self) -> None:
        self.record: LeaseRecord | None = None
        self.version = 0
        self.failing = False
        self.writes: list[LeaseRecord] = []

    def _check(self) -> None:
        if self.failing:
            raise KubeApiError("lease", None, "connection refused")

    def _store(self, record: LeaseRecord) -> LeaseRecord:
        self.version += 1
        self.record = replace(record, resource_version=str(self.version))
        self.writes.append(self.record)
        return self.record

    async def read_lease(self, namespace: str, name: str) -> LeaseRecord | None:
        self._check()
        return self.record

    async def create_lease(
        self, namespace: str, name: str, record: LeaseRecord
    ) -> LeaseRecord | None:
        self._check()
        if self.record is not None:
            return None
        return self._store(record)

    async def replace_lease(
        self, namespace: str, name: str, record: LeaseRecord
    ) -> LeaseRecord | None:
        self._check()
        if self.record is None or record.resource_version != self.record.resource_version:
            return None
        return self._store(record)

    def hold(self, holder: str, *, duration: int = 1) -> None:
        """Another replica writes the Lease (acquires or renews it) now."""
        now = micro_time(time.time())
        transitions = 0 if self.record is None else self.record.transitions
        self._store(LeaseRecord(holder, duration, now, now, transitions))


def elector(store: Store, identity: str, timing: LeaseTiming = TIMING) -> LeaseElector:
    return LeaseElector(store, namespace=NS, name=NAME, identity=identity, timing=timing)


@contextlib.asynccontextmanager
async def running(candidate: LeaseElector) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(candidate.run(stop))
    try:
        yield task
    finally:
        stop.set()
        with contextlib.suppress(LeadershipLost):
            await asyncio.wait_for(task, 5)


async def until(check: object, within: float = 5.0) -> float:
    """Wait until `check()` holds; the seconds it took."""
    start = time.monotonic()
    while not check():  # type: ignore[operator]
        assert time.monotonic() - start < within, f"not within {within} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def test_a_lone_replica_creates_the_lease_and_leads() -> None:
    store = Store()
    a = elector(store, "a")
    async with running(a):
        await until(a.leading.is_set)
        assert store.record is not None
        assert (store.record.holder, store.record.duration_seconds) == ("a", 1)
        assert store.record.transitions == 0
        first = store.record.renewed_at
        await until(lambda: store.record is not None and store.record.renewed_at != first)
        assert store.record.acquired_at == store.writes[0].acquired_at, "renewing keeps it"


async def test_of_two_replicas_exactly_one_leads() -> None:
    store = Store()
    a, b = elector(store, "a"), elector(store, "b")
    async with running(a), running(b):
        await until(lambda: a.leading.is_set() or b.leading.is_set())
        await asyncio.sleep(1.5)  # longer than the lease: the leader keeps it, the other waits
        assert a.leading.is_set() != b.leading.is_set()
        leader = "a" if a.leading.is_set() else "b"
        assert store.record is not None and store.record.holder == leader
        assert {w.holder for w in store.writes} == {leader}


async def test_a_standby_takes_the_lease_only_after_seeing_it_unrenewed_for_its_duration() -> None:
    store = Store()
    store.hold("old")
    b = elector(store, "b")
    async with running(b):
        for _ in range(8):  # the old leader renews every 0.2 s: never taken
            await asyncio.sleep(0.2)
            store.hold("old")
            assert not b.leading.is_set()
        # The old leader stops renewing: taken once one duration passed since the last renewal.
        waited = await until(b.leading.is_set)
        assert 1.0 - 0.2 <= waited <= 1.0 + 3 * TIMING.retry_period_seconds * 1.2 + 0.2
        assert store.record is not None
        assert (store.record.holder, store.record.transitions) == ("b", 1)


async def test_a_released_lease_is_taken_at_once() -> None:
    store = Store()
    a, b = elector(store, "a"), elector(store, "b")
    async with running(a):
        await until(a.leading.is_set)
        async with running(b):
            await asyncio.sleep(0.2)
            assert not b.leading.is_set()
    # `running(a)` ended with a stop: a released the Lease.
    assert store.record is not None and store.record.holder == ""
    assert store.record.duration_seconds == 1
    async with running(b):
        waited = await until(b.leading.is_set)
        assert waited < 0.5, "not one lease duration: at once"
        assert store.record is not None and store.record.transitions == 1


async def test_a_leader_that_cannot_renew_stops_leading_at_the_renew_deadline() -> None:
    store = Store()
    a = elector(store, "a")
    async with running(a) as task:
        await until(a.leading.is_set)
        store.failing = True
        cut = time.monotonic()
        with pytest.raises(LeadershipLost, match=r"not renewed for 0\.5 s"):
            await asyncio.wait_for(task, 5)
        lost_after = time.monotonic() - cut
        assert not a.leading.is_set()
        # Before the lease runs out for a standby (1 s after the last renewal it saw).
        assert 0.4 <= lost_after < TIMING.duration_seconds


async def test_a_leader_that_finds_the_lease_held_by_another_stops_at_once() -> None:
    store = Store()
    a = elector(store, "a")
    async with running(a) as task:
        await until(a.leading.is_set)
        store.hold("intruder", duration=60)
        with pytest.raises(LeadershipLost, match="held by 'intruder'"):
            await asyncio.wait_for(task, 2)
        assert not a.leading.is_set()
        assert store.record is not None and store.record.holder == "intruder", "not released"


async def test_a_leader_rides_out_api_failures_shorter_than_the_renew_deadline() -> None:
    store = Store()
    a = elector(store, "a")
    async with running(a) as task:
        await until(a.leading.is_set)
        store.failing = True
        await asyncio.sleep(0.25)
        store.failing = False
        await asyncio.sleep(0.6)
        assert a.leading.is_set() and not task.done()


async def test_acting_tasks_start_only_once_leading_and_never_after_a_stop() -> None:
    store = Store()
    store.hold("other", duration=60)
    b = elector(store, "b")
    started: list[str] = []

    async def act() -> None:
        started.append("acting")

    stop = asyncio.Event()
    async with running(b):
        waiting = asyncio.create_task(when_leading(b, stop, act))
        await asyncio.sleep(0.3)
        assert not started and not waiting.done()
        stop.set()
        await asyncio.wait_for(waiting, 1)
        assert not started

    store.record = None
    stop = asyncio.Event()
    async with running(b):
        await asyncio.wait_for(when_leading(b, stop, act), 2)
        assert started == ["acting"]


def test_outside_a_pod_the_lease_namespace_must_be_given() -> None:
    assert not Path(SERVICE_ACCOUNT_NAMESPACE).exists(), "this test runs outside a pod"
    store = cast(KubeClient, Store())
    with pytest.raises(ConfigurationError, match="leader_election_namespace: required outside"):
        lease_elector(CollectorSettings(leader_election=True), store)
    named = lease_elector(
        CollectorSettings(leader_election=True, leader_election_namespace="flowproof"), store
    )
    assert (named.namespace, named.name) == ("flowproof", "flowproof-collector")
    assert named.identity, "the host name by default"
