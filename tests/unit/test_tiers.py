"""Table tests for the tiers of the Network Policy API in the engine: one row per rule of the API.

Each row is a cluster (pods, NetworkPolicies, cluster policies), a flow and the expected verdict,
with the sentence of sigs.k8s.io/network-policy-api v0.3.0 (apis/v1beta1) it implements in its id.
The explanations must name the tier, policy, rule and action that decided.
"""

from __future__ import annotations

import pytest
from make import (
    cpeer,
    cport,
    crule,
    make_cnp,
    make_pod,
    make_policy,
    make_snapshot,
    peer,
    rule,
)

from collector.core.engine import Engine, Verdict
from collector.core.model import (
    ADMIN_NETWORK_POLICY,
    BASELINE_ADMIN_NETWORK_POLICY,
    Snapshot,
    UnmodelledPolicy,
)

XA = make_pod("x/a")
XB = make_pod("x/b")
YA = make_pod("y/a")
YB = make_pod("y/b", labels={"pod": "b", "role": "db"})
HOST = make_pod("y/h", host_network=True, ip="192.0.2.10")
WEB = make_pod("z/w", ports=[(8080, "TCP", "web"), (53, "UDP", "dns")])
PODS = (XA, XB, YA, YB, HOST, WEB)
POD = {p.key: p for p in PODS}

IN_X = {"ns": "x"}
IN_Y = {"ns": "y"}
DENY_INGRESS_X = make_policy("deny-in", "x", types=["ingress"])
ALLOW_FROM_Y = make_policy("from-y", "x", ingress=[rule(peer(namespaces=IN_Y))])


def _evaluate(
    snapshot: Snapshot, source: str, destination: str, port: int, protocol: str
) -> Verdict:
    src = POD.get(source, source)
    dst = POD.get(destination, destination)
    return Engine(snapshot).evaluate(src, dst, port, protocol)  # type: ignore[arg-type]


