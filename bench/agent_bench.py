"""One agent's probe throughput and memory, against the process-per-probe baseline, in one run.

Builds two pod namespaces on 10.250.X.0/25 (blackholed in the root namespace), a source pod in a
kubelet-style cgroup and a TCP server in the destination pod; nftables there drops port 8082. Then,
side by side:

- baseline: one process per probe, `ip netns exec SRC bash -c 'exec 3<>/dev/tcp/IP/PORT'`, the way
  exec-based tools probe (sequential and 8 in parallel; the better rate is the baseline);
- the agent: a real `python -m agent` process fed by a real dispatcher over gRPC, allowed flows
  (CONNECTED) and denied flows (dropped: TIMEOUT after the deny timeout);
- the agent's RSS with 1,000 assignments in flight.

Run as root: `python bench/agent_bench.py [--allowed N] [--denied N]`. Every loop is bounded in count
and time; everything created is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tabulate import tabulate  # noqa: E402

from bench.collector_process import cpu_seconds, rss_mib  # noqa: E402
from collector.dispatching import Dispatcher, ServerTLS  # noqa: E402
from flowproof.probes import (  # noqa: E402
    Assignment,
    DestinationPolicy,
    Outcome,
    PodRef,
    ProbeKind,
    ProbeResult,
)
from lab.certs import issue  # noqa: E402

CGROUP2 = "/sys/fs/cgroup/unified"
PARENTS = ("kubepods.slice", "kubepods-besteffort.slice")
ALLOWED_PORT, DENIED_PORT = 8080, 8082
TOKEN = uuid.uuid4().hex

SERVER = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(4096)
while True:
    c, _ = s.accept()
    c.close()
"""


def sh(*cmd: str, stdin: str | None = None) -> str:
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Bed:
    src_ns: str
    dst_ns: str
    src_uid: str
    src_ip: str
    dst_ip: str


@contextlib.contextmanager
def bed() -> Iterator[Bed]:
    prefix = f"fpb{os.getpid() % 1000:03d}{uuid.uuid4().hex[:3]}"
    src_ns, dst_ns = f"{prefix}s", f"{prefix}d"
    uid = str(uuid.uuid4())
    subnet = ""
    namespaces: list[str] = []
    procs: list[subprocess.Popen[bytes]] = []
    scope = os.path.join(
        CGROUP2, *PARENTS, f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice",
        f"cri-containerd-{uuid.uuid4().hex}{uuid.uuid4().hex}.scope",
    )  # fmt: skip
    try:
        for _ in range(50):
            candidate = f"10.250.{random.randint(1, 254)}"
            with contextlib.suppress(RuntimeError):
                sh("ip", "route", "add", "blackhole", f"{candidate}.0/24")
                subnet = candidate
                break
        if not subnet:
            raise RuntimeError("no free 10.250.X.0/24")
        for ns in (src_ns, dst_ns):
            sh("ip", "netns", "add", ns)
            namespaces.append(ns)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", f"{prefix}a", "netns", src_ns, "type", "veth",
           "peer", "name", f"{prefix}b", "netns", dst_ns)  # fmt: skip
        for ns, dev, ip in ((src_ns, f"{prefix}a", f"{subnet}.1"),
                            (dst_ns, f"{prefix}b", f"{subnet}.2")):  # fmt: skip
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/25", "dev", dev)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
        # Many short connections from one pod: a wide port range and TIME_WAIT reuse, in the
        # source namespace only.
        sh("ip", "netns", "exec", src_ns, "sysctl", "-q", "-w",
           "net.ipv4.ip_local_port_range=1024 65000", "net.ipv4.tcp_tw_reuse=1")  # fmt: skip
        rules = (
            "table inet fpbench {\n chain input {\n  type filter hook input priority 0;\n"
            f"  tcp dport {DENIED_PORT} drop\n }}\n}}\n"
        )
        sh("ip", "netns", "exec", dst_ns, "nft", "-f", "-", stdin=rules)
        procs.append(
            subprocess.Popen(["ip", "netns", "exec", dst_ns, sys.executable, "-c", SERVER])
        )
        pause = subprocess.Popen(["ip", "netns", "exec", src_ns, "sleep", "3600"])
        procs.append(pause)
        want = os.stat(f"/run/netns/{src_ns}").st_ino
        deadline = time.monotonic() + 10
        while os.stat(f"/proc/{pause.pid}/ns/net").st_ino != want:
            if time.monotonic() > deadline:
                raise RuntimeError("the pod process never entered its namespace")
            time.sleep(0.005)
        os.makedirs(scope)
        Path(scope, "cgroup.procs").write_text(str(pause.pid))
        time.sleep(0.3)  # the server binds
        yield Bed(src_ns, dst_ns, uid, f"{subnet}.1", f"{subnet}.2")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for path in (scope, os.path.dirname(scope), os.path.join(CGROUP2, *PARENTS),
                     os.path.join(CGROUP2, PARENTS[0])):  # fmt: skip
            for _ in range(50):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
        for ns in namespaces:
            with contextlib.suppress(RuntimeError):
                sh("ip", "netns", "del", ns)
        if subnet:
            with contextlib.suppress(RuntimeError):
                sh("ip", "route", "del", "blackhole", f"{subnet}.0/24")


