"""The processes a lab runs through its supervisor: the supervisor itself, pod servers, the loop.

Owns the client side of the supervisor (lab/supervisor.py: start it, ask it over its unix socket
to start servers or exec processes, wake it, shut it down), starting a new supervisor when the
recorded one is gone, and the loop's processes (a collector and one agent per node, lab/loop.py):
which roles a component names, starting them until ready, stopping them. It never starts a
process except through the supervisor, and never stops one except by recorded pid and start time.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowproof.errors import InputError
from lab import loop as looping
from lab import system
from lab.certs import write_lab_certificates
from lab.config import Names
from lab.errors import LabError
from lab.loop import LoopSettings
from lab.podserver import ServerSpec
from lab.state import LabPaths, LabState, LoopRecord, ProcessRecord

log = logging.getLogger(__name__)

SUPERVISOR_ROLE = "supervisor"
REQUEST_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class ProcessSpec:
    """One server to start: where it runs and what it serves."""

    key: str
    netns: str
    cgroup: str  # relative to the cgroup root
    server: ServerSpec
    log_file: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "netns": self.netns,
            "cgroup": self.cgroup,
            "server": self.server.to_dict(),
            "log_file": self.log_file,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProcessSpec:
        return cls(
            key=data["key"],
            netns=data["netns"],
            cgroup=data["cgroup"],
            server=ServerSpec.from_dict(data["server"]),
            log_file=data["log_file"],
        )


# --- talking to the supervisor -------------------------------------------------------------------


def socket_path(lab_root: Path) -> str:
    return str(lab_root / "supervisor.sock")


def request(
    path: str, message: dict[str, Any], timeout: float = REQUEST_TIMEOUT_SECONDS
) -> dict[str, Any]:
    """Send one request, return the reply; LabError when the supervisor cannot be reached."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(json.dumps(message).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        raise LabError(f"the lab's supervisor does not answer on {path}: {exc}") from exc
    if not data:
        raise LabError(f"the lab's supervisor closed {path} without an answer")
    reply: dict[str, Any] = json.loads(data)
    if not reply.get("ok"):
        raise LabError(f"the lab's supervisor: {reply.get('error', 'failed')}")
    return reply


def start_processes(path: str, specs: Sequence[ProcessSpec]) -> dict[str, ProcessRecord]:
    """Start servers through the supervisor; their process records by key (ready when returned)."""
    if not specs:
        return {}
    reply = request(path, {"op": "start", "processes": [s.to_dict() for s in specs]})
    return {
        item["key"]: ProcessRecord(pid=item["pid"], start=item["start"], role=f"pod {item['key']}")
        for item in reply["started"]
    }


def exec_process(
    path: str,
    role: str,
    argv: Sequence[str],
    cgroup: str,
    log_file: str,
    env: dict[str, str] | None = None,
) -> ProcessRecord:
    """Have the supervisor fork and exec `argv` (a loop process: the collector or an agent).

    The child joins `cgroup`, writes to `log_file` and gets `env` (the supervisor's own when None);
    the supervisor reaps it. Returns at once: readiness is the caller's business.
    """
    reply = request(
        path,
        {
            "op": "exec",
            "role": role,
            "argv": list(argv),
            "cgroup": cgroup,
            "log_file": log_file,
            "env": env,
        },
    )
    return ProcessRecord(pid=int(reply["pid"]), start=int(reply["start"]), role=role)


