"""The synthetic cluster generator: deterministic, realistic enough, and its manifests load back."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from bench.synthetic import make_cluster, make_distinct_cluster, write_manifests
from collector.core import classes
from collector.core.classes import reachability_counts
from collector.core.engine import Engine
from collector.core.model import Snapshot
from collector.reading.manifests import load_snapshot


def _without_sources(snapshot: Snapshot) -> Snapshot:
    return replace(snapshot, policies=tuple(replace(p, source="") for p in snapshot.policies))


def test_the_same_arguments_give_the_same_cluster_and_another_seed_another() -> None:
    first = make_cluster(pods=300, namespaces=12, policies=60, seed=7)
    assert make_cluster(pods=300, namespaces=12, policies=60, seed=7) == first
    other = make_cluster(pods=300, namespaces=12, policies=60, seed=8)
    assert other.pods != first.pods
    assert other.policies != first.policies


def test_the_cluster_has_the_asked_size_and_unique_names_and_addresses() -> None:
    snapshot = make_cluster(pods=500, namespaces=20, policies=80, seed=1)
    assert (len(snapshot.pods), len(snapshot.namespaces), len(snapshot.policies)) == (500, 20, 80)
    assert len({p.key for p in snapshot.pods}) == 500
    assert len({p.key for p in snapshot.policies}) == 80
    ips = [ip for p in snapshot.pods for ip in p.ips]
    assert len(ips) == len(set(ips))
    assert all(ip.startswith("10.") for ip in ips)
    assert {p.namespace for p in snapshot.pods} <= set(snapshot.namespaces)


def test_policies_use_every_feature_a_benchmark_should_exercise() -> None:
    snapshot = make_cluster(pods=200, namespaces=10, policies=120, seed=3)
    ports = [
        port
        for policy in snapshot.policies
        for rule in (*policy.ingress, *policy.egress)
        for port in rule.ports
    ]
    peers = [
        peer
        for policy in snapshot.policies
        for rule in (*policy.ingress, *policy.egress)
        for peer in rule.peers
    ]
    assert any(p.pod_selector.is_empty and not p.ingress for p in snapshot.policies), "default deny"
    assert any("egress" in p.policy_types for p in snapshot.policies)
    assert any(isinstance(p.port, str) for p in ports), "named port"
    assert any(p.end_port is not None for p in ports), "port range"
    assert any(p.ip_block is not None and p.ip_block.excepts for p in peers), "ipBlock with except"
    assert any(p.pod_selector is not None and p.namespace_selector is not None for p in peers), (
        "pod and namespace selector in one peer"
    )
    assert any(
        s is not None and s.match_expressions
        for p in peers
        for s in (p.pod_selector, p.namespace_selector)
    ), "matchExpressions"


def test_many_pods_are_alike_as_in_real_clusters() -> None:
    snapshot = make_cluster(pods=2000, namespaces=40, policies=300, seed=1)
    counts = reachability_counts(snapshot, 8080, "TCP")
    assert counts.pods == 2000
    assert counts.classes < 2000 // 3
    assert 0 < counts.allowed < 2000 * 2000


def test_written_manifests_load_back_to_an_equal_snapshot(tmp_path: Path) -> None:
    snapshot = make_cluster(pods=400, namespaces=15, policies=90, seed=11)
    write_manifests(snapshot, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "namespaces.yaml",
        "networkpolicies.yaml",
        "pods.yaml",
    ]
    loaded = _without_sources(load_snapshot([tmp_path]))
    assert loaded.pods == snapshot.pods
    assert loaded.policies == snapshot.policies
    assert dict(loaded.namespaces) == dict(snapshot.namespaces)


def test_the_distinct_generator_repeats_no_selector_across_namespaces() -> None:
    snapshot = make_distinct_cluster(pods=600, namespaces=30, policies=120, seed=5)
    assert (len(snapshot.pods), len(snapshot.namespaces), len(snapshot.policies)) == (600, 30, 120)
    assert make_distinct_cluster(pods=600, namespaces=30, policies=120, seed=5) == snapshot
    by_namespace = {}
    for policy in snapshot.policies:
        by_namespace.setdefault(policy.namespace, []).append(policy)
    assert all(len(found) == 4 for found in by_namespace.values())
    apps = {(p.namespace, v) for p in snapshot.pods for k, v in p.labels.items() if k == "app"}
    assert len({v for _, v in apps}) == len(apps), "an app label belongs to one namespace"
    peers = [peer for p in snapshot.policies for r in (*p.ingress, *p.egress) for peer in r.peers]
    assert any(p.ip_block is not None and p.ip_block.excepts for p in peers)
    assert any(
        port.end_port is not None
        for p in snapshot.policies
        for r in (*p.ingress, *p.egress)
        for port in r.ports
    )


@pytest.mark.parametrize(
    "snapshot",
    [
        pytest.param(make_cluster(pods=120, namespaces=6, policies=40, seed=2), id="repeating"),
        pytest.param(
            make_distinct_cluster(pods=120, namespaces=12, policies=48, seed=2), id="distinct"
        ),
    ],
)
def test_counts_in_many_small_chunks_equal_the_engine_over_every_pair(
    snapshot: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tiny chunks make every loop of the class-pair count run many times, as at 100,000 pods.
    monkeypatch.setattr(classes, "_BLOCK_CELLS", 64)
    engine = Engine(snapshot)
    model = classes.ClassModel(snapshot)
    assert model.classes > 16
    for port, protocol in ((8080, "TCP"), (443, "TCP"), (53, "UDP"), (9050, "TCP")):
        expected = sum(
            engine.evaluate(src, dst, port, protocol).allowed
            for src in snapshot.pods
            for dst in snapshot.pods
        )
        assert model.counts(port, protocol).allowed == expected, (port, protocol)
