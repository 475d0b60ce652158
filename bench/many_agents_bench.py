"""Many agents: one real collector, up to 1,000 simulated agents, pod churn, where it gives first.

A synthetic cluster (`bench.synthetic.make_cluster`, its pods spread round robin over `--agents`
nodes `node-0` … `node-N-1`) with FlowExpectations (`with_expectations`, as many declared flows as
give about `--flows` concrete flows) is written as manifests to a temp dir (pods in shards of
`--pods-per-shard`) and read by a real `flowproof collector --source manifests` process with TLS
on 127.0.0.1. `--processes` worker processes of this module each hold a share of the agents, one
gRPC stream (its own TCP and TLS connection) per node: hello, then every assignment is answered
after `--delay-ms` with the model's verdict (CONNECTED, or HTTP 200 for HTTP probes, where the
collector's model allows the flow; TIMEOUT where it denies it; CONNECTED for flows the bench did
not see in /api/v1/flows at start, such as witnesses), responders reported OPENED, results kept
until acked. During the measured window of `--seconds`, one pod's `version` label is flipped
between v1 and v2 `--churn-per-second` times a second (its shard rewritten by rename; no policy
tells v1 from v2, so the model stays, but the change touches every flow of the pod). A separate
process scrapes `/metrics` (and /api/v1/debug/loop) every `--scrape-seconds`.

Reported per step: results taken per second (the dispatcher's delivered_total over the window),
what the planner issued and lost, collector CPU (cores) and RSS from /proc, the feedback latency
under churn as the collector measures it (`flowproof_change_to_verdict_seconds`: from the change's
file time to the first result of a probe started after it, for each flow the change touched;
p50/p95 interpolated within the histogram's buckets, as Prometheus' histogram_quantile does), the
time from a churn write to the collector applying a plan of a snapshot read after it (source log
time, then the generation of /api/v1/debug/loop), `/metrics` scrape times and the event loop lag
(`flowproof_event_loop_lag_seconds`). Every loop is bounded in count and time; every process
started is stopped by its pid, also on failure; all traffic stays on 127.0.0.1; no root needed.

    python -m bench.many_agents_bench [--agents 1000] [--flows 100000] [--seconds 60]
        [--ladder 100:10000,300:30000,1000:100000] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio

from bench.collector_process import (
    ROOT,
    CollectorProcess,
    channel,
    cpu_seconds,
    rss_mib,
    start_collector,
    stop_collector,
    wait_serving,
)
from bench.synthetic import _dump, _namespace_doc, _pod_doc, make_cluster, with_expectations
from collector.core.model import Expectations, PodTarget, Snapshot
from collector.core.scheduling import prepare_plan
from collector.core.settings import PlannerSettings
from flowproof import convert
from flowproof.probes import (
    PROTOCOL_VERSION,
    AgentCapabilities,
    AgentHello,
    Heartbeat,
    ProbeKind,
    ResponderReport,
    ResponderState,
)
from flowproof.v1 import agent_pb2 as pb
from flowproof.v1.agent_pb2_grpc import AgentServiceStub
from lab.cluster import policy_manifest

TOKEN = "many-agents-bench-token"
SEED = 7
MAX_IN_FLIGHT = 1024  # the agent's default (agent/settings.py)
RESULT_BATCH = 256  # the agent's default result_batch_size
HEARTBEAT_SECONDS = 5.0
SNAPSHOT_LOG = re.compile(r"^(\S+ \S+) INFO \S+: snapshot generation (\d+):")
WANTED = (
    "flowproof_event_loop_lag_seconds",
    "flowproof_change_to_verdict_seconds",
    "flowproof_probes_total",
    "flowproof_agents_connected",
    "flowproof_assignments_in_flight",
    "flowproof_assignments_queued",
    "flowproof_assignments_issued_total",
    "flowproof_assignments_lost_total",
    "flowproof_assignments_rate_limited_total",
)


# --- the cluster ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Cluster:
    snapshot: Snapshot
    declared: int
    concrete_estimate: int
    calibration: dict[str, float]


def make_bench_cluster(
    nodes: int, flows: int, *, pods_per_node: int, pods_per_namespace: int, max_pairs: int
) -> Cluster:
    """The synthetic cluster on `nodes` nodes with about `flows` concrete declared flows.

    How many concrete flows a declared flow gives is measured by planning a prefix of the
    declared flows in this process (`with_expectations` draws them in order, so a prefix of the
    set is the set of a smaller count); the whole set is then that many times larger.
    """
    pods = nodes * pods_per_node
    namespaces = max(4, pods // pods_per_namespace)
    base = make_cluster(pods, namespaces, max(50, pods // 20), SEED)
    spread = tuple(
        dataclasses.replace(pod, node=f"node-{i % nodes}") for i, pod in enumerate(base.pods)
    )
    snapshot = dataclasses.replace(base, pods=spread)
    sample = max(100, 3 * namespaces)
    settings = PlannerSettings(max_pairs_per_flow=max_pairs)
    started = time.process_time()
    plan = prepare_plan(with_expectations(snapshot, sample, 1), settings, generation=1).plan
    per_declared = sum(1 for f in plan.flows.values() if str(f.kind) == "declared") / sample
    calibration = {
        "sample_declared": sample,
        "concrete_per_declared": round(per_declared, 2),
        "plan_cpu_seconds_per_declared": round((time.process_time() - started) / sample, 4),
    }
    declared = max(1, math.ceil(flows / max(per_declared, 0.1)))
    return Cluster(
        with_expectations(snapshot, declared, 1),
        declared,
        round(declared * per_declared),
        calibration,
    )


def _selector_doc(target: PodTarget) -> dict[str, Any]:
    return {"matchLabels": dict(target.pod_selector.match_labels)}


FLOWS_PER_DOCUMENT = 64  # the most a FlowExpectations document may hold (its schema)


def expectations_docs(document: Expectations) -> list[dict[str, Any]]:
    """`with_expectations`' document of a namespace as FlowExpectations YAML documents, split
    into documents of at most FLOWS_PER_DOCUMENT flows (`bench-0`, `bench-1`, ...)."""
    flows = []
    for flow in document.flows:
        assert isinstance(flow.destination, PodTarget)
        flows.append(
            {
                "name": flow.name,
                "from": {"podSelector": _selector_doc(flow.source)},
                "to": {"podSelector": _selector_doc(flow.destination)},
                "ports": [port.describe() for port in flow.ports],
                "expect": flow.expect,
            }
        )
    return [
        {
            "apiVersion": "flowproof.dev/v1alpha1",
            "kind": "FlowExpectations",
            "metadata": {
                "name": f"{document.name}-{i // FLOWS_PER_DOCUMENT}",
                "namespace": document.namespace,
            },
            "spec": {"flows": flows[i : i + FLOWS_PER_DOCUMENT]},
        }
        for i in range(0, len(flows), FLOWS_PER_DOCUMENT)
    ]


class Manifests:
    """The cluster as manifest files; pods in shards, so a churn rewrites one small file."""

    def __init__(self, snapshot: Snapshot, directory: Path, pods_per_shard: int) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        _dump(
            directory / "namespaces.yaml", [_namespace_doc(n) for n in snapshot.namespaces.values()]
        )
        _dump(directory / "networkpolicies.yaml", [policy_manifest(p) for p in snapshot.policies])
        _dump(
            directory / "expectations.yaml",
            [doc for e in snapshot.expectations for doc in expectations_docs(e)],
        )
        self.shards: list[list[dict[str, Any]]] = []
        self.where: dict[str, tuple[int, int]] = {}  # pod key -> (shard, index)
        for i, pod in enumerate(snapshot.pods):
            if i % pods_per_shard == 0:
                self.shards.append([])
            self.where[pod.key] = (len(self.shards) - 1, len(self.shards[-1]))
            self.shards[-1].append(_pod_doc(pod))
        for shard in range(len(self.shards)):
            self.write(shard)

    def path(self, shard: int) -> Path:
        return self.directory / f"pods-{shard:04d}.yaml"

    def write(self, shard: int) -> None:
        hidden = self.directory / f".pods-{shard:04d}.tmp"  # the source skips hidden files
        _dump(hidden, self.shards[shard])
        os.replace(hidden, self.path(shard))  # a new inode: the source sees it at once

    def flip_version(self, pod_key: str) -> None:
        """Flip the pod's `version` label between v1 and v2 and rewrite its shard."""
        shard, index = self.where[pod_key]
        labels = self.shards[shard][index]["metadata"]["labels"]
        labels["version"] = "v2" if labels.get("version") == "v1" else "v1"
        self.write(shard)


