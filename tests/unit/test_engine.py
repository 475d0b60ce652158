"""Table tests for the policy engine: one row per rule of the NetworkPolicy API reference."""

from __future__ import annotations

import pytest
from make import make_pod, make_policy, make_snapshot, peer, port, rule, sel

from collector.core.classes import reachability_counts
from collector.core.engine import SELF_NOTE, Engine

XA = make_pod("x/a")
XB = make_pod("x/b")
YA = make_pod("y/a")
YB = make_pod("y/b", labels={"pod": "b", "role": "db"})
NO_IP = make_pod("x/c", ip=None)
HOST = make_pod("y/h", host_network=True, ip="192.0.2.10")
NAMED = make_pod("y/n", ports=[(8080, "TCP", "http"), (53, "UDP", "dns")])
PODS = (XA, XB, YA, YB, NO_IP, HOST, NAMED)
POD = {p.key: p for p in PODS}

DENY_INGRESS_X = make_policy("deny-in", "x", types=["ingress"])
DENY_EGRESS_X = make_policy("deny-eg", "x", types=["egress"])

CASES = [
    pytest.param(
        [],
        "x/a",
        "x/b",
        80,
        "TCP",
        True,
        id="a pod selected by no policy is non-isolated: all traffic is allowed",
    ),
    pytest.param(
        [DENY_INGRESS_X],
        "x/a",
        "x/b",
        80,
        "TCP",
        False,
        id="empty podSelector selects every pod in the namespace and isolates ingress",
    ),
    pytest.param(
        [DENY_INGRESS_X],
        "x/a",
        "y/a",
        80,
        "TCP",
        True,
        id="a policy selects pods in its own namespace only",
    ),
    pytest.param(
        [DENY_INGRESS_X], "x/a", "x/a", 80, "TCP", True, id="a pod cannot block access to itself"
    ),
    pytest.param(
        [make_policy(selector=sel({"pod": "b"}))],
        "y/a",
        "x/a",
        80,
        "TCP",
        True,
        id="podSelector matchLabels selects only matching pods",
    ),
    pytest.param(
        [make_policy(ingress=[rule()])],
        "y/a",
        "x/a",
        80,
        "TCP",
        True,
        id="an ingress rule with no from and no ports allows everything",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(pods={"pod": "b"}))])],
        "x/b",
        "x/a",
        80,
        "TCP",
        True,
        id="podSelector peer selects pods in the policy's namespace",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(pods={"pod": "b"}))])],
        "y/b",
        "x/a",
        80,
        "TCP",
        False,
        id="podSelector peer alone does not select pods of other namespaces",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(namespaces={"ns": "y"}))])],
        "y/a",
        "x/a",
        80,
        "TCP",
        True,
        id="namespaceSelector peer selects every pod in the selected namespaces",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(namespaces={"ns": "y"}))])],
        "x/b",
        "x/a",
        80,
        "TCP",
        False,
        id="namespaceSelector peer does not select the policy's own namespace unless it matches",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(namespaces={}))])],
        "y/a",
        "x/a",
        80,
        "TCP",
        True,
        id="empty namespaceSelector selects all namespaces",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(pods={"pod": "b"}, namespaces={"ns": "y"}))])],
        "y/b",
        "x/a",
        80,
        "TCP",
        True,
        id="namespaceSelector and podSelector in one peer select matching pods in matching namespaces",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(pods={"pod": "b"}, namespaces={"ns": "y"}))])],
        "y/a",
        "x/a",
        80,
        "TCP",
        False,
        id="both selectors in one peer are ANDed: the namespace alone is not enough",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(pods={"pod": "b"}, namespaces={"ns": "y"}))])],
        "x/b",
        "x/a",
        80,
        "TCP",
        False,
        id="both selectors in one peer are ANDed: the pod labels alone are not enough",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(pods={"pod": "b"}), peer(namespaces={"ns": "y"}))])],
        "y/a",
        "x/a",
        80,
        "TCP",
        True,
        id="two peers in one rule are ORed",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(pods=sel(None, ("pod", "In", ("b", "c")))))])],
        "x/b",
        "x/a",
        80,
        "TCP",
        True,
        id="matchExpressions In matches a listed value",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(pods=sel(None, ("pod", "NotIn", ("b",)))))])],
        "x/b",
        "x/a",
        80,
        "TCP",
        False,
        id="matchExpressions NotIn rejects a listed value",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(pods=sel(None, ("role", "NotIn", ("db",)))))])],
        "x/b",
        "x/a",
        80,
        "TCP",
        True,
        id="matchExpressions NotIn matches a pod without the key",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(namespaces={}, pods=sel(None, ("role", "Exists", ()))))])],
        "y/b",
        "x/a",
        80,
        "TCP",
        True,
        id="matchExpressions Exists matches a pod with the key",
    ),
    pytest.param(
        [
            make_policy(
                ingress=[rule(peer(namespaces={}, pods=sel(None, ("role", "DoesNotExist", ()))))]
            )
        ],
        "y/b",
        "x/a",
        80,
        "TCP",
        False,
        id="matchExpressions DoesNotExist rejects a pod with the key",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(pods=sel({"pod": "b"}, ("pod", "In", ("c",)))))])],
        "x/b",
        "x/a",
        80,
        "TCP",
        False,
        id="matchLabels and matchExpressions are ANDed",
    ),
    pytest.param(
        [make_policy(ingress=[rule(ports=[port(80)])])],
        "y/a",
        "x/a",
        80,
        "TCP",
        True,
        id="a numeric port allows that port",
    ),
    pytest.param(
        [make_policy(ingress=[rule(ports=[port(80)])])],
        "y/a",
        "x/a",
        81,
        "TCP",
        False,
        id="a numeric port denies other ports",
    ),
    pytest.param(
        [make_policy(ingress=[rule(ports=[port(80)])])],
        "y/a",
        "x/a",
        80,
        "UDP",
        False,
        id="protocol defaults to TCP so UDP on the same port is denied",
    ),
    pytest.param(
        [make_policy(ingress=[rule(ports=[port(80, "UDP")])])],
        "y/a",
        "x/a",
        80,
        "UDP",
        True,
        id="UDP port allows UDP",
    ),
    pytest.param(
        [make_policy(ingress=[rule(ports=[port(80, "SCTP")])])],
        "y/a",
        "x/a",
        80,
        "SCTP",
        True,
        id="SCTP port allows SCTP",
    ),
    pytest.param(
        [make_policy(ingress=[rule(ports=[port(None, "UDP")])])],
        "y/a",
        "x/a",
        9999,
        "UDP",
        True,
        id="a port entry without port allows every port of its protocol",
    ),
    pytest.param(
        [make_policy(ingress=[rule(ports=[port(None, "UDP")])])],
        "y/a",
        "x/a",
        9999,
        "TCP",
        False,
        id="a port entry without port does not allow other protocols",
    ),
    pytest.param(
        [make_policy(ingress=[rule(ports=[port(8000, end=9000)])])],
        "y/a",
        "x/a",
        9000,
        "TCP",
        True,
        id="endPort range is inclusive at its end",
    ),
    pytest.param(
        [make_policy(ingress=[rule(ports=[port(8000, end=9000)])])],
        "y/a",
        "x/a",
        8000,
        "TCP",
        True,
        id="endPort range is inclusive at its start",
    ),
    pytest.param(
        [make_policy(ingress=[rule(ports=[port(8000, end=9000)])])],
        "y/a",
        "x/a",
        9001,
        "TCP",
        False,
        id="endPort range excludes ports past its end",
    ),
    pytest.param(
        [make_policy("n", "y", ingress=[rule(ports=[port("http")])])],
        "x/a",
        "y/n",
        8080,
        "TCP",
        True,
        id="a named port resolves against the destination pod's container ports",
    ),
    pytest.param(
        [make_policy("n", "y", ingress=[rule(ports=[port("http")])])],
        "x/a",
        "y/n",
        80,
        "TCP",
        False,
        id="a named port does not match other port numbers",
    ),
    pytest.param(
        [make_policy("n", "y", ingress=[rule(ports=[port("dns")])])],
        "x/a",
        "y/n",
        53,
        "UDP",
        False,
        id="a named port carries protocol TCP by default and does not match the UDP port of that name",
    ),
    pytest.param(
        [make_policy("n", "y", ingress=[rule(ports=[port("dns", "UDP")])])],
        "x/a",
        "y/n",
        53,
        "UDP",
        True,
        id="a named port with its protocol matches",
    ),
    pytest.param(
        [make_policy("e", "x", egress=[rule(ports=[port("http")])])],
        "x/a",
        "y/n",
        8080,
        "TCP",
        True,
        id="an egress named port resolves against the destination pod",
    ),
    pytest.param(
        [make_policy("e", "x", egress=[rule(ports=[port("http")])])],
        "x/a",
        "203.0.113.5",
        8080,
        "TCP",
        False,
        id="an egress named port cannot match an address outside the pod network",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(pods={"pod": "b"}), ports=[port(81)])])],
        "x/b",
        "x/a",
        80,
        "TCP",
        False,
        id="peers and ports of one rule are ANDed",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(pods={"pod": "b"})), rule(ports=[port(81)])])],
        "y/a",
        "x/a",
        81,
        "TCP",
        True,
        id="rules of one policy are ORed",
    ),
    pytest.param(
        [DENY_INGRESS_X, make_policy("allow", ingress=[rule(peer(namespaces={"ns": "y"}))])],
        "y/a",
        "x/a",
        80,
        "TCP",
        True,
        id="policies are additive: any selecting policy may allow",
    ),
    pytest.param(
        [make_policy(egress=[rule(peer(pods={"pod": "b"}))])],
        "x/a",
        "y/a",
        80,
        "TCP",
        False,
        id="policyTypes inferred: an egress section isolates egress",
    ),
    pytest.param(
        [make_policy(egress=[rule(peer(pods={"pod": "b"}))])],
        "y/a",
        "x/a",
        80,
        "TCP",
        False,
        id="policyTypes inferred: ingress is always isolated",
    ),
    pytest.param(
        [make_policy(types=["egress"], ingress=[rule(peer(pods={"pod": "zzz"}))])],
        "y/a",
        "x/a",
        80,
        "TCP",
        True,
        id="policyTypes Egress only: the policy does not isolate ingress even with ingress rules",
    ),
    pytest.param(
        [DENY_EGRESS_X],
        "x/a",
        "y/a",
        80,
        "TCP",
        False,
        id="policyTypes Egress with no egress rules denies all egress",
    ),
    pytest.param(
        [DENY_EGRESS_X], "y/a", "x/a", 80, "TCP", True, id="policyTypes Egress leaves ingress open"
    ),
    pytest.param(
        [make_policy(types=["egress"], egress=[rule()])],
        "x/a",
        "y/a",
        80,
        "TCP",
        True,
        id="an egress rule with no to and no ports allows all egress",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(cidr="10.244.0.0/16"))])],
        "y/a",
        "x/a",
        80,
        "TCP",
        True,
        id="ipBlock matches pods by their IPs",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(cidr="10.244.0.0/16", excepts=[f"{YA.ips[0]}/32"]))])],
        "y/a",
        "x/a",
        80,
        "TCP",
        False,
        id="ipBlock except carves addresses out of the block",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(cidr="10.244.0.0/16"))])],
        "x/c",
        "x/a",
        80,
        "TCP",
        False,
        id="a pod without an IP cannot match an ipBlock",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(cidr="2001:db8::/32"))])],
        "y/a",
        "x/a",
        80,
        "TCP",
        False,
        id="an IPv6 ipBlock does not match IPv4 addresses",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(cidr="2001:db8::/32"))])],
        "2001:db8::1",
        "x/a",
        80,
        "TCP",
        True,
        id="an IPv6 ipBlock matches an IPv6 address outside the cluster",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(namespaces={}))])],
        "203.0.113.9",
        "x/a",
        80,
        "TCP",
        False,
        id="selectors never match addresses outside the pod network",
    ),
    pytest.param(
        [make_policy(types=["egress"], egress=[rule(peer(cidr="203.0.113.0/24"))])],
        "x/a",
        "203.0.113.9",
        443,
        "TCP",
        True,
        id="egress to an ipBlock outside the cluster",
    ),
    pytest.param(
        [make_policy("h", "y", types=["ingress"])],
        "x/a",
        "y/h",
        80,
        "TCP",
        True,
        id="a hostNetwork pod is never selected by a policy",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(namespaces={}))])],
        "y/h",
        "x/a",
        80,
        "TCP",
        False,
        id="selectors do not match hostNetwork pods",
    ),
    pytest.param(
        [make_policy(ingress=[rule(peer(cidr="192.0.2.0/24"))])],
        "y/h",
        "x/a",
        80,
        "TCP",
        True,
        id="an ipBlock matches a hostNetwork pod by its IP",
    ),
]


