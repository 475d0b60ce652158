"""The lab's settings, address plan and the names of everything it creates.

Owns the one place where a lab name becomes namespace, veth and cgroup names, and where the pod,
service, fabric and outside ranges are carved up. Pure: it computes names and addresses and never
touches the system. Every name carries the lab name, so two labs never collide.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from collector.core.resolving import DEFAULT_CLUSTER_DNS_IP
from flowproof.errors import InputError

CgroupDriver = Literal["systemd", "cgroupfs"]

DEFAULT_NAME = "fp"
DEFAULT_STATE_DIR = Path("/var/lib/flowproof/lab")
NAME_PATTERN = re.compile(r"[a-z][a-z0-9]{0,7}")
MAX_NODES = 32
UID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
"""A pod uid as the API server issues it (an RFC 4122 UUID, lowercase): the lab builds cgroup
paths from it, so nothing else may pass."""
_CONTAINER_ID = re.compile(r"[0-9a-f]{64}")
NFT_TABLE = "flowproof"  # `table inet flowproof` inside each pod namespace (never in the host's)
POD_INTERFACE = "eth0"


def check_name(name: str) -> str:
    """The lab name, or InputError: 1-8 lowercase letters and digits, starting with a letter.

    Short and without dashes so that `<name>v<index>` veth names stay within 15 characters and
    `<name>-` prefixes of two labs never overlap.
    """
    if not NAME_PATTERN.fullmatch(name):
        raise InputError(
            f"{name!r} is not a valid lab name: use 1-8 lowercase letters and digits, "
            "starting with a letter",
            field="--name",
        )
    return name


@dataclass(frozen=True)
class LabSettings:
    """How a lab is built; stored in its state so that later commands use the same plan."""

    name: str = DEFAULT_NAME
    """Lab name: prefix of every namespace, veth and cgroup the lab creates."""
    nodes: int = 3
    """Number of nodes (`node-1` … `node-N`), each a network namespace with a bridge."""
    pod_cidr: str = "10.244.0.0/16"
    """The pod network; node N gets the N-th subnet of `node_prefix_length` (10.244.N.0/24)."""
    node_prefix_length: int = 24
    """Prefix length of each node's pod range."""
    service_cidr: str = "10.96.0.0/16"
    """The service network (blackholed in the host); holds the cluster DNS address."""
    dns_service_ip: str = DEFAULT_CLUSTER_DNS_IP
    """The cluster DNS address; each pod DNATs it to a DNS pod."""
    fabric_cidr: str = "10.253.0.0/24"
    """Point-to-point /30 links between the fabric router and each node (and the outside)."""
    outside_cidr: str = "198.51.100.0/24"
    """The "internet": a documentation range routed to the outside namespace (TEST-NET-2; the
    other two documentation ranges are often used by sandboxes and CI hosts themselves)."""
    outside_ips: tuple[str, ...] = ("198.51.100.10", "198.51.100.11", "198.51.100.12")
    """Addresses of the outside namespace, each answering TCP/HTTP 80, 443 and UDP 53, 123."""
    cluster_domain: str = "cluster.local"
    """The DNS suffix of pod and service names."""
    cgroup_driver: CgroupDriver = "systemd"
    """systemd: `kubepods.slice/…-pod<uid>.slice/cri-containerd-<id>.scope`; cgroupfs:
    `kubepods/besteffort/pod<uid>/<id>` (kubelet's two layouts)."""
    cgroup_root: str = ""
    """The cgroup hierarchy to build in; empty: the cgroup v2 mount (detected)."""
    owner_pid: int = 0
    """A process whose death takes the lab down (tests, `lab test`); 0: none."""
    owner_start: int = 0
    """The owner's start time (/proc/PID/stat field 22), so a recycled pid is not mistaken."""
    outside_tcp_ports: tuple[int, ...] = (80, 443)
    outside_udp_ports: tuple[int, ...] = (53, 123)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Unused keys read from a newer state file, kept so nothing is lost."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("extra")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabSettings:
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("outside_ips", "outside_tcp_ports", "outside_udp_ports"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    def validate(self) -> LabSettings:
        """Check the plan can work; raises InputError naming the flag."""
        check_name(self.name)
        if not 1 <= self.nodes <= MAX_NODES:
            raise InputError(f"must be from 1 to {MAX_NODES}, not {self.nodes}", field="--nodes")
        plan = AddressPlan(self)
        if self.node_prefix_length - plan.pod_network.prefixlen < 1:
            raise InputError(
                "the pod range is too small for one subnet per node", field="--pod-cidr"
            )
        if 2 ** (self.node_prefix_length - plan.pod_network.prefixlen) <= self.nodes:
            raise InputError(
                f"{self.pod_cidr} has too few /{self.node_prefix_length} subnets for "
                f"{self.nodes} nodes",
                field="--pod-cidr",
            )
        if plan.fabric_network.num_addresses < 4 * (self.nodes + 1):
            raise InputError(f"{self.fabric_cidr} is too small", field="--fabric-cidr")
        if parse_address(self.dns_service_ip, "--dns-ip") not in plan.service_network:
            raise InputError(
                f"{self.dns_service_ip} is not in the service range {self.service_cidr}",
                field="--dns-ip",
            )
        for ip in self.outside_ips:
            if parse_address(ip, "--outside-ip") not in plan.outside_network:
                raise InputError(f"{ip} is not in {self.outside_cidr}", field="--outside-cidr")
        networks = [
            ("--pod-cidr", plan.pod_network),
            ("--service-cidr", plan.service_network),
            ("--fabric-cidr", plan.fabric_network),
            ("--outside-cidr", plan.outside_network),
        ]
        for i, (flag, net) in enumerate(networks):
            for special, what in _NEVER:
                if net.overlaps(special):
                    raise InputError(
                        f"{net} overlaps {special}, the {what} range: the lab never uses it "
                        "(its addresses mean something else on every host)",
                        field=flag,
                    )
            if not net.is_private and not _is_documentation(net):
                raise InputError(
                    f"{net} is neither a private nor a documentation range; the lab only uses "
                    "ranges that never route to the internet",
                    field=flag,
                )
            for other_flag, other in networks[i + 1 :]:
                if net.overlaps(other):
                    raise InputError(f"{net} overlaps {other_flag} {other}", field=flag)
        for flag, net in networks:
            for used, what in host_networks():
                if net.overlaps(used):
                    raise InputError(
                        f"{net} overlaps {used}, which this host uses ({what}); blackholing it "
                        "would cut the host off: choose another range",
                        field=flag,
                    )
        return self

    @property
    def names(self) -> Names:
        return Names(self.name)

    @property
    def plan(self) -> AddressPlan:
        return AddressPlan(self)


_NEVER: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(cidr), what)
    for cidr, what in (
        ("0.0.0.0/8", "'this network'"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local (and cloud metadata)"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved and broadcast"),
    )
)
"""Ranges no lab range may touch, though Python calls some of them private."""