# --- baseline: a process per probe ----------------------------------------------------------------


def baseline(
    b: Bed, port: int, count: int, parallel: int, timeout_seconds: float
) -> tuple[float, float]:
    """Probes per second and CPU seconds per probe with one `ip netns exec ... bash /dev/tcp`
    process per probe."""
    cpu0 = _children_cpu()
    cmd = ["timeout", str(timeout_seconds), "ip", "netns", "exec", b.src_ns, "bash", "-c",
           f"exec 3<>/dev/tcp/{b.dst_ip}/{port}"]  # fmt: skip
    started = time.monotonic()
    running: list[subprocess.Popen[bytes]] = []
    launched = 0
    while launched < count or running:
        while launched < count and len(running) < parallel:
            running.append(subprocess.Popen(cmd, stderr=subprocess.DEVNULL))
            launched += 1
        running[0].wait(timeout=timeout_seconds + 10)
        running = [p for p in running if p.poll() is None]
    return count / (time.monotonic() - started), (_children_cpu() - cpu0) / count


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- the agent ------------------------------------------------------------------------------------


@dataclass
class AgentFigures:
    allowed_rate: float
    allowed_outcomes: dict[str, int]
    allowed_cpu_per_probe: float
    denied_rate: float
    denied_bound: float
    denied_outcomes: dict[str, int]
    rss_idle_mib: float
    rss_in_flight_mib: float
    peak_rss_mib: float