@pytest.mark.parametrize(("policies", "src", "dst", "number", "protocol", "expected"), CASES)
def test_engine_rule(policies, src, dst, number, protocol, expected):
    snapshot = make_snapshot(PODS, policies)
    source = POD.get(src, src)
    destination = POD.get(dst, dst)
    verdict = Engine(snapshot).evaluate(source, destination, number, protocol)
    assert verdict.allowed is expected, verdict.summary()


def test_explanation_names_the_allowing_policy_rule_peer_and_port():
    allow = make_policy(
        "allow-b",
        ingress=[
            rule(peer(pods={"pod": "z"}), peer(pods={"pod": "b"}), ports=[port(81), port(80)])
        ],
    )
    verdict = Engine(make_snapshot(PODS, [DENY_INGRESS_X, allow])).evaluate(XB, XA, 80, "TCP")
    assert verdict.allowed
    assert verdict.ingress.isolated
    assert set(verdict.ingress.policies) == {"x/deny-in", "x/allow-b"}
    (match,) = verdict.ingress.allowed_by
    assert (match.policy, match.rule, match.peer, match.port) == ("x/allow-b", 0, 1, 1)
    assert "x/allow-b ingress[0]" in verdict.summary()


def test_denied_explanation_says_which_policies_isolate_and_that_no_rule_allows():
    verdict = Engine(make_snapshot(PODS, [DENY_INGRESS_X])).evaluate(YA, XA, 80, "TCP")
    assert not verdict.allowed
    assert verdict.ingress.policies == ("x/deny-in",)
    assert "no rule allows" in verdict.ingress.reason
    assert verdict.egress.allowed and not verdict.egress.isolated


