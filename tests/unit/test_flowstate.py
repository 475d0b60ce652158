"""Flow state: reality from outcomes, the status of every combination of the three truths, retry
confirmation, staleness, feedback latency, declared aggregates and report rows."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
from make import make_policy, sel
from test_planning import cluster, flow, running

from collector.core.changes import diff_snapshots
from collector.core.flowstate import NOTHING_LISTENS, FlowState, reality_of
from collector.core.model import Snapshot, UnmodelledPolicy
from collector.core.planning import sweep_flow
from collector.core.reporting import render_json, render_table, sort_rows
from collector.core.scheduling import Planner
from collector.core.settings import PlannerSettings
from collector.core.statuses import STATUS_ORDER, RealityVerdict, Status, flow_status, worst
from collector.core.views import FlowView, report_flows
from flowproof.probes import (
    Assignment,
    Outcome,
    PodRef,
    ProbeKind,
    ProbeResult,
    ResponderReport,
    ResponderState,
)
from tests.support.clock import ManualClock

# --- the status function -----------------------------------------------------------------------


def expected_status(
    intent: bool, model: bool, reality: RealityVerdict | None, stale: bool
) -> Status:
    """The decision table, written out independently of `flow_status`."""
    table: dict[tuple[bool, bool, str | None], Status] = {
        # no reality yet: intent against model only
        (True, True, None): "PENDING",
        (False, False, None): "PENDING",
        (True, False, None): "POLICY_MISMATCH",
        (False, True, None): "POLICY_MISMATCH",
        # model and reality agree
        (True, True, "allow"): "PASS",
        (False, False, "deny"): "PASS",
        (True, False, "deny"): "REQUIRED_BLOCKED",
        (False, True, "allow"): "FORBIDDEN_OPEN",
        # model and reality disagree
        (True, True, "deny"): "ENFORCEMENT_DRIFT",
        (False, False, "allow"): "ENFORCEMENT_DRIFT",
        (True, False, "allow"): "POLICY_MISMATCH",
        (False, True, "deny"): "POLICY_MISMATCH",
    }
    # Intent against the model needs no packet: without a usable result a disagreement is certain.
    usable = reality in ("allow", "deny") and not stale
    if not usable and intent != model:
        return "POLICY_MISMATCH"
    if reality is not None and stale:
        return "STALE"
    if reality == "inconclusive":
        return "INCONCLUSIVE"
    return table[(intent, model, reality)]


COMBINATIONS = [
    pytest.param(
        i,
        m,
        r,
        s,
        id=f"intent {'allow' if i else 'deny'}, model {'allow' if m else 'deny'}, reality {r or 'none'}{', stale' if s else ''}",
    )
    for i, m, r, s in itertools.product(
        (True, False), (True, False), (None, "allow", "deny", "inconclusive"), (False, True)
    )
]


@pytest.mark.parametrize(("intent", "model", "reality", "stale"), COMBINATIONS)
def test_flow_status(
    intent: bool, model: bool, reality: RealityVerdict | None, stale: bool
) -> None:
    assert flow_status(intent, model, reality, stale=stale) == expected_status(
        intent, model, reality, stale
    )


UNKNOWN_MODEL = [
    # (intent, reality, stale) -> status, with the model unknown: only intent and reality compare.
    pytest.param(True, None, False, "MODEL_INCOMPLETE", id="no result yet: the model is unknown"),
    pytest.param(True, "allow", False, "MODEL_INCOMPLETE", id="reality as declared: not a PASS"),
    pytest.param(False, "deny", False, "MODEL_INCOMPLETE", id="a deny as declared: not a PASS"),
    pytest.param(
        True, "deny", False, "REQUIRED_BLOCKED", id="declared allow, denied: blocked, not drift"
    ),
    pytest.param(False, "allow", False, "FORBIDDEN_OPEN", id="declared deny, allowed: open"),
    pytest.param(True, "inconclusive", False, "INCONCLUSIVE", id="the probe could not decide"),
    pytest.param(True, "deny", True, "STALE", id="an old result says nothing about now"),
]


@pytest.mark.parametrize(("intent", "reality", "stale", "status"), UNKNOWN_MODEL)
@pytest.mark.parametrize("modelled", [True, False], ids=["modelled allow", "modelled deny"])
def test_flow_status_with_the_model_unknown(
    intent: bool, reality: RealityVerdict | None, stale: bool, status: Status, modelled: bool
) -> None:
    # What the modelled policies say does not matter: never POLICY_MISMATCH, never drift.
    assert flow_status(intent, modelled, reality, stale=stale, model_known=False) == status


def test_every_status_is_reachable_from_the_table_and_worst_follows_the_order() -> None:
    realities: tuple[RealityVerdict | None, ...] = (None, "allow", "deny", "inconclusive")
    reached = {
        flow_status(i, m, r, stale=s, model_known=k)
        for i, m, r, s, k in itertools.product(
            (True, False), (True, False), realities, (False, True), (True, False)
        )
    }
    assert reached == set(STATUS_ORDER)
    assert worst(["PASS", "STALE", "FORBIDDEN_OPEN", "PENDING"]) == "FORBIDDEN_OPEN"
    assert worst([]) is None


# --- reality from outcomes ---------------------------------------------------------------------

ASSIGNMENT = Assignment(
    id="a-1",
    source=PodRef("uid-src", "shop", "src"),
    source_node="node-1",
    destination_ip="10.244.1.2",
    port=8080,
    protocol="TCP",
    kind=ProbeKind.TCP,
    timeout_seconds=2.0,
)


def result(
    outcome: Outcome,
    *,
    http_status: int | None = None,
    responder: ResponderState | None = None,
    detail: str = "",
) -> ProbeResult:
    return ProbeResult(
        id="r-1",
        assignment=ASSIGNMENT,
        outcome=outcome,
        latency_seconds=0.001,
        node="node-1",
        started_at=0.0,
        detail=detail,
        http_status=http_status,
        responder=ResponderReport("a-1", responder) if responder is not None else None,
    )


@pytest.mark.parametrize(
    ("probe", "listener", "expect", "verdict", "mismatch"),
    [
        pytest.param(result(Outcome.CONNECTED), False, (), "allow", "", id="connected is allowed"),
        pytest.param(
            result(Outcome.HTTP_STATUS, http_status=503),
            False,
            (),
            "allow",
            "",
            id="any HTTP status is reachable",
        ),
        pytest.param(
            result(Outcome.HTTP_STATUS, http_status=503),
            False,
            (200,),
            "allow",
            "HTTP 503, expected 200",
            id="an HTTP status outside expectStatus is allowed with a mismatch noted",
        ),
        pytest.param(
            result(Outcome.HTTP_STATUS, http_status=200),
            False,
            (200,),
            "allow",
            "",
            id="an expected HTTP status has no mismatch",
        ),
        pytest.param(
            result(Outcome.TIMEOUT), False, (), "deny", "", id="a timeout is a drop: denied"
        ),
        pytest.param(
            result(Outcome.UNREACHABLE),
            False,
            (),
            "deny",
            "",
            id="admin-prohibited or EPERM: denied",
        ),
        pytest.param(
            result(Outcome.REFUSED),
            True,
            (),
            "deny",
            "",
            id="refused where the pod declares the port: a reject, denied",
        ),
        pytest.param(
            result(Outcome.REFUSED, responder=ResponderState.OPENED),
            False,
            (),
            "deny",
            "",
            id="refused where the agent opened a responder: denied",
        ),
        pytest.param(
            result(Outcome.REFUSED, responder=ResponderState.LISTENER_PRESENT),
            False,
            (),
            "deny",
            "",
            id="refused where something already listened: denied",
        ),
        pytest.param(
            result(Outcome.REFUSED),
            False,
            (),
            "inconclusive",
            "",
            id="refused and nothing known to listen: inconclusive",
        ),
        pytest.param(
            result(Outcome.REFUSED, responder=ResponderState.FAILED),
            False,
            (),
            "inconclusive",
            "",
            id="refused after the responder failed: inconclusive",
        ),
        pytest.param(
            result(Outcome.ERROR, detail="source pod gone"),
            False,
            (),
            "inconclusive",
            "",
            id="an error (source pod gone) is inconclusive",
        ),
    ],
)
def test_reality_of(
    probe: ProbeResult, listener: bool, expect: tuple[int, ...], verdict: str, mismatch: str
) -> None:
    reality = reality_of(probe, listener_declared=listener, expect_status=expect)
    assert (reality.verdict, reality.status_mismatch) == (verdict, mismatch)
    if verdict == "inconclusive" and probe.outcome is Outcome.REFUSED:
        assert reality.reason.startswith(NOTHING_LISTENS)


# --- the live state ----------------------------------------------------------------------------

SETTINGS = PlannerSettings(
    witnesses=False, sweep_probes_per_second=0, interval_seconds=10.0, freshness_seconds=30.0
)
FE = running("shop/fe", {"app": "frontend"}, ports=())
API = running("shop/api", {"app": "api"})
DB = running("shop/db", {"app": "db"}, ports=((5432, "TCP"),))
FLOWS = [
    flow("fe-api", {"app": "frontend"}, {"app": "api"}),
    flow("fe-db", {"app": "frontend"}, {"app": "db"}, "5432/TCP", expect="deny"),
]
BASE = cluster([FE, API, DB], FLOWS)
DENY_API = make_policy("deny-api", "shop", selector=sel({"app": "api"}), types=["ingress"])
DENY_DB = make_policy("deny-db", "shop", selector=sel({"app": "db"}), types=["ingress"])


class Loop:
    """Planner and flow state wired as the runtime wires them, on one fake clock."""

    def __init__(self, snapshot: Snapshot = BASE, settings: PlannerSettings = SETTINGS) -> None:
        self.clock = ManualClock()
        self.planner = Planner(settings, seed=1, id_prefix="t")
        self.state = FlowState(settings, clock=self.clock)
        self.snapshot = snapshot
        self.generation = 1
        change = diff_snapshots(None, snapshot, generation=1, at=self.clock.now)
        self.state.sync(self.planner.update(snapshot, change, self.clock.now))
        self.results = 0
        self.sent: dict[str, list[Assignment]] = {}

    def change(self, snapshot: Snapshot) -> frozenset[str]:
        self.generation += 1
        change = diff_snapshots(
            self.snapshot, snapshot, generation=self.generation, at=self.clock.now
        )
        update = self.planner.update(snapshot, change, self.clock.now)
        self.state.sync(update)
        self.snapshot = snapshot
        return update.touched

    def key(self, name: str) -> str:
        return next(k for k, f in self.planner.plan.flows.items() if f.flow == name)

    def status(self, name: str) -> Status:
        record = self.state.flow(self.key(name))
        assert record is not None
        return record.status

    def probe(self, name: str, outcome: Outcome, *, latency: float = 0.01) -> Assignment:
        """Send what is due for `name`, answer it with `outcome` after `latency`."""
        key = self.key(name)
        for sent in self.planner.due(self.clock.now):
            self.sent.setdefault(sent.flow_key, []).append(sent)
        queue = self.sent.get(key)
        assert queue, f"nothing due for {name}"
        assignment = queue.pop()  # the newest; older ones stay unanswered
        started = self.clock.now
        self.clock.now += latency
        self.answer(assignment, outcome, started_at=started)
        return assignment

    def answer(self, assignment: Assignment, outcome: Outcome, *, started_at: float) -> None:
        self.results += 1
        got = ProbeResult(
            id=f"r-{self.results}",
            assignment=assignment,
            outcome=outcome,
            latency_seconds=self.clock.now - started_at,
            node=assignment.source_node,
            started_at=started_at,
        )
        self.planner.completed(assignment.id)
        effect = self.state.record_result(got)
        if effect is not None and effect.retry_attempt is not None:
            self.planner.retry(effect.flow_key, attempt=effect.retry_attempt)


def test_before_any_probe_flows_are_pending_or_a_policy_mismatch() -> None:
    loop = Loop(replace(BASE, policies=(DENY_API,)))
    assert loop.status("fe-api") == "POLICY_MISMATCH", "caught offline, before any packet"
    assert loop.status("fe-db") == "POLICY_MISMATCH", "declared deny, nothing denies it"
    assert Loop().status("fe-api") == "PENDING"


def test_an_agreeing_result_passes_at_once() -> None:
    loop = Loop(replace(BASE, policies=(DENY_DB,)))
    loop.probe("fe-api", Outcome.CONNECTED)
    loop.probe("fe-db", Outcome.TIMEOUT)
    assert (loop.status("fe-api"), loop.status("fe-db")) == ("PASS", "PASS")
    record = loop.state.flow(loop.key("fe-api"))
    assert record is not None and record.describe_reality() == "allow (CONNECTED)"
    assert [(c.old, c.new) for c in record.history] == [("PENDING", "PASS")]


def test_a_failing_result_is_confirmed_by_a_retry_before_it_is_reported() -> None:
    loop = Loop()
    loop.probe("fe-api", Outcome.CONNECTED)
    loop.clock.now += 12.1
    loop.probe("fe-api", Outcome.TIMEOUT)
    record = loop.state.flow(loop.key("fe-api"))
    assert record is not None
    assert loop.status("fe-api") == "PASS" and record.confirming is not None
    assert record.confirming.candidate == "ENFORCEMENT_DRIFT"
    retry = loop.probe("fe-api", Outcome.TIMEOUT)
    assert retry.attempt == 2, "the retry went out at once, as attempt 2"
    assert loop.status("fe-api") == "ENFORCEMENT_DRIFT" and record.confirming is None
    last = record.history[-1]
    assert (last.old, last.new, len(last.results)) == ("PASS", "ENFORCEMENT_DRIFT", 2)
    assert "confirmed by a retry" in last.reason
    assert [r.attempt for r in record.results] == [1, 1, 2], "both outcomes stay visible"


def test_a_retry_that_disagrees_keeps_the_old_status_and_records_a_flap() -> None:
    loop = Loop()
    loop.probe("fe-api", Outcome.CONNECTED)
    loop.clock.now += 12.1
    loop.probe("fe-api", Outcome.TIMEOUT)
    loop.probe("fe-api", Outcome.CONNECTED)
    record = loop.state.flow(loop.key("fe-api"))
    assert record is not None
    assert (record.status, record.flaps, record.confirming) == ("PASS", 1, None)
    assert record.last_flap is not None
    assert (record.last_flap.first.outcome, record.last_flap.second.outcome) == (
        Outcome.TIMEOUT,
        Outcome.CONNECTED,
    )
    assert [(c.old, c.new) for c in record.history] == [("PENDING", "PASS")]


def test_non_failing_results_need_no_retry() -> None:
    loop = Loop()
    loop.probe("fe-api", Outcome.ERROR)
    assert loop.status("fe-api") == "INCONCLUSIVE"
    assert loop.planner.due(loop.clock.now) == [], "no retry asked"


def test_a_required_path_blocked_by_a_policy_is_reported_after_confirmation() -> None:
    loop = Loop()
    loop.probe("fe-api", Outcome.CONNECTED)
    loop.clock.now += 1.0
    loop.change(replace(BASE, policies=(DENY_API,)))
    assert loop.status("fe-api") == "POLICY_MISMATCH", "the model changed: known before a packet"
    loop.probe("fe-api", Outcome.TIMEOUT)
    assert loop.status("fe-api") == "POLICY_MISMATCH", "confirming"
    loop.probe("fe-api", Outcome.TIMEOUT)
    assert loop.status("fe-api") == "REQUIRED_BLOCKED"


def test_a_hole_left_open_is_forbidden_open() -> None:
    loop = Loop(replace(BASE, policies=(DENY_DB,)))
    loop.probe("fe-db", Outcome.TIMEOUT)
    loop.change(BASE)
    loop.probe("fe-db", Outcome.CONNECTED)
    loop.probe("fe-db", Outcome.CONNECTED)
    assert loop.status("fe-db") == "FORBIDDEN_OPEN"


def test_a_result_from_a_probe_started_before_the_model_changed_does_not_count() -> None:
    loop = Loop()
    key = loop.key("fe-api")
    (early,) = [a for a in loop.planner.due(loop.clock.now) if a.flow_key == key]
    started = loop.clock.now
    loop.clock.now += 0.5
    loop.change(replace(BASE, policies=(DENY_API,)))
    loop.clock.now += 0.5
    loop.answer(early, Outcome.CONNECTED, started_at=started)
    record = loop.state.flow(key)
    assert record is not None and record.current is None
    assert record.status == "POLICY_MISMATCH" and len(record.results) == 1


def test_staleness_with_an_injected_clock() -> None:
    loop = Loop()
    loop.probe("fe-api", Outcome.CONNECTED)
    loop.clock.now += 30.0
    assert loop.state.refresh() == []
    assert loop.status("fe-api") == "PASS"
    loop.clock.now += 0.1
    (change,) = loop.state.refresh()
    assert (change.old, change.new) == ("PASS", "STALE")
    assert "last result 30 s old" in change.reason
    loop.probe("fe-api", Outcome.CONNECTED)
    assert loop.status("fe-api") == "PASS"


def test_feedback_latency_runs_from_the_change_to_the_first_fresh_verdict() -> None:
    loop = Loop()
    loop.probe("fe-api", Outcome.CONNECTED)
    assert loop.state.take_latency_samples() == [], "the initial snapshot is not a change"
    key = loop.key("fe-api")
    loop.clock.now = 1999.5
    loop.planner.expedite([key])
    (stale_probe,) = [a for a in loop.planner.due(loop.clock.now) if a.flow_key == key]
    loop.clock.now = 2000.0
    touched = loop.change(replace(BASE, policies=(DENY_API,)))
    assert touched == {key}
    loop.clock.now = 2000.4
    loop.answer(stale_probe, Outcome.CONNECTED, started_at=1999.5)
    assert loop.state.take_latency_samples() == [], "that probe started before the change"
    loop.clock.now = 2000.5
    loop.probe("fe-api", Outcome.TIMEOUT, latency=2.0)
    (sample,) = loop.state.take_latency_samples()
    assert (sample.flow_key, sample.generation) == (key, 2)
    assert sample.seconds == pytest.approx(2.5)
    loop.probe("fe-api", Outcome.TIMEOUT, latency=2.0)
    assert loop.state.take_latency_samples() == [], "only the first fresh verdict counts"


CILIUM = UnmodelledPolicy("cilium.io", "v2", "CiliumNetworkPolicy", "shop", "l7", "c.yaml:1")


def test_a_flow_whose_model_is_unknown_is_never_a_mismatch_nor_drift() -> None:
    # DENY_API makes the modelled verdict of fe-api deny against an intent of allow: without the
    # Cilium object that would be POLICY_MISMATCH, and a CONNECTED result would not change that.
    loop = Loop(replace(BASE, policies=(DENY_API,), unmodelled=(CILIUM,)))
    assert loop.status("fe-api") == "MODEL_INCOMPLETE"
    record = loop.state.flow(loop.key("fe-api"))
    assert record is not None and "CiliumNetworkPolicy shop/l7" in record.reason
    loop.probe("fe-api", Outcome.CONNECTED)
    assert loop.status("fe-api") == "MODEL_INCOMPLETE", "reality as declared, the model unknown"
    assert "allow as declared" in loop.state.flow(loop.key("fe-api")).reason  # type: ignore[union-attr]
    loop.clock.now += 12.1
    loop.probe("fe-api", Outcome.TIMEOUT)
    assert loop.status("fe-api") == "MODEL_INCOMPLETE", "a failing result is confirmed first"
    loop.probe("fe-api", Outcome.TIMEOUT)
    assert loop.status("fe-api") == "REQUIRED_BLOCKED", "reality against intent still fails"
    assert [r.status for r in loop.state.declared()] == ["REQUIRED_BLOCKED", "MODEL_INCOMPLETE"]


def test_no_witness_and_no_probed_sweep_cell_where_the_model_is_unknown() -> None:
    settings = replace(SETTINGS, witnesses=True, sweep_probes_per_second=1.0)
    known = Loop(replace(BASE, policies=(DENY_DB,)), settings)
    assert any(f.kind == "witness" for f in known.planner.plan.flows.values())
    loop = Loop(replace(BASE, policies=(DENY_DB,), unmodelled=(CILIUM,)), settings)
    assert not any(f.kind == "witness" for f in loop.planner.plan.flows.values())
    table = loop.planner.plan.sweep
    engine = loop.planner.plan.engine
    assert table is not None and engine is not None and table.size
    for index in range(table.size):
        cell = table.cell(index)
        if cell is None:
            continue
        flow = sweep_flow(cell, engine, SETTINGS)
        assert flow.template is None and flow.unprobeable.startswith("the model is unknown")


def test_flows_that_cannot_be_probed_are_inconclusive_with_the_reason() -> None:
    batch = flow("batch-api", {"app": "batch"}, {"app": "api"})
    loop = Loop(cluster([API], [batch]))
    record = loop.state.flow(loop.key("batch-api"))
    assert record is not None and record.status == "INCONCLUSIVE"
    assert record.reason.startswith("no running source pod: probe pod shop/flowproof-probe-")
    (declared,) = loop.state.declared()
    assert declared.status == "INCONCLUSIVE"
    assert loop.state.awaiting(0.0) == []


def test_declared_flows_take_the_worst_status_of_their_concrete_flows() -> None:
    apis = [running(f"shop/api-{i}", {"app": "api"}) for i in range(2)]
    loop = Loop(cluster([FE, *apis], FLOWS[:1]))
    keys = sorted(k for k in loop.planner.plan.flows)
    by_key = {a.flow_key: a for a in loop.planner.due(loop.clock.now)}
    loop.answer(by_key[keys[0]], Outcome.CONNECTED, started_at=loop.clock.now)
    (declared,) = loop.state.declared()
    assert (declared.status, declared.counts) == ("PENDING", {"PASS": 1, "PENDING": 1})
    assert declared.last_verified_at is None
    loop.answer(by_key[keys[1]], Outcome.REFUSED, started_at=loop.clock.now)
    (declared,) = loop.state.declared()
    assert declared.status == "PENDING", "a refusal on a declared port waits for its retry"
    assert (declared.observed_allowed, declared.observed_denied) == (1, 1)
    assert (declared.pairs_covered, declared.pairs_total) == (2, 2)


def test_report_rows_carry_the_three_truths() -> None:
    loop = Loop(replace(BASE, policies=(DENY_DB,)))
    loop.probe("fe-api", Outcome.CONNECTED)
    unresolved = flow("ghost", {"app": "frontend"}, {"app": "ghost"})
    loop.change(
        replace(
            loop.snapshot,
            expectations=(replace(loop.snapshot.expectations[0], flows=(*FLOWS, unresolved)),),
        )
    )
    details = {d["flow"]: d for d in report_flows(loop.state)}
    rows = {flow: FlowView.from_json(d) for flow, d in details.items()}
    assert set(rows) == {"fe-api", "fe-db", "ghost"}
    api = rows["fe-api"]
    assert (api.intent, api.model, api.reality_text(), api.status) == (
        True,
        True,
        "allow (CONNECTED)",
        "PASS",
    )
    assert details["fe-api"]["results"][0]["outcome"] == "CONNECTED"
    assert (rows["fe-db"].reality, rows["fe-db"].status) == (None, "PENDING")
    assert rows["ghost"].status == "INCONCLUSIVE" and "matches no pod" in rows["ghost"].reason
    document = json.loads(render_json(sort_rows(rows.values())))
    assert [f["status"] for f in document["flows"]] == ["INCONCLUSIVE", "PENDING", "PASS"]
    assert "REALITY" in render_table(list(rows.values()), with_reality=True)


def test_a_flow_waiting_for_its_retry_says_so_in_its_report_row() -> None:
    loop = Loop()
    loop.probe("fe-api", Outcome.TIMEOUT)
    (row,) = [r for r in report_flows(loop.state) if r["flow"] == "fe-api"]
    assert row["status"] == "PENDING"
    assert "(confirming ENFORCEMENT_DRIFT:" in row["reason"]
    assert row["confirming"] == "ENFORCEMENT_DRIFT"


def test_witness_flows_pass_or_drift_and_are_reported_apart() -> None:
    pods = [running(f"shop/web-{i}", {"app": "web"}, ports=((80, "TCP"),)) for i in range(3)]
    isolate = make_policy("deny", "shop", selector=sel({"app": "web"}))
    loop = Loop(replace(cluster(pods), policies=(isolate,)), replace(SETTINGS, witnesses=True))
    drift = loop.state.flows("witness")
    assert len(drift) == 1 and report_flows(loop.state) == []
    assert drift[0].planned.subject == "shop/deny"
    now = loop.clock.now + 10 * 1.2
    sent = loop.planner.due(now)
    loop.clock.now = now
    for a in sent:  # the policy isolates the pods, yet the network lets the witness through
        loop.answer(a, Outcome.CONNECTED, started_at=now)
    for a in loop.planner.due(now):
        assert a.attempt == 2
        loop.answer(a, Outcome.CONNECTED, started_at=now)
    assert {r.status for r in drift} == {"ENFORCEMENT_DRIFT"}
    assert len(report_flows(loop.state, include_undeclared=True)) == 1
    (evidence,) = loop.state.evidence()
    assert evidence.status == "NOT_ENFORCED" and evidence.policy == "shop/deny"


def test_duplicate_and_unknown_results_are_ignored() -> None:
    loop = Loop()
    assignment = loop.probe("fe-api", Outcome.CONNECTED)
    repeat = ProbeResult(
        id="r-1",
        assignment=assignment,
        outcome=Outcome.TIMEOUT,
        latency_seconds=2.0,
        node="node-1",
        started_at=loop.clock.now,
    )
    assert loop.state.record_result(repeat) is None
    gone = replace(repeat, id="r-x", assignment=replace(assignment, flow_key="no/such"))
    assert loop.state.record_result(gone) is None
    assert loop.status("fe-api") == "PASS"


def test_awaiting_lists_declared_flows_without_a_settled_fresh_result() -> None:
    loop = Loop()
    since = loop.clock.now
    assert sorted(loop.state.awaiting(since)) == sorted([loop.key("fe-api"), loop.key("fe-db")])
    loop.probe("fe-api", Outcome.CONNECTED)
    assert loop.state.awaiting(since) == [loop.key("fe-db")]
    loop.probe("fe-db", Outcome.CONNECTED)  # would be FORBIDDEN_OPEN: waits for its retry
    assert loop.state.awaiting(since) == [loop.key("fe-db")]
