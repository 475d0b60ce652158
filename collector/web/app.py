"""The collector's HTTP face: the live web view, the JSON API under /api/v1, /metrics and health.

Owns `build_web_app` (routes, the OpenAPI document, the static page from collector/web/webui) and
the stream of server-sent events with each flow's current row. It only reads the flow state through
collector.core.views (one JSON shape per concept) and never decides a status; it loads nothing from
the internet.

    broadcaster = Broadcaster()
    collector.subscribe(broadcaster.on_loop_event)
    app = build_web_app(state_view=StateView(state=..., loop_status=..., agents=...),
                        metrics=CollectorMetrics(CollectorRegistry(), state=...),
                        broadcaster=broadcaster)
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp_sse import EventSourceResponse, sse_response

from collector.core.evidence import EVIDENCE_STATUSES
from collector.core.flowstate import FlowState
from collector.core.planning import FLOW_KINDS
from collector.core.statuses import FAILING, STATUS_ORDER, status_rank
from collector.core.views import (
    LoopStatus,
    build_matrix,
    compliance_ratio,
    declared_json,
    declared_matches,
    evidence_summary,
    flow_detail,
    flow_view,
    nodes_needing_agents,
    policy_json,
    row_matches,
    sort_evidence,
    status_counts,
)
from collector.web.events import Broadcaster, Event, Subscriber, event_data
from flowproof import __version__
from flowproof.errors import bounded
from flowproof.logs import LogLimiter

WEBUI = Path(__file__).with_name("webui")
STATIC_FILES = {"app.js": "text/javascript", "app.css": "text/css"}
KEEPALIVE_SECONDS = 15.0
SEND_TIMEOUT_SECONDS = 30.0
"""A page whose connection takes no event for this long (a stalled peer) is cut off."""
RETRY_MILLISECONDS = 1000
"""How soon a browser reconnects after the stream breaks."""
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class Exposition(Protocol):
    """What serves /metrics (collector.metrics.CollectorMetrics)."""

    content_type: str

    def exposition(self) -> bytes: ...


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


# --- the application ------------------------------------------------------------------------------


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
        metrics: Exposition,
        broadcaster: Broadcaster,
        keepalive_seconds: float,
        send_timeout_seconds: float = SEND_TIMEOUT_SECONDS,
    ) -> None:
        self.view = view
        self.metrics = metrics
        self.broadcaster = broadcaster
        self.keepalive_seconds = keepalive_seconds
        self.send_timeout_seconds = send_timeout_seconds
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
        return web.Response(
            body=self.metrics.exposition(), headers={"Content-Type": self.metrics.content_type}
        )

    async def openapi_json(self, _: web.Request) -> web.Response:
        return web.json_response(self.openapi)

    # -- API ---------------------------------------------------------------------------------------

    def _rows(self) -> list[dict[str, Any]]:
        return [flow_view(r).to_json() for r in self.view.state.flows()]

    async def summary(self, _: web.Request) -> web.Response:
        state = self.view.state
        declared = state.declared()
        loop = self.view.loop_status()
        needed = nodes_needing_agents(state)
        counts = status_counts(d.status for d in declared)
        ratios = compliance_ratio(declared)
        passing = counts["PASS"]
        return web.json_response(
            {
                "version": __version__,
                "now": time.time(),
                "ready": self.view.ready(),
                "role": "leader" if loop.leading else "standby",
                "leader": loop.leader,
                "generation": self.view.generation(),
                "declared": {"total": len(declared), "byStatus": counts},
                "flows": {
                    kind: status_counts(r.status for r in state.flows(kind)) for kind in FLOW_KINDS
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
                "policies": evidence_summary(state.evidence(), state.coverage()),
            }
        )

    async def policies(self, request: web.Request) -> web.Response:
        state = self.view.state
        namespace = request.query.get("namespace", "")
        status = request.query.get("status", "")
        if status and status not in EVIDENCE_STATUSES:
            return _bad_request(f"status must be one of {', '.join(EVIDENCE_STATUSES)}")
        items = [
            e
            for e in sort_evidence(state.evidence())
            if (not namespace or e.namespace == namespace) and (not status or e.status == status)
        ]
        return web.json_response(
            {
                **evidence_summary(items, state.coverage()),
                "policies": [policy_json(e) for e in items],
            }
        )

    async def policy(self, request: web.Request) -> web.Response:
        wanted = f"{request.match_info['namespace']}/{request.match_info['name']}"
        for item in self.view.state.evidence():
            if f"{item.namespace}/{item.name}" == wanted:
                return web.json_response(policy_json(item))
        raise web.HTTPNotFound(
            text=json.dumps({"error": f"no NetworkPolicy {wanted!r}"}),
            content_type="application/json",
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
            by_declared[record.planned.declared_id].append(flow_view(record).to_json())
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
            if query and not declared_matches(item, concrete, query):
                continue
            items.append({**declared_json(item), "concrete": concrete})
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
                "declared": declared_json(item) if item is not None else None,
                "flows": [flow_detail(r) for r in records],
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
        if kind and kind not in FLOW_KINDS:
            return _bad_request(f"kind must be one of {', '.join(FLOW_KINDS)}")
        rows = [
            r
            for r in self._rows()
            if row_matches(
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
        """The event stream (aiohttp-sse: framing, pings every keepalive_seconds, and a peer
        that stops reading for SEND_TIMEOUT_SECONDS is cut off instead of holding the stream)."""
        async with sse_response(
            request,
            sep="\n",
            ping_interval=self.keepalive_seconds,
            send_timeout=self.send_timeout_seconds,
            headers={"X-Accel-Buffering": "no"},
        ) as response:
            if self.broadcaster.closed:
                return response
            async with self.broadcaster.subscribe() as subscriber:
                # The client went away, or stopped reading: nothing to do.
                with contextlib.suppress(ConnectionError, TimeoutError):
                    await self._stream(response, subscriber)
        return response

    async def _stream(self, response: EventSourceResponse, subscriber: Subscriber) -> None:
        hello = {"version": __version__, "generation": self.view.generation(), "at": time.time()}
        await response.send(event_data(hello), event="hello", retry=RETRY_MILLISECONDS)
        while True:
            if subscriber.overflowed and not self.broadcaster.closed:
                await response.send(event_data({"reason": "too many events"}), event="resync")
                return
            event = await subscriber.queue.get()
            if event is None:
                return
            await response.send(
                event_data(self._annotate(event)), id=str(event.id), event=event.kind
            )

    def _annotate(self, event: Event) -> dict[str, Any]:
        """The event's data with the current row of the flow it names (when it names one)."""
        data: dict[str, Any] = {**event.data, "publishedAt": event.at}
        if event.flow_key is not None:
            record = self.view.state.flow(event.flow_key)
            data["flow"] = event.flow_key
            data["row"] = flow_view(record).to_json() if record is not None else None
        return data


