"""Feedback latency with the inventory from a real API server, beside the manifest source.

Run as root: `python -m bench.apiserver_bench [--changes 10]`. It builds the shop lab twice, one
after the other in this run: first as the demo runs it (the collector reads the lab's cluster file,
changes are `lab` commands), then with an API server of its own (`lab up --apiserver`: the
collector lists and watches kube-apiserver as in a cluster; changes are written to the API as
kubectl writes them, and reach the lab's kernel through its mirror). On each it times `--changes`
rounds of:

- policy break / fix: db-ingress admits only batch (examples/breaks/db-ingress-only-batch.yaml),
  then the original: until every api-to-db pair is REQUIRED_BLOCKED, then PASS (as bench.loop_bench);
- relabel: batch-0 gets app=frontend, until its first frontend-to-api pair is PASS; then back,
  until batch-to-db from batch-0 is PASS again;
- pod add: a new pod app=frontend, until its first frontend-to-api pair is PASS;
- pod delete: that pod deleted, until the collector's flows no longer name it.

Each figure is seconds from the change's call (the `lab` command, or the API request) to the
collector's event; printed as a table per source with p50, p95 and max. Every wait is bounded;
both labs are always taken down.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loop_bench import BREAK, FIX, SHOP, Event, Stream, percentile
from lab import mirroring
from lab.config import LabSettings
from lab.lifecycle import Lab, read_manifests
from lab.loop import LoopSettings
from lab.mirroring import ApiServerOptions, api_path

DEADLINE_SECONDS = 30.0
EXTRA = "frontend-extra"
CHANGES = ("policy break", "policy fix", "relabel", "relabel back", "pod add", "pod delete")


@dataclass
class Sample:
    source: str
    change: str
    seconds: float


class Changes:
    """The changes, as a lab command (manifest source) or an API write (API server)."""

    def __init__(self, lab: Lab, *, through_api: bool) -> None:
        self.lab = lab
        self.through_api = through_api

    def _api(self, call: Callable[[mirroring.ApiObjects], Any]) -> None:
        state = self.lab.state()
        assert state.apiserver is not None
        with mirroring.client(state.apiserver) as api:
            call(api)

    def policy(self, path: Path) -> None:
        if not self.through_api:
            self.lab.apply(read_manifests([path]))
            return
        docs = [
            d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "NetworkPolicy"
        ]
        self._api(
            lambda api: [api.apply(mirroring.path_for(d), d, field_manager="kubectl") for d in docs]
        )

    def label(self, pod: str, app: str) -> None:
        if not self.through_api:
            self.lab.label_pod(f"shop/{pod}", [f"app={app}"])
            return
        body = {"metadata": {"labels": {"app": app}}}
        self._api(
            lambda api: api.request(
                "PATCH",
                api_path("Pod", pod, "shop"),
                body,
                content_type="application/merge-patch+json",
            )
        )

    def add(self) -> None:
        manifest = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": EXTRA, "namespace": "shop", "labels": {"app": "frontend"}},
            "spec": {
                "containers": [{"name": "web", "image": "registry.example.com/shop/frontend:1.0"}]
            },
        }
        if not self.through_api:
            self.lab.apply(_manifests_of(manifest))
            return
        self._api(lambda api: api.request("POST", api_path("Pod", "", "shop"), manifest))

    def delete(self) -> None:
        if not self.through_api:
            self.lab.delete(
                _manifests_of(
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "metadata": {"name": EXTRA, "namespace": "shop"},
                        "spec": {"containers": [{"name": "web", "image": "x"}]},
                    }
                )
            )
            return
        self._api(lambda api: api.delete(api_path("Pod", EXTRA, "shop")))


def _manifests_of(doc: dict[str, Any]) -> Any:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        handle.write(json.dumps(doc))
    try:
        return read_manifests([handle.name])
    finally:
        os.unlink(handle.name)


def _status_to(event: Event, status: str, *, flow: str, source: str | None = None) -> bool:
    row = event.data.get("row") or {}
    return (
        event.kind == "status"
        and event.data.get("to") == status
        and row.get("flow") == flow
        and (source is None or row.get("source") == source)
    )


async def _timed(
    stream: Stream,
    act: Callable[[], None],
    done: Callable[[Event], bool] | None = None,
    *,
    poll: Callable[[], Awaitable[bool]] | None = None,
    every: int = 1,
) -> float:
    """Seconds from calling `act()` until `every` events satisfy `done` (or `poll()` holds)."""
    stream.drain()
    started = time.time()
    await asyncio.to_thread(act)
    deadline = time.monotonic() + DEADLINE_SECONDS
    seen = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the change did not reach a verdict within the deadline")
        if poll is not None:
            if await poll():
                return time.time() - started
            await asyncio.sleep(0.02)
            continue
        assert done is not None
        event = await asyncio.wait_for(stream.queue.get(), remaining)
        if done(event):
            seen += 1
            if seen >= every:
                return event.at - started


async def run_one(
    lab: Lab, label: str, changes: int, session: aiohttp.ClientSession
) -> list[Sample]:
    loop = lab.state().loop
    assert loop is not None
    token = (await asyncio.to_thread(Path(loop.token_file).read_text)).strip()
    async with session.post(
        f"{loop.url}/api/v1/verify",
        json={"timeout_seconds": 30, "evidence": False},
        headers={"Authorization": f"Bearer {token}"},
    ) as response:
        response.raise_for_status()
        answer = await response.json()
    bad = [r for r in answer["rows"] if r["status"] != "PASS"]
    if bad or not answer["decided"]:
        raise RuntimeError(
            f"{label}: the shop does not pass before the bench: {bad or answer['reasons']}"
        )
    api_to_db = sum(1 for r in answer["rows"] if r["flow"] == "api-to-db")
    stream = Stream()
    reader = asyncio.create_task(stream.run(loop.url))
    await asyncio.wait_for(stream.connected.wait(), 10)
    act = Changes(lab, through_api=label == "API server")
    extra = f"shop/{EXTRA}"

    async def extra_gone() -> bool:
        async with session.get(f"{loop.url}/api/v1/flows/shop/shop/frontend-to-api") as response:
            rows = (await response.json())["flows"]
        return not any(r.get("source") == extra for r in rows)

    samples: list[Sample] = []
    try:
        for i in range(changes):
            figures = {
                "policy break": await _timed(
                    stream,
                    lambda: act.policy(BREAK),
                    lambda e: _status_to(e, "REQUIRED_BLOCKED", flow="api-to-db"),
                    every=api_to_db,
                ),
                "policy fix": await _timed(
                    stream,
                    lambda: act.policy(FIX),
                    lambda e: _status_to(e, "PASS", flow="api-to-db"),
                    every=api_to_db,
                ),
                "relabel": await _timed(
                    stream,
                    lambda: act.label("batch-0", "frontend"),
                    lambda e: _status_to(e, "PASS", flow="frontend-to-api", source="shop/batch-0"),
                ),
                "relabel back": await _timed(
                    stream,
                    lambda: act.label("batch-0", "batch"),
                    lambda e: _status_to(e, "PASS", flow="batch-to-db", source="shop/batch-0"),
                ),
                "pod add": await _timed(
                    stream,
                    act.add,
                    lambda e: _status_to(e, "PASS", flow="frontend-to-api", source=extra),
                ),
                "pod delete": await _timed(stream, act.delete, poll=extra_gone),
            }
            for change, seconds in figures.items():
                samples.append(Sample(label, change, seconds))
            print(
                f"{label} round {i + 1}/{changes}: "
                + ", ".join(f"{k} {v:.2f}s" for k, v in figures.items()),
                flush=True,
            )
            await asyncio.sleep(1.0)  # let the probe pod of the relabel go
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
            await reader
    return samples


def table(samples: list[Sample], changes: int) -> str:
    lines = [
        f"Feedback latency, seconds from the change to the collector's verdict ({changes} rounds each; "
        "manifest source: `lab` commands; API server: the API request):",
        "",
        "| change | inventory | p50 | p95 | max |",
        "|---|---|---:|---:|---:|",
    ]
    for change in CHANGES:
        for source in ("manifests", "API server"):
            values = [s.seconds for s in samples if s.change == change and s.source == source]
            if values:
                lines.append(
                    f"| {change} | {source} | {statistics.median(values):.2f} | "
                    f"{percentile(values, 0.95):.2f} | {max(values):.2f} |"
                )
    return "\n".join(lines)


async def run(changes: int, bin_dir: str) -> int:
    state_dir = Path(tempfile.mkdtemp(prefix="flowproof-apiserver-bench-"))
    loop_settings = LoopSettings(ready_timeout_seconds=180.0)  # a shared, loaded host
    samples: list[Sample] = []
    for label in ("manifests", "API server"):
        lab = Lab("ab" + secrets.token_hex(3), state_dir)
        options = ApiServerOptions(bin_dir=bin_dir) if label == "API server" else None
        try:
            started = time.monotonic()
            await asyncio.to_thread(
                lab.up,
                read_manifests([SHOP]),
                LabSettings(owner_pid=os.getpid()),
                loop_settings,
                options,
            )
            print(
                f"{label}: lab {lab.name} up with its loop in {time.monotonic() - started:.1f}s",
                flush=True,
            )
            async with aiohttp.ClientSession() as session:
                samples += await run_one(lab, label, changes, session)
        finally:
            if lab.exists():
                await asyncio.to_thread(lab.down)
    with contextlib.suppress(OSError):
        os.rmdir(state_dir)
    print()
    print(table(samples, changes))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=10, help="rounds per lab (default 10)")
    parser.add_argument("--apiserver-bin", default="", help="prebuilt kube-apiserver and etcd")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the bench needs root (it builds labs)", file=sys.stderr)
        return 2
    return asyncio.run(run(max(1, min(args.changes, 100)), args.apiserver_bin))


if __name__ == "__main__":
    raise SystemExit(main())
