"""The collector's HTTP face: the live web view, the JSON API under /api/v1, /metrics and health.

Owns `build_web_app` (routes, the OpenAPI document, the static page from collector/webui),
`Broadcaster` (server-sent events: every status change and result the runtime publishes reaches
open pages within a second) and the JSON shapes of flows, the matrix, agents and the summary. It
only reads the flow state and never decides a status; it loads nothing from the internet.

    broadcaster = Broadcaster()
    collector.subscribe(broadcaster.publish)       # (kind, data) for every status change/result
    app = build_web_app(state_view=StateView(state=..., loop_status=..., agents=...),
                        metrics=CollectorMetrics(CollectorRegistry(), state=...),
                        broadcaster=broadcaster)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import itertools
import json
import re
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from collector.checking import FAILING, STATUS_ORDER, Status, status_rank
from collector.flowstate import DeclaredStatus, FlowRecord, FlowState, worst
from collector.metrics import (
    CONTENT_TYPE,
    CollectorMetrics,
    LoopStatus,
    compliance_ratio,
    nodes_needing_agents,
)
from collector.model import Pod
from flowproof import __version__

WEBUI = Path(__file__).with_name("webui")
STATIC_FILES = {"app.js": "text/javascript", "app.css": "text/css"}
KEEPALIVE_SECONDS = 15.0
CLIENT_QUEUE_SIZE = 10_000  # events a slow page may lag behind before it must reload
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
WORKLOAD_LABELS = ("app.kubernetes.io/name", "app", "k8s-app", "name")
_POD_SUFFIXES = (
    re.compile(r"-[0-9a-f]{6,10}-[0-9a-z]{5}$"),  # Deployment: <rs hash>-<pod hash>
    re.compile(r"-[0-9a-z]{5}$"),  # DaemonSet, Job, bare ReplicaSet
    re.compile(r"-\d+$"),  # StatefulSet, and the lab's <workload>-<i>
)


@dataclass(frozen=True)
class StateView:
    """What the web view reads, each called on the event loop for every request it serves.

    `agents()` returns the connected agents (the dispatcher's `AgentInfo` dataclasses, or any
    dataclass with a `node` field); `ready()` says whether the collector has its inventory;
    `generation()` is the snapshot generation the flow state was planned from.
    """

    state: FlowState
    loop_status: Callable[[], LoopStatus] = LoopStatus
    agents: Callable[[], Sequence[Any]] = tuple
    ready: Callable[[], bool] = lambda: True
    generation: Callable[[], int] = lambda: 0


# --- server-sent events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One published event: `kind` (status, result, snapshot, ...) and its JSON-able data."""

    id: int
    kind: str
    data: Mapping[str, Any]
    at: float


class _Subscriber:
    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=size)
        self.overflowed = False


class Broadcaster:
    """Fans events out to every open event stream. Call `publish` on the event loop.

    `publish(kind, data)` has the signature of the runtime's listeners. A subscriber too slow to
    keep up loses its queue and is told to `resync` (reload everything) instead.
    """

    def __init__(
        self, *, queue_size: int = CLIENT_QUEUE_SIZE, clock: Callable[[], float] = time.time
    ):
        self._queue_size = queue_size
        self._clock = clock
        self._subscribers: set[_Subscriber] = set()
        self._ids = itertools.count(1)
        self._closed = False
        self.published_total = 0

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, kind: str, data: Mapping[str, Any]) -> None:
        """Send an event to every subscriber now (never blocks)."""
        self.published_total += 1
        event = Event(next(self._ids), kind, data, self._clock())
        for subscriber in self._subscribers:
            if subscriber.overflowed:
                continue
            try:
                subscriber.queue.put_nowait(event)
            except asyncio.QueueFull:
                subscriber.overflowed = True

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[_Subscriber]:
        subscriber = _Subscriber(self._queue_size)
        self._subscribers.add(subscriber)
        try:
            yield subscriber
        finally:
            self._subscribers.discard(subscriber)

    def close(self) -> None:
        """End every open stream (on shutdown); later subscribers end at once."""
        self._closed = True
        for subscriber in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                subscriber.queue.put_nowait(None)
            subscriber.overflowed = True

    @property
    def closed(self) -> bool:
        return self._closed


