"""The collector's web app on a real aiohttp server over a flow state filled with real results:
the JSON API and its OpenAPI document, /metrics (checked by promtool), health, the static page,
and server-sent events that carry a verdict to a listening client within a second."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from prometheus_client import CollectorRegistry
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from collector.core.views import LoopStatus, workload_of
from collector.dispatching import AgentInfo
from collector.metrics import CollectorMetrics
from collector.web.app import WEBUI, StateView, build_web_app, load_openapi
from collector.web.events import Broadcaster
from flowproof.probes import AgentCapabilities, ProbeKind
from tests.e2e_support.samples import SampleLoop, shop_snapshot, without

BLOCKED_ID = "shop/shop/frontend-to-api"


def agent(node: str) -> AgentInfo:
    return AgentInfo(
        node=node,
        agent_version="0.1.0",
        protocol_version=1,
        capabilities=AgentCapabilities(False, (ProbeKind.TCP, ProbeKind.UDP), True, 64),
        instance_id=f"i-{node}",
        peer="ipv4:127.0.0.1:50000",
        connected_at=time.time() - 60,
        last_seen_at=time.time(),
        assignments_in_flight=1,
        assignments_queued=0,
        results_dropped_total=0,
    )


@dataclass
class Served:
    loop: SampleLoop
    client: TestClient[Any, Any]
    broadcaster: Broadcaster
    ready: list[bool]

    async def json(self, path: str, status: int = 200) -> Any:
        response = await self.client.get(path)
        assert response.status == status, await response.text()
        return await response.json()


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    broadcaster = Broadcaster()
    loop = SampleLoop(listener=broadcaster.on_loop_event)
    loop.probe_all()
    loop.apply(without(shop_snapshot(), "frontend-to-api"))
    loop.probe_all()
    ready = [True]
    status = LoopStatus(
        agent_nodes=frozenset({"node-1"}), assignments_queued=2, assignments_in_flight=3
    )
    view = StateView(
        state=loop.state,
        loop_status=lambda: status,
        agents=lambda: [agent("node-1")],
        ready=lambda: ready[0],
        generation=lambda: loop.generation,
    )
    metrics = CollectorMetrics(CollectorRegistry(), state=loop.state, loop_status=view.loop_status)
    app = build_web_app(
        state_view=view, metrics=metrics, broadcaster=broadcaster, keepalive_seconds=0.2
    )
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield Served(loop, client, broadcaster, ready)


# --- the OpenAPI document and response shapes ---------------------------------------------------

OPENAPI = load_openapi()
SCHEMAS = Registry().with_resource(
    "urn:flowproof:openapi", Resource.from_contents(OPENAPI, default_specification=DRAFT202012)
)


def conforms(instance: Any, schema: str) -> None:
    validator = Draft202012Validator(
        {"$ref": f"urn:flowproof:openapi#/components/schemas/{schema}"}, registry=SCHEMAS
    )
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


def test_the_openapi_document_is_valid_openapi_3_1() -> None:
    assert OPENAPI["openapi"].startswith("3.1")
    validate_openapi(OPENAPI)


def test_the_validator_rejects_a_broken_document() -> None:
    broken = json.loads(json.dumps(OPENAPI))
    broken["paths"]["/api/v1/flows"]["get"]["responses"]["200"]["content"]["application/json"][
        "schema"
    ] = {"$ref": "#/components/schemas/NoSuchSchema"}
    with pytest.raises(Exception, match="NoSuchSchema"):
        validate_openapi(broken)


async def test_every_route_is_documented_and_every_documented_path_served(served: Served) -> None:
    app = served.client.server.app
    routed = {
        re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", route.resource.canonical)
        for route in app.router.routes()
        if route.method == "GET" and route.resource is not None
    }
    assert routed == set(OPENAPI["paths"])
    assert await served.json("/api/v1/openapi.json") == OPENAPI


# --- health, metrics, page ----------------------------------------------------------------------


async def test_health_and_readiness(served: Served) -> None:
    assert (await served.json("/healthz"))["ok"] is True
    assert await served.json("/readyz") == {"ready": True}
    served.ready[0] = False
    assert await served.json("/readyz", status=503) == {"ready": False}


async def test_metrics_scrape_passes_promtool(served: Served) -> None:
    response = await served.client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    body = await response.read()
    assert (
        b'flowproof_flow_status{expectation="shop/shop",flow="frontend-to-api",namespace="shop",status="REQUIRED_BLOCKED"} 1.0'
        in body
    )
    assert b"flowproof_nodes_without_agent 1.0" in body
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("needs promtool: apt-get install -y prometheus")
    checked = await asyncio.to_thread(
        subprocess.run, [promtool, "check", "metrics"], input=body, capture_output=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_the_page_and_its_files_load_nothing_from_elsewhere(served: Served) -> None:
    page = await served.client.get("/")
    assert page.status == 200
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    html = await page.text()
    assert 'src="static/app.js"' in html and 'href="static/app.css"' in html
    for name in ("app.js", "app.css"):
        response = await served.client.get(f"/static/{name}")
        assert response.status == 200
    assert (await served.client.get("/static/openapi.yaml")).status == 404
    for path in WEBUI.iterdir():
        if path.suffix in (".html", ".js", ".css"):
            assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", path.read_text()), (
                f"{path.name} refers to another host: the view must work offline"
            )


# --- the API --------------------------------------------------------------------------------------


async def test_summary(served: Served) -> None:
    summary = await served.json("/api/v1/summary")
    conforms(summary, "Summary")
    assert summary["declared"]["total"] == 5
    assert summary["declared"]["byStatus"]["REQUIRED_BLOCKED"] == 1
    assert summary["declared"]["byStatus"]["PASS"] == 4
    assert summary["openMismatches"] == 1
    assert summary["compliance"]["ratio"] == pytest.approx(0.8)
    assert summary["compliance"]["byNamespace"] == {"shop": pytest.approx(0.8)}
    assert summary["agents"] == {"connected": 1, "nodes": 2, "missing": ["node-2"]}
    assert summary["assignments"] == {"queued": 2, "inFlight": 3}
    assert summary["flows"]["declared"]["REQUIRED_BLOCKED"] == 4
    policies = summary["policies"]
    assert policies["total"] == len(served.loop.snapshot.policies) == 3  # one is removed
    assert policies["byStatus"]["PROVEN"] + policies["byStatus"]["UNPROVABLE"] == 3


async def test_every_policy_with_its_evidence_worst_first(served: Served) -> None:
    listing = await served.json("/api/v1/policies")
    conforms(listing, "PolicyList")
    statuses = [p["status"] for p in listing["policies"]]
    order = ["NOT_ENFORCED", "PENDING", "UNPROVABLE", "PROVEN"]
    assert statuses == sorted(statuses, key=order.index)
    proven = [p for p in listing["policies"] if p["status"] == "PROVEN"]
    assert proven, listing
    one = proven[0]
    detail = await served.json(f"/api/v1/policies/{one['id']}")
    conforms(detail, "PolicyEvidence")
    witnesses = detail["witnesses"] + [w for r in detail["rules"] for w in r["witnesses"]]
    assert witnesses and all(w["status"] == "PASS" for w in witnesses)
    assert all(w["flow"].startswith("witness:") for w in witnesses)
    only = await served.json(f"/api/v1/policies?status=PROVEN&namespace={one['namespace']}")
    assert {p["id"] for p in only["policies"]} <= {p["id"] for p in proven}
    missing = await served.json("/api/v1/policies/shop/no-such-policy", status=404)
    assert "no-such-policy" in missing["error"]
    await served.json("/api/v1/policies?status=MAYBE", status=400)


@pytest.mark.parametrize(
    ("query", "ids"),
    [
        pytest.param("", None, id="everything, worst first"),
        pytest.param("?status=REQUIRED_BLOCKED", [BLOCKED_ID], id="by status"),
        pytest.param(
            "?namespace=shop&expectation=shop", None, id="by namespace and expectation name"
        ),
        pytest.param(
            "?expectation=shop/shop&q=batch", ["shop/shop/batch-not-to-api"], id="by text"
        ),
        pytest.param("?namespace=monitoring", [], id="a namespace with no expectation"),
    ],
)
async def test_flow_list_and_filters(served: Served, query: str, ids: list[str] | None) -> None:
    listing = await served.json(f"/api/v1/flows{query}")
    conforms(listing, "FlowList")
    got = [f["id"] for f in listing["flows"]]
    if ids is None:
        assert len(got) == 5 and got[0] == BLOCKED_ID
    else:
        assert got == ids
    assert listing["total"] == len(got)


async def test_a_bad_filter_is_a_400_saying_why(served: Served) -> None:
    body = await served.json("/api/v1/flows?status=BROKEN", status=400)
    conforms(body, "Error")
    assert "PASS" in body["error"]
    await served.json("/api/v1/matrix?level=galaxy", status=400)


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(f"/api/v1/flows/{BLOCKED_ID}", id="slashes as they are"),
        pytest.param(f"/api/v1/flows/{quote(BLOCKED_ID, safe='')}", id="slashes percent-encoded"),
    ],
)
async def test_one_declared_flow_explains_itself(served: Served, path: str) -> None:
    detail = await served.json(path)
    conforms(detail, "FlowDetail")
    assert detail["kind"] == "declared"
    assert detail["declared"]["status"] == "REQUIRED_BLOCKED"
    flows = detail["flows"]
    assert len(flows) == 4
    first = flows[0]
    assert first["intent"] == "allow"
    assert first["model"] == "deny"
    assert first["explanation"]["ingress"]["policies"] == [
        "shop/default-deny",
        "shop/monitoring-to-api",
    ]
    assert "confirmed by a retry" in first["reason"]
    latest = first["results"][-1]
    assert (
        latest["outcome"] == "TIMEOUT"
        and latest["latencySeconds"] == 2.0
        and latest["receivedAt"] > 0
    )
    assert [h["to"] for h in first["history"]] == ["PASS", "POLICY_MISMATCH", "REQUIRED_BLOCKED"]


async def test_one_concrete_flow_and_a_witness_by_key(served: Served) -> None:
    key = next(r.key for r in served.loop.state.flows("declared") if r.planned.flow == "api-to-db")
    detail = await served.json(f"/api/v1/flows/{quote(key, safe='')}")
    conforms(detail, "FlowDetail")
    assert [f["key"] for f in detail["flows"]] == [key]
    assert detail["flows"][0]["explanation"]["deciding"] == [
        "NetworkPolicy tier: shop/api-to-db ingress[0] (from[0] podSelector app=api; "
        "ports[0] 5432/TCP) -> Allow"
    ]
    assert detail["declared"]["id"] == "shop/shop/api-to-db"
    witness = served.loop.state.flows("witness")[0].key
    sample = await served.json(f"/api/v1/flows/{quote(witness, safe='')}")
    conforms(sample, "FlowDetail")
    assert sample["kind"] == "witness" and sample["declared"] is None
    missing = await served.json("/api/v1/flows/shop/shop/no-such-flow", status=404)
    assert "no-such-flow" in missing["error"]


async def test_the_matrix_by_workload_and_the_drill_down_to_pods(served: Served) -> None:
    matrix = await served.json("/api/v1/matrix?kind=declared")
    conforms(matrix, "Matrix")
    cells = {(c["source"], c["destination"]): c for c in matrix["cells"]}
    blocked = cells[("shop/frontend", "shop/api")]
    assert blocked["status"] == "REQUIRED_BLOCKED" and blocked["counts"] == {"REQUIRED_BLOCKED": 4}
    assert cells[("shop/api", "shop/db")]["status"] == "PASS"
    assert cells[("monitoring/prometheus", "shop/api")]["status"] == "PASS"
    assert {g["id"] for g in matrix["sources"]} == {
        "shop/frontend",
        "shop/api",
        "shop/batch",
        "monitoring/prometheus",
    }
    assert len(matrix["flows"]) == 12
    pods = await served.json("/api/v1/matrix?level=pod&source=shop/frontend&destination=shop/api")
    conforms(pods, "Matrix")
    assert {g["id"] for g in pods["sources"]} == {"shop/frontend-0", "shop/frontend-1"}
    assert {g["id"] for g in pods["destinations"]} == {"shop/api-0", "shop/api-1"}
    assert {c["status"] for c in pods["cells"]} == {"REQUIRED_BLOCKED"} and len(pods["cells"]) == 4
    only = await served.json("/api/v1/matrix?status=PASS&namespace=monitoring&kind=declared")
    assert [(c["source"], c["destination"]) for c in only["cells"]] == [
        ("monitoring/prometheus", "shop/api")
    ]


async def test_agents_and_the_nodes_that_need_them(served: Served) -> None:
    agents = await served.json("/api/v1/agents")
    conforms(agents, "Agents")
    assert agents["agents"][0]["node"] == "node-1"
    assert agents["agents"][0]["capabilities"]["probeKinds"] == ["TCP", "UDP"]
    assert agents["nodes"] == [
        {"name": "node-1", "needed": True, "agentConnected": True},
        {"name": "node-2", "needed": True, "agentConnected": False},
    ]
    assert agents["missing"] == ["node-2"]


@pytest.mark.parametrize(
    ("name", "labels", "workload"),
    [
        pytest.param("api-7d9f8b6c5d-x2x9z", {}, "api", id="a Deployment pod without labels"),
        pytest.param("db-0", {}, "db", id="a StatefulSet pod"),
        pytest.param(
            "anything",
            {"app.kubernetes.io/name": "shop-web"},
            "shop-web",
            id="the recommended name label wins",
        ),
        pytest.param("solo", {}, "solo", id="a bare pod is its own workload"),
    ],
)
def test_workload_of_a_pod(name: str, labels: dict[str, str], workload: str) -> None:
    from collector.core.model import Pod

    assert workload_of(Pod(namespace="x", name=name, labels=labels)) == workload


# --- server-sent events ---------------------------------------------------------------------------


async def read_event(response: ClientResponse, within: float = 2.0) -> tuple[str, dict[str, Any]]:
    """The next event (kind, data) of an event stream, skipping comments."""
    kind, data = "", ""
    async with asyncio.timeout(within):
        while True:
            line = (await response.content.readline()).decode()
            if line.startswith(":") or line.startswith("retry:") or line.startswith("id:"):
                continue
            if line.startswith("event:"):
                kind = line.partition(":")[2].strip()
            elif line.startswith("data:"):
                data += line.partition(":")[2].strip()
            elif line == "\n" and kind:
                return kind, json.loads(data)
            elif line == "":
                raise ConnectionError("the stream ended")


async def test_a_verdict_reaches_a_listening_client_within_a_second(served: Served) -> None:
    response = await served.client.get("/api/v1/events")
    assert response.headers["Content-Type"] == "text/event-stream"
    kind, hello = await read_event(response)
    assert kind == "hello" and hello["generation"] == served.loop.generation
    start = time.monotonic()
    served.loop.apply(shop_snapshot())  # the allow rule is back
    served.loop.probe_all(flow="frontend-to-api")
    seen: dict[str, dict[str, Any]] = {}
    while len(seen) < 4:
        kind, data = await read_event(response)
        if kind == "status" and data["to"] == "PASS":
            seen[data["flow"]] = data
    assert time.monotonic() - start < 1.0
    row = next(iter(seen.values()))["row"]
    assert row["status"] == "PASS" and row["declared"] == BLOCKED_ID
    conforms(row, "ConcreteRow")
    response.close()


async def test_keepalives_flow_and_closing_the_app_ends_the_stream(served: Served) -> None:
    response = await served.client.get("/api/v1/events")
    await read_event(response)
    line = await asyncio.wait_for(response.content.readline(), 1.0)
    assert line == b": ping\n", "a comment line every keepalive_seconds"
    assert served.broadcaster.subscribers == 1
    served.broadcaster.close()
    async with asyncio.timeout(2):
        while await response.content.readline():
            pass
    assert served.broadcaster.subscribers == 0


async def test_a_page_that_stops_reading_is_cut_off_and_lets_go_of_its_queue() -> None:
    """A stalled peer (its socket open, nothing read): the send times out, the stream ends and
    the subscriber is gone, instead of a handler blocked on a write forever."""
    broadcaster = Broadcaster()
    loop = SampleLoop(listener=broadcaster.on_loop_event)
    view = StateView(
        state=loop.state,
        loop_status=lambda: LoopStatus(frozenset(), 0, 0),
        agents=list,
        ready=lambda: True,
        generation=lambda: loop.generation,
    )
    metrics = CollectorMetrics(CollectorRegistry(), state=loop.state)
    app = build_web_app(
        state_view=view,
        metrics=metrics,
        broadcaster=broadcaster,
        keepalive_seconds=0.2,
        send_timeout_seconds=0.5,
    )
    async with TestServer(app, host="127.0.0.1") as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(b"GET /api/v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            await reader.readuntil(b"event: hello")  # then never read again
            assert broadcaster.subscribers == 1
            big = {"padding": "x" * 60_000}
            for _ in range(400):  # 24 MB: far more than the socket buffers hold
                if broadcaster.subscribers == 0:
                    break
                broadcaster.publish("result", big)
                await asyncio.sleep(0.01)
            for _ in range(100):  # up to 5 s: the handler leaves on its own, nothing to wait on
                if broadcaster.subscribers == 0:
                    break
                await asyncio.sleep(0.05)
            assert broadcaster.subscribers == 0, "the stalled page still holds its stream"
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def test_a_client_that_falls_behind_is_told_to_resync() -> None:
    broadcaster = Broadcaster(queue_size=2)
    async with broadcaster.subscribe() as subscriber:
        for i in range(5):
            broadcaster.publish("result", {"n": i})
        assert subscriber.overflowed
        assert subscriber.queue.qsize() == 2
    assert broadcaster.subscribers == 0
    assert broadcaster.published_total == 5
