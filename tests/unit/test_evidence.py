"""Witness planning: for every policy and rule, flows whose verdict flips when it is removed.

Table tests name the case they prove; a property test holds the planner to the definition on
random small clusters: every witness's verdict flips when its policy (rule) is removed, and every
policy whose removal changes the matrix gets at least one witness.
"""

from __future__ import annotations

import dataclasses
import gc
import weakref
from collections.abc import Iterable

import pytest
from hypothesis import given
from make import make_pod, make_policy, make_snapshot, peer, port, rule, sel
from test_properties import PROPERTY_SETTINGS, snapshot_st

from bench.synthetic import make_distinct_cluster, with_expectations
from collector.core import evidence as evidence_module
from collector.core.classes import ClassModel
from collector.core.engine import Engine, suspects
from collector.core.evidence import (
    EvidencePlan,
    FlowOutcome,
    PolicyEvidencePlan,
    Witness,
    evidence_of,
    plan_evidence,
)
from collector.core.model import (
    Expectations,
    ExternalTarget,
    FlowExpectation,
    NetworkPolicy,
    PodTarget,
    PortSpec,
    Rule,
    Snapshot,
)

WEB = make_pod("shop/web", labels={"app": "web"}, ports=((80, "TCP", "http"),))
API = make_pod("shop/api", labels={"app": "api"}, ports=((8080, "TCP", "http"),), ip="10.244.1.2")
DB = make_pod("shop/db", labels={"app": "db"}, ports=((5432, "TCP", "pg"),), ip="10.244.1.3")
JOB = make_pod("shop/job", labels={"app": "job"}, ports=(), ip="10.244.1.4")
PODS = (WEB, API, DB, JOB)


def snap(*policies: NetworkPolicy, pods: Iterable = PODS) -> Snapshot:
    return make_snapshot(list(pods), policies)


def plan_of(snapshot: Snapshot, key: str) -> PolicyEvidencePlan:
    found = plan_evidence(snapshot, running_only=False).policy(key)
    assert found is not None
    return found


def without_policy(snapshot: Snapshot, key: str) -> Snapshot:
    return dataclasses.replace(
        snapshot, policies=tuple(p for p in snapshot.policies if p.key != key)
    )


def without_rule(snapshot: Snapshot, witness: Witness) -> Snapshot:
    assert witness.rule is not None
    policies = []
    for p in snapshot.policies:
        if p.key == witness.rule.policy:
            rules = p.ingress if witness.rule.direction == "ingress" else p.egress
            kept: tuple[Rule, ...] = rules[: witness.rule.index] + rules[witness.rule.index + 1 :]
            p = dataclasses.replace(p, **{witness.rule.direction: kept})
        policies.append(p)
    return dataclasses.replace(snapshot, policies=tuple(policies))


def flips(snapshot: Snapshot, witness: Witness) -> bool:
    """Whether the witness's verdict differs without its subject (the definition)."""
    after = (
        without_rule(snapshot, witness)
        if witness.rule
        else without_policy(snapshot, witness.policy)
    )
    args = (witness.source, witness.destination, witness.port, witness.protocol)
    before = Engine(snapshot).evaluate(*args).allowed
    assert before == witness.model
    return Engine(after).evaluate(*args).allowed != before


DENY_DB = make_policy("deny-db", "shop", selector=sel({"app": "db"}))
DB_FROM_API = make_policy(
    "db-from-api", "shop", selector=sel({"app": "db"}), ingress=[rule(peer({"app": "api"}))]
)
DEFAULT_DENY = make_policy("default-deny", "shop", types=("ingress", "egress"))


@pytest.mark.parametrize(
    ("policies", "key", "expect"),
    [
        pytest.param(
            (DENY_DB,),
            "shop/deny-db",
            {"isolation": 1},
            id="a policy that alone isolates a pod has an isolation witness: a flow it denies",
        ),
        pytest.param(
            (DENY_DB, DB_FROM_API),
            "shop/db-from-api",
            {},
            id="a policy whose rules alone allow a flow to a pod isolated by another is proven by them",
        ),
        pytest.param(
            (DB_FROM_API,),
            "shop/db-from-api",
            {"isolation": 1},
            id="a policy that isolates and allows has an isolation witness for what it denies",
        ),
    ],
)
def test_policy_witnesses(
    policies: tuple[NetworkPolicy, ...], key: str, expect: dict[str, int]
) -> None:
    snapshot = snap(*policies)
    plan = plan_of(snapshot, key)
    kinds: dict[str, int] = {}
    for w in plan.witnesses:
        kinds[w.kind] = kinds.get(w.kind, 0) + 1
        assert flips(snapshot, w), w.describe()
    assert kinds == expect
    assert plan.unprovable == ""
    removed = Engine(without_policy(snapshot, key))
    assert any(
        removed.evaluate(w.source, w.destination, w.port, w.protocol).allowed != w.model
        for w in plan.all_witnesses()
    ), "a witness shows the policy ignored"