# --- simulated agents (worker processes) ------------------------------------------------------------


class SimulatedAgent:
    """One node's agent: answers every assignment after a delay, keeps results until acked."""

    def __init__(self, node: str, config: dict[str, Any], ca: bytes, model: dict[str, bool]):
        self.node = node
        self.config = config
        self.ca = ca
        self.model = model
        self.delay = config["delay_ms"] / 1000
        self.stats: collections.Counter[str] = collections.Counter()
        self.connect_seconds: list[float] = []
        self.instance_id = uuid.uuid4().hex

    async def run(self, deadline: float) -> None:
        for attempt in range(1000):  # bounded: one stream at a time, until the deadline
            if time.time() >= deadline:
                return
            try:
                await self._stream(deadline)
            except (grpc.aio.AioRpcError, TimeoutError, ConnectionError) as exc:
                self.stats["stream_breaks"] += 1
                kind = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc)
                self.stats[f"break {kind}"] += 1
            await asyncio.sleep(min(5.0, 0.5 * 2 ** min(attempt, 3)) * random.random())

    async def _stream(self, deadline: float) -> None:
        started = time.monotonic()
        async with channel(self.config["grpc_port"], self.ca, own_connection=True) as ch:
            call = AgentServiceStub(ch).Connect(
                metadata=(("authorization", f"Bearer {self.config['token']}"),)
            )
            caps = AgentCapabilities(False, (ProbeKind.TCP, ProbeKind.UDP, ProbeKind.HTTP), True,
                                     MAX_IN_FLIGHT)  # fmt: skip
            hello = AgentHello(self.node, "bench", PROTOCOL_VERSION, caps, self.instance_id)
            await call.write(pb.AgentMessage(hello=convert.hello_to_proto(hello)))
            async with asyncio.timeout(60):
                first = await call.read()
            if (
                not isinstance(first, pb.CollectorMessage)
                or first.WhichOneof("body") != "hello_ack"
            ):
                raise ConnectionError("no hello-ack")
            self.connect_seconds.append(time.monotonic() - started)
            self.stats["connected"] += 1
            due: collections.deque[tuple[float, pb.Assignment, int]] = collections.deque()
            reports: list[pb.ResponderReport] = []
            cancelled: set[str] = set()
            wake = asyncio.Event()
            unacked = 0

            async def read() -> None:
                nonlocal unacked
                while True:
                    msg = await call.read()
                    if not isinstance(msg, pb.CollectorMessage):  # EOF
                        raise ConnectionError("the collector ended the stream")
                    which = msg.WhichOneof("body")
                    now = time.monotonic()
                    if which == "assignments":
                        for a in msg.assignments.assignments:
                            due.append((now + self.delay, a, time.time_ns()))
                        self.stats["assignments"] += len(msg.assignments.assignments)
                        wake.set()
                    elif which == "responder_requests":
                        for req in msg.responder_requests.requests:
                            reports.append(
                                convert.responder_report_to_proto(
                                    ResponderReport(req.assignment_id, ResponderState.OPENED)
                                )
                            )
                        self.stats["responders"] += len(msg.responder_requests.requests)
                        wake.set()
                    elif which == "cancel":
                        cancelled.update(msg.cancel.assignment_ids)
                    elif which == "result_ack":
                        self.stats["acked"] += len(msg.result_ack.result_ids)
                        unacked -= len(msg.result_ack.result_ids)

            async def write() -> None:
                nonlocal unacked
                sequence = 0
                next_beat = time.monotonic()
                while time.time() < deadline:
                    if reports:
                        batch = pb.ResponderReportBatch(reports=reports[:])
                        reports.clear()
                        await call.write(pb.AgentMessage(responder_reports=batch))
                    now = time.monotonic()
                    results: list[pb.ProbeResult] = []
                    while due and due[0][0] <= now and len(results) < RESULT_BATCH:
                        _, a, received_ns = due.popleft()
                        if a.id in cancelled:
                            cancelled.discard(a.id)
                            continue
                        results.append(self._result(a, received_ns))
                    if results:
                        await call.write(pb.AgentMessage(results=pb.ResultBatch(results=results)))
                        self.stats["results"] += len(results)
                        unacked += len(results)
                        continue
                    if now >= next_beat:
                        sequence += 1
                        beat = Heartbeat(sequence, time.time(), len(due), max(unacked, 0), 0, 0)
                        await call.write(
                            pb.AgentMessage(heartbeat=convert.heartbeat_to_proto(beat))
                        )
                        next_beat = now + HEARTBEAT_SECONDS
                    wait = next_beat - now
                    if due:
                        wait = min(wait, due[0][0] - now)
                    wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), max(wait, 0.001))

            reader = asyncio.create_task(read())
            writer = asyncio.create_task(write())
            try:
                done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            finally:
                for task in (reader, writer):
                    task.cancel()
                await asyncio.gather(reader, writer, return_exceptions=True)
                self.stats["dropped_unanswered"] += len(due)
                call.cancel()

    def _result(self, a: pb.Assignment, received_ns: int) -> pb.ProbeResult:
        allowed = self.model.get(a.flow_key, True)
        result = pb.ProbeResult(id=uuid.uuid4().hex, node_name=self.node)
        result.assignment.CopyFrom(a)  # echoed as received, seal included, as the agent does
        result.started_at.FromNanoseconds(received_ns)
        if not allowed:
            result.outcome = pb.OUTCOME_TIMEOUT
            result.latency.CopyFrom(a.timeout)
            result.detail = "no answer (simulated)"
        elif a.WhichOneof("probe") == "http":
            result.outcome = pb.OUTCOME_HTTP_STATUS
            result.http_status = 200
            result.latency.FromNanoseconds(int(self.delay * 1e9))
        else:
            result.outcome = pb.OUTCOME_CONNECTED
            result.latency.FromNanoseconds(int(self.delay * 1e9))
        return result


