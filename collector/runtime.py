"""The collector's runtime: builds every object from the settings and runs the named root tasks.

inventory (manifests or the Kubernetes API) → planner → dispatcher (agents' gRPC streams) → flow
state, plus the HTTP server (metrics, health, web view, /api/v1, verify). `main(argv)` loads the
settings (exit 2 when they cannot work) and serves until SIGTERM (exit 0 after a bounded graceful
stop); if a root task ends or fails on its own, the collector stops and exits 1 so Kubernetes
restarts it. No module-level mutable state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from aiohttp import web

from collector.changes import ChangeEvent, diff_snapshots
from collector.dispatching import Dispatcher
from collector.errors import ConfigurationError
from collector.flowstate import FlowState, StatusChange
from collector.metrics import CollectorMetrics, LoopStatus
from collector.model import Snapshot
from collector.planning import (
    MANAGED_BY_LABEL,
    Plan,
    Planner,
    ProbePodRequest,
    is_probe_pod,
    is_running,
)
from collector.settings import CollectorSettings, load_settings
from flowproof import __version__
from flowproof.probes import ProbeResult

log = logging.getLogger("collector")

Clock = Callable[[], float]
ProbePodManager = Callable[[Sequence[ProbePodRequest]], Awaitable[None]]


class Collector:
    """The live loop of one collector. Use it from one event loop.

    `on_snapshot` takes every new inventory snapshot; results from the dispatcher go to the flow
    state, which may ask the planner to confirm a failure with a retry; `plan_sender` hands due
    assignments to the dispatcher. Listeners (`subscribe`) see every status change and result.
    """

    def __init__(
        self,
        settings: CollectorSettings,
        *,
        clock: Clock = time.time,
        probe_pods: ProbePodManager | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        planner_settings = settings.planner()
        self.planner = Planner(planner_settings)
        self.state = FlowState(planner_settings, clock=clock)
        self.dispatcher = Dispatcher(token=settings.token, on_result=self.on_result)
        self.snapshot: Snapshot | None = None
        self.generation = 0
        self.started_at = clock()
        self._probe_pods = probe_pods
        self._probe_pod_keys: frozenset[str] | None = None  # what the manager was last told
        self._wake = asyncio.Event()
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._synced = asyncio.Event()
        self.results_total = 0
        self.results_unplanned_total = 0
        self.metrics: CollectorMetrics | None = None

    # -- inputs ------------------------------------------------------------------------------------

    async def on_snapshot(self, snapshot: Snapshot, change: ChangeEvent) -> None:
        """A new inventory snapshot: re-plan what it touched and re-judge intent and model."""
        now = self.clock()
        self.snapshot = snapshot
        self.generation = change.generation
        update = self.planner.update(snapshot, change, now)
        changes = self.state.sync(update)
        self._emit_changes(changes)
        self._emit("snapshot", {"generation": change.generation, "change": change.describe()})
        if self._probe_pods is not None:
            needed = needed_probe_pods(update.plan)
            keys = frozenset(r.key for r in needed)
            if keys != self._probe_pod_keys:  # the manager is asked only when the set changes
                try:
                    await self._probe_pods(needed)
                    self._probe_pod_keys = keys
                except Exception:
                    log.exception("probe pods could not be reconciled; flows stay INCONCLUSIVE")
        self._synced.set()
        self._wake.set()

    def on_result(self, result: ProbeResult) -> None:
        """A result from an agent (exactly once per result id)."""
        self.results_total += 1
        if self.planner.completed(result.assignment_id) is None:
            # Issued by an earlier collector (a restart) or given up on: delivered, not lost.
            self.results_unplanned_total += 1
        if self.metrics is not None:
            self.metrics.observe_result(result)
        effect = self.state.record_result(result)
        self._emit(
            "result",
            {
                "flow": result.assignment.flow_key,
                "outcome": str(result.outcome),
                "latency_seconds": result.latency_seconds,
                "node": result.node,
            },
        )
        if effect is None:
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

    def subscribe(self, listener: Callable[[str, dict[str, Any]], None]) -> None:
        """Call `listener(kind, data)` for every status change, result and snapshot."""
        self._listeners.append(listener)

    def _emit_changes(self, changes: Sequence[StatusChange]) -> None:
        for change in changes:
            # StatusChange.to_dict() does not name its flow: the listeners need the key.
            self._emit("status", {"key": change.flow_key, **change.to_dict()})

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        for listener in self._listeners:
            try:
                listener(kind, data)
            except Exception:
                log.exception("listener failed on %s", kind)

    # -- root tasks --------------------------------------------------------------------------------

    async def plan_sender(self, stop: asyncio.Event) -> None:
        """Hand due assignments to the dispatcher; sleep until the next one is due or a wake-up."""
        while not stop.is_set():
            now = self.clock()
            due = self.planner.due(now)
            if due:
                self.dispatcher.submit(due)
            wake_at = self.planner.next_wakeup(now)
            timeout = 1.0 if wake_at is None else min(1.0, max(0.0, wake_at - self.clock()))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(first_of(self._wake, stop), timeout=max(timeout, 0.01))

    async def state_refresher(self, stop: asyncio.Event) -> None:
        """Re-judge freshness (STALE) on a steady beat."""
        while not stop.is_set():
            self._emit_changes(self.state.refresh())
            samples = self.state.take_latency_samples()
            if self.metrics is not None:
                self.metrics.observe_latency(samples)
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


def needed_probe_pods(plan: Plan) -> list[ProbePodRequest]:
    """Every probe pod the plan needs: those it requests and those it already probes from.

    `plan.probe_pods` holds only the ones not running yet; a running probe pod that still stands
    for a flow's `from` must be kept, so the manager can delete exactly the rest.
    """
    requests = {r.key: r for r in plan.probe_pods}
    for flow in plan.flows.values():
        source = flow.source
        if flow.kind != "declared" or not is_probe_pod(source) or not is_running(source):
            continue
        # A cluster probe pod also carries the managed-by label, which no request asks for.
        labels = {k: v for k, v in source.labels.items() if k != MANAGED_BY_LABEL}
        request = ProbePodRequest(source.namespace, tuple(sorted(labels.items())))
        if request.key == source.key:  # one made from a request (not someone else's pod)
            requests.setdefault(request.key, request)
    return [requests[key] for key in sorted(requests)]


async def first_of(*events: asyncio.Event) -> None:
    """Return when any of `events` is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


