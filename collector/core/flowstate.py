"""Flow state: the three truths per flow (intent, model, reality), its status and their history.

Owns reading a probe outcome as a reality verdict, the status of DESIGN.md per flow and per declared
flow, the confirmation of a failing result by one retry, freshness (STALE), and the feedback
latency (`change_to_verdict_seconds`). Pure: no I/O, no grpc/aiohttp/protobuf; time comes from an
injected clock (wall-clock seconds, the clock of the probe results' `started_at`).

Decisions:
- Reality from an outcome: CONNECTED and HTTP_STATUS are allowed (an HTTP code outside
  `expectStatus` is still reachable: allowed, with a `status_mismatch` detail); TIMEOUT and
  UNREACHABLE are denied; REFUSED is denied only when something is known to listen (the
  destination pod declares the port, or the agent confirmed a responder open or the port taken),
  else inconclusive; ERROR (which covers a source pod gone) is inconclusive.
- Status from intent I, model M and reality R: no reality yet -> POLICY_MISMATCH if I != M else
  PENDING; R inconclusive -> INCONCLUSIVE; last result older than `freshness_seconds` -> STALE;
  M == R -> PASS if I == M, else REQUIRED_BLOCKED (I allow) or FORBIDDEN_OPEN (I deny); M != R ->
  ENFORCEMENT_DRIFT if I == M, else POLICY_MISMATCH. Only results of probes started after the
  intent or model last changed count as reality. A flow that cannot be probed (no running source
  pod, destination without IP) is POLICY_MISMATCH if I != M, else INCONCLUSIVE with the reason.
- A result that would move a flow to a failing status is confirmed by one retry: the flow keeps
  its status (`confirming`) and asks for a retry; the next result confirms it when it leads to the
  same status, else the old status stays and a flap is recorded. Both results stay in the record.
- Drift-sample flows take the model as intent, so they are PASS, ENFORCEMENT_DRIFT or INCONCLUSIVE
  once probed (PENDING and STALE before and between).
- A flow whose model is unknown (`Verdict.incomplete`: another plugin's policies, peers or ties
  the model cannot resolve) is MODEL_INCOMPLETE until reality contradicts intent, which is then
  REQUIRED_BLOCKED or FORBIDDEN_OPEN as ever; never POLICY_MISMATCH nor ENFORCEMENT_DRIFT.
- Feedback latency: for every flow a change touches, from the change's `at` to the receipt of the
  first result of a probe started at or after it (the initial snapshot is not a change).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from collector.core.engine import suspects
from collector.core.evidence import EvidencePlan, FlowOutcome, PolicyEvidence, evidence_of
from collector.core.planning import DeclaredFlowPlan, PlannedFlow
from collector.core.scheduling import PlanUpdate
from collector.core.settings import PlannerSettings
from collector.core.statuses import FAILING, STATUS_ORDER, RealityVerdict, Status, flow_status
from flowproof.aio import SYSTEM_CLOCK, Clock
from flowproof.probes import Outcome, ProbeResult, ResponderState

_RANK: dict[Status, int] = {status: rank for rank, status in enumerate(STATUS_ORDER)}

NOTHING_LISTENS = "refused and nothing known to listen: cannot tell reject from refuse"
MAX_PENDING_CHANGES = 16
MAX_LATENCY_SAMPLES = 10_000


@dataclass(frozen=True)
class Reality:
    """What one probe result says about the flow, and why."""

    verdict: RealityVerdict
    reason: str
    status_mismatch: str = ""  # "HTTP 503, expected one of 200": reachable, but not as declared


def reality_of(
    result: ProbeResult, *, listener_declared: bool, expect_status: Sequence[int] = ()
) -> Reality:
    """The reality verdict of a probe result (see the module docstring for the rules)."""
    outcome = result.outcome
    detail = f": {result.detail}" if result.detail else ""
    if outcome is Outcome.CONNECTED:
        return Reality("allow", f"connected in {result.latency_seconds * 1000:.1f} ms")
    if outcome is Outcome.HTTP_STATUS:
        mismatch = ""
        if expect_status and result.http_status not in expect_status:
            wanted = ", ".join(str(code) for code in expect_status)
            mismatch = f"HTTP {result.http_status}, expected {wanted}"
        return Reality("allow", f"HTTP {result.http_status}", mismatch)
    if outcome is Outcome.TIMEOUT:
        # The agent's detail already says "no answer within N s"; say it once.
        return Reality(
            "deny", result.detail or f"no answer within {result.assignment.timeout_seconds:g} s"
        )
    if outcome is Outcome.UNREACHABLE:
        return Reality("deny", f"unreachable{detail}")
    if outcome is Outcome.REFUSED:
        responder = result.responder
        if listener_declared:
            return Reality("deny", "refused although the destination declares the port")
        if responder is not None and responder.state in (
            ResponderState.OPENED,
            ResponderState.LISTENER_PRESENT,
        ):
            return Reality("deny", f"refused although a listener is there ({responder.state})")
        why = NOTHING_LISTENS
        if responder is not None:
            extra = f": {responder.detail}" if responder.detail else ""
            why += f" (responder {responder.state}{extra})"
        return Reality("inconclusive", why)
    return Reality("inconclusive", f"probe error{detail}")


def _word(allowed: bool) -> str:
    return "allow" if allowed else "deny"


@dataclass(frozen=True)
class ResultRecord:
    """One probe result as kept in a flow's record."""

    result_id: str
    assignment_id: str
    attempt: int
    outcome: Outcome
    latency_seconds: float
    started_at: float
    received_at: float
    source_kind: str
    node: str
    reality: Reality
    http_status: int | None = None
    detail: str = ""

    def observed(self) -> str:
        """The outcome as a word: `CONNECTED`, `HTTP_STATUS 503`, `TIMEOUT`."""
        code = f" {self.http_status}" if self.http_status is not None else ""
        return f"{self.outcome}{code}"

    def describe(self) -> str:
        return f"{self.reality.verdict} ({self.observed()})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.result_id,
            "assignment": self.assignment_id,
            "attempt": self.attempt,
            "outcome": str(self.outcome),
            "httpStatus": self.http_status,
            "latencySeconds": self.latency_seconds,
            "startedAt": self.started_at,
            "receivedAt": self.received_at,
            "sourceKind": self.source_kind,
            "node": self.node,
            "reality": self.reality.verdict,
            "reason": self.reality.reason,
            "statusMismatch": self.reality.status_mismatch or None,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class StatusChange:
    """A flow's status moved from `old` to `new` at `at`, for `reason`, on these results."""

    flow_key: str
    at: float
    old: Status
    new: Status
    reason: str
    results: tuple[str, ...] = ()  # result ids that decided it (two when a retry confirmed it)

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "from": self.old,
            "to": self.new,
            "reason": self.reason,
            "results": list(self.results),
        }


