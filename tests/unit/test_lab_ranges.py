"""Every lab range is one that means nothing else on this host: never loopback, link-local,
multicast, reserved, nor a range or address the host itself uses."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import subprocess

import pytest

from flowproof.errors import InputError
from lab import config
from lab.config import LabSettings

OTHERS = {
    "pod_cidr": "10.244.0.0/16",
    "service_cidr": "10.96.0.0/16",
    "fabric_cidr": "10.253.0.0/24",
    "outside_cidr": "198.51.100.0/24",
}


@pytest.mark.parametrize(
    ("field", "cidr", "why"),
    [
        pytest.param("pod_cidr", "127.0.0.0/16", "loopback", id="pods on loopback"),
        pytest.param("service_cidr", "127.16.0.0/16", "loopback", id="services on loopback"),
        pytest.param(
            "fabric_cidr", "169.254.169.0/24", "link-local", id="the fabric on link-local"
        ),
        pytest.param("pod_cidr", "169.254.0.0/16", "link-local", id="pods on the metadata range"),
        pytest.param("outside_cidr", "224.1.0.0/24", "multicast", id="the outside on multicast"),
        pytest.param("pod_cidr", "0.0.0.0/16", "'this network'", id="pods on 0.0.0.0/8"),
        pytest.param("service_cidr", "240.0.0.0/16", "reserved", id="services on 240/4"),
    ],
)
def test_special_ranges_are_refused_for_every_lab_range(field: str, cidr: str, why: str) -> None:
    values = dict(OTHERS, **{field: cidr})
    if field == "service_cidr":
        values["dns_service_ip"] = str(ipaddress.ip_network(cidr).network_address + 10)
    if field == "outside_cidr":
        base = ipaddress.ip_network(cidr).network_address
        values["outside_ips"] = (str(base + 10),)
    flag = "--" + field.replace("_", "-")
    with pytest.raises(InputError) as info:
        LabSettings(**values).validate()  # type: ignore[arg-type]
    assert info.value.field == flag
    assert why in info.value.reason, info.value.reason


def test_the_hosts_own_address_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    own = [(ipaddress.IPv4Network("10.244.7.9/32"), "its own address on eth0")]
    monkeypatch.setattr(config, "host_networks", lambda: own)
    with pytest.raises(InputError, match="its own address on eth0") as info:
        LabSettings().validate()
    assert info.value.field == "--pod-cidr"


def test_the_default_ranges_pass() -> None:
    settings = LabSettings()
    assert dataclasses.replace(settings).validate() == settings


def test_every_address_of_this_host_counts_as_used() -> None:
    out = subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True)
    addresses = [
        ipaddress.IPv4Address(info["local"])
        for link in json.loads(out.stdout)
        for info in link.get("addr_info", [])
        if not ipaddress.IPv4Address(info["local"]).is_loopback
    ]
    used = config.host_networks()
    for address in addresses:
        assert any(
            net == ipaddress.IPv4Network(f"{address}/32") and "its own address" in what
            for net, what in used
        ), (address, used)
