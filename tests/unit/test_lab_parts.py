"""The lab's pure parts, no root needed: policy compilation, placement, DNS, manifests, settings."""

from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from collector.core.model import (
    ClusterNetworkPolicy,
    ClusterPeer,
    ClusterRule,
    IPBlock,
    LabelSelector,
    NetworkPolicy,
    Peer,
    PolicyPort,
    Requirement,
    Rule,
)
from collector.reading.clusterpolicies import cluster_policy_from_dict
from collector.reading.fields import Where
from collector.reading.objects import policy_from_dict
from flowproof.errors import InputError
from lab.cluster import (
    Placement,
    PodSpec,
    cluster_policy_manifest,
    concrete_pods,
    dns_records,
    policy_manifest,
)
from lab.config import LabSettings, Names
from lab.dnsserver import answer
from lab.enforcement import EnforcementInput, compile_rulesets, transaction
from lab.faults import parse_fault
from lab.merging import parse_label_changes
from lab.state import Faults, LabState, PodRecord
from tests.support.builders import pod

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "conformance"))
from loader import load_npapi_cases

SEL_A = LabelSelector(match_labels=(("app", "a"),))


def lab_pods() -> list:
    return [
        pod("x", "a", ips=("10.244.1.11",), ports=((80, "TCP", "web"), (81, "UDP", None))),
        pod("x", "b", ips=("10.244.2.11",), ports=((8080, "TCP", "web"),)),
        pod("y", "c", ips=("10.244.3.11",)),
        pod("y", "h", ips=("10.244.3.1",), host_network=True),
    ]


def compiled(*policies: NetworkPolicy, faults: Faults | None = None) -> dict[str, str]:
    return compile_rulesets(
        EnforcementInput(
            pods=lab_pods(),
            namespaces={
                "x": {"kubernetes.io/metadata.name": "x"},
                "y": {"kubernetes.io/metadata.name": "y", "t": "1"},
            },
            policies=policies,
            faults=faults or Faults(),
            dns_backends=["10.244.1.5"],
        )
    )


@pytest.mark.parametrize(
    ("policy", "pod_key", "wanted", "unwanted"),
    [
        pytest.param(
            NetworkPolicy("x", "deny", LabelSelector()),
            "x/a",
            ["chain ingress", "ct state established,related accept", 'iif "lo" accept', "\t\tdrop"],
            ["chain egress", " accept comment"],
            id="an empty podSelector isolates every pod of the namespace for ingress and allows nothing",
        ),
        pytest.param(
            NetworkPolicy("x", "deny", LabelSelector(), policy_types=("egress",)),
            "x/a",
            ["chain egress", 'oif "lo" accept'],
            ["chain ingress"],
            id="policyTypes Egress alone isolates only egress",
        ),
        pytest.param(
            NetworkPolicy(
                "x", "p", SEL_A, ingress=(Rule(peers=(Peer(pod_selector=LabelSelector()),)),)
            ),
            "x/a",
            ["ip saddr { 10.244.1.11, 10.244.2.11 } accept"],
            ["10.244.3.11"],
            id="a podSelector peer alone selects pods of the policy's own namespace",
        ),
        pytest.param(
            NetworkPolicy(
                "x",
                "p",
                SEL_A,
                ingress=(
                    Rule(
                        peers=(Peer(namespace_selector=LabelSelector(match_labels=(("t", "1"),))),)
                    ),
                ),
            ),
            "x/a",
            ["ip saddr { 10.244.3.11 } accept"],
            ["10.244.3.1 "],
            id="a namespaceSelector peer selects every pod of the matching namespaces but never hostNetwork pods",
        ),
        pytest.param(
            NetworkPolicy(
                "x",
                "p",
                SEL_A,
                ingress=(
                    Rule(
                        ports=(
                            PolicyPort(port="web"),
                            PolicyPort(protocol="UDP", port=81, end_port=90),
                        )
                    ),
                ),
            ),
            "x/a",
            ["tcp dport { 80 } accept", "udp dport { 81-90 } accept"],
            ["ip saddr"],
            id="ingress named ports resolve on the selected pod itself and endPort makes a range",
        ),
        pytest.param(
            NetworkPolicy(
                "x",
                "p",
                SEL_A,
                policy_types=("egress",),
                egress=(
                    Rule(
                        peers=(Peer(pod_selector=LabelSelector()),), ports=(PolicyPort(port="web"),)
                    ),
                ),
            ),
            "x/a",
            [
                "ip daddr { 10.244.1.11 } tcp dport { 80 } accept",
                "ip daddr { 10.244.2.11 } tcp dport { 8080 } accept",
            ],
            [],
            id="egress named ports resolve on each destination pod",
        ),
        pytest.param(
            NetworkPolicy(
                "x",
                "p",
                SEL_A,
                policy_types=("egress",),
                egress=(
                    Rule(
                        peers=(
                            Peer(
                                ip_block=IPBlock(
                                    ipaddress.ip_network("10.0.0.0/8"),
                                    (ipaddress.ip_network("10.244.2.0/24"),),
                                )
                            ),
                        )
                    ),
                ),
            ),
            "x/a",
            ["ip daddr 10.0.0.0/8 ip daddr != { 10.244.2.0/24 } accept"],
            [],
            id="an ipBlock allows its cidr minus its excepts",
        ),
        pytest.param(
            NetworkPolicy("x", "p", SEL_A, ingress=(Rule(ports=(PolicyPort(protocol="SCTP"),)),)),
            "x/a",
            ["meta l4proto sctp accept"],
            [],
            id="a port entry without a port allows every port of its protocol",
        ),
        pytest.param(
            NetworkPolicy(
                "x", "p", LabelSelector(match_expressions=(Requirement("app", "NotIn", ("a",)),))
            ),
            "x/a",
            [],
            ["chain ingress"],
            id="a pod the podSelector does not select is not isolated",
        ),
    ],
)
def test_policies_compile_to_nft_rules(
    policy: NetworkPolicy, pod_key: str, wanted: list[str], unwanted: list[str]
) -> None:
    table = compiled(policy)[pod_key]
    for text in wanted:
        assert text in table
    for text in unwanted:
        assert text not in table


