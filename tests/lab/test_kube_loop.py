"""The collector on the Kubernetes inventory source plans and verifies flows in the lab exactly as
with the manifest source.

The shop lab runs with its own loop (a manifest-source collector reading the lab's cluster file);
its verify rows are kept. Then the lab's cluster objects (namespaces, pods with their uids, nodes
and IPs, policies, FlowExpectations) are loaded into the fake API server (tests/fakeapi, the real
list/watch wire protocol), a second collector runs in this process with `source="kubernetes"`
against it, and one agent process per lab node connects to it. Its verify rows must equal the
manifest-source collector's, all PASS; a policy changed through the API (and enforced by the
lab's kernel) must show as REQUIRED_BLOCKED. Everything listens on 127.0.0.1; the agents are
stopped by pid and the lab is taken down and checked for leftovers, also when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from labtools import assert_nothing_left, lab_unavailable, unique_name
from test_loop import BREAKS, DECLARED, LOOP, SHOP, post_verify, statuses, table, wait_for

from collector.loop import Collector
from collector.runtime import serve
from collector.settings import CollectorSettings
from lab.config import LabSettings, Names
from lab.lifecycle import Lab, read_manifests
from tests.fakeapi import FakeApiServer
from tests.fakeapi.builders import TOKEN as API_TOKEN
from tests.fakeapi.builders import kubeconfig_for
from tests.support.tls import write_tls

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
BREAK = BREAKS / "db-ingress-only-batch.yaml"
# The same cadence for both collectors as tests/lab/test_loop.py (probe timeout 1 s).
# Every truth of a row but its explanation text (in the lab, realities are deterministic too).
COMPARED = (
    "expectation",
    "flow",
    "source",
    "destination",
    "port",
    "protocol",
    "intent",
    "model",
    "reality",
    "observed",
    "status",
)
# The kinds the Kubernetes source lists and watches, in the order a cluster would hold them.
KINDS = ("Namespace", "Pod", "NetworkPolicy", "FlowExpectations")
START_SECONDS = 15.0


# --- the in-process collector and the agent processes ---------------------------------------------


@dataclass
class KubeLoop:
    """A collector (source kubernetes) in its own thread and event loop, and its agents."""

    url: str = ""
    token: str = ""
    collector: Collector | None = None
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)


def _agent_environment(token: str) -> dict[str, str]:
    """Ours without FLOWPROOF_* (flags say everything), the token, and the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWPROOF_")}
    env["FLOWPROOF_TOKEN"] = token
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stop_agent(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM by pid (a graceful stop), SIGKILL by pid if it does not go within 5 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@contextlib.contextmanager
def kube_loop(kubeconfig: str, nodes: list[str], logs: Path) -> Iterator[KubeLoop]:
    """Run the collector on the Kubernetes source and one agent per node until the block ends."""
    token = secrets.token_urlsafe(24)
    tls = write_tls(logs / "tls")
    settings = CollectorSettings(
        source="kubernetes",
        kubeconfig=kubeconfig,
        listen_address="127.0.0.1",
        grpc_port=0,
        http_port=0,
        token=token,
        tls_cert_file=str(tls.cert),
        tls_key_file=str(tls.key),
        planner=LOOP.planner,
        status_interval_seconds=1.0,
        shutdown_grace_seconds=2.0,
    )
    settings.validate()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready = threading.Event()
    outcome: list[BaseException | int] = []
    running = KubeLoop(token=token)
    grpc_port = [0]

    def started(collector: Collector, grpc: int, http: int) -> None:
        running.collector, running.url, grpc_port[0] = collector, f"http://127.0.0.1:{http}", grpc
        ready.set()

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            outcome.append(loop.run_until_complete(serve(settings, stop, started=started)))
        except BaseException as exc:  # the test reports it
            outcome.append(exc)
        finally:
            ready.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    thread = threading.Thread(target=main, name="kube-collector", daemon=True)
    thread.start()
    try:
        assert ready.wait(START_SECONDS), "the kube-source collector did not start"
        assert running.collector is not None, f"the kube-source collector failed: {outcome}"
        env = _agent_environment(token)
        for node in nodes:
            log = (logs / f"agent-{node}.log").open("wb")
            with log:
                running.agents[node] = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "agent",
                        "--node-name",
                        node,
                        "--collector-address",
                        f"127.0.0.1:{grpc_port[0]}",
                        "--ca-file",
                        str(tls.ca),
                        "--listen-address",
                        "127.0.0.1",
                        "--health-port",
                        "0",
                        "--metrics-port",
                        "0",
                        "--reconnect-initial-seconds",
                        "0.2",
                        "--reconnect-max-seconds",
                        "2",
                    ],
                    cwd=REPO,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        wait_for(
            lambda: set(nodes) <= connected(running),
            START_SECONDS,
            lambda: (
                f"agents on {nodes} to connect (have {sorted(connected(running))}); logs in {logs}"
            ),
        )
        yield running
    finally:
        for process in running.agents.values():
            _stop_agent(process)
        if not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(stop.set)
        thread.join(START_SECONDS)
    # Reached only when the block succeeded (a failure in it is not hidden by these).
    assert not thread.is_alive(), "the kube-source collector did not stop"
    assert all(p.poll() is not None for p in running.agents.values())
    assert outcome == [0], f"the kube-source collector ended with {outcome}"


