"""The agent's runtime: builds every object from the settings and runs the named root tasks.

`main(argv)` loads the settings (exit 2 when they cannot work), logs them once and runs `serve()`.
SIGTERM or SIGINT starts a bounded graceful stop (finish running probes, deliver their results) and
the exit code is 0; if a root task ends or fails on its own, the agent stops and exits 1 so
Kubernetes restarts it. No module-level mutable state.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from agent.errors import ConfigurationError
from agent.netns import NetnsSockets, sctp_supported
from agent.observing import AgentMetrics, serve_health, serve_metrics
from agent.probing import Prober
from agent.resolving import PodResolver
from agent.responders import Responders
from agent.settings import AgentSettings, load_settings
from agent.streaming import CollectorLink
from flowproof import __version__
from flowproof.probes import AgentCapabilities, ProbeKind

log = logging.getLogger("agent")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent until SIGTERM; the process exit code."""
    try:
        settings = load_settings(sys.argv[1:] if argv is None else argv, os.environ)
    except ConfigurationError as exc:
        print(f"flowproof agent: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    log.info("flowproof agent %s starting: %s", __version__, settings.describe())
    return asyncio.run(serve(settings))


async def serve(settings: AgentSettings, stop: asyncio.Event | None = None) -> int:
    """Run until `stop` is set (or a signal sets it); 0 after a graceful stop, 1 after a failure.

    Signal handlers are installed only when no `stop` is given (tests pass their own).
    """
    own_stop = stop is None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if own_stop:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    sctp = sctp_supported()
    if not sctp:
        log.info("kernel has no SCTP module: SCTP probes report ERROR")
    resolver = PodResolver(settings.proc_root)
    sockets = NetnsSockets(batch_size=settings.socket_batch_size)
    prober = Prober(
        node_name=settings.node_name,
        resolver=resolver,
        sockets=sockets,
        max_concurrency=settings.max_concurrency,
        destination_rate_per_second=settings.destination_rate_per_second,
        destination_burst=settings.destination_burst,
        max_timeout_seconds=settings.max_probe_timeout_seconds,
        sctp_supported=sctp,
    )
    responders = Responders(
        resolver=resolver,
        sockets=sockets,
        max_open=settings.max_responders,
        max_lifetime_seconds=settings.responder_max_lifetime_seconds,
        sctp_supported=sctp,
    )
    metrics = AgentMetrics(node=settings.node_name)
    kinds = tuple(k for k in ProbeKind if sctp or k is not ProbeKind.SCTP)
    link = CollectorLink(
        settings=settings,
        prober=prober,
        responders=responders,
        capabilities=AgentCapabilities(
            sctp_supported=sctp,
            probe_kinds=kinds,
            responders_supported=True,
            # Never more assignments than results the buffer can keep: then nothing measured is
            # dropped, even across a disconnect (every held assignment has room for its result).
            max_in_flight=min(settings.max_in_flight, settings.result_buffer_size),
        ),
        agent_version=__version__,
        observe=metrics.observe,
    )

    def refresh_gauges() -> None:
        metrics.connected.set(1 if link.connected.is_set() else 0)
        metrics.in_flight.set(link.in_flight)
        metrics.buffered.set(len(link.outbox))
        metrics.dropped_so_far(link.outbox.dropped_total)

    roots: dict[str, Coroutine[Any, Any, None]] = {"collector_link": link.run(stop)}
    if settings.health_port:
        roots["health_server"] = serve_health(
            f"{settings.listen_address}:{settings.health_port}", link.connected, stop
        )
    if settings.metrics_port:
        roots["metrics_server"] = serve_metrics(
            settings.listen_address, settings.metrics_port, metrics, refresh_gauges, stop
        )
    try:
        return await _run_roots(roots, stop, grace_seconds=settings.shutdown_grace_seconds + 5)
    finally:
        sockets.close()
        if own_stop:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


async def _run_roots(
    roots: dict[str, Coroutine[Any, Any, None]], stop: asyncio.Event, grace_seconds: float = 30.0
) -> int:
    """Run the named root tasks until `stop` is set or one of them ends; the exit code.

    A root task that ends or fails before `stop` is a failure (1): the others are asked to stop.
    After `stop`, every root task gets `grace_seconds` to drain and return; one that fails or
    overruns makes it a failure too.
    """
    tasks = {asyncio.create_task(coro, name=name): name for name, coro in roots.items()}
    for task in tasks:
        task.add_done_callback(_log_failure)
    stopper = asyncio.create_task(stop.wait(), name="stop_signal")
    try:
        waiting: set[asyncio.Future[Any]] = {*tasks, stopper}
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in tasks if t in done and not stop.is_set()]
        if failed:
            log.error("root task %s ended; stopping", ", ".join(tasks[t] for t in failed))
        stop.set()  # the graceful path: every root task drains and returns
        _, overran = await asyncio.wait(tasks, timeout=grace_seconds)
        if overran:
            log.error("root task %s did not stop in time", ", ".join(tasks[t] for t in overran))
        broken = [t for t in tasks if t.done() and not t.cancelled() and t.exception()]
        return 1 if failed or overran or broken else 0
    finally:
        stopper.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(stopper, *tasks, return_exceptions=True)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("root task %s failed", task.get_name(), exc_info=task.exception())
