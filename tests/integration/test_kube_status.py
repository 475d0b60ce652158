"""FlowExpectations status under what the real API server cannot be made to do (tests/fakeapi).

The status as written to a real kube-apiserver (per object, 409, deletion, 403) is tested in
tests/controlplane/test_api_status.py. Here: an object the CRD's validation would refuse (so it
gets a `problem`), 5xx answers on demand; and `expectations_status` on its own, table-style.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from collector.cluster import (
    MAX_STATUS_FAILURES,
    conditions_of,
    expectations_status,
    status_patch,
    status_publisher,
    transitions,
    with_conditions,
)
from collector.core.changes import diff_snapshots
from collector.core.flowstate import DeclaredStatus
from collector.core.model import Snapshot
from collector.core.statuses import Status
from collector.kube import (
    ExpectationsObject,
    InventoryUpdate,
    KubernetesSource,
    KubeSourceSettings,
    load_kube_config,
)
from collector.loop import Collector
from collector.settings import CollectorSettings
from flowproof.probes import Outcome, ProbeResult
from tests.fakeapi import FakeApiServer
from tests.support.apiobjects import (
    TOKEN,
    kubeconfig_for,
    make_expectations,
    make_flow,
    make_namespace,
    make_pod,
    make_policy,
)
from tests.support.clock import ManualClock

NOW = 1_800_000_000.0
NOW_TEXT = "2027-01-15T08:00:00Z"
STATUS_PATH = "/apis/flowproof.dev/v1alpha1/namespaces/shop/flowexpectations/{}/status"
ZERO = {
    "PASS": 0,
    "REQUIRED_BLOCKED": 0,
    "FORBIDDEN_OPEN": 0,
    "POLICY_MISMATCH": 0,
    "ENFORCEMENT_DRIFT": 0,
    "INCONCLUSIVE": 0,
    "MODEL_INCOMPLETE": 0,
    "PENDING": 0,
    "STALE": 0,
}


async def eventually(condition: Callable[[], object], within: float = 3.0) -> None:
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer(token=TOKEN) as fake:
        fake.create(make_namespace("shop"))
        fake.create(make_pod("web", labels={"app": "web"}, ip="10.244.1.10"))
        fake.create(make_pod("api", labels={"app": "api"}, ip="10.244.1.11"))
        fake.create(make_policy("api-ingress"))  # web -> api 8080 is allowed
        yield fake


@pytest.fixture
def kubeconfig(tmp_path: Path, server: FakeApiServer) -> str:
    return kubeconfig_for(tmp_path / "kubeconfig", server.url)


@dataclass
class Loop:
    collector: Collector
    source: KubernetesSource
    publisher: asyncio.Task[None]
    stop: asyncio.Event


@contextlib.asynccontextmanager
async def publishing(kubeconfig: str, *, interval: float) -> AsyncIterator[Loop]:
    """A collector fed by a source, its status publisher running (debounce 50 ms)."""
    collector = Collector(
        CollectorSettings(token="t", status_interval_seconds=interval), clock=ManualClock(NOW)
    )
    previous: list[Snapshot | None] = [None]
    generation = [0]

    async def on_update(update: InventoryUpdate) -> None:
        generation[0] += 1
        change = diff_snapshots(previous[0], update.snapshot, generation=generation[0], at=NOW)
        previous[0] = update.snapshot
        await collector.on_snapshot(update.snapshot, change)

    stop = asyncio.Event()
    async with KubernetesSource(
        load_kube_config(kubeconfig),
        settings=KubeSourceSettings(backoff_initial_seconds=0.05, backoff_max_seconds=0.2),
        on_update=on_update,
    ) as source:
        runner = asyncio.create_task(source.run())
        publisher = asyncio.create_task(
            status_publisher(collector, source, stop, debounce_seconds=0.05)
        )
        try:
            await asyncio.wait_for(source.wait_synced(), 5)
            yield Loop(collector, source, publisher, stop)
        finally:
            stop.set()
            await asyncio.wait_for(publisher, 5)
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)


def status_of(server: FakeApiServer, name: str) -> dict[str, Any]:
    """The object's status without its conditions (they are tested on their own below)."""
    return {k: v for k, v in full_status_of(server, name).items() if k != "conditions"}


