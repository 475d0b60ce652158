"""`lab status`: one JSON-ready report of a lab's nodes, pods, policies, enforcement and loop.

Owns the report's shape (the CLI prints it as tables or JSON; tests read it). Reads only: it
takes the lab's lock to read a consistent state and never changes the lab.
"""

from __future__ import annotations

import os
import time
from typing import Any

from lab import loop as looping
from lab import system
from lab.cluster import expectations_key, is_dns_pod
from lab.config import AddressPlan
from lab.enforcement import isolation
from lab.enforcing import enforcement_input
from lab.merging import policy_key
from lab.processes import loop_processes, node_names
from lab.state import APISERVER_ROLES, LabPaths, LabState, ProcessRecord


def status(paths: LabPaths) -> dict[str, Any]:
    """The report of the lab at `paths` (NoSuchLabError when there is none)."""
    with paths.locked():
        state = paths.load()
    settings = state.settings
    now = time.time()
    return {
        "name": paths.name,
        "phase": state.phase,
        "stateDir": str(paths.root),
        "clusterDir": str(paths.cluster_dir),
        "nodes": _nodes(state),
        "pods": _pods(state),
        "namespaces": state.namespaces,
        "policies": sorted(policy_key(p) for p in state.policies),
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
        "outside": {"netns": settings.names.outside_netns, "ips": list(settings.outside_ips)},
        "routes": [f"blackhole {r.dst} metric {r.metric}" for r in state.routes],
        "loop": _loop(state),
        "apiserver": _apiserver(state),
    }


def _nodes(state: LabState) -> list[dict[str, Any]]:
    names, plan = state.settings.names, AddressPlan(state.settings)
    return [
        {
            "name": names.node_name(n),
            "netns": names.node_netns(n),
            "podCIDR": str(plan.node_subnet(n)),
            "address": plan.gateway(n),
            "pods": sum(1 for r in state.pods if r.node == n),
        }
        for n in range(1, state.settings.nodes + 1)
    ]


def _pods(state: LabState) -> list[dict[str, Any]]:
    names = state.settings.names
    isolated = isolation(enforcement_input(state))
    return [
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
    ]


def _process(process: ProcessRecord | None) -> dict[str, Any]:
    return {
        "pid": process.pid if process else None,
        "running": bool(process and system.is_running(process)),
    }


def _loop(state: LabState) -> dict[str, Any] | None:
    if state.loop is None:
        return None
    processes = loop_processes(state)
    return {
        "url": state.loop.url,
        "grpcAddress": f"{looping.LOOPBACK}:{state.loop.grpc_port}",
        "tokenFile": state.loop.token_file,
        "settings": state.loop.settings,
        "collector": _process(processes.get(looping.COLLECTOR_ROLE)),
        "agents": [
            {"node": node, **_process(processes.get(looping.agent_role(node)))}
            for node in node_names(state)
        ],
    }


def _apiserver(state: LabState) -> dict[str, Any] | None:
    """The lab's own API server (`up --apiserver`), or None."""
    if state.apiserver is None:
        return None
    processes = {p.role: p for p in state.processes}
    return {
        "url": state.apiserver.url,
        "kubeconfig": state.apiserver.admin_kubeconfig,
        "probePodNamespaces": state.apiserver.probe_pod_namespaces,
        "processes": {role: _process(processes.get(role)) for role in APISERVER_ROLES},
    }
