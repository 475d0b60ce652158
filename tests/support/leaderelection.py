"""Collector processes competing for a Lease on a real kube-apiserver, and agents for them.

Shared by tests/controlplane/test_api_leader_election.py and bench/failover_bench.py:
`setup_plane` installs what a collector needs (the CRD, deploy/overlays/plain's RBAC with the
lease Role, a `shop` with two pods on two nodes, a policy and a FlowExpectations);
`start_collector` runs `python -m collector --source kubernetes --leader-election` as the
Deployment does, on loopback ports it reports; `agents` runs real agent links (the agent's own
stream code) whose pods are never found on this host (an empty proc root), so each assignment
comes back as a real result and no packet is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from agent.netns import NetnsSockets
from agent.runtime import collector_link
from agent.settings import AgentSettings
from agent.streaming import CollectorLink
from collector.ledger import LEDGER_FILE
from flowproof.probes import ProbeResult
from lab.controlplane import ControlPlane
from tests.support.apiobjects import make_expectations, make_pod, make_policy
from tests.support.kubetools import apply, apply_all, create_pod, install_crd, namespace, ok, render
from tests.support.tls import TLSFiles, write_tls

COLLECTOR_KINDS = ("Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                   "RoleBinding")  # fmt: skip

TOKEN = "leader-election-agents-token-7c1d"
LEASE_NAMESPACE, LEASE_NAME = "flowproof", "flowproof-collector"
DURATION, DEADLINE, RETRY = 3.0, 2.0, 0.5
"""The tests' lease timings (the Deployment's are 15, 10 and 2 s)."""
SERVING = re.compile(r"collector serving: grpc (\d+), http (\d+)")


@dataclass
class Plane:
    cp: ControlPlane
    kubeconfig: str
    tls: TLSFiles


@dataclass
class CollectorProcess:
    identity: str
    process: subprocess.Popen[bytes]
    log: Path
    state_dir: Path
    grpc_port: int = 0
    http_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def delivered(self) -> set[str]:
        """The result ids its delivery ledger holds (what it counted)."""
        found = set()
        for line in (self.state_dir / LEDGER_FILE).read_text().splitlines():
            entry = json.loads(line)
            if entry[0] == "result" and entry[1]:
                found.add(entry[1])
        return found


def setup_plane(cp: ControlPlane, tmp: Path) -> Plane:
    install_crd(cp)
    apply_all(cp, [d for d in render("overlays/plain") if d["kind"] in COLLECTOR_KINDS])
    token = cp.service_account_token("flowproof", "flowproof-collector", create=False)
    kubeconfig = cp.write_kubeconfig(tmp / "kubeconfig", token, "flowproof-collector")
    namespace(cp, "shop")
    create_pod(cp, make_pod("web", ip="10.244.1.10", node="node-a"))
    create_pod(cp, make_pod("api", ip="10.244.2.10", node="node-b"))
    ok(apply(cp, make_policy("api-from-web")), "policy")
    ok(apply(cp, make_expectations("shop")), "expectations")
    return Plane(cp, str(kubeconfig), write_tls(tmp / "tls"))


def start_collector(
    plane: Plane,
    tmp: Path,
    identity: str,
    timing: tuple[float, float, float] = (DURATION, DEADLINE, RETRY),
) -> CollectorProcess:
    """A collector process (killed by the caller: see `collectors`), once it serves."""
    duration, deadline, retry = timing
    log = tmp / f"collector-{identity}.log"
    state = tmp / f"state-{identity}"
    argv = [
        sys.executable, "-m", "collector",
        "--source", "kubernetes", "--kubeconfig", plane.kubeconfig,
        "--listen-address", "127.0.0.1", "--grpc-port", "0", "--http-port", "0",
        "--tls-cert-file", str(plane.tls.cert), "--tls-key-file", str(plane.tls.key),
        "--state-dir", str(state), "--status-interval-seconds", "0",
        "--interval-seconds", "0.5", "--freshness-seconds", "5", "--settle-seconds", "0",
        "--leader-election=true", "--leader-election-namespace", LEASE_NAMESPACE,
        "--leader-election-identity", identity, "--lease-name", LEASE_NAME,
        "--lease-duration-seconds", f"{duration:g}",
        "--lease-renew-deadline-seconds", f"{deadline:g}",
        "--lease-retry-period-seconds", f"{retry:g}",
    ]  # fmt: skip
    env = {**os.environ, "FLOWPROOF_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    started = CollectorProcess(identity, process, log, state)
    until = time.monotonic() + 60
    while not (found := SERVING.search(log.read_text(errors="replace"))):
        assert process.poll() is None, f"collector {identity} exited:\n{log.read_text()}"
        assert time.monotonic() < until, f"collector {identity} not serving:\n{log.read_text()}"
        time.sleep(0.05)
    started.grpc_port, started.http_port = int(found.group(1)), int(found.group(2))
    return started


@contextlib.contextmanager
def collectors() -> Iterator[list[CollectorProcess]]:
    """Started ones are appended by the caller; each is killed (by its pid) at the end."""
    started: list[CollectorProcess] = []
    try:
        yield started
    finally:
        for c in started:
            if c.process.poll() is None:
                c.process.kill()
            c.process.wait(10)


def holder(plane: Plane) -> tuple[str, int]:
    lease = ok(
        plane.cp.request(
            "GET",
            f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{LEASE_NAME}",
        ),
        "lease",
    )
    spec = lease.get("spec", {})
    return spec.get("holderIdentity", ""), spec.get("leaseTransitions", 0)


async def until_holder(plane: Plane, wanted: str, within: float) -> float:
    start = time.monotonic()
    while True:
        found = await asyncio.to_thread(holder_or_none, plane)
        if found == wanted:
            return time.monotonic() - start
        assert time.monotonic() - start < within, f"lease held by {found!r}, not {wanted!r}"
        await asyncio.sleep(0.05)


def holder_or_none(plane: Plane) -> str | None:
    answer = plane.cp.request(
        "GET", f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{LEASE_NAME}"
    )
    if answer.status == 404:
        return None
    return str(ok(answer, "lease").get("spec", {}).get("holderIdentity", ""))


@dataclass
class Agents:
    links: list[CollectorLink] = field(default_factory=list)
    produced: list[str] = field(default_factory=list)
    """Every result id the agents produced, in order."""


@contextlib.asynccontextmanager
async def agents(
    plane: Plane, tmp: Path, addresses: list[str], nodes: tuple[str, ...] = ("node-a", "node-b")
) -> AsyncIterator[Agents]:
    """Real agent links (the agent's own stream code) that record each result they produce."""
    found = Agents()
    stop = asyncio.Event()
    tasks = []
    sockets = NetnsSockets()
    ca = plane.tls.ca.read_bytes()

    def observe(result: ProbeResult) -> None:
        found.produced.append(result.id)

    for node in nodes:
        settings = AgentSettings(
            node_name=node,
            collector_address=",".join(addresses),
            token=TOKEN,
            ca_file=str(plane.tls.ca),
            reconnect_initial_seconds=0.05,
            reconnect_max_seconds=0.5,
            hello_timeout_seconds=2.0,
            shutdown_grace_seconds=3.0,
            proc_root=str(tmp),  # no pod is found here: a result for each, no packet sent
            health_port=0,
            metrics_port=0,
            max_in_flight=64,
        )
        link = collector_link(
            settings, sockets=sockets, sctp=False, ca_certificates=ca, observe=observe
        )
        found.links.append(link)
        tasks.append(asyncio.create_task(link.run(stop), name=f"agent {node}"))
    try:
        yield found
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
        sockets.close()


def delivered_total(c: CollectorProcess) -> float:
    return sum(v for (name, _), v in c.metrics().items() if name == "flowproof_probes_total")


async def until_delivered(c: CollectorProcess, at_least: float, within: float = 30.0) -> None:
    start = time.monotonic()
    while await asyncio.to_thread(delivered_total, c) < at_least:
        assert time.monotonic() - start < within, f"{c.identity} counted too few results"
        await asyncio.sleep(0.1)


def refused(c: CollectorProcess) -> dict[str, float]:
    return {
        dict(labels)["reason"]: value
        for (name, labels), value in c.metrics().items()
        if name == "flowproof_results_refused_total"
    }
