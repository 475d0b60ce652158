"""`flowproof verify`: run every expectation now against a running collector and report.

The collector side (`add_verify_routes`) serves `POST /api/v1/verify`: it waits for the inventory,
for the probe pods the plan requests and for an agent on every node that sources a flow, probes
every declared flow at once, waits until each has a settled result of a probe started after the
request (or the timeout), and answers with the rows. The client side (`main`) prints a table grouped by status, writes JUnit, JSON and
Markdown, and exits 0 when every expectation holds, 1 when any fails, 2 when it could not decide.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import ClientError, ClientSession, ClientTimeout, web

from collector.checking import FAILING
from collector.reporting import (
    ReportRow,
    render_json,
    render_junit,
    render_markdown,
    render_table,
    sort_rows,
)

if TYPE_CHECKING:
    from collector.runtime import Collector

EXIT_OK, EXIT_FAILED, EXIT_UNDECIDED = 0, 1, 2
UNDECIDED = frozenset({"INCONCLUSIVE", "PENDING", "STALE"})
DEFAULT_COLLECTOR = "http://127.0.0.1:8080"


# --- collector side -------------------------------------------------------------------------------


def add_verify_routes(app: web.Application, collector: Collector) -> None:
    async def verify(request: web.Request) -> web.Response:
        try:
            body = await request.json() if request.can_read_body else {}
            timeout = float(body.get("timeout_seconds", 60.0))
        except (ValueError, TypeError, AttributeError):
            return web.json_response({"error": 'body must be {"timeout_seconds": N}'}, status=400)
        return web.json_response(await run_verification(collector, timeout))

    async def loop_counters(_: web.Request) -> web.Response:
        return web.json_response(loop_counters_of(collector))

    app.router.add_post("/api/v1/verify", verify)
    app.router.add_get("/api/v1/debug/loop", loop_counters)


def loop_counters_of(collector: Collector) -> dict[str, Any]:
    """Read-only counters of the loop: results delivered once, duplicates dropped, agents.

    The lab tests use them to prove that restarting an agent or the collector loses no result and
    counts none twice.
    """
    stats = collector.planner.stats
    dispatcher = collector.dispatcher
    return {
        "generation": collector.generation,
        "results_total": collector.results_total,
        "results_unplanned_total": collector.results_unplanned_total,
        "delivered_total": dispatcher.delivered_total,
        "duplicates_total": dispatcher.duplicates_total,
        "pending": dispatcher.pending_count(),
        "in_flight": collector.planner.in_flight,
        "issued_total": stats.issued_total,
        "retries_total": stats.retries_total,
        "lost_total": stats.lost_total,
        "rate_limited_total": stats.rate_limited_total,
        "started_at": collector.started_at,
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


async def run_verification(collector: Collector, timeout_seconds: float) -> dict[str, Any]:
    """Probe every declared flow now; the report once each has a settled fresh result."""
    timeout = timeout_seconds
    deadline = time.monotonic() + timeout
    if not await collector.wait_synced(max(0.0, deadline - time.monotonic())):
        return _undecided(collector, "the collector has no inventory yet")
    starting = await _wait_for_probe_pods(collector, deadline)
    missing = await _wait_for_agents(collector, deadline)
    since = collector.clock()
    queued = collector.planner.expedite()
    collector.wake()
    waiting = collector.state.awaiting(since)
    while waiting and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        waiting = collector.state.awaiting(since)
    rows = [r.to_dict() for r in sort_rows(collector.state.report_rows())]
    reasons = []
    if starting:
        reasons.append("probe pod(s) not running yet: " + ", ".join(sorted(starting)))
    if missing:
        reasons.append("no agent connected on node(s) " + ", ".join(sorted(missing)))
    if waiting:
        reasons.append(f"{len(waiting)} flow(s) had no settled result within {timeout:g} s")
    return {
        "decided": not reasons,
        "reasons": reasons,
        "generation": collector.generation,
        "flows_probed": queued,
        "agents": [a.node for a in collector.dispatcher.agents()],
        "rows": rows,
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


async def _wait_for_agents(collector: Collector, deadline: float) -> set[str]:
    """Wait until every node that sources a planned declared flow has an agent; the missing."""
    while True:
        needed = {
            f.template.source_node
            for f in collector.planner.plan.flows.values()
            if f.kind == "declared" and f.template is not None
        }
        missing = needed - {a.node for a in collector.dispatcher.agents()}
        if not missing or time.monotonic() >= deadline:
            return missing
        await asyncio.sleep(0.1)


def _undecided(collector: Collector, reason: str) -> dict[str, Any]:
    return {
        "decided": False,
        "reasons": [reason],
        "generation": collector.generation,
        "flows_probed": 0,
        "agents": [a.node for a in collector.dispatcher.agents()],
        "rows": [],
    }


# --- client side ----------------------------------------------------------------------------------


def row_from_dict(data: dict[str, Any]) -> ReportRow:
    return ReportRow(
        expectation=data["expectation"],
        flow=data["flow"],
        source=data["from"],
        destination=data["to"],
        port=int(data["port"]),
        protocol=data["protocol"],
        intent=data["intent"] == "allow",
        model=None if data.get("model") is None else data["model"] == "allow",
        reality=data.get("reality"),
        status=data["status"],
        explanation=data.get("explanation", ""),
        details=data.get("model_detail"),
    )


def exit_code(answer: dict[str, Any], rows: Sequence[ReportRow]) -> int:
    if any(r.status in FAILING for r in rows):
        return EXIT_FAILED
    if not answer.get("decided") or not rows or any(r.status in UNDECIDED for r in rows):
        return EXIT_UNDECIDED
    return EXIT_OK


def default_collector_url(environ: dict[str, str] | os._Environ[str]) -> str:
    """FLOWPROOF_COLLECTOR_URL, else the running lab's collector, else localhost:8080."""
    if environ.get("FLOWPROOF_COLLECTOR_URL"):
        return environ["FLOWPROOF_COLLECTOR_URL"]
    try:
        from lab.state import collector_url  # type: ignore[attr-defined,unused-ignore]

        url: str | None = collector_url(
            environ.get("FLOWPROOF_LAB_NAME", "fp"),
            environ.get("FLOWPROOF_LAB_STATE_DIR", "/var/lib/flowproof/lab"),
        )
    except Exception:
        url = None
    return url or DEFAULT_COLLECTOR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowproof verify",
        description="Run every expectation now against a running collector; exit 0 pass, "
        "1 a failure, 2 undecided (no agents, timeout, inconclusive flows).",
    )
    parser.add_argument("--collector", help="collector URL (default: the lab's, or localhost:8080)")
    parser.add_argument("--once", action="store_true", help="verify once and exit (the CI gate)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    parser.add_argument(
        "--interval", type=float, default=30.0, help="without --once: seconds between rounds"
    )
    parser.add_argument("--junit", metavar="FILE")
    parser.add_argument("--json", dest="json_file", metavar="FILE")
    parser.add_argument("--markdown", metavar="FILE")
    parser.add_argument("-o", "--output", choices=("table", "json", "markdown"), default="table")
    return parser