def test_every_pod_gets_the_dns_redirect_and_hostnetwork_pods_get_no_table() -> None:
    tables = compiled()
    assert sorted(tables) == ["x/a", "x/b", "y/c"]
    for table in tables.values():
        assert "ip daddr 10.96.0.10 udp dport 53 dnat ip to 10.244.1.5" in table


def test_a_rule_whose_peers_select_nobody_allows_nothing() -> None:
    policy = NetworkPolicy(
        "x",
        "p",
        SEL_A,
        ingress=(Rule(peers=(Peer(pod_selector=LabelSelector(match_labels=(("no", "one"),))),)),),
    )
    assert " accept comment" not in compiled(policy)["x/a"]


@pytest.mark.parametrize(
    ("faults", "wanted", "unwanted"),
    [
        pytest.param(
            Faults(reject=True),
            ["reject with tcp reset", "reject with icmpx admin-prohibited"],
            ["\t\tdrop"],
            id="reject answers instead of dropping",
        ),
        pytest.param(
            Faults(ignore_named_ports=True),
            ["udp dport { 81-90 }"],
            ["tcp dport { 80 }", "meta l4proto tcp"],
            id="ignore-named-ports makes named ports match nothing (never everything)",
        ),
        pytest.param(
            Faults(ignore_endport=True),
            ["udp dport { 81 }", "tcp dport { 80 }"],
            ["81-90"],
            id="ignore-endport keeps only the first port",
        ),
        pytest.param(
            Faults(ignore_policies=["x/p"]),
            [],
            ["chain ingress"],
            id="ignore-policy acts as if the policy did not exist",
        ),
    ],
)
def test_faults_change_the_rules(faults: Faults, wanted: list[str], unwanted: list[str]) -> None:
    policy = NetworkPolicy(
        "x",
        "p",
        SEL_A,
        ingress=(
            Rule(ports=(PolicyPort(port="web"), PolicyPort(protocol="UDP", port=81, end_port=90))),
        ),
    )
    table = compiled(policy, faults=faults)["x/a"]
    for text in wanted:
        assert text in table
    for text in unwanted:
        assert text not in table


