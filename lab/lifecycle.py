"""A lab's life: up, apply, delete, label, fault, loop, status, down — each one locked state change.

Owns the order of every change: validate everything first (bad input changes nothing), record each
object in the state BEFORE creating it, create, enforce, start the pods' processes, then rewrite
the cluster files the collector reads; the loop (collector and agents, lab/loop.py) and the probe
pods the collector asks for. `Lab` is also what the prober needs (pod key -> namespace path and
address). It must never leave an object it created unrecorded, nor remove one it did not record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collector.errors import InputError
from collector.inventory import Where, label_key_problem, label_value_problem, policy_from_dict
from collector.model import NAMESPACE_NAME_LABEL, NetworkPolicy
from lab import loop as looping
from lab import network, supervisor, system
from lab.cluster import (
    Manifests,
    Placement,
    PodSpec,
    concrete_pods,
    dns_records,
    expectations_key,
    is_dns_pod,
    managed_dns_spec,
    namespace_labels,
    namespace_manifest,
    needs_new_pod,
    pod_manifest,
    policy_manifest,
)
from lab.config import (
    DEFAULT_NAME,
    DEFAULT_STATE_DIR,
    AddressPlan,
    LabSettings,
    Names,
    check_name,
)
from lab.enforcement import EnforcementInput, compile_rulesets, digest, isolation, transaction
from lab.errors import LabError, LabExistsError, NoSuchLabError
from lab.loop import LoopSettings
from lab.podserver import ServerSpec
from lab.state import (
    Faults,
    LabPaths,
    LabState,
    LoopRecord,
    PendingApply,
    PodRecord,
    ProcessRecord,
    RouteRecord,
    write_atomically,
)

log = logging.getLogger(__name__)

ROUTE_METRIC_BASE = 4200
OUTSIDE_KEY = "outside"
FAULT_MODES = ("ignore-policy", "lag", "reject", "ignore-named-ports", "ignore-endport", "clear")
PROBE_POD_LABEL = "flowproof.dev/probe-pod"  # as collector.planning: the lab runs them on request
PROBE_POD_PREFIX = "flowproof-probe-"


def is_lab_probe_pod(name: str, labels: Mapping[str, str]) -> bool:
    """A probe pod the lab made on the collector's request (by its name and label)."""
    return name.startswith(PROBE_POD_PREFIX) and labels.get(PROBE_POD_LABEL) == "true"


@dataclass
class Desired:
    """The whole cluster a change asks for."""

    namespaces: dict[str, dict[str, str]]
    pods: dict[str, PodSpec]
    policies: dict[str, dict[str, Any]]
    expectations: dict[str, dict[str, Any]]


@dataclass
class ChangeReport:
    """What a command did, for the user."""

    created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    generation: int = 0
    enforced_generation: int = 0
    enforced_pods: int = 0
    due_in_seconds: float | None = None
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = []
        for title, items in (
            ("created", self.created),
            ("deleted", self.deleted),
            ("updated", self.updated),
            ("restarted", self.restarted),
            ("policies", self.policies),
        ):
            if items:
                out.append(f"{title}: " + ", ".join(items))
        out += self.notes
        if self.due_in_seconds is not None:
            out.append(
                f"enforcement generation {self.generation}: due in {self.due_in_seconds:.1f}s "
                f"(lag fault); the kernel enforces generation {self.enforced_generation}"
            )
        else:
            out.append(
                f"enforcement generation {self.generation} "
                f"({self.enforced_pods} pod table{'s' if self.enforced_pods != 1 else ''} "
                f"updated, {self.seconds:.2f}s)"
            )
        return out


