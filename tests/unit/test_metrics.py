"""The collector's metrics: per declared flow series from the real flow state, loop counters,
no stale series, the fast exposition equal to prometheus-client's, and `promtool check metrics`."""

from __future__ import annotations

import dataclasses
import platform
import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from collector.core.model import Snapshot
from collector.core.statuses import STATUS_ORDER
from collector.core.views import LoopStatus, nodes_needing_agents
from collector.metrics import CollectorMetrics
from flowproof import __version__
from flowproof.probes import Outcome
from tests.e2e_support.samples import SampleLoop, large_snapshot, shop_snapshot, without
from tests.support.clock import ManualClock

SHOP = "shop/shop"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def loaded(
    loop_status: LoopStatus | None = None,
) -> tuple[SampleLoop, CollectorRegistry, CollectorMetrics]:
    loop = SampleLoop()
    loop.probe_all()
    registry = CollectorRegistry()
    metrics = CollectorMetrics(
        registry, state=loop.state, loop_status=lambda: loop_status or LoopStatus()
    )
    return loop, registry, metrics


def flow_labels(flow: str, **extra: str) -> dict[str, str]:
    return {"expectation": SHOP, "flow": flow, "namespace": "shop", **extra}


def samples(exposition: bytes) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    """Every sample of an exposition, without the `_created` timestamps of counters."""
    found = set()
    for family in text_string_to_metric_families(exposition.decode()):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            found.add((sample.name, tuple(sorted(sample.labels.items())), sample.value))
    return found


def test_each_declared_flow_has_one_for_its_status_and_zero_for_the_others() -> None:
    loop, registry, _ = loaded()
    loop.apply(without(loop.snapshot, "frontend-to-api"))
    loop.probe_all()
    value = registry.get_sample_value
    for status in STATUS_ORDER:
        want = 1.0 if status == "REQUIRED_BLOCKED" else 0.0
        assert value("flowproof_flow_status", flow_labels("frontend-to-api", status=status)) == want
        want = 1.0 if status == "PASS" else 0.0
        assert value("flowproof_flow_status", flow_labels("api-to-db", status=status)) == want
    assert value("flowproof_flow_info", flow_labels("frontend-not-to-db", intent="deny")) == 1.0
    assert value("flowproof_flow_observed_allowed", flow_labels("frontend-to-api")) == 0.0
    assert value("flowproof_flow_observed_denied", flow_labels("frontend-to-api")) == 4.0
    assert value("flowproof_flow_observed_allowed", flow_labels("api-to-db")) == 2.0
    verified = value("flowproof_flow_last_verified_timestamp_seconds", flow_labels("api-to-db"))
    assert verified == min(
        r.last_verified_at or 0
        for r in loop.state.flows("declared")
        if r.planned.flow == "api-to-db"
    )


def test_a_flow_never_probed_has_no_last_verified_time_yet(registry: CollectorRegistry) -> None:
    loop = SampleLoop()
    CollectorMetrics(registry, state=loop.state)
    labels = flow_labels("frontend-to-api")
    assert (
        registry.get_sample_value("flowproof_flow_status", {**labels, "status": "PENDING"}) == 1.0
    )
    assert (
        registry.get_sample_value("flowproof_flow_last_verified_timestamp_seconds", labels) is None
    )


def test_a_flow_that_disappears_leaves_no_series(registry: CollectorRegistry) -> None:
    loop = SampleLoop()
    loop.probe_all()
    metrics = CollectorMetrics(registry, state=loop.state)
    assert b'flow="batch-not-to-api"' in metrics.exposition()
    snapshot = loop.snapshot
    assert snapshot is not None
    document = snapshot.expectations[0]
    kept = tuple(f for f in document.flows if f.name != "batch-not-to-api")
    loop.apply(
        dataclasses.replace(snapshot, expectations=(dataclasses.replace(document, flows=kept),))
    )
    for exposition in (metrics.exposition(), generate_latest(registry)):
        assert b"batch-not-to-api" not in exposition
        assert b'flow="frontend-to-api"' in exposition


def test_a_namespace_that_loses_its_last_flow_loses_its_compliance_ratio(
    registry: CollectorRegistry,
) -> None:
    loop = SampleLoop()
    loop.probe_all()
    CollectorMetrics(registry, state=loop.state)
    assert registry.get_sample_value("flowproof_compliance_ratio", {"namespace": "shop"}) == 1.0
    loop.apply(dataclasses.replace(shop_snapshot(), expectations=()))
    assert registry.get_sample_value("flowproof_compliance_ratio", {"namespace": "shop"}) is None
    assert registry.get_sample_value("flowproof_declared_flows", {"status": "PASS"}) == 0.0