# --- shapes ---------------------------------------------------------------------------------------


def workload_of(pod: Pod) -> str:
    """The workload a pod belongs to, for the matrix: its template, a naming label, or its name
    without the controller's suffix."""
    if pod.workload:
        return pod.workload.split("/", 1)[-1]
    for label in WORKLOAD_LABELS:
        value = pod.labels.get(label)
        if value:
            return value
    for pattern in _POD_SUFFIXES:
        stripped = pattern.sub("", pod.name)
        if stripped and stripped != pod.name:
            return stripped
    return pod.name


def _side(endpoint: Pod | str, level: str) -> dict[str, Any]:
    if isinstance(endpoint, Pod):
        name = workload_of(endpoint) if level == "workload" else endpoint.name
        probe = endpoint.labels.get("flowproof.dev/probe-pod") == "true"
        if probe and level == "workload":
            name += " (probe pod)"
        return {"id": f"{endpoint.namespace}/{name}", "namespace": endpoint.namespace, "name": name}
    return {"id": f"outside/{endpoint}", "namespace": "", "name": endpoint}


def concrete_row(record: FlowRecord) -> dict[str, Any]:
    """The compact form of one concrete flow: what the matrix and live events carry."""
    planned = record.planned
    source = _side(planned.source, "workload")
    destination = _side(planned.destination, "workload")
    current = record.current
    return {
        "key": planned.key,
        "kind": planned.kind,
        "declared": planned.declared_id if planned.kind == "declared" else None,
        "expectation": planned.expectation,
        "flow": planned.flow,
        "source": planned.source.key,
        "sourceNamespace": planned.source.namespace,
        "sourceGroup": source["id"],
        "destination": planned.destination_name,
        "destinationNamespace": destination["namespace"],
        "destinationGroup": destination["id"],
        "port": planned.port,
        "protocol": planned.protocol,
        "intent": "allow" if planned.intent else "deny",
        "model": "allow" if planned.model else "deny",
        "reality": record.reality.verdict if record.reality else None,
        "status": record.status,
        "reason": record.reason,
        "since": record.since,
        "lastVerifiedAt": current.received_at if current else None,
        "latencySeconds": current.latency_seconds if current else None,
        "confirming": record.confirming.candidate if record.confirming else None,
    }


def declared_summary(item: DeclaredStatus) -> dict[str, Any]:
    return {
        "id": item.id,
        "expectation": item.expectation,
        "namespace": item.namespace,
        "flow": item.flow,
        "intent": "allow" if item.intent else "deny",
        "status": item.status,
        "reason": item.reason,
        "counts": dict(item.counts),
        "pairsCovered": item.pairs_covered,
        "pairsTotal": item.pairs_total,
        "observedAllowed": item.observed_allowed,
        "observedDenied": item.observed_denied,
        "lastVerifiedAt": item.last_verified_at,
    }


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            _camel(f.name): _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
        }
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return value


def _text_matches(query: str, *fields: object) -> bool:
    return any(query in str(f).lower() for f in fields if f is not None)


def _row_matches(
    row: Mapping[str, Any], namespace: str, status: str, query: str, kind: str
) -> bool:
    if kind and row["kind"] != kind:
        return False
    if namespace and namespace not in (row["sourceNamespace"], row["destinationNamespace"]):
        return False
    if status and row["status"] != status:
        return False
    return not query or _text_matches(
        query,
        row["key"],
        row["declared"],
        row["reason"],
        row["sourceGroup"],
        row["destinationGroup"],
    )


def _status_counts(statuses: Iterable[Status]) -> dict[str, int]:
    counts = Counter(statuses)
    return {status: counts[status] for status in STATUS_ORDER}