def test_a_transaction_replaces_the_table_atomically() -> None:
    text = transaction("table inet flowproof {\n}\n")
    assert text.splitlines()[:2] == ["table inet flowproof", "delete table inet flowproof"]


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param(NetworkPolicy("x", "deny", LabelSelector()), id="default deny ingress"),
        pytest.param(
            NetworkPolicy("x", "deny", LabelSelector(), policy_types=("ingress", "egress")),
            id="default deny both",
        ),
        pytest.param(
            NetworkPolicy(
                "x",
                "mixed",
                LabelSelector(
                    match_labels=(("app", "a"),),
                    match_expressions=(
                        Requirement("tier", "In", ("web", "api")),
                        Requirement("x", "DoesNotExist"),
                    ),
                ),
                policy_types=("ingress", "egress"),
                ingress=(
                    Rule(
                        peers=(Peer(pod_selector=SEL_A, namespace_selector=LabelSelector()),),
                        ports=(
                            PolicyPort(port="web"),
                            PolicyPort(protocol="UDP", port=53, end_port=60),
                        ),
                    ),
                ),
                egress=(
                    Rule(
                        peers=(
                            Peer(
                                ip_block=IPBlock(
                                    ipaddress.ip_network("10.0.0.0/8"),
                                    (ipaddress.ip_network("10.1.0.0/16"),),
                                )
                            ),
                        )
                    ),
                    Rule(),
                ),
            ),
            id="selectors, named ports, ranges, ipBlocks and an empty rule",
        ),
    ],
)
def test_stored_policies_read_back_unchanged(policy: NetworkPolicy) -> None:
    doc = json.loads(json.dumps(policy_manifest(policy)))
    read = policy_from_dict(doc, Where(file="test"))
    assert read == NetworkPolicy(**{**policy.__dict__, "source": read.source})


def test_workloads_expand_and_fixed_addresses_are_checked() -> None:
    settings = LabSettings(nodes=3)
    specs = concrete_pods(
        [
            pod("s", "api", workload="Deployment/api", replicas=2),
            pod("s", "ds", workload="DaemonSet/ds"),
        ],
        settings,
    )
    assert [(s.name, s.node) for s in specs] == [
        ("api-0", None),
        ("api-1", None),
        ("ds-1", 1),
        ("ds-2", 2),
        ("ds-3", 3),
    ]
    placement = Placement(settings, [], 1)
    fixed = PodSpec("x", "a", {}, (), ip="10.244.2.11")
    placement.check_fixed(fixed)
    record = placement.place(fixed)
    assert (record.node, record.ip, record.netns, record.veth) == (
        2,
        "10.244.2.11",
        "fp-x.a",
        "fpv1",
    )
    with pytest.raises(InputError, match="already the address"):
        placement.check_fixed(PodSpec("x", "b", {}, (), ip="10.244.2.11"))
    with pytest.raises(InputError, match="not a pod address"):
        placement.check_fixed(PodSpec("x", "c", {}, (), ip="10.244.9.11"))
    with pytest.raises(InputError, match="not a node"):
        concrete_pods([pod("x", "n", node="worker-7")], settings)
    others = [placement.place(PodSpec("x", f"p{i}", {}, ())) for i in range(3)]
    assert sorted(r.node for r in others) == [1, 1, 3] and others[0].ip == "10.244.1.2"


def test_names_stay_within_kernel_limits_and_carry_the_lab_name() -> None:
    names = Names("abcdefgh")
    for text in (
        names.pod_veth(99999),
        names.bridge,
        names.node_uplink,
        names.fabric_port(32),
        names.fabric_outside_port,
    ):
        assert len(text) <= 15 and "abcdefgh" in text
    uid, container = "0b0b0b0b-0000-4000-8000-000000000001", "c" * 64
    assert names.pod_cgroup("systemd", uid, container).startswith(
        "flowproof-abcdefgh.slice/kubepods.slice/"
    )
    assert (
        names.pod_cgroup("cgroupfs", uid, container)
        == f"flowproof-abcdefgh/kubepods/besteffort/pod{uid}/{container}"
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        pytest.param(
            LabSettings(name="Bad-Name"),
            "not a valid lab name",
            id="lab names are short lowercase words",
        ),
        pytest.param(LabSettings(nodes=0), "from 1 to", id="at least one node"),
        pytest.param(
            LabSettings(pod_cidr="8.8.0.0/16"),
            "neither a private nor a documentation",
            id="public pod ranges are refused",
        ),
        pytest.param(
            LabSettings(service_cidr="10.240.0.0/12", dns_service_ip="10.240.0.10"),
            "overlaps",
            id="ranges may not overlap",
        ),
        pytest.param(
            LabSettings(dns_service_ip="10.97.0.10"),
            "not in the service range",
            id="the DNS address is a service address",
        ),
    ],
)
def test_settings_are_validated(settings: LabSettings, message: str) -> None:
    with pytest.raises(InputError, match=message):
        settings.validate()


