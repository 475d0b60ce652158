"""A lab's changes: `up`, then each `apply`, `delete`, `label` and probe-pod request, locked.

Owns the order of every change: validate everything first (bad input changes nothing), record each
object in the state BEFORE creating it, create, enforce, start the pods' processes, then rewrite
the cluster file the collector reads (a pod is listed once its process runs, as kubelet reports).
What a change asks for is lab/merging.py's; the pods, enforcement and processes are done by
lab/pods.py, lab/enforcing.py and lab/processes.py. It must never leave an object it created
unrecorded, nor remove one it did not record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from flowproof.errors import InputError
from lab import network, system
from lab.applying import apply_rulesets
from lab.cluster import (
    Manifests,
    Placement,
    expectations_key,
    namespace_manifest,
    needs_new_pod,
    pod_manifest,
)
from lab.config import AddressPlan, LabSettings
from lab.enforcement import compile_rulesets, digest
from lab.enforcing import enforce, enforcement_input, load_cluster_policies, load_policies
from lab.errors import LabError, LabExistsError
from lab.loop import LoopSettings
from lab.merging import (
    Desired,
    LabelChanges,
    is_lab_probe_pod,
    merged,
    policy_key,
    render_labels,
    with_namespace_labels,
    with_pod_labels,
    with_probe_pods,
    without,
)
from lab.pods import (
    create_pods,
    dns_text,
    remove_pods,
    start_servers,
    stop_stale_servers,
    write_dns,
)
from lab.processes import spawn, start_loop
from lab.report import ChangeReport
from lab.state import LabPaths, LabState, PodRecord, RouteRecord, write_atomically
from lab.teardown import teardown

log = logging.getLogger(__name__)

ROUTE_METRIC_BASE = 4200


@contextlib.contextmanager
def changing(paths: LabPaths) -> Iterator[LabState]:
    """The state of a lab that is up, locked; saved when the change ends (also on an error)."""
    system.require_root()
    with paths.locked():
        state = paths.load()
        if state.phase != "up":
            raise LabError(
                f"lab {paths.name} is {state.phase!r}, not up: run `lab down` and start again"
            )
        try:
            yield state
        finally:
            paths.save(state)


# --- up ------------------------------------------------------------------------------------------


def up(
    paths: LabPaths, manifests: Manifests, settings: LabSettings, loop: LoopSettings | None
) -> ChangeReport:
    """Build the lab; LabExistsError when it is already there (nothing is changed then).

    With `loop` it also starts the loop (a collector and one agent per node) and returns once
    every agent is connected.
    """
    started = time.monotonic()
    settings = _checked(paths, settings, loop)
    with paths.locked():
        if paths.exists():
            raise LabExistsError(
                f"lab {paths.name!r} is already up (state in {paths.root}); "
                "use `lab apply` to change it or `lab down` to remove it"
            )
        state, desired, records = _planned(paths, settings, manifests)
        for directory in (paths.root, paths.log_dir, paths.nft_dir):
            directory.mkdir(parents=True, exist_ok=True)
        paths.save(state)  # nothing exists yet: every later object is recorded first
        report = ChangeReport()
        try:
            _build(paths, state, records, report)
            if loop is not None:
                start_loop(paths, state, loop)
                report.notes.append(
                    f"loop: collector {state.loop.url if state.loop else '?'}, "
                    f"{settings.nodes} agents connected"
                )
        except BaseException:
            problems = teardown(paths, state)
            if not problems:
                shutil.rmtree(paths.root, ignore_errors=True)
            else:
                log.error("could not undo everything: %s; run `lab down`", "; ".join(problems))
            raise
        report.created = [f"{r.key} ({r.ip} on node-{r.node})" for r in records]
        report.policies = sorted(desired.policies)
        report.notes += [f"warning: {w}" for w in manifests.warnings]
        report.seconds = time.monotonic() - started
        return report


def _checked(paths: LabPaths, settings: LabSettings, loop: LoopSettings | None) -> LabSettings:
    """The settings of a new lab, validated, with its owner's start time; root is required."""
    settings = dataclasses.replace(settings, name=paths.name).validate()
    if loop is not None:
        loop.validate()
    system.require_root()
    if settings.owner_pid and not settings.owner_start:
        start = system.process_start(settings.owner_pid)
        if start is None:
            raise InputError(f"no process {settings.owner_pid}", field="--owner-pid")
        settings = dataclasses.replace(settings, owner_start=start)
    return settings