def build_matrix(
    rows: Sequence[Mapping[str, Any]],
    *,
    level: str = "workload",
    source: str = "",
    destination: str = "",
) -> dict[str, Any]:
    """Sources × destinations, by workload or by pod, each cell with its worst status.

    `source`/`destination` (workload group ids) narrow the matrix to one cell's pods: the
    drill-down.
    """
    if source:
        rows = [r for r in rows if r["sourceGroup"] == source]
    if destination:
        rows = [r for r in rows if r["destinationGroup"] == destination]
    sources: dict[str, dict[str, Any]] = {}
    destinations: dict[str, dict[str, Any]] = {}
    cells: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        if level == "pod":
            src_ns, _, src_name = row["source"].partition("/")
            src = {"id": row["source"], "namespace": src_ns, "name": src_name}
            if row["destinationNamespace"]:
                dst_name = row["destination"].partition("/")[2]
                dst = {
                    "id": row["destination"],
                    "namespace": row["destinationNamespace"],
                    "name": dst_name,
                }
            else:
                dst = {"id": row["destinationGroup"], "namespace": "", "name": row["destination"]}
        else:
            src = {
                "id": row["sourceGroup"],
                "namespace": row["sourceNamespace"],
                "name": row["sourceGroup"].partition("/")[2],
            }
            dst = {
                "id": row["destinationGroup"],
                "namespace": row["destinationNamespace"],
                "name": row["destinationGroup"].partition("/")[2],
            }
        sources.setdefault(src["id"], src)
        destinations.setdefault(dst["id"], dst)
        cells[(src["id"], dst["id"])].append(row)

    def order(group: Mapping[str, Any]) -> tuple[bool, str, str]:
        return (group["namespace"] == "", group["namespace"], group["name"])

    out_cells = []
    for (src_id, dst_id), members in sorted(cells.items()):
        statuses = [m["status"] for m in members]
        out_cells.append(
            {
                "source": src_id,
                "destination": dst_id,
                "status": worst(statuses),
                "counts": {k: v for k, v in _status_counts(statuses).items() if v},
                "flows": [m["key"] for m in members],
            }
        )
    return {
        "level": level,
        "sources": sorted(sources.values(), key=order),
        "destinations": sorted(destinations.values(), key=order),
        "cells": out_cells,
    }


# --- the application ------------------------------------------------------------------------------


