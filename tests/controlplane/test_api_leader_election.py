"""Two collector processes and one Lease on a real kube-apiserver: one leads, the other stands by.

Both are `python -m collector --source kubernetes --leader-election`, as the Deployment runs
them, authenticated as the collector's ServiceAccount with the RBAC that deploy/overlays/plain
renders (the lease Role included), on short lease timings (3 s, renew deadline 2 s, retry
0.5 s). Real agents (the agent's own `CollectorLink`, in this process) are given both
collectors' addresses, the standby's first. Their pods are never found on this host (an empty
proc root): every assignment comes back as a real result without a packet sent.

The leader is killed (SIGKILL: no release). The standby must take the Lease within the lease
duration and a retry period, and then every result an agent produced must be counted by exactly
one collector (the delivery ledgers in their state directories, compared id by id with what the
agents produced), or refused by the new leader as not issued by it: none lost silently, none
counted twice. A graceful stop (SIGTERM) releases the Lease for the next one at once.
A control plane of its own: the Lease and the collectors' writes stay here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.netns import NetnsSockets
from agent.probing import Prober
from agent.resolving import PodResolver
from agent.responders import Responders
from agent.settings import AgentSettings
from agent.streaming import CollectorLink
from collector.ledger import LEDGER_FILE
from flowproof.probes import AgentCapabilities, ProbeKind, ProbeResult
from lab.controlplane import ControlPlane
from tests.controlplane.conftest import COLLECTOR_KINDS
from tests.support.apiobjects import make_expectations, make_pod, make_policy
from tests.support.kubetools import apply, apply_all, create_pod, install_crd, namespace, ok, render
from tests.support.tls import TLSFiles, write_tls

TOKEN = "leader-election-agents-token-7c1d"
LEASE_NAMESPACE, LEASE_NAME = "flowproof", "flowproof-collector"
DURATION, DEADLINE, RETRY = 3.0, 2.0, 0.5
SERVING = re.compile(r"collector serving: grpc (\d+), http (\d+)")


@dataclass
class Plane:
    cp: ControlPlane
    kubeconfig: str
    tls: TLSFiles


@pytest.fixture(scope="module")
def plane(controlplane_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    with ControlPlane(controlplane_bin) as cp:
        install_crd(cp)
        kinds = (*COLLECTOR_KINDS, "Role", "RoleBinding")
        apply_all(cp, [d for d in render("overlays/plain") if d["kind"] in kinds])
        token = cp.service_account_token("flowproof", "flowproof-collector", create=False)
        tmp = tmp_path_factory.mktemp("leading")
        kubeconfig = cp.write_kubeconfig(tmp / "kubeconfig", token, "flowproof-collector")
        namespace(cp, "shop")
        create_pod(cp, make_pod("web", ip="10.244.1.10", node="node-a"))
        create_pod(cp, make_pod("api", ip="10.244.2.10", node="node-b"))
        ok(apply(cp, make_policy("api-from-web")), "policy")
        ok(apply(cp, make_expectations("shop")), "expectations")
        yield Plane(cp, str(kubeconfig), write_tls(tmp / "tls"))


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


def start_collector(plane: Plane, tmp: Path, identity: str) -> CollectorProcess:
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
        "--lease-duration-seconds", f"{DURATION:g}",
        "--lease-renew-deadline-seconds", f"{DEADLINE:g}",
        "--lease-retry-period-seconds", f"{RETRY:g}",
    ]  # fmt: skip
    env = {**os.environ, "FLOWPROOF_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    started = CollectorProcess(identity, process, log, state)
    deadline = time.monotonic() + 60
    while not (found := SERVING.search(log.read_text(errors="replace"))):
        assert process.poll() is None, f"collector {identity} exited:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"collector {identity} not serving:\n{log.read_text()}"
        time.sleep(0.05)
    started.grpc_port, started.http_port = int(found.group(1)), int(found.group(2))
    return started


@contextlib.contextmanager
def collectors(plane: Plane, tmp: Path) -> Iterator[list[CollectorProcess]]:
    """Started ones are appended by the test; each is killed (by its pid) when the test ends."""
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
        found = await asyncio.to_thread(_holder_or_none, plane)
        if found == wanted:
            return time.monotonic() - start
        assert time.monotonic() - start < within, f"lease held by {found!r}, not {wanted!r}"
        await asyncio.sleep(0.05)


def _holder_or_none(plane: Plane) -> str | None:
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
        )
        resolver = PodResolver(settings.proc_root)
        link = CollectorLink(
            settings=settings,
            prober=Prober(
                node_name=node,
                resolver=resolver,
                sockets=sockets,
                max_concurrency=settings.max_concurrency,
                destination_rate_per_second=settings.destination_rate_per_second,
                destination_burst=settings.destination_burst,
                max_timeout_seconds=settings.max_probe_timeout_seconds,
                sctp_supported=False,
            ),
            responders=Responders(
                resolver=resolver,
                sockets=sockets,
                max_open=settings.max_responders,
                max_lifetime_seconds=settings.responder_max_lifetime_seconds,
                sctp_supported=False,
            ),
            capabilities=AgentCapabilities(
                sctp_supported=False,
                probe_kinds=(ProbeKind.TCP, ProbeKind.UDP, ProbeKind.HTTP, ProbeKind.DNS),
                responders_supported=True,
                max_in_flight=64,
            ),
            agent_version="test",
            ca_certificates=ca,
            observe=observe,
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


async def test_the_standby_takes_over_a_killed_leader_and_no_result_is_lost_or_counted_twice(
    plane: Plane, tmp_path: Path
) -> None:
    with collectors(plane, tmp_path) as started:
        a = start_collector(plane, tmp_path, "collector-a")
        started.append(a)
        await until_holder(plane, "collector-a", within=15)
        b = start_collector(plane, tmp_path, "collector-b")
        started.append(b)
        await asyncio.sleep(2 * RETRY)
        assert a.metrics()[("flowproof_collector_leader", ())] == 1
        assert b.metrics()[("flowproof_collector_leader", ())] == 0

        async with agents(plane, tmp_path, [b.address, a.address]) as run:
            await until_delivered(a, 20)
            assert b.metrics()[("flowproof_streams_refused_standby_total", ())] >= 2
            assert delivered_total(b) == 0, "a standby takes no results"
            assert _holder_or_none(plane) == "collector-a"

            a.process.send_signal(signal.SIGKILL)  # no release: the Lease must run out
            killed = time.monotonic()
            a.process.wait(10)
            await until_holder(plane, "collector-b", within=DURATION + 10)
            took = time.monotonic() - killed
            assert took <= DURATION + 2 * RETRY * 1.2 + 1.0, f"took over after {took:.1f} s"
            assert holder(plane) == ("collector-b", 1)

            before = delivered_total(b)
            await until_delivered(b, before + 20)
            assert b.metrics()[("flowproof_collector_leader", ())] == 1

        # The agents stopped: everything they produced was acked by someone, nothing dropped.
        assert all(len(link.outbox) == 0 for link in run.links)
        assert all(link.outbox.dropped_total == 0 for link in run.links)
        refusals = refused(b)
        b.process.send_signal(signal.SIGTERM)
        assert b.process.wait(20) == 0
        assert _holder_or_none(plane) == "", "a graceful stop releases the Lease"

        produced = run.produced
        assert len(produced) == len(set(produced)), "result ids are unique"
        by_a, by_b = a.delivered(), b.delivered()
        assert by_a and by_b
        assert not by_a & by_b, "a result counted by both collectors"
        assert by_a | by_b <= set(produced), "a collector counted a result nobody produced"
        uncounted = set(produced) - by_a - by_b
        not_issued = refusals.get("not issued by this collector", 0)
        # What neither counted was refused by b as a's (its seal is not b's): a's results still
        # unacked when it died. b may also refuse some a had counted (a's ack lost with it).
        assert len(uncounted) <= not_issued <= len(set(produced) - by_b)
        assert {r: v for r, v in refusals.items() if r != "not issued by this collector"} == {
            r: 0 for r in refusals if r != "not issued by this collector"
        }


async def test_a_gracefully_stopped_leader_hands_the_lease_over_within_a_retry_period(
    plane: Plane, tmp_path: Path
) -> None:
    with collectors(plane, tmp_path) as started:
        first = start_collector(plane, tmp_path, "collector-c")
        started.append(first)
        await until_holder(plane, "collector-c", within=DURATION + 10)
        second = start_collector(plane, tmp_path, "collector-d")
        started.append(second)
        await asyncio.sleep(2 * RETRY)
        assert _holder_or_none(plane) == "collector-c"
        first.process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert await asyncio.to_thread(first.process.wait, 20) == 0
        await until_holder(plane, "collector-d", within=DURATION + 10)
        took = time.monotonic() - stopped
        assert took < DURATION, f"{took:.1f} s: the release was not used"
        assert "released lease flowproof/flowproof-collector" in first.log.read_text()