def stopped(stop_file: Path, deadline: float) -> None:
    """Return once the stop file exists or the deadline passed (polled, bounded by the deadline)."""
    while time.time() < deadline and not stop_file.exists():
        time.sleep(0.25)


async def worker(config: dict[str, Any], ca: bytes, model: dict[str, bool]) -> dict[str, Any]:
    deadline = float(config["deadline"])
    agents = [SimulatedAgent(node, config, ca, model) for node in config["nodes"]]
    tasks = []
    for agent in agents:  # staggered, as agents on many nodes start
        tasks.append(asyncio.create_task(agent.run(deadline)))
        await asyncio.sleep(config["stagger_seconds"])
    await asyncio.to_thread(stopped, Path(config["stop_file"]), deadline)
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks, timeout=10)
    total: collections.Counter[str] = collections.Counter()
    connects: list[float] = []
    for agent in agents:
        total.update(agent.stats)
        connects += agent.connect_seconds
    return {
        "agents": len(agents),
        "stats": dict(total),
        "connect_seconds_max": round(max(connects), 3) if connects else None,
        "connect_seconds_median": round(statistics.median(connects), 3) if connects else None,
    }


# --- the scraper (a process of its own) -------------------------------------------------------------


def parse_head(body: bytes) -> dict[str, float]:
    """The samples of WANTED families, read before the per-declared-flow families begin."""
    end = body.find(b"\n# HELP flowproof_flow_")
    head = body if end < 0 else body[:end]
    samples: dict[str, float] = {}
    for raw in head.decode().splitlines():
        if raw.startswith("#") or not raw.startswith(WANTED):
            continue
        name, _, value = raw.rpartition(" ")
        if name.startswith("flowproof_probes_total"):
            samples["flowproof_probes_total"] = samples.get("flowproof_probes_total", 0.0) + float(
                value
            )
        else:
            samples[name] = float(value)
    return samples