def connected(running: KubeLoop) -> set[str]:
    data = get_json(f"{running.url}/api/v1/debug/loop")
    return {str(a["node"]) for a in data.get("agents", [])}


# --- helpers --------------------------------------------------------------------------------------


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        data: dict[str, Any] = json.loads(response.read())
    return data


def rows_of(answer: dict[str, Any]) -> list[tuple[Any, ...]]:
    return sorted(tuple(r[k] for k in COMPARED) for r in answer["rows"])


def cluster_objects(lab: Lab) -> list[dict[str, Any]]:
    """The lab's cluster as the API server would hold it, from the lab's cluster file."""
    docs = [d for d in yaml.safe_load_all(lab.paths.cluster_file.read_text()) if d]
    objects = []
    for kind in KINDS:
        for doc in docs:
            if doc["kind"] != kind:
                continue
            if kind == "Pod":
                doc.setdefault("status", {})["phase"] = "Running"
            objects.append(doc)
    assert {d["kind"] for d in docs} <= set(KINDS), "the cluster file holds a kind we do not load"
    return objects


# --- the lab --------------------------------------------------------------------------------------


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[Lab]:
    reason = lab_unavailable()
    if reason is not None:
        pytest.skip(reason)
    lab = Lab(unique_name(), tmp_path / "state")
    try:
        lab.up(read_manifests([SHOP]), LabSettings(owner_pid=os.getpid()), LOOP)
        yield lab
    finally:
        state = lab.paths.load() if lab.exists() else None
        if lab.exists():
            lab.down()
        assert_nothing_left(lab.name, state)


# --- the test -------------------------------------------------------------------------------------


def test_the_kube_source_collector_verifies_the_lab_as_the_manifest_source_does(
    shop: Lab, tmp_path: Path
) -> None:
    state = shop.state()
    assert state.loop is not None
    manifest_answer = post_verify(shop)
    assert manifest_answer["decided"], manifest_answer["reasons"]
    assert statuses(manifest_answer) == {f: {"PASS"} for f in DECLARED}, table(manifest_answer)
    expected = rows_of(manifest_answer)
    # One agent per node, as a DaemonSet runs: the lab's own loop steps aside.
    shop.loop_stop("all")

    nodes = [Names.node_name(n) for n in range(1, state.settings.nodes + 1)]
    with FakeApiServer(token=API_TOKEN) as api:
        for obj in cluster_objects(shop):
            api.create(obj)
        lab_pods = {p.key: p.uid for p in state.pods}
        served = {
            f"{o['metadata']['namespace']}/{o['metadata']['name']}": o["metadata"]["uid"]
            for o in api.objects("Pod")
        }
        assert served == lab_pods, "the API serves the lab's pods with their uids"
        kubeconfig = kubeconfig_for(tmp_path / "kubeconfig", api.url)
        with kube_loop(kubeconfig, nodes, tmp_path) as kube:
            answer = post_verify(kube.url, token=kube.token)
            assert answer["decided"], answer["reasons"]
            assert rows_of(answer) == expected, (
                "kube source:\n" + table(answer) + "\nmanifest source:\n" + table(manifest_answer)
            )
            assert {r["status"] for r in answer["rows"]} == {"PASS"}, table(answer)
            assert api.requests_for("Pod", watch=True), "the collector watches the API"

            # A live change: the kernel enforces it, the API reports it.
            (breaking,) = yaml.safe_load_all(BREAK.read_text())
            shop.apply(read_manifests([BREAK]))
            api.update(breaking)
            (wanted,) = read_manifests([BREAK]).policies
            collector = kube.collector
            assert collector is not None

            def seen() -> bool:
                snapshot = collector.snapshot
                return snapshot is not None and any(
                    p.key == "shop/db-ingress" and p.ingress == wanted.ingress
                    for p in snapshot.policies
                )

            wait_for(seen, 10, "the collector to see the new db-ingress through the watch")
            broken = post_verify(kube.url, token=kube.token)
            assert broken["decided"], broken["reasons"]
            want = {f: {"PASS"} for f in DECLARED} | {"api-to-db": {"REQUIRED_BLOCKED"}}
            assert statuses(broken) == want, table(broken)
        assert api.requests_for("NetworkPolicy", watch=True)
