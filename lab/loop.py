"""The lab's loop: one collector and one agent per lab node, run by the lab's supervisor.

Owns the loop's settings, the per-lab random token (0600 in the state directory; the collector's
TLS certificate comes from the lab's throwaway CA, lab/certs.py), the free
loopback ports, the command lines of the collector (`--source manifests` on the lab's cluster
file, `--probe-pods lab`; with the lab's own API server `--source kubernetes` and probe pods
through the API) and of the agents (node name = the lab's node name, /proc), and the
wait until they are ready. Everything listens on 127.0.0.1 only. It never starts a process except
through the supervisor, and never stops one except by its recorded pid and start time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import random
import secrets
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from collector.core.settings import PlannerSettings
from flowproof.errors import ConfigurationError, InputError
from lab.errors import LabError
from lab.state import LoopRecord, ProcessRecord
from lab.system import is_running

LOOPBACK = "127.0.0.1"
COLLECTOR_ROLE = "collector"
AGENT_ROLE_PREFIX = "agent "


def agent_role(node_name: str) -> str:
    """The recorded role of the agent on `node_name` (`agent node-2`)."""
    return AGENT_ROLE_PREFIX + node_name


def is_loop_role(role: str) -> bool:
    return role == COLLECTOR_ROLE or role.startswith(AGENT_ROLE_PREFIX)


LAB_PLANNER = PlannerSettings(
    probe_timeout_seconds=0.5,
    interval_seconds=5.0,
    freshness_seconds=15.0,
    sweep_probes_per_second=5.0,
)
"""The loop as the lab runs it: a probe timeout short enough that a break shows within two
timeouts (probe and retry; round trips on one host take microseconds), a 5 s cadence."""


@dataclass(frozen=True)
class LoopSettings:
    """How the lab runs its collector and agents (`lab up` flags; stored in the lab's state)."""

    planner: PlannerSettings = LAB_PLANNER
    """How the lab's collector plans, schedules and judges probes (every field is passed on)."""
    ready_timeout_seconds: float = 30.0
    """How long `lab up` waits for the collector to serve and every agent to connect."""
    log_level: str = "INFO"
    """Log level of the collector and the agents (their logs: <state-dir>/<name>/logs/)."""

    @classmethod
    def with_planner(cls, **planner: Any) -> LoopSettings:
        """The lab's loop with some planner settings changed; InputError names a bad flag."""
        try:
            return cls(planner=dataclasses.replace(LAB_PLANNER, **planner)).validate()
        except ConfigurationError as exc:
            names = [n for n in planner if n in str(exc)] or list(planner)
            raise InputError(str(exc), field="--" + names[0].replace("_", "-")) from exc

    def validate(self) -> LoopSettings:
        """The settings, or InputError naming the flag that cannot work."""
        if not self.ready_timeout_seconds > 0:
            raise InputError("must be positive", field="--ready-timeout-seconds")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopSettings:
        planner_fields = {f.name for f in fields(PlannerSettings)}
        nested = data.get("planner")
        # A lab recorded before the settings were composed keeps its planner fields flat.
        source = nested if isinstance(nested, dict) else data
        planner = {k: v for k, v in source.items() if k in planner_fields}
        own = {f.name for f in fields(cls)} - {"planner"}
        return cls(
            planner=dataclasses.replace(LAB_PLANNER, **planner),
            **{k: v for k, v in data.items() if k in own},
        )


# --- files, ports, command lines ------------------------------------------------------------------


def write_token(path: Path) -> None:
    """A fresh random token in `path`, readable by root only (mode 0600 from the start)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on the loopback address right now.

    Drawn below the kernel's ephemeral range (32768 and up), where other processes' `bind(0)`
    and outgoing connections never land, so the ports are still free when the loop binds them
    a moment later (the lab keeps them across restarts of its collector).
    """
    rng = random.SystemRandom()
    ports: list[int] = []
    for _ in range(2000):
        if len(ports) == count:
            return ports
        candidate = rng.randrange(20000, 32000)
        if candidate in ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, candidate))
            except OSError:
                continue
        ports.append(candidate)
    raise LabError(f"no {count} free loopback ports between 20000 and 32000")


