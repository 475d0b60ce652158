"""Web view and metrics benchmark: /metrics of 10,000 flows, first paint of 1,000, verdict to page.

The collector's web app (collector.web) serves a flow state filled with real results by the real
planner and flow state (tests/e2e_support/samples.py) on a loopback port:
- `/metrics` scraped over HTTP while the state holds 10,000 concrete flows (1,000 declared flows
  of 10 pod pairs; and the extreme of 10,000 declared flows of one pair each), target < 100 ms;
- first paint of the web view with 1,000 flows in headless Chromium (Debian's, via Playwright):
  from navigation start to the rendered matrix, target < 1 s;
- a verdict reaching the open page: from the event's publication on the server to the page
  having applied it (the cell repainted), target < 1 s.
Every loop is bounded in count; all traffic stays on 127.0.0.1.

    python -m bench.web_bench [--scrapes 30] [--verdicts 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import time
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from collector.core.views import LoopStatus
from collector.metrics import CollectorMetrics
from collector.web.app import StateView, build_web_app
from collector.web.events import Broadcaster
from tests.e2e_support.samples import SampleLoop, large_snapshot

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


async def serve(loop: SampleLoop, broadcaster: Broadcaster) -> tuple[web.AppRunner, str]:
    state_view = StateView(
        state=loop.state,
        loop_status=lambda: LoopStatus(
            agent_nodes=frozenset({"node-1", "node-2", "node-3", "node-4"})
        ),
        generation=lambda: loop.generation,
    )
    metrics = CollectorMetrics(CollectorRegistry(), state=loop.state)
    for result in loop.results:
        metrics.observe_result(result)
    app = build_web_app(state_view=state_view, metrics=metrics, broadcaster=broadcaster)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def summary(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "median_ms": statistics.median(ordered) * 1000,
        "p95_ms": ordered[max(0, round(0.95 * len(ordered)) - 1)] * 1000,
        "max_ms": ordered[-1] * 1000,
    }


async def scrape_bench(scrapes: int, **shape: int) -> dict[str, Any]:
    build = time.perf_counter()
    loop = SampleLoop(large_snapshot(**shape))
    loop.probe_all()
    built = time.perf_counter() - build
    runner, base = await serve(loop, Broadcaster())
    timings: list[float] = []
    size = 0
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(scrapes):
                start = time.perf_counter()
                async with session.get(f"{base}/metrics") as response:
                    body = await response.read()
                timings.append(time.perf_counter() - start)
                size = len(body)
    finally:
        await runner.cleanup()
    return {
        "concrete_flows": len(loop.state.flows()),
        "declared_flows": len(loop.state.declared()),
        "bytes": size,
        "build_seconds": built,
        **summary(timings),
    }


async def browser_bench(verdicts: int) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    broadcaster = Broadcaster()
    # 100 declared flows of 2 sources × 5 destinations: 1,000 concrete flows (plus the drift sample).
    snapshot = large_snapshot(namespaces=2, workloads=10, flows_per_namespace=50)
    loop = SampleLoop(snapshot, listener=broadcaster.on_loop_event)
    loop.probe_all()
    runner, base = await serve(loop, broadcaster)
    result: dict[str, Any] = {"concrete_flows": len(loop.state.flows())}
    try:
        async with async_playwright() as driver:
            browser = await driver.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1366, "height": 768})
                paints = []
                for _ in range(3):
                    await page.goto(f"{base}/")
                    await page.wait_for_selector("html[data-ready='1']", timeout=10_000)
                    paints.append(await page.evaluate("() => window.flowproof.firstPaintMs") / 1000)
                result["first_paint"] = summary(paints)
                result["cells"] = await page.evaluate(
                    "() => document.querySelectorAll('#matrix td').length"
                )
                delays = []
                keys = [r.key for r in loop.state.flows("declared") if r.status == "PASS"]
                for i in range(verdicts):
                    record = loop.state.flow(keys[i * 7 % len(keys)])
                    assert record is not None
                    planned = record.planned
                    from flowproof.probes import Outcome

                    outcome = Outcome.TIMEOUT if planned.model else Outcome.CONNECTED
                    loop.answer(
                        planned, outcome
                    )  # a drift the page must show, confirmed by a retry
                    key = planned.key
                    await page.wait_for_function(
                        "key => { const e = window.flowproof.lastEvent; const r = window.flowproof.rows.get(key);"
                        " return e && e.appliedAt && e.flow === key && r && r.status === 'ENFORCEMENT_DRIFT'; }",
                        arg=key,
                        timeout=5000,
                    )
                    event = await page.evaluate("() => window.flowproof.lastEvent")
                    delays.append(event["appliedAt"] - event["publishedAt"])
                    loop.answer(planned)  # and back
                    await asyncio.sleep(0.2)
                result["verdict_to_page"] = summary(delays)
            finally:
                await browser.close()
    finally:
        await runner.cleanup()
    return result


async def run(scrapes: int, verdicts: int) -> dict[str, Any]:
    return {
        "scrape_10000_flows_in_1000_declared": await scrape_bench(scrapes),
        "scrape_10000_declared_flows": await scrape_bench(
            scrapes, flows_per_namespace=1000, workloads=40, sources_per_flow=1, pods_per_workload=1
        ),
        "browser": await browser_bench(verdicts),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scrapes", type=int, default=30)
    parser.add_argument("--verdicts", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = asyncio.run(run(min(args.scrapes, 200), min(args.verdicts, 50)))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for name in ("scrape_10000_flows_in_1000_declared", "scrape_10000_declared_flows"):
        r = results[name]
        print(
            f"/metrics, {r['concrete_flows']} flows in {r['declared_flows']} declared, "
            f"{r['bytes'] / 1e6:.1f} MB: median {r['median_ms']:.1f} ms, "
            f"p95 {r['p95_ms']:.1f} ms, max {r['max_ms']:.1f} ms (target < 100 ms)"
        )
    b = results["browser"]
    p = b["first_paint"]
    print(
        f"first paint, {b['concrete_flows']} flows ({b['cells']} cells): median "
        f"{p['median_ms']:.0f} ms, max {p['max_ms']:.0f} ms (target < 1 s)"
    )
    v = b["verdict_to_page"]
    print(
        f"verdict to open page: median {v['median_ms']:.0f} ms, max {v['max_ms']:.0f} ms "
        "(target < 1 s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