def test_self_traffic_is_explained():
    verdict = Engine(make_snapshot(PODS, [DENY_INGRESS_X])).evaluate(XA, XA, 80, "TCP")
    assert verdict.allowed and verdict.notes[0] == SELF_NOTE


def test_pods_without_ip_and_host_network_pods_are_explained():
    with_block = make_policy("blocks", "z", ingress=[rule(peer(cidr="10.0.0.0/8"))])
    verdict = Engine(make_snapshot(PODS, [with_block])).evaluate(NO_IP, HOST, 80, "TCP")
    assert any("no IP" in n for n in verdict.notes)
    assert any("host network" in n for n in verdict.notes)
    assert not verdict.ingress.applies


@pytest.mark.parametrize(("policies", "src", "dst", "number", "protocol", "expected"), CASES)
def test_class_counts_agree_with_the_engine(policies, src, dst, number, protocol, expected):
    snapshot = make_snapshot(PODS, policies)
    engine = Engine(snapshot)
    brute = sum(
        engine.evaluate(s, d, number, protocol).allowed
        for s in snapshot.pods
        for d in snapshot.pods
    )
    counts = reachability_counts(snapshot, number, protocol)
    assert counts.allowed == brute
    assert counts.allowed + counts.denied == len(snapshot.pods) ** 2