@dataclass(frozen=True)
class Flap:
    """A retry that disagreed with the result it was to confirm; the old status was kept."""

    at: float
    kept: Status
    candidate: Status
    first: ResultRecord
    second: ResultRecord

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "kept": self.kept,
            "candidate": self.candidate,
            "first": self.first.to_dict(),
            "second": self.second.to_dict(),
        }


@dataclass(frozen=True)
class LatencySample:
    """Feedback latency of one flow after one change: change -> first fresh verdict."""

    flow_key: str
    generation: int
    seconds: float


@dataclass(frozen=True)
class ResultEffect:
    """What recording a result did: status changes, and the retry to ask the planner for."""

    flow_key: str
    counted: bool  # False when it predates the flow's current model or a newer result
    changes: tuple[StatusChange, ...] = ()
    retry_attempt: int | None = None  # Planner.retry(flow_key, attempt=retry_attempt)


@dataclass
class _Confirming:
    candidate: Status
    reason: str
    first: ResultRecord


@dataclass
class FlowRecord:
    """Everything known about one concrete flow. Owned and mutated by FlowState only."""

    planned: PlannedFlow
    status: Status
    reason: str
    since: float
    basis_since: float  # results of probes started before this do not count (model changed)
    results: deque[ResultRecord]
    history: deque[StatusChange]
    current: ResultRecord | None = None  # the latest counted result: the reality
    confirming: _Confirming | None = None
    flaps: int = 0
    last_flap: Flap | None = None
    pending_changes: list[tuple[int, float]] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.planned.key

    @property
    def intent(self) -> bool:
        return self.planned.intent

    @property
    def model(self) -> bool:
        return self.planned.model

    @property
    def model_known(self) -> bool:
        return self.planned.verdict.known

    @property
    def reality(self) -> Reality | None:
        return self.current.reality if self.current is not None else None

    @property
    def last_verified_at(self) -> float | None:
        return self.current.received_at if self.current is not None else None

    def describe_reality(self) -> str | None:
        return self.current.describe() if self.current is not None else None


