"""The destination policy agents enforce: every address the plan may probe, and what is declared.

Owns `destination_policy`: the pods' addresses, the cluster DNS address and every destination of
the plan (`networks`), and the subset expectations name themselves (`declared`: `cidr` targets and
the addresses of `host` and `dns` targets, the only ones that may open a special range on the
agent). The agent refuses any assignment outside it (flowproof.probes.DestinationPolicy), so a
collector that is not what it should be still cannot make agents probe elsewhere. Pure.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from collector.core.model import ExternalTarget, Snapshot
from collector.core.planning import Plan
from flowproof.probes import DestinationPolicy


def _host_network(address: str) -> str | None:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    return f"{ip}/{ip.max_prefixlen}"


def _collapsed(texts: Iterable[str]) -> tuple[str, ...]:
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for text in texts:
        net = ipaddress.ip_network(text, strict=False)
        if isinstance(net, ipaddress.IPv4Network):
            v4.append(net)
        else:
            v6.append(net)
    return tuple(str(n) for n in ipaddress.collapse_addresses(v4)) + tuple(
        str(n) for n in ipaddress.collapse_addresses(v6)
    )


def destination_policy(
    plans: Iterable[Plan], snapshot: Snapshot, cluster_dns_ip: str
) -> DestinationPolicy:
    """The policy for the current plan (and the ones before it whose assignments may still be
    queued): the union of what they probe, collapsed into as few networks as it takes."""
    networks: set[str] = set()
    declared: set[str] = set()
    for pod in snapshot.pods:
        networks.update(n for n in map(_host_network, pod.ips) if n)
    dns = _host_network(cluster_dns_ip)
    if dns:
        networks.add(dns)
    for expectations in snapshot.expectations:
        for flow in expectations.flows:
            target = flow.destination
            if isinstance(target, ExternalTarget) and target.cidr is not None:
                networks.add(str(target.cidr))
                declared.add(str(target.cidr))
    for plan in plans:
        for planned in plan.flows.values():
            template = planned.template
            if template is None:
                continue
            address = _host_network(template.destination_ip)
            if address is None:
                continue
            networks.add(address)
            if template.destination is None:  # not a pod: a `cidr`, `host` or `dns` target
                declared.add(address)
    # Declared networks stay as written: merging two /32s into a /31 would no longer lie within
    # the special range (the metadata address) an expectation opened.
    return DestinationPolicy(networks=_collapsed(networks), declared=tuple(sorted(declared)))


__all__ = ["destination_policy"]
