"""The lab's topology as `ip -batch` commands: fabric router, nodes with bridges, pods, outside.

Owns the shape of the lab network: node N is a namespace with a bridge holding 10.244.N.1 and an
uplink to the fabric namespace, which routes between nodes and to the outside namespace (the
"internet", documentation addresses). Pure: it only writes command lines; lab/system.py runs them.
Nothing here ever touches the host namespace.
"""

from __future__ import annotations

import ipaddress

from lab.config import POD_INTERFACE, AddressPlan, LabSettings, Names
from lab.state import PodRecord

FORWARDING = ("net.ipv4.ip_forward=1",)


def fabric_commands(settings: LabSettings) -> list[str]:
    """In the fabric namespace: a veth to every node and to the outside, and routes to them."""
    names, plan = settings.names, AddressPlan(settings)
    commands = ["link set lo up"]
    for node in range(1, settings.nodes + 1):
        port = names.fabric_port(node)
        router, far = plan.fabric_link(node)
        commands += [
            f"link add {port} type veth peer name {names.node_uplink} "
            f"netns {names.node_netns(node)}",
            f"addr add {router}/30 dev {port}",
            f"link set {port} up",
        ]
    router, far = plan.fabric_link(0)
    port = names.fabric_outside_port
    commands += [
        f"link add {port} type veth peer name {POD_INTERFACE} netns {names.outside_netns}",
        f"addr add {router}/30 dev {port}",
        f"link set {port} up",
    ]
    for node in range(1, settings.nodes + 1):
        commands.append(f"route add {plan.node_subnet(node)} via {plan.fabric_link(node)[1]}")
    commands.append(f"route add {plan.outside_network} via {far}")
    return commands


def bridge_mac(gateway: str) -> str:
    """The node bridge's own MAC: locally administered unicast `02:00` and the gateway's IPv4
    address (10.244.3.1 -> 02:00:0a:f4:03:01), so it is fixed and differs between nodes."""
    octets = ipaddress.IPv4Address(gateway).packed
    return ":".join(f"{b:02x}" for b in (0x02, 0x00, *octets))


def node_commands(settings: LabSettings, node: int) -> list[str]:
    """In node N's namespace: the bridge (the pods' gateway), the uplink and its default route."""
    names, plan = settings.names, AddressPlan(settings)
    router, far = plan.fabric_link(node)
    subnet = plan.node_subnet(node)
    gateway = plan.gateway(node)
    return [
        "link set lo up",
        # A fixed address: a bridge without one takes the lowest address of its ports, so a pod
        # whose veth has the lowest one would change the gateway's MAC when it comes and, when it
        # goes, leave every pod that learned it sending to a MAC nobody has (CI saw this).
        f"link add {names.bridge} address {bridge_mac(gateway)} type bridge",
        f"addr add {gateway}/{subnet.prefixlen} dev {names.bridge}",
        f"link set {names.bridge} up",
        f"addr add {far}/30 dev {names.node_uplink}",
        f"link set {names.node_uplink} up",
        # The node speaks with its bridge address everywhere, like a node's InternalIP.
        f"route add default via {router} dev {names.node_uplink} src {gateway}",
    ]


def pod_link_commands(settings: LabSettings, pod: PodRecord) -> list[str]:
    """In the pod's node namespace: the pod's veth (its other end is eth0 in the pod)."""
    names = settings.names
    return [
        f"link add {pod.veth} type veth peer name {POD_INTERFACE} netns {pod.netns}",
        f"link set {pod.veth} master {names.bridge}",
        f"link set {pod.veth} up",
    ]


def pod_commands(settings: LabSettings, pod: PodRecord) -> list[str]:
    """In the pod's namespace: loopback, its address and the default route via the node bridge."""
    plan = AddressPlan(settings)
    subnet = plan.node_subnet(pod.node)
    return [
        "link set lo up",
        f"addr add {pod.ip}/{subnet.prefixlen} dev {POD_INTERFACE}",
        f"link set {POD_INTERFACE} up",
        f"route add default via {plan.gateway(pod.node)}",
    ]


def outside_commands(settings: LabSettings) -> list[str]:
    """In the outside namespace: the documentation addresses, routed back through the fabric.

    The whole outside range is local here (a `local` route, "AnyIP"), so any address of it that
    an expectation names answers, not only the listed ones.
    """
    plan = AddressPlan(settings)
    router, far = plan.fabric_link(0)
    commands = ["link set lo up", f"addr add {far}/30 dev {POD_INTERFACE}"]
    commands += [f"addr add {ip}/32 dev {POD_INTERFACE}" for ip in settings.outside_ips]
    commands += [
        f"route add local {plan.outside_network} dev lo",
        f"link set {POD_INTERFACE} up",
        f"route add default via {router}",
    ]
    return commands


def outside_udp_addresses(settings: LabSettings) -> tuple[str, ...]:
    """Where the outside's UDP servers bind: every address of a small range (replies must come
    from the address asked), else the listed ones."""
    network = AddressPlan(settings).outside_network
    if network.num_addresses <= 256:
        return tuple(str(ip) for ip in network.hosts())
    return settings.outside_ips


def infra_netns(settings: LabSettings) -> list[str]:
    names: Names = settings.names
    return [
        names.fabric_netns,
        names.outside_netns,
        *(names.node_netns(n) for n in range(1, settings.nodes + 1)),
    ]