def _policy_key(doc: Mapping[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name')}"


def load_policies(state: LabState) -> list[NetworkPolicy]:
    """The stored policy manifests as model policies (read by the same reader as the collector)."""
    return [
        policy_from_dict(doc, Where(file=f"lab:networkpolicies/{_policy_key(doc)}"))
        for doc in state.policies
    ]


def enforcement_input(state: LabState) -> EnforcementInput:
    pods = [r.to_pod() for r in state.pods]
    return EnforcementInput(
        pods=pods,
        namespaces=state.namespaces,
        policies=load_policies(state),
        faults=state.faults,
        dns_service_ip=state.settings.dns_service_ip,
        dns_backends=[
            r.ip for r in state.pods if is_dns_pod(r.namespace, r.labels, r.host_network)
        ],
    )


def server_spec(record: PodRecord, paths: LabPaths) -> ServerSpec:
    def ports(protocol: str) -> tuple[int, ...]:
        return tuple(sorted({p for p, proto, _ in record.ports if proto == protocol}))

    http = tuple(
        sorted({p for p, proto, n in record.ports if proto == "TCP" and n and n.startswith("http")})
    )
    dns = is_dns_pod(record.namespace, record.labels, record.host_network)
    return ServerSpec(
        name=record.key,
        tcp=ports("TCP"),
        udp=ports("UDP"),
        sctp=ports("SCTP"),
        http=http,
        dns_records=str(paths.dns_records) if dns else None,
    )


def _spec_digest(spec: ServerSpec) -> str:
    return digest(json.dumps(spec.to_dict(), sort_keys=True))


def _log_file(paths: LabPaths, key: str) -> str:
    return str(paths.log_dir / (key.replace("/", ".") + ".log"))


def parse_label_changes(changes: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """kubectl-style `k=v` (set) and `k-` (remove); InputError naming the bad one."""
    if not changes:
        raise InputError("give at least one label change: key=value or key-")
    sets: dict[str, str] = {}
    removes: list[str] = []
    for change in changes:
        if change.endswith("-") and "=" not in change:
            key = change[:-1]
            target: str | None = None
        elif "=" in change:
            key, target = change.split("=", 1)
        else:
            raise InputError(f"{change!r} is neither key=value nor key-", field="labels")
        problem = label_key_problem(key)
        if problem is not None:
            raise InputError(problem, field=f"label {key!r}")
        if target is None:
            removes.append(key)
            continue
        problem = label_value_problem(target)
        if problem is not None:
            raise InputError(problem, field=f"label {key}={target!r}")
        sets[key] = target
    return sets, removes


class Lab:
    """One lab on this host, found by name in a state directory."""

    def __init__(
        self, name: str = DEFAULT_NAME, state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR
    ) -> None:
        self.name = check_name(name)
        self.paths = LabPaths(Path(state_dir), self.name)
        self._cache: tuple[int, LabState] | None = None

    # --- reading ---------------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.paths.exists()

    def state(self) -> LabState:
        """The current state (cached while state.json is unchanged)."""
        try:
            stamp = self.paths.state_file.stat().st_mtime_ns
        except FileNotFoundError as exc:
            raise NoSuchLabError(f"no lab named {self.name!r} in {self.paths.state_dir}") from exc
        if self._cache is None or self._cache[0] != stamp:
            self._cache = (stamp, self.paths.load())
        return self._cache[1]

    def netns_path(self, key: str) -> str:
        """The network namespace of a pod key (`ns/name`), of `outside`, or of `node-N`."""
        state = self.state()
        if key == OUTSIDE_KEY:
            return system.netns_path(state.settings.names.outside_netns)
        if key.startswith("node-") and key[5:].isdigit():
            return system.netns_path(state.settings.names.node_netns(int(key[5:])))
        record = state.pod(key)
        if record is None:
            raise LabError(f"no pod {key} in lab {self.name}")
        return system.netns_path(record.netns)

    def address(self, key: str) -> str:
        """The address of a pod key, `outside` (its first address), `dns`, or an IP as is."""
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(key))
        state = self.state()
        if key == OUTSIDE_KEY:
            return state.settings.outside_ips[0]
        if key == "dns":
            return state.settings.dns_service_ip
        record = state.pod(key)
        if record is None:
            raise LabError(f"no pod {key} in lab {self.name}")
        return record.ip

    # --- the lock and the state around a change --------------------------------------------------

    @contextlib.contextmanager
    def _changing(self) -> Iterator[LabState]:
        system.require_root()
        with self.paths.locked():
            state = self.paths.load()
            if state.phase != "up":
                raise LabError(
                    f"lab {self.name} is {state.phase!r}, not up: run `lab down` and start again"
                )
            try:
                yield state
            finally:
                self.paths.save(state)
                self._cache = None

    # --- up --------------------------------------------------------------------------------------

    def up(
        self,
        manifests: Manifests,
        settings: LabSettings | None = None,
        loop: LoopSettings | None = None,
    ) -> ChangeReport:
        """Build the lab; LabExistsError when it is already there (nothing is changed then).

        With `loop` it also starts the loop (a collector and one agent per node) and returns once
        every agent is connected.
        """
        started = time.monotonic()
        settings = dataclasses.replace(settings or LabSettings(), name=self.name).validate()
        if loop is not None:
            loop.validate()
        system.require_root()
        if settings.owner_pid and not settings.owner_start:
            start = system.process_start(settings.owner_pid)
            if start is None:
                raise InputError(f"no process {settings.owner_pid}", field="--owner-pid")
            settings = dataclasses.replace(settings, owner_start=start)
        with self.paths.locked():
            if self.paths.exists():
                raise LabExistsError(
                    f"lab {self.name!r} is already up (state in {self.paths.root}); "
                    "use `lab apply` to change it or `lab down` to remove it"
                )
            cgroup_root = system.check_cgroup_root(
                settings.cgroup_root or system.detect_cgroup_root()
            )
            state = LabState(settings=settings, cgroup_root=cgroup_root)
            desired = _merged(state, manifests, prune=False)
            placement = Placement(settings, [], 1)
            specs = list(desired.pods.values())
            for spec in specs:
                placement.check_fixed(spec)
            records = [placement.place(spec) for spec in specs]
            state.next_index = placement.next_index
            state.namespaces = desired.namespaces
            state.policies = list(desired.policies.values())
            state.expectations = list(desired.expectations.values())
            load_policies(state)  # the stored form must read back

            names, plan = settings.names, AddressPlan(settings)
            # Start from a metric of the lab's own (from its name), so labs brought up at the same
            # moment by different processes do not both pick the lowest free one.
            metric = system.free_metric(
                plan.blackholes, ROUTE_METRIC_BASE + zlib.crc32(self.name.encode()) % 60000
            )
            state.routes = [RouteRecord(dst=dst, metric=metric) for dst in plan.blackholes]
            state.netns = network.infra_netns(settings)
            state.cgroups = [names.cgroup_top(settings.cgroup_driver)]
            for directory in (self.paths.root, self.paths.log_dir, self.paths.nft_dir):
                directory.mkdir(parents=True, exist_ok=True)
            self.paths.save(state)  # nothing exists yet: every later object is recorded first
            report = ChangeReport()
            try:
                # The blackholes come first: from here on no lab address can leave the host.
                system.add_blackholes(plan.blackholes, metric)
                system.run_many([system.ip_batch([f"netns add {n}" for n in state.netns])])
                system.run_many(
                    [system.ip_batch(network.fabric_commands(settings), names.fabric_netns)]
                )
                node_jobs = [
                    system.ip_batch(network.node_commands(settings, n), names.node_netns(n))
                    for n in range(1, settings.nodes + 1)
                ]
                system.run_many(
                    [
                        *node_jobs,
                        system.ip_batch(network.outside_commands(settings), names.outside_netns),
                        *(
                            system.sysctl_job(ns, network.FORWARDING)
                            for ns in (
                                names.fabric_netns,
                                *(names.node_netns(n) for n in range(1, settings.nodes + 1)),
                            )
                        ),
                    ]
                )
                system.make_cgroups(cgroup_root, [names.infra_cgroup(settings.cgroup_driver)])
                state.processes.append(self._spawn_supervisor(state))
                self.paths.save(state)
                self._create_pods(state, records)
                self._enforce(state, report)
                self._write_dns(state)
                self._start_servers(state, [*records, None])
                self._write_cluster(state)  # a pod is listed once its process runs
                state.phase = "up"
                self.paths.save(state)
                if loop is not None:
                    self._start_loop(state, loop)
                    report.notes.append(
                        f"loop: collector {state.loop.url if state.loop else '?'}, "
                        f"{settings.nodes} agents connected"
                    )
            except BaseException:
                problems = self._teardown(state)
                if not problems:
                    shutil.rmtree(self.paths.root, ignore_errors=True)
                else:
                    log.error("could not undo everything: %s; run `lab down`", "; ".join(problems))
                raise
            report.created = [f"{r.key} ({r.ip} on node-{r.node})" for r in records]
            report.policies = sorted(desired.policies)
            report.seconds = time.monotonic() - started
            return report

    # --- changes ---------------------------------------------------------------------------------

    def apply(self, manifests: Manifests, *, prune: bool = False) -> ChangeReport:
        """Create or update what the manifests declare (`prune`: and delete everything else)."""
        with self._changing() as state:
            return self._reconcile(state, _merged(state, manifests, prune=prune))

    def delete(self, manifests: Manifests) -> ChangeReport:
        """Delete what the manifests name (a Namespace document takes everything in it along)."""
        with self._changing() as state:
            desired, missing = _without(state, manifests)
            report = self._reconcile(state, desired)
            report.notes += [f"not found (nothing to delete): {m}" for m in missing]
            return report

    def label_pod(self, key: str, changes: Sequence[str]) -> ChangeReport:
        sets, removes = parse_label_changes(changes)
        with self._changing() as state:
            desired = _current(state)
            spec = desired.pods.get(key)
            if spec is None:
                raise InputError(f"no pod {key} in lab {self.name}", field="pod")
            labels = {k: v for k, v in spec.labels.items() if k not in removes}
            labels.update(sets)
            desired.pods[key] = dataclasses.replace(spec, labels=labels)
            report = self._reconcile(state, desired)
            report.updated = [f"pod {key} labels {_render_labels(labels)}"]
            return report

    def label_namespace(self, name: str, changes: Sequence[str]) -> ChangeReport:
        sets, removes = parse_label_changes(changes)
        renamed = NAMESPACE_NAME_LABEL in sets and sets[NAMESPACE_NAME_LABEL] != name
        if renamed or NAMESPACE_NAME_LABEL in removes:
            raise InputError(
                f"{NAMESPACE_NAME_LABEL} is set by the API server and cannot change", field="labels"
            )
        with self._changing() as state:
            desired = _current(state)
            if name not in desired.namespaces:
                raise InputError(f"no namespace {name} in lab {self.name}", field="namespace")
            labels = {k: v for k, v in desired.namespaces[name].items() if k not in removes}
            labels.update(sets)
            desired.namespaces[name] = namespace_labels(name, labels)
            report = self._reconcile(state, desired)
            report.updated = [f"namespace {name} labels {_render_labels(desired.namespaces[name])}"]
            return report

    def fault(self, mode: str, args: Sequence[str] = ()) -> ChangeReport:
        """Make enforcement deviate (`clear` ends every fault and enforces the policies now)."""
        faults = _parse_fault(mode, args)
        with self._changing() as state:
            report = ChangeReport()
            if faults is None:
                state.faults = Faults()
                self._enforce(state, report, flush=True)
                report.notes.append("faults cleared: the kernel enforces the policies as written")
            else:
                state.faults = faults(state.faults)
                self._enforce(state, report)
                report.notes.append("faults: " + (", ".join(state.faults.describe()) or "none"))
            return report

    # --- status ----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self.paths.locked():
            state = self.paths.load()
        settings, names, plan = state.settings, state.settings.names, AddressPlan(state.settings)
        isolated = isolation(enforcement_input(state))
        now = time.time()
        return {
            "name": self.name,
            "phase": state.phase,
            "stateDir": str(self.paths.root),
            "clusterDir": str(self.paths.cluster_dir),
            "nodes": [
                {
                    "name": names.node_name(n),
                    "netns": names.node_netns(n),
                    "podCIDR": str(plan.node_subnet(n)),
                    "address": plan.gateway(n),
                    "pods": sum(1 for r in state.pods if r.node == n),
                }
                for n in range(1, settings.nodes + 1)
            ],
            "pods": [
                {
                    "key": r.key,
                    "node": names.node_name(r.node),
                    "ip": r.ip,
                    "uid": r.uid,
                    "netns": r.netns,
                    "cgroup": os.path.join(state.cgroup_root, r.cgroup),
                    "labels": r.labels,
                    "ports": [f"{p}/{proto}" + (f" ({n})" if n else "") for p, proto, n in r.ports],
                    "pid": r.server.pid if r.server else None,
                    "running": bool(r.server and system.is_running(r.server)),
                    "ingressIsolated": isolated.get(r.key, (False, False))[0],
                    "egressIsolated": isolated.get(r.key, (False, False))[1],
                    "hostNetwork": r.host_network,
                }
                for r in sorted(state.pods, key=lambda r: (r.namespace, r.name))
            ],
            "namespaces": state.namespaces,
            "policies": sorted(_policy_key(p) for p in state.policies),
            "expectations": sorted(expectations_key(e) for e in state.expectations),
            "generation": state.generation,
            "enforcedGeneration": state.enforced_generation,
            "pending": [
                {
                    "generation": p.generation,
                    "dueInSeconds": round(max(0.0, p.due - now), 3),
                    "pods": len(p.rulesets),
                }
                for p in state.pending
            ],
            "faults": state.faults.describe(),
            "dns": {
                "service": settings.dns_service_ip,
                "pods": [
                    r.key for r in state.pods if is_dns_pod(r.namespace, r.labels, r.host_network)
                ],
            },
            "outside": {"netns": names.outside_netns, "ips": list(settings.outside_ips)},
            "routes": [f"blackhole {r.dst} metric {r.metric}" for r in state.routes],
            "loop": self._loop_status(state),
        }

    def _loop_status(self, state: LabState) -> dict[str, Any] | None:
        if state.loop is None:
            return None
        processes = {p.role: p for p in state.processes if looping.is_loop_role(p.role)}

        def describe(role: str) -> dict[str, Any]:
            process = processes.get(role)
            return {
                "pid": process.pid if process else None,
                "running": bool(process and system.is_running(process)),
            }

        return {
            "url": state.loop.url,
            "grpcAddress": f"{looping.LOOPBACK}:{state.loop.grpc_port}",
            "tokenFile": state.loop.token_file,
            "settings": state.loop.settings,
            "collector": describe(looping.COLLECTOR_ROLE),
            "agents": [
                {"node": node, **describe(looping.agent_role(node))}
                for node in self._node_names(state)
            ],
        }

    # --- the loop: collector and agents ----------------------------------------------------------

    @staticmethod
    def _node_names(state: LabState) -> list[str]:
        return [Names.node_name(n) for n in range(1, state.settings.nodes + 1)]

    def _loop_targets(self, state: LabState, component: str) -> list[str]:
        """Roles named by `component`: collector, agents, all, or a node name (its agent)."""
        nodes = self._node_names(state)
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

    def _start_loop(self, state: LabState, settings: LoopSettings) -> None:
        """First start of the loop (`up`): token, ports, collector, then the agents."""
        looping.write_token(self.paths.token_file)
        http_port, grpc_port = looping.free_ports(2)
        state.loop = LoopRecord(
            http_port=http_port,
            grpc_port=grpc_port,
            token_file=str(self.paths.token_file),
            settings=settings.to_dict(),
        )
        self.paths.save(state)
        self._start_roles(state, self._loop_targets(state, "all"))

    def _start_roles(self, state: LabState, roles: Sequence[str]) -> list[str]:
        """Start the loop processes in `roles` that are not running; wait until they are ready."""
        loop = state.loop
        if loop is None:
            raise LabError(f"lab {self.name} runs no loop (it was started with --no-loop)")
        settings = LoopSettings.from_dict(loop.settings)
        running = {
            p.role: p
            for p in state.processes
            if looping.is_loop_role(p.role) and system.is_running(p)
        }
        socket = self._supervisor_socket(state)
        env = looping.child_environment()
        cgroup = state.settings.names.infra_cgroup(state.settings.cgroup_driver)
        started: list[str] = []

        def start(role: str, argv: list[str], log_name: str) -> ProcessRecord:
            state.processes = [p for p in state.processes if p.role != role]
            process = supervisor.exec_process(
                socket, role, argv, cgroup, str(self.paths.log_dir / log_name), env
            )
            state.processes.append(process)
            self.paths.save(state)
            started.append(role)
            return process

        collector = running.get(looping.COLLECTOR_ROLE)
        if looping.COLLECTOR_ROLE in roles and collector is None:
            argv = looping.collector_argv(
                self.name, self.paths.state_dir, self.paths.cluster_file, loop, settings
            )
            collector = start(looping.COLLECTOR_ROLE, argv, "collector.log")
        # Ready means every agent that runs is connected (after a collector restart too).
        agents: list[tuple[str, ProcessRecord]] = []
        for node in self._node_names(state):
            role = looping.agent_role(node)
            if role in roles and role not in running:
                argv = looping.agent_argv(node, loop, settings)
                agents.append((node, start(role, argv, f"agent-{node}.log")))
            elif role in running:
                agents.append((node, running[role]))
        if started:
            looping.wait_ready(
                loop, collector, agents, self.paths.log_dir, settings.ready_timeout_seconds
            )
        return started

    def _stop_roles(self, state: LabState, roles: Sequence[str]) -> list[str]:
        """Stop the loop processes in `roles` by recorded pid; the roles that were running."""
        targets = [p for p in state.processes if p.role in roles]
        was_running = [p.role for p in targets if system.is_running(p)]
        left = system.stop_processes(targets)
        if left:
            raise LabError("could not stop " + ", ".join(f"{p.role} ({p.pid})" for p in left))
        state.processes = [p for p in state.processes if p.role not in roles]
        self.paths.save(state)
        return was_running

    def loop_start(self, component: str = "all") -> list[str]:
        """Start the loop processes `component` names that are not running; the roles started."""
        with self._changing() as state:
            return self._start_roles(state, self._loop_targets(state, component))

    def loop_stop(self, component: str = "all") -> list[str]:
        """Stop (SIGKILL, by recorded pid) what `component` names; the roles that were running."""
        with self._changing() as state:
            if state.loop is None:
                raise LabError(f"lab {self.name} runs no loop (it was started with --no-loop)")
            return self._stop_roles(state, self._loop_targets(state, component))

    def loop_restart(self, component: str = "all") -> list[str]:
        """Stop, then start again (same ports and token); the roles started."""
        with self._changing() as state:
            if state.loop is None:
                raise LabError(f"lab {self.name} runs no loop (it was started with --no-loop)")
            roles = self._loop_targets(state, component)
            self._stop_roles(state, roles)
            return self._start_roles(state, roles)

    def loop_processes(self) -> dict[str, ProcessRecord]:
        """The recorded loop processes by role (`collector`, `agent node-1`, ...)."""
        return {p.role: p for p in self.state().processes if looping.is_loop_role(p.role)}

    # --- probe pods (on the collector's request) --------------------------------------------------

    def reconcile_probe_pods(self, requests: Sequence[Any]) -> ChangeReport | None:
        """Run exactly the requested probe pods (objects with `namespace`, `name`, `labels`).

        A probe pod is a pod like any other (namespace, cgroup, a process with no listener,
        written to the cluster file) that is never Ready and never a destination. Those no longer
        requested are deleted. None when nothing had to change (then the lock is not taken).
        """
        wanted = {f"{r.namespace}/{r.name}": r for r in requests}
        for key, request in wanted.items():
            if not is_lab_probe_pod(request.name, dict(request.labels)):
                raise InputError(f"{key} is not a probe pod request", field="probe pods")

        def current(state: LabState) -> dict[str, PodRecord]:
            return {r.key: r for r in state.pods if is_lab_probe_pod(r.name, r.labels)}

        def settled(state: LabState) -> bool:
            have = current(state)
            return set(have) == set(wanted) and all(
                r.server is not None and system.is_running(r.server) for r in have.values()
            )

        if settled(self.state()):
            return None
        with self._changing() as state:
            if settled(state):
                return None
            desired = _current(state)
            for key in current(state):
                if key not in wanted:
                    del desired.pods[key]
            for key, request in wanted.items():
                desired.pods.setdefault(
                    key,
                    PodSpec(
                        namespace=request.namespace,
                        name=request.name,
                        labels=dict(request.labels),
                        ports=(),
                    ),
                )
            _ensure_namespaces(desired)
            return self._reconcile(state, desired)

    # --- down ------------------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Remove everything the lab created (also after a crash); what was removed, by kind."""
        system.require_root()
        with self.paths.locked():
            state = self.paths.load()
            netns = set(state.netns) | {r.netns for r in state.pods if not r.host_network}
            summary = [
                f"{len(state.pods)} pods",
                f"{len(netns)} network namespaces",
                f"{len(state.routes)} blackhole routes",
            ]
            problems = self._teardown(state)
            if problems:
                raise LabError(
                    "could not remove: " + "; ".join(problems) + " (state kept; try again)"
                )
            shutil.rmtree(self.paths.root, ignore_errors=True)
            self._cache = None
            return summary

    # --- building blocks -------------------------------------------------------------------------

    def _spawn_supervisor(self, state: LabState) -> ProcessRecord:
        settings = state.settings
        return supervisor.spawn(
            self.paths.state_dir,
            self.name,
            state.cgroup_root,
            settings.names.infra_cgroup(settings.cgroup_driver),
            str(self.paths.log_dir / "supervisor.log"),
            owner=(settings.owner_pid, settings.owner_start),
        )

    def _supervisor_socket(self, state: LabState) -> str:
        current = next((p for p in state.processes if p.role == "supervisor"), None)
        if current is None or not system.is_running(current):
            log.warning("the lab's supervisor is gone: starting a new one")
            state.processes = [p for p in state.processes if p.role != "supervisor"]
            state.processes.append(self._spawn_supervisor(state))
            self.paths.save(state)
        return supervisor.socket_path(self.paths.root)

    def _create_pods(self, state: LabState, records: Sequence[PodRecord]) -> None:
        """Namespaces, veths, addresses and cgroups of new pods (recorded in the state first)."""
        if not records:
            return
        settings, names = state.settings, state.settings.names
        state.pods += list(records)
        own = [r for r in records if not r.host_network]
        state.netns += [r.netns for r in own if r.netns not in state.netns]
        if not state.cgroups:
            state.cgroups = [names.cgroup_top(settings.cgroup_driver)]
        self.paths.save(state)
        if own:
            system.run_many([system.ip_batch([f"netns add {r.netns}" for r in own])])
            by_node: dict[int, list[str]] = {}
            for record in own:
                by_node.setdefault(record.node, []).extend(
                    network.pod_link_commands(settings, record)
                )
            system.run_many(
                [
                    system.ip_batch(cmds, names.node_netns(node))
                    for node, cmds in sorted(by_node.items())
                ]
            )
            system.run_many(
                [system.ip_batch(network.pod_commands(settings, r), r.netns) for r in own]
            )
        system.make_cgroups(state.cgroup_root, [r.cgroup for r in records])

    def _remove_pods(self, state: LabState, records: Sequence[PodRecord]) -> None:
        if not records:
            return
        system.stop_processes([r.server for r in records if r.server is not None])
        for record in records:
            pod_dir = os.path.dirname(record.cgroup)
            system.kill_cgroup(state.cgroup_root, pod_dir)
            left = system.remove_cgroup_tree(state.cgroup_root, pod_dir)
            if left:
                raise LabError(f"cannot remove the cgroup of {record.key}: {left[0]}")
        own = [r.netns for r in records if not r.host_network]
        left_ns = system.delete_netns(own)
        if left_ns:
            raise LabError(f"cannot delete network namespaces {', '.join(left_ns)}")
        gone = {r.key for r in records}
        state.pods = [r for r in state.pods if r.key not in gone]
        state.netns = [n for n in state.netns if n not in set(own)]
        for key in gone:
            state.applied.pop(key, None)
            state.desired.pop(key, None)
        self.paths.save(state)

    def _start_servers(self, state: LabState, records: Sequence[PodRecord | None]) -> None:
        """Start (or restart) servers; `None` stands for the outside namespace's server."""
        settings = state.settings
        specs: list[supervisor.ProcessSpec] = []
        for record in records:
            if record is None:
                specs.append(
                    supervisor.ProcessSpec(
                        key=OUTSIDE_KEY,
                        netns=settings.names.outside_netns,
                        cgroup=settings.names.infra_cgroup(settings.cgroup_driver),
                        server=ServerSpec(
                            name=OUTSIDE_KEY,
                            tcp=settings.outside_tcp_ports,
                            udp=settings.outside_udp_ports,
                            http=settings.outside_tcp_ports,
                            udp_hosts=network.outside_udp_addresses(settings),
                        ),
                        log_file=_log_file(self.paths, OUTSIDE_KEY),
                    )
                )
                continue
            specs.append(
                supervisor.ProcessSpec(
                    key=record.key,
                    netns=record.netns,
                    cgroup=record.cgroup,
                    server=server_spec(record, self.paths),
                    log_file=_log_file(self.paths, record.key),
                )
            )
        if not specs:
            return
        started = supervisor.start_processes(self._supervisor_socket(state), specs)
        for spec in specs:
            process = started[spec.key]
            if spec.key == OUTSIDE_KEY:
                process.role = "outside"
                state.processes.append(process)
                continue
            record = state.pod(spec.key)
            assert record is not None
            record.server = process
            record.server_spec = _spec_digest(spec.server)
        self.paths.save(state)

    def _enforce(self, state: LabState, report: ChangeReport, *, flush: bool = False) -> None:
        """Compile the policies; apply what changed now, or queue it when the lag fault is on."""
        started = time.monotonic()
        rulesets = compile_rulesets(enforcement_input(state))
        delta = {k: t for k, t in rulesets.items() if state.desired.get(k) != digest(t)}
        if delta:
            state.generation += 1
        state.desired = {k: digest(t) for k, t in rulesets.items()}
        lag = state.faults.lag_seconds
        if delta and lag > 0 and not flush:
            state.pending.append(
                PendingApply(due=time.time() + lag, generation=state.generation, rulesets=delta)
            )
            self._wake_supervisor(state)
            report.due_in_seconds = lag
        elif delta or flush or state.pending:
            todo = {k: t for k, t in rulesets.items() if state.applied.get(k) != digest(t)}
            state.pending.clear()
            report.enforced_pods = apply_rulesets(self.paths, state, todo)
            state.enforced_generation = state.generation
        report.generation = state.generation
        report.enforced_generation = state.enforced_generation
        report.seconds = time.monotonic() - started

    def _wake_supervisor(self, state: LabState) -> None:
        try:
            supervisor.request(self._supervisor_socket(state), {"op": "wake"}, timeout=5)
        except LabError as exc:
            log.warning("lagged enforcement may be late: %s", exc)

    def _write_dns(self, state: LabState) -> None:
        """Rewrite the cluster DNS zone (before new servers start: a DNS pod reads it)."""
        records = dns_records(state.pods, state.settings)
        write_atomically(self.paths.dns_records, json.dumps(records, sort_keys=True))

    def _write_cluster(self, state: LabState) -> None:
        """Rewrite the manifests the collector reads, atomically."""
        plan = AddressPlan(state.settings)
        docs: list[dict[str, Any]] = [
            namespace_manifest(name, labels) for name, labels in sorted(state.namespaces.items())
        ]
        docs += [
            pod_manifest(r, plan.gateway(r.node))
            for r in sorted(state.pods, key=lambda r: (r.namespace, r.name))
        ]
        docs += sorted(state.policies, key=_policy_key)
        docs += sorted(state.expectations, key=expectations_key)
        # One JSON document per line (JSON is YAML): many times faster to write than block YAML.
        text = (
            f"# The cluster of flowproof lab {self.name!r}, rewritten by the lab on every change\n"
            f"# (generation {state.generation}). Read it with the manifest inventory; never edit.\n"
        )
        text += "".join(f"---\n{json.dumps(doc)}\n" for doc in docs)
        write_atomically(self.paths.cluster_file, text)

    def _reconcile(self, state: LabState, desired: Desired) -> ChangeReport:
        """Make the lab match `desired`: everything is checked before the first change."""
        started = time.monotonic()
        current = {r.key: r for r in state.pods}
        remove = [
            r
            for k, r in current.items()
            if k not in desired.pods or needs_new_pod(r, desired.pods[k])
        ]
        removed = {r.key for r in remove}
        keep = {k: r for k, r in current.items() if k not in removed}
        placement = Placement(state.settings, keep.values(), state.next_index)
        new_specs = [s for k, s in desired.pods.items() if k not in keep]
        for spec in new_specs:
            placement.check_fixed(spec)
        new_records = [placement.place(spec) for spec in new_specs]
        candidate = dataclasses.replace(state, policies=list(desired.policies.values()))
        load_policies(candidate)  # the stored form must read back before anything changes

        report = ChangeReport()
        old_policies = {_policy_key(p): p for p in state.policies}
        for key, doc in desired.policies.items():
            if key not in old_policies:
                report.policies.append(f"{key} created")
            elif old_policies[key] != doc:
                report.policies.append(f"{key} configured")
        report.policies += [f"{k} deleted" for k in old_policies if k not in desired.policies]

        for key, record in keep.items():
            spec = desired.pods[key]
            ports = [(p.port, p.protocol, p.name) for p in spec.ports]
            if dict(spec.labels) != record.labels or ports != record.ports:
                report.updated.append(key)
            record.labels = dict(spec.labels)
            record.ports = ports
            record.workload = spec.workload
            record.managed = spec.managed
        state.namespaces = desired.namespaces
        state.policies = list(desired.policies.values())
        state.expectations = list(desired.expectations.values())
        state.next_index = placement.next_index
        if remove or new_records:
            self.paths.save(state)  # record before removing or creating anything

        self._remove_pods(state, remove)
        self._create_pods(state, new_records)
        self._enforce(state, report)
        self._write_dns(state)
        restart = [
            r
            for r in keep.values()
            if r.server is None
            or r.server_spec != _spec_digest(server_spec(r, self.paths))
            or not system.is_running(r.server)
        ]
        if restart:
            system.stop_processes([r.server for r in restart if r.server is not None])
        self._start_servers(state, [*new_records, *restart])
        self._write_cluster(state)  # a pod is listed once its process runs (as kubelet reports)
        report.created = [f"{r.key} ({r.ip} on node-{r.node})" for r in new_records]
        report.deleted = sorted(removed - {r.key for r in new_records})
        report.restarted = sorted(r.key for r in restart)
        report.seconds = time.monotonic() - started
        return report

    def _teardown(self, state: LabState) -> list[str]:
        """Remove every recorded object, in the safe order; the ones that would not go."""
        problems: list[str] = []
        settings = state.settings
        if self.paths.root.exists():
            state.phase = "down"
            self.paths.save(state)
        me = os.getpid()  # the supervisor itself runs this when its owner is gone
        # The loop first: no agent probes and no collector asks for probe pods while pods go.
        loop = [p for p in state.processes if looping.is_loop_role(p.role) and p.pid != me]
        problems += [f"process {p.pid} ({p.role})" for p in system.stop_processes(loop)]
        sup = next((p for p in state.processes if p.role == "supervisor"), None)
        if sup is not None and sup.pid != me and system.is_running(sup):
            with contextlib.suppress(LabError):
                supervisor.request(
                    supervisor.socket_path(self.paths.root), {"op": "shutdown"}, timeout=5
                )
        records = [r.server for r in state.pods if r.server is not None] + state.processes
        records = [r for r in records if r.pid != me]
        problems += [f"process {p.pid} ({p.role})" for p in system.stop_processes(records)]
        root = state.cgroup_root
        if root:
            tops = set(state.cgroups) | {settings.names.cgroup_top(settings.cgroup_driver)}
            for top in sorted(tops):
                system.kill_cgroup(root, top)
            for top in sorted(tops):
                problems += [f"cgroup {p}" for p in system.remove_cgroup_tree(root, top)]
        prefix = settings.names.prefix
        netns = set(state.netns) | {r.netns for r in state.pods if not r.host_network}
        netns |= {n for n in system.list_netns() if n.startswith(prefix)}
        problems += [f"netns {n}" for n in system.delete_netns(sorted(netns))]
        problems += system.delete_blackholes([(r.dst, r.metric) for r in state.routes])
        return problems


def apply_rulesets(paths: LabPaths, state: LabState, rulesets: Mapping[str, str]) -> int:
    """Apply each pod's table in one `nft -f` transaction; how many pods were updated."""
    items: list[tuple[str, str]] = []
    done: dict[str, str] = {}
    paths.nft_dir.mkdir(parents=True, exist_ok=True)
    for key, text in sorted(rulesets.items()):
        record = state.pod(key)
        if record is None or record.host_network:
            continue
        (paths.nft_dir / (key.replace("/", ".") + ".nft")).write_text(text)
        # A pod that never had a table gets a plain add: deleting a table in a transaction costs
        # an RCU grace period in the kernel, which `up` would pay once per pod.
        items.append((record.netns, text if key not in state.applied else transaction(text)))
        done[key] = digest(text)
    system.nft_apply(items)
    state.applied.update(done)
    return len(done)


def apply_due(state_dir: Path, name: str) -> float | None:
    """Apply lagged changes that have fallen due (called by the supervisor).

    Returns when to look again: the next due time, soon when the lab is busy, None when nothing
    is pending. Never waits for the lock, so a lab command waiting on the supervisor cannot
    deadlock with it.
    """
    paths = LabPaths(state_dir, name)
    try:
        with paths.locked(blocking=False):
            if not paths.exists():
                return None
            state = paths.load()
            if state.phase != "up":
                return None
            now = time.time()
            while state.pending and state.pending[0].due <= now:
                entry = state.pending.pop(0)
                apply_rulesets(paths, state, entry.rulesets)
                state.enforced_generation = entry.generation
                paths.save(state)
            return state.pending[0].due if state.pending else None
    except BlockingIOError:
        return time.time() + 0.02


# --- merging manifests into the desired cluster --------------------------------------------------


def _current(state: LabState) -> Desired:
    pods = {
        r.key: PodSpec(
            namespace=r.namespace,
            name=r.name,
            labels=dict(r.labels),
            ports=r.container_ports,
            workload=r.workload,
            host_network=r.host_network,
            ip=r.ip,
            uid=r.uid,
            node=r.node,
            managed=r.managed,
        )
        for r in state.pods
    }
    return Desired(
        namespaces={k: dict(v) for k, v in state.namespaces.items()},
        pods=pods,
        policies={_policy_key(p): p for p in state.policies},
        expectations={expectations_key(e): dict(e) for e in state.expectations},
    )


def _ensure_dns(pods: dict[str, PodSpec], previous: Mapping[str, PodSpec]) -> None:
    """Keep one cluster DNS: the manifests' kube-dns pods, else the lab's own coredns pod."""
    user = [
        s
        for s in pods.values()
        if not s.managed and is_dns_pod(s.namespace, s.labels, s.host_network)
    ]
    managed = [k for k, s in pods.items() if s.managed]
    if user:
        for key in managed:
            del pods[key]
        return
    if not managed:
        spec = next((s for s in previous.values() if s.managed), None) or managed_dns_spec()
        if spec.key in pods:
            raise InputError(f"{spec.key} is taken; the lab needs that name for its cluster DNS")
        pods[spec.key] = spec


def _ensure_namespaces(desired: Desired) -> None:
    wanted = {s.namespace for s in desired.pods.values()}
    wanted |= {k.split("/", 1)[0] for k in desired.policies}
    wanted |= {k.split("/", 1)[0] for k in desired.expectations}
    for name in wanted:
        desired.namespaces.setdefault(name, namespace_labels(name))


def _merged(state: LabState, manifests: Manifests, *, prune: bool) -> Desired:
    previous = _current(state)
    specs = concrete_pods(manifests.pods, state.settings)
    if prune:
        desired = Desired(namespaces={}, pods={}, policies={}, expectations={})
        # Probe pods belong to the collector's requests, not to the manifests.
        desired.pods = {
            k: s for k, s in previous.pods.items() if is_lab_probe_pod(s.name, s.labels)
        }
    else:
        desired = _current(state)
        workloads = {(p.namespace, p.workload) for p in manifests.pods if p.workload}
        desired.pods = {
            k: s for k, s in desired.pods.items() if (s.namespace, s.workload) not in workloads
        }
    for spec in specs:
        desired.pods[spec.key] = spec
    _ensure_dns(desired.pods, previous.pods)
    for name, ns in manifests.namespaces.items():
        if name in manifests.declared_namespaces or name not in desired.namespaces:
            desired.namespaces[name] = namespace_labels(name, ns.labels)
    for policy in manifests.policies:
        desired.policies[policy.key] = policy_manifest(policy)
    for doc in manifests.expectations:
        desired.expectations[expectations_key(doc)] = dict(doc)
    _ensure_namespaces(desired)
    return desired


def _without(state: LabState, manifests: Manifests) -> tuple[Desired, list[str]]:
    desired = _current(state)
    missing: list[str] = []
    for pod in manifests.pods:
        if pod.workload:
            keys = [
                k
                for k, s in desired.pods.items()
                if s.namespace == pod.namespace and s.workload == pod.workload
            ]
            if not keys:
                missing.append(f"{pod.workload} in {pod.namespace}")
        else:
            keys = [pod.key] if pod.key in desired.pods else []
            if not keys:
                missing.append(f"pod {pod.key}")
        for key in keys:
            del desired.pods[key]
    for policy in manifests.policies:
        if desired.policies.pop(policy.key, None) is None:
            missing.append(f"networkpolicy {policy.key}")
    for doc in manifests.expectations:
        if desired.expectations.pop(expectations_key(doc), None) is None:
            missing.append(f"flowexpectations {expectations_key(doc)}")
    for name in manifests.declared_namespaces:
        if desired.namespaces.pop(name, None) is None:
            missing.append(f"namespace {name}")
            continue
        desired.pods = {k: s for k, s in desired.pods.items() if s.namespace != name}
        desired.policies = {
            k: p for k, p in desired.policies.items() if not k.startswith(name + "/")
        }
        desired.expectations = {
            k: e for k, e in desired.expectations.items() if not k.startswith(name + "/")
        }
    _ensure_namespaces(desired)
    return desired, missing


def _render_labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "(none)"


def _parse_fault(mode: str, args: Sequence[str]) -> Any:
    """A function old faults -> new faults, or None for `clear`; InputError on bad input."""

    def expect(count: int, usage: str) -> None:
        if len(args) != count:
            raise InputError(f"usage: lab fault {mode} {usage}".rstrip(), field="fault")

    if mode == "clear":
        expect(0, "")
        return None
    if mode == "ignore-policy":
        expect(1, "NAMESPACE/NAME")
        key = args[0]
        if key.count("/") != 1 or not all(key.split("/")):
            raise InputError(f"{key!r} is not NAMESPACE/NAME", field="fault ignore-policy")
        return lambda f: dataclasses.replace(f, ignore_policies=sorted({*f.ignore_policies, key}))
    if mode == "lag":
        expect(1, "SECONDS")
        try:
            seconds = float(args[0])
        except ValueError as exc:
            raise InputError(f"{args[0]!r} is not a number of seconds", field="fault lag") from exc
        if not 0 <= seconds <= 3600:
            raise InputError("must be from 0 to 3600 seconds", field="fault lag")
        return lambda f: dataclasses.replace(f, lag_seconds=seconds)
    if mode in ("reject", "ignore-named-ports", "ignore-endport"):
        expect(0, "")
        attr = mode.replace("-", "_")
        return lambda f: dataclasses.replace(f, **{attr: True})
    raise InputError(f"unknown fault {mode!r}; one of {', '.join(FAULT_MODES)}", field="fault")


def read_manifests(paths: Sequence[str | os.PathLike[str]]) -> Manifests:
    """Read manifest files and directories with the collector's inventory (InputError if bad)."""
    from collector.inventory import load_documents, snapshot_from_documents

    docs = load_documents(paths)
    snapshot = snapshot_from_documents(docs)
    declared = frozenset(d.key[2] for d in docs if d.kind == "Namespace")
    expectations = tuple(dict(d.obj) for d in docs if d.kind == "FlowExpectations")
    return Manifests(
        namespaces=snapshot.namespaces,
        declared_namespaces=declared,
        pods=snapshot.pods,
        policies=snapshot.policies,
        expectations=expectations,
    )


def manifests_from(
    pods: Iterable[Any] = (), policies: Iterable[NetworkPolicy] = (), namespaces: Iterable[Any] = ()
) -> Manifests:
    """Manifests from model objects (tests and other Python callers)."""
    ns = {n.name: n for n in namespaces}
    return Manifests(
        namespaces=ns,
        declared_namespaces=frozenset(ns),
        pods=tuple(pods),
        policies=tuple(policies),
    )