def _planned(
    paths: LabPaths, settings: LabSettings, manifests: Manifests
) -> tuple[LabState, Desired, list[PodRecord]]:
    """The state of the lab to build (nothing created yet), what it asks for, its pods placed."""
    cgroup_root = system.check_cgroup_root(settings.cgroup_root or system.detect_cgroup_root())
    state = LabState(settings=settings, cgroup_root=cgroup_root)
    desired = merged(state, manifests, prune=False)
    placement = Placement(settings, [], 1)
    specs = list(desired.pods.values())
    for spec in specs:
        placement.check_fixed(spec)
    records = [placement.place(spec) for spec in specs]
    state.next_index = placement.next_index
    state.namespaces = desired.namespaces
    state.policies = list(desired.policies.values())
    state.expectations = list(desired.expectations.values())
    candidate = _copy(state)
    candidate.pods = [dataclasses.replace(r) for r in records]
    _check_renders(candidate)  # bad input builds nothing

    plan = AddressPlan(settings)
    # Start from a metric of the lab's own (from its name), so labs brought up at the same
    # moment by different processes do not both pick the lowest free one.
    metric = system.free_metric(
        plan.blackholes, ROUTE_METRIC_BASE + zlib.crc32(paths.name.encode()) % 60000
    )
    state.routes = [RouteRecord(dst=dst, metric=metric) for dst in plan.blackholes]
    state.netns = network.infra_netns(settings)
    state.cgroups = [settings.names.cgroup_top(settings.cgroup_driver)]
    return state, desired, records


def _build_network(state: LabState) -> None:
    """Blackholes, then the fabric, node and outside namespaces and the infra cgroup."""
    settings, names = state.settings, state.settings.names
    nodes = range(1, settings.nodes + 1)
    # The blackholes come first: from here on no lab address can leave the host. (All of them
    # carry the one metric `_planned` chose.)
    system.add_blackholes([r.dst for r in state.routes], state.routes[0].metric)
    system.run_many(
        [system.ip_batch([f"netns add {system.check_netns_name(n)}" for n in state.netns])]
    )
    system.run_many([system.ip_batch(network.fabric_commands(settings), names.fabric_netns)])
    system.run_many(
        [
            *(
                system.ip_batch(network.node_commands(settings, n), names.node_netns(n))
                for n in nodes
            ),
            system.ip_batch(network.outside_commands(settings), names.outside_netns),
            *(
                system.sysctl_job(ns, network.FORWARDING)
                for ns in (names.fabric_netns, *(names.node_netns(n) for n in nodes))
            ),
        ]
    )
    system.make_cgroups(state.cgroup_root, [names.infra_cgroup(settings.cgroup_driver)])


def _build(
    paths: LabPaths, state: LabState, records: Sequence[PodRecord], report: ChangeReport
) -> None:
    """Create everything the planned state names, recording as it goes; the lab is then up."""
    _build_network(state)
    state.processes.append(spawn(paths, state))
    paths.save(state)
    create_pods(paths, state, records)
    enforce(paths, state, report)
    write_dns(paths, state)
    start_servers(paths, state, [*records, None])
    write_cluster(paths, state)  # a pod is listed once its process runs
    state.phase = "up"
    paths.save(state)


# --- changes to a lab that is up -----------------------------------------------------------------


@dataclasses.dataclass
class _Change:
    """A change worked out in full before anything is touched (see `_prepare`)."""

    candidate: LabState  # the state the lab will have once the change is done
    remove: list[PodRecord]
    keep: dict[str, PodRecord]
    new_records: list[PodRecord]
    policy_changes: list[str]


def _copy(state: LabState) -> LabState:
    return LabState.from_json(state.to_json())


def _prepare(state: LabState, desired: Desired) -> _Change:
    """Validate and render the whole change on a copy of the state: placement, the policies read
    back, the kernel rules compiled, state.json, the cluster file and the DNS zone rendered. Any
    problem is raised here, before the first change (bad input changes nothing)."""
    current = {r.key: r for r in state.pods}
    remove = [
        r for k, r in current.items() if k not in desired.pods or needs_new_pod(r, desired.pods[k])
    ]
    removed = {r.key for r in remove}
    keep = {k: r for k, r in current.items() if k not in removed}
    placement = Placement(state.settings, keep.values(), state.next_index)
    new_specs = [s for k, s in desired.pods.items() if k not in keep]
    for spec in new_specs:
        placement.check_fixed(spec)
    new_records = [placement.place(spec) for spec in new_specs]

    candidate = _copy(state)
    candidate.pods = [r for r in candidate.pods if r.key not in removed]
    _update_kept({r.key: r for r in candidate.pods}, desired)
    candidate.pods += [dataclasses.replace(r) for r in new_records]
    candidate.namespaces = desired.namespaces
    candidate.policies = list(desired.policies.values())
    candidate.expectations = list(desired.expectations.values())
    candidate.next_index = placement.next_index
    _check_renders(candidate)
    return _Change(
        candidate=candidate,
        remove=remove,
        keep=keep,
        new_records=new_records,
        policy_changes=_policy_changes(state.policies, desired.policies),
    )


