"""Updating a plan for a few changed pods (`update_plan`): its declared flows are exactly those a
whole plan of the new snapshot has; its witnesses are the previous plan's, judged again where a
changed pod is an end; and what it cannot update exactly it leaves to a whole plan."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from bench.synthetic import make_cluster, make_distinct_cluster, with_expectations
from collector.core.changes import diff_snapshots
from collector.core.engine import Engine
from collector.core.evidence import evidence_of
from collector.core.model import LabelSelector, Pod, Snapshot
from collector.core.planning import (
    MAX_UPDATE_PODS,
    RULES_CHANGED,
    Plan,
    PlannedFlow,
    build_plan,
    update_plan,
)
from collector.core.scheduling import prepare_plan, prepare_update
from collector.core.settings import PlannerSettings

SETTINGS = PlannerSettings()


def _declared(plan: Plan) -> tuple[object, dict[str, PlannedFlow]]:
    return plan.declared, {k: f for k, f in plan.flows.items() if f.kind == "declared"}


def _changed(snapshot: Snapshot, rng: random.Random, count: int) -> Snapshot:
    """`count` pods changed at random: relabelled (to another pod's labels or a new version),
    stopped, removed, or added as a copy of another pod with a new name and address."""
    pods = list(snapshot.pods)
    for i in range(count):
        j = rng.randrange(len(pods))
        pod = pods[j]
        what = rng.choice(["relabel", "copy-labels", "stop", "remove", "add"])
        if what == "relabel":
            pods[j] = dataclasses.replace(pod, labels={**pod.labels, "version": f"u{i}"})
        elif what == "copy-labels":
            other = pods[rng.randrange(len(pods))]
            pods[j] = dataclasses.replace(pod, labels=dict(other.labels))
        elif what == "stop":
            pods[j] = dataclasses.replace(pod, phase="Pending", ips=())
        elif what == "remove":
            del pods[j]
        else:
            pods.append(
                dataclasses.replace(
                    pod, name=f"{pod.name}-n{i}", uid=f"{pod.uid}-n{i}", ips=(f"10.250.{i}.7",)
                )
            )
    return dataclasses.replace(snapshot, pods=tuple(sorted(pods, key=lambda p: p.key)))


def _sorted(snapshot: Snapshot) -> Snapshot:
    """Pods in key order, as the Kubernetes source publishes them (a kept flow keeps the order of
    its pods in the snapshot it was planned on)."""
    return dataclasses.replace(snapshot, pods=tuple(sorted(snapshot.pods, key=lambda p: p.key)))


CLUSTERS = {
    "repeating": lambda: _sorted(with_expectations(make_cluster(600, 12, 48, 3), 40, 2)),
    "distinct": lambda: _sorted(with_expectations(make_distinct_cluster(500, 50, 200, 5), 40, 2)),
}


@pytest.mark.parametrize("cluster", sorted(CLUSTERS))
def test_an_updated_plan_has_exactly_the_declared_flows_of_a_whole_plan(cluster: str) -> None:
    rng = random.Random(11)
    first = CLUSTERS[cluster]()
    previous = build_plan(first, SETTINGS, generation=1)
    updated = 0
    for generation in range(2, 14):
        snapshot = _changed(first, rng, rng.choice([1, 1, 2, 5]))
        change = diff_snapshots(first, snapshot, generation=generation, at=0.0)
        plan = update_plan(previous, snapshot, change, SETTINGS, generation=generation)
        whole = build_plan(snapshot, SETTINGS, generation=generation)
        if plan is None:
            continue  # a flow sampled by class pair was touched: only a whole plan can say
        updated += 1
        assert _declared(plan) == _declared(whole)
        assert plan.probe_pods == whole.probe_pods
        assert plan.basis == 1
        assert plan.evidence is previous.evidence
        # Witnesses: the previous plan's, as they stand on the new snapshot.
        engine = Engine(snapshot)
        witnesses = {k: f for k, f in plan.flows.items() if f.kind == "witness"}
        before = {k: f for k, f in previous.flows.items() if f.kind == "witness"}
        assert witnesses.keys() <= before.keys()
        for flow in witnesses.values():
            assert snapshot.pod(flow.source.key) is flow.source
            if isinstance(flow.destination, Pod):
                assert snapshot.pod(flow.destination.key) is flow.destination
            verdict = engine.evaluate(flow.source, flow.destination, flow.port, flow.protocol)
            assert flow.verdict == verdict and verdict.known and verdict.allowed == flow.intent
        moved = change.pods_added | change.pods_removed | change.pods_changed
        for key in before.keys() - witnesses.keys():
            gone = before[key]
            assert gone.source.key in moved or gone.destination_name in moved, key
    assert updated >= 6, f"only {updated} of 12 changes could be updated"


def test_declared_flows_no_changed_pod_selects_are_kept_as_they_were() -> None:
    first = CLUSTERS["repeating"]()
    previous = build_plan(first, SETTINGS, generation=1)
    pod = first.pods[0]
    snapshot = dataclasses.replace(
        first,
        pods=(dataclasses.replace(pod, labels={**pod.labels, "version": "other"}), *first.pods[1:]),
    )
    change = diff_snapshots(first, snapshot, generation=2, at=0.0)
    plan = update_plan(previous, snapshot, change, SETTINGS, generation=2)
    assert plan is not None
    kept = [d for d in plan.declared if any(d is old for old in previous.declared)]
    remade = [d for d in plan.declared if not any(d is old for old in previous.declared)]
    assert kept and len(kept) + len(remade) == len(plan.declared)
    for declared in kept:
        assert all(plan.flows[k] is previous.flows[k] for k in declared.keys)
        assert all(pod.key not in k for k in declared.keys)
    # Facts are computed only for the flows made anew.
    before = prepare_plan(first, SETTINGS, generation=1)
    prepared = prepare_update(before, snapshot, change, SETTINGS, generation=2)
    assert prepared is not None
    assert prepared.facts == prepared.plan.facts()


def test_what_an_update_cannot_do_exactly_is_left_to_a_whole_plan() -> None:
    first = CLUSTERS["repeating"]()
    previous = build_plan(first, SETTINGS, generation=1)
    many = dataclasses.replace(
        first,
        pods=tuple(
            dataclasses.replace(p, labels={**p.labels, "version": "m"})
            for p in first.pods[: MAX_UPDATE_PODS + 1]
        )
        + first.pods[MAX_UPDATE_PODS + 1 :],
    )
    change = diff_snapshots(first, many, generation=2, at=0.0)
    assert len(change.pods_changed) == MAX_UPDATE_PODS + 1
    assert update_plan(previous, many, change, SETTINGS, generation=2) is None
    initial = diff_snapshots(None, first, generation=1, at=0.0)
    assert update_plan(previous, first, initial, SETTINGS, generation=1) is None


def _rules_changed(snapshot: Snapshot, rng: random.Random) -> Snapshot:
    """One change of the rules at random: a policy removed, a policy added (a copy of another
    under a new name, its pod selector emptied: every pod of its namespace), a namespace's
    labels changed, or an expectations document's last flow removed."""
    what = rng.choice(["remove-policy", "add-policy", "relabel-namespace", "drop-flow"])
    if what == "remove-policy":
        j = rng.randrange(len(snapshot.policies))
        return dataclasses.replace(
            snapshot, policies=snapshot.policies[:j] + snapshot.policies[j + 1 :]
        )
    if what == "add-policy":
        policy = rng.choice(snapshot.policies)
        added = dataclasses.replace(
            policy, name=f"{policy.name}-copy", pod_selector=LabelSelector()
        )
        return dataclasses.replace(snapshot, policies=(*snapshot.policies, added))
    if what == "relabel-namespace":
        name = rng.choice(sorted(snapshot.namespaces))
        namespace = snapshot.namespaces[name]
        relabelled = dataclasses.replace(
            namespace, labels={**namespace.labels, "team": f"moved-{rng.randrange(99)}"}
        )
        return dataclasses.replace(snapshot, namespaces={**snapshot.namespaces, name: relabelled})
    j = rng.randrange(len(snapshot.expectations))
    document = snapshot.expectations[j]
    shorter = dataclasses.replace(document, flows=document.flows[:-1])
    return dataclasses.replace(
        snapshot,
        expectations=snapshot.expectations[:j] + (shorter,) + snapshot.expectations[j + 1 :],
    )


@pytest.mark.parametrize("cluster", sorted(CLUSTERS))
def test_an_update_for_changed_rules_has_the_declared_flows_of_a_whole_plan_and_no_witnesses(
    cluster: str,
) -> None:
    """Policies, namespaces or expectations changed (with pods or not): every declared flow as a
    whole plan has it, no witness flow (a witness chosen before may not depend on its policy
    alone any more), every policy of the new snapshot PENDING; pod updates after it too."""
    rng = random.Random(3)
    snapshot = CLUSTERS[cluster]()
    plan = build_plan(snapshot, SETTINGS, generation=1)
    assert any(f.kind == "witness" for f in plan.flows.values())
    kinds = set()
    for generation in range(2, 14):
        after = _rules_changed(snapshot, rng) if generation % 3 != 1 else snapshot
        if generation % 2 == 0 or generation % 3 == 1:
            after = _changed(after, rng, rng.choice([1, 2]))
        change = diff_snapshots(snapshot, after, generation=generation, at=0.0)
        updated = update_plan(plan, after, change, SETTINGS, generation=generation)
        assert updated is not None
        whole = build_plan(after, SETTINGS, generation=generation)
        assert _declared(updated) == _declared(whole)
        assert not any(f.kind == "witness" for f in updated.flows.values())
        evidence = evidence_of(updated.evidence, {})
        assert [e.policy for e in evidence] == [p.key for p in after.policies]
        assert {(e.status, e.reason) for e in evidence} == {("PENDING", RULES_CHANGED)}
        assert updated.basis == 1 and updated.sweep is plan.sweep
        kinds.add("rules" if change.policies_added or change.policies_removed else "other")
        plan, snapshot = updated, after
    assert kinds == {"rules", "other"}


@pytest.mark.parametrize("cluster", sorted(CLUSTERS))
def test_updates_of_updates_still_have_the_declared_flows_of_a_whole_plan(cluster: str) -> None:
    """Each update starts from the one before (pods changed since the whole plan accumulate), and
    flows sampled by class pair are sampled exactly as a whole plan samples them."""
    rng = random.Random(5)
    snapshot = CLUSTERS[cluster]()
    plan: Plan | None = build_plan(snapshot, SETTINGS, generation=1)
    updates = sampled = 0
    for generation in range(2, 16):
        assert plan is not None
        after = _changed(snapshot, rng, rng.choice([1, 2, 3]))
        change = diff_snapshots(snapshot, after, generation=generation, at=0.0)
        updated = update_plan(plan, after, change, SETTINGS, generation=generation)
        whole = build_plan(after, SETTINGS, generation=generation)
        if updated is None:
            plan = whole
        else:
            updates += 1
            assert _declared(updated) == _declared(whole)
            assert updated.moved >= change.pods_added | change.pods_changed
            sampled += sum(d.pairs_total > d.pairs_covered for d in updated.declared)
            plan = updated
        snapshot = after
    assert updates >= 10
    assert sampled, "no updated plan held a flow sampled by class pair"


@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_a_snapshot_s_pod_index_is_made_from_the_one_before_only_when_it_adds_up(
    order: str,
) -> None:
    rng = random.Random(2)
    first = CLUSTERS["repeating"]()
    if order == "reversed":
        first = dataclasses.replace(first, pods=first.pods[::-1])
    first.pods_by_key  # noqa: B018 - the earlier snapshot's indexes, built
    first.pods_by_namespace  # noqa: B018
    derived = 0
    for _ in range(20):
        pods = list(first.pods)
        j = rng.randrange(len(pods))
        pods[j] = dataclasses.replace(pods[j], labels={"app": "moved"})
        del pods[rng.randrange(len(pods))]
        k = rng.randrange(len(pods))
        pods.insert(k, dataclasses.replace(pods[k], name=f"{pods[k].name}-new", uid="new"))
        after = dataclasses.replace(first, pods=tuple(pods))
        if order == "sorted":
            after = _sorted(after)
        change = diff_snapshots(first, after, generation=2, at=0.0)
        after.index_after(first, change.pods_added | change.pods_removed | change.pods_changed)
        if "pods_by_key" in after.__dict__:
            derived += 1
            made = dict(after.pods_by_key)
            assert made == {p.key: p for p in after.pods}
            assert all(made[p.key] is p for p in after.pods)
        if "pods_by_namespace" in after.__dict__:
            grouped = dict(after.pods_by_namespace)
            fresh: dict[str, list[Pod]] = {}
            for pod in after.pods:
                fresh.setdefault(pod.namespace, []).append(pod)
            assert grouped == {ns: tuple(pods) for ns, pods in fresh.items()}
    if order == "sorted":
        assert derived == 20


@pytest.mark.parametrize("what", ["pods", "policies"])
def test_the_update_benchmark_compares_updates_with_whole_plans(
    what: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench/update_bench.py at a small size: every change updated, each compared with a whole
    plan (the bench fails on a difference)."""
    from bench import update_bench

    argv = ["update_bench", "--pods", "400", "--flows", "20", "--changes", "4", "--whole", "4"]
    monkeypatch.setattr("sys.argv", [*argv, "--change", what])
    assert update_bench.main() == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["pods"] == 400
    compared = [r for r in rows[1:-1] if "declared_equal" in r]
    assert len(compared) == 4 and all(r["declared_equal"] for r in compared)
    assert rows[-1]["updates"] == 4 and rows[-1]["fell_back_to_whole"] == 0