def full_status_of(server: FakeApiServer, name: str) -> dict[str, Any]:
    found = server.get("FlowExpectations", "shop", name)
    assert found is not None
    return dict(found.get("status") or {})


def patches_of(server: FakeApiServer, name: str) -> list[dict[str, Any]]:
    return [body["status"] for _, path, body in server.patches if path == STATUS_PATH.format(name)]


def attempts(server: FakeApiServer, name: str) -> int:
    """PATCH requests for the object's status, answered or refused."""
    path = STATUS_PATH.format(name)
    return sum(1 for r in list(server.requests) if r.method == "PATCH" and r.path == path)


def probe_everything(collector: Collector, outcome: Outcome) -> None:
    """Every due assignment comes back with `outcome`, as an agent would report it."""
    for i, assignment in enumerate(collector.planner.due(NOW + 3600)):
        collector.on_result(
            ProbeResult(
                id=f"r-{assignment.id}-{i}",
                assignment=assignment,
                outcome=outcome,
                latency_seconds=0.001,
                node="node-1",
                started_at=NOW,
            )
        )


# --- through the API ------------------------------------------------------------------------------


async def test_a_rejected_object_gets_a_problem_that_goes_when_it_is_fixed(
    server: FakeApiServer, kubeconfig: str
) -> None:
    broken = make_expectations("shop-flows")
    broken["spec"]["flows"][0]["from"] = {
        "namespace": "shop",
        "namespaceSelector": {"matchLabels": {"team": "shop"}},
    }
    server.create(broken)
    async with publishing(kubeconfig, interval=0.1):
        await eventually(lambda: "problem" in status_of(server, "shop-flows"))
        status = status_of(server, "shop-flows")
        assert "namespaceSelector" in status["problem"]
        assert status["flows"] == 1 and status["failing"] == 0
        assert status["counts"] == ZERO

        server.update(make_expectations("shop-flows"))
        await eventually(lambda: "problem" not in status_of(server, "shop-flows"))
        assert patches_of(server, "shop-flows")[-1]["problem"] is None
        assert status_of(server, "shop-flows")["counts"] == {**ZERO, "PENDING": 1}


async def test_api_errors_never_end_the_publisher(
    server: FakeApiServer, kubeconfig: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="collector.kube")
    server.create(make_expectations("shop-flows"))
    server.fail_next(2, status=500, path_contains="/status")
    async with publishing(kubeconfig, interval=0.05) as loop:
        await eventually(lambda: status_of(server, "shop-flows"))
        assert attempts(server, "shop-flows") == 3, "two refused, the third written"
        server.forbid("/status")
        server.update(make_expectations("shop-flows", flows=[make_flow(port="9090/TCP")]))
        await eventually(lambda: attempts(server, "shop-flows") >= 6)
        assert not loop.publisher.done()
        assert status_of(server, "shop-flows")["observedGeneration"] == 1
    refused = [r.getMessage() for r in caplog.records if "403" in r.getMessage()]
    assert len(refused) == 1, "a persistent refusal is logged once"
    assert "shop/shop-flows" in refused[0]


# --- the status of one object ---------------------------------------------------------------------


def obj(*, flows: int = 2, problem: str | None = None) -> ExpectationsObject:
    return ExpectationsObject(
        namespace="shop",
        name="shop-flows",
        uid="u-1",
        generation=3,
        flows=flows,
        problem=problem,
        status={},
    )


def declared(
    flow: str, status: Status, *, verified: float | None = NOW, pairs: int = 1, reason: str = "r"
) -> DeclaredStatus:
    return DeclaredStatus(
        expectation="shop/shop-flows",
        namespace="shop",
        flow=flow,
        intent=True,
        status=status,
        reason=reason,
        counts={status: pairs} if pairs else {},
        pairs_covered=pairs,
        pairs_total=pairs,
        observed_allowed=0,
        observed_denied=0,
        last_verified_at=verified if pairs else None,
    )