def load_openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of this app (collector/webui/openapi.yaml)."""
    with (WEBUI / "openapi.yaml").open(encoding="utf-8") as handle:
        document: dict[str, Any] = yaml.safe_load(handle)
    document["info"]["version"] = __version__
    return document


class _Api:
    """The handlers; one per app, reading the state view on every request."""

    def __init__(
        self,
        view: StateView,
        metrics: CollectorMetrics,
        broadcaster: Broadcaster,
        keepalive_seconds: float,
    ) -> None:
        self.view = view
        self.metrics = metrics
        self.broadcaster = broadcaster
        self.keepalive_seconds = keepalive_seconds
        self.openapi = load_openapi()
        self.static = {name: (WEBUI / name).read_bytes() for name in (*STATIC_FILES, "index.html")}

    # -- page, health, metrics ---------------------------------------------------------------------

    async def index(self, _: web.Request) -> web.Response:
        return web.Response(
            body=self.static["index.html"],
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-cache", **SECURITY_HEADERS},
        )

    async def static_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES:
            raise web.HTTPNotFound()
        return web.Response(
            body=self.static[name],
            content_type=STATIC_FILES[name],
            charset="utf-8",
            headers={"Cache-Control": "no-cache", **SECURITY_HEADERS},
        )

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"ok": True, "version": __version__})

    async def readyz(self, _: web.Request) -> web.Response:
        ready = self.view.ready()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def metrics_page(self, _: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def openapi_json(self, _: web.Request) -> web.Response:
        return web.json_response(self.openapi)

    # -- API ---------------------------------------------------------------------------------------

    def _rows(self) -> list[dict[str, Any]]:
        return [concrete_row(r) for r in self.view.state.flows()]

    async def summary(self, _: web.Request) -> web.Response:
        state = self.view.state
        declared = state.declared()
        loop = self.view.loop_status()
        needed = nodes_needing_agents(state)
        counts = _status_counts(d.status for d in declared)
        ratios = compliance_ratio(declared)
        passing = counts["PASS"]
        return web.json_response(
            {
                "version": __version__,
                "now": time.time(),
                "ready": self.view.ready(),
                "generation": self.view.generation(),
                "declared": {"total": len(declared), "byStatus": counts},
                "flows": {
                    kind: _status_counts(r.status for r in state.flows(kind))
                    for kind in ("declared", "drift")
                },
                "compliance": {
                    "ratio": passing / len(declared) if declared else None,
                    "byNamespace": ratios,
                },
                "openMismatches": sum(counts[s] for s in FAILING),
                "agents": {
                    "connected": len(loop.agent_nodes),
                    "nodes": len(needed),
                    "missing": sorted(needed - loop.agent_nodes),
                },
                "assignments": {
                    "queued": loop.assignments_queued,
                    "inFlight": loop.assignments_in_flight,
                },
            }
        )

    async def flows(self, request: web.Request) -> web.Response:
        namespace = request.query.get("namespace", "")
        status = request.query.get("status", "")
        expectation = request.query.get("expectation", "")
        query = request.query.get("q", "").lower()
        if status and status not in STATUS_ORDER:
            return _bad_request(f"status must be one of {', '.join(STATUS_ORDER)}")
        by_declared: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for record in self.view.state.flows("declared"):
            by_declared[record.planned.declared_id].append(concrete_row(record))
        items = []
        for item in self.view.state.declared():
            if namespace and item.namespace != namespace:
                continue
            if status and item.status != status:
                continue
            if expectation and expectation not in (
                item.expectation,
                item.expectation.split("/")[-1],
            ):
                continue
            concrete = by_declared.get(item.id, [])
            if query and not (
                _text_matches(query, item.id, item.reason)
                or any(_text_matches(query, c["key"]) for c in concrete)
            ):
                continue
            items.append({**declared_summary(item), "concrete": concrete})
        items.sort(key=lambda d: (status_rank(d["status"]), d["id"]))
        return web.json_response({"total": len(items), "flows": items})

    async def flow(self, request: web.Request) -> web.Response:
        wanted = request.match_info["id"]
        state = self.view.state
        declared = {d.id: d for d in state.declared()}
        item = declared.get(wanted)
        if item is not None:
            records = [r for r in state.flows("declared") if r.planned.declared_id == wanted]
            records.sort(key=lambda r: (status_rank(r.status), r.key))
            kind = "declared"
        else:
            record = state.flow(wanted)
            if record is None:
                raise web.HTTPNotFound(
                    text=json.dumps({"error": f"no declared flow or flow {wanted!r}"}),
                    content_type="application/json",
                )
            records = [record]
            kind = record.planned.kind
            item = declared.get(record.planned.declared_id) if kind == "declared" else None
        return web.json_response(
            {
                "id": wanted,
                "kind": kind,
                "declared": declared_summary(item) if item is not None else None,
                "flows": [r.to_dict() for r in records],
            }
        )

    async def matrix(self, request: web.Request) -> web.Response:
        level = request.query.get("level", "workload")
        if level not in ("workload", "pod"):
            return _bad_request("level must be workload or pod")
        status = request.query.get("status", "")
        if status and status not in STATUS_ORDER:
            return _bad_request(f"status must be one of {', '.join(STATUS_ORDER)}")
        kind = request.query.get("kind", "")
        if kind not in ("", "declared", "drift"):
            return _bad_request("kind must be declared or drift")
        rows = [
            r
            for r in self._rows()
            if _row_matches(
                r,
                request.query.get("namespace", ""),
                status,
                request.query.get("q", "").lower(),
                kind,
            )
        ]
        matrix = build_matrix(
            rows,
            level=level,
            source=request.query.get("source", ""),
            destination=request.query.get("destination", ""),
        )
        keys = {k for cell in matrix["cells"] for k in cell["flows"]}
        matrix["flows"] = [r for r in rows if r["key"] in keys]
        matrix["generation"] = self.view.generation()
        return web.json_response(matrix)

    async def agents(self, _: web.Request) -> web.Response:
        agents = [_jsonable(a) for a in self.view.agents()]
        connected = {str(a.get("node", "")) for a in agents}
        needed = nodes_needing_agents(self.view.state)
        nodes = [
            {"name": node, "needed": node in needed, "agentConnected": node in connected}
            for node in sorted(needed | connected)
        ]
        return web.json_response(
            {"agents": agents, "nodes": nodes, "missing": sorted(needed - connected)}
        )

    async def events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        if self.broadcaster.closed:
            return response
        async with self.broadcaster.subscribe() as subscriber:
            with contextlib.suppress(ConnectionError):  # the client went away: nothing to do
                await self._stream(response, subscriber)
        return response

    async def _stream(self, response: web.StreamResponse, subscriber: _Subscriber) -> None:
        hello = {"version": __version__, "generation": self.view.generation(), "at": time.time()}
        await response.write(b"retry: 1000\n\n" + _sse(0, "hello", hello))
        while True:
            if subscriber.overflowed and not self.broadcaster.closed:
                await response.write(_sse(0, "resync", {"reason": "too many events"}))
                return
            try:
                event = await asyncio.wait_for(subscriber.queue.get(), self.keepalive_seconds)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            chunk: list[bytes] = []
            while event is not None:  # whatever else is queued goes out in the same write
                chunk.append(_sse(event.id, event.kind, self._annotate(event)))
                try:
                    event = subscriber.queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
            if chunk:
                await response.write(b"".join(chunk))
            if event is None:
                return

    def _annotate(self, event: Event) -> dict[str, Any]:
        """The event's data with the current row of the flow it names (when it names one)."""
        data: dict[str, Any] = {**event.data, "publishedAt": event.at}
        key = data.get("flow") or data.get("key")
        if isinstance(key, str):
            record = self.view.state.flow(key)
            data["row"] = concrete_row(record) if record is not None else None
        return data


