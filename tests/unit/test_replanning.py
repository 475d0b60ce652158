"""Planning off the event loop: the replanner builds plans in a worker thread, the newest snapshot
wins, and the loop keeps running meanwhile (measured with the loop-lag probe)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import time

import pytest

from collector import loop as loop_module
from collector.core.changes import diff_snapshots
from collector.core.model import Snapshot
from collector.core.planning import RULES_CHANGED
from collector.core.scheduling import PreparedPlan, prepare_plan
from collector.core.settings import PlannerSettings
from collector.loop import Collector
from collector.settings import CollectorSettings
from flowproof.aio import event_loop_lag
from tests.support.clock import ManualClock
from tests.unit.make import make_pod, make_policy, make_snapshot, sel
from tests.unit.test_planning import two_flows


def _snapshot(version: str) -> Snapshot:
    return make_snapshot(
        [make_pod("x/a", labels={"app": "a", "v": version}), make_pod("x/b", labels={"app": "b"})]
    )


@pytest.mark.asyncio
async def test_snapshots_queued_during_a_replan_collapse_into_the_newest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    planned: list[int] = []

    def slow_prepare(
        snapshot: Snapshot, settings: PlannerSettings, *, generation: int
    ) -> PreparedPlan:
        time.sleep(0.3)  # a large cluster's build_plan, in the worker thread
        planned.append(generation)
        return prepare_plan(snapshot, settings, generation=generation)

    monkeypatch.setattr(loop_module, "prepare_plan", slow_prepare)
    collector = Collector(CollectorSettings(token="t"))
    stop = asyncio.Event()
    lags: list[float] = []
    replanner = asyncio.create_task(collector.replanner(stop))
    probe = asyncio.create_task(event_loop_lag(lags.append, stop, interval_seconds=0.01))
    await asyncio.sleep(0)
    snapshots = [_snapshot(str(i)) for i in range(4)]
    previous = None
    changes = []
    for generation, snapshot in enumerate(snapshots, start=1):
        changes.append(
            diff_snapshots(previous, snapshot, generation=generation, at=float(generation))
        )
        previous = snapshot
    await collector.on_snapshot(snapshots[0], changes[0], wait=False)
    await asyncio.sleep(0.05)  # the first replan is under way in the thread
    for snapshot, change in zip(snapshots[1:3], changes[1:3], strict=True):
        await collector.on_snapshot(snapshot, change, wait=False)
    await collector.on_snapshot(snapshots[3], changes[3])  # waits until it (or newer) is applied
    stop.set()
    await asyncio.gather(replanner, probe)
    # 2 and 3 were replaced by 4 before planning; 4 (three pods changed) was planned by an
    # update of 1's plan, its whole plan due only an interval after 1's.
    assert planned == [1]
    assert collector.updates_total == 1
    assert collector.snapshots_coalesced_total == 2
    assert collector.generation == 4 and collector.snapshot is snapshots[3]
    assert collector.planner.plan.generation == 4
    assert max(lags) < 0.1, f"the loop stalled {max(lags):.3f}s while plans were built"
    assert len(lags) > 20, "the probe ran all along"


def test_a_merged_change_keeps_every_key_and_the_first_date() -> None:
    first = diff_snapshots(_snapshot("0"), _snapshot("1"), generation=2, at=10.0)
    then = dataclasses.replace(
        diff_snapshots(_snapshot("1"), _snapshot("1"), generation=3, at=12.0),
        pods_added=frozenset({"x/c"}),
    )
    merged = loop_module.merge_changes(first, then)
    assert merged.generation == 3
    assert merged.at == 10.0
    assert merged.pods_changed == {"x/a"}
    assert merged.pods_added == {"x/c"}


@pytest.mark.asyncio
async def test_without_the_replanner_a_snapshot_is_planned_before_on_snapshot_returns() -> None:
    collector = Collector(CollectorSettings(token="t"))
    snapshot = _snapshot("0")
    await collector.on_snapshot(snapshot, diff_snapshots(None, snapshot, generation=1, at=1.0))
    assert collector.planner.plan.generation == 1
    assert collector.replans_total == 1


@pytest.mark.asyncio
async def test_the_plan_sender_hands_assignments_lost_past_their_deadline_to_forget() -> None:
    """A lost assignment is issued again under a new id, and the old one is handed to `forget`
    (the dispatcher drops it) once: nothing piles up for a node whose agent never comes."""
    clock = ManualClock(1000.0)
    sent: list[str] = []
    forgotten: list[str] = []
    planner_settings = PlannerSettings(
        witnesses=False, sweep_probes_per_second=0, result_grace_seconds=5.0, freshness_seconds=60
    )
    collector = Collector(
        CollectorSettings(token="t", planner=planner_settings),
        send=lambda batch: sent.extend(a.id for a in batch),
        forget=forgotten.extend,
        clock=clock,
    )
    snapshot = two_flows()
    stop = asyncio.Event()
    replanner = asyncio.create_task(collector.replanner(stop))
    await collector.on_snapshot(snapshot, diff_snapshots(None, snapshot, generation=1, at=1000.0))
    sender = asyncio.create_task(collector.plan_sender(stop))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if len(sent) >= 2:
            break
    first = list(sent)
    assert len(first) == 2 and forgotten == []
    clock.advance(30.0)  # past timeout + grace: both lost, both issued again
    collector.wake()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if len(sent) >= 4:
            break
    stop.set()
    await asyncio.gather(replanner, sender)
    assert sorted(forgotten) == sorted(first)
    assert len(set(sent)) == 4 and not set(sent[2:]) & set(first)


@pytest.mark.asyncio
async def test_a_pod_change_reaches_the_plan_by_an_update_before_the_whole_plan_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The update (declared flows, the witnesses of the plan before) is applied at once; the
    whole plan of the same snapshot follows once the last whole plan is `interval_seconds` old,
    and replaces the update when it is done (slow, in its thread)."""
    wholes: list[tuple[int, float]] = []

    def slow_prepare(
        snapshot: Snapshot, settings: PlannerSettings, *, generation: int
    ) -> PreparedPlan:
        wholes.append((generation, time.monotonic()))
        if generation > 1:
            time.sleep(0.3)  # a large cluster's whole plan
        return prepare_plan(snapshot, settings, generation=generation)

    monkeypatch.setattr(loop_module, "prepare_plan", slow_prepare)
    announced: list[object] = []
    interval = 0.8
    collector = Collector(
        CollectorSettings(token="t", planner=PlannerSettings(interval_seconds=interval)),
        announce=announced.append,
    )
    stop = asyncio.Event()
    replanner = asyncio.create_task(collector.replanner(stop))
    first, second = _snapshot("0"), _snapshot("1")
    await collector.on_snapshot(first, diff_snapshots(None, first, generation=1, at=1.0))
    assert collector.planner.plan.basis is None and len(announced) == 1
    await collector.on_snapshot(
        second, diff_snapshots(first, second, generation=2, at=2.0), wait=False
    )
    for _ in range(40):
        await asyncio.sleep(0.01)
        if collector.planner.plan.generation == 2:
            break
    plan = collector.planner.plan
    assert plan.generation == 2 and plan.basis == 1, "the update came first"
    assert collector.updates_total == 1 and [g for g, _ in wholes] == [1]
    assert collector.snapshot is second
    assert len(announced) == 1, "the pods' addresses did not change: the policy is kept"
    for _ in range(300):
        await asyncio.sleep(0.01)
        if len(wholes) == 2 and collector.planner.plan.basis is None:
            break
    stop.set()
    await replanner
    assert [g for g, _ in wholes] == [1, 2]
    assert wholes[1][1] - wholes[0][1] >= interval * 0.9, "not before the interval"
    assert collector.planner.plan.generation == 2 and collector.planner.plan.basis is None