class MalformedRequests(logging.Filter):
    """Turns aiohttp's `Error handling request` with a traceback at ERROR, which any client can
    trigger with a malformed request, into one short WARNING line, rate-limited."""

    def __init__(self, limiter: LogLimiter | None = None) -> None:
        super().__init__()
        self.limiter = limiter or LogLimiter()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        suffix = self.limiter.admit("malformed HTTP request")
        if suffix is None:
            return False
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        reason = " ".join(str(exc.message).split())
        record.msg = "malformed HTTP request from %s: %s %s%s"
        record.args = (peer, exc.code, bounded(reason, 160), suffix)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info, record.exc_text = None, None
        return True


def _bad_request(reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=400)


def build_web_app(
    *,
    state_view: StateView,
    metrics: Exposition,
    broadcaster: Broadcaster,
    app: web.Application | None = None,
    keepalive_seconds: float = KEEPALIVE_SECONDS,
    send_timeout_seconds: float = SEND_TIMEOUT_SECONDS,
) -> web.Application:
    """The routes of the web view, API, metrics and health, added to `app` (or a new one).

    Closing the app ends every open event stream (so a graceful stop is not held up by them).
    """
    app = app if app is not None else web.Application()
    api = _Api(state_view, metrics, broadcaster, keepalive_seconds, send_timeout_seconds)
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
    router.add_get("/api/v1/policies", api.policies)
    router.add_get("/api/v1/policies/{namespace}/{name}", api.policy)
    router.add_get("/api/v1/events", api.events)

    async def close_streams(_: web.Application) -> None:
        broadcaster.close()

    server_log = logging.getLogger("aiohttp.server")
    malformed = MalformedRequests()

    async def quiet_malformed_requests(_: web.Application) -> None:
        server_log.addFilter(malformed)

    async def restore_logging(_: web.Application) -> None:
        server_log.removeFilter(malformed)

    app.on_startup.append(quiet_malformed_requests)
    app.on_shutdown.append(close_streams)
    app.on_cleanup.append(restore_logging)
    return app


__all__ = ["WEBUI", "Exposition", "StateView", "build_web_app", "load_openapi"]