def child_environment() -> dict[str, str]:
    """The loop processes' environment: ours without FLOWPROOF_* (flags say everything), and
    the directory holding the `lab`, `agent` and `collector` packages on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWPROOF_")}
    root = str(Path(__file__).resolve().parent.parent)
    paths = [root, *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def collector_argv(
    lab_name: str, state_dir: Path, cluster_file: Path, record: LoopRecord, settings: LoopSettings
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flowproof.cli",
        "collector",
        "--source",
        "manifests",
        "--manifests",
        str(cluster_file),
        "--listen-address",
        LOOPBACK,
        "--grpc-port",
        str(record.grpc_port),
        "--http-port",
        str(record.http_port),
        "--token-file",
        record.token_file,
        "--tls-cert-file",
        record.cert_file,
        "--tls-key-file",
        record.key_file,
        # Kept across restarts of the collector: the delivery ledger and the assignment key.
        "--state-dir",
        str(state_dir / lab_name / "collector"),
        "--probe-pods",
        "lab",
        "--lab-name",
        lab_name,
        "--lab-state-dir",
        str(state_dir),
        *planner_flags(settings.planner),
        "--log-level",
        settings.log_level,
    ]


def kube_collector_argv(
    record: LoopRecord,
    settings: LoopSettings,
    *,
    kubeconfig: str,
    probe_pod_namespaces: Sequence[str],
    expectations_configmaps: bool,
) -> list[str]:
    """The collector as it runs in a cluster, against the lab's own API server (`lab up
    --apiserver`): the Kubernetes source, probe pods made through the API, its status writes."""
    probe_pods = ["--probe-pods", "off"]
    if probe_pod_namespaces:
        probe_pods = [
            "--probe-pods",
            "kubernetes",
            "--probe-pod-namespaces",
            ",".join(probe_pod_namespaces),
        ]
    return [
        sys.executable,
        "-m",
        "flowproof.cli",
        "collector",
        "--source",
        "kubernetes",
        "--kubeconfig",
        kubeconfig,
        "--listen-address",
        LOOPBACK,
        "--grpc-port",
        str(record.grpc_port),
        "--http-port",
        str(record.http_port),
        "--token-file",
        record.token_file,
        "--tls-cert-file",
        record.cert_file,
        "--tls-key-file",
        record.key_file,
        *probe_pods,
        "--expectations-configmaps",
        "true" if expectations_configmaps else "false",
        "--status-interval-seconds",
        "5",
        *planner_flags(settings.planner),
        "--log-level",
        settings.log_level,
    ]


def planner_flags(planner: PlannerSettings) -> list[str]:
    """The collector flags that give it exactly these planner settings."""
    flags: list[str] = []
    for f in fields(planner):
        value = getattr(planner, f.name)
        flags += [
            "--" + f.name.replace("_", "-"),
            f"{value:g}" if isinstance(value, float) else str(value),
        ]
    return flags


def agent_argv(node_name: str, record: LoopRecord, settings: LoopSettings) -> list[str]:
    return [
        sys.executable,
        "-m",
        "agent",
        "--node-name",
        node_name,
        "--collector-address",
        f"{LOOPBACK}:{record.grpc_port}",
        "--token-file",
        record.token_file,
        "--ca-file",
        record.ca_file,
        "--proc-root",
        "/proc",
        # Several agents share the host's loopback: their own endpoints stay off in the lab.
        "--listen-address",
        LOOPBACK,
        "--health-port",
        "0",
        "--metrics-port",
        "0",
        # One host, one collector: come back quickly after a collector restart.
        "--reconnect-initial-seconds",
        "0.2",
        "--reconnect-max-seconds",
        "2",
        "--log-level",
        settings.log_level,
    ]


# --- readiness ------------------------------------------------------------------------------------


def get_json(url: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """GET a JSON document from the loopback collector; None when it does not answer (yet)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = json.loads(response.read())
    except (OSError, ValueError, http.client.HTTPException):  # URLError is an OSError
        return None
    return data if isinstance(data, dict) else None


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def connected_nodes(record: LoopRecord) -> set[str] | None:
    """Nodes with an agent connected to the collector, or None when it does not answer."""
    data = get_json(f"{record.url}/api/v1/debug/loop")
    if data is None:
        return None
    return {str(a.get("node")) for a in data.get("agents", [])}


def wait_ready(
    record: LoopRecord,
    collector: ProcessRecord | None,
    agents: Sequence[tuple[str, ProcessRecord]],
    logs: Path,
    timeout_seconds: float,
) -> None:
    """Wait until the collector answers and every agent in `agents` is connected; else LabError
    naming what did not come up, with the tail of its log."""
    deadline = time.monotonic() + timeout_seconds
    wanted = {node for node, _ in agents}
    while True:
        if collector is not None and not is_running(collector):
            raise LabError(
                f"the lab's collector exited; {logs / 'collector.log'}:\n"
                + log_tail(logs / "collector.log")
            )
        for node, process in agents:
            if not is_running(process):
                log = logs / f"agent-{node}.log"
                raise LabError(f"the agent on {node} exited; {log}:\n" + log_tail(log))
        nodes = connected_nodes(record)
        if nodes is not None and wanted <= nodes:
            return
        if time.monotonic() > deadline:
            missing = (
                "the collector does not answer"
                if nodes is None
                else ("no agent connected on " + ", ".join(sorted(wanted - nodes)))
            )
            raise LabError(
                f"the lab's loop is not ready after {timeout_seconds:g}s: {missing}; logs in {logs}"
            )
        time.sleep(0.05)
