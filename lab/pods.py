"""A lab's pods on the host: network namespaces, veths, cgroups and the server in each.

Owns creating and removing pods (recorded in the state BEFORE they are created, forgotten only
after they are gone), the spec of each pod's server and starting servers through the supervisor
(also the outside namespace's), and the cluster DNS zone the DNS pods serve. It never decides
which pods should exist: lab/changing.py asks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

from lab import network, system
from lab.cluster import dns_records, is_dns_pod
from lab.config import LabSettings
from lab.enforcement import digest
from lab.errors import LabError
from lab.podserver import ServerSpec
from lab.processes import ProcessSpec, start_processes, supervisor_socket
from lab.state import LabPaths, LabState, PodRecord, write_atomically

OUTSIDE_KEY = "outside"
OUTSIDE_ROLE = "outside"


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
    return system.under(paths.log_dir, key.replace("/", ".") + ".log")


def create_pods(paths: LabPaths, state: LabState, records: Sequence[PodRecord]) -> None:
    """Namespaces, veths, addresses and cgroups of new pods (recorded in the state first)."""
    if not records:
        return
    settings, names = state.settings, state.settings.names
    state.pods += list(records)
    own = [r for r in records if not r.host_network]
    state.netns += [r.netns for r in own if r.netns not in state.netns]
    if not state.cgroups:
        state.cgroups = [names.cgroup_top(settings.cgroup_driver)]
    paths.save(state)
    if own:
        system.run_many(
            [system.ip_batch([f"netns add {system.check_netns_name(r.netns)}" for r in own])]
        )
        by_node: dict[int, list[str]] = {}
        for record in own:
            by_node.setdefault(record.node, []).extend(network.pod_link_commands(settings, record))
        system.run_many(
            [
                system.ip_batch(cmds, names.node_netns(node))
                for node, cmds in sorted(by_node.items())
            ]
        )
        system.run_many([system.ip_batch(network.pod_commands(settings, r), r.netns) for r in own])
    system.make_cgroups(state.cgroup_root, [r.cgroup for r in records])


def remove_pods(paths: LabPaths, state: LabState, records: Sequence[PodRecord]) -> None:
    """Stop the pods' servers, remove their cgroups and namespaces, then forget them."""
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
    paths.save(state)


def _outside_spec(paths: LabPaths, settings: LabSettings) -> ProcessSpec:
    """The outside namespace's server: every outside port, UDP replies from each address."""
    return ProcessSpec(
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
        log_file=_log_file(paths, OUTSIDE_KEY),
    )


def start_servers(paths: LabPaths, state: LabState, records: Sequence[PodRecord | None]) -> None:
    """Start (or restart) servers; `None` stands for the outside namespace's server."""
    specs = [
        _outside_spec(paths, state.settings)
        if record is None
        else ProcessSpec(
            key=record.key,
            netns=record.netns,
            cgroup=record.cgroup,
            server=server_spec(record, paths),
            log_file=_log_file(paths, record.key),
        )
        for record in records
    ]
    if not specs:
        return
    started = start_processes(supervisor_socket(paths, state), specs)
    for spec in specs:
        process = started[spec.key]
        if spec.key == OUTSIDE_KEY:
            process.role = OUTSIDE_ROLE
            state.processes.append(process)
            continue
        record = state.pod(spec.key)
        assert record is not None
        record.server = process
        record.server_spec = _spec_digest(spec.server)
    paths.save(state)


def stop_stale_servers(paths: LabPaths, records: Iterable[PodRecord]) -> list[PodRecord]:
    """Stop the servers of `records` that are gone or serve an outdated spec; those pods (their
    servers are to be started again)."""
    stale = [
        r
        for r in records
        if r.server is None
        or r.server_spec != _spec_digest(server_spec(r, paths))
        or not system.is_running(r.server)
    ]
    if stale:
        system.stop_processes([r.server for r in stale if r.server is not None])
    return stale


def dns_text(state: LabState) -> str:
    """The cluster DNS zone the DNS pods serve, as written to dns.json."""
    return json.dumps(dns_records(state.pods, state.settings), sort_keys=True)


def write_dns(paths: LabPaths, state: LabState) -> None:
    """Rewrite the cluster DNS zone (before new servers start: a DNS pod reads it)."""
    write_atomically(paths.dns_records, dns_text(state))