@pytest.mark.asyncio
async def test_a_policy_change_reaches_the_plan_at_once_and_verify_gets_the_whole_plan_on_asking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A changed policy: the declared flows are planned again at once (an update, every
    policy PENDING); `wait_whole` (what verify calls) has the whole plan built now, not
    `interval_seconds` after the last one."""
    wholes: list[int] = []

    def counted(snapshot: Snapshot, settings: PlannerSettings, *, generation: int) -> PreparedPlan:
        wholes.append(generation)
        return prepare_plan(snapshot, settings, generation=generation)

    monkeypatch.setattr(loop_module, "prepare_plan", counted)
    collector = Collector(
        CollectorSettings(
            token="t", planner=PlannerSettings(interval_seconds=3600, freshness_seconds=9000)
        )
    )
    stop = asyncio.Event()
    replanner = asyncio.create_task(collector.replanner(stop))
    first = _snapshot("0")
    deny = make_policy("deny-a", "x", selector=sel({"app": "a"}), ingress=[])
    second = dataclasses.replace(first, policies=(deny,))
    await collector.on_snapshot(first, diff_snapshots(None, first, generation=1, at=1.0))
    assert await collector.wait_whole(0.1), "a first plan is whole"
    await collector.on_snapshot(second, diff_snapshots(first, second, generation=2, at=2.0))
    plan = collector.planner.plan
    assert (plan.generation, plan.basis, wholes) == (2, 1, [1]), "an update, no whole plan yet"
    assert [(e.policy, e.status) for e in collector.state.evidence()] == [("x/deny-a", "PENDING")]
    assert await collector.wait_whole(5.0)
    stop.set()
    await replanner
    assert wholes == [1, 2] and collector.planner.plan.basis is None
    (evidence,) = collector.state.evidence()
    assert evidence.status != "PENDING" or evidence.reason != RULES_CHANGED


def test_the_replan_benchmark_measures_the_loop_through_updates_and_whole_plans(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench/replan_bench.py at a small size, so it cannot rot: the churn is planned by updates,
    with whole plans among them (`--interval`), and the loop-lag probe sampled throughout."""
    from bench import replan_bench

    argv = ["replan_bench", "--generator", "repeating", "--pods", "300", "--namespaces", "6"]
    argv += ["--policies", "24", "--flows", "10", "--changes", "30", "--rate", "50"]
    monkeypatch.setattr("sys.argv", [*argv, "--modes", "thread", "--interval", "0.1"])
    try:
        assert replan_bench.main() == 0
    finally:
        gc.unfreeze()  # the bench freezes the heap as the collector does
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["snapshots"] == 31
    assert row["of_them_updates"] >= 1
    assert row["plans_in_churn"] > row["of_them_updates"], "whole plans in the churn"
    assert row["lag_samples"] > 10
