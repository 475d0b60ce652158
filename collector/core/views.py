"""Views: the one JSON shape of each concept, for the web view, the API, reports and verify alike.

Owns `FlowView` (one concrete flow with its three truths and status: what lists, the matrix, live
events, `check` and `verify` reports carry, offline or live), `flow_detail` (the same with the
explanation, results and history), the declared-flow summary, the matrix of workloads, and the
loop numbers (`LoopStatus`) with the views derived from them. Pure: reads the flow state, decides
nothing, no I/O.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from collector.core.checking import FlowCheck
from collector.core.engine import Endpoint, endpoint_name
from collector.core.evidence import (
    EVIDENCE_STATUSES,
    EvidencePlan,
    PolicyEvidence,
    Witness,
    WitnessResult,
)
from collector.core.flowstate import Coverage, DeclaredStatus, FlowRecord, FlowState
from collector.core.model import Pod
from collector.core.probepods import is_probe_pod
from collector.core.statuses import STATUS_ORDER, Status, worst

WORKLOAD_LABELS = ("app.kubernetes.io/name", "app", "k8s-app", "name")
_POD_SUFFIXES = (
    re.compile(r"-[0-9a-f]{6,10}-[0-9a-z]{5}$"),  # Deployment: <rs hash>-<pod hash>
    re.compile(r"-[0-9a-z]{5}$"),  # DaemonSet, Job, bare ReplicaSet
    re.compile(r"-\d+$"),  # StatefulSet, and the lab's <workload>-<i>
)


def _word(allowed: bool | None) -> str | None:
    return None if allowed is None else ("allow" if allowed else "deny")


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


def _group(endpoint: Endpoint) -> tuple[str, str]:
    """(group id, namespace) of one side of a flow: its workload, or `outside/<address>`."""
    if isinstance(endpoint, Pod):
        name = workload_of(endpoint)
        if is_probe_pod(endpoint):
            name += " (probe pod)"
        return f"{endpoint.namespace}/{name}", endpoint.namespace
    return f"outside/{endpoint}", ""


# --- one concrete flow ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowView:
    """One concrete flow as every reader sees it. `model` is None when no verdict could be had
    (a host resolved only when probed); `model_known` False when the verdict is incomplete (the
    model is UNKNOWN: `model` then holds what the modelled policies say); `reality` is the reality
    verdict and `observed` the outcome that gave it (None before any result, and always offline)."""

    key: str
    kind: str  # "declared", "witness" or "sweep"
    expectation: str
    flow: str
    source: str
    source_namespace: str
    source_group: str
    destination: str
    destination_namespace: str
    destination_group: str
    port: int
    protocol: str
    intent: bool
    model: bool | None
    reality: str | None
    observed: str | None
    status: Status
    reason: str
    since: float | None = None
    last_verified_at: float | None = None
    latency_seconds: float | None = None
    confirming: Status | None = None
    model_known: bool = True

    @property
    def model_word(self) -> str | None:
        """`allow`, `deny`, `unknown`, or None when there is no verdict."""
        if not self.model_known:
            return "unknown"
        return _word(self.model)

    @property
    def declared(self) -> str | None:
        """The declared flow it stands for (`expectation/flow`), None for a witness or sweep flow."""
        return f"{self.expectation}/{self.flow}" if self.kind == "declared" else None

    def reality_text(self) -> str | None:
        """`allow (CONNECTED)`: the reality with the outcome that gave it."""
        if self.reality is None:
            return None
        return f"{self.reality} ({self.observed})" if self.observed else self.reality

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "kind": self.kind,
            "declared": self.declared,
            "expectation": self.expectation,
            "flow": self.flow,
            "source": self.source,
            "sourceNamespace": self.source_namespace,
            "sourceGroup": self.source_group,
            "destination": self.destination,
            "destinationNamespace": self.destination_namespace,
            "destinationGroup": self.destination_group,
            "port": self.port,
            "protocol": self.protocol,
            "intent": _word(self.intent),
            "model": self.model_word,
            "reality": self.reality,
            "observed": self.observed,
            "status": self.status,
            "reason": self.reason,
            "since": self.since,
            "lastVerifiedAt": self.last_verified_at,
            "latencySeconds": self.latency_seconds,
            "confirming": self.confirming,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FlowView:
        """The view back from `to_json` (or a detail, whose extra keys are ignored)."""
        model = data.get("model")
        known = model != "unknown"
        return cls(
            key=str(data["key"]),
            kind=str(data["kind"]),
            expectation=str(data["expectation"]),
            flow=str(data["flow"]),
            source=str(data["source"]),
            source_namespace=str(data.get("sourceNamespace", "")),
            source_group=str(data.get("sourceGroup", "")),
            destination=str(data["destination"]),
            destination_namespace=str(data.get("destinationNamespace", "")),
            destination_group=str(data.get("destinationGroup", "")),
            port=int(data["port"]),
            protocol=str(data["protocol"]),
            intent=data["intent"] == "allow",
            model=None if model is None or not known else model == "allow",
            model_known=known,
            reality=data.get("reality"),
            observed=data.get("observed"),
            status=data["status"],
            reason=str(data.get("reason", "")),
            since=data.get("since"),
            last_verified_at=data.get("lastVerifiedAt"),
            latency_seconds=data.get("latencySeconds"),
            confirming=data.get("confirming"),
        )


def flow_view(record: FlowRecord) -> FlowView:
    """The view of a live flow."""
    planned = record.planned
    source_group, source_namespace = _group(planned.source)
    destination_group, destination_namespace = _group(planned.destination)
    current = record.current
    reason = record.reason
    return FlowView(
        key=planned.key,
        kind=planned.kind,
        expectation=planned.expectation,
        flow=planned.flow,
        source=planned.source.key,
        source_namespace=source_namespace,
        source_group=source_group,
        destination=planned.destination_name,
        destination_namespace=destination_namespace,
        destination_group=destination_group,
        port=planned.port,
        protocol=planned.protocol,
        intent=planned.intent,
        model=planned.model,
        model_known=planned.verdict.known,
        reality=current.reality.verdict if current else None,
        observed=current.observed() if current else None,
        status=record.status,
        reason=reason,
        since=record.since,
        last_verified_at=current.received_at if current else None,
        latency_seconds=current.latency_seconds if current else None,
        confirming=record.confirming.candidate if record.confirming else None,
    )


def check_view(item: FlowCheck) -> FlowView:
    """The view of a flow checked offline (intent against the model; no reality)."""
    flow = item.flow
    source_group, source_namespace = _group(flow.source)
    destination_group, destination_namespace = _group(flow.destination)
    verdict = item.verdict
    return FlowView(
        key=flow.key,
        kind="declared",
        expectation=flow.expectation,
        flow=flow.flow,
        source=flow.source.key,
        source_namespace=source_namespace,
        source_group=source_group,
        destination=endpoint_name(flow.destination),
        destination_namespace=destination_namespace,
        destination_group=destination_group,
        port=flow.port,
        protocol=flow.protocol,
        intent=flow.intent,
        model=None if verdict is None else verdict.allowed,
        model_known=verdict is None or verdict.known,
        reality=None,
        observed=None,
        status=item.status,
        reason=item.detail or (verdict.summary() if verdict else ""),
    )


def flow_detail(record: FlowRecord) -> dict[str, Any]:
    """A live flow's view with everything behind it: the model's explanation, the pending
    confirmation, flaps, the results kept and the status history."""
    planned = record.planned
    reason = record.reason
    if record.confirming is not None:
        reason += f" (confirming {record.confirming.candidate}: {record.confirming.reason})"
    return {
        **flow_view(record).to_json(),
        "reason": reason,
        "explanation": {
            "summary": planned.verdict.summary(),
            "deciding": [m.describe() for m in planned.verdict.deciding],
            **planned.verdict.to_dict(),
        },
        "unprobeable": planned.unprobeable or None,
        "flaps": record.flaps,
        "lastFlap": record.last_flap.to_dict() if record.last_flap else None,
        "results": [r.to_dict() for r in record.results],
        "history": [c.to_dict() for c in record.history],
    }


def check_detail(item: FlowCheck) -> dict[str, Any]:
    """An offline flow's view with the model's explanation."""
    data = check_view(item).to_json()
    verdict = item.verdict
    if verdict is not None:
        data["explanation"] = {
            "summary": verdict.summary(),
            "deciding": [m.describe() for m in verdict.deciding],
            **verdict.to_dict(),
        }
    return data


# --- declared flows -------------------------------------------------------------------------------


def declared_json(item: DeclaredStatus) -> dict[str, Any]:
    return {
        "id": item.id,
        "expectation": item.expectation,
        "namespace": item.namespace,
        "flow": item.flow,
        "intent": _word(item.intent),
        "status": item.status,
        "reason": item.reason,
        "counts": dict(item.counts),
        "pairsCovered": item.pairs_covered,
        "pairsTotal": item.pairs_total,
        "observedAllowed": item.observed_allowed,
        "observedDenied": item.observed_denied,
        "lastVerifiedAt": item.last_verified_at,
    }


def unresolved_views(state: FlowState) -> list[FlowView]:
    """One view per declared flow that stands for no concrete flow (matches no pod, or cannot
    resolve): PASS with `allowEmpty`, else INCONCLUSIVE with the problems."""
    views = []
    for plan in state.declared_plans():
        if plan.keys:
            continue
        empty_ok = not plan.problems
        views.append(
            FlowView(
                key=f"{plan.expectation}/{plan.flow}",
                kind="declared",
                expectation=plan.expectation,
                flow=plan.flow,
                source=plan.source_text,
                source_namespace=plan.namespace,
                source_group="",
                destination=plan.destination_text,
                destination_namespace="",
                destination_group="",
                port=0,
                protocol="-",
                intent=plan.intent,
                model=None,
                reality=None,
                observed=None,
                status="PASS" if empty_ok else "INCONCLUSIVE",
                reason="matches no pod (allowEmpty)" if empty_ok else "; ".join(plan.problems),
            )
        )
    return views


def report_flows(state: FlowState, *, include_undeclared: bool = False) -> list[dict[str, Any]]:
    """Every flow `verify` reports, in detail: one per concrete flow, one per declared flow that
    stands for none."""
    rows = [
        flow_detail(record)
        for record in state.flows()
        if include_undeclared or record.planned.kind == "declared"
    ]
    return rows + [view.to_json() for view in unresolved_views(state)]


# --- evidence per policy -------------------------------------------------------------------------


def witness_json(item: WitnessResult) -> dict[str, Any]:
    return {
        **plan_witness_json(item.witness),
        "status": item.status,
        "reason": item.reason,
        "reality": item.reality,
    }


def policy_json(item: PolicyEvidence) -> dict[str, Any]:
    """A policy's evidence: its status, why, its own witnesses and each rule's."""
    return {
        "id": f"{item.namespace}/{item.name}",
        "namespace": item.namespace,
        "name": item.name,
        "status": item.status,
        "reason": item.reason,
        "source": item.source or None,
        "lint": list(item.lint),
        "witnesses": [witness_json(w) for w in item.witnesses],
        "rules": [
            {
                "rule": f"{r.rule.direction}[{r.rule.index}]",
                "text": r.text,
                "status": r.status,
                "reason": r.reason,
                "witnesses": [witness_json(w) for w in r.witnesses],
            }
            for r in item.rules
        ],
    }


def plan_witness_json(w: Witness) -> dict[str, Any]:
    return {
        "flow": w.flow_key,
        "subject": w.subject,
        "kind": w.kind,
        "direction": w.direction,
        "source": w.source.key,
        "destination": endpoint_name(w.destination),
        "port": w.port,
        "protocol": w.protocol,
        "expect": _word(w.model),
        "why": w.why,
        "via": w.via or None,
    }


def evidence_plan_json(plan: EvidencePlan) -> dict[str, Any]:
    """The offline evidence plan: every policy's witnesses or why it has none, and lint."""
    return {
        "policies": [
            {
                "id": p.policy,
                "source": p.source or None,
                "unprovable": p.unprovable or None,
                "lint": list(p.lint),
                "witnesses": [plan_witness_json(w) for w in p.witnesses],
                "rules": [
                    {
                        "rule": f"{r.rule.direction}[{r.rule.index}]",
                        "text": r.text,
                        "unprovable": r.unprovable or None,
                        "witnesses": [plan_witness_json(w) for w in r.witnesses],
                    }
                    for r in p.rules
                ],
            }
            for p in plan.policies
        ],
        "lint": [line for p in plan.policies for line in p.lint],
    }


