"""The agent's read-only endpoints: the standard gRPC health service and Prometheus `/metrics`.

Health: service "" is SERVING while the agent runs (liveness); `flowproof.v1.AgentService` is
SERVING while the stream to the collector is up (readiness). Metrics: probes by protocol and
outcome, probe durations, results buffered and dropped, stream state. Nothing here can make the
agent send traffic: both endpoints only read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc.aio
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from flowproof import __version__
from flowproof.probes import ProbeResult

log = logging.getLogger(__name__)

READINESS_SERVICE = "flowproof.v1.AgentService"
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class AgentMetrics:
    """The agent's metrics, in a registry of their own (a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, node: str = "") -> None:
        self.registry = registry or CollectorRegistry()
        self.probes = Counter(
            "flowproof_agent_probes",
            "Probes finished by this agent, by protocol and outcome.",
            ["protocol", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "flowproof_agent_probe_duration_seconds",
            "Time from a probe's start to its outcome.",
            ["protocol"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.connected = Gauge(
            "flowproof_agent_collector_connected",
            "1 while the stream to the collector is up.",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "flowproof_agent_assignments_in_flight",
            "Assignments the agent holds now.",
            registry=self.registry,
        )
        self.buffered = Gauge(
            "flowproof_agent_results_buffered",
            "Results kept until the collector acknowledges them.",
            registry=self.registry,
        )
        self.dropped = Counter(
            "flowproof_agent_results_dropped",
            "Results dropped because the buffer was full (oldest first).",
            registry=self.registry,
        )
        self._dropped_seen = 0
        info = Gauge(
            "flowproof_agent_build_info",
            "Build of the agent; always 1.",
            ["version", "node"],
            registry=self.registry,
        )
        info.labels(version=__version__, node=node).set(1)

    def dropped_so_far(self, total: int) -> None:
        """Advance the dropped-results counter to the buffer's running total."""
        if total > self._dropped_seen:
            self.dropped.inc(total - self._dropped_seen)
            self._dropped_seen = total

    def observe(self, result: ProbeResult) -> None:
        protocol = str(result.assignment.kind)
        self.probes.labels(protocol=protocol, outcome=str(result.outcome)).inc()
        self.duration.labels(protocol=protocol).observe(max(result.latency_seconds, 0.0))


async def serve_health(
    address: str, connected: asyncio.Event, stop: asyncio.Event, *, poll_seconds: float = 0.5
) -> None:
    """Serve gRPC health on `address` until `stop`; readiness follows `connected`."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address} for gRPC health")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    state: bool | None = None
    try:
        while not stop.is_set():
            if connected.is_set() != state:
                state = connected.is_set()
                await servicer.set(
                    READINESS_SERVICE,
                    health_pb2.HealthCheckResponse.SERVING
                    if state
                    else health_pb2.HealthCheckResponse.NOT_SERVING,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=poll_seconds)
    finally:
        await servicer.enter_graceful_shutdown()
        await server.stop(0.5)


async def serve_metrics(
    host: str, port: int, metrics: AgentMetrics, refresh: object, stop: asyncio.Event
) -> None:
    """Serve `/metrics` on host:port until `stop`; `refresh()` updates gauges before a scrape."""

    async def page(_: web.Request) -> web.Response:
        if callable(refresh):
            refresh()
        return web.Response(
            body=generate_latest(metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4},
        )

    app = web.Application()
    app.router.add_get("/metrics", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