# --- inventory sources ----------------------------------------------------------------------------


async def manifest_watcher(collector: Collector, stop: asyncio.Event) -> None:
    from collector.sources import ManifestSource

    source = ManifestSource(list(collector.settings.manifests), clock=collector.clock)
    await source.run(collector.on_snapshot, stop)


async def kubernetes_watcher(collector: Collector, stop: asyncio.Event) -> None:
    """List/watch the cluster, feed the collector, and publish FlowExpectations status."""
    from collector.cluster import kube_source_settings, status_publisher
    from collector.kube import InventoryUpdate, KubernetesSource, load_kube_config

    configuration = load_kube_config(collector.settings.kubeconfig or None)
    previous: list[Snapshot | None] = [None]
    generation = [0]

    async def on_update(update: InventoryUpdate) -> None:
        generation[0] += 1
        change = diff_snapshots(
            previous[0], update.snapshot, generation=generation[0], at=collector.clock()
        )
        previous[0] = update.snapshot
        await collector.on_snapshot(update.snapshot, change)

    async with KubernetesSource(
        configuration, settings=kube_source_settings(collector.settings), on_update=on_update
    ) as source:
        runner = asyncio.ensure_future(source.run())
        publisher = asyncio.ensure_future(status_publisher(collector, source, stop))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({runner, publisher, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (runner, publisher, stopper):
                task.cancel()
            for task in (runner, publisher):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for task in (runner, publisher):
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]


# --- HTTP -----------------------------------------------------------------------------------------


def loop_status(collector: Collector) -> LoopStatus:
    """The loop numbers only the runtime knows (for /metrics and the web view)."""
    stats = collector.planner.stats
    return LoopStatus(
        agent_nodes=frozenset(a.node for a in collector.dispatcher.agents()),
        assignments_queued=collector.dispatcher.pending_count(),
        assignments_in_flight=collector.planner.in_flight,
        assignments_issued_total=stats.issued_total,
        assignment_retries_total=stats.retries_total,
        assignments_lost_total=stats.lost_total,
        assignments_rate_limited_total=stats.rate_limited_total,
    )


def build_http_app(collector: Collector) -> web.Application:
    """Health, readiness, verify, the web view, the JSON API and /metrics."""
    from prometheus_client import CollectorRegistry

    from collector.verifying import add_verify_routes
    from collector.web import Broadcaster, StateView, build_web_app

    def status() -> LoopStatus:
        return loop_status(collector)

    metrics = CollectorMetrics(CollectorRegistry(), state=collector.state, loop_status=status)
    broadcaster = Broadcaster()
    collector.subscribe(broadcaster.publish)
    collector.metrics = metrics
    app = build_web_app(
        state_view=StateView(
            state=collector.state,
            loop_status=status,
            agents=collector.dispatcher.agents,
            ready=lambda: collector.snapshot is not None,
            generation=lambda: collector.generation,
        ),
        metrics=metrics,
        broadcaster=broadcaster,
    )
    add_verify_routes(app, collector)
    return app


# --- serving --------------------------------------------------------------------------------------


async def serve(
    settings: CollectorSettings,
    stop: asyncio.Event | None = None,
    *,
    started: Callable[[Collector, int, int], None] | None = None,
    probe_pods: ProbePodManager | None = None,
) -> int:
    """Run until `stop` is set (or a signal sets it); 0 after a graceful stop, 1 after a failure.

    `started(collector, grpc_port, http_port)` is called once both servers listen.
    """
    own_stop = stop is None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if own_stop:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    cluster_probe_pods = None
    if probe_pods is None and settings.probe_pods == "lab":
        probe_pods = _lab_probe_pods(settings)
    elif probe_pods is None and settings.probe_pods == "kubernetes":
        from collector.cluster import kubernetes_probe_pods
        from collector.kube import load_kube_config

        try:
            configuration = load_kube_config(settings.kubeconfig or None)
        except ConfigurationError as exc:
            log.error("probe pods need the Kubernetes API: %s", exc)
            return 2
        cluster_probe_pods = kubernetes_probe_pods(configuration, settings)
        probe_pods = cluster_probe_pods
    collector = Collector(settings, probe_pods=probe_pods)
    if cluster_probe_pods is not None:
        from collector.cluster import expectations_needing

        cluster_probe_pods.needed_by = expectations_needing(collector)
    grpc_port = await collector.dispatcher.start(f"{settings.listen_address}:{settings.grpc_port}")
    runner = web.AppRunner(build_http_app(collector), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.listen_address, settings.http_port)
    await site.start()
    http_port = _bound_port(site)
    log.info("collector serving: grpc %d, http %d", grpc_port, http_port)
    if started is not None:
        started(collector, grpc_port, http_port)
    watcher = manifest_watcher if settings.source == "manifests" else kubernetes_watcher
    roots: dict[str, Coroutine[Any, Any, None]] = {
        "inventory_watcher": watcher(collector, stop),
        "plan_sender": collector.plan_sender(stop),
        "state_refresher": collector.state_refresher(stop),
    }
    if cluster_probe_pods is not None:
        roots["probe_pod_manager"] = cluster_probe_pods.run(stop)
    tasks = {asyncio.create_task(coro, name=name): name for name, coro in roots.items()}
    failed = False
    stopper: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    try:
        waited: set[asyncio.Future[Any]] = {*tasks, stopper}
        done, _ = await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is stopper:
                continue
            failed = True
            name = task.get_name() if isinstance(task, asyncio.Task) else "?"
            if task.exception() is not None:
                log.error("root task %s failed", name, exc_info=task.exception())
            else:
                log.error("root task %s ended on its own", name)
    finally:
        stop.set()
        stopper.cancel()
        grace = settings.shutdown_grace_seconds
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await collector.dispatcher.stop(min(grace, 1.0))
        await runner.cleanup()
    log.info("collector stopped%s", " after a failure" if failed else "")
    return 1 if failed else 0


def _bound_port(site: web.TCPSite) -> int:
    server = site._server  # aiohttp keeps the asyncio server here; the port may be 0 until bound
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else 0


def _lab_probe_pods(settings: CollectorSettings) -> ProbePodManager:
    async def reconcile(requests: Sequence[ProbePodRequest]) -> None:
        from lab.probepods import reconcile_probe_pods

        await asyncio.to_thread(
            reconcile_probe_pods, settings.lab_name, settings.lab_state_dir, list(requests)
        )

    return reconcile


def main(argv: Sequence[str] | None = None) -> int:
    """Run the collector until SIGTERM; the process exit code."""
    try:
        settings = load_settings(sys.argv[1:] if argv is None else argv, os.environ)
    except ConfigurationError as exc:
        print(f"flowproof collector: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    log.info("flowproof collector %s starting: %s", __version__, settings.describe())
    return asyncio.run(serve(settings))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
