"""The collector's /metrics through a real Prometheus and Alertmanager (Debian packages): a required
flow broken in the flow state pages through Alertmanager to a webhook naming the flow, and
resolves when fixed; the same for a forbidden flow opened; every panel of every Grafana
dashboard returns data. The project's own rules run with their `for:` shortened to 1 s.

The flow state is filled by the real planner and flow state with simulated probe results
(tests/e2e_support/samples.py); the full loop with the lab and agents is the end-to-end test.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from collector.core.model import LabelSelector, NetworkPolicy, Peer, Rule
from collector.core.views import LoopStatus
from collector.metrics import CollectorMetrics
from collector.web.app import StateView, build_web_app
from collector.web.events import Broadcaster
from tests.e2e_support.dashboards import panel_queries
from tests.e2e_support.monitoring import Alertmanager, Prometheus, WebhookReceiver, short_rules
from tests.e2e_support.samples import SampleLoop, shop_snapshot, without

pytestmark = pytest.mark.slow

OPEN_DB = NetworkPolicy(
    namespace="shop",
    name="db-open-to-all",
    pod_selector=LabelSelector(match_labels=(("app", "db"),)),
    ingress=(Rule(peers=(Peer(pod_selector=LabelSelector()),)),),
)


@dataclass
class Stack:
    loop: SampleLoop
    metrics: CollectorMetrics
    prometheus: Prometheus
    hook: WebhookReceiver
    observed: int = 0

    def change(self, snapshot: Any) -> None:
        """Apply a snapshot and probe everything, as the runtime would, feeding the metrics."""
        self.loop.apply(snapshot)
        self.loop.probe_all()
        for result in self.loop.results[self.observed :]:
            self.metrics.observe_result(result)
        self.observed = len(self.loop.results)
        self.metrics.observe_latency(self.loop.state.take_latency_samples())


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    loop = SampleLoop(listener=Broadcaster().on_loop_event)
    metrics = CollectorMetrics(
        CollectorRegistry(),
        state=loop.state,
        loop_status=lambda: LoopStatus(agent_nodes=frozenset({"node-1", "node-2"})),
    )
    app = build_web_app(
        state_view=StateView(state=loop.state), metrics=metrics, broadcaster=Broadcaster()
    )
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with WebhookReceiver() as hook, Alertmanager(tmp_path, webhook_url=hook.url) as am:
            rules = short_rules(tmp_path)
            async with Prometheus(
                tmp_path,
                targets=[f"127.0.0.1:{server.port}"],
                rule_files=[rules],
                alertmanager=am.address,
            ) as prometheus:
                result = Stack(loop, metrics, prometheus, hook)
                result.change(shop_snapshot())
                await prometheus.wait_for_query('flowproof_flow_status{status="PASS"} == 1')
                yield result
    finally:
        await server.close()


async def test_a_broken_required_flow_pages_and_resolves(stack: Stack) -> None:
    stack.change(without(shop_snapshot(), "frontend-to-api"))
    alert = await stack.hook.wait_for_alert(
        "FlowproofRequiredFlowBlocked", flow="frontend-to-api", timeout_seconds=40
    )
    assert alert["labels"]["namespace"] == "shop"
    assert alert["labels"]["expectation"] == "shop/shop"
    assert alert["labels"]["severity"] == "critical"
    description = alert["annotations"]["description"]
    assert "frontend-to-api" in description and "shop/shop" in description
    assert alert["annotations"]["runbook_url"].endswith("#flowproofrequiredflowblocked")
    stack.change(shop_snapshot())
    await stack.hook.wait_for_alert(
        "FlowproofRequiredFlowBlocked",
        status="resolved",
        flow="frontend-to-api",
        timeout_seconds=40,
    )


async def test_an_opened_forbidden_flow_pages_and_resolves(stack: Stack) -> None:
    opened = shop_snapshot()
    opened = dataclasses.replace(opened, policies=(*opened.policies, OPEN_DB))
    stack.change(opened)
    alert = await stack.hook.wait_for_alert(
        "FlowproofForbiddenFlowOpen", flow="frontend-not-to-db", timeout_seconds=40
    )
    assert "declared deny" in alert["annotations"]["description"]
    stack.change(shop_snapshot())
    await stack.hook.wait_for_alert(
        "FlowproofForbiddenFlowOpen",
        status="resolved",
        flow="frontend-not-to-db",
        timeout_seconds=40,
    )


async def test_every_dashboard_panel_returns_data(stack: Stack) -> None:
    # A break and a fix give every panel something to show: mismatches, latency samples, rates.
    stack.change(without(shop_snapshot(), "frontend-to-api"))
    await stack.prometheus.wait_for_query('flowproof_flow_status{status="REQUIRED_BLOCKED"} == 1')
    await stack.prometheus.wait_for_query("flowproof_change_to_verdict_seconds_count > 0")
    await stack.prometheus.wait_for_query("rate(flowproof_probes_total[10s]) > 0")
    empty = []
    for query in panel_queries():
        if query.instant:
            result = await stack.prometheus.query(query.expr)
        else:
            result = await stack.prometheus.query_range(query.expr, seconds=30)
        if not result:
            empty.append(query.name)
    assert not empty, f"panels with no data: {empty}"
    latency = await stack.prometheus.query(
        "histogram_quantile(0.95, sum by (le) (increase(flowproof_change_to_verdict_seconds_bucket[1m])))"
    )
    assert latency and not math.isnan(float(latency[0]["value"][1]))
