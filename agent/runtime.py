"""The agent's runtime: builds every object from the settings and runs the named root tasks.

`main(argv)` loads the settings (exit 2 when they cannot work), logs them once and runs `serve()`.
SIGTERM or SIGINT starts a bounded graceful stop (finish running probes, deliver their results) and
the exit code is 0; if a root task ends or fails on its own, the agent stops and exits 1 so
Kubernetes restarts it. No module-level mutable state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from agent.netns import NetnsSockets, sctp_supported
from agent.observing import AgentMetrics, serve_health, serve_metrics
from agent.probing import Prober
from agent.resolving import PodResolver
from agent.responders import Responders
from agent.settings import AgentSettings, load_settings
from agent.streaming import CollectorLink
from flowproof import __version__
from flowproof.aio import run_root_tasks, run_service, stop_event
from flowproof.probes import AgentCapabilities, ProbeKind, ProbeResult

log = logging.getLogger("agent")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent until SIGTERM; the process exit code."""
    return run_service("agent", argv, load_settings, serve, log)


def collector_link(
    settings: AgentSettings,
    *,
    sockets: NetnsSockets,
    sctp: bool,
    ca_certificates: bytes,
    observe: Callable[[ProbeResult], None] | None = None,
) -> CollectorLink:
    """The agent's stream to the collector with its prober and responders, from the settings;
    `observe(result)` sees each result as it is measured."""
    resolver = PodResolver(settings.proc_root)
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
    kinds = tuple(k for k in ProbeKind if sctp or k is not ProbeKind.SCTP)
    return CollectorLink(
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
        ca_certificates=ca_certificates,
        observe=observe,
    )


async def serve(settings: AgentSettings, stop: asyncio.Event | None = None) -> int:
    """Run until `stop` is set (or a signal sets it); 0 after a graceful stop, 1 after a failure.

    Signal handlers are installed only when no `stop` is given (tests pass their own).
    """
    with stop_event(stop) as stopping:
        return await _serve(settings, stopping)


async def _serve(settings: AgentSettings, stop: asyncio.Event) -> int:
    try:
        ca_certificates = await asyncio.to_thread(Path(settings.ca_file).read_bytes)
    except OSError as exc:
        log.error("agent cannot start: ca_file %r: %s", settings.ca_file, exc.strerror)
        return 2
    sctp = sctp_supported()
    if not sctp:
        log.info("kernel has no SCTP module: SCTP probes report ERROR")
    sockets = NetnsSockets(batch_size=settings.socket_batch_size)
    metrics = AgentMetrics(node=settings.node_name)
    link = collector_link(
        settings,
        sockets=sockets,
        sctp=sctp,
        ca_certificates=ca_certificates,
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
        return await run_root_tasks(
            roots, stop, grace_seconds=settings.shutdown_grace_seconds + 5, logger=log
        )
    finally:
        sockets.close()