def evidence_summary(items: Sequence[PolicyEvidence], coverage: Coverage) -> dict[str, Any]:
    counts = Counter(item.status for item in items)
    return {
        "total": len(items),
        "byStatus": {status: counts[status] for status in EVIDENCE_STATUSES},
        "sweep": {
            "cells": coverage.cells,
            "probed": coverage.probed,
            "ratio": coverage.ratio,
            "windowSeconds": coverage.window_seconds,
        },
    }


def sort_evidence(items: Iterable[PolicyEvidence]) -> list[PolicyEvidence]:
    """Worst first (NOT_ENFORCED, PENDING, UNPROVABLE, PROVEN), then by namespace and name."""
    return sorted(items, key=lambda e: (EVIDENCE_STATUSES.index(e.status), e.namespace, e.name))


# --- the matrix -----------------------------------------------------------------------------------


def _text_matches(query: str, *fields: object) -> bool:
    return any(query in str(f).lower() for f in fields if f is not None)


def row_matches(row: Mapping[str, Any], namespace: str, status: str, query: str, kind: str) -> bool:
    """Whether a flow's JSON passes the web view's filters (each empty filter passes all)."""
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


def declared_matches(
    item: DeclaredStatus, concrete: Sequence[Mapping[str, Any]], query: str
) -> bool:
    return _text_matches(query, item.id, item.reason) or any(
        _text_matches(query, c["key"]) for c in concrete
    )