def _check_renders(candidate: LabState) -> None:
    """Everything a change writes, rendered once for `candidate` and thrown away: the policies
    read back, the kernel rules, state.json, the cluster file and the DNS zone."""
    load_policies(candidate)  # the stored form must read back before anything changes
    load_cluster_policies(candidate)
    compile_rulesets(enforcement_input(candidate))
    try:
        candidate.to_json()
        cluster_text(candidate, "")
        dns_text(candidate)
    except (TypeError, ValueError) as exc:
        raise InputError(f"the change cannot be stored: {exc}") from exc


def reconcile(paths: LabPaths, state: LabState, desired: Desired) -> ChangeReport:
    """Make the lab match `desired`: everything is checked and rendered before the first change,
    then pods, kernel rules, servers, state and cluster file change; when a step fails, the
    kernel, the state and the cluster file are rolled back to the policies of before (the pods
    that now exist stay recorded), so the three never disagree."""
    started = time.monotonic()
    change = _prepare(state, desired)
    before = _copy(state)
    try:
        report = _commit(paths, state, desired, change)
    except BaseException as exc:
        log.error("lab %s: the change failed (%s); rolling back", paths.name, exc)
        _roll_back(paths, state, before)
        raise
    report.seconds = time.monotonic() - started
    return report


def _commit(paths: LabPaths, state: LabState, desired: Desired, change: _Change) -> ChangeReport:
    report = ChangeReport(policies=change.policy_changes)
    report.updated = _update_kept(change.keep, desired)
    state.namespaces = change.candidate.namespaces
    state.policies = change.candidate.policies
    state.expectations = change.candidate.expectations
    state.next_index = change.candidate.next_index
    paths.save(state)  # record before removing or creating anything

    remove_pods(paths, state, change.remove)
    create_pods(paths, state, change.new_records)
    enforce(paths, state, report)
    write_dns(paths, state)
    restart = stop_stale_servers(paths, change.keep.values())
    start_servers(paths, state, [*change.new_records, *restart])
    write_cluster(paths, state)  # a pod is listed once its process runs (as kubelet reports)
    paths.save(state)
    removed = {r.key for r in change.remove}
    report.created = [f"{r.key} ({r.ip} on node-{r.node})" for r in change.new_records]
    report.deleted = sorted(removed - {r.key for r in change.new_records})
    report.restarted = sorted(r.key for r in restart)
    return report


def _roll_back(paths: LabPaths, state: LabState, before: LabState) -> None:
    """Put the policies, namespaces, expectations and labels of `before` back, on the pods that
    exist now, into the kernel (every pod's table replaced), state.json and the cluster file.
    Best effort: a step that fails again is logged and the others still run."""
    restored = _copy(before)
    old = {r.key: r for r in before.pods}
    pods = _copy(state).pods
    for record in pods:
        previous = old.get(record.key)
        if previous is not None:
            record.labels = dict(previous.labels)
            record.ports = list(previous.ports)
            record.workload = previous.workload
            record.managed = previous.managed
    restored.pods = pods
    for name in ("netns", "cgroups", "processes", "next_index", "applier", "loop", "routes"):
        setattr(restored, name, getattr(state, name))
    restored.generation = state.generation + 1
    rulesets = compile_rulesets(enforcement_input(restored))
    restored.desired = {k: digest(t) for k, t in rulesets.items()}
    # Unknown until re-applied: every table is replaced in one transaction (never merged into).
    restored.applied = dict.fromkeys(rulesets, "")
    restored.pending = list(before.pending)
    steps: list[tuple[str, Callable[[], object]]] = [
        ("kernel rules", lambda: apply_rulesets(paths, restored, rulesets)),
        ("DNS zone", lambda: write_dns(paths, restored)),
        ("cluster file", lambda: write_cluster(paths, restored)),
    ]
    for what, step in steps:
        try:
            step()
        except Exception as exc:
            log.error("lab %s: rolling back the %s failed: %s", paths.name, what, exc)
    restored.enforced_generation = restored.generation
    for f in dataclasses.fields(LabState):
        setattr(state, f.name, getattr(restored, f.name))
    try:
        paths.save(state)
    except Exception as exc:
        log.error(
            "lab %s: saving the rolled-back state failed: %s; run `lab down`", paths.name, exc
        )


