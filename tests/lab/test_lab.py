"""The lab with real namespaces, nftables and traffic: topology, changes, DNS, outside, faults, down.

Every test builds its own small lab (unique name, temporary state directory) and the fixture
checks afterwards that nothing carrying the lab's name is left on the host.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from labtools import assert_nothing_left, lab_unavailable, leftovers, pod, run, unique_name

from collector.core.checking import check
from collector.core.model import (
    IPBlock,
    LabelSelector,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyPort,
    Rule,
)
from collector.reading.manifests import load_snapshot
from flowproof.errors import InputError
from lab import system
from lab.cli import main
from lab.errors import LabExistsError
from lab.lifecycle import Lab, manifests_from, read_manifests
from lab.probing import fetch, probe_matrix, probe_outcomes, resolve

pytestmark = pytest.mark.lab

MakeLab = Callable[..., Lab]
TIMEOUT = 0.3


def select(**labels: str) -> LabelSelector:
    return LabelSelector(match_labels=tuple(sorted(labels.items())))


def allow_from(
    namespace: str, name: str, target: str, source: str, *ports: PolicyPort
) -> NetworkPolicy:
    return NetworkPolicy(
        namespace=namespace,
        name=name,
        pod_selector=select(app=target),
        ingress=(Rule(peers=(Peer(pod_selector=select(app=source)),), ports=tuple(ports)),),
    )


def deny_all(namespace: str, *, egress: bool = False) -> NetworkPolicy:
    return NetworkPolicy(
        namespace=namespace,
        name="deny-all",
        policy_types=("ingress", "egress") if egress else ("ingress",),
    )


def three_pods() -> list:
    """a on node-1, b on node-2, c on node-3 (fixed addresses), all in namespace `x`."""
    return [
        pod("x", "a", ips=("10.244.1.11",)),
        pod("x", "b", ips=("10.244.2.11",)),
        pod("x", "c", ips=("10.244.3.11",)),
    ]


def matrix(
    lab: Lab, keys: list[str], port: int, protocol: str = "TCP"
) -> dict[tuple[str, str], bool]:
    pairs = [(s, d) for s in keys for d in keys if s != d]
    return run(probe_matrix(lab, pairs, port, protocol, TIMEOUT))


def link_json(netns: str, device: str, *options: str) -> dict[str, Any]:
    """`ip -j [options] link show device` in `netns`, parsed."""
    out = subprocess.run(
        ["ip", "-n", netns, "-j", *options, "link", "show", device],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(json.loads(out)[0])


def fabric_packets(lab: Lab, node: int) -> int:
    names = lab.state().settings.names
    link = link_json(names.fabric_netns, names.fabric_port(node), "-s")
    return int(link["stats64"]["rx"]["packets"])


# --- topology ---------------------------------------------------------------------------------------


def test_pods_reach_each_other_across_nodes_through_the_fabric(make_lab: MakeLab) -> None:
    lab = make_lab(manifests_from(three_pods()))
    before = fabric_packets(lab, 1)
    outcome, banner = run(fetch(lab, "x/a", "x/b", 80, send=b"", timeout=1.0))
    assert (outcome, banner) == ("CONNECTED", b"x/b\n")
    assert fabric_packets(lab, 1) > before, "a -> b (node-1 -> node-2) did not cross the fabric"
    outcome, echo = run(fetch(lab, "x/c", "x/a", 81, "UDP", send=b"ping", timeout=1.0))
    assert (outcome, echo) == ("CONNECTED", b"x/a\nping")
    assert all(matrix(lab, ["x/a", "x/b", "x/c"], 80).values())


def bridge_mac_of(lab: Lab, node: int) -> str:
    names = lab.state().settings.names
    return str(link_json(names.node_netns(node), names.bridge)["address"])


def test_a_pod_that_comes_and_goes_leaves_its_nodes_gateway_mac_as_it_was(
    make_lab: MakeLab,
) -> None:
    # A bridge left to itself takes the lowest MAC of its ports: a pod whose veth has the lowest
    # one moves the gateway's MAC, and when it goes, the pods that learned that MAC lose their
    # gateway until their neighbour entry fails (CI saw 20 s of timeouts after a probe pod went).
    lab = make_lab(manifests_from(three_pods()))
    gateway_mac = bridge_mac_of(lab, 1)
    assert gateway_mac == "02:00:0a:f4:01:01"
    lab.apply(manifests_from([pod("x", "d", ips=("10.244.1.12",))]))
    state = lab.state()
    newcomer, source = state.pod("x/d"), state.pod("x/a")
    assert newcomer is not None and source is not None
    node = state.settings.names.node_netns(1)
    # The lowest unicast MAC there is, on the node's end of the new pod's veth.
    subprocess.run(
        ["ip", "-n", node, "link", "set", newcomer.veth, "address", "00:00:00:00:00:01"],
        check=True,
    )
    assert bridge_mac_of(lab, 1) == gateway_mac
    # x/a learns its gateway's MAC again now, with the newcomer there, then the newcomer goes.
    subprocess.run(["ip", "-n", source.netns, "neigh", "flush", "all"], check=True)
    assert run(fetch(lab, "x/a", "x/b", 80, send=b"", timeout=1.0))[0] == "CONNECTED"
    lab.delete(manifests_from([pod("x", "d")]))
    assert bridge_mac_of(lab, 1) == gateway_mac
    assert run(fetch(lab, "x/a", "x/b", 80, send=b"", timeout=1.0))[0] == "CONNECTED"


def test_pod_servers_run_in_kubelet_style_pod_cgroups_inside_the_pod_namespace(
    make_lab: MakeLab,
) -> None:
    lab = make_lab(manifests_from(three_pods()))
    for record in lab.state().pods:
        assert record.server is not None
        cgroup = Path(f"/proc/{record.server.pid}/cgroup").read_text()
        uid = record.uid.replace("-", "_")
        assert (
            f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice/"
            in cgroup
        )
        assert f"/cri-containerd-{record.container_id}.scope" in cgroup
        assert (
            os.stat(f"/proc/{record.server.pid}/ns/net").st_ino
            == os.stat(system.netns_path(record.netns)).st_ino
        )


@pytest.mark.parametrize(
    "cgroup_root",
    [
        pytest.param("", id="cgroupfs names in the cgroup v2 hierarchy"),
        pytest.param("/sys/fs/cgroup/pids", id="cgroupfs names in a cgroup v1 hierarchy"),
    ],
)
def test_the_cgroupfs_layout_names_pods_as_kubelet_does_without_systemd(
    make_lab: MakeLab, cgroup_root: str
) -> None:
    if cgroup_root and not os.path.exists(os.path.join(cgroup_root, "cgroup.procs")):
        pytest.skip(f"no cgroup v1 hierarchy at {cgroup_root}")
    lab = make_lab(
        manifests_from([pod("x", "a")]), cgroup_driver="cgroupfs", cgroup_root=cgroup_root
    )
    record = lab.state().pod("x/a")
    assert record is not None and record.server is not None
    cgroup = Path(f"/proc/{record.server.pid}/cgroup").read_text()
    assert f"/kubepods/besteffort/pod{record.uid}/{record.container_id}" in cgroup


def test_host_network_pods_share_the_node_namespace_and_are_never_isolated(
    make_lab: MakeLab,
) -> None:
    pods = [pod("x", "a", ips=("10.244.1.11",)), pod("x", "h", host_network=True, node="node-2")]
    lab = make_lab(manifests_from(pods, [deny_all("x", egress=True)]))
    host = lab.state().pod("x/h")
    assert host is not None and host.server is not None
    assert (host.ip, host.netns) == ("10.244.2.1", lab.state().settings.names.node_netns(2))
    assert host.key not in lab.state().desired, "a hostNetwork pod got its own table"
    assert (
        run(fetch(lab, "x/h", "198.51.100.10", 80, send=b"GET / HTTP/1.0\r\n\r\n"))[0]
        == "CONNECTED"
    )
    assert matrix(lab, ["x/a", "x/h"], 80)[("x/a", "x/h")] is False, "a's egress is isolated"


def test_workloads_start_replicas_with_fresh_uids_and_daemonsets_one_per_node(
    make_lab: MakeLab,
) -> None:
    api = pod("shop", "api", workload="Deployment/api", replicas=3)
    agent = pod("mon", "agent", workload="DaemonSet/agent", replicas=1)
    lab = make_lab(manifests_from([api, agent]), nodes=2)
    state = lab.state()
    names = sorted(r.key for r in state.pods)
    assert names == [
        "kube-system/coredns",
        "mon/agent-1",
        "mon/agent-2",
        "shop/api-0",
        "shop/api-1",
        "shop/api-2",
    ]
    assert len({r.uid for r in state.pods}) == len(state.pods)
    assert {r.node for r in state.pods if r.workload == "DaemonSet/agent"} == {1, 2}


def test_cluster_files_read_back_with_uids_nodes_addresses_and_policies(make_lab: MakeLab) -> None:
    policy = allow_from("x", "b-from-a", "b", "a", PolicyPort(port="web"))
    lab = make_lab(manifests_from(three_pods(), [policy]))
    snapshot = load_snapshot([lab.paths.cluster_dir])
    state = lab.state()
    by_key = {p.key: p for p in snapshot.pods}
    for record in state.pods:
        read = by_key[record.key]
        assert (read.uid, read.ips, read.node, dict(read.labels)) == (
            record.uid,
            (record.ip,),
            f"node-{record.node}",
            record.labels,
        )
        assert read.ports == record.container_ports
    (read_policy,) = snapshot.policies
    assert read_policy.key == "x/b-from-a"
    assert (read_policy.pod_selector, read_policy.ingress) == (policy.pod_selector, policy.ingress)
    assert snapshot.namespaces["x"].labels["kubernetes.io/metadata.name"] == "x"


def test_the_shop_example_comes_up_and_reality_matches_its_declared_flows(
    make_lab: MakeLab,
) -> None:
    shop = Path(__file__).resolve().parents[2] / "examples" / "shop"
    lab = make_lab(read_manifests([shop]))
    snapshot = load_snapshot([lab.paths.cluster_dir])
    report = check(snapshot)
    assert report.checks and not report.failed, "the model disagrees with the shop's intent"
    wrong = []
    for item in report.checks:
        flow = item.flow
        destination = (
            flow.destination.key if isinstance(flow.destination, Pod) else flow.destination
        )
        if flow.dns_name is not None:
            answer = run(
                resolve(lab, flow.source.key, flow.dns_name, server=destination, timeout=TIMEOUT)
            )
            allowed = answer.outcome == "CONNECTED" and answer.rcode == "NOERROR"
        elif flow.http_path is not None:
            request = f"GET {flow.http_path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            outcome, body = run(
                fetch(lab, flow.source.key, destination, flow.port, send=request, timeout=TIMEOUT)
            )
            allowed = outcome == "CONNECTED" and body.startswith(b"HTTP/1.1 200")
        else:
            seen = run(
                probe_matrix(
                    lab, [(flow.source.key, destination)], flow.port, flow.protocol, TIMEOUT
                )
            )
            allowed = seen[(flow.source.key, destination)]
        if allowed is not flow.intent:
            wrong.append(
                f"{flow.key}: intent {'allow' if flow.intent else 'deny'}, reality {'allow' if allowed else 'deny'}"
            )
    assert not wrong, "\n".join(wrong)


# --- changes ------------------------------------------------------------------------------------


def test_policy_changes_and_relabels_take_effect(make_lab: MakeLab) -> None:
    lab = make_lab(manifests_from(three_pods()))
    keys = ["x/a", "x/b", "x/c"]
    report = lab.apply(manifests_from(policies=[deny_all("x"), allow_from("x", "to-b", "b", "a")]))
    assert report.generation == 2 and report.enforced_generation == 2
    seen = matrix(lab, keys, 80)
    assert [pair for pair, ok in seen.items() if ok] == [("x/a", "x/b")]

    lab.label_pod("x/c", ["app=a"])  # c now passes as a source of the allow rule
    seen = matrix(lab, keys, 80)
    assert sorted(pair for pair, ok in seen.items() if ok) == [("x/a", "x/b"), ("x/c", "x/b")]

    lab.label_pod("x/c", ["app-"])
    lab.delete(manifests_from(policies=[deny_all("x")]))
    seen = matrix(lab, keys, 80)
    assert sorted(pair for pair, ok in seen.items() if not ok) == [("x/c", "x/b")]
    assert lab.state().enforced_generation == lab.state().generation == 5


def test_namespace_labels_select_peers(make_lab: MakeLab) -> None:
    pods = [pod("x", "a", ips=("10.244.1.11",)), pod("y", "b", ips=("10.244.2.11",))]
    policy = NetworkPolicy(
        namespace="x",
        name="from-trusted",
        pod_selector=LabelSelector(),
        ingress=(Rule(peers=(Peer(namespace_selector=select(trust="yes")),)),),
    )
    lab = make_lab(manifests_from(pods, [policy]))
    assert matrix(lab, ["x/a", "y/b"], 80)[("y/b", "x/a")] is False
    lab.label_namespace("y", ["trust=yes"])
    assert matrix(lab, ["x/a", "y/b"], 80)[("y/b", "x/a")] is True


def test_apply_scales_workloads_and_delete_removes_their_pods(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    lab = make_lab(manifests_from([pod("shop", "api", workload="Deployment/api", replicas=1)]))
    lab.apply(manifests_from([pod("shop", "api", workload="Deployment/api", replicas=3)]))
    assert sorted(r.name for r in lab.state().pods if r.namespace == "shop") == [
        "api-0",
        "api-1",
        "api-2",
    ]
    assert (
        run(fetch(lab, "shop/api-2", "shop/api-0", 80, send=b"GET / HTTP/1.0\r\n\r\n"))[0]
        == "CONNECTED"
    )
    removed = lab.state().pod("shop/api-2")
    assert removed is not None
    lab.apply(manifests_from([pod("shop", "api", workload="Deployment/api", replicas=2)]))
    assert removed.netns not in system.list_netns()
    lab.delete(manifests_from([pod("shop", "api", workload="Deployment/api")]))
    assert [r.key for r in lab.state().pods] == ["kube-system/coredns"]


def test_bad_input_changes_nothing(make_lab: MakeLab, tmp_path: Path) -> None:
    lab = make_lab(manifests_from(three_pods()))
    before = lab.paths.state_file.read_text()
    with pytest.raises(InputError, match="already the address of x/a"):
        lab.apply(manifests_from([pod("y", "z", ips=("10.244.1.11",))]))
    with pytest.raises(InputError, match="label"):
        lab.label_pod("x/a", ["bad key=1"])
    with pytest.raises(InputError, match="no pod"):
        lab.label_pod("x/nope", ["a=b"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec: {podSelector: {matchLabels: {'a b': c}}}\n"
    )
    with pytest.raises(InputError):
        lab.apply(read_manifests([bad]))
    after = json.loads(lab.paths.state_file.read_text())
    assert after == json.loads(before)


def test_up_on_an_existing_lab_says_so_and_changes_nothing(make_lab: MakeLab) -> None:
    lab = make_lab(manifests_from([pod("x", "a")]))
    before = lab.paths.state_file.read_text()
    with pytest.raises(LabExistsError, match="already up"):
        Lab(lab.name, lab.paths.state_dir).up(manifests_from([pod("x", "b")]))
    assert lab.paths.state_file.read_text() == before


# --- DNS and the outside ------------------------------------------------------------------------


def test_cluster_dns_answers_and_default_deny_egress_breaks_it(make_lab: MakeLab) -> None:
    pods = [pod("shop", "api", workload="Deployment/api", replicas=2), pod("shop", "web")]
    lab = make_lab(manifests_from(pods))
    state = lab.state()
    api_ips = sorted(r.ip for r in state.pods if r.workload == "Deployment/api")
    web = state.pod("shop/web")
    assert web is not None
    answer = run(resolve(lab, "shop/web", "api.shop.svc.cluster.local"))
    assert (answer.rcode, sorted(answer.addresses)) == ("NOERROR", api_ips)
    dashed = web.ip.replace(".", "-")
    assert run(
        resolve(lab, "shop/api-0", f"{dashed}.shop.pod.cluster.local", protocol="TCP")
    ).addresses == (web.ip,)
    assert run(resolve(lab, "shop/web", "outside.example")).addresses == ("198.51.100.10",)
    assert run(resolve(lab, "shop/web", "nothing.shop.svc.cluster.local")).rcode == "NXDOMAIN"

    lab.apply(manifests_from(policies=[deny_all("shop", egress=True)]))
    broken = run(resolve(lab, "shop/web", "api.shop.svc.cluster.local", timeout=TIMEOUT))
    assert broken.outcome in ("UNREACHABLE", "TIMEOUT")

    dns = NetworkPolicy(
        namespace="shop",
        name="allow-dns",
        pod_selector=LabelSelector(),
        policy_types=("egress",),
        egress=(
            Rule(
                peers=(
                    Peer(
                        namespace_selector=select(**{"kubernetes.io/metadata.name": "kube-system"}),
                        pod_selector=select(**{"k8s-app": "kube-dns"}),
                    ),
                ),
                ports=(PolicyPort(protocol="UDP", port=53), PolicyPort(protocol="TCP", port=53)),
            ),
        ),
    )
    lab.apply(manifests_from(policies=[dns]))
    assert run(resolve(lab, "shop/web", "api.shop.svc.cluster.local")).rcode == "NOERROR"


def test_dns_runs_in_the_manifests_kube_dns_pods_when_there_are_some(make_lab: MakeLab) -> None:
    coredns = pod(
        "kube-system",
        "coredns",
        {"k8s-app": "kube-dns"},
        ports=((53, "UDP", "dns"), (53, "TCP", "dns-tcp")),
        workload="Deployment/coredns",
        replicas=2,
    )
    lab = make_lab(manifests_from([coredns, pod("x", "a")]))
    keys = sorted(r.key for r in lab.state().pods)
    assert keys == ["kube-system/coredns-0", "kube-system/coredns-1", "x/a"]
    assert run(resolve(lab, "x/a", "a.x.svc.cluster.local")).rcode == "NOERROR"


def test_the_outside_answers_and_egress_ipblocks_with_excepts_hold(make_lab: MakeLab) -> None:
    lab = make_lab(manifests_from([pod("x", "a")]))
    status, body = run(
        fetch(lab, "x/a", "198.51.100.11", 443, send=b"GET / HTTP/1.1\r\nHost: o\r\n\r\n")
    )
    assert (
        status == "CONNECTED"
        and body.startswith(b"HTTP/1.1 200 OK")
        and body.endswith(b"outside\n")
    )
    assert run(fetch(lab, "x/a", "198.51.100.12", 123, "UDP", send=b"t"))[0] == "CONNECTED"
    policy = NetworkPolicy(
        namespace="x",
        name="internet",
        pod_selector=LabelSelector(),
        policy_types=("egress",),
        egress=(
            Rule(
                peers=(
                    Peer(
                        ip_block=IPBlock(
                            cidr=ipaddress.ip_network("198.51.100.0/24"),
                            excepts=(ipaddress.ip_network("198.51.100.11/32"),),
                        )
                    ),
                )
            ),
        ),
    )
    lab.apply(manifests_from(policies=[policy]))
    seen = run(
        probe_matrix(lab, [("x/a", "198.51.100.10"), ("x/a", "198.51.100.11")], 80, "TCP", TIMEOUT)
    )
    assert seen == {("x/a", "198.51.100.10"): True, ("x/a", "198.51.100.11"): False}


# --- faults -------------------------------------------------------------------------------------


def test_fault_ignore_policy_enforces_as_if_the_policy_was_not_there(make_lab: MakeLab) -> None:
    lab = make_lab(manifests_from(three_pods(), [deny_all("x")]))
    assert not any(matrix(lab, ["x/a", "x/b"], 80).values())
    lab.fault("ignore-policy", ["x/deny-all"])
    assert all(matrix(lab, ["x/a", "x/b"], 80).values())
    lab.fault("clear")
    assert not any(matrix(lab, ["x/a", "x/b"], 80).values())


def test_fault_reject_answers_with_a_reset_or_admin_prohibited(make_lab: MakeLab) -> None:
    lab = make_lab(manifests_from(three_pods(), [deny_all("x")]))
    lab.fault("reject")
    tcp = run(probe_outcomes(lab, [("x/a", "x/b")], 80, "TCP", TIMEOUT))
    udp = run(probe_outcomes(lab, [("x/a", "x/b")], 81, "UDP", TIMEOUT))
    assert (tcp[("x/a", "x/b")], udp[("x/a", "x/b")]) == ("REFUSED", "UNREACHABLE")
    lab.fault("clear")
    tcp = run(probe_outcomes(lab, [("x/a", "x/b")], 80, "TCP", TIMEOUT))
    assert tcp[("x/a", "x/b")] == "TIMEOUT"


def test_fault_lag_delays_enforcement_by_that_long(make_lab: MakeLab) -> None:
    lab = make_lab(manifests_from(three_pods()))
    lab.fault("lag", ["1.5"])
    started = time.monotonic()
    report = lab.apply(manifests_from(policies=[deny_all("x")]))
    assert report.due_in_seconds == 1.5
    assert matrix(lab, ["x/a", "x/b"], 80)[("x/a", "x/b")] is True, "enforced before the lag"
    assert lab.status()["pending"], "the lagged change is not shown as pending"
    while time.monotonic() - started < 5:
        if not matrix(lab, ["x/a", "x/b"], 80)[("x/a", "x/b")]:
            break
    waited = time.monotonic() - started
    assert 1.3 <= waited < 3.5, f"enforced after {waited:.2f}s with a lag of 1.5s"
    state = lab.state()
    assert state.enforced_generation == state.generation and not state.pending


def test_fault_lag_survives_the_command_that_made_the_change(make_lab: MakeLab) -> None:
    lab = make_lab(manifests_from(three_pods()))
    lab.fault("lag", ["1"])
    policy_file = lab.paths.root.parent / "deny.yaml"
    policy_file.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": "deny", "namespace": "x"},
                "spec": {"podSelector": {}},
            }
        )
    )
    code = subprocess.run(
        [
            sys.executable,
            "-m",
            "lab",
            "--name",
            lab.name,
            "--state-dir",
            str(lab.paths.state_dir),
            "apply",
            "-f",
            str(policy_file),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert code.returncode == 0, code.stderr
    time.sleep(1.6)
    assert matrix(lab, ["x/a", "x/b"], 80)[("x/a", "x/b")] is False


def test_fault_ignore_named_ports_denies_what_a_named_port_allows(make_lab: MakeLab) -> None:
    lab = make_lab(
        manifests_from(
            three_pods(), [deny_all("x"), allow_from("x", "b", "b", "a", PolicyPort(port="web"))]
        )
    )
    assert matrix(lab, ["x/a", "x/b"], 80)[("x/a", "x/b")] is True
    lab.fault("ignore-named-ports")
    assert matrix(lab, ["x/a", "x/b"], 80)[("x/a", "x/b")] is False


def test_fault_ignore_endport_allows_only_the_first_port_of_a_range(make_lab: MakeLab) -> None:
    ports = ((80, "TCP", None), (81, "TCP", None))
    pods = [pod("x", "a", ports=ports), pod("x", "b", ports=ports)]
    lab = make_lab(
        manifests_from(
            pods, [deny_all("x"), allow_from("x", "b", "b", "a", PolicyPort(port=80, end_port=81))]
        )
    )
    assert matrix(lab, ["x/a", "x/b"], 81)[("x/a", "x/b")] is True
    lab.fault("ignore-endport")
    assert matrix(lab, ["x/a", "x/b"], 80)[("x/a", "x/b")] is True
    assert matrix(lab, ["x/a", "x/b"], 81)[("x/a", "x/b")] is False


def test_fault_input_is_checked(make_lab: MakeLab) -> None:
    lab = make_lab(manifests_from([pod("x", "a")]))
    for mode, args in (
        ("lag", ["soon"]),
        ("ignore-policy", ["nope"]),
        ("reject", ["x"]),
        ("wobble", []),
    ):
        with pytest.raises(InputError):
            lab.fault(mode, args)
    assert lab.state().faults.describe() == []


# --- the command line and crashes ---------------------------------------------------------------


def test_cli_up_status_down_with_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if (reason := lab_unavailable()) is not None:
        pytest.skip(reason)
    name, state_dir = unique_name(), str(tmp_path / "state")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        yaml.safe_dump_all(
            [
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": "a", "namespace": "x", "labels": {"app": "a"}},
                    "spec": {
                        "containers": [
                            {"name": "c", "image": "i", "ports": [{"containerPort": 80}]}
                        ]
                    },
                },
            ]
        )
    )
    common = ["--name", name, "--state-dir", state_dir]
    state = None
    try:
        owner = ["--owner-pid", str(os.getpid())]
        assert main([*common, "up", "-f", str(manifest), "--nodes", "2", *owner]) == 0
        assert f"lab {name} is up" in capsys.readouterr().out
        state = Lab(name, state_dir).paths.load()
        assert main(["up", *common, "-f", str(manifest)]) == 1
        assert "already up" in capsys.readouterr().err
        assert main(["label", *common, "pod", "x/a", "bad key=v"]) == 2
        assert main(["status", *common, "-o", "json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert [p["key"] for p in status["pods"]] == ["kube-system/coredns", "x/a"]
        assert main(["status", *common]) == 0
        assert "x/a" in capsys.readouterr().out
        assert main(["fault", *common, "reject"]) == 0
        assert main(["down", *common]) == 0
        assert main(["down", *common]) == 1
        assert "no lab named" in capsys.readouterr().err
    finally:
        if Lab(name, state_dir).exists():
            Lab(name, state_dir).down()
        assert_nothing_left(name, state)


def test_down_after_a_killed_up_removes_everything(tmp_path: Path) -> None:
    if (reason := lab_unavailable()) is not None:
        pytest.skip(reason)
    name, state_dir = unique_name(), tmp_path / "state"
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "w", "namespace": "x"},
                "spec": {
                    "replicas": 60,
                    "selector": {"matchLabels": {"app": "w"}},
                    "template": {
                        "metadata": {"labels": {"app": "w"}},
                        "spec": {
                            "containers": [
                                {"name": "c", "image": "i", "ports": [{"containerPort": 80}]}
                            ]
                        },
                    },
                },
            }
        )
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lab",
            "--name",
            name,
            "--state-dir",
            str(state_dir),
            "up",
            "-f",
            str(manifest),
            "--owner-pid",
            str(os.getpid()),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = None
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if any(n.startswith(f"{name}-x.") for n in system.list_netns()):
                break
            time.sleep(0.005)
        else:
            pytest.fail("lab up never created a pod namespace")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert leftovers(name, None), "nothing was built before the kill: the test proves nothing"
        lab = Lab(name, state_dir)
        state = lab.paths.load()
        lab.down()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if Lab(name, state_dir).exists():
            Lab(name, state_dir).down()
    assert_nothing_left(name, state)


def test_a_lab_goes_down_by_itself_when_its_owner_process_ends(make_lab: MakeLab) -> None:
    owner = subprocess.Popen(["sleep", "30"])
    try:
        lab = make_lab(manifests_from([pod("x", "a")]), owner_pid=owner.pid)
        state = lab.state()
        assert (
            run(fetch(lab, "x/a", "outside", 80, send=b"GET / HTTP/1.0\r\n\r\n"))[0] == "CONNECTED"
        )
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 10
    while lab.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not lab.exists(), "the lab outlived its owner"
    assert_nothing_left(lab.name, state)