def status_counts(statuses: Iterable[Status]) -> dict[str, int]:
    """Every status, worst first, with how many of `statuses` have it."""
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
                "counts": {k: v for k, v in status_counts(statuses).items() if v},
                "flows": [m["key"] for m in members],
            }
        )
    return {
        "level": level,
        "sources": sorted(sources.values(), key=order),
        "destinations": sorted(destinations.values(), key=order),
        "cells": out_cells,
    }


# --- the loop -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopStatus:
    """Numbers about the loop that only the runtime knows, read at every scrape and request.

    `agent_nodes` are the nodes with a connected agent. `assignments_queued` are assignments
    handed to the dispatcher and not yet sent to an agent (waiting for the agent, its capacity or a
    responder); `assignments_in_flight` were issued and have no result yet. The `*_total` fields are
    the planner's counters (`PlannerStats`), exported as counters.
    """

    agent_nodes: frozenset[str] = frozenset()
    assignments_queued: int = 0
    assignments_in_flight: int = 0
    assignments_issued_total: int = 0
    assignment_retries_total: int = 0
    assignments_lost_total: int = 0
    assignments_rate_limited_total: int = 0
    plans_whole_total: int = 0
    """Plans built whole (`build_plan`) and applied."""
    plans_updated_total: int = 0
    """Plans made by updating the one before for a few changed pods (`update_plan`)."""
    leading: bool = True
    """False on a standby collector (leader election on, the Lease held by another)."""
    leader: str = ""
    """With leader election: the Lease's holder as last seen ("" when unknown or released)."""


