"""The live loop of one collector: snapshots in, assignments out, results in, typed events out.

Owns `Collector`, which joins the pure core: every inventory snapshot is planned (`Planner`) and
judged (`FlowState`); due assignments go to the injected `send` (the dispatcher's submit, wired
by collector.runtime); every result goes to the flow state, which may ask for a retry. The slow,
pure half of planning (`prepare_plan`) runs in a worker thread, never on the event loop; the
`replanner` coalesces snapshots that arrive meanwhile (the newest wins). Whatever
happens is published as a `LoopEvent` (one small frozen dataclass per kind) to the subscribers:
the web view, the metrics and the status publisher. It never imports the dispatcher, the web or
the metrics, and does no I/O of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from collector.core.changes import ChangeEvent, merge_changes
from collector.core.destinations import destination_policy, still_covers
from collector.core.flowstate import FlowState, LatencySample, StatusChange
from collector.core.model import Snapshot
from collector.core.planning import Plan, needed_probe_pods
from collector.core.probepods import ProbePodRequest
from collector.core.scheduling import Planner, PreparedPlan, prepare_plan, prepare_update
from collector.settings import CollectorSettings
from flowproof.aio import SYSTEM_CLOCK, Clock, first_of
from flowproof.probes import Assignment, DestinationPolicy, ProbeResult

log = logging.getLogger("collector")

ProbePodManager = Callable[[Sequence[ProbePodRequest]], Awaitable[None]]
"""Told every probe pod the plan needs (the rest may go); the lab's or the cluster's."""
Sender = Callable[[Sequence[Assignment]], None]
"""Takes due assignments and sends them to the agents (never blocks)."""
Announcer = Callable[[DestinationPolicy], None]
"""Tells the agents where they may probe (the dispatcher's, before any assignment needs it)."""
Forgetter = Callable[[Sequence[str]], None]
"""Forgets assignments the planner gave up on (the dispatcher's `forget`; never blocks)."""


# --- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotApplied:
    """A new inventory snapshot was planned; `change` says in words what changed."""

    generation: int
    change: str
    kind: Literal["snapshot"] = "snapshot"
    flow_key: None = None


@dataclass(frozen=True)
class StatusChanged:
    """A flow's status moved."""

    change: StatusChange
    kind: Literal["status"] = "status"

    @property
    def flow_key(self) -> str:
        return self.change.flow_key


@dataclass(frozen=True)
class ResultRecorded:
    """A probe result came from an agent (exactly once per result id)."""

    result: ProbeResult
    kind: Literal["result"] = "result"

    @property
    def flow_key(self) -> str:
        return self.result.assignment.flow_key


@dataclass(frozen=True)
class LatencyMeasured:
    """Feedback latencies measured since the last beat: change -> first fresh verdict."""

    samples: tuple[LatencySample, ...]
    kind: Literal["latency"] = "latency"
    flow_key: None = None


LoopEvent = SnapshotApplied | StatusChanged | ResultRecorded | LatencyMeasured
Listener = Callable[[LoopEvent], None]


def _settle(
    waiters: Sequence[asyncio.Future[None]], error: Exception | None, *, cancelled: bool = False
) -> None:
    for waiter in waiters:
        if waiter.done():
            continue
        if cancelled:
            waiter.cancel()
        elif error is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(None)


def _whole_change(change: ChangeEvent) -> ChangeEvent:
    """The change a whole plan after an update of the same snapshot is applied with: no pod is
    new to it, so only the flows it chooses anew (witnesses, samples) are touched."""
    return dataclasses.replace(
        change, pods_added=frozenset(), pods_removed=frozenset(), pods_changed=frozenset()
    )


def _drop(_: Sequence[Assignment]) -> None:
    """The sender of a loop that nothing dispatches for (tests that only plan and judge)."""


def _ignore(_: DestinationPolicy) -> None:
    """The announcer of a loop that nothing dispatches for."""


def _keep(_: Sequence[str]) -> None:
    """The forgetter of a loop that nothing dispatches for."""


class Collector:
    """The live loop of one collector. Use it from one event loop.

    `on_snapshot` takes every new inventory snapshot; `on_result` every result from an agent;
    `plan_sender` hands due assignments to `send`; `state_refresher` re-judges freshness. Every
    subscriber (`subscribe`) sees every event.
    """

    def __init__(
        self,
        settings: CollectorSettings,
        *,
        send: Sender = _drop,
        announce: Announcer = _ignore,
        forget: Forgetter = _keep,
        clock: Clock = SYSTEM_CLOCK,
        probe_pods: ProbePodManager | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.planner = Planner(settings.planner)
        self.state = FlowState(settings.planner, clock=clock)
        self.send = send
        self.announce = announce
        self.forget = forget
        self.snapshot: Snapshot | None = None
        self.generation = 0
        self.started_at = clock.time()
        self._probe_pods = probe_pods
        self._probe_pod_keys: frozenset[str] | None = None  # what the manager was last told
        self._wake = asyncio.Event()
        self._listeners: list[Listener] = []
        self._synced = asyncio.Event()
        self.results_total = 0
        self.results_unplanned_total = 0
        self.replans_total = 0
        self.snapshots_coalesced_total = 0  # snapshots replaced by a newer one before planning
        self._pending: tuple[Snapshot, ChangeEvent] | None = None
        self._pending_waiters: list[asyncio.Future[None]] = []
        self._replan_wake = asyncio.Event()
        self._replanner_running = False
        self._planning = asyncio.Lock()
        self._prepared: PreparedPlan | None = None  # the plan last applied, before sweep cells
        self._destinations: DestinationPolicy | None = None  # the policy last announced
        self._whole_at = -math.inf  # when the last whole plan was applied
        self._applied_change: ChangeEvent | None = None
        self.updates_total = 0  # plans made by updating the one before for a few pods
        self._whole_asked = False  # someone waits for the whole plan (verify): build it now
        self._whole = asyncio.Event()  # the plan applied is whole (evidence chosen)

    # -- inputs ------------------------------------------------------------------------------------

    async def on_snapshot(
        self, snapshot: Snapshot, change: ChangeEvent, *, wait: bool = True
    ) -> None:
        """A new inventory snapshot: re-plan what it touched and re-judge intent and model.

        The plan is built in a worker thread; its result is applied here, on the loop. While the
        `replanner` root task runs, the snapshot is queued instead: a snapshot still waiting is
        replaced by this one (their changes merged), and a replan in progress is never queued
        behind. `wait` returns only once this snapshot (or a newer one) is applied.
        """
        if not self._replanner_running:
            await self._replan(snapshot, change)
            return
        if self._pending is not None:
            change = merge_changes(self._pending[1], change)
            self.snapshots_coalesced_total += 1
        self._pending = (snapshot, change)
        self._replan_wake.set()
        if wait:
            waiter = asyncio.get_running_loop().create_future()
            self._pending_waiters.append(waiter)
            await waiter

    async def replanner(self, stop: asyncio.Event) -> None:
        """Plan the newest queued snapshot, one at a time, until `stop`."""
        self._replanner_running = True
        try:
            while not stop.is_set():
                if self._pending is None:
                    self._replan_wake.clear()
                    due = self._whole_due()
                    if due is None:
                        await first_of(self._replan_wake, stop)
                    elif due > self.clock.time():
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(
                                first_of(self._replan_wake, stop), due - self.clock.time()
                            )
                    else:
                        await self._replan_whole()
                    continue
                (snapshot, change), self._pending = self._pending, None
                waiters, self._pending_waiters = self._pending_waiters, []
                try:
                    await self._replan(snapshot, change)
                except Exception as exc:  # a bug: the waiters see it, the root task fails
                    _settle(waiters, exc)
                    raise
                except BaseException:
                    _settle(waiters, None, cancelled=True)
                    raise
                _settle(waiters, None)
        finally:
            self._replanner_running = False
            _settle(self._pending_waiters, None, cancelled=True)
            self._pending_waiters = []

    async def _replan(self, snapshot: Snapshot, change: ChangeEvent) -> None:
        """Plan one snapshot: an update of the plan before when a few pods changed
        (`prepare_update`: the declared flows they touch, at once), else the whole plan.

        After an update the whole plan (new witnesses and sweep table) follows: at once without
        the replanner, else when the replanner is idle and the last whole plan is at least
        `interval_seconds` old (so that under churn, updates are not held up by whole plans)."""
        async with self._planning:  # callers without the replanner: one plan at a time, in order
            prepared = self._prepared
            if prepared is not None and not change.initial:
                done = await asyncio.to_thread(
                    self._prepare, snapshot, change, prepared, self.planner.plan, self._destinations
                )
                if done is not None:
                    self._apply(snapshot, change, *done)
                    self.updates_total += 1
                    await self._reconcile_probe_pods()
                    self._synced.set()
                    self._wake.set()
                    if self._replanner_running:
                        return  # the replanner builds the whole plan when it is due
                    change = _whole_change(change)
            await self._build_whole(snapshot, change)
        self._synced.set()
        self._wake.set()

    def _whole_due(self) -> float | None:
        """When the whole plan of the applied snapshot is due; None when the plan is whole."""
        if self._prepared is None or self._prepared.plan.basis is None:
            return None
        if self._whole_asked:
            return -math.inf
        return self._whole_at + self.settings.planner.interval_seconds

    async def wait_whole(self, timeout_seconds: float) -> bool:
        """Until the plan applied is whole (its witnesses chosen for its own snapshot, not kept
        from an earlier one or pending after a change of policies), built at once rather than
        when due; False if it is not within the timeout."""
        if self._whole.is_set():
            return True
        self._whole_asked = True
        self._replan_wake.set()
        try:
            await asyncio.wait_for(self._whole.wait(), timeout_seconds)
        except TimeoutError:
            return False
        return True

    async def _replan_whole(self) -> None:
        """The whole plan of the snapshot the applied update was made for."""
        async with self._planning:
            if self.snapshot is None or self._applied_change is None or self._whole_due() is None:
                return
            await self._build_whole(self.snapshot, _whole_change(self._applied_change))
        self._synced.set()
        self._wake.set()

    async def _build_whole(self, snapshot: Snapshot, change: ChangeEvent) -> None:
        whole = await asyncio.to_thread(
            self._prepare, snapshot, change, None, self.planner.plan, self._destinations
        )
        assert whole is not None
        self._apply(snapshot, change, *whole)
        self._whole_at = self.clock.time()
        self._whole_asked = False
        await self._reconcile_probe_pods()

    def _prepare(
        self,
        snapshot: Snapshot,
        change: ChangeEvent,
        previous: PreparedPlan | None,
        current: Plan,
        policy: DestinationPolicy | None,
    ) -> tuple[PreparedPlan, DestinationPolicy] | None:
        """In the worker thread, from what the loop held when it was called (`current`: its plan,
        `policy`: the destination policy it announced): the plan (an update of `previous`, or
        whole when it is None; None when it cannot be updated) and the policy to announce."""
        settings = self.settings.planner
        if previous is None:
            prepared = prepare_plan(snapshot, settings, generation=change.generation)
        else:
            update = prepare_update(
                previous, snapshot, change, settings, generation=change.generation
            )
            if update is None:
                return None
            prepared = update
        plan = prepared.plan
        # Built here, not on the loop (the sweep reads the pods by key), nor in the next update.
        snapshot.pods_by_key  # noqa: B018
        if previous is None:
            snapshot.pods_by_namespace  # noqa: B018
            if plan.classes is not None:
                plan.classes.pod_index  # noqa: B018
        # A sweep rotation may replace `current` before this plan is applied; its cells are pods
        # of the snapshot before, which the policy also admits.
        before = current.engine.snapshot if current.engine is not None else None
        changed = [p for key in change.pods_added | change.pods_changed if (p := snapshot.pod(key))]
        if (
            previous is None
            or policy is None
            or not still_covers(policy, plan, previous.plan.flows, changed)
        ):
            policy = destination_policy(
                (current, plan), snapshot, settings.cluster_dns_ip, earlier=before
            )
        return prepared, policy

    def _apply(
        self,
        snapshot: Snapshot,
        change: ChangeEvent,
        prepared: PreparedPlan,
        destinations: DestinationPolicy,
    ) -> None:
        """The planner's and the flow state's half of a replan: on the loop, no await inside."""
        now = self.clock.time()
        self.snapshot = snapshot
        self.generation = change.generation
        self.replans_total += 1
        update = self.planner.apply(prepared, change, now)
        self._prepared = prepared
        self._applied_change = change
        if prepared.plan.basis is None:
            self._whole.set()
        else:
            self._whole.clear()
        # Before any assignment of the new plan is due; the previous plan's may still be queued.
        if destinations != self._destinations:
            self.announce(destinations)
            self._destinations = destinations
        self._emit_changes(self.state.sync(update))
        self._emit(SnapshotApplied(change.generation, change.describe()))

    async def _reconcile_probe_pods(self) -> None:
        if self._probe_pods is None:
            return
        needed = needed_probe_pods(self.planner.plan)
        keys = frozenset(r.key for r in needed)
        if keys != self._probe_pod_keys:  # the manager is asked only when the set changes
            try:
                await self._probe_pods(needed)
                self._probe_pod_keys = keys
            except Exception:
                log.exception("probe pods could not be reconciled; flows stay INCONCLUSIVE")

    def on_result(self, result: ProbeResult) -> None:
        """A result from an agent (exactly once per result id)."""
        self.results_total += 1
        key = self.planner.completed(result.assignment_id)
        if key is None:
            # Issued by an earlier collector (a restart) or given up on: delivered, not lost.
            self.results_unplanned_total += 1
        effect = self.state.record_result(result)
        self._emit(ResultRecorded(result))
        if effect is None:
            if key is not None and self.planner.settling(key):
                self._wake.set()  # its probe after the change settled may go now
            return
        if effect.retry_attempt is not None:
            self.planner.retry(effect.flow_key, attempt=effect.retry_attempt)
        self._emit_changes(effect.changes)
        self._wake.set()

    @property
    def manages_probe_pods(self) -> bool:
        """Whether someone creates the probe pods the plan requests (then they are worth a wait)."""
        return self._probe_pods is not None

    # -- listeners ---------------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(event)` for every event, in order, on the event loop."""
        self._listeners.append(listener)

    def _emit_changes(self, changes: Sequence[StatusChange]) -> None:
        for change in changes:
            self._emit(StatusChanged(change))

    def _emit(self, event: LoopEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("listener failed on %s", event.kind)

    # -- root tasks --------------------------------------------------------------------------------

    async def plan_sender(self, stop: asyncio.Event) -> None:
        """Hand due assignments to `send`; sleep until the next one is due or a wake-up."""
        while not stop.is_set():
            now = self.clock.time()
            if self.planner.sweep_due(now):
                rotated = self.planner.rotate_sweep(now, keep=self.state.failing_sweep_keys())
                if rotated is not None:
                    self._emit_changes(self.state.sync(rotated))
            due = self.planner.due(now)
            lost = self.planner.take_lost()
            if lost:
                self.forget(lost)
            if due:
                self.send(due)
            wake_at = self.planner.next_wakeup(now)
            timeout = 1.0 if wake_at is None else min(1.0, max(0.0, wake_at - self.clock.time()))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(first_of(self._wake, stop), timeout=max(timeout, 0.01))

    async def state_refresher(self, stop: asyncio.Event) -> None:
        """Re-judge freshness (STALE) on a steady beat and publish the latencies measured."""
        while not stop.is_set():
            self._emit_changes(self.state.refresh())
            samples = self.state.take_latency_samples()
            if samples:
                self._emit(LatencyMeasured(tuple(samples)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.settings.state_refresh_seconds)

    async def wait_synced(self, timeout_seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._synced.wait(), timeout_seconds)
        except TimeoutError:
            return False
        return True

    def wake(self) -> None:
        self._wake.set()


__all__ = [
    "Announcer",
    "Collector",
    "Forgetter",
    "LatencyMeasured",
    "Listener",
    "LoopEvent",
    "ProbePodManager",
    "ResultRecorded",
    "Sender",
    "SnapshotApplied",
    "StatusChanged",
]
