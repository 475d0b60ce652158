"""Result intake under a burst: what 30,000 results at once cost the collector's other faces.

A real collector process (`flowproof collector`, the shop example's manifests, TLS on loopback
ports) and a client holding the token that connects as an agent and sends a burst of results as
fast as gRPC takes them (batches of 256, batches of 256 with made-up seals, then as one
30,000-result message), while a process of its own scrapes `/metrics` every 50 ms. Reported: the
longest and median scrape during the burst, how long the collector took to take the burst, and
its RSS before, at the peak and after. The results are for assignments the collector never issued
(what a client with the token can send), for a real flow of the plan. `--root DIR --plaintext`
runs another checkout's collector (one from before TLS and seals) in the same way, for a side by
side comparison. Every loop is bounded in count and time; all traffic stays on 127.0.0.1.

    python -m bench.intake_bench [--results 30000] [--root DIR --plaintext] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio

from bench.collector_process import (
    ROOT,
    channel,
    rss_mib,
    start_collector,
    stop_collector,
)
from flowproof import convert
from flowproof.probes import (
    PROTOCOL_VERSION,
    AgentCapabilities,
    AgentHello,
    Assignment,
    Outcome,
    PodRef,
    ProbeKind,
    ProbeResult,
)
from flowproof.v1 import agent_pb2 as pb
from flowproof.v1.agent_pb2_grpc import AgentServiceStub

TOKEN = "intake-bench-token"


def results(count: int, flow_key: str, *, sealed: bool = False) -> list[pb.ProbeResult]:
    a = Assignment(
        id="never-issued",
        source=PodRef(uid="0b0b0b0b-0000-4000-8000-000000000000", namespace="shop", name="x"),
        source_node="node-1",
        destination_ip="10.244.1.10",
        port=8080,
        protocol="TCP",
        kind=ProbeKind.TCP,
        timeout_seconds=1.0,
        flow_key=flow_key,
    )
    made = []
    for i in range(count):
        r = ProbeResult(
            id=uuid.uuid4().hex,
            assignment=Assignment(**{**a.__dict__, "id": f"never-issued-{i}"}),
            outcome=Outcome.CONNECTED,
            latency_seconds=0.001,
            node="node-1",
            started_at=time.time(),
        )
        message = convert.result_to_proto(r)
        if sealed:  # made up: the collector must verify it to refuse it
            message.assignment.seal.issued_at.FromNanoseconds(time.time_ns())
            message.assignment.seal.mac = os.urandom(32)
        made.append(message)
    return made


SCRAPER = """
import json, os, sys, time, urllib.request
url, stop_file = sys.argv[1], sys.argv[2]
latencies = []
for _ in range(10_000):  # bounded: 50 ms apart, the burst ends long before
    if os.path.exists(stop_file):
        break
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=60) as response:
        response.read()
    latencies.append(time.monotonic() - started)
    time.sleep(0.05)
print(json.dumps(latencies))
"""


async def scraping(url: str, stop_file: Path) -> asyncio.subprocess.Process:
    """A process of its own scrapes /metrics: the bench's own work never delays a scrape."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", SCRAPER, url, str(stop_file), stdout=asyncio.subprocess.PIPE
    )


async def burst(
    port: int, ca: bytes | None, messages: list[list[pb.ProbeResult]], limit_seconds: float
) -> float:
    """Send the messages on one agent stream; seconds until every result was acked."""
    async with channel(port, ca) as ch:
        call = AgentServiceStub(ch).Connect(metadata=(("authorization", f"Bearer {TOKEN}"),))
        caps = AgentCapabilities(False, (ProbeKind.TCP,), False, 10)
        hello = AgentHello("node-1", "bench", PROTOCOL_VERSION, caps, uuid.uuid4().hex)
        await call.write(pb.AgentMessage(hello=convert.hello_to_proto(hello)))
        await call.read()
        wanted = sum(len(m) for m in messages)
        started = time.monotonic()

        async def write() -> None:
            for batch in messages:
                await call.write(pb.AgentMessage(results=pb.ResultBatch(results=batch)))

        writer = asyncio.create_task(write())
        acked = 0
        try:
            async with asyncio.timeout(limit_seconds):
                while acked < wanted:
                    msg = await call.read()
                    if msg is grpc.aio.EOF:
                        break
                    if msg.WhichOneof("body") == "result_ack":
                        acked += len(msg.result_ack.result_ids)
        except grpc.aio.AioRpcError as exc:
            print(f"  the stream ended: {exc.code().name} {exc.details()}")
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            call.cancel()
        took = time.monotonic() - started
        if acked < wanted:
            print(f"  {acked} of {wanted} acked")
        return took


async def run(count: int, root: Path, plaintext: bool) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="fp-intake-"))
    collector = await start_collector(
        manifests=ROOT / "examples" / "shop",
        directory=directory,
        token=TOKEN,
        root=root,
        plaintext=plaintext,
    )
    base = collector.base
    url = f"{base}/metrics"
    grpc_port, ca, process = collector.grpc_port, collector.ca, collector.process
    figures: dict[str, Any] = {"results": count, "root": str(root)}
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(600):
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(url) as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.05)
            flows: list[Any] = []
            for _ in range(600):
                async with session.get(f"{base}/api/v1/flows") as response:
                    flows = (await response.json())["flows"]
                if flows and flows[0]["concrete"]:
                    break
                await asyncio.sleep(0.05)
            flow_key = str(flows[0]["concrete"][0]["key"])
        figures["rss_idle_mib"] = rss_mib(process.pid)[0]
        for name, messages in (
            ("batches_of_256", [results(256, flow_key) for _ in range(count // 256)]),
            (
                "batches_of_256_made_up_seals",
                [results(256, flow_key, sealed=True) for _ in range(count // 256)],
            ),
            ("one_message", [results(count, flow_key)]),
        ):
            stop_file = directory / f"stop-{name}"
            scraper = await scraping(url, stop_file)
            await asyncio.sleep(0.5)
            took = await burst(grpc_port, ca, messages, limit_seconds=120)
            await asyncio.sleep(0.3)
            stop_file.touch()
            out, _ = await scraper.communicate()
            latencies: list[float] = json.loads(out)
            rss, peak = rss_mib(process.pid)
            figures[name] = {
                "seconds": round(took, 2),
                "scrape_max_ms": round(max(latencies) * 1000, 1),
                "scrape_median_ms": round(statistics.median(latencies) * 1000, 1),
                "scrapes": len(latencies),
                "rss_after_mib": round(rss, 1),
                "rss_peak_mib": round(peak, 1),
            }
    finally:
        await stop_collector(collector)
        shutil.rmtree(directory, ignore_errors=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=int, default=30_000)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose collector runs")
    parser.add_argument("--plaintext", action="store_true", help="a collector without TLS")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    figures = asyncio.run(run(args.results, args.root.resolve(), args.plaintext))
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"collector RSS idle: {figures['rss_idle_mib']:.1f} MiB")
        print(f"collector of {figures['root']}")
        for name in ("batches_of_256", "batches_of_256_made_up_seals", "one_message"):
            f = figures[name]
            print(
                f"{name}: {args.results} results taken in {f['seconds']} s; /metrics during it: "
                f"max {f['scrape_max_ms']} ms, median {f['scrape_median_ms']} ms "
                f"({f['scrapes']} scrapes); RSS after {f['rss_after_mib']} MiB, peak "
                f"{f['rss_peak_mib']} MiB"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