STATUS_CASES = [
    pytest.param(
        obj(),
        [declared("a", "PASS", verified=NOW), declared("b", "PASS", verified=NOW + 60)],
        {"lastVerified": NOW_TEXT, "failing": 0, "counts": {**ZERO, "PASS": 2}, "failures": []},
        id="lastVerified is the oldest last verification among the flows",
    ),
    pytest.param(
        obj(),
        [declared("a", "PASS"), declared("b", "PENDING", verified=None)],
        {"failing": 0, "counts": {**ZERO, "PASS": 1, "PENDING": 1}, "failures": []},
        id="no lastVerified while a flow waits for its first probe",
    ),
    pytest.param(
        obj(),
        [declared("a", "PASS"), declared("b", "PASS", pairs=0)],
        {"lastVerified": NOW_TEXT, "failing": 0, "counts": {**ZERO, "PASS": 2}, "failures": []},
        id="a flow that matches no pod (allowEmpty) does not hold lastVerified back",
    ),
    pytest.param(
        obj(flows=3),
        [
            declared("a", "INCONCLUSIVE", verified=None, reason="no agent on node-1"),
            declared("b", "FORBIDDEN_OPEN", reason="declared deny"),
            declared("c", "STALE"),
        ],
        {
            "failing": 1,
            "counts": {**ZERO, "INCONCLUSIVE": 1, "FORBIDDEN_OPEN": 1, "STALE": 1},
            "failures": [
                {
                    "name": "b",
                    "status": "FORBIDDEN_OPEN",
                    "reason": "declared deny",
                    "lastVerified": NOW_TEXT,
                },
                {"name": "a", "status": "INCONCLUSIVE", "reason": "no agent on node-1"},
            ],
        },
        id="failures are the failing and inconclusive flows, worst first",
    ),
    pytest.param(
        obj(flows=2),
        [],
        {"failing": 0, "counts": {**ZERO, "PENDING": 2}, "failures": []},
        id="flows not planned yet count as PENDING",
    ),
    pytest.param(
        obj(flows=4, problem="api:x: spec.flows[0].from: namespace and namespaceSelector"),
        [declared("a", "PASS")],
        {
            "failing": 0,
            "counts": ZERO,
            "failures": [],
            "problem": "api:x: spec.flows[0].from: namespace and namespaceSelector",
        },
        id="a rejected object has its problem and no verdicts",
    ),
]


@pytest.mark.parametrize(("held", "flows", "expected"), STATUS_CASES)
def test_the_status_of_one_object(
    held: ExpectationsObject, flows: list[DeclaredStatus], expected: dict[str, Any]
) -> None:
    status = expectations_status(held, flows)
    assert status == {"observedGeneration": 3, "flows": held.flows, **expected}


def test_failures_are_capped_and_counts_keep_the_totals() -> None:
    flows = [declared(f"f{i:03}", "REQUIRED_BLOCKED") for i in range(150)]
    flows.append(declared("z-worst", "REQUIRED_BLOCKED"))
    status = expectations_status(obj(flows=151), flows)
    assert len(status["failures"]) == MAX_STATUS_FAILURES
    assert status["failures"][0]["name"] == "f000"
    assert status["counts"]["REQUIRED_BLOCKED"] == status["failing"] == 151


def test_a_long_reason_is_shortened() -> None:
    status = expectations_status(obj(flows=1), [declared("a", "INCONCLUSIVE", reason="x" * 5000)])
    assert len(status["failures"][0]["reason"]) == 1000


def test_the_patch_removes_what_the_status_no_longer_has() -> None:
    patch = status_patch({"flows": 1}, {"flows": 2, "problem": "p", "someoneElse": 1})
    assert patch == {
        "flows": 1,
        "observedGeneration": None,
        "lastVerified": None,
        "failing": None,
        "counts": None,
        "failures": None,
        "problem": None,
        "conditions": None,
        "someoneElse": None,
    }