def _sse(event_id: int, kind: str, data: Mapping[str, Any]) -> bytes:
    payload = json.dumps(data, separators=(",", ":"), default=str)
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {kind}\ndata: {payload}\n\n".encode()


def _bad_request(reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=400)


def build_web_app(
    *,
    state_view: StateView,
    metrics: CollectorMetrics,
    broadcaster: Broadcaster,
    app: web.Application | None = None,
    keepalive_seconds: float = KEEPALIVE_SECONDS,
) -> web.Application:
    """The routes of the web view, API, metrics and health, added to `app` (or a new one).

    Closing the app ends every open event stream (so a graceful stop is not held up by them).
    """
    app = app if app is not None else web.Application()
    api = _Api(state_view, metrics, broadcaster, keepalive_seconds)
    router = app.router
    router.add_get("/", api.index)
    router.add_get("/static/{name}", api.static_file)
    router.add_get("/healthz", api.healthz)
    router.add_get("/readyz", api.readyz)
    router.add_get("/metrics", api.metrics_page)
    router.add_get("/api/v1/openapi.json", api.openapi_json)
    router.add_get("/api/v1/summary", api.summary)
    router.add_get("/api/v1/flows", api.flows)
    router.add_get("/api/v1/flows/{id:.+}", api.flow)
    router.add_get("/api/v1/matrix", api.matrix)
    router.add_get("/api/v1/agents", api.agents)
    router.add_get("/api/v1/events", api.events)

    async def close_streams(_: web.Application) -> None:
        broadcaster.close()

    app.on_shutdown.append(close_streams)
    return app


__all__ = [
    "Broadcaster",
    "Event",
    "StateView",
    "build_matrix",
    "build_web_app",
    "concrete_row",
    "declared_summary",
    "load_openapi",
    "workload_of",
]