async def request_verification(url: str, timeout_seconds: float) -> dict[str, Any]:
    client_timeout = ClientTimeout(total=timeout_seconds + 30)
    async with (
        ClientSession(timeout=client_timeout) as session,
        session.post(
            f"{url.rstrip('/')}/api/v1/verify", json={"timeout_seconds": timeout_seconds}
        ) as resp,
    ):
        resp.raise_for_status()
        answer: dict[str, Any] = await resp.json()
        return answer


def report(answer: dict[str, Any], args: argparse.Namespace) -> int:
    rows = [row_from_dict(r) for r in answer.get("rows", [])]
    renderers: dict[str, Callable[[], str]] = {
        "table": lambda: render_table(rows, with_reality=True),
        "json": lambda: render_json(rows, problems=answer.get("reasons", [])),
        "markdown": lambda: render_markdown(rows, title="flowproof verify", with_reality=True),
    }
    print(renderers[args.output]())
    for reason in answer.get("reasons", []):
        print(f"undecided: {reason}", file=sys.stderr)
    files: list[tuple[str | None, Callable[[], str]]] = [
        (args.junit, lambda: render_junit(rows, name="flowproof verify")),
        (args.json_file, lambda: render_json(rows, problems=answer.get("reasons", []))),
        (args.markdown, lambda: render_markdown(rows, title="flowproof verify", with_reality=True)),
    ]
    for path, render in files:
        if path:
            Path(path).write_text(render(), encoding="utf-8")
    return exit_code(answer, rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    url = args.collector or default_collector_url(os.environ)
    code = EXIT_UNDECIDED
    while True:
        try:
            answer = asyncio.run(request_verification(url, args.timeout))
        except (ClientError, OSError, TimeoutError) as exc:
            print(f"flowproof verify: cannot reach the collector at {url}: {exc}", file=sys.stderr)
            return EXIT_UNDECIDED
        except json.JSONDecodeError as exc:
            print(
                f"flowproof verify: the collector at {url} answered no JSON: {exc}", file=sys.stderr
            )
            return EXIT_UNDECIDED
        code = report(answer, args)
        if args.once:
            return code
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return code