CASES = [
    pytest.param(
        [],
        [make_cnp(namespaces=IN_X, ingress=[crule("Deny", cpeer(IN_Y))])],
        "y/a",
        "x/a",
        80,
        "TCP",
        False,
        "Admin",
        id="Deny: Drops the selected traffic (Admin tier, no NetworkPolicy)",
    ),
    pytest.param(
        [ALLOW_FROM_Y],
        [make_cnp(namespaces=IN_X, ingress=[crule("Deny", cpeer(IN_Y))])],
        "y/a",
        "x/a",
        80,
        "TCP",
        False,
        "Admin",
        id="The Admin tier takes precedence over all other policies: Deny beats a NetworkPolicy allow",
    ),
    pytest.param(
        [DENY_INGRESS_X],
        [make_cnp(namespaces=IN_X, ingress=[crule("Accept", cpeer(IN_Y))])],
        "y/a",
        "x/a",
        80,
        "TCP",
        True,
        "Admin",
        id="Accept: No further ClusterNetworkPolicy or NetworkPolicy rules will be processed",
    ),
    pytest.param(
        [DENY_INGRESS_X],
        [make_cnp(namespaces=IN_X, ingress=[crule("Pass", cpeer(IN_Y))])],
        "y/a",
        "x/a",
        80,
        "TCP",
        False,
        "NetworkPolicy",
        id="Pass: passes evaluation to the next tier, where the NetworkPolicy isolates",
    ),
    pytest.param(
        [],
        [
            make_cnp("pass", namespaces=IN_X, ingress=[crule("Pass", cpeer(IN_Y))]),
            make_cnp(
                "base", tier="Baseline", namespaces=IN_X, ingress=[crule("Deny", cpeer(IN_Y))]
            ),
        ],
        "y/a",
        "x/a",
        80,
        "TCP",
        False,
        "Baseline",
        id="Pass with no NetworkPolicy: the Baseline tier decides",
    ),
    pytest.param(
        [ALLOW_FROM_Y],
        [make_cnp(tier="Baseline", namespaces=IN_X, ingress=[crule("Deny", cpeer(IN_Y))])],
        "y/a",
        "x/a",
        80,
        "TCP",
        True,
        "NetworkPolicy",
        id="v1.NetworkPolicy always makes a final decision for selected pods: Baseline is not reached",
    ),
    pytest.param(
        [DENY_INGRESS_X],
        [make_cnp(tier="Baseline", namespaces=IN_X, ingress=[crule("Accept", cpeer(IN_Y))])],
        "y/a",
        "x/a",
        80,
        "TCP",
        False,
        "NetworkPolicy",
        id="the Baseline tier can be overridden by the v1.NetworkPolicy: isolation wins",
    ),
    pytest.param(
        [],
        [make_cnp(tier="Baseline", namespaces=IN_X, ingress=[crule("Pass", cpeer(IN_Y))])],
        "y/a",
        "x/a",
        80,
        "TCP",
        True,
        "none",
        id="Pass in the Baseline tier leaves the default: all pods can communicate",
    ),
    pytest.param(
        [],
        [
            make_cnp("late", priority=20, namespaces=IN_X, ingress=[crule("Accept", cpeer(IN_Y))]),
            make_cnp("early", priority=5, namespaces=IN_X, ingress=[crule("Deny", cpeer(IN_Y))]),
        ],
        "y/a",
        "x/a",
        80,
        "TCP",
        False,
        "Admin",
        id="Policies with lower priority values have higher precedence",
    ),
    pytest.param(
        [],
        [
            make_cnp(
                namespaces=IN_X, ingress=[crule("Accept", cpeer(IN_Y)), crule("Deny", cpeer(IN_Y))]
            )
        ],
        "y/a",
        "x/a",
        80,
        "TCP",
        True,
        "Admin",
        id="a rule that appears at the top of the ingress rules would take the highest precedence",
    ),
    pytest.param(
        [],
        [make_cnp(namespaces=IN_X, ingress=[crule("Deny", cpeer(IN_Y), ports=[cport(80)])])],
        "y/a",
        "x/a",
        8080,
        "TCP",
        True,
        "none",
        id="a rule with protocols matches only its ports",
    ),
    pytest.param(
        [],
        [make_cnp(namespaces=IN_X, ingress=[crule("Deny", cpeer(IN_Y), ports=[cport(80, "UDP")])])],
        "y/a",
        "x/a",
        80,
        "TCP",
        True,
        "none",
        id="a protocol entry matches its own protocol only",
    ),
    pytest.param(
        [],
        [
            make_cnp(
                namespaces=IN_X, ingress=[crule("Deny", cpeer(IN_Y), ports=[cport(8000, end=9000)])]
            )
        ],
        "y/a",
        "x/a",
        9000,
        "TCP",
        False,
        "Admin",
        id="PortRange defines an inclusive range of ports from Start to End",
    ),
    pytest.param(
        [],
        [
            make_cnp(
                namespaces={"ns": "z"},
                ingress=[crule("Deny", cpeer(IN_Y), ports=[cport(name="web")])],
            )
        ],
        "y/a",
        "z/w",
        8080,
        "TCP",
        False,
        "Admin",
        id="DestinationNamedPort selects a destination port on a pod based on the ContainerPort name",
    ),
    pytest.param(
        [],
        [
            make_cnp(
                namespaces={"ns": "z"},
                ingress=[crule("Deny", cpeer(IN_Y), ports=[cport(name="web")])],
            )
        ],
        "y/a",
        "z/w",
        8080,
        "UDP",
        True,
        "none",
        id="a named port matches the protocol its container port declares",
    ),
    pytest.param(
        [],
        [make_cnp(namespaces=IN_Y, pods={"role": "db"}, ingress=[crule("Deny", cpeer(IN_X))])],
        "x/a",
        "y/a",
        80,
        "TCP",
        True,
        "none",
        id="Pods subject: namespace AND pod selectors (y/a is not a db)",
    ),
    pytest.param(
        [],
        [make_cnp(namespaces=IN_Y, pods={"role": "db"}, ingress=[crule("Deny", cpeer(IN_X))])],
        "x/a",
        "y/b",
        80,
        "TCP",
        False,
        "Admin",
        id="Pods subject selects the pods of the selected namespaces",
    ),
    pytest.param(
        [],
        [make_cnp(ingress=[crule("Deny", cpeer())])],
        "x/a",
        "y/h",
        80,
        "TCP",
        True,
        "none",
        id="host-networked pods are not included in subject selection",
    ),
    pytest.param(
        [],
        [make_cnp(namespaces=IN_X, ingress=[crule("Deny", cpeer(IN_Y))])],
        "y/h",
        "x/a",
        80,
        "TCP",
        True,
        "none",
        id="host-networked pods are not included in a namespaces peer",
    ),
    pytest.param(
        [],
        [make_cnp(namespaces=IN_X, egress=[crule("Deny", cpeer(networks=["10.244.0.0/16"]))])],
        "x/a",
        "y/a",
        80,
        "TCP",
        False,
        "Admin",
        id="Networks: cluster-internal traffic will be checked against the rule as well",
    ),
    pytest.param(
        [],
        [make_cnp(namespaces=IN_X, egress=[crule("Deny", cpeer(networks=["203.0.113.0/24"]))])],
        "x/a",
        "203.0.113.7",
        443,
        "TCP",
        False,
        "Admin",
        id="Networks selects peers via CIDR blocks outside the cluster",
    ),
    pytest.param(
        [],
        [make_cnp(namespaces=IN_X, egress=[crule("Deny", cpeer(networks=["192.0.2.0/24"]))])],
        "x/a",
        "y/h",
        80,
        "TCP",
        False,
        "Admin",
        id="Networks matches a host-network pod through its (node's) address",
    ),
    pytest.param(
        [make_policy("iso", "y", types=["ingress"])],
        [make_cnp(namespaces=IN_X, egress=[crule("Accept", cpeer(IN_Y))])],
        "x/a",
        "y/a",
        80,
        "TCP",
        False,
        "NetworkPolicy",
        id="egress Accept: any ingress rules at the destination do apply",
    ),
    pytest.param(
        [],
        [
            make_cnp(
                "default",
                tier="Baseline",
                kind=BASELINE_ADMIN_NETWORK_POLICY,
                namespaces=IN_X,
                ingress=[crule("Accept", cpeer(IN_Y))],
            ),
            make_cnp(
                "cnp",
                tier="Baseline",
                priority=1000,
                namespaces=IN_X,
                ingress=[crule("Deny", cpeer(IN_Y))],
            ),
        ],
        "y/a",
        "x/a",
        80,
        "TCP",
        False,
        "Baseline",
        id="a BaselineAdminNetworkPolicy comes after every Baseline ClusterNetworkPolicy",
    ),
    pytest.param(
        [DENY_INGRESS_X],
        [
            make_cnp(
                "anp",
                kind=ADMIN_NETWORK_POLICY,
                namespaces=IN_X,
                ingress=[crule("Accept", cpeer(IN_Y))],
            )
        ],
        "y/a",
        "x/a",
        80,
        "TCP",
        True,
        "Admin",
        id="an AdminNetworkPolicy's Allow is the Admin tier's Accept",
    ),
]