def scraper(base: str, out: Path, stop_file: Path, deadline: float, period: float) -> None:
    """Every `period`: time one /metrics scrape, keep what WANTED names, and the loop counters."""
    with out.open("w") as handle:
        for _ in range(100_000):  # bounded in count, and by the deadline and the stop file
            if stop_file.exists() or time.time() >= deadline:
                break
            started = time.time()
            record: dict[str, Any] = {"t": started}
            try:
                with urllib.request.urlopen(f"{base}/metrics", timeout=60) as response:
                    body = response.read()
                record["scrape_seconds"] = time.time() - started
                record["bytes"] = len(body)
                record["samples"] = parse_head(body)
                with urllib.request.urlopen(f"{base}/api/v1/debug/loop", timeout=60) as response:
                    loop = json.loads(response.read())
                record["generation"] = loop["generation"]
                record["delivered_total"] = loop["delivered_total"]
            except OSError as exc:
                record["error"] = str(exc)
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            time.sleep(max(0.0, period - (time.time() - started)))


# --- figures --------------------------------------------------------------------------------------


def bucket_quantile(
    before: dict[str, float], after: dict[str, float], family: str, q: float
) -> tuple[float | None, int]:
    """histogram_quantile(q) of the samples between two scrapes, and how many there were."""
    bounds: list[tuple[float, float]] = []
    prefix = f'{family}_bucket{{le="'
    for key, value in after.items():
        if key.startswith(prefix):
            le = key[len(prefix) : -2]
            bounds.append((math.inf if le == "+Inf" else float(le), value - before.get(key, 0.0)))
    bounds.sort()
    if not bounds or bounds[-1][1] <= 0:
        return None, 0
    total = bounds[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in bounds:
        if count >= rank:
            if math.isinf(bound):
                return lower, int(total)  # beyond the largest bucket: its bound, as Prometheus
            inside = count - below
            fraction = (rank - below) / inside if inside > 0 else 1.0
            return lower + (bound - lower) * fraction, int(total)
        lower, below = bound, count
    return lower, int(total)


def largest_bucket(before: dict[str, float], after: dict[str, float], family: str) -> str:
    """The bucket the largest sample fell in (`0.25-0.5`), between two scrapes."""
    prefix = f'{family}_bucket{{le="'
    bounds = sorted(
        (math.inf if (le := k[len(prefix) : -2]) == "+Inf" else float(le), v - before.get(k, 0.0))
        for k, v in after.items()
        if k.startswith(prefix)
    )
    lower = 0.0
    top = "none"
    previous = 0.0
    for bound, count in bounds:
        if count > previous:
            top = f"{lower:g}-{bound:g}"
        previous = count
        lower = bound
    return top


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def snapshot_reads(log_file: Path) -> list[tuple[float, int]]:
    """(wall time, generation) of every snapshot the manifest source logged as read."""
    reads = []
    for line in log_file.read_text(errors="replace").splitlines():
        match = SNAPSHOT_LOG.match(line)
        if match:
            at = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            reads.append((at, int(match.group(2))))
    return reads


def write_to_applied(
    writes: Iterable[float], reads: list[tuple[float, int]], records: list[dict[str, Any]]
) -> tuple[list[float], int]:
    """Seconds from each churn write to the collector's applied generation reaching the first
    snapshot read after it; and how many writes had no such plan applied by the end."""
    applied = [(r["t"], r["generation"]) for r in records if "generation" in r]
    seconds, missing = [], 0
    for written in writes:
        generation = next((g for at, g in reads if at >= written), None)
        when = (
            next((t for t, g in applied if g >= generation and t >= written), None)
            if generation is not None
            else None
        )
        if when is None:
            missing += 1
        else:
            seconds.append(when - written)
    return seconds, missing


# --- one step -------------------------------------------------------------------------------------


async def get_json(session: aiohttp.ClientSession, url: str, limit: float = 120) -> Any:
    async with asyncio.timeout(limit), session.get(url) as response:
        response.raise_for_status()
        return await response.json(content_type=None)


async def wait_for(what: str, check: Any, limit_seconds: float, period: float = 0.5) -> float:
    """Await `check()` until it is true; seconds it took; TimeoutError naming `what`."""
    started = time.monotonic()
    for _ in range(int(limit_seconds / period) + 1):
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(period)
    raise TimeoutError(f"{what}: not within {limit_seconds:g} s")


def spawn(role: str, config: dict[str, Any], directory: Path, name: str) -> subprocess.Popen[bytes]:
    path = directory / f"{name}.json"
    path.write_text(json.dumps(config))
    with (directory / f"{name}.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "bench.many_agents_bench", "--role", role, "--config", str(path)],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip


def end_process(process: subprocess.Popen[bytes], grace_seconds: float) -> None:
    """Wait for a process started here; SIGTERM then SIGKILL it by its pid when it overstays."""
    try:
        process.wait(grace_seconds)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


async def run_step(args: argparse.Namespace, agents: int, flows: int) -> dict[str, Any]:
    step_started = time.monotonic()
    figures: dict[str, Any] = {"agents": agents, "flows_target": flows}
    cluster = make_bench_cluster(
        agents, flows, pods_per_node=args.pods_per_node,
        pods_per_namespace=args.pods_per_namespace, max_pairs=args.max_pairs_per_flow,
    )  # fmt: skip
    figures.update(
        pods=len(cluster.snapshot.pods),
        namespaces=len(cluster.snapshot.namespaces),
        policies=len(cluster.snapshot.policies),
        declared_flows=cluster.declared,
        calibration=cluster.calibration,
    )
    directory = Path(tempfile.mkdtemp(prefix="fp-many-agents-"))
    manifests = Manifests(cluster.snapshot, directory / "manifests", args.pods_per_shard)
    log_file = directory / "collector.log"
    stop_file = directory / "stop"
    workers: list[subprocess.Popen[bytes]] = []
    scraper_process: subprocess.Popen[bytes] | None = None
    collector: CollectorProcess | None = None
    print(f"step {agents} agents / {flows} flows: {figures['pods']} pods, "
          f"{cluster.declared} declared flows (~{cluster.concrete_estimate} concrete)", flush=True)  # fmt: skip
    try:
        collector = await start_collector(
            manifests=manifests.directory, directory=directory, token=TOKEN, log_level="INFO",
            log_file=log_file,
            extra=["--max-pairs-per-flow", str(args.max_pairs_per_flow)],
        )  # fmt: skip
        timeout = aiohttp.ClientTimeout(total=180)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await wait_serving(session, collector, limit_seconds=60)
            base = collector.base

            async def planned() -> bool:
                return (
                    int((await get_json(session, f"{base}/api/v1/debug/loop"))["generation"]) >= 1
                )

            figures["first_plan_seconds"] = round(
                await wait_for("the first plan", planned, args.plan_limit_seconds), 1
            )
            fetched = time.monotonic()
            listing = await get_json(session, f"{base}/api/v1/flows", limit=180)
            figures["flows_api_seconds"] = round(time.monotonic() - fetched, 2)
            model: dict[str, int] = {}
            sources: set[str] = set()
            for declared in listing["flows"]:
                for concrete in declared["concrete"]:
                    model[concrete["key"]] = int(concrete["model"] == "allow")
                    sources.add(concrete["source"])
            del listing
            figures["concrete_flows"] = len(model)
            figures["model_allowed"] = sum(model.values())
            model_file = directory / "model.json"
            model_file.write_text(json.dumps(model))
            del model
            ca_file = directory / "ca.crt"
            assert collector.ca is not None
            ca_file.write_bytes(collector.ca)
            candidates = sorted(
                key
                for key in sources
                if key in manifests.where
                and manifests.shards[manifests.where[key][0]][manifests.where[key][1]]["metadata"][
                    "labels"
                ].get("version")
                in ("v1", "v2")
            )
            random.Random(SEED).shuffle(candidates)
            connect_budget = args.connect_limit_seconds
            deadline = time.time() + connect_budget + args.warmup_seconds + args.seconds + 60
            nodes = [f"node-{i}" for i in range(agents)]
            scraper_process = spawn(
                "scraper",
                {"base": base, "out": str(directory / "scrapes.jsonl"), "stop_file": str(stop_file),
                 "deadline": deadline, "period": args.scrape_seconds},
                directory, "scraper",
            )  # fmt: skip
            for w in range(args.processes):
                config = {
                    "grpc_port": collector.grpc_port, "token": TOKEN, "ca_file": str(ca_file),
                    "model_file": str(model_file), "nodes": nodes[w :: args.processes],
                    "delay_ms": args.delay_ms, "deadline": deadline, "stop_file": str(stop_file),
                    "stagger_seconds": args.stagger_seconds, "out": str(directory / f"w{w}.out"),
                }  # fmt: skip
                workers.append(spawn("worker", config, directory, f"worker-{w}"))

            connected = 0

            async def all_connected() -> bool:
                nonlocal connected
                connected = len((await get_json(session, f"{base}/api/v1/debug/loop"))["agents"])
                return connected >= agents

            try:
                figures["connect_seconds"] = round(
                    await wait_for("every agent connected", all_connected, connect_budget, 1.0), 1
                )
            except TimeoutError:  # a figure too: measured with the agents that made it
                figures["connect_seconds"] = None
            figures["agents_connected_before_warmup"] = connected
            print(f"  {connected} of {agents} agents connected "
                  f"(in {figures['connect_seconds']} s); warm-up {args.warmup_seconds} s",
                  flush=True)  # fmt: skip
            await asyncio.sleep(args.warmup_seconds)
            # The measured window: churn, CPU and RSS samples.
            before = await get_json(session, f"{base}/api/v1/debug/loop")
            t0, cpu0 = time.time(), cpu_seconds(collector.pid)
            workers_cpu0 = sum(cpu_seconds(p.pid) for p in workers)
            writes: list[float] = []
            rss: list[float] = []
            churns = int(args.seconds * args.churn_per_second) if candidates else 0
            behind = 0
            next_sample = t0
            for i in range(churns):
                at = t0 + i / args.churn_per_second
                if time.time() >= next_sample:
                    rss.append(rss_mib(collector.pid)[0])
                    next_sample += 1.0
                delay = at - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif delay < -1.0:
                    behind += 1  # the writer itself fell behind: counted, never made up
                manifests.flip_version(candidates[i % len(candidates)])
                writes.append(time.time())
            while time.time() < t0 + args.seconds:
                rss.append(rss_mib(collector.pid)[0])
                await asyncio.sleep(min(1.0, max(0.0, t0 + args.seconds - time.time())))
            t1, cpu1 = time.time(), cpu_seconds(collector.pid)
            workers_cpu1 = sum(cpu_seconds(p.pid) for p in workers)
            after = await get_json(session, f"{base}/api/v1/debug/loop")
            figures["agents_connected_end"] = len(after["agents"])
            peak = rss_mib(collector.pid)[1]
            print(f"  window done; {args.tail_seconds} s for the last feedback samples", flush=True)
            await asyncio.sleep(args.tail_seconds)
            tail = await get_json(session, f"{base}/api/v1/debug/loop")
        window = t1 - t0
        stop_file.touch()
        for process in workers:
            end_process(process, 30)
        if scraper_process is not None:
            end_process(scraper_process, 30)
        records, worker_figures = read_outputs(directory, args.processes)
        figures.update(
            window_figures(
                records=records,
                t0=t0,
                t1=t1,
                before=before,
                after=after,
                tail=tail,
                writes=writes,
                reads=snapshot_reads(log_file),
            )
        )
        stats: collections.Counter[str] = collections.Counter()
        for found in worker_figures:
            stats.update(found["stats"])
        figures.update(
            seconds=round(window, 1),
            churn_writes=len(writes),
            churn_writer_behind=behind,
            churn_candidates=len(candidates),
            collector_cpu_cores=round((cpu1 - cpu0) / window, 2),
            collector_cpu_seconds=round(cpu1 - cpu0, 1),
            workers_cpu_cores=round((workers_cpu1 - workers_cpu0) / window, 2),
            collector_rss_mib_max=round(max(rss), 1) if rss else None,
            collector_rss_mib_end=round(rss[-1], 1) if rss else None,
            collector_rss_mib_peak=round(peak, 1),
            agents_stats=dict(stats),
            agent_connect_seconds_max=max(
                (f["connect_seconds_max"] or 0 for f in worker_figures), default=None
            ),
            step_seconds=round(time.monotonic() - step_started, 1),
        )
    finally:
        stop_file.touch()
        for process in workers:
            end_process(process, 15)
        if scraper_process is not None:
            end_process(scraper_process, 15)
        if collector is not None:
            await stop_collector(collector)
        if args.keep:
            print(f"  kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return figures


def read_outputs(
    directory: Path, processes: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The scraper's records and each worker's figures (a worker killed leaves none)."""
    records = [json.loads(line) for line in (directory / "scrapes.jsonl").read_text().splitlines()]
    workers = [
        json.loads((directory / f"w{w}.out").read_text())
        for w in range(processes)
        if (directory / f"w{w}.out").exists()
    ]
    return records, workers


def window_figures(
    *,
    records: list[dict[str, Any]],
    t0: float,
    t1: float,
    before: dict[str, Any],
    after: dict[str, Any],
    tail: dict[str, Any],
    writes: list[float],
    reads: list[tuple[float, int]],
) -> dict[str, Any]:
    good = [r for r in records if "samples" in r]
    inside = [r for r in good if t0 <= r["t"] <= t1]
    first = max((r for r in good if r["t"] <= t0), key=lambda r: r["t"], default=inside[0])
    last = min((r for r in good if r["t"] >= t1), key=lambda r: r["t"], default=inside[-1])
    end = good[-1]  # after the tail: the feedback samples of the last churns are in
    window = t1 - t0
    lag = "flowproof_event_loop_lag_seconds"
    feedback = "flowproof_change_to_verdict_seconds"
    lag_p50, lag_n = bucket_quantile(first["samples"], last["samples"], lag, 0.5)
    lag_p95, _ = bucket_quantile(first["samples"], last["samples"], lag, 0.95)
    lag_p99, _ = bucket_quantile(first["samples"], last["samples"], lag, 0.99)
    fb_p50, fb_n = bucket_quantile(first["samples"], end["samples"], feedback, 0.5)
    fb_p95, _ = bucket_quantile(first["samples"], end["samples"], feedback, 0.95)
    scrapes = [r["scrape_seconds"] for r in inside]
    applied, missing = write_to_applied(writes, reads, records)
    s0: dict[str, float] = first["samples"]
    s1: dict[str, float] = last["samples"]

    def rate(name: str) -> float:
        return round((s1.get(name, 0.0) - s0.get(name, 0.0)) / window, 1)

    return {
        "results_per_second": round(
            (after["delivered_total"] - before["delivered_total"]) / window
        ),
        "issued_per_second": round((after["issued_total"] - before["issued_total"]) / window),
        "lost_per_second": round((after["lost_total"] - before["lost_total"]) / window, 1),
        "rate_limited_per_second": rate("flowproof_assignments_rate_limited_total"),
        "refused_in_window": sum(after["results_refused"].values())
        - sum(before["results_refused"].values()),
        "in_flight_end": after["in_flight"],
        "pending_end": after["pending"],
        "pending_start": before["pending"],
        "generations_in_window": after["generation"] - before["generation"],
        "generations_after_tail": tail["generation"] - before["generation"],
        "snapshots_read_in_window": sum(1 for at, _ in reads if t0 <= at <= t1),
        "feedback_p50_seconds": _round(fb_p50),
        "feedback_p95_seconds": _round(fb_p95),
        "feedback_samples": fb_n,
        "feedback_largest_bucket": largest_bucket(first["samples"], end["samples"], feedback),
        "write_to_plan_p50_seconds": _round(statistics.median(applied)) if applied else None,
        "write_to_plan_p95_seconds": _round(percentile(applied, 0.95)) if applied else None,
        "write_to_plan_missing": missing,
        "scrapes": len(scrapes),
        "scrape_median_ms": round(1000 * statistics.median(scrapes), 1) if scrapes else None,
        "scrape_max_ms": round(1000 * max(scrapes), 1) if scrapes else None,
        "scrape_mib": round(inside[-1]["bytes"] / 2**20, 1) if inside else None,
        "scrape_errors": sum(1 for r in records if "error" in r),
        "loop_lag_p50_ms": _ms(lag_p50),
        "loop_lag_p95_ms": _ms(lag_p95),
        "loop_lag_p99_ms": _ms(lag_p99),
        "loop_lag_largest_bucket": largest_bucket(s0, s1, lag),
        "loop_lag_samples": lag_n,
        "loop_lag_samples_expected": round(window / 0.05),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 1)


# --- entry ----------------------------------------------------------------------------------------

COLUMNS = (
    ("agents", "agents"),
    ("concrete_flows", "concrete flows"),
    ("declared_flows", "declared"),
    ("agents_connected_end", "connected"),
    ("first_plan_seconds", "first plan s"),
    ("results_per_second", "results/s"),
    ("issued_per_second", "issued/s"),
    ("lost_per_second", "lost/s"),
    ("collector_cpu_cores", "collector cores"),
    ("workers_cpu_cores", "agents' cores"),
    ("collector_rss_mib_max", "RSS MiB"),
    ("feedback_p50_seconds", "feedback p50 s"),
    ("feedback_p95_seconds", "feedback p95 s"),
    ("feedback_samples", "feedback n"),
    ("write_to_plan_p95_seconds", "write->plan p95 s"),
    ("scrape_median_ms", "scrape med ms"),
    ("scrape_max_ms", "scrape max ms"),
    ("loop_lag_p95_ms", "lag p95 ms"),
    ("loop_lag_p99_ms", "lag p99 ms"),
    ("loop_lag_largest_bucket", "lag max bucket s"),
)


def table(steps: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |"]
    lines.append("|" + "---:|" * len(COLUMNS))
    for step in steps:
        lines.append("| " + " | ".join(str(step.get(key, "")) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def parse_ladder(text: str) -> list[tuple[int, int]]:
    steps = []
    for part in text.split(","):
        agents, _, flows = part.partition(":")
        steps.append((int(agents), int(flows)))
    return steps


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=1000, help="simulated agents (= nodes)")
    parser.add_argument("--flows", type=int, default=100_000, help="concrete flows, about")
    parser.add_argument("--ladder", default="", help="AGENTS:FLOWS,... steps, one after another")
    parser.add_argument("--processes", type=int, default=4, help="worker processes for agents")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window per step")
    parser.add_argument("--warmup-seconds", type=float, default=15.0)
    parser.add_argument("--tail-seconds", type=float, default=10.0)
    parser.add_argument("--churn-per-second", type=float, default=20.0)
    parser.add_argument("--delay-ms", type=float, default=5.0, help="simulated probe time")
    parser.add_argument("--scrape-seconds", type=float, default=0.5)
    parser.add_argument("--pods-per-node", type=int, default=4)
    parser.add_argument("--pods-per-namespace", type=int, default=100)
    parser.add_argument("--pods-per-shard", type=int, default=50)
    parser.add_argument("--max-pairs-per-flow", type=int, default=64)
    parser.add_argument("--stagger-seconds", type=float, default=0.01)
    parser.add_argument("--plan-limit-seconds", type=float, default=240.0)
    parser.add_argument("--connect-limit-seconds", type=float, default=90.0)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, scrapes)")
    parser.add_argument("--role", default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "worker":
        config = json.loads(args.config.read_text())
        ca = Path(config["ca_file"]).read_bytes()
        model = {k: bool(v) for k, v in json.loads(Path(config["model_file"]).read_text()).items()}
        found = asyncio.run(worker(config, ca, model))
        Path(config["out"]).write_text(json.dumps(found))
        return 0
    if args.role == "scraper":
        c = json.loads(args.config.read_text())
        scraper(c["base"], Path(c["out"]), Path(c["stop_file"]), c["deadline"], c["period"])
        return 0
    signal.signal(signal.SIGTERM, _interrupted)  # SIGTERM too cleans up what the step started
    steps = parse_ladder(args.ladder) if args.ladder else [(args.agents, args.flows)]
    done: list[dict[str, Any]] = []
    try:
        for agents, flows in steps:
            done.append(asyncio.run(run_step(args, agents, flows)))
            print(json.dumps(done[-1]), flush=True)
    finally:
        if args.json is not None and done:
            args.json.write_text(json.dumps(done, indent=2))
        if done:
            print(table(done))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
