"""Two collector processes and one Lease on a real kube-apiserver: one leads, the other stands by.

Both are `python -m collector --source kubernetes --leader-election`, as the Deployment runs
them, authenticated as the collector's ServiceAccount with the RBAC that deploy/overlays/plain
renders (the lease Role included), on short lease timings (3 s, renew deadline 2 s, retry
0.5 s). Real agents (the agent's own `CollectorLink`, in this process) are given both
collectors' addresses, the standby's first (tests/support/leaderelection.py).

The leader is killed (SIGKILL: no release). The standby must take the Lease within the lease
duration and a retry period, and then every result an agent produced must be counted by exactly
one collector (the delivery ledgers in their state directories, compared id by id with what the
agents produced), or refused by the new leader as not issued by it: none lost silently, none
counted twice. A graceful stop (SIGTERM) releases the Lease for the next one at once.
A control plane of its own: the Lease and the collectors' writes stay here.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.controlplane import ControlPlane
from tests.support.leaderelection import (
    DURATION,
    RETRY,
    Plane,
    agents,
    collectors,
    delivered_total,
    holder,
    holder_or_none,
    refused,
    setup_plane,
    start_collector,
    until_delivered,
    until_holder,
)


@pytest.fixture(scope="module")
def plane(controlplane_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    with ControlPlane(controlplane_bin) as cp:
        yield setup_plane(cp, tmp_path_factory.mktemp("leading"))


async def test_the_standby_takes_over_a_killed_leader_and_no_result_is_lost_or_counted_twice(
    plane: Plane, tmp_path: Path
) -> None:
    with collectors() as started:
        a = start_collector(plane, tmp_path, "collector-a")
        started.append(a)
        await until_holder(plane, "collector-a", within=15)
        b = start_collector(plane, tmp_path, "collector-b")
        started.append(b)
        await asyncio.sleep(2 * RETRY)
        assert a.metrics()[("flowproof_collector_leader", ())] == 1
        assert b.metrics()[("flowproof_collector_leader", ())] == 0

        async with agents(plane, tmp_path, [b.address, a.address]) as run:
            await until_delivered(a, 20)
            assert b.metrics()[("flowproof_streams_refused_standby_total", ())] >= 2
            assert delivered_total(b) == 0, "a standby takes no results"
            assert holder_or_none(plane) == "collector-a"

            a.process.send_signal(signal.SIGKILL)  # no release: the Lease must run out
            killed = time.monotonic()
            a.process.wait(10)
            await until_holder(plane, "collector-b", within=DURATION + 10)
            took = time.monotonic() - killed
            assert took <= DURATION + 2 * RETRY * 1.2 + 1.0, f"took over after {took:.1f} s"
            assert holder(plane) == ("collector-b", 1)

            before = delivered_total(b)
            await until_delivered(b, before + 20)
            assert b.metrics()[("flowproof_collector_leader", ())] == 1

        # The agents stopped: everything they produced was acked by someone, nothing dropped.
        assert all(len(link.outbox) == 0 for link in run.links)
        assert all(link.outbox.dropped_total == 0 for link in run.links)
        refusals = refused(b)
        b.process.send_signal(signal.SIGTERM)
        assert b.process.wait(20) == 0
        assert holder_or_none(plane) == "", "a graceful stop releases the Lease"

        produced = run.produced
        assert len(produced) == len(set(produced)), "result ids are unique"
        by_a, by_b = a.delivered(), b.delivered()
        assert by_a and by_b
        assert not by_a & by_b, "a result counted by both collectors"
        assert by_a | by_b <= set(produced), "a collector counted a result nobody produced"
        uncounted = set(produced) - by_a - by_b
        not_issued = refusals.get("not issued by this collector", 0)
        # What neither counted was refused by b as a's (its seal is not b's): a's results still
        # unacked when it died. b may also refuse some a had counted (a's ack lost with it).
        assert len(uncounted) <= not_issued <= len(set(produced) - by_b)
        assert {r: v for r, v in refusals.items() if r != "not issued by this collector"} == {
            r: 0 for r in refusals if r != "not issued by this collector"
        }


async def test_a_gracefully_stopped_leader_hands_the_lease_over_within_a_retry_period(
    plane: Plane, tmp_path: Path
) -> None:
    with collectors() as started:
        first = start_collector(plane, tmp_path, "collector-c")
        started.append(first)
        await until_holder(plane, "collector-c", within=DURATION + 10)
        second = start_collector(plane, tmp_path, "collector-d")
        started.append(second)
        await asyncio.sleep(2 * RETRY)
        assert holder_or_none(plane) == "collector-c"
        first.process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert await asyncio.to_thread(first.process.wait, 20) == 0
        await until_holder(plane, "collector-d", within=DURATION + 10)
        took = time.monotonic() - stopped
        assert took < DURATION, f"{took:.1f} s: the release was not used"
        assert "released lease flowproof/flowproof-collector" in first.log.read_text()
