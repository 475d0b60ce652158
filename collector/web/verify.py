"""The verify route: `POST /api/v1/verify` runs every expectation now and answers with the report.

It is the one HTTP route that makes agents send traffic, so it needs `Authorization: Bearer
<token>` (the collector's verify token, else the agents' token; compared in constant time). It
waits for the inventory, for the probe pods the plan requests and for an agent on every node
that sources a flow, probes every declared flow at once, and waits until each has a settled result
of a probe started after the request (or the timeout). The answer's rows are
collector.core.views' flow details, its policies every NetworkPolicy's evidence; `flowproof
verify` (flowproof/verifying.py) is its client. Asked with `Accept: application/x-ndjson`, it
streams JSON lines instead: `{"progress": {...}}` about twice a second while it waits (what it
waits for; flows decided of the total), then `{"answer": {...}}`. Also `GET /api/v1/debug/loop`:
read-only counters the lab tests use.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from aiohttp import web

from collector.core.planning import FlowKind
from collector.core.views import evidence_summary, policy_json, report_flows, sort_evidence
from collector.dispatching import Dispatcher
from collector.loop import Collector

NDJSON: Final = "application/x-ndjson"
PROGRESS_INTERVAL_SECONDS: Final = 0.5

Progress = Callable[[dict[str, Any]], Awaitable[None]]
"""Told what a verification waits for: {"phase": ..., "decided": n, "total": m, ...}."""


def authorized(request: web.Request, tokens: Sequence[str]) -> bool:
    """Whether the request carries `Authorization: Bearer <one of tokens>` (constant time)."""
    given = request.headers.get("Authorization", "").encode()
    return any(token and hmac.compare_digest(given, f"Bearer {token}".encode()) for token in tokens)


def add_verify_routes(
    app: web.Application,
    collector: Collector,
    dispatcher: Dispatcher,
    *,
    tokens: Sequence[str],
    leader: Callable[[], tuple[bool, str]] | None = None,
) -> None:
    """`POST /api/v1/verify` (bearer token) and `GET /api/v1/debug/loop` on `app`.

    `leader()`, with leader election, says whether this collector leads and who holds the Lease:
    a standby answers verify with 503 (it has no agents), naming the leader.
    """
    if not any(tokens):
        raise ValueError("the verify route needs a token")

    async def verify(request: web.Request) -> web.StreamResponse:
        if not authorized(request, tokens):
            return web.json_response(
                {
                    "error": "POST /api/v1/verify needs Authorization: Bearer <the collector's token>"
                },
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="flowproof verify"'},
            )
        if leader is not None:
            leading, holder = leader()
            if not leading:
                return web.json_response(
                    {
                        "error": "this collector is a standby (it does not hold the Lease; "
                        f"the leader is {holder or 'not known yet'}): it has no agents; "
                        "retry, through the Service or on the leader's pod"
                    },
                    status=503,
                    headers={"Retry-After": "2"},
                )
        try:
            body = await request.json() if request.can_read_body else {}
            timeout = float(body.get("timeout_seconds", 60.0))
            evidence = bool(body.get("evidence", True))
            require = bool(body.get("require_evidence", False))
        except (ValueError, TypeError, AttributeError):
            return web.json_response(
                {
                    "error": 'body must be {"timeout_seconds": N, "evidence": BOOL, '
                    '"require_evidence": BOOL}'
                },
                status=400,
            )
        if NDJSON not in request.headers.get("Accept", ""):
            answer = await run_verification(
                collector, dispatcher, timeout, evidence=evidence, require_evidence=require
            )
            return web.json_response(answer)
        response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-store"})
        await response.prepare(request)

        async def progress(data: dict[str, Any]) -> None:
            await response.write(_line({"progress": data}))

        answer = await run_verification(
            collector,
            dispatcher,
            timeout,
            evidence=evidence,
            require_evidence=require,
            progress=progress,
        )
        await response.write(_line({"answer": answer}))
        await response.write_eof()
        return response

    async def loop_counters(_: web.Request) -> web.Response:
        return web.json_response(loop_counters_of(collector, dispatcher))

    app.router.add_post("/api/v1/verify", verify)
    app.router.add_get("/api/v1/debug/loop", loop_counters)


def loop_counters_of(collector: Collector, dispatcher: Dispatcher) -> dict[str, Any]:
    """Read-only counters of the loop: results delivered once, duplicates dropped, agents.

    The lab tests use them to prove that restarting an agent or the collector loses no result and
    counts none twice.
    """
    stats = collector.planner.stats
    return {
        "generation": collector.generation,
        "results_total": collector.results_total,
        "results_unplanned_total": collector.results_unplanned_total,
        "delivered_total": dispatcher.delivered_total,
        "duplicates_total": dispatcher.duplicates_total,
        "results_refused": dict(dispatcher.results_refused),
        "timestamps_adjusted_total": dispatcher.timestamps_adjusted_total,
        "streams_refused_total": dispatcher.refused_total,
        "pending": dispatcher.pending_count(),
        "in_flight": collector.planner.in_flight,
        "issued_total": stats.issued_total,
        "retries_total": stats.retries_total,
        "lost_total": stats.lost_total,
        "rate_limited_total": stats.rate_limited_total,
        "started_at": collector.started_at,
        "tasks": len(asyncio.all_tasks()),  # the soak bench watches it for leaks
        "agents": [
            {
                "node": a.node,
                "instance_id": a.instance_id,
                "connected_at": a.connected_at,
                "in_flight": a.assignments_in_flight,
                "results_dropped_total": a.results_dropped_total,
            }
            for a in dispatcher.agents()
        ],
    }


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), default=str).encode() + b"\n"


async def run_verification(
    collector: Collector,
    dispatcher: Dispatcher,
    timeout_seconds: float,
    *,
    evidence: bool = True,
    require_evidence: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Probe every declared flow (and with `evidence` every policy's witnesses) now; the report
    once each has a settled fresh result or the timeout passed.

    Declared flows decide the answer; the policies' evidence is reported beside them and, with
    `require_evidence`, a policy whose witnesses did not all settle leaves the answer undecided.
    `progress`, if given, is told what it waits for about twice a second.
    """
    timeout = timeout_seconds
    started = time.monotonic()
    deadline = started + timeout
    told = [0.0]

    async def tell(phase: str, decided: int = 0, total: int = 0, *, now: bool = False) -> None:
        if progress is None or not (now or time.monotonic() - told[0] >= PROGRESS_INTERVAL_SECONDS):
            return
        told[0] = time.monotonic()
        elapsed = round(time.monotonic() - started, 1)
        await progress({"phase": phase, "decided": decided, "total": total, "elapsed": elapsed})

    await tell("inventory", now=True)
    if not await collector.wait_synced(max(0.0, deadline - time.monotonic())):
        return _undecided(collector, dispatcher, "the collector has no inventory yet")
    # The witnesses of the snapshot itself: after a change they are chosen again by the whole
    # plan, built now rather than when due.
    chosen = await collector.wait_whole(max(0.0, deadline - time.monotonic())) if evidence else True
    await tell("agents", now=True)
    starting = await _wait_for_probe_pods(collector, deadline)
    missing = await _wait_for_agents(collector, dispatcher, deadline)
    since = collector.clock.time()
    kinds: tuple[FlowKind, ...] = ("declared", "witness") if evidence else ("declared",)
    queued = collector.planner.expedite(kinds=kinds)
    collector.wake()
    waiting = collector.state.awaiting(since)
    total = len(waiting)
    await tell("probing", 0, total, now=True)
    while waiting and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        waiting = collector.state.awaiting(since)
        await tell("probing", total - len(waiting), total)
    await tell("probing", total - len(waiting), total, now=True)
    witnesses = collector.state.awaiting(since, kinds=("witness",)) if evidence else []
    while witnesses and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        witnesses = collector.state.awaiting(since, kinds=("witness",))
    rows = report_flows(collector.state)
    reasons = []
    if starting:
        reasons.append("probe pod(s) not running yet: " + ", ".join(sorted(starting)))
    if missing:
        reasons.append("no agent connected on node(s) " + ", ".join(sorted(missing)))
    if waiting:
        reasons.append(f"{len(waiting)} flow(s) had no settled result within {timeout:g} s")
    items = sort_evidence(collector.state.evidence()) if evidence else []
    if require_evidence and not chosen:
        reasons.append(f"the policies' witnesses were not chosen within {timeout:g} s")
    if require_evidence and witnesses:
        reasons.append(
            f"{len(witnesses)} witness flow(s) of the policies had no settled result within "
            f"{timeout:g} s"
        )
    return {
        "decided": not reasons,
        "reasons": reasons,
        "generation": collector.generation,
        "flows_probed": queued,
        "agents": [a.node for a in dispatcher.agents()],
        "rows": rows,
        "policies": [policy_json(e) for e in items],
        "evidence": evidence_summary(items, collector.state.coverage()),
    }