def test_label_changes_and_faults_parse_like_kubectl() -> None:
    assert parse_label_changes(["a=b", "c-", "d="]) == ({"a": "b", "d": ""}, ["c"])
    with pytest.raises(InputError):
        parse_label_changes(["nokey"])
    assert parse_fault("clear", []) is None
    assert parse_fault("lag", ["2.5"])(Faults()).lag_seconds == 2.5
    assert parse_fault("ignore-policy", ["x/p"])(Faults()).ignore_policies == ["x/p"]


def test_dns_answers_a_records_and_nxdomain() -> None:
    record = PodRecord(
        "shop", "api-0", "u", 1, "10.244.1.2", 1, "c", "n", "v", "g", workload="StatefulSet/api"
    )
    zone = dns_records([record], LabSettings())
    assert zone["api.shop.svc.cluster.local"] == ["10.244.1.2"]
    assert zone["api-0.api.shop.svc.cluster.local"] == ["10.244.1.2"]
    assert zone["10-244-1-2.shop.pod.cluster.local"] == ["10.244.1.2"]
    query = dns.message.make_query("API.shop.svc.cluster.local.", dns.rdatatype.A)
    reply = dns.message.from_wire(answer(query.to_wire(), zone) or b"")
    assert [item.address for item in reply.answer[0]] == ["10.244.1.2"]
    missing = dns.message.from_wire(
        answer(dns.message.make_query("x.example", "A").to_wire(), zone) or b""
    )
    assert missing.rcode() == dns.rcode.NXDOMAIN
    assert answer(b"\x00garbage", zone) is None
    formerr = dns.message.from_wire(answer(b"flowproof-probe\n", zone) or b"")
    assert formerr.rcode() == dns.rcode.FORMERR


def test_state_survives_a_round_trip_through_json() -> None:
    state = LabState(
        settings=LabSettings(name="abc"),
        pods=[
            PodRecord(
                "x", "a", "u", 1, "10.244.1.2", 1, "c", "n", "v", "g", ports=[(80, "TCP", "web")]
            )
        ],
    )
    state.faults.lag_seconds = 2.0
    again = LabState.from_json(state.to_json())
    assert again == state


# --- cluster policies in the lab ----------------------------------------------------------------


def _npapi_policies() -> list[dict]:
    return [
        dict(p)
        for case in load_npapi_cases()
        for step in case.steps
        for p in step.policies
        if p["kind"] != "NetworkPolicy"
    ]


def test_a_cluster_policy_stored_by_the_lab_reads_back_as_the_same_policy() -> None:
    for doc in _npapi_policies():
        read = cluster_policy_from_dict(doc, Where(file="case"))
        again = cluster_policy_from_dict(cluster_policy_manifest(read), Where(file="case"))
        assert again == read, doc["metadata"]["name"]


def test_admin_rules_come_first_and_pass_goes_to_the_network_policy_tier() -> None:
    everyone = ClusterPeer(namespace_selector=LabelSelector())
    admin = ClusterNetworkPolicy(
        "a",
        "Admin",
        5,
        ingress=(ClusterRule("Pass", (everyone,)), ClusterRule("Deny", (everyone,))),
    )
    baseline = ClusterNetworkPolicy("b", "Baseline", 5, ingress=(ClusterRule("Deny", (everyone,)),))
    rulesets = compile_rulesets(
        EnforcementInput(
            pods=lab_pods(),
            namespaces={"x": {"kubernetes.io/metadata.name": "x"}},
            policies=(),
            cluster_policies=(admin, baseline),
        )
    )
    text = rulesets["x/a"]
    ingress = text[text.index("chain ingress {") : text.index("chain ingress_rest")]
    assert ingress.index("goto ingress_rest comment") < ingress.index("drop comment")
    rest = text[text.index("chain ingress_rest") :]
    assert 'drop comment "Baseline ClusterNetworkPolicy/b ingress[0] Deny"' in rest
    assert "y/h" not in rulesets, "a host-network pod has no table of its own"
