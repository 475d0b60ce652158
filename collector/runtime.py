"""The collector's runtime: builds every object from the settings and runs the named root tasks.

Wiring only. The root tasks, named at the top of `serve`: `inventory_watcher` (manifests or the
Kubernetes API feeding `Collector.on_snapshot`), `replanner` (plans the newest snapshot in a
worker thread), `loop_lag_probe` (the event loop's scheduling delay, for /metrics), `plan_sender`
(due assignments to the dispatcher), `state_refresher` (freshness, feedback latency), and in a
cluster `status_publisher`, `probe_pod_manager` and `policy_report_publisher`. The gRPC server
(the dispatcher) and the HTTP server (health, metrics, the
web view, /api/v1, verify) serve beside them. `main(argv)` loads the settings (exit 2 when they
cannot work) and serves until SIGTERM (exit 0 after a bounded graceful stop); if a root task ends
or fails on its own, the collector stops and exits 1 so Kubernetes restarts it. No module-level
mutable state. A probe-pod provider the collector does not own (the lab's) comes in through
`serve(probe_pods=...)`; the collector never imports the lab.

With `--leader-election` a `leader_elector` root competes for the Lease (collector.leading):
`plan_sender`, `status_publisher`, `probe_pod_manager` and `policy_report_publisher` start only
once this replica leads, the dispatcher refuses agents' streams until then, and losing the
Lease ends the elector with an error (exit 1: Kubernetes restarts the pod as a standby).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from collector.cluster import (
    KubernetesProbePods,
    PolicyReports,
    expectations_needing,
    kube_source_settings,
    kubernetes_probe_pods,
    status_publisher,
)
from collector.core.changes import diff_snapshots
from collector.core.model import Snapshot
from collector.core.views import LoopStatus
from collector.dispatching import MAX_RESULT_AGE_SECONDS, Dispatcher, ServerTLS
from collector.kube import (
    SERVICE_ACCOUNT_NAMESPACE,
    InventoryUpdate,
    KubeClient,
    KubernetesSource,
    load_kube_config,
)
from collector.leading import LeaseElector, LeaseTiming, when_leading
from collector.ledger import DeliveryLedger, assignment_key, ledger_path
from collector.loop import Collector, LoopEvent, ProbePodManager
from collector.metrics import CollectorMetrics
from collector.settings import CollectorSettings, load_settings
from collector.sources import ManifestSource
from collector.web.app import StateView, build_web_app
from collector.web.events import Broadcaster
from collector.web.verify import add_verify_routes
from flowproof.aio import FrozenHeap, event_loop_lag, run_root_tasks, run_service, stop_event
from flowproof.errors import ConfigurationError
from flowproof.probes import DestinationPolicy

log = logging.getLogger("collector")

LEDGER_CAPACITY = 100_000
"""Result and assignment ids the dispatcher remembers as delivered, at most (and for at most
MAX_RESULT_AGE_SECONDS): a bound on its memory whatever the rate of results."""

ProbePodProviders = dict[str, Callable[[CollectorSettings], ProbePodManager]]
"""Probe-pod providers by `--probe-pods` mode that someone above the collector hands in (the
front door hands in the lab's for `--probe-pods lab`)."""


def loop_status(
    collector: Collector, dispatcher: Dispatcher, elector: LeaseElector | None = None
) -> LoopStatus:
    """The loop numbers only the runtime knows (for /metrics and the web view)."""
    stats = collector.planner.stats
    return LoopStatus(
        leading=elector is None or elector.leading.is_set(),
        leader=elector.holder if elector is not None else "",
        agent_nodes=frozenset(a.node for a in dispatcher.agents()),
        assignments_queued=dispatcher.pending_count(),
        assignments_in_flight=collector.planner.in_flight,
        assignments_issued_total=stats.issued_total,
        assignment_retries_total=stats.retries_total,
        assignments_lost_total=stats.lost_total,
        assignments_rate_limited_total=stats.rate_limited_total,
        plans_whole_total=collector.replans_total - collector.updates_total,
        plans_updated_total=collector.updates_total,
    )


def collector_metrics(
    collector: Collector, dispatcher: Dispatcher, elector: LeaseElector | None = None
) -> CollectorMetrics:
    """The collector's metrics, subscribed to its events."""
    metrics = CollectorMetrics(
        CollectorRegistry(),
        state=collector.state,
        loop_status=lambda: loop_status(collector, dispatcher, elector),
        intake=dispatcher.intake_counters,
    )
    collector.subscribe(metrics.on_loop_event)
    return metrics


def build_http_app(
    collector: Collector,
    dispatcher: Dispatcher,
    *,
    verify_tokens: Sequence[str],
    metrics: CollectorMetrics | None = None,
    elector: LeaseElector | None = None,
) -> web.Application:
    """Health, readiness, verify, the web view, the JSON API and /metrics."""

    def status() -> LoopStatus:
        return loop_status(collector, dispatcher, elector)

    if metrics is None:
        metrics = collector_metrics(collector, dispatcher, elector)
    broadcaster = Broadcaster()
    collector.subscribe(broadcaster.on_loop_event)
    app = build_web_app(
        state_view=StateView(
            state=collector.state,
            loop_status=status,
            agents=dispatcher.agents,
            ready=lambda: collector.snapshot is not None,
            generation=lambda: collector.generation,
        ),
        metrics=metrics,
        broadcaster=broadcaster,
    )
    add_verify_routes(
        app,
        collector,
        dispatcher,
        tokens=verify_tokens,
        leader=None if elector is None else lambda: (elector.leading.is_set(), elector.holder),
    )
    return app


def keep_heap_frozen(collector: Collector) -> FrozenHeap:
    """Freeze the heap each time a plan is applied (`FrozenHeap`): the snapshot, the plan and
    the engine are then out of the garbage collector's full scans, which held the event loop
    100-200 ms each under churn (docs/scaling.md)."""
    heap = FrozenHeap(collector.clock)

    def on_event(event: LoopEvent) -> None:
        if event.kind == "snapshot":
            heap.settled()

    collector.subscribe(on_event)
    return heap


def snapshot_feeder(collector: Collector) -> Callable[[InventoryUpdate], Awaitable[None]]:
    """What the Kubernetes source calls with each new snapshot: dated, diffed, fed in (a change
    of pods only is read from the update, never diffed; any other is diffed in a thread)."""
    previous: Snapshot | None = None
    generation = 0

    async def on_update(update: InventoryUpdate) -> None:
        nonlocal previous, generation
        generation += 1
        at = collector.clock.time()
        change = update.pods_change(generation=generation, at=at)
        if change is None:  # not only pods: every object compared, off the loop
            change = await asyncio.to_thread(
                diff_snapshots, previous, update.snapshot, generation=generation, at=at
            )
        previous = update.snapshot
        await collector.on_snapshot(update.snapshot, change)

    return on_update


async def kubernetes_inventory(source: KubernetesSource, stop: asyncio.Event) -> None:
    """Run the source's list/watch until `stop` (it runs until cancelled); its failure is ours."""
    runner = asyncio.ensure_future(source.run())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        runner.cancel()
        stopper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    if not runner.cancelled() and runner.exception() is not None:
        raise runner.exception()  # type: ignore[misc]


async def serve(
    settings: CollectorSettings,
    stop: asyncio.Event | None = None,
    *,
    started: Callable[[Collector, int, int], None] | None = None,
    probe_pods: ProbePodManager | None = None,
    providers: ProbePodProviders | None = None,
) -> int:
    """Run until `stop` is set (or a signal sets it); 0 after a graceful stop, 1 after a failure.

    `started(collector, grpc_port, http_port)` is called once both servers listen.
    """
    with stop_event(stop) as stopping:
        return await _serve(settings, stopping, started, probe_pods, providers)


async def _serve(
    settings: CollectorSettings,
    stop: asyncio.Event,
    started: Callable[[Collector, int, int], None] | None,
    probe_pods: ProbePodManager | None,
    providers: ProbePodProviders | None,
) -> int:
    cluster_probe_pods: KubernetesProbePods | None = None
    if probe_pods is None and settings.probe_pods == "kubernetes":
        try:
            configuration = load_kube_config(settings.kubeconfig or None)
        except ConfigurationError as exc:
            log.error("probe pods need the Kubernetes API: %s", exc)
            return 2
        cluster_probe_pods = kubernetes_probe_pods(configuration, settings)
        probe_pods = cluster_probe_pods
    elif probe_pods is None and settings.probe_pods != "off":
        provider = (providers or {}).get(settings.probe_pods)
        if provider is None:
            log.error("--probe-pods %s needs `flowproof collector`", settings.probe_pods)
            return 2
        probe_pods = provider(settings)
    dispatcher: Dispatcher | None = None

    def send(assignments: Sequence[Any]) -> None:
        assert dispatcher is not None
        dispatcher.submit(assignments)

    try:
        tls = ServerTLS.from_files(settings.tls_cert_file, settings.tls_key_file)
    except ConfigurationError as exc:
        log.error("collector cannot start: %s", exc)
        return 2

    def forget(assignment_ids: Sequence[str]) -> None:
        assert dispatcher is not None
        dispatcher.forget(assignment_ids)

    def announce(policy: DestinationPolicy) -> None:
        assert dispatcher is not None
        dispatcher.set_destination_policy(policy)

    try:
        key = assignment_key(settings.state_dir)
        ledger = DeliveryLedger(
            LEDGER_CAPACITY,
            ledger_path(settings.state_dir),
            horizon_seconds=MAX_RESULT_AGE_SECONDS,
        )
    except ConfigurationError as exc:
        log.error("collector cannot start: %s", exc)
        return 2
    elector: LeaseElector | None = None
    lease_client: KubeClient | None = None
    if settings.leader_election:
        try:
            lease_client = KubeClient(load_kube_config(settings.kubeconfig or None))
            elector = lease_elector(settings, lease_client)
        except ConfigurationError as exc:
            ledger.close()
            if lease_client is not None:
                await lease_client.aclose()
            log.error("collector cannot start: %s", exc)
            return 2
    collector = Collector(
        settings, send=send, announce=announce, forget=forget, probe_pods=probe_pods
    )
    keep_heap_frozen(collector)
    dispatcher = Dispatcher(
        token=settings.token,
        tls=tls,
        on_result=collector.on_result,
        ledger=ledger,
        assignment_key=key,
        serving=None if elector is None else elector.leading.is_set,
    )
    try:
        return await _run(
            settings, stop, started, collector, dispatcher, cluster_probe_pods, elector
        )
    finally:
        ledger.close()
        if lease_client is not None:
            await lease_client.aclose()


def lease_elector(settings: CollectorSettings, client: KubeClient) -> LeaseElector:
    """The elector `--leader-election` asks for; ConfigurationError when its namespace cannot
    be found."""
    namespace = settings.leader_election_namespace or _own_namespace()
    identity = settings.leader_election_identity or socket.gethostname()
    return LeaseElector(
        client,
        namespace=namespace,
        name=settings.lease_name,
        identity=identity,
        timing=LeaseTiming(
            duration_seconds=settings.lease_duration_seconds,
            renew_deadline_seconds=settings.lease_renew_deadline_seconds,
            retry_period_seconds=settings.lease_retry_period_seconds,
        ),
    )


def _own_namespace() -> str:
    try:
        return Path(SERVICE_ACCOUNT_NAMESPACE).read_text().strip()
    except OSError as exc:
        raise ConfigurationError(
            "leader_election_namespace: required outside a pod (cannot read "
            f"{SERVICE_ACCOUNT_NAMESPACE}: {exc.strerror})"
        ) from exc


async def _run(
    settings: CollectorSettings,
    stop: asyncio.Event,
    started: Callable[[Collector, int, int], None] | None,
    collector: Collector,
    dispatcher: Dispatcher,
    cluster_probe_pods: KubernetesProbePods | None,
    elector: LeaseElector | None,
) -> int:
    if cluster_probe_pods is not None:
        cluster_probe_pods.needed_by = expectations_needing(collector)
    metrics = collector_metrics(collector, dispatcher, elector)
    runner = web.AppRunner(
        build_http_app(
            collector,
            dispatcher,
            verify_tokens=settings.verify_tokens,
            metrics=metrics,
            elector=elector,
        ),
        access_log=None,
    )
    try:
        grpc_port, http_port = await _listen(settings, dispatcher, runner)
    except OSError as exc:
        log.error("collector cannot start: %s", exc)
        await dispatcher.stop(0)
        await runner.cleanup()
        return 2
    log.info("collector serving: grpc %d, http %d", grpc_port, http_port)
    async with contextlib.AsyncExitStack() as resources:
        roots: dict[str, Coroutine[Any, Any, None]] = {}

        def acting(start: Callable[[], Coroutine[Any, Any, None]]) -> Coroutine[Any, Any, None]:
            """A root task only the leader runs (with leader election)."""
            return start() if elector is None else when_leading(elector, stop, start)

        try:
            if settings.source == "manifests":
                manifests = ManifestSource(list(settings.manifests), clock=collector.clock)
                roots["inventory_watcher"] = manifests.run(
                    functools.partial(collector.on_snapshot, wait=False), stop
                )
            else:
                source = await resources.enter_async_context(
                    KubernetesSource(
                        load_kube_config(settings.kubeconfig or None),
                        settings=kube_source_settings(settings),
                        on_update=snapshot_feeder(collector),
                    )
                )
                roots["inventory_watcher"] = kubernetes_inventory(source, stop)
                roots["status_publisher"] = acting(
                    functools.partial(status_publisher, collector, source, stop)
                )
            if elector is not None:
                roots["leader_elector"] = elector.run(stop)
            roots["replanner"] = collector.replanner(stop)
            roots["loop_lag_probe"] = event_loop_lag(metrics.observe_loop_lag, stop)
            roots["plan_sender"] = acting(functools.partial(collector.plan_sender, stop))
            roots["state_refresher"] = collector.state_refresher(stop)
            if cluster_probe_pods is not None:
                roots["probe_pod_manager"] = acting(functools.partial(cluster_probe_pods.run, stop))
            if settings.policy_reports:
                reports = PolicyReports(
                    KubeClient(load_kube_config(settings.kubeconfig or None)), collector
                )
                roots["policy_report_publisher"] = acting(functools.partial(reports.run, stop))
            if started is not None:
                started(collector, grpc_port, http_port)
            code = await run_root_tasks(
                roots, stop, grace_seconds=settings.shutdown_grace_seconds, logger=log
            )
        finally:
            for coro in roots.values():
                coro.close()  # those never started (a failure before run_root_tasks)
            stop.set()
            await dispatcher.stop(min(settings.shutdown_grace_seconds, 1.0))
            await runner.cleanup()
    log.info("collector stopped%s", " after a failure" if code else "")
    return code


async def _listen(
    settings: CollectorSettings, dispatcher: Dispatcher, runner: web.AppRunner
) -> tuple[int, int]:
    """Bind the gRPC and HTTP servers; their ports. OSError naming the address that is taken."""
    grpc_port = await dispatcher.start(f"{settings.listen_address}:{settings.grpc_port}")
    await runner.setup()
    site = web.TCPSite(runner, settings.listen_address, settings.http_port)
    try:
        await site.start()
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot listen for HTTP on {settings.listen_address}:{settings.http_port} "
            f"(--http-port): {exc.strerror or exc}",
        ) from exc
    return grpc_port, _bound_port(site)


def _bound_port(site: web.TCPSite) -> int:
    server = site._server  # aiohttp keeps the asyncio server here; the port may be 0 until bound
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else 0


def main(argv: Sequence[str] | None = None, *, providers: ProbePodProviders | None = None) -> int:
    """Run the collector until SIGTERM; the process exit code."""

    async def run(settings: CollectorSettings) -> int:
        return await serve(settings, providers=providers)

    return run_service("collector", argv, load_settings, run, log)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