def test_compliance_counts_only_proven_flows() -> None:
    loop = SampleLoop()
    registry = CollectorRegistry()
    CollectorMetrics(registry, state=loop.state)
    assert registry.get_sample_value("flowproof_compliance_ratio", {"namespace": "shop"}) == 0.0, (
        "pending flows are not proven"
    )
    loop.probe_all()
    loop.apply(without(loop.snapshot, "api-to-db"))
    loop.probe_all()
    assert registry.get_sample_value("flowproof_compliance_ratio", {"namespace": "shop"}) == 4 / 5
    assert (
        registry.get_sample_value("flowproof_declared_flows", {"status": "REQUIRED_BLOCKED"}) == 1.0
    )
    assert (
        registry.get_sample_value(
            "flowproof_flows", {"kind": "declared", "status": "REQUIRED_BLOCKED"}
        )
        == 2.0
    )
    witness = sum(
        registry.get_sample_value("flowproof_flows", {"kind": "witness", "status": s}) or 0
        for s in STATUS_ORDER
    )
    assert witness == len(loop.state.flows("witness")) > 0


@pytest.mark.parametrize(
    ("connected", "without_agent"),
    [
        pytest.param(frozenset(), 2, id="no agent: both nodes miss one"),
        pytest.param(frozenset({"node-1"}), 1, id="one of two nodes has its agent"),
        pytest.param(
            frozenset({"node-1", "node-2", "node-9"}), 0, id="an extra agent hides nothing"
        ),
    ],
)
def test_nodes_agents_and_the_queue(connected: frozenset[str], without_agent: int) -> None:
    status = LoopStatus(
        agent_nodes=connected,
        assignments_queued=3,
        assignments_in_flight=5,
        assignments_issued_total=40,
        assignment_retries_total=2,
        assignments_lost_total=1,
        assignments_rate_limited_total=7,
        plans_whole_total=4,
        plans_updated_total=9,
    )
    loop, registry, _ = loaded(status)
    assert nodes_needing_agents(loop.state) == {"node-1", "node-2"}
    value = registry.get_sample_value
    assert value("flowproof_nodes") == 2.0
    assert value("flowproof_agents_connected") == len(connected)
    assert value("flowproof_nodes_without_agent") == without_agent
    assert value("flowproof_assignments_queued") == 3.0
    assert value("flowproof_assignments_in_flight") == 5.0
    assert value("flowproof_assignments_issued_total") == 40.0
    assert value("flowproof_assignment_retries_total") == 2.0
    assert value("flowproof_assignments_lost_total") == 1.0
    assert value("flowproof_assignments_rate_limited_total") == 7.0
    assert value("flowproof_plans_total", {"how": "whole"}) == 4.0
    assert value("flowproof_plans_total", {"how": "update"}) == 9.0


def test_probe_results_are_counted_by_protocol_and_outcome(registry: CollectorRegistry) -> None:
    loop = SampleLoop()
    metrics = CollectorMetrics(registry, state=loop.state)
    assert (
        registry.get_sample_value("flowproof_probes_total", {"protocol": "UDP", "outcome": "ERROR"})
        == 0.0
    ), "every protocol and outcome starts at zero, so rates and ratios exist before the first error"
    loop.probe_all()
    for result in loop.results:
        metrics.observe_result(result)
    connected = sum(1 for r in loop.results if r.outcome is Outcome.CONNECTED)
    timeouts = sum(1 for r in loop.results if r.outcome is Outcome.TIMEOUT)
    assert connected and timeouts
    value = registry.get_sample_value
    assert value("flowproof_probes_total", {"protocol": "TCP", "outcome": "CONNECTED"}) == connected
    assert value("flowproof_probes_total", {"protocol": "TCP", "outcome": "TIMEOUT"}) == timeouts
    assert value("flowproof_probe_duration_seconds_count", {"protocol": "TCP"}) == len(loop.results)
    assert (
        value("flowproof_probe_duration_seconds_bucket", {"protocol": "TCP", "le": "0.001"})
        == connected
    )
    build = {"version": __version__, "component": "collector", "python": platform.python_version()}
    assert value("flowproof_build_info", build) == 1.0