def nodes_needing_agents(state: FlowState) -> frozenset[str]:
    """Nodes that must run an agent for the plan: sources of a probe, or hosts of a responder."""
    nodes: set[str] = set()
    for record in state.flows():
        template = record.planned.template
        if template is None:
            continue
        nodes.add(template.source_node)
        if template.responder is not None:
            nodes.add(template.responder.node)
    nodes.discard("")
    return frozenset(nodes)


def compliance_ratio(declared: Iterable[DeclaredStatus]) -> dict[str, float]:
    """Per namespace: declared flows proven as declared (PASS) over all declared flows there.

    A flow that is pending, stale or inconclusive is not proven, so it counts against the ratio.
    """
    total: Counter[str] = Counter()
    passing: Counter[str] = Counter()
    for item in declared:
        total[item.namespace] += 1
        if item.status == "PASS":
            passing[item.namespace] += 1
    return {namespace: passing[namespace] / count for namespace, count in total.items()}


__all__ = [
    "FlowView",
    "LoopStatus",
    "build_matrix",
    "check_detail",
    "check_view",
    "compliance_ratio",
    "declared_json",
    "evidence_plan_json",
    "evidence_summary",
    "flow_detail",
    "flow_view",
    "nodes_needing_agents",
    "policy_json",
    "report_flows",
    "row_matches",
    "sort_evidence",
    "status_counts",
    "unresolved_views",
    "witness_json",
    "workload_of",
]
