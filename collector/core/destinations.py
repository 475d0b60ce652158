"""The destination policy agents enforce: every address the plan may probe, and what is declared.

Owns `destination_policy`: the pods' addresses, the cluster DNS address and every destination of
the plan (`networks`), and the subset expectations name themselves (`declared`: `cidr` targets and
the addresses of `host` and `dns` targets, the only ones that may open a special range on the
agent). The agent refuses any assignment outside it (flowproof.probes.DestinationPolicy), so a
collector that is not what it should be still cannot make agents probe elsewhere. Pure.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from collector.core.model import ExternalTarget, Pod, Snapshot
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
    plans: Iterable[Plan],
    snapshot: Snapshot,
    cluster_dns_ip: str,
    *,
    earlier: Snapshot | None = None,
) -> DestinationPolicy:
    """The policy for the current plan (and the ones before it whose assignments may still be
    queued): the union of what they probe, collapsed into as few networks as it takes. The pods
    of an `earlier` snapshot are in it too (the sweep may still probe them until this plan is
    applied)."""
    networks: set[str] = set()
    declared: set[str] = set()
    for shot in (snapshot,) if earlier is None or earlier is snapshot else (snapshot, earlier):
        for pod in shot.pods:
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


def still_covers(
    policy: DestinationPolicy, plan: Plan, kept: Mapping[str, object], pods: Iterable[Pod]
) -> bool:
    """Whether `policy` already lets agents probe everything `plan` adds: the addresses of its
    flows that are not in `kept` (a flow kept as it was), and of `pods`. A plan updated for a few
    pods then keeps the policy it had (computing it costs a pass over every pod)."""
    for pod in pods:
        if any(policy.refusal(ip) is not None for ip in pod.ips):
            return False
    for key, planned in plan.flows.items():
        if kept.get(key) is planned or planned.template is None:
            continue
        address = planned.template.destination_ip
        if policy.refusal(address) is not None:
            return False
        if planned.template.destination is None and _host_network(address) not in policy.declared:
            return False  # a `cidr`, `host` or `dns` target is declared as its own network
    return True


__all__ = ["destination_policy", "still_covers"]
