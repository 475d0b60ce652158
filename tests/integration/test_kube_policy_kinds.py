"""The Kubernetes source and the policies beyond NetworkPolicy, against the fake API server.

API discovery finds the Network Policy API's kinds (watched with their semantics: the snapshot's
cluster policies) and Cilium's policy kinds (watched for their presence only, asking for metadata:
the snapshot's unmodelled policies); a group installed later is found by the next discovery, a
group removed is forgotten; a kind that may not be listed makes the whole model unknown; a served
NetworkPolicy in a legacy CIDR form is read, not dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from collector.core.engine import Engine
from collector.kube import (
    PARTIAL_METADATA_ACCEPT,
    PARTIAL_METADATA_WATCH_ACCEPT,
    KubernetesSource,
    load_kube_config,
)
from tests.fakeapi import FakeApiServer, RequestRecord
from tests.integration.test_kube_source import (
    FAST,
    TOKEN,
    Updates,
    eventually,
    make_namespace,
    make_pod,
    write_kubeconfig,
)

DISCOVERING = replace(FAST, discovery_interval_seconds=0.2)
GROUPS = frozenset({"policy.networking.k8s.io", "cilium.io"})


def make_cnp(name: str, *, action: str = "Deny", priority: int = 10) -> dict[str, Any]:
    return {
        "apiVersion": "policy.networking.k8s.io/v1beta1",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
        "spec": {
            "tier": "Admin",
            "priority": priority,
            "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}}},
            "ingress": [
                {
                    "name": "from-other",
                    "action": action,
                    "from": [
                        {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "other"}}}
                    ],
                }
            ],
        },
    }


def make_cilium(name: str, namespace: str | None = "shop") -> dict[str, Any]:
    kind = "CiliumNetworkPolicy" if namespace else "CiliumClusterwideNetworkPolicy"
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {
        "apiVersion": "cilium.io/v2",
        "kind": kind,
        "metadata": meta,
        "spec": {"endpointSelector": {}, "ingress": [{"fromEndpoints": [{}]}]},
    }


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer(token=TOKEN, installed_groups=GROUPS) as fake:
        fake.create(make_namespace("shop"))
        fake.create(make_namespace("other"))
        fake.create(make_pod("api", labels={"app": "api"}, ip="10.244.1.11"))
        fake.create(make_pod("db", "other", labels={"app": "db"}, ip="10.244.2.12"))
        yield fake


@pytest.fixture
def kubeconfig(tmp_path: Path, server: FakeApiServer) -> str:
    return str(write_kubeconfig(tmp_path / "kubeconfig", server.url))


@contextlib.asynccontextmanager
async def running(
    kubeconfig: str,
) -> AsyncIterator[tuple[KubernetesSource, Updates]]:
    updates = Updates()
    async with KubernetesSource(
        load_kube_config(kubeconfig), settings=DISCOVERING, on_update=updates
    ) as source:
        task = asyncio.create_task(source.run(), name="kube-source-under-test")
        try:
            async with asyncio.timeout(5):
                await source.wait_synced()
            yield source, updates
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_cluster_policies_are_read_and_followed_through_changes(
    server: FakeApiServer, kubeconfig: str
) -> None:
    server.create(make_cnp("deny-other"))
    async with running(kubeconfig) as (source, updates):
        (policy,) = source.snapshot.cluster_policies
        assert (policy.key, policy.tier, policy.ingress[0].action) == (
            "ClusterNetworkPolicy/deny-other",
            "Admin",
            "Deny",
        )
        snapshot = source.snapshot
        api, db = snapshot.pod("shop/api"), snapshot.pod("other/db")
        assert api is not None and db is not None
        assert not Engine(snapshot).evaluate(db, api, 8080, "TCP").allowed

        mark = updates.mark
        server.update(make_cnp("deny-other", action="Accept"))
        update = await updates.after(
            mark, lambda u: any(c.kind == "ClusterNetworkPolicy" for c in u.changes)
        )
        assert [(c.key, c.action) for c in update.changes] == [("deny-other", "modified")]
        assert update.snapshot.cluster_policies[0].ingress[0].action == "Accept"

        mark = updates.mark
        server.delete("ClusterNetworkPolicy", "", "deny-other")
        update = await updates.after(mark, lambda u: not u.snapshot.cluster_policies)
        assert [(c.kind, c.action) for c in update.changes] == [("ClusterNetworkPolicy", "deleted")]


async def test_other_plugins_policies_are_watched_for_their_presence_only(
    server: FakeApiServer, kubeconfig: str
) -> None:
    server.create(make_cilium("l7", "shop"))
    async with running(kubeconfig) as (source, updates):
        (found,) = source.snapshot.unmodelled
        assert (found.kind, found.group, found.namespace, found.name) == (
            "CiliumNetworkPolicy",
            "cilium.io",
            "shop",
            "l7",
        )

        def cilium_reads() -> list[RequestRecord]:
            return [
                r
                for r in server.requests
                if r.path.endswith("/ciliumnetworkpolicies") and r.method == "GET"
            ]

        await eventually(lambda: any(r.is_watch for r in cilium_reads()))
        lists = [r for r in cilium_reads() if not r.is_watch]
        watches = [r for r in cilium_reads() if r.is_watch]
        assert lists and all(r.accept == PARTIAL_METADATA_ACCEPT for r in lists)
        assert all(r.accept == PARTIAL_METADATA_WATCH_ACCEPT for r in watches)
        assert not any("ciliumendpoints" in r.path for r in server.requests), "not a policy kind"

        snapshot = source.snapshot
        api, db = snapshot.pod("shop/api"), snapshot.pod("other/db")
        assert api is not None and db is not None
        engine = Engine(snapshot)
        assert engine.evaluate(db, api, 8080, "TCP").model == "unknown"
        assert engine.evaluate(db, db, 8080, "TCP").known, "nothing of Cilium's selects other/"

        mark = updates.mark
        server.create(make_cilium("everything", None))
        update = await updates.after(mark, lambda u: len(u.snapshot.unmodelled) == 2)
        assert not Engine(update.snapshot).evaluate(db, db, 8080, "TCP").known


async def test_a_group_installed_later_is_discovered_and_one_removed_is_forgotten(
    server: FakeApiServer, kubeconfig: str
) -> None:
    server.install_group("cilium.io", installed=False)
    async with running(kubeconfig) as (source, updates):
        assert source.snapshot.unmodelled == ()
        server.install_group("cilium.io")
        mark = updates.mark
        server.create(make_cilium("late", "shop"))
        update = await updates.after(mark, lambda u: bool(u.snapshot.unmodelled), within=3)
        assert update.snapshot.unmodelled[0].name == "late"

        mark = updates.mark
        server.install_group("cilium.io", installed=False)
        update = await updates.after(mark, lambda u: not u.snapshot.unmodelled, within=3)
        assert update.snapshot.unmodelled == ()


async def test_a_policy_kind_that_may_not_be_listed_makes_every_model_unknown(
    server: FakeApiServer, kubeconfig: str, caplog: pytest.LogCaptureFixture
) -> None:
    server.forbid("/ciliumclusterwidenetworkpolicies")
    with caplog.at_level(logging.WARNING, logger="collector.kube"):
        async with running(kubeconfig) as (source, _):
            (unknown,) = source.snapshot.unmodelled
            assert (unknown.kind, unknown.name) == ("CiliumClusterwideNetworkPolicy", "")
            db = source.snapshot.pod("other/db")
            assert db is not None
            verdict = Engine(source.snapshot).evaluate(db, db, 8080, "TCP")
            assert "which could not be listed" in verdict.incomplete[0]
    assert "listing CiliumClusterwideNetworkPolicy (cilium.io/v2) is forbidden" in caplog.text


async def test_a_served_network_policy_in_a_legacy_cidr_form_is_read_with_a_warning(
    server: FakeApiServer, kubeconfig: str, caplog: pytest.LogCaptureFixture
) -> None:
    server.create(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "old", "namespace": "shop"},
            "spec": {
                "podSelector": {},
                "ingress": [
                    {"from": [{"ipBlock": {"cidr": "10.244.2.12/08"}}]},
                    {"from": [{"ipBlock": {"cidr": "010.244.0.0/16"}}]},
                ],
            },
        }
    )
    with caplog.at_level(logging.WARNING, logger="collector.kube"):
        async with running(kubeconfig) as (source, _):
            (policy,) = source.snapshot.policies
            cidrs = [str(r.peers[0].ip_block.cidr) for r in policy.ingress if r.peers[0].ip_block]
            assert cidrs == ["10.0.0.0/8", "10.244.0.0/16"]
            assert source.problems == {}
            await eventually(lambda: "read as 10.0.0.0/8" in caplog.text)
    assert "NetworkPolicy shop/old" in caplog.text
    assert any("leading 0s" in w for w in source.snapshot.warnings)