# --- conditions -------------------------------------------------------------------------------------

CONDITION_CASES = [
    pytest.param(
        [declared("a", "PASS"), declared("b", "PASS")],
        ("True", "AllFlowsPass"),
        ("True", "Decided"),
        id="every flow passes: Verified and Ready",
    ),
    pytest.param(
        [declared("a", "PASS"), declared("b", "REQUIRED_BLOCKED")],
        ("False", "FlowsFailing"),
        ("True", "Decided"),
        id="a failing flow: not Verified, and the verdict is there (Ready)",
    ),
    pytest.param(
        [declared("a", "PASS"), declared("b", "PENDING", verified=None)],
        ("Unknown", "Pending"),
        ("False", "Pending"),
        id="a flow waiting for its first probe: unknown, not Ready",
    ),
    pytest.param(
        [declared("a", "INCONCLUSIVE", reason="no agent")],
        ("Unknown", "Inconclusive"),
        ("True", "Decided"),
        id="an inconclusive flow: unknown",
    ),
    pytest.param(
        [declared("a", "PASS"), declared("b", "STALE")],
        ("Unknown", "Stale"),
        ("False", "Stale"),
        id="a stale verdict is no current verdict",
    ),
]


@pytest.mark.parametrize(("flows", "verified", "ready"), CONDITION_CASES)
def test_the_conditions_of_one_object(
    flows: list[DeclaredStatus], verified: tuple[str, str], ready: tuple[str, str]
) -> None:
    status = with_conditions(expectations_status(obj(), flows), [], now=NOW)
    found = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert found == {"Verified": verified, "Ready": ready}
    for item in status["conditions"]:
        assert item["observedGeneration"] == 3 and item["lastTransitionTime"] == NOW_TEXT


def test_a_rejected_object_is_neither_verified_nor_ready() -> None:
    status = with_conditions(expectations_status(obj(problem="bad selector"), []), [], now=NOW)
    assert {(c["type"], c["status"], c["reason"]) for c in status["conditions"]} == {
        ("Verified", "False", "Invalid"),
        ("Ready", "False", "Invalid"),
    }
    assert "bad selector" in status["conditions"][0]["message"]


def test_the_failing_message_names_the_worst_flows_and_counts_the_rest() -> None:
    flows = [declared(f"f{i}", "FORBIDDEN_OPEN") for i in range(8)]
    [verified, _] = conditions_of(expectations_status(obj(flows=8), flows))
    assert verified["message"] == (
        "8 of 8 flows fail: f0 (FORBIDDEN_OPEN), f1 (FORBIDDEN_OPEN), f2 (FORBIDDEN_OPEN), "
        "f3 (FORBIDDEN_OPEN), f4 (FORBIDDEN_OPEN) and 3 more"
    )


def test_the_transition_time_moves_only_when_the_status_does() -> None:
    passing = with_conditions(expectations_status(obj(), [declared("a", "PASS")]), [], now=NOW)
    later = with_conditions(
        expectations_status(obj(), [declared("a", "PASS"), declared("b", "PASS")]),
        passing["conditions"],
        now=NOW + 600,
    )
    assert [c["lastTransitionTime"] for c in later["conditions"]] == [NOW_TEXT, NOW_TEXT]
    failing = with_conditions(
        expectations_status(obj(), [declared("a", "REQUIRED_BLOCKED")]),
        later["conditions"],
        now=NOW + 600,
    )
    times = {c["type"]: c["lastTransitionTime"] for c in failing["conditions"]}
    assert times == {"Verified": "2027-01-15T08:10:00Z", "Ready": NOW_TEXT}
    [change] = transitions(later["conditions"], failing["conditions"])
    assert (change.type, change.reason) == ("Warning", "FlowsFailing")
    assert change.message.startswith("Verified is False: 1 of 2 flows fail: a (REQUIRED_BLOCKED)")
    assert transitions(failing["conditions"], failing["conditions"]) == []
