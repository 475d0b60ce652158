"""Loop benchmark: feedback latency in the demo lab, from `lab apply` to the flow's new status.

Run as root: `python bench/loop_bench.py [--changes 20] [--probe-timeout-seconds 1]`. It builds
the demo lab (the shop example with its collector and an agent per node, the lab's default loop
settings: probe timeout 1 s, cadence 5 s) under a unique name in a temporary state directory, listens to the collector's
live event stream (`/api/v1/events`), and `--changes` times applies the break that blocks the
declared flow shop/api-to-db (`examples/breaks/db-ingress-only-batch.yaml`), waits for the flow to
turn REQUIRED_BLOCKED, applies the fix (`examples/shop/policies/api-to-db.yaml`) and waits for
PASS. For each change it records, from the moment `apply` is called: when the first result of the
new verdict arrived (the first fresh verdict), and when every concrete flow of api-to-db had its
new status (a failing status is confirmed by a retry first). Prints p50/p95 per kind and the goal
(the deny timeout + 1 s). Every wait is bounded; the lab is always taken down.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.config import LabSettings
from lab.lifecycle import Lab, read_manifests
from lab.loop import LoopSettings

REPO = Path(__file__).resolve().parents[1]
SHOP = REPO / "examples" / "shop"
BREAK = REPO / "examples" / "breaks" / "db-ingress-only-batch.yaml"
FIX = SHOP / "policies" / "api-to-db.yaml"
FLOW = "shop/shop/api-to-db"
CHANGE_DEADLINE_SECONDS = 20.0


@dataclass
class Event:
    at: float
    kind: str
    data: dict[str, Any]


@dataclass
class Sample:
    kind: str  # "break" or "fix"
    apply_seconds: float
    first_verdict_seconds: float
    status_seconds: float


@dataclass
class Stream:
    """The collector's server-sent events, timestamped on arrival."""

    queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, url: str) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"{url}/api/v1/events") as response,
        ):
            response.raise_for_status()
            kind, data = "message", ""
            async for raw in response.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data += line[5:].strip()
                elif not line:
                    if data:
                        if kind == "hello":
                            self.connected.set()
                        await self.queue.put(Event(time.time(), kind, json.loads(data)))
                    kind, data = "message", ""

    def drain(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()


async def measure(lab: Lab, stream: Stream, kind: str, keys: set[str]) -> Sample:
    """Apply one change; wait until every concrete flow of FLOW has its new status."""
    target, outcome = ("REQUIRED_BLOCKED", "TIMEOUT") if kind == "break" else ("PASS", "CONNECTED")
    manifests = read_manifests([BREAK if kind == "break" else FIX])
    stream.drain()
    started = time.time()
    await asyncio.to_thread(lab.apply, manifests)
    applied = time.time()
    first_verdict: float | None = None
    settled: dict[str, float] = {}
    deadline = time.monotonic() + CHANGE_DEADLINE_SECONDS
    while len(settled) < len(keys):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{kind}: {FLOW} did not become {target} within the deadline")
        event = await asyncio.wait_for(stream.queue.get(), remaining)
        key = event.data.get("flow") if event.kind == "result" else event.data.get("key")
        if key not in keys:
            continue
        if event.kind == "result" and event.data.get("outcome") == outcome:
            first_verdict = first_verdict or event.at
        elif event.kind == "status" and event.data.get("to") == target:
            settled.setdefault(key, event.at)
    assert first_verdict is not None
    return Sample(kind, applied - started, first_verdict - started, max(settled.values()) - started)


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def table(samples: list[Sample], timeout: float) -> str:
    goal = timeout + 1.0
    lines = [
        f"Feedback latency in the demo lab ({len(samples)} changes, probe timeout {timeout:g} s; "
        f"goal: under {goal:g} s), seconds from `lab apply` of the change:",
        "",
        "| change | measured from apply to | n | p50 | p95 | max | under goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, title in (("break", "api-to-db blocked"), ("fix", "api-to-db fixed"), ("", "all")):
        chosen = [s for s in samples if not kind or s.kind == kind]
        for what, values in (
            ("apply returned", [s.apply_seconds for s in chosen]),
            ("first fresh verdict", [s.first_verdict_seconds for s in chosen]),
            ("new status, every pair", [s.status_seconds for s in chosen]),
        ):
            p95 = percentile(values, 0.95)
            lines.append(
                f"| {title} | {what} | {len(values)} | {statistics.median(values):.2f} | "
                f"{p95:.2f} | {max(values):.2f} | {'yes' if p95 < goal else 'NO'} |"
            )
    return "\n".join(lines)


async def run(changes: int, nodes: int, probe_timeout_seconds: float) -> int:
    loop_settings = LoopSettings.with_planner(probe_timeout_seconds=probe_timeout_seconds)
    state_dir = Path(tempfile.mkdtemp(prefix="flowproof-loop-bench-"))
    lab = Lab("lb" + secrets.token_hex(3), state_dir)
    print(f"building lab {lab.name} (shop example, {nodes} nodes, collector and agents)")
    samples: list[Sample] = []
    reader: asyncio.Task[None] | None = None
    try:
        started = time.monotonic()
        await asyncio.to_thread(
            lab.up,
            read_manifests([SHOP]),
            LabSettings(nodes=nodes, owner_pid=os.getpid()),
            loop_settings,
        )
        print(f"lab up with its loop in {time.monotonic() - started:.1f}s")
        loop = lab.state().loop
        assert loop is not None
        async with aiohttp.ClientSession() as session:
            token = (await asyncio.to_thread(Path(loop.token_file).read_text)).strip()
            async with session.post(
                f"{loop.url}/api/v1/verify",
                json={"timeout_seconds": 30},
                headers={"Authorization": f"Bearer {token}"},
            ) as response:
                answer = await response.json()
            bad = [r for r in answer["rows"] if r["status"] != "PASS"]
            if bad or not answer["decided"]:
                print(f"the demo lab does not pass before the bench: {bad or answer['reasons']}")
                return 1
            async with session.get(f"{loop.url}/api/v1/flows/{FLOW}") as response:
                keys = {f["key"] for f in (await response.json())["flows"]}
        stream = Stream()
        reader = asyncio.create_task(stream.run(loop.url))
        await asyncio.wait_for(stream.connected.wait(), 10)
        for i in range(changes):
            for kind in ("break", "fix"):
                sample = await measure(lab, stream, kind, keys)
                samples.append(sample)
                print(
                    f"change {i + 1:2}/{changes} {kind:5}: first verdict "
                    f"{sample.first_verdict_seconds:.2f}s, status {sample.status_seconds:.2f}s"
                )
        print()
        print(table(samples, loop_settings.planner.probe_timeout_seconds))
        return 0
    finally:
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await reader
        if lab.exists():
            await asyncio.to_thread(lab.down)
        with contextlib.suppress(OSError):
            os.rmdir(state_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=20, help="break/fix cycles (default 20)")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument(
        "--probe-timeout-seconds",
        type=float,
        default=LoopSettings().planner.probe_timeout_seconds,
        help="the lab's probe timeout (default: the lab's, 1 s)",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the loop bench needs root (it builds a lab)", file=sys.stderr)
        return 2
    changes = max(1, min(args.changes, 200))
    return asyncio.run(run(changes, args.nodes, args.probe_timeout_seconds))


if __name__ == "__main__":
    raise SystemExit(main())