def test_a_rule_is_proven_by_a_flow_only_it_allows() -> None:
    snapshot = snap(DB_FROM_API)
    plan = plan_of(snapshot, "shop/db-from-api")
    (rule_plan,) = plan.rules
    (w,) = rule_plan.witnesses
    assert (w.source.key, w.destination, w.model) == ("shop/api", DB, True)
    assert w.why == "allowed only by shop/db-from-api ingress[0]"
    assert flips(snapshot, w)


def test_a_redundant_policy_is_unprovable_and_flagged() -> None:
    snapshot = snap(DENY_DB, dataclasses.replace(DENY_DB, name="deny-db-again"), DB_FROM_API)
    plan = plan_of(snapshot, "shop/deny-db-again")
    assert plan.witnesses == () and plan.unprovable.startswith("redundant")
    assert any("redundant" in line for line in plan.lint)


def test_a_shadowed_rule_is_named_so() -> None:
    broad = rule(peer({"app": "api"}))
    narrow = rule(peer({"app": "api"}), ports=[port(5432)])
    policy = make_policy("db", "shop", selector=sel({"app": "db"}), ingress=[broad, narrow])
    plan = plan_of(snap(policy), "shop/db")
    assert plan.rules[0].witnesses
    assert plan.rules[1].witnesses == ()
    assert plan.rules[1].unprovable.startswith("shadowed")
    assert any("ingress[1] is shadowed" in line for line in plan.lint)


def test_a_named_port_is_proven_through_the_name() -> None:
    policy = make_policy(
        "api",
        "shop",
        selector=sel({"app": "api"}),
        ingress=[rule(peer({"app": "web"}), ports=[port("http")])],
    )
    snapshot = snap(policy)
    (w,) = plan_of(snapshot, "shop/api").rules[0].witnesses
    assert (w.port, w.via) == (8080, "named port http")
    assert flips(snapshot, w)


def test_an_end_port_range_is_proven_inside_it_not_at_its_first_port() -> None:
    policy = make_policy(
        "api",
        "shop",
        selector=sel({"app": "api"}),
        ingress=[rule(peer({"app": "web"}), ports=[port(8000, end=8090)])],
    )
    snapshot = snap(policy)
    (w,) = plan_of(snapshot, "shop/api").rules[0].witnesses
    assert w.port == 8001 and w.via == "inside 8000-8090"
    assert flips(snapshot, w)


def test_an_egress_only_policy_is_proven_at_the_source() -> None:
    policy = make_policy(
        "web-out",
        "shop",
        selector=sel({"app": "web"}),
        egress=[rule(peer({"app": "api"}))],
        types=("egress",),
    )
    snapshot = snap(policy)
    plan = plan_of(snapshot, "shop/web-out")
    (iso,) = plan.witnesses
    assert (iso.kind, iso.direction, iso.source.key, iso.model) == (
        "isolation",
        "egress",
        "shop/web",
        False,
    )
    (allow,) = plan.rules[0].witnesses
    assert (allow.source.key, allow.destination) == ("shop/web", API)
    assert flips(snapshot, iso) and flips(snapshot, allow)