@dataclass(frozen=True)
class Coverage:
    """The sweep's reach: truth-table cells probed within `window_seconds` of all `cells`."""

    cells: int
    probed: int
    window_seconds: float

    @property
    def ratio(self) -> float | None:
        return min(self.probed / self.cells, 1.0) if self.cells else None


@dataclass(frozen=True)
class DeclaredStatus:
    """The aggregate of one declared flow: the worst status of its concrete flows."""

    expectation: str
    namespace: str
    flow: str
    intent: bool
    status: Status
    reason: str
    counts: dict[Status, int]
    pairs_covered: int
    pairs_total: int
    observed_allowed: int  # concrete flows whose reality is allow
    observed_denied: int
    last_verified_at: float | None  # the oldest last verification among its flows

    @property
    def id(self) -> str:
        return f"{self.expectation}/{self.flow}"


class FlowState:
    """The live three truths of every planned flow, updated by plans, results and time."""

    def __init__(self, settings: PlannerSettings, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.settings = settings
        self.clock = clock
        self._flows: dict[str, FlowRecord] = {}
        self._declared: tuple[DeclaredFlowPlan, ...] = ()
        self._latency: deque[LatencySample] = deque(maxlen=MAX_LATENCY_SAMPLES)
        self._evidence = EvidencePlan()
        self._sweep_cells = 0
        self._swept: dict[str, float] = {}  # sweep cell -> when a result of it last counted

    # -- inputs ------------------------------------------------------------------------------------

    def sync(self, update: PlanUpdate) -> list[StatusChange]:
        """Take a new plan: drop flows that went, add new ones, re-judge those whose intent or
        model changed, and start the feedback-latency clock on the touched ones."""
        now = self.clock.time()
        change = update.change
        since = change.at if change is not None and not change.initial else -math.inf
        for key in update.removed:
            self._flows.pop(key, None)
        self._declared = update.plan.declared
        self._evidence = update.plan.evidence
        self._sweep_cells = update.plan.sweep.size if update.plan.sweep is not None else 0
        changes: list[StatusChange] = []
        for key, planned in update.plan.flows.items():
            record = self._flows.get(key)
            if record is None:
                record = FlowRecord(
                    planned=planned,
                    status="PENDING",
                    reason="",
                    since=now,
                    basis_since=since,
                    results=deque(maxlen=self.settings.results_kept),
                    history=deque(maxlen=self.settings.history_kept),
                )
                self._flows[key] = record
                status, reason = self._offline(record)
                record.status, record.reason = status, reason
            else:
                old = record.planned
                record.planned = planned
                if (old.intent, old.model, old.verdict.known, old.unprobeable) != (
                    planned.intent,
                    planned.model,
                    planned.verdict.known,
                    planned.unprobeable,
                ):
                    record.basis_since = since if since > -math.inf else now
                    record.current = None
                    record.confirming = None
                    status, reason = self._offline(record)
                    changes += self._set(record, status, reason, now)
            if change is not None and not change.initial and key in update.touched:
                record.pending_changes.append((change.generation, change.at))
                del record.pending_changes[:-MAX_PENDING_CHANGES]
        return changes

    def record_result(self, result: ProbeResult) -> ResultEffect | None:
        """Take a probe result; None when its flow is gone or the result was already counted."""
        record = self._flows.get(result.assignment.flow_key)
        if record is None or any(r.result_id == result.id for r in record.results):
            return None
        now = self.clock.time()
        planned = record.planned
        entry = ResultRecord(
            result_id=result.id,
            assignment_id=result.assignment.id,
            attempt=result.assignment.attempt,
            outcome=result.outcome,
            latency_seconds=result.latency_seconds,
            started_at=result.started_at,
            received_at=now,
            source_kind=str(result.assignment.source_kind),
            node=result.node,
            reality=reality_of(
                result,
                listener_declared=planned.listener_declared,
                expect_status=planned.expect_status,
            ),
            http_status=result.http_status,
            detail=result.detail,
        )
        record.results.append(entry)
        self._measure(record, entry)
        if entry.started_at < record.basis_since or (
            record.current is not None and entry.started_at < record.current.started_at
        ):
            return ResultEffect(record.key, counted=False)
        record.current = entry
        if planned.cell:
            self._swept[planned.cell] = now
        candidate, reason = self._judge(record, entry)
        pending = record.confirming
        if pending is not None:
            record.confirming = None
            if candidate == pending.candidate:
                changes = self._set(
                    record,
                    candidate,
                    f"{reason} (confirmed by a retry)",
                    now,
                    (pending.first.result_id, entry.result_id),
                )
                return ResultEffect(record.key, True, tuple(changes))
            record.flaps += 1
            record.last_flap = Flap(now, record.status, pending.candidate, pending.first, entry)
            return ResultEffect(record.key, counted=True)
        if candidate != record.status and candidate in FAILING:
            record.confirming = _Confirming(candidate, reason, entry)
            return ResultEffect(record.key, True, retry_attempt=entry.attempt + 1)
        changes = self._set(record, candidate, reason, now, (entry.result_id,))
        return ResultEffect(record.key, True, tuple(changes))

    def refresh(self) -> list[StatusChange]:
        """Mark the flows whose last result is older than the freshness bound STALE."""
        now = self.clock.time()
        changes: list[StatusChange] = []
        for record in self._flows.values():
            current = record.current
            if current is None or record.status == "STALE":
                continue
            age = now - current.received_at
            if age <= self.settings.freshness_seconds:
                continue
            status = flow_status(
                record.intent,
                record.model,
                current.reality.verdict,
                stale=True,
                model_known=record.model_known,
            )
            if status == "STALE":
                record.confirming = None
                reason = (
                    f"last result {age:.0f} s old (bound {self.settings.freshness_seconds:g} s): "
                    f"{current.describe()}"
                )
                changes += self._set(record, status, reason, now)
        return changes

    # -- outputs -----------------------------------------------------------------------------------

    def flow(self, key: str) -> FlowRecord | None:
        return self._flows.get(key)

    def flows(self, kind: str | None = None) -> list[FlowRecord]:
        return [r for r in self._flows.values() if kind is None or r.planned.kind == kind]

    def counts(self, kind: str | None = "declared") -> Counter[Status]:
        return Counter(r.status for r in self.flows(kind))

    def declared(self) -> list[DeclaredStatus]:
        """Every declared flow with its aggregate status, in plan order.

        One pass over each declared flow's records: `/metrics` calls this on every scrape.
        """
        flows = self._flows
        out: list[DeclaredStatus] = []
        for plan in self._declared:
            counts: dict[Status, int] = {}
            status: Status | None = None
            best = len(STATUS_ORDER)
            reason = ""
            allowed = denied = 0
            oldest = math.inf
            unverified = False
            seen = 0
            for key in plan.keys:
                record = flows.get(key)
                if record is None:
                    continue
                seen += 1
                current = record.status
                counts[current] = counts.get(current, 0) + 1
                rank = _RANK[current]
                if rank < best:  # the first record of the worst status gives the reason
                    best, status, reason = rank, current, record.reason
                result = record.current
                if result is None:
                    unverified = True
                    continue
                if result.reality.verdict == "allow":
                    allowed += 1
                elif result.reality.verdict == "deny":
                    denied += 1
                oldest = min(oldest, result.received_at)
            if status is None:
                if plan.problems:
                    status, reason = "INCONCLUSIVE", "; ".join(plan.problems)
                else:
                    status, reason = "PASS", "matches no pod (allowEmpty)"
            out.append(
                DeclaredStatus(
                    expectation=plan.expectation,
                    namespace=plan.namespace,
                    flow=plan.flow,
                    intent=plan.intent,
                    status=status,
                    reason=reason,
                    counts=counts,
                    pairs_covered=plan.pairs_covered,
                    pairs_total=plan.pairs_total,
                    observed_allowed=allowed,
                    observed_denied=denied,
                    last_verified_at=None if unverified or not seen else oldest,
                )
            )
        return out

    def awaiting(self, since: float, kinds: Sequence[str] = ("declared",)) -> list[str]:
        """Flows of these kinds that can be probed and have no settled result of a probe started
        at or after `since` (no result yet, an older one, or one waiting for its retry)."""
        return [
            r.key
            for r in self._flows.values()
            if r.planned.kind in kinds
            and r.planned.template is not None
            and (r.current is None or r.current.started_at < since or r.confirming is not None)
        ]

    def take_latency_samples(self) -> list[LatencySample]:
        """The feedback-latency samples measured since the last call (for the metrics)."""
        samples = list(self._latency)
        self._latency.clear()
        return samples

    def evidence(self) -> list[PolicyEvidence]:
        """Every policy's evidence status from its witnesses' flows (collector.core.evidence)."""
        outcomes = {
            key: FlowOutcome(
                record.status,
                record.reason,
                record.reality.verdict if record.reality else None,
                suspects(record.planned.verdict),
            )
            for key, record in self._flows.items()
            if record.planned.kind == "witness"
        }
        return evidence_of(self._evidence, outcomes)

    @property
    def evidence_plan(self) -> EvidencePlan:
        return self._evidence

    def coverage(self, window_seconds: float | None = None) -> Coverage:
        """How much of the model's truth table the sweep probed within the window."""
        window = (
            window_seconds
            if window_seconds is not None
            else (self.settings.coverage_window_seconds)
        )
        since = self.clock.time() - window
        for cell in [c for c, at in self._swept.items() if at < since]:
            del self._swept[cell]
        return Coverage(self._sweep_cells, len(self._swept), window)

    def failing_sweep_keys(self) -> list[str]:
        """Sweep flows that failed or wait for a confirmation: the sweep keeps them until they pass."""
        return [
            key
            for key, record in self._flows.items()
            if record.planned.kind == "sweep"
            and (record.status in FAILING or record.confirming is not None)
        ]

    def declared_plans(self) -> tuple[DeclaredFlowPlan, ...]:
        """The declared flows of the current plan, in plan order."""
        return self._declared

    # -- internals ---------------------------------------------------------------------------------

    def _offline(self, record: FlowRecord) -> tuple[Status, str]:
        """Status before any counted result: intent against model, or why it cannot be probed."""
        planned = record.planned
        summary = planned.verdict.summary()
        if not planned.verdict.known:
            reason = f"the model is {summary}"
            if planned.unprobeable:
                reason += f"; not probed: {planned.unprobeable}"
            return "MODEL_INCOMPLETE", reason
        if planned.intent != planned.model:
            reason = f"intent {_word(planned.intent)} but the policies {summary}"
            if planned.unprobeable:
                reason += f"; not probed: {planned.unprobeable}"
            return "POLICY_MISMATCH", reason
        if planned.unprobeable:
            return "INCONCLUSIVE", planned.unprobeable
        return "PENDING", "not probed yet"

    def _judge(self, record: FlowRecord, entry: ResultRecord) -> tuple[Status, str]:
        """The status and reason this result alone leads to."""
        intent, model, reality = record.intent, record.model, entry.reality
        status = flow_status(intent, model, reality.verdict, model_known=record.model_known)
        summary = record.planned.verdict.summary()
        seen = f"{entry.describe()}, {reality.reason}"
        if reality.status_mismatch:
            seen += f"; {reality.status_mismatch}"
        if not record.model_known:
            unknown: dict[Status, str] = {
                "INCONCLUSIVE": reality.reason,
                "MODEL_INCOMPLETE": f"{_word(intent)} as declared ({seen}), but the model is "
                f"{summary}",
                "REQUIRED_BLOCKED": f"declared allow, the network denies it ({seen}); the model "
                f"is {summary}",
                "FORBIDDEN_OPEN": f"declared deny, the network allows it ({seen}); the model is "
                f"{summary}",
            }
            return status, unknown.get(status, seen)
        reasons: dict[Status, str] = {
            "INCONCLUSIVE": reality.reason,
            "PASS": f"{_word(intent)} as declared: {seen}",
            "REQUIRED_BLOCKED": f"declared allow, the policies deny it ({summary}); {seen}",
            "FORBIDDEN_OPEN": f"declared deny, the policies allow it ({summary}); {seen}",
            "ENFORCEMENT_DRIFT": (
                f"the policies say {_word(model)} ({summary}) but the network does not: {seen}"
            ),
            "POLICY_MISMATCH": (
                f"intent {_word(intent)} but the policies {summary}; the network does "
                f"{reality.verdict}: {seen}"
            ),
        }
        return status, reasons.get(status, seen)

    def _set(
        self,
        record: FlowRecord,
        status: Status,
        reason: str,
        now: float,
        results: tuple[str, ...] = (),
    ) -> list[StatusChange]:
        record.reason = reason
        if status == record.status:
            return []
        change = StatusChange(record.key, now, record.status, status, reason, results)
        record.status = status
        record.since = now
        record.history.append(change)
        return [change]

    def _measure(self, record: FlowRecord, entry: ResultRecord) -> None:
        if not record.pending_changes:
            return
        left: list[tuple[int, float]] = []
        for generation, at in record.pending_changes:
            if entry.started_at >= at:
                sample = LatencySample(record.key, generation, max(entry.received_at - at, 0.0))
                self._latency.append(sample)
            else:
                left.append((generation, at))
        record.pending_changes = left


__all__ = [
    "STATUS_ORDER",
    "DeclaredStatus",
    "Flap",
    "FlowRecord",
    "FlowState",
    "LatencySample",
    "Reality",
    "ResultEffect",
    "ResultRecord",
    "StatusChange",
    "reality_of",
]
