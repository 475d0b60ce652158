"""A lab's life, as its callers see it: `Lab(name, state_dir)` and the manifests it takes.

Owns the facade: finding a lab by name in a state directory, reading its state (cached while
state.json is unchanged), answering what the prober needs (pod key -> namespace path and
address), and running each command as one locked state change. The work is done elsewhere:
lab/changing.py (up and each change), lab/faults.py, lab/processes.py (the loop), lab/status.py
and lab/teardown.py (down). It never changes the lab except through them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from collector.core.model import NetworkPolicy
from collector.reading.manifests import load_documents
from collector.reading.objects import WORKLOAD_KINDS, snapshot_from_documents
from lab import changing, mirroring, processes, system, teardown
from lab.cluster import Manifests
from lab.config import DEFAULT_NAME, DEFAULT_STATE_DIR, LabSettings, check_name
from lab.errors import LabError, NoSuchLabError
from lab.faults import change_faults, ignored_policy_notes, parse_fault
from lab.loop import LoopSettings
from lab.merging import (
    merged,
    parse_label_changes,
    parse_namespace_label_changes,
    probe_pod_requests,
    with_namespace_labels,
    with_pod_labels,
    without,
)
from lab.mirroring import ApiServerOptions
from lab.pods import OUTSIDE_KEY
from lab.report import ChangeReport
from lab.state import LabPaths, LabState, ProcessRecord
from lab.status import status


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

    def status(self) -> dict[str, Any]:
        """Nodes, pods, policies, enforcement and the loop, JSON-ready (`lab status`)."""
        return status(self.paths)

    def loop_processes(self) -> dict[str, ProcessRecord]:
        """The recorded loop processes by role (`collector`, `agent node-1`, ...)."""
        return processes.loop_processes(self.state())

    # --- changes ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _changing(self) -> Iterator[LabState]:
        try:
            with changing.changing(self.paths) as state:
                yield state
        finally:
            self._cache = None

    def up(
        self,
        manifests: Manifests,
        settings: LabSettings | None = None,
        loop: LoopSettings | None = None,
        apiserver: ApiServerOptions | None = None,
    ) -> ChangeReport:
        """Build the lab; LabExistsError when it is already there (nothing is changed then).

        With `loop` it also starts the loop (a collector and one agent per node) and returns once
        every agent is connected. With `apiserver` the lab gets an API server of its own that
        holds its cluster (lab/mirroring.py), and the collector reads the cluster from it.
        """
        if apiserver is not None:
            return mirroring.up(self.paths, manifests, settings or LabSettings(), loop, apiserver)
        return changing.up(self.paths, manifests, settings or LabSettings(), loop)

    # With an API server every change is written into the API and the lab follows the API
    # (lab/mirroring.py); without one the lab changes itself (lab/changing.py).

    def apply(self, manifests: Manifests, *, prune: bool = False) -> ChangeReport:
        """Create or update what the manifests declare (`prune`: and delete everything else)."""
        with self._changing() as state:
            if state.apiserver is not None:
                desired = merged(state, manifests, prune=prune)
                return mirroring.change(self.paths, state, desired)
            return changing.apply(self.paths, state, manifests, prune=prune)

    def delete(self, manifests: Manifests) -> ChangeReport:
        """Delete what the manifests name (a Namespace document takes everything in it along)."""
        with self._changing() as state:
            if state.apiserver is not None:
                desired, missing = without(state, manifests)
                report = mirroring.change(self.paths, state, desired)
                report.notes += [f"not found (nothing to delete): {m}" for m in missing]
                return report
            return changing.delete(self.paths, state, manifests)

    def label_pod(self, key: str, changes: Sequence[str]) -> ChangeReport:
        parsed = parse_label_changes(changes)
        with self._changing() as state:
            if state.apiserver is not None:
                return mirroring.change(self.paths, state, with_pod_labels(state, key, parsed))
            return changing.label_pod(self.paths, state, key, parsed)

    def label_namespace(self, name: str, changes: Sequence[str]) -> ChangeReport:
        parsed = parse_namespace_label_changes(name, changes)
        with self._changing() as state:
            if state.apiserver is not None:
                desired = with_namespace_labels(state, name, parsed)
                return mirroring.change(self.paths, state, desired)
            return changing.label_namespace(self.paths, state, name, parsed)

    def fault(self, mode: str, args: Sequence[str] = ()) -> ChangeReport:
        """Make enforcement deviate (`clear` ends every fault and enforces the policies now)."""
        change = parse_fault(mode, args)
        with self._changing() as state:
            notes = ignored_policy_notes(state, args[0]) if mode == "ignore-policy" else []
            report = change_faults(self.paths, state, change)
            report.notes += notes
            return report

    def reconcile_probe_pods(self, requests: Sequence[Any]) -> ChangeReport | None:
        """Run exactly the requested probe pods (objects with `namespace`, `name`, `labels`).

        A probe pod is a pod like any other (namespace, cgroup, a process with no listener,
        written to the cluster file) that is never Ready and never a destination. Those no longer
        requested are deleted. None when nothing had to change (then the lock is not taken).
        """
        wanted = probe_pod_requests(requests)
        if self.state().apiserver is not None:
            raise LabError("a lab with an API server has its collector make probe pods there")
        if changing.probe_pods_settled(self.state(), wanted):
            return None
        with self._changing() as state:
            return changing.reconcile_probe_pods(self.paths, state, wanted)

    # --- the loop: collector and agents ----------------------------------------------------------

    def loop_start(self, component: str = "all") -> list[str]:
        """Start the loop processes `component` names that are not running; the roles started."""
        with self._changing() as state:
            return processes.start_roles(
                self.paths, state, processes.loop_targets(state, component)
            )

    def loop_stop(self, component: str = "all") -> list[str]:
        """Stop (SIGKILL, by recorded pid) what `component` names; the roles that were running."""
        with self._changing() as state:
            processes.require_loop(self.paths, state)
            return processes.stop_roles(self.paths, state, processes.loop_targets(state, component))

    def loop_restart(self, component: str = "all") -> list[str]:
        """Stop, then start again (same ports and token); the roles started."""
        with self._changing() as state:
            processes.require_loop(self.paths, state)
            roles = processes.loop_targets(state, component)
            processes.stop_roles(self.paths, state, roles)
            return processes.start_roles(self.paths, state, roles)

    # --- down ------------------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Remove everything the lab created (also after a crash); what was removed, by kind."""
        try:
            return teardown.down(self.paths)
        finally:
            self._cache = None


def read_manifests(paths: Sequence[str | os.PathLike[str]]) -> Manifests:
    """Read manifest files and directories with the collector's inventory (InputError if bad)."""
    docs = load_documents(paths)
    snapshot = snapshot_from_documents(docs)
    declared = frozenset(d.key[2] for d in docs if d.kind == "Namespace")
    expectations = tuple(dict(d.obj) for d in docs if d.kind == "FlowExpectations")
    sources = {
        f"{d.key[1]}/{d.key[2]}": d.where
        for d in docs
        if d.kind == "Pod" or d.kind in WORKLOAD_KINDS
    }
    return Manifests(
        namespaces=snapshot.namespaces,
        declared_namespaces=declared,
        pods=snapshot.pods,
        policies=snapshot.policies,
        expectations=expectations,
        cluster_policies=snapshot.cluster_policies,
        warnings=snapshot.warnings,
        sources=sources,
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