def test_feedback_latency_comes_from_the_flow_state(registry: CollectorRegistry) -> None:
    clock = ManualClock(1000.0)
    loop = SampleLoop(clock=clock)
    metrics = CollectorMetrics(registry, state=loop.state)
    loop.probe_all()
    assert metrics.observe_latency(loop.state.take_latency_samples()) == 0, (
        "the first snapshot is no change"
    )
    clock.now += 5
    loop.apply(without(loop.snapshot, "frontend-to-api"))
    clock.now += 1.5
    loop.probe_all(kind="declared")
    observed = metrics.observe_latency(loop.state.take_latency_samples())
    # Touched: the 4 pod pairs of frontend-to-api, and the 4 pairs into api whose explanation named
    # the removed policy among those isolating api (monitoring-scrapes-api, batch-not-to-api).
    assert observed == 8
    value = registry.get_sample_value
    assert value("flowproof_change_to_verdict_seconds_count") == 8.0
    assert value("flowproof_change_to_verdict_seconds_sum") == pytest.approx(8 * 1.5)
    assert value("flowproof_change_to_verdict_seconds_bucket", {"le": "1.0"}) == 0.0
    assert value("flowproof_change_to_verdict_seconds_bucket", {"le": "2.0"}) == 8.0


@pytest.mark.parametrize(
    "snapshot",
    [
        pytest.param(shop_snapshot(), id="the shop, with a blocked flow and drift samples"),
        pytest.param(
            large_snapshot(namespaces=2, workloads=6, flows_per_namespace=20),
            id="two namespaces of generated flows",
        ),
    ],
)
def test_the_fast_exposition_has_exactly_the_samples_of_prometheus_client(
    snapshot: Snapshot,
) -> None:
    loop = SampleLoop(snapshot)
    loop.probe_all()
    loop.apply(dataclasses.replace(snapshot, policies=snapshot.policies[:-1]))
    loop.probe_all(kind="declared")
    registry = CollectorRegistry()
    metrics = CollectorMetrics(registry, state=loop.state)
    for result in loop.results:
        metrics.observe_result(result)
    fast, slow = samples(metrics.exposition()), samples(generate_latest(registry))
    assert fast == slow
    assert any(name == "flowproof_flow_status" for name, _, _ in fast)


def test_flow_names_that_need_escaping_survive_the_fast_path() -> None:
    loop = SampleLoop()
    snapshot = loop.snapshot
    assert snapshot is not None
    document = snapshot.expectations[0]
    odd = dataclasses.replace(document.flows[0], name='we"ird\\name')
    loop.apply(
        dataclasses.replace(snapshot, expectations=(dataclasses.replace(document, flows=(odd,)),))
    )
    registry = CollectorRegistry()
    metrics = CollectorMetrics(registry, state=loop.state)
    assert samples(metrics.exposition()) == samples(generate_latest(registry))
    assert (
        registry.get_sample_value(
            "flowproof_flow_status", flow_labels('we"ird\\name', status="PENDING")
        )
        == 1.0
    )


def test_promtool_accepts_a_real_scrape() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("needs promtool: apt-get install -y prometheus")
    loop, _, metrics = loaded(LoopStatus(agent_nodes=frozenset({"node-1"})))
    for result in loop.results:
        metrics.observe_result(result)
    loop.apply(without(loop.snapshot, "api-to-db"))
    loop.probe_all()
    metrics.observe_latency(loop.state.take_latency_samples())
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=metrics.exposition(), capture_output=True, check=False
    )
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    bad = subprocess.run(
        [promtool, "check", "metrics"],
        input=b"# TYPE flowproof_bad counter\nflowproof_bad 1\n",
        capture_output=True,
        check=False,
    )
    assert bad.returncode != 0, (
        "promtool must reject a counter without _total, or this test proves nothing"
    )


def test_a_standby_exports_its_role_and_no_flow_evidence_or_agent_series() -> None:
    _, leader_registry, leader = loaded()
    _, standby_registry, standby = loaded(LoopStatus(leading=False, leader="collector-0"))
    leading_names = {name for name, _, _ in samples(leader.exposition())}
    assert ("flowproof_collector_leader", (), 1.0) in samples(leader.exposition())
    assert {"flowproof_flow_status", "flowproof_nodes_without_agent"} <= leading_names
    for exposition in (standby.exposition(), generate_latest(standby_registry)):
        found = samples(exposition)
        names = {name for name, _, _ in found}
        assert ("flowproof_collector_leader", (), 0.0) in found
        # Nothing a standby could only get wrong: no flows, compliance, evidence or agents.
        for prefix in ("flowproof_flow", "flowproof_compliance", "flowproof_polic",
                       "flowproof_nodes", "flowproof_agents", "flowproof_declared"):  # fmt: skip
            assert not {n for n in names if n.startswith(prefix)}, prefix
        assert "flowproof_probes_total" in names, "its own counters stay (all zero)"
    assert generate_latest(leader_registry)