async def run_agent_part(b: Bed, allowed: int, denied: int, concurrency: int) -> AgentFigures:
    results: list[ProbeResult] = []
    arrived = asyncio.Event()
    want = [0]

    def on_result(r: ProbeResult) -> None:
        results.append(r)
        if len(results) >= want[0]:
            arrived.set()

    issued = issue(["127.0.0.1"])
    tls = ServerTLS(certificate_chain=issued.certificate, private_key=issued.key)
    dispatcher = Dispatcher(token=TOKEN, tls=tls, on_result=on_result, batch_size=512)
    dispatcher.set_destination_policy(DestinationPolicy(networks=(f"{b.dst_ip}/32",)))
    port = await dispatcher.start("127.0.0.1:0")
    ca_file = Path(tempfile.mkdtemp(prefix="fp-bench-")) / "ca.crt"
    ca_file.write_bytes(issued.ca)
    profile = os.environ.get("FP_BENCH_PROFILE")  # a file: profile the agent with cProfile
    wrap = ["-m", "cProfile", "-o", profile] if profile else []
    agent = await asyncio.create_subprocess_exec(
        sys.executable, *wrap, "-m", "agent",
        "--node-name", "bench-node", "--collector-address", f"127.0.0.1:{port}",
        "--ca-file", str(ca_file),
        "--max-concurrency", str(concurrency), "--max-in-flight", "2000",
        "--destination-rate-per-second", "1000000", "--destination-burst", "1000000",
        "--log-level", "WARNING",
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "FLOWPROOF_TOKEN": TOKEN},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not dispatcher.agents():
            if time.monotonic() > deadline or agent.returncode is not None:
                raise RuntimeError("the agent did not connect")
            await asyncio.sleep(0.05)
        rss_idle, _ = rss_mib(agent.pid)

        async def run(
            count: int, port: int, timeout_seconds: float
        ) -> tuple[float, dict[str, int], float]:
            results.clear()
            arrived.clear()
            want[0] = count
            batch = [
                Assignment(
                    id=uuid.uuid4().hex, source=PodRef(uid=b.src_uid, namespace="bench", name="src"),
                    source_node="bench-node", destination_ip=b.dst_ip, port=port, protocol="TCP",
                    kind=ProbeKind.TCP, timeout_seconds=timeout_seconds,
                )
                for _ in range(count)
            ]  # fmt: skip
            started = time.monotonic()
            cpu0 = (cpu_seconds(agent.pid), time.process_time())  # agent, collector
            dispatcher.submit(batch)
            await asyncio.wait_for(arrived.wait(), timeout=120)
            elapsed = time.monotonic() - started
            agent_cpu = cpu_seconds(agent.pid) - cpu0[0]
            outcomes: dict[str, int] = {}
            for r in results:
                outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
            return count / elapsed, outcomes, agent_cpu / count

        await run(500, ALLOWED_PORT, 2.0)  # warm up: imports, first scan of /proc
        allowed_rate, allowed_outcomes, allowed_cpu = await run(allowed, ALLOWED_PORT, 2.0)
        denied_rate, denied_outcomes, _ = await run(denied, DENIED_PORT, 1.0)

        # Memory: 1,000 assignments in flight at once, all waiting on dropped packets.
        results.clear()
        arrived.clear()
        want[0] = 1000
        dispatcher.submit(
            Assignment(
                id=uuid.uuid4().hex, source=PodRef(uid=b.src_uid), source_node="bench-node",
                destination_ip=b.dst_ip, port=DENIED_PORT, protocol="TCP", kind=ProbeKind.TCP,
                timeout_seconds=10.0,
            )
            for _ in range(1000)
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while dispatcher.agents()[0].assignments_in_flight < 1000:
            if time.monotonic() > deadline:
                raise RuntimeError("1,000 assignments never got in flight")
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)  # every probe has its socket and is waiting
        rss_busy, _ = rss_mib(agent.pid)
        await asyncio.wait_for(arrived.wait(), timeout=60)
        _, peak = rss_mib(agent.pid)
        return AgentFigures(
            allowed_rate, allowed_outcomes, allowed_cpu, denied_rate, concurrency / 1.0,
            denied_outcomes, rss_idle, rss_busy, peak,
        )  # fmt: skip
    finally:
        if agent.returncode is None:
            agent.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(agent.wait(), 20)
            except TimeoutError:
                agent.kill()
                await agent.wait()
        await dispatcher.stop(grace_seconds=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allowed", type=int, default=20_000, help="allowed probes (agent)")
    parser.add_argument("--denied", type=int, default=3_000, help="denied probes (agent)")
    parser.add_argument("--baseline", type=int, default=300, help="allowed probes (baseline)")
    parser.add_argument("--concurrency", type=int, default=1000, help="agent max_concurrency")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("nft") is None or not os.path.isdir(CGROUP2):
        print("agent_bench: needs root, nftables and cgroup v2 at " + CGROUP2, file=sys.stderr)
        return 2
    with bed() as b:
        base_seq, cpu_seq = baseline(b, ALLOWED_PORT, args.baseline, 1, 5)
        base_par, cpu_par = baseline(b, ALLOWED_PORT, args.baseline, 8, 5)
        base_denied, _ = baseline(b, DENIED_PORT, 16, 8, 1)
        figures = asyncio.run(run_agent_part(b, args.allowed, args.denied, args.concurrency))
    base = max(base_seq, base_par)
    base_cpu = min(cpu_seq, cpu_par)
    rows = [
        ["baseline, allowed: process per probe, sequential", f"{base_seq:,.0f}/s",
         f"{cpu_seq * 1e3:.1f} ms CPU per probe"],
        ["baseline, allowed: process per probe, 8 parallel", f"{base_par:,.0f}/s",
         f"{cpu_par * 1e3:.1f} ms CPU per probe"],
        ["baseline, denied (1 s timeout), 8 parallel", f"{base_denied:,.1f}/s", ""],
        [f"agent, allowed ({args.allowed:,} probes)", f"{figures.allowed_rate:,.0f}/s",
         f"{figures.allowed_rate / base:,.0f}x the baseline's rate (goal >= 50x)"],
        ["agent, allowed: CPU per probe", f"{figures.allowed_cpu_per_probe * 1e6:.0f} us",
         f"{base_cpu / figures.allowed_cpu_per_probe:,.0f}x less than the baseline; "
         f"{1 / figures.allowed_cpu_per_probe:,.0f}/s per core"],
        [f"agent, denied ({args.denied:,} probes, 1 s timeout)", f"{figures.denied_rate:,.0f}/s",
         f"bound concurrency/timeout = {figures.denied_bound:,.0f}/s"],
        ["agent RSS, connected and idle", f"{figures.rss_idle_mib:.1f} MiB", ""],
        ["agent RSS, 1,000 assignments in flight", f"{figures.rss_in_flight_mib:.1f} MiB",
         f"peak {figures.peak_rss_mib:.1f} MiB (goal < 100 MB)"],
    ]  # fmt: skip
    outcomes = {**figures.allowed_outcomes, **figures.denied_outcomes}
    print(f"outcomes: {', '.join(f'{k}: {v:,}' for k, v in outcomes.items())}")
    print(f"CPUs: {os.cpu_count()}, load average at the end: {os.getloadavg()[0]:.2f}")
    print(tabulate(rows, headers=["measure", "value", "note"]))
    goals = {
        "allowed >= 50x the baseline's rate": figures.allowed_rate >= 50 * base,
        "RSS with 1,000 in flight < 100 MB": figures.peak_rss_mib * 1.048576 < 100,
    }
    for goal, met in goals.items():
        print(f"goal {goal}: {'met' if met else 'NOT met'}")
    # Speed depends on the machine (and its neighbours); the exit code only says whether every
    # probe found what it should have.
    correct = figures.allowed_outcomes == {Outcome.CONNECTED: args.allowed} and (
        figures.denied_outcomes == {Outcome.TIMEOUT: args.denied}
    )
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