def test_an_ip_block_only_rule_uses_a_declared_external_destination() -> None:
    isolate = make_policy(
        "web-out",
        "shop",
        selector=sel({"app": "web"}),
        egress=[rule(peer({"app": "api"}))],
        types=("egress",),
    )
    payments = make_policy(
        "payments",
        "shop",
        selector=sel({"app": "web"}),
        egress=[rule(peer(cidr="198.51.100.0/24"), ports=[port(443)])],
        types=("egress",),
    )
    snapshot = snap(isolate, payments)
    plan = plan_of(snapshot, "shop/payments")
    assert plan.witnesses == () and "outside the cluster" in plan.unprovable
    assert plan.rules[0].unprovable == "its peers are only addresses outside the cluster"
    declared = Expectations(
        "shop",
        "flows",
        (
            FlowExpectation(
                "to-payments",
                PodTarget(namespace="shop", pod_selector=sel({"app": "web"})),
                ExternalTarget(cidr=peer(cidr="198.51.100.0/24").ip_block.cidr),  # type: ignore[union-attr]
                (PortSpec("TCP", 443),),
                "allow",
            ),
        ),
    )
    snapshot = dataclasses.replace(snapshot, expectations=(declared,))
    plan = plan_of(snapshot, "shop/payments")
    (w,) = plan.witnesses
    assert (w.destination, w.port, w.model) == ("198.51.100.1", 443, True)
    assert flips(snapshot, w)


def test_a_policy_that_selects_no_pod_is_unprovable_and_says_so() -> None:
    policy = make_policy("ghost", "shop", selector=sel({"app": "ghost"}))
    plan = plan_of(snap(policy), "shop/ghost")
    assert plan.unprovable == "it selects no pod"
    assert plan.lint == ("shop/ghost selects no pod",)


def test_witnesses_cover_each_peer_of_a_rule() -> None:
    two_peers = rule(peer({"app": "api"}), peer({"app": "job"}))
    policy = make_policy("db", "shop", selector=sel({"app": "db"}), ingress=[two_peers])
    snapshot = snap(policy)
    sources = {w.source.key for w in plan_of(snapshot, "shop/db").rules[0].witnesses}
    assert sources == {"shop/api", "shop/job"}


def test_live_witnesses_are_only_between_running_pods_real_ones_first() -> None:
    pods = [dataclasses.replace(p, node="node-1") for p in PODS]
    pods[0] = dataclasses.replace(pods[0], phase="Pending")  # web does not run
    snapshot = snap(DB_FROM_API, pods=pods)
    plan = plan_evidence(snapshot)
    for w in plan.witnesses():
        assert w.source.key != "shop/web"


def test_evidence_status_follows_the_witness_flows() -> None:
    snapshot = snap(DB_FROM_API)
    plan = plan_evidence(snapshot, running_only=False)
    keys = [w.flow_key for w in plan.witnesses()]
    assert evidence_of(plan, {})[0].status == "PENDING"
    passed = {k: FlowOutcome("PASS", "as the model says") for k in keys}
    (proven,) = evidence_of(plan, passed)
    assert proven.status == "PROVEN"
    drifting = {**passed, keys[0]: FlowOutcome("ENFORCEMENT_DRIFT", "the network does not")}
    (broken,) = evidence_of(plan, drifting)
    assert broken.status == "NOT_ENFORCED" and "shop/db-from-api" in broken.reason
    assert evidence_of(EvidencePlan(), {}) == []


# --- the definition, on random clusters -----------------------------------------------------------


def _declared_ports(snapshot: Snapshot) -> list[tuple[int, str]]:
    return sorted({(cp.port, cp.protocol) for p in snapshot.pods for cp in p.ports})


def _matrix(
    snapshot: Snapshot, ports: list[tuple[int, str]]
) -> dict[tuple[str, str, int, str], bool]:
    engine = Engine(snapshot)
    return {
        (s.key, d.key, port, proto): engine.evaluate(s, d, port, proto).allowed  # type: ignore[arg-type]
        for s in snapshot.pods
        for d in snapshot.pods
        if not s.host_network and not d.host_network
        for port, proto in ports
    }


@PROPERTY_SETTINGS
@given(snapshot=snapshot_st())
def test_every_witness_flips_and_every_policy_that_matters_has_one_that_shows_it_ignored(
    snapshot: Snapshot,
) -> None:
    keys = [p.key for p in snapshot.policies]
    if len(set(keys)) != len(keys):
        return  # two policies of one name: the snapshot of a cluster never has them
    plan = plan_evidence(snapshot, running_only=False)
    for w in plan.witnesses():
        assert flips(snapshot, w), w.describe()
    ports = _declared_ports(snapshot)
    before = _matrix(snapshot, ports)
    for policy in snapshot.policies:
        evidence = plan.policy(policy.key)
        assert evidence is not None
        after = _matrix(without_policy(snapshot, policy.key), ports)
        changed = [
            flow
            for flow, allowed in before.items()
            if after[flow] != allowed and flow[0] != flow[1]
        ]
        if changed:
            # Its evidence catches an enforcer that ignores it: some witness flips without it.
            removed = Engine(without_policy(snapshot, policy.key))
            assert any(
                removed.evaluate(w.source, w.destination, w.port, w.protocol).allowed != w.model
                for w in evidence.all_witnesses()
            ), f"{policy.key} changes {changed[:3]} but no witness shows it"