@pytest.mark.parametrize(
    ("policies", "cluster", "source", "destination", "port", "protocol", "allowed", "tier"), CASES
)
def test_tiers(
    policies: list,
    cluster: list,
    source: str,
    destination: str,
    port: int,
    protocol: str,
    allowed: bool,
    tier: str,
) -> None:
    snapshot = make_snapshot(PODS, policies, cluster_policies=cluster)
    verdict = _evaluate(snapshot, source, destination, port, protocol)
    assert verdict.allowed is allowed, verdict.summary()
    assert verdict.known, verdict.incomplete
    side = (
        verdict.ingress
        if verdict.ingress.tier != "none" or verdict.ingress.passed
        else verdict.egress
    )
    assert side.tier == tier, verdict.to_dict()


def test_a_decision_names_the_tier_policy_rule_and_action() -> None:
    cnp = make_cnp(
        "ingress-tcp",
        priority=3,
        namespaces=IN_X,
        ingress=[
            crule("Pass", cpeer(IN_X), name="pass-x"),
            crule("Deny", cpeer(IN_Y), ports=[cport(80)], name="deny-y"),
        ],
    )
    verdict = _evaluate(make_snapshot(PODS, cluster_policies=[cnp]), "y/a", "x/a", 80, "TCP")
    decided = verdict.ingress.decided_by
    assert decided is not None
    assert (decided.tier, decided.policy, decided.rule, decided.name, decided.action) == (
        "Admin",
        "ClusterNetworkPolicy/ingress-tcp",
        1,
        "deny-y",
        "Deny",
    )
    assert decided.describe() == (
        "Admin tier: ClusterNetworkPolicy/ingress-tcp (priority 3) ingress[1] 'deny-y' "
        "(from[0] namespaces ns=y; protocols[0] 80/TCP) -> Deny"
    )
    assert verdict.summary() == "denied: ingress of x/a denied by " + decided.describe()
    assert [m.describe() for m in verdict.deciding] == [decided.describe()]


def test_a_pass_then_a_network_policy_is_explained_step_by_step() -> None:
    cnp = make_cnp("pass-y", namespaces=IN_X, ingress=[crule("Pass", cpeer(IN_Y), name="to-np")])
    verdict = _evaluate(
        make_snapshot(PODS, [ALLOW_FROM_Y], cluster_policies=[cnp]), "y/a", "x/a", 80, "TCP"
    )
    assert verdict.allowed
    assert [m.action for m in verdict.ingress.deciding] == ["Pass", "Allow"]
    assert [m.tier for m in verdict.ingress.deciding] == ["Admin", "NetworkPolicy"]
    assert verdict.ingress.reason.startswith(
        "Admin tier: ClusterNetworkPolicy/pass-y (priority 10) ingress[0] 'to-np'"
    )
    assert (
        "then ingress of x/a allowed by NetworkPolicy tier: x/from-y ingress[0]"
        in verdict.ingress.reason
    )
    assert verdict.ingress.to_dict()["passed"][0]["action"] == "Pass"