def _policy_changes(
    old: Sequence[Mapping[str, Any]], new: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """`<key> created|configured|deleted` for each policy a change touches."""
    before = {policy_key(p): p for p in old}
    changes = []
    for key, doc in new.items():
        if key not in before:
            changes.append(f"{key} created")
        elif before[key] != doc:
            changes.append(f"{key} configured")
    return changes + [f"{k} deleted" for k in before if k not in new]


def _update_kept(keep: Mapping[str, PodRecord], desired: Desired) -> list[str]:
    """Give the pods that stay their desired labels and ports; the keys of those that changed."""
    updated = []
    for key, record in keep.items():
        spec = desired.pods[key]
        ports = [(p.port, p.protocol, p.name) for p in spec.ports]
        if dict(spec.labels) != record.labels or ports != record.ports:
            updated.append(key)
        record.labels = dict(spec.labels)
        record.ports = ports
        record.workload = spec.workload
        record.managed = spec.managed
    return updated


def apply(paths: LabPaths, state: LabState, manifests: Manifests, *, prune: bool) -> ChangeReport:
    """Create or update what the manifests declare (`prune`: and delete everything else)."""
    report = reconcile(paths, state, merged(state, manifests, prune=prune))
    report.notes += [f"warning: {w}" for w in manifests.warnings]
    return report


def delete(paths: LabPaths, state: LabState, manifests: Manifests) -> ChangeReport:
    """Delete what the manifests name (a Namespace document takes everything in it along)."""
    desired, missing = without(state, manifests)
    report = reconcile(paths, state, desired)
    report.notes += [f"not found (nothing to delete): {m}" for m in missing]
    return report


def label_pod(paths: LabPaths, state: LabState, key: str, changes: LabelChanges) -> ChangeReport:
    desired = with_pod_labels(state, key, changes)
    report = reconcile(paths, state, desired)
    report.updated = [f"pod {key} labels {render_labels(desired.pods[key].labels)}"]
    return report


def label_namespace(
    paths: LabPaths, state: LabState, name: str, changes: LabelChanges
) -> ChangeReport:
    desired = with_namespace_labels(state, name, changes)
    report = reconcile(paths, state, desired)
    report.updated = [f"namespace {name} labels {render_labels(desired.namespaces[name])}"]
    return report


def probe_pods_settled(state: LabState, wanted: Mapping[str, Any]) -> bool:
    """Does the lab run exactly the `wanted` probe pods, each with its process running?"""
    have = {r.key: r for r in state.pods if is_lab_probe_pod(r.name, r.labels)}
    return set(have) == set(wanted) and all(
        r.server is not None and system.is_running(r.server) for r in have.values()
    )


def reconcile_probe_pods(
    paths: LabPaths, state: LabState, wanted: Mapping[str, Any]
) -> ChangeReport | None:
    """Run exactly the `wanted` probe pods; None when nothing had to change."""
    if probe_pods_settled(state, wanted):
        return None
    return reconcile(paths, state, with_probe_pods(state, wanted))


def cluster_text(state: LabState, name: str) -> str:
    """The manifests the collector reads for a lab in `state` (one JSON document per line)."""
    plan = AddressPlan(state.settings)
    docs: list[dict[str, Any]] = [
        namespace_manifest(ns, labels) for ns, labels in sorted(state.namespaces.items())
    ]
    docs += [
        pod_manifest(r, plan.gateway(r.node))
        for r in sorted(state.pods, key=lambda r: (r.namespace, r.name))
    ]
    docs += sorted(state.policies, key=policy_key)
    docs += sorted(state.expectations, key=expectations_key)
    # One JSON document per line (JSON is YAML): many times faster to write than block YAML.
    text = (
        f"# The cluster of flowproof lab {name!r}, rewritten by the lab on every change\n"
        f"# (generation {state.generation}). Read it with the manifest inventory; never edit.\n"
    )
    return text + "".join(f"---\n{json.dumps(doc)}\n" for doc in docs)


def write_cluster(paths: LabPaths, state: LabState) -> None:
    """Rewrite the manifests the collector reads, atomically."""
    write_atomically(paths.cluster_file, cluster_text(state, paths.name))
