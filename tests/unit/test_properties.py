"""Properties of the policy engine over random small clusters and policies (hypothesis).

Random namespaces, pods (some without IPs, some on the host network) and policies using every part
of the API (selectors with all operators, ipBlocks with excepts over the pod range, named and
numbered ports with endPort, policyTypes given or inferred) are built directly as `collector.core.model`
objects. The model has one form for an empty and an absent from/to/ports list (both match
everything), so both are one case here. The properties hold for NetworkPolicy semantics whatever the
data; a counterexample is a bug. The tiered snapshots add cluster policies of both tiers (every
action, priorities that tie, every peer form including the unmodelled ones, ports, ranges and named
ports) and other plugins' objects: the class counts, allowed and unknown, must still equal the
brute force over `Engine.evaluate`.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from dataclasses import replace
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.core.classes import ClassModel, reachability_counts
from collector.core.engine import Engine, infer_policy_types
from collector.core.model import (
    BASELINE_ADMIN_NETWORK_POLICY,
    CLUSTER_NETWORK_POLICY,
    NAMESPACE_NAME_LABEL,
    ClusterNetworkPolicy,
    ClusterPeer,
    ClusterPort,
    ClusterRule,
    ContainerPort,
    Direction,
    IPBlock,
    IPNetwork,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Operator,
    Peer,
    Pod,
    PolicyPort,
    Protocol,
    Requirement,
    Rule,
    Snapshot,
    UnmodelledPolicy,
)

T = TypeVar("T")

PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

NAMESPACE_NAMES = ("n0", "n1", "n2", "n3")
LABEL_KEYS = ("app", "team", "tier")
LABEL_VALUES = ("a", "b", "c")
PORT_NAMES = ("http", "metrics", "dns")
# The flows every property checks: numbers that pods serve, a range end, and a port no pod names.
FLOWS: tuple[tuple[int, Protocol], ...] = (
    (80, "TCP"),
    (81, "TCP"),
    (8080, "TCP"),
    (53, "UDP"),
    (80, "SCTP"),
)
OPERATORS: tuple[Operator, ...] = ("In", "NotIn", "Exists", "DoesNotExist")
GIVEN_POLICY_TYPES: tuple[tuple[Direction, ...] | None, ...] = (
    None,  # not given: the API server's default, from the egress list
    ("ingress",),
    ("egress",),
    ("ingress", "egress"),
    ("egress", "ingress"),
)
HOST_NETWORK_IP = "192.168.0.10"

labels_st = st.dictionaries(st.sampled_from(LABEL_KEYS), st.sampled_from(LABEL_VALUES), max_size=3)
protocol_st: st.SearchStrategy[Protocol] = st.sampled_from(("TCP", "UDP", "SCTP"))


@st.composite
def requirement_st(draw: st.DrawFn) -> Requirement:
    key = draw(st.sampled_from(LABEL_KEYS))
    operator: Operator = draw(st.sampled_from(OPERATORS))
    if operator in ("In", "NotIn"):
        values = draw(st.lists(st.sampled_from(LABEL_VALUES), min_size=1, max_size=2, unique=True))
        return Requirement(key, operator, tuple(values))
    return Requirement(key, operator)


@st.composite
def selector_st(draw: st.DrawFn) -> LabelSelector:
    match_labels = draw(labels_st)
    expressions = draw(st.lists(requirement_st(), max_size=2))
    return LabelSelector(tuple(sorted(match_labels.items())), tuple(expressions))


@st.composite
def namespace_selector_st(draw: st.DrawFn) -> LabelSelector:
    """Namespace selectors also use the automatic name label, as real policies do."""
    if draw(st.booleans()):
        return draw(selector_st())
    names = draw(st.lists(st.sampled_from(NAMESPACE_NAMES), min_size=1, max_size=2, unique=True))
    operator: Operator = draw(st.sampled_from(OPERATORS[:2]))
    return LabelSelector((), (Requirement(NAMESPACE_NAME_LABEL, operator, tuple(names)),))


@st.composite
def ip_block_st(draw: st.DrawFn) -> IPBlock:
    prefix = draw(st.integers(min_value=26, max_value=32))
    base = draw(st.integers(min_value=0, max_value=15))
    cidr = ipaddress.IPv4Network(f"10.0.0.{base}/{prefix}", strict=False)
    excepts: list[IPNetwork] = []
    if cidr.prefixlen < 32:
        for _ in range(draw(st.integers(min_value=0, max_value=2))):
            sub_prefix = draw(st.integers(min_value=cidr.prefixlen + 1, max_value=32))
            subnets = list(cidr.subnets(new_prefix=sub_prefix))
            excepts.append(subnets[draw(st.integers(0, min(len(subnets), 16) - 1))])
    return IPBlock(cidr, tuple(dict.fromkeys(excepts)))


@st.composite
def peer_st(draw: st.DrawFn) -> Peer:
    form = draw(st.sampled_from(("pod", "namespace", "both", "ipblock")))
    if form == "pod":
        return Peer(pod_selector=draw(selector_st()))
    if form == "namespace":
        return Peer(namespace_selector=draw(namespace_selector_st()))
    if form == "both":
        return Peer(
            pod_selector=draw(selector_st()), namespace_selector=draw(namespace_selector_st())
        )
    return Peer(ip_block=draw(ip_block_st()))


@st.composite
def policy_port_st(draw: st.DrawFn) -> PolicyPort:
    protocol = draw(protocol_st)
    form = draw(st.sampled_from(("all", "number", "range", "name")))
    if form == "all":
        return PolicyPort(protocol)
    if form == "name":
        return PolicyPort(protocol, draw(st.sampled_from(PORT_NAMES)))
    port = draw(st.sampled_from((53, 79, 80, 81, 8080)))
    if form == "number":
        return PolicyPort(protocol, port)
    return PolicyPort(protocol, port, port + draw(st.sampled_from((0, 1, 2, 8000))))


rule_st = st.builds(
    Rule,
    peers=st.lists(peer_st(), max_size=3).map(tuple),
    ports=st.lists(policy_port_st(), max_size=3).map(tuple),
)


@st.composite
def policy_st(draw: st.DrawFn, index: int) -> NetworkPolicy:
    ingress = tuple(draw(st.lists(rule_st, max_size=3)))
    egress = tuple(draw(st.lists(rule_st, max_size=3)))
    given_types: tuple[Direction, ...] | None = draw(st.sampled_from(GIVEN_POLICY_TYPES))
    types: tuple[Direction, ...] = (
        infer_policy_types(bool(egress)) if given_types is None else given_types
    )
    return NetworkPolicy(
        namespace=draw(st.sampled_from(NAMESPACE_NAMES)),
        name=f"policy-{index}",
        pod_selector=draw(st.one_of(st.just(LabelSelector()), selector_st())),
        policy_types=types,
        ingress=ingress,
        egress=egress,
    )


container_port_st = st.builds(
    ContainerPort,
    port=st.sampled_from((53, 80, 81, 8080, 9090)),
    protocol=protocol_st,
    name=st.one_of(st.none(), st.sampled_from(PORT_NAMES)),
)


@st.composite
def snapshot_st(draw: st.DrawFn) -> Snapshot:
    count = draw(st.integers(min_value=2, max_value=4))
    namespaces = {
        name: Namespace(name, {**draw(labels_st), NAMESPACE_NAME_LABEL: name})
        for name in NAMESPACE_NAMES[:count]
    }
    pods = []
    for i in range(draw(st.integers(min_value=2, max_value=8))):
        kind = draw(st.sampled_from(("pod", "pod", "pod", "no-ip", "host")))
        ports = draw(st.lists(container_port_st, max_size=3))
        # A container port name is unique within a pod (API validation).
        ports = list({(p.name or f"#{j}"): p for j, p in enumerate(ports)}.values())
        pods.append(
            Pod(
                namespace=draw(st.sampled_from(tuple(namespaces))),
                name=f"p{i}",
                labels=draw(labels_st),
                ports=tuple(ports),
                ips=()
                if kind == "no-ip"
                else (HOST_NETWORK_IP if kind == "host" else f"10.0.0.{i + 1}",),
                host_network=kind == "host",
            )
        )
    policies = tuple(draw(policy_st(i)) for i in range(draw(st.integers(min_value=0, max_value=4))))
    return Snapshot(namespaces=namespaces, pods=tuple(pods), policies=policies)


def verdicts(snapshot: Snapshot) -> dict[tuple[str, str, int, str], bool]:
    engine = Engine(snapshot)
    return {
        (src.key, dst.key, port, protocol): engine.evaluate(src, dst, port, protocol).allowed
        for src in snapshot.pods
        for dst in snapshot.pods
        for port, protocol in FLOWS
    }


def widened(
    before: dict[tuple[str, str, int, str], bool], after: dict[tuple[str, str, int, str], bool]
) -> list[str]:
    """The flows that were allowed before and are denied after."""
    return [f"{flow}" for flow, allowed in before.items() if allowed and not after[flow]]


# --- adding an allow never takes one away -------------------------------------------------------


def _with_policy(snapshot: Snapshot, index: int, policy: NetworkPolicy) -> Snapshot:
    policies = list(snapshot.policies)
    policies[index] = policy
    return replace(snapshot, policies=tuple(policies))


@PROPERTY_SETTINGS
@given(snapshot=snapshot_st(), data=st.data())
def test_adding_a_rule_never_turns_an_allowed_flow_into_a_denied_one(
    snapshot: Snapshot, data: st.DataObject
) -> None:
    if not snapshot.policies:
        return
    index = data.draw(st.integers(0, len(snapshot.policies) - 1))
    policy = snapshot.policies[index]
    new_rule = data.draw(rule_st)
    direction = data.draw(st.sampled_from(("ingress", "egress")))
    if direction == "ingress":
        changed = replace(policy, ingress=(*policy.ingress, new_rule))
    else:
        changed = replace(policy, egress=(*policy.egress, new_rule))
    before = verdicts(snapshot)
    assert widened(before, verdicts(_with_policy(snapshot, index, changed))) == []


@PROPERTY_SETTINGS
@given(snapshot=snapshot_st(), data=st.data())
def test_adding_a_peer_or_a_port_to_a_rule_never_denies_an_allowed_flow(
    snapshot: Snapshot, data: st.DataObject
) -> None:
    # An empty peer or port list matches everything, so only a non-empty list can be widened.
    spots = [
        (i, direction, r, what)
        for i, policy in enumerate(snapshot.policies)
        for direction, rules in (("ingress", policy.ingress), ("egress", policy.egress))
        for r, rule in enumerate(rules)
        for what, items in (("peers", rule.peers), ("ports", rule.ports))
        if items
    ]
    if not spots:
        return
    i, direction, r, what = data.draw(st.sampled_from(spots))
    policy = snapshot.policies[i]
    rules = list(policy.ingress if direction == "ingress" else policy.egress)
    rule = rules[r]
    if what == "peers":
        rules[r] = replace(rule, peers=(*rule.peers, data.draw(peer_st())))
    else:
        rules[r] = replace(rule, ports=(*rule.ports, data.draw(policy_port_st())))
    if direction == "ingress":
        changed = replace(policy, ingress=tuple(rules))
    else:
        changed = replace(policy, egress=tuple(rules))
    before = verdicts(snapshot)
    assert widened(before, verdicts(_with_policy(snapshot, i, changed))) == []


# --- default allow --------------------------------------------------------------------------------


def _selected(snapshot: Snapshot, pod: Pod, direction: Direction | None = None) -> bool:
    return any(
        p.namespace == pod.namespace
        and p.pod_selector.matches(pod.labels)
        and (direction is None or direction in p.policy_types)
        for p in snapshot.policies
    )


@PROPERTY_SETTINGS
@given(snapshot=snapshot_st())
def test_a_pod_selected_by_no_policy_is_reachable_from_every_pod_not_isolated_for_egress(
    snapshot: Snapshot,
) -> None:
    engine = Engine(snapshot)
    for dst in snapshot.pods:
        if _selected(snapshot, dst):
            continue
        for src in snapshot.pods:
            if _selected(snapshot, src, "egress"):
                continue
            for port, protocol in FLOWS:
                verdict = engine.evaluate(src, dst, port, protocol)
                assert verdict.allowed, (src.key, dst.key, port, protocol, verdict.summary())


# --- order does not matter ------------------------------------------------------------------------


def _shuffled(items: Sequence[T], rng: random.Random) -> tuple[T, ...]:
    shuffled = list(items)
    rng.shuffle(shuffled)
    return tuple(shuffled)


def _shuffle_rule(rule: Rule, rng: random.Random) -> Rule:
    return Rule(peers=_shuffled(rule.peers, rng), ports=_shuffled(rule.ports, rng))


def _shuffle_policy(policy: NetworkPolicy, rng: random.Random) -> NetworkPolicy:
    return replace(
        policy,
        ingress=tuple(_shuffle_rule(rule, rng) for rule in _shuffled(policy.ingress, rng)),
        egress=tuple(_shuffle_rule(rule, rng) for rule in _shuffled(policy.egress, rng)),
        policy_types=_shuffled(policy.policy_types, rng),
    )


@PROPERTY_SETTINGS
@given(snapshot=snapshot_st(), seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_the_verdict_does_not_depend_on_the_order_of_policies_rules_peers_or_ports(
    snapshot: Snapshot, seed: int
) -> None:
    rng = random.Random(seed)
    policies = [_shuffle_policy(p, rng) for p in snapshot.policies]
    rng.shuffle(policies)
    pods = list(snapshot.pods)
    rng.shuffle(pods)
    shuffled = replace(snapshot, policies=tuple(policies), pods=tuple(pods))
    assert verdicts(shuffled) == verdicts(snapshot)


# --- the fast path agrees with the engine ---------------------------------------------------------


@PROPERTY_SETTINGS
@given(snapshot=snapshot_st())
def test_reachability_counts_equal_the_brute_force_count_over_every_ordered_pair(
    snapshot: Snapshot,
) -> None:
    engine = Engine(snapshot)
    pods = snapshot.pods
    for port, protocol in FLOWS:
        allowed = sum(
            engine.evaluate(src, dst, port, protocol).allowed for src in pods for dst in pods
        )
        counts = reachability_counts(snapshot, port, protocol)
        assert (counts.allowed, counts.denied) == (allowed, len(pods) ** 2 - allowed), (
            port,
            protocol,
        )
        assert 1 <= counts.classes <= len(pods)


@PROPERTY_SETTINGS
@given(snapshot=snapshot_st())
def test_pods_of_one_class_get_the_engine_s_verdict_towards_every_other_pod(
    snapshot: Snapshot,
) -> None:
    engine = Engine(snapshot)
    model = ClassModel(snapshot)
    pods = snapshot.pods
    for port, protocol in FLOWS:
        allowed = model.allowed_matrix(port, protocol)
        for i, src in enumerate(pods):
            for j, dst in enumerate(pods):
                if i == j:
                    continue  # self pairs are always allowed, whatever the class pair says
                verdict = engine.evaluate(src, dst, port, protocol)
                cell = allowed[model.class_of[i], model.class_of[j]]
                assert cell == verdict.allowed, (src.key, dst.key, port, protocol)


# --- the tiers: the fast path still agrees -------------------------------------------------------


@st.composite
def cluster_peer_st(draw: st.DrawFn) -> ClusterPeer:
    form = draw(st.sampled_from(("namespaces", "pods", "pods", "networks", "nodes", "domains")))
    if form == "namespaces":
        return ClusterPeer(namespace_selector=draw(namespace_selector_st()))
    if form == "pods":
        return ClusterPeer(
            namespace_selector=draw(st.one_of(st.just(LabelSelector()), namespace_selector_st())),
            pod_selector=draw(selector_st()),
        )
    if form == "networks":
        block = draw(ip_block_st())
        host = ipaddress.ip_network(f"{HOST_NETWORK_IP}/32")
        return ClusterPeer(networks=(block.cidr,) + ((host,) if draw(st.booleans()) else ()))
    if form == "nodes":
        return ClusterPeer(nodes=draw(selector_st()))
    return ClusterPeer(domain_names=("example.com",))


@st.composite
def cluster_port_st(draw: st.DrawFn) -> ClusterPort:
    form = draw(st.sampled_from(("number", "range", "name")))
    if form == "name":
        return ClusterPort(protocol=None, name=draw(st.sampled_from(PORT_NAMES)))
    port = draw(st.sampled_from((53, 79, 80, 81, 8080)))
    end = port + draw(st.sampled_from((1, 2, 8000))) if form == "range" else None
    return ClusterPort(protocol=draw(protocol_st), port=port, end_port=end)


@st.composite
def cluster_rule_st(draw: st.DrawFn, actions: tuple[str, ...]) -> ClusterRule:
    return ClusterRule(
        action=draw(st.sampled_from(actions)),  # type: ignore[arg-type]
        peers=tuple(draw(st.lists(cluster_peer_st(), min_size=1, max_size=2))),
        ports=tuple(draw(st.lists(cluster_port_st(), max_size=2))),
    )


@st.composite
def cluster_policy_st(draw: st.DrawFn, index: int) -> ClusterNetworkPolicy:
    kind = draw(st.sampled_from((CLUSTER_NETWORK_POLICY,) * 4 + (BASELINE_ADMIN_NETWORK_POLICY,)))
    tier = (
        "Baseline"
        if kind == BASELINE_ADMIN_NETWORK_POLICY
        else draw(st.sampled_from(("Admin", "Baseline")))
    )
    actions = (
        ("Accept", "Deny") if kind == BASELINE_ADMIN_NETWORK_POLICY else ("Accept", "Deny", "Pass")
    )
    rules = st.lists(cluster_rule_st(actions), max_size=3).map(tuple)
    return ClusterNetworkPolicy(
        name=f"cnp-{index}",
        tier=tier,  # type: ignore[arg-type]
        priority=draw(st.sampled_from((1, 5, 5, 9))),  # ties on purpose
        subject_namespaces=draw(st.one_of(st.just(LabelSelector()), namespace_selector_st())),
        subject_pods=draw(st.one_of(st.none(), selector_st())),
        ingress=draw(rules),
        egress=draw(rules),
        kind=kind,
    )


@st.composite
def tiered_snapshot_st(draw: st.DrawFn) -> Snapshot:
    snapshot = draw(snapshot_st())
    cluster = tuple(draw(cluster_policy_st(i)) for i in range(draw(st.integers(0, 4))))
    unmodelled = tuple(
        UnmodelledPolicy("cilium.io", "v2", "CiliumNetworkPolicy", namespace, "x")
        for namespace in draw(st.lists(st.sampled_from(("", *NAMESPACE_NAMES)), max_size=1))
    )
    return replace(snapshot, cluster_policies=cluster, unmodelled=unmodelled)


@PROPERTY_SETTINGS
@given(snapshot=tiered_snapshot_st())
def test_class_counts_with_admin_and_baseline_tiers_equal_the_brute_force(
    snapshot: Snapshot,
) -> None:
    engine = Engine(snapshot)
    pods = snapshot.pods
    for port, protocol in FLOWS:
        verdicts = [engine.evaluate(src, dst, port, protocol) for src in pods for dst in pods]
        allowed = sum(v.allowed for v in verdicts)
        unknown = sum(not v.known for v in verdicts)
        counts = reachability_counts(snapshot, port, protocol)
        assert (counts.allowed, counts.denied, counts.unknown) == (
            allowed,
            len(pods) ** 2 - allowed,
            unknown,
        ), (port, protocol)


@pytest.mark.parametrize(
    ("selector", "labels", "matches"),
    [
        pytest.param(
            Requirement("app", "NotIn", ("a",)), {}, True, id="NotIn matches a pod without the key"
        ),
        pytest.param(
            Requirement("app", "In", ("a",)), {}, False, id="In never matches a pod without the key"
        ),
        pytest.param(
            Requirement("app", "Exists"), {"app": ""}, True, id="Exists matches an empty value"
        ),
        pytest.param(
            Requirement("app", "DoesNotExist"),
            {"app": ""},
            False,
            id="DoesNotExist fails on an empty value",
        ),
    ],
)
def test_the_generators_use_selector_operators_the_way_the_api_defines_them(
    selector: Requirement, labels: dict[str, str], matches: bool
) -> None:
    # The properties above rely on these; a change here would make them test something else.
    assert selector.matches(labels) is matches
