"""Taking a lab down: every recorded object removed, in the order that keeps the host safe.

Owns the teardown `lab down` runs, a failed `lab up` runs to undo itself, and the supervisor runs
when the lab's owner is gone: the loop first, then the supervisor, the servers, cgroups, network
namespaces, and the blackhole routes last (no lab address may leave the host before its namespace
is gone). It never removes an object the state does not name, except network namespaces carrying
the lab's own prefix. It stays light: the supervisor imports it.
"""

from __future__ import annotations

import contextlib
import os
import shutil

from lab import loop as looping
from lab import system
from lab.errors import LabError
from lab.processes import SUPERVISOR_ROLE, request, socket_path
from lab.state import LabPaths, LabState


def _stop_processes(paths: LabPaths, state: LabState) -> list[str]:
    """Stop the loop, the supervisor (politely) and every recorded process but the caller."""
    me = os.getpid()  # the supervisor itself runs this when its owner is gone
    # The loop first: no agent probes and no collector asks for probe pods while pods go.
    loop = [p for p in state.processes if looping.is_loop_role(p.role) and p.pid != me]
    problems = [f"process {p.pid} ({p.role})" for p in system.stop_processes(loop)]
    sup = next((p for p in state.processes if p.role == SUPERVISOR_ROLE), None)
    if sup is not None and sup.pid != me and system.is_running(sup):
        with contextlib.suppress(LabError):
            request(socket_path(paths.root), {"op": "shutdown"}, timeout=5)
    records = [r.server for r in state.pods if r.server is not None] + state.processes
    records = [r for r in records if r.pid != me]
    problems += [f"process {p.pid} ({p.role})" for p in system.stop_processes(records)]
    return problems


def teardown(paths: LabPaths, state: LabState) -> list[str]:
    """Remove every recorded object, in the safe order; the ones that would not go."""
    settings = state.settings
    if paths.root.exists():
        state.phase = "down"
        paths.save(state)
    problems = _stop_processes(paths, state)
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


def down(paths: LabPaths) -> list[str]:
    """Remove everything the lab created (also after a crash); what was removed, by kind."""
    system.require_root()
    with paths.locked():
        state = paths.load()
        netns = set(state.netns) | {r.netns for r in state.pods if not r.host_network}
        summary = [
            f"{len(state.pods)} pods",
            f"{len(netns)} network namespaces",
            f"{len(state.routes)} blackhole routes",
        ]
        problems = teardown(paths, state)
        if problems:
            raise LabError("could not remove: " + "; ".join(problems) + " (state kept; try again)")
        shutil.rmtree(paths.root, ignore_errors=True)
        return summary