async def _wait_for_probe_pods(collector: Collector, deadline: float) -> set[str]:
    """Wait until the probe pods the plan requests run (when someone makes them); the missing.

    Until then the flows they stand for cannot be probed: verifying them now would report them
    INCONCLUSIVE although their probe pod is a moment away.
    """
    while True:
        if not collector.manages_probe_pods:
            return set()
        requested = {r.key for r in collector.planner.plan.probe_pods}
        if not requested or time.monotonic() >= deadline:
            return requested
        await asyncio.sleep(0.1)


async def _wait_for_agents(
    collector: Collector, dispatcher: Dispatcher, deadline: float
) -> set[str]:
    """Wait until every node that sources a planned declared flow has an agent; the missing."""
    while True:
        needed = {
            f.template.source_node
            for f in collector.planner.plan.flows.values()
            if f.kind == "declared" and f.template is not None
        }
        missing = needed - {a.node for a in dispatcher.agents()}
        if not missing or time.monotonic() >= deadline:
            return missing
        await asyncio.sleep(0.1)


def _undecided(collector: Collector, dispatcher: Dispatcher, reason: str) -> dict[str, Any]:
    return {
        "decided": False,
        "reasons": [reason],
        "generation": collector.generation,
        "flows_probed": 0,
        "agents": [a.node for a in dispatcher.agents()],
        "rows": [],
        "policies": [],
    }