_DOCUMENTATION = tuple(
    ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
)


def host_networks() -> list[tuple[ipaddress.IPv4Network, str]]:
    """IPv4 networks the host itself routes or resolves through (not default, not blackholes).

    A lab blackholes its ranges in the root namespace; a range the host already uses (its own
    subnet, a route, its DNS server) must never be one of them.
    """
    found: list[tuple[ipaddress.IPv4Network, str]] = []
    try:
        done = subprocess.run(
            ["ip", "-j", "-4", "route", "show", "table", "all"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        routes = json.loads(done.stdout or "[]")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        routes = []
    for route in routes:
        dst = route.get("dst", "")
        if route.get("type") in ("blackhole", "broadcast") or dst in ("default", ""):
            continue
        try:
            net = ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False)
        except ValueError:
            continue
        if isinstance(net, ipaddress.IPv4Network) and not net.is_loopback:
            if route.get("type") == "local":
                found.append((net, f"its own address on {route.get('dev', '?')}"))
            else:
                found.append((net, f"route via {route.get('dev', '?')}"))
    try:
        with open("/etc/resolv.conf", encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    with contextlib.suppress(ValueError):
                        addr = ipaddress.ip_address(parts[1])
                        if addr.version == 4 and not addr.is_loopback:
                            found.append((ipaddress.IPv4Network(f"{addr}/32"), "its DNS server"))
    except OSError:
        pass
    return found


def _is_documentation(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    return any(
        net.version == doc.version and net.subnet_of(doc)  # type: ignore[arg-type]
        for doc in _DOCUMENTATION
    )


def parse_address(text: str, flag: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError as exc:
        raise InputError(f"{text[:80]!r} is not an IP address", field=flag) from exc


def parse_network(text: str, flag: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(text)
    except ValueError as exc:
        raise InputError(f"{text!r} is not a CIDR: {exc}", field=flag) from exc
    if not isinstance(net, ipaddress.IPv4Network):
        raise InputError(f"{text!r}: the lab is IPv4 only", field=flag)
    return net


class AddressPlan:
    """Which address goes where, computed from the settings."""

    def __init__(self, settings: LabSettings) -> None:
        self.settings = settings
        self.pod_network = parse_network(settings.pod_cidr, "--pod-cidr")
        self.service_network = parse_network(settings.service_cidr, "--service-cidr")
        self.fabric_network = parse_network(settings.fabric_cidr, "--fabric-cidr")
        self.outside_network = parse_network(settings.outside_cidr, "--outside-cidr")

    @property
    def blackholes(self) -> tuple[str, ...]:
        """Every range the lab uses: blackholed in the host namespace while the lab exists."""
        return tuple(
            str(n)
            for n in (
                self.pod_network,
                self.service_network,
                self.fabric_network,
                self.outside_network,
            )
        )

    def node_subnet(self, node: int) -> ipaddress.IPv4Network:
        """Node N's pod range: the N-th subnet of the pod network (10.244.N.0/24)."""
        size = 2 ** (32 - self.settings.node_prefix_length)
        base = int(self.pod_network.network_address) + node * size
        return ipaddress.IPv4Network((base, self.settings.node_prefix_length))

    def gateway(self, node: int) -> str:
        """The node bridge's address, the pods' default gateway (.1); also the node's own IP."""
        return str(self.node_subnet(node).network_address + 1)

    def node_of(self, ip: str) -> int | None:
        """The node whose pod range holds `ip`, if any node of this lab does."""
        address = ipaddress.ip_address(ip)
        for node in range(1, self.settings.nodes + 1):
            subnet = self.node_subnet(node)
            if address in subnet:
                return node
        return None

    def pod_addresses(self, node: int) -> list[str]:
        """Addresses a pod on `node` may take, in order (.2 up to the last before broadcast)."""
        subnet = self.node_subnet(node)
        return [str(ip) for ip in list(subnet.hosts())[1:]]

    def fabric_link(self, link: int) -> tuple[str, str]:
        """(router side, far side) addresses of fabric link `link`: 0 the outside, N node N."""
        base = int(self.fabric_network.network_address) + 4 * link
        return str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2))


@dataclass(frozen=True)
class Names:
    """Names of the lab's objects. Pod namespaces contain a dot; infrastructure ones never do."""

    lab: str

    @property
    def prefix(self) -> str:
        return f"{self.lab}-"

    @property
    def fabric_netns(self) -> str:
        return f"{self.lab}-fabric"

    @property
    def outside_netns(self) -> str:
        return f"{self.lab}-outside"

    def node_netns(self, node: int) -> str:
        return f"{self.lab}-node{node}"

    @staticmethod
    def node_name(node: int) -> str:
        """The Kubernetes node name (spec.nodeName) of node N."""
        return f"node-{node}"

    def pod_netns(self, namespace: str, name: str, index: int) -> str:
        # Namespace names have no dots, so `<ns>.<pod>` is unambiguous; very long names fall back.
        text = f"{self.lab}-{namespace}.{name}"
        return text if len(text) <= 120 else f"{self.lab}-pod.{index}"

    @property
    def bridge(self) -> str:
        return f"{self.lab}-br"

    @property
    def node_uplink(self) -> str:
        """The node's end of its fabric link (inside the node namespace)."""
        return f"{self.lab}-up"

    def fabric_port(self, node: int) -> str:
        """The fabric's end of node N's link (inside the fabric namespace)."""
        return f"{self.lab}-n{node}"

    @property
    def fabric_outside_port(self) -> str:
        return f"{self.lab}-out"

    def pod_veth(self, index: int) -> str:
        """The node-side end of pod `index`'s veth (the pod side is eth0 in the pod namespace)."""
        return f"{self.lab}v{index}"

    @property
    def cgroup_parent(self) -> str:
        return f"flowproof-{self.lab}.slice"

    def infra_cgroup(self, driver: CgroupDriver) -> str:
        """The cgroup of the lab's own processes (outside servers), under the lab's parent."""
        leaf = "flowproof-infra.scope" if driver == "systemd" else "flowproof-infra"
        return f"{self.cgroup_top(driver)}/{leaf}"

    def pod_cgroup(self, driver: CgroupDriver, uid: str, container_id: str) -> str:
        """The pod's container cgroup, relative to the hierarchy root, as kubelet names it."""
        if not UID_PATTERN.fullmatch(uid) or not _CONTAINER_ID.fullmatch(container_id):
            raise ValueError(f"refusing a cgroup for uid {uid[:80]!r}: not a uid the API issues")
        if driver == "systemd":
            uid_ = uid.replace("-", "_")
            return (
                f"{self.cgroup_parent}/kubepods.slice/kubepods-besteffort.slice/"
                f"kubepods-besteffort-pod{uid_}.slice/cri-containerd-{container_id}.scope"
            )
        return f"flowproof-{self.lab}/kubepods/besteffort/pod{uid}/{container_id}"

    def cgroup_top(self, driver: CgroupDriver) -> str:
        return self.cgroup_parent if driver == "systemd" else f"flowproof-{self.lab}"