def test_a_dropped_flow_that_witnesses_both_sides_names_both_as_suspects() -> None:
    api_out = make_policy(
        "api-out",
        "shop",
        selector=sel({"app": "api"}),
        egress=[rule(peer({"app": "db"}))],
        types=("egress",),
    )
    job_out = make_policy(
        "job-out",
        "shop",
        selector=sel({"app": "job"}),
        egress=[rule(peer({"app": "db"}))],
        types=("egress",),
    )
    db_in = make_policy(
        "db-in",
        "shop",
        selector=sel({"app": "db"}),
        ingress=[rule(peer({"app": "api"}), peer({"app": "job"}))],
    )
    snapshot = snap(api_out, job_out, db_in)
    plan = plan_evidence(snapshot, running_only=False)
    keys = {w.flow_key for w in plan.witnesses()}
    engine = Engine(snapshot)
    # db-in is not enforced: every flow into the database is dropped.
    outcomes = {}
    for key, witnesses in plan.by_flow().items():
        w = witnesses[0]
        verdict = engine.evaluate(w.source, w.destination, w.port, w.protocol)
        into_db = w.destination == DB and w.model
        outcomes[key] = FlowOutcome(
            "ENFORCEMENT_DRIFT" if into_db else "PASS",
            "dropped" if into_db else "",
            None,
            suspects(verdict),
        )
    assert len(keys) == len(outcomes)
    by_policy = {e.policy: e for e in evidence_of(plan, outcomes)}
    # The probes cannot tell which side drops them: each policy of a dropped flow is suspect, and
    # says which other one could be the culprit instead.
    assert by_policy["shop/db-in"].status == "NOT_ENFORCED"
    assert "(or shop/" in by_policy["shop/db-in"].reason
    for other in ("shop/api-out", "shop/job-out"):
        assert by_policy[other].status == "NOT_ENFORCED", by_policy[other]
        assert "or shop/db-in is not: the probe cannot tell which side" in by_policy[other].reason


def test_a_plan_s_evidence_keeps_nothing_of_it_alive_once_it_is_dropped() -> None:
    """The per-port matrices are cached on the plan's own objects: once a plan is replaced (every
    policy change in the loop), its class model and matrices go with it (the soak's collector
    grew by every old plan while a method-level cache held them)."""
    snapshot = snap(DB_FROM_API)
    model = ClassModel(snapshot)
    plan = plan_evidence(snapshot, model=model, running_only=False)
    assert list(plan.witnesses()), "the matrices were used"
    gone = weakref.ref(model)
    del plan, model
    gc.collect()
    assert gone() is None, "an old plan's class model is still referenced"


@pytest.mark.parametrize(
    ("full_cells", "cache_bytes"),
    [(0, evidence_module.PORT_CACHE_BYTES), (1 << 40, 1), (0, 1)],
    ids=["counts-per-block", "one-port-cached", "both"],
)
def test_counts_per_block_and_a_small_port_cache_choose_the_same_witnesses(
    monkeypatch: pytest.MonkeyPatch, full_cells: int, cache_bytes: int
) -> None:
    """Large class tables are counted per block over the rules that touch it, and the port cache
    is bounded in bytes: neither may change a single witness (a cluster whose selectors do not
    repeat, with named ports, endPort ranges and ipBlocks)."""
    snapshot = with_expectations(make_distinct_cluster(400, 40, 160, 5), 20, 2)
    expected = plan_evidence(snapshot)
    assert len(expected.witnesses()) > 100
    monkeypatch.setattr(evidence_module, "FULL_COUNT_CELLS", full_cells)
    monkeypatch.setattr(evidence_module, "PORT_CACHE_BYTES", cache_bytes)
    assert plan_evidence(snapshot) == expected