def spawn(paths: LabPaths, state: LabState) -> ProcessRecord:
    """Start the lab's supervisor, detached; returns once it listens.

    With an owner (pid, start time) in the settings the supervisor takes the whole lab down when
    that process is gone, so a test run that is killed leaves nothing behind.
    """
    settings = state.settings
    log_file = str(paths.log_dir / "supervisor.log")
    argv = [
        sys.executable,
        "-m",
        "lab.supervisor",
        "--state-dir",
        str(paths.state_dir),
        "--name",
        paths.name,
        "--cgroup-root",
        state.cgroup_root,
        "--cgroup",
        settings.names.infra_cgroup(settings.cgroup_driver),
        "--log-file",
        log_file,
        "--owner",
        f"{settings.owner_pid}:{settings.owner_start}",
    ]
    out = system.run(argv).strip()
    try:
        pid = int(out.splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise LabError(f"the lab's supervisor did not start: {out!r}") from exc
    start = system.process_start(pid)
    if start is None:
        raise LabError(f"the lab's supervisor (pid {pid}) exited at once; see {log_file}")
    return ProcessRecord(pid=pid, start=start, role=SUPERVISOR_ROLE)


def supervisor_socket(paths: LabPaths, state: LabState) -> str:
    """The socket of the lab's supervisor, starting a new one (recorded) when it is gone."""
    current = next((p for p in state.processes if p.role == SUPERVISOR_ROLE), None)
    if current is None or not system.is_running(current):
        log.warning("the lab's supervisor is gone: starting a new one")
        state.processes = [p for p in state.processes if p.role != SUPERVISOR_ROLE]
        state.processes.append(spawn(paths, state))
        paths.save(state)
    return socket_path(paths.root)


def wake_supervisor(paths: LabPaths, state: LabState) -> None:
    """Have the supervisor look for lagged enforcement now (a warning when it cannot be told)."""
    try:
        request(supervisor_socket(paths, state), {"op": "wake"}, timeout=5)
    except LabError as exc:
        log.warning("lagged enforcement may be late: %s", exc)


# --- the loop: collector and agents --------------------------------------------------------------


def node_names(state: LabState) -> list[str]:
    return [Names.node_name(n) for n in range(1, state.settings.nodes + 1)]


def loop_processes(state: LabState) -> dict[str, ProcessRecord]:
    """The recorded loop processes by role (`collector`, `agent node-1`, ...)."""
    return {p.role: p for p in state.processes if looping.is_loop_role(p.role)}


def require_loop(paths: LabPaths, state: LabState) -> LoopRecord:
    """The lab's loop; LabError when it was started without one."""
    if state.loop is None:
        raise LabError(f"lab {paths.name} runs no loop (it was started with --no-loop)")
    return state.loop


def loop_targets(state: LabState, component: str) -> list[str]:
    """Roles named by `component`: collector, agents, all, or a node name (its agent)."""
    nodes = node_names(state)
    if component == "collector":
        return [looping.COLLECTOR_ROLE]
    if component == "agents":
        return [looping.agent_role(n) for n in nodes]
    if component == "all":
        return [looping.COLLECTOR_ROLE, *(looping.agent_role(n) for n in nodes)]
    node = component.removeprefix("agent ").removeprefix("agent/")
    if node in nodes:
        return [looping.agent_role(node)]
    raise InputError(
        f"{component!r} is not collector, agents, all or a node ({', '.join(nodes)})",
        field="component",
    )


def start_loop(paths: LabPaths, state: LabState, settings: LoopSettings) -> None:
    """First start of the loop (`up`): token, ports, collector, then the agents."""
    looping.write_token(paths.token_file)
    tls = write_lab_certificates(paths.tls_dir, [looping.LOOPBACK])
    http_port, grpc_port = looping.free_ports(2)
    state.loop = LoopRecord(
        http_port=http_port,
        grpc_port=grpc_port,
        token_file=str(paths.token_file),
        settings=settings.to_dict(),
        ca_file=str(tls.ca),
        cert_file=str(tls.certificate),
        key_file=str(tls.key),
    )
    paths.save(state)
    start_roles(paths, state, loop_targets(state, "all"))


def start_roles(paths: LabPaths, state: LabState, roles: Sequence[str]) -> list[str]:
    """Start the loop processes in `roles` that are not running; wait until they are ready."""
    loop = require_loop(paths, state)
    settings = LoopSettings.from_dict(loop.settings)
    running = {
        p.role: p for p in state.processes if looping.is_loop_role(p.role) and system.is_running(p)
    }
    socket = supervisor_socket(paths, state)
    env = looping.child_environment()
    cgroup = state.settings.names.infra_cgroup(state.settings.cgroup_driver)
    started: list[str] = []

    def start(role: str, argv: list[str], log_name: str) -> ProcessRecord:
        state.processes = [p for p in state.processes if p.role != role]
        process = exec_process(socket, role, argv, cgroup, str(paths.log_dir / log_name), env)
        state.processes.append(process)
        paths.save(state)
        started.append(role)
        return process

    collector = running.get(looping.COLLECTOR_ROLE)
    if looping.COLLECTOR_ROLE in roles and collector is None:
        if state.apiserver is not None:  # the lab's own API server: as in a cluster
            argv = looping.kube_collector_argv(
                loop,
                settings,
                kubeconfig=state.apiserver.collector_kubeconfig,
                probe_pod_namespaces=state.apiserver.probe_pod_namespaces,
                expectations_configmaps=state.apiserver.expectations_configmaps,
            )
        else:
            argv = looping.collector_argv(
                paths.name, paths.state_dir, paths.cluster_file, loop, settings
            )
        collector = start(looping.COLLECTOR_ROLE, argv, "collector.log")
    # Ready means every agent that runs is connected (after a collector restart too).
    agents: list[tuple[str, ProcessRecord]] = []
    for node in node_names(state):
        role = looping.agent_role(node)
        if role in roles and role not in running:
            argv = looping.agent_argv(node, loop, settings)
            agents.append((node, start(role, argv, f"agent-{node}.log")))
        elif role in running:
            agents.append((node, running[role]))
    if started:
        looping.wait_ready(loop, collector, agents, paths.log_dir, settings.ready_timeout_seconds)
    return started


def stop_roles(paths: LabPaths, state: LabState, roles: Sequence[str]) -> list[str]:
    """Stop the loop processes in `roles` by recorded pid; the roles that were running."""
    targets = [p for p in state.processes if p.role in roles]
    was_running = [p.role for p in targets if system.is_running(p)]
    left = system.stop_processes(targets)
    if left:
        raise LabError("could not stop " + ", ".join(f"{p.role} ({p.pid})" for p in left))
    state.processes = [p for p in state.processes if p.role not in roles]
    paths.save(state)
    return was_running