def test_a_v1alpha1_policy_says_allow_in_its_explanation() -> None:
    anp = make_cnp(
        "anp", kind=ADMIN_NETWORK_POLICY, namespaces=IN_X, ingress=[crule("Accept", cpeer(IN_Y))]
    )
    verdict = _evaluate(make_snapshot(PODS, cluster_policies=[anp]), "y/a", "x/a", 80, "TCP")
    assert verdict.ingress.decided_by is not None
    assert verdict.ingress.decided_by.describe().endswith("-> Allow")
    assert verdict.ingress.decided_by.policy == "AdminNetworkPolicy/anp"


# --- what the model cannot know ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("actions", "known", "allowed"),
    [
        pytest.param(("Deny", "Deny"), True, False, id="same priority, same action: known"),
        pytest.param(
            ("Deny", "Accept"),
            False,
            False,
            id="same priority, different actions: the implementation can apply any: unknown",
        ),
    ],
)
def test_policies_of_one_priority(actions: tuple[str, str], known: bool, allowed: bool) -> None:
    cluster = [
        make_cnp(f"p{i}", priority=15, namespaces=IN_X, ingress=[crule(action, cpeer(IN_Y))])
        for i, action in enumerate(actions)
    ]
    verdict = _evaluate(make_snapshot(PODS, cluster_policies=cluster), "y/a", "x/a", 80, "TCP")
    assert verdict.known is known
    assert verdict.allowed is allowed
    if not known:
        assert verdict.model == "unknown"
        assert (
            "ClusterNetworkPolicy/p0 says Deny, ClusterNetworkPolicy/p1 says Accept"
            in verdict.incomplete[0]
        )


@pytest.mark.parametrize(
    ("peer_args", "destination", "known"),
    [
        pytest.param(
            {"nodes": {}}, "y/a", True, id="a nodes peer never selects a pod of the pod network"
        ),
        pytest.param(
            {"nodes": {}}, "203.0.113.9", False, id="a nodes peer may be an address: unknown"
        ),
        pytest.param(
            {"nodes": {}}, "y/h", False, id="a nodes peer may be a host-network pod: unknown"
        ),
        pytest.param(
            {"domains": ["example.com"]}, "203.0.113.9", False, id="domain names are not modelled"
        ),
    ],
)
def test_peers_the_model_does_not_know(peer_args: dict, destination: str, known: bool) -> None:
    cnp = make_cnp(namespaces=IN_X, egress=[crule("Accept", cpeer(**peer_args))])
    verdict = _evaluate(make_snapshot(PODS, cluster_policies=[cnp]), "x/a", destination, 80, "TCP")
    assert verdict.known is known, verdict.incomplete
    if not known:
        assert "does not model (nodes, domainNames)" in verdict.incomplete[0]


def test_a_modelled_peer_decides_even_beside_one_that_is_not() -> None:
    cnp = make_cnp(
        namespaces=IN_X,
        egress=[crule("Deny", cpeer(nodes={}), cpeer(networks=["203.0.113.0/24"]))],
    )
    verdict = _evaluate(
        make_snapshot(PODS, cluster_policies=[cnp]), "x/a", "203.0.113.9", 80, "TCP"
    )
    assert verdict.known and not verdict.allowed


@pytest.mark.parametrize(
    ("namespace", "source", "destination", "known"),
    [
        pytest.param(
            "x", "x/a", "y/a", False, id="a namespaced object may select the source's pods"
        ),
        pytest.param(
            "y", "x/a", "y/a", False, id="a namespaced object may select the destination's pods"
        ),
        pytest.param("z", "x/a", "y/a", True, id="a namespaced object selects nothing elsewhere"),
        pytest.param("", "x/a", "y/a", False, id="a cluster-scoped object may select any pod"),
        pytest.param(
            "", "x/a", "203.0.113.9", False, id="also the source of a flow out of the cluster"
        ),
    ],
)
def test_other_plugins_policies_make_the_model_unknown(
    namespace: str, source: str, destination: str, known: bool
) -> None:
    kind = "CiliumNetworkPolicy" if namespace else "CiliumClusterwideNetworkPolicy"
    found = UnmodelledPolicy("cilium.io", "v2", kind, namespace, "l7", "p.yaml:3")
    snapshot = make_snapshot(PODS, [DENY_INGRESS_X])
    snapshot = Snapshot(
        namespaces=snapshot.namespaces,
        pods=snapshot.pods,
        policies=snapshot.policies,
        unmodelled=(found,),
    )
    verdict = _evaluate(snapshot, source, destination, 80, "TCP")
    assert verdict.known is known
    if not known:
        assert verdict.model == "unknown"
        assert (
            f"{kind} " in verdict.incomplete[0]
            and "flowproof does not model" in verdict.incomplete[0]
        )
        assert verdict.summary().startswith("unknown: ")
