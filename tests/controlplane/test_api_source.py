"""KubernetesSource against the real API server, as the collector's ServiceAccount.

The source runs with the token of `flowproof/flowproof-collector`, bound to exactly the ClusterRole
deploy/overlays/plain ships. Each test makes its objects in namespaces of its own and looks only
at those (the session's control plane is shared). What a request looked like (paging, bookmarks,
the resourceVersion a watch resumed from, how many lists) is read from the API server's audit log.
Compaction and restarts get a control plane of their own, with pods and NetworkPolicies out of
the watch cache so that their watches really go to etcd and really get 410 Gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from collector.core.model import NAMESPACE_NAME_LABEL, ContainerPort, Snapshot
from collector.kube import _RESOURCES, KubernetesSource, _convert, load_kube_config
from lab.controlplane import ControlPlane
from tests.support.apiobjects import make_expectations, make_flow, make_policy
from tests.support.kubetools import (
    COLLECTOR_USER,
    FE_API,
    apply,
    apply_all,
    audited,
    create_pod,
    delete,
    install_crd,
    namespace,
    ok,
    path_of,
    render,
    set_pod_status,
    unique,
    until,
)
from tests.support.sourcetools import FAST, Updates, changed, running

pytestmark = pytest.mark.timeout(600)


def pod_doc(
    name: str,
    ns: str,
    *,
    labels: dict[str, str] | None = None,
    ip: str | None = "10.244.1.10",
    phase: str = "Running",
    host_network: bool = False,
    node: str = "node-1",
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if ip is not None:
        status |= {"podIP": ip, "podIPs": [{"ip": ip}]}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": name}},
        "spec": {
            "nodeName": node,
            "hostNetwork": host_network,
            "containers": [
                {"name": "main", "image": "app", "ports": [{"containerPort": 8080, "name": "http"}]}
            ],
        },
        "status": status,
    }


class World:
    """The objects of one test: two namespaces (`shop`, `other`), three pods, one policy, one
    FlowExpectations, made through the API as the admin."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.shop = unique("shop")
        self.other = unique("other")

    def seed(self, *, expectations: bool = True) -> World:
        namespace(self.cp, self.shop, {"team": "shop"})
        namespace(self.cp, self.other)
        create_pod(self.cp, pod_doc("web", self.shop, labels={"app": "web"}, ip="10.244.1.10"))
        create_pod(self.cp, pod_doc("api", self.shop, labels={"app": "api"}, ip="10.244.1.11"))
        create_pod(
            self.cp,
            pod_doc("db", self.other, labels={"app": "db"}, ip="10.244.2.12", node="node-2"),
        )
        ok(apply(self.cp, make_policy("api-ingress", self.shop)))
        if expectations:
            ok(apply(self.cp, make_expectations("shop-flows", self.shop)))
        return self

    def mine(self, snapshot: Snapshot) -> dict[str, list[str]]:
        """The keys of this test's objects in a snapshot, by kind."""
        ours = (self.shop, self.other)
        return {
            "namespaces": sorted(n for n in snapshot.namespaces if n in ours),
            "pods": sorted(p.key for p in snapshot.pods if p.namespace in ours),
            "policies": sorted(p.key for p in snapshot.policies if p.namespace in ours),
            "expectations": sorted(e.key for e in snapshot.expectations if e.namespace in ours),
        }

    def current(self) -> dict[str, dict[str, Any]]:
        """This test's objects as a fresh list reads them, each in the model (by kind and key)."""
        found: dict[str, dict[str, Any]] = {}
        for kind in ("Pod", "NetworkPolicy"):
            for ns in (self.shop, self.other):
                for item in ok(self.cp.request("GET", path_of(kind, "", ns)))["items"]:
                    resource = next(r for r in _RESOURCES if r.kind == kind)
                    converted = _convert(resource, item)
                    found[f"{kind} {converted.key}"] = {"value": converted.value}
        return found


@pytest.fixture
def world(controlplane: ControlPlane) -> World:
    return World(controlplane)


def held(source: KubernetesSource, world: World) -> dict[str, dict[str, Any]]:
    """The same objects as the source's latest snapshot holds them."""
    snapshot = source.snapshot
    ours = (world.shop, world.other)
    found = {f"Pod {p.key}": {"value": p} for p in snapshot.pods if p.namespace in ours}
    found |= {
        f"NetworkPolicy {p.key}": {"value": p} for p in snapshot.policies if p.namespace in ours
    }
    return found


# --- the initial list -----------------------------------------------------------------------------


async def test_initial_list_builds_the_snapshot_page_by_page(
    controlplane: ControlPlane, collector_kubeconfig: str, world: World
) -> None:
    world.seed()
    before = len(audited(controlplane, COLLECTOR_USER, "pods", "list"))
    async with running(collector_kubeconfig, replace(FAST, list_page_size=2)) as (source, updates):
        first = updates.items[0]
        assert first.initial and first.changes == ()
        snapshot = first.snapshot
        assert world.mine(snapshot) == {
            "namespaces": sorted([world.shop, world.other]),
            "pods": sorted([f"{world.other}/db", f"{world.shop}/api", f"{world.shop}/web"]),
            "policies": [f"{world.shop}/api-ingress"],
            "expectations": [f"{world.shop}/shop-flows"],
        }
        assert snapshot.namespaces[world.shop].labels == {
            "team": "shop",
            NAMESPACE_NAME_LABEL: world.shop,
        }
        web = snapshot.pod(f"{world.shop}/web")
        assert web is not None
        stored = ok(controlplane.request("GET", path_of("Pod", "web", world.shop)))
        assert (web.labels, web.ips, web.node, web.phase) == (
            {"app": "web"},
            ("10.244.1.10",),
            "node-1",
            "Running",
        )
        assert web.ports == (ContainerPort(8080, "TCP", "http"),)
        assert web.uid == stored["metadata"]["uid"]
        [policy] = [p for p in snapshot.policies if p.namespace == world.shop]
        assert policy.source == f"api:namespaces/{world.shop}/networkpolicies/api-ingress"
        assert policy.ingress[0].ports[0].port == 8080
        [expectations] = [e for e in snapshot.expectations if e.namespace == world.shop]
        assert [f.name for f in expectations.flows] == ["web-to-api"]
        assert not [k for k in source.problems if world.shop in k or world.other in k]

        await until(lambda: audited(controlplane, COLLECTOR_USER, "pods", "watch"), 5)
        lists = audited(controlplane, COLLECTOR_USER, "pods", "list")[before:]
        assert len(lists) >= 2 and {r["query"]["limit"] for r in lists} == {"2"}
        assert "continue" not in lists[0]["query"] and "continue" in lists[1]["query"]
        assert {r["code"] for r in lists} == {200}
        watch = audited(controlplane, COLLECTOR_USER, "pods", "watch")[-1]["query"]
        assert watch["allowWatchBookmarks"] == "true"
        assert watch["resourceVersion"] == source.resource_versions["pods"]
        assert int(watch["timeoutSeconds"]) >= 30


# --- every change of every kind -------------------------------------------------------------------


def _relabel_namespace(w: World) -> None:
    ok(
        apply(
            w.cp,
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": w.shop, "labels": {"team": "payments"}},
            },
        )
    )


def _relabel_pod(w: World) -> None:
    ok(
        w.cp.request(
            "PATCH",
            path_of("Pod", "web", w.shop),
            {"metadata": {"labels": {"app": "web", "v": "2"}}},
            content_type="application/merge-patch+json",
        )
    )


def _policy_port(w: World) -> None:
    ok(apply(w.cp, make_policy("api-ingress", w.shop, port=9090)))


def _deny(w: World) -> None:
    ok(apply(w.cp, make_expectations("shop-flows", w.shop, flows=[make_flow(expect="deny")])))


CHANGE_CASES: list[Any] = [
    pytest.param(
        lambda w: apply(
            w.cp, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": w.shop + "-new"}}
        ),
        ("Namespace", "{shop}-new", "added", frozenset()),
        id="a namespace created is added",
    ),
    pytest.param(
        _relabel_namespace,
        ("Namespace", "{shop}", "modified", frozenset({"labels"})),
        id="a namespace relabelled is modified in its labels",
    ),
    pytest.param(
        lambda w: create_pod(
            w.cp, pod_doc("cache", w.shop, labels={"app": "cache"}, ip="10.244.1.20")
        ),
        ("Pod", "{shop}/cache", "added", frozenset()),
        id="a pod created is added",
    ),
    pytest.param(
        _relabel_pod,
        ("Pod", "{shop}/web", "modified", frozenset({"labels"})),
        id="a pod relabelled changes its labels only",
    ),
    pytest.param(
        lambda w: set_pod_status(
            w.cp, w.shop, "web", {"podIP": "10.244.1.99", "podIPs": [{"ip": "10.244.1.99"}]}
        ),
        ("Pod", "{shop}/web", "modified", frozenset({"ips"})),
        id="a pod with a new IP changes its ips only",
    ),
    pytest.param(
        lambda w: set_pod_status(w.cp, w.shop, "web", {"phase": "Failed"}),
        ("Pod", "{shop}/web", "modified", frozenset({"phase"})),
        id="a pod that failed changes its phase only",
    ),
    pytest.param(
        lambda w: delete(w.cp, "Pod", "api", w.shop),
        ("Pod", "{shop}/api", "deleted", frozenset()),
        id="a pod deleted is deleted",
    ),
    pytest.param(
        lambda w: apply(w.cp, make_policy("second", w.shop)),
        ("NetworkPolicy", "{shop}/second", "added", frozenset()),
        id="a NetworkPolicy created is added",
    ),
    pytest.param(
        _policy_port,
        ("NetworkPolicy", "{shop}/api-ingress", "modified", frozenset({"ingress"})),
        id="a NetworkPolicy with another port changes its ingress",
    ),
    pytest.param(
        lambda w: delete(w.cp, "NetworkPolicy", "api-ingress", w.shop),
        ("NetworkPolicy", "{shop}/api-ingress", "deleted", frozenset()),
        id="a NetworkPolicy deleted is deleted",
    ),
    pytest.param(
        lambda w: apply(w.cp, make_expectations("more", w.other)),
        ("FlowExpectations", "{other}/more", "added", frozenset()),
        id="a FlowExpectations created is added",
    ),
    pytest.param(
        _deny,
        ("FlowExpectations", "{shop}/shop-flows", "modified", frozenset({"flows"})),
        id="a FlowExpectations with another expect changes its flows",
    ),
    pytest.param(
        lambda w: delete(w.cp, "FlowExpectations", "shop-flows", w.shop),
        ("FlowExpectations", "{shop}/shop-flows", "deleted", frozenset()),
        id="a FlowExpectations deleted is deleted",
    ),
]


@pytest.mark.parametrize(("act", "expected"), CHANGE_CASES)
async def test_a_change_arrives_as_a_new_snapshot_within_a_second(
    collector_kubeconfig: str,
    world: World,
    act: Callable[[World], object],
    expected: tuple[str, str, str, frozenset[str]],
) -> None:
    world.seed()
    kind, key_pattern, action, fields = expected
    key = key_pattern.format(shop=world.shop, other=world.other)
    async with running(collector_kubeconfig) as (source, updates):
        mark = updates.mark
        started = asyncio.get_running_loop().time()
        await asyncio.to_thread(act, world)
        update = await updates.after(mark, changed(kind, key, action), within=1.0)
        assert asyncio.get_running_loop().time() - started < 1.0
        [change] = [c for c in update.changes if c.key == key]
        assert change.fields == fields

        def present(snapshot: Snapshot) -> bool:
            return {
                "Namespace": key in snapshot.namespaces,
                "Pod": snapshot.pod(key) is not None,
                "NetworkPolicy": any(p.key == key for p in snapshot.policies),
                "FlowExpectations": any(e.key == key for e in snapshot.expectations),
            }[kind]

        assert present(update.snapshot) == (action != "deleted")
        # The source holds that snapshot, or a newer one: a pod is created in two writes (the
        # object, then its status as a kubelet reports it), each its own update.
        assert present(source.snapshot) == (action != "deleted")


async def test_a_namespace_deleted_is_terminating_until_emptied_then_deleted(
    controlplane: ControlPlane, collector_kubeconfig: str, world: World
) -> None:
    """No namespace controller runs here: the namespace stays (Terminating) and the source keeps
    it until its finalizer is removed, as the controller would once the namespace is empty."""
    world.seed()
    async with running(collector_kubeconfig) as (source, updates):
        await asyncio.to_thread(delete, controlplane, "Namespace", world.other, "", None)
        await asyncio.sleep(0.5)
        assert world.other in source.snapshot.namespaces, "Terminating is not gone"
        mark = updates.mark
        await asyncio.to_thread(delete, controlplane, "Pod", "db", world.other)
        body = ok(controlplane.request("GET", path_of("Namespace", world.other)))
        body["spec"]["finalizers"] = []
        ok(controlplane.request("PUT", path_of("Namespace", world.other) + "/finalize", body))
        update = await updates.after(mark, changed("Namespace", world.other, "deleted"), 2.0)
        assert world.other not in update.snapshot.namespaces
        assert source.snapshot.pod(f"{world.other}/db") is None


async def test_events_that_change_nothing_in_the_model_publish_nothing(
    collector_kubeconfig: str, world: World
) -> None:
    world.seed()
    async with running(collector_kubeconfig) as (_, updates):
        mark = updates.mark
        conditions = {"conditions": [{"type": "Ready", "status": "True"}]}  # not in the model
        await asyncio.to_thread(set_pod_status, world.cp, world.shop, "web", conditions)
        marker = unique("marker")
        await asyncio.to_thread(namespace, world.cp, marker)
        await updates.after(mark, changed("Namespace", marker, "added"))
        assert [c.key for c in updates.changes_since(mark)] == [marker]


# --- resourceVersion, bookmarks, watch timeouts ---------------------------------------------------


async def test_bookmarks_advance_the_resource_version_a_watch_resumes_from(
    controlplane: ControlPlane, collector_kubeconfig: str, world: World
) -> None:
    """The watch cache sends a bookmark 2 s before a watch's deadline, at the newest version it
    knows; the source resumes from it without listing again."""
    world.seed()
    settings = replace(FAST, watch_timeout_seconds=3)
    async with running(collector_kubeconfig, settings) as (source, _):
        before = source.resource_versions["namespaces"]
        assert before is not None
        lists = len(audited(controlplane, COLLECTOR_USER, "namespaces", "list"))
        # The global resourceVersion moves on, with no namespace changing:
        moved = await asyncio.to_thread(
            apply, controlplane, make_policy(unique("elsewhere"), world.shop)
        )
        newer = int(moved.body["metadata"]["resourceVersion"])
        # A consistent list makes the namespaces' cache catch up with etcd (a progress notify).
        await asyncio.to_thread(controlplane.request, "GET", "/api/v1/namespaces")
        await until(lambda: int(source.resource_versions["namespaces"] or 0) >= newer, 10)
        bookmarked = source.resource_versions["namespaces"]
        await until(
            lambda: any(
                w["query"].get("resourceVersion") == bookmarked
                for w in audited(controlplane, COLLECTOR_USER, "namespaces", "watch")
            ),
            10,
        )
        assert len(audited(controlplane, COLLECTOR_USER, "namespaces", "list")) == lists, (
            "resumed from the bookmark: no relist"
        )


async def test_watch_timeout_rewatches_from_the_last_resource_version(
    controlplane: ControlPlane, collector_kubeconfig: str, world: World
) -> None:
    world.seed()
    lists_before = len(audited(controlplane, COLLECTOR_USER, "pods", "list"))
    watches_before = len(audited(controlplane, COLLECTOR_USER, "pods", "watch"))
    async with running(collector_kubeconfig, replace(FAST, watch_timeout_seconds=1)) as (
        _,
        updates,
    ):
        await until(
            lambda: (
                len(audited(controlplane, COLLECTOR_USER, "pods", "watch")) >= watches_before + 3
            ),
            10,
        )
        mark = updates.mark
        await asyncio.to_thread(create_pod, controlplane, pod_doc("after-timeouts", world.shop))
        await updates.after(mark, changed("Pod", f"{world.shop}/after-timeouts", "added"))
    watches = audited(controlplane, COLLECTOR_USER, "pods", "watch")[watches_before:]
    assert {w["query"]["timeoutSeconds"] for w in watches} == {"1"}
    assert all(w["query"]["resourceVersion"] for w in watches)
    assert len(audited(controlplane, COLLECTOR_USER, "pods", "list")) == lists_before + 1


# --- pods in every state --------------------------------------------------------------------------

POD_CASES = [
    pytest.param(
        {"ip": None, "phase": "Pending"},
        "Pending",
        (),
        False,
        id="a pending pod without an IP is kept as Pending with no IPs",
    ),
    pytest.param(
        {"phase": "Succeeded"},
        "Succeeded",
        ("10.244.1.10",),
        False,
        id="a succeeded pod is kept as Succeeded",
    ),
    pytest.param(
        {"phase": "Failed"}, "Failed", ("10.244.1.10",), False, id="a failed pod is kept as Failed"
    ),
    pytest.param(
        {"ip": "192.0.2.7", "host_network": True},
        "Running",
        ("192.0.2.7",),
        True,
        id="a hostNetwork pod is kept and flagged",
    ),
    pytest.param(
        {"ip": None}, "Running", (), False, id="a running pod without an IP yet has no IPs"
    ),
]


@pytest.mark.parametrize(("shape", "phase", "ips", "host_network"), POD_CASES)
async def test_pods_in_any_state_are_kept_with_their_phase_and_flags(
    collector_kubeconfig: str,
    world: World,
    shape: dict[str, Any],
    phase: str,
    ips: tuple[str, ...],
    host_network: bool,
) -> None:
    world.seed()
    async with running(collector_kubeconfig) as (source, updates):
        mark = updates.mark
        await asyncio.to_thread(create_pod, world.cp, pod_doc("case", world.shop, **shape))
        key = f"{world.shop}/case"
        update = await updates.after(
            mark, lambda u: (p := u.snapshot.pod(key)) is not None and p.phase == phase
        )
        pod = update.snapshot.pod(key)
        assert pod is not None
        assert (pod.phase, pod.ips, pod.host_network) == (phase, ips, host_network)
        assert not [k for k in source.problems if world.shop in k]


async def test_a_pod_deleted_gracefully_is_terminating_until_its_kubelet_confirms(
    collector_kubeconfig: str, world: World
) -> None:
    world.seed()
    async with running(collector_kubeconfig) as (source, updates):
        mark = updates.mark
        # A bound pod deleted with a grace period stays, with a deletionTimestamp, until the
        # node's kubelet deletes it for good (grace 0).
        await asyncio.to_thread(delete, world.cp, "Pod", "web", world.shop, None)
        update = await updates.after(mark, changed("Pod", f"{world.shop}/web", "modified"))
        [change] = [c for c in update.changes if c.key == f"{world.shop}/web"]
        assert change.fields == {"phase"}
        assert update.snapshot.pod(f"{world.shop}/web").phase == "Terminating"  # type: ignore[union-attr]
        mark = updates.mark
        await asyncio.to_thread(delete, world.cp, "Pod", "web", world.shop)
        await updates.after(mark, changed("Pod", f"{world.shop}/web", "deleted"))
        assert source.snapshot.pod(f"{world.shop}/web") is None


# --- 410 Gone, restarts: a control plane of their own ---------------------------------------------


@pytest.fixture(scope="module")
def compactable(
    controlplane_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ControlPlane, str]]:
    """A control plane whose pods and NetworkPolicies bypass the watch cache, with the
    collector's ServiceAccount as deploy/ binds it; its kubeconfig."""
    with ControlPlane(
        controlplane_bin, uncached_resources=["pods", "networkpolicies"], audit_log=True
    ) as cp:
        install_crd(cp)
        kinds = ("Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding")
        apply_all(cp, [d for d in render("overlays/plain") if d["kind"] in kinds])
        token = cp.service_account_token("flowproof", "flowproof-collector", create=False)
        path = cp.write_kubeconfig(tmp_path_factory.mktemp("compact") / "kubeconfig", token, "c")
        yield cp, str(path)


def _pod_changes(updates: Updates, mark: int, world: World) -> list[tuple[str, str]]:
    return sorted(
        (c.key, c.action)
        for c in updates.changes_since(mark)
        if c.kind == "Pod" and c.namespace in (world.shop, world.other)
    )


async def _stopped(source: KubernetesSource, task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_watch_from_a_compacted_revision_gets_410_and_relists_losing_and_duplicating_nothing(
    compactable: tuple[ControlPlane, str],
) -> None:
    cp, kubeconfig = compactable
    world = World(cp).seed()
    updates = Updates()
    async with KubernetesSource(
        load_kube_config(kubeconfig), settings=FAST, on_update=updates
    ) as source:
        task = asyncio.create_task(source.run())
        await asyncio.wait_for(source.wait_synced(), 10)
        resume_from = source.resource_versions["pods"]
        lists = len(audited(cp, COLLECTOR_USER, "pods", "list"))
        # The source is away (its resourceVersions kept) while pods change and etcd compacts
        # the history it would resume from.
        await _stopped(source, task)
        mark = updates.mark
        await asyncio.to_thread(delete, cp, "Pod", "api", world.shop)
        await asyncio.to_thread(_relabel_pod, world)
        await asyncio.to_thread(create_pod, cp, pod_doc("cache", world.shop, ip="10.244.1.30"))
        await asyncio.to_thread(delete, cp, "NetworkPolicy", "api-ingress", world.shop)
        compacted = await asyncio.to_thread(cp.compact_etcd)
        assert compacted > int(resume_from or 0)

        task = asyncio.create_task(source.run())
        try:
            await updates.after(mark, changed("Pod", f"{world.shop}/cache", "added"), within=10)
            await until(lambda: held(source, world) == world.current(), 5)
            assert _pod_changes(updates, mark, world) == [
                (f"{world.shop}/api", "deleted"),
                (f"{world.shop}/cache", "added"),
                (f"{world.shop}/web", "modified"),
            ], "each change once: nothing lost, nothing twice"
            mine = [
                c for c in updates.changes_since(mark) if c.namespace in (world.shop, world.other)
            ]
            assert sorted((c.kind, c.key, c.action) for c in mine if c.kind != "Pod") == [
                ("NetworkPolicy", f"{world.shop}/api-ingress", "deleted")
            ], "a relist of unchanged objects publishes no change"
            # The watch that came back from the compacted version was refused (410 inside the
            # stream); the source listed again and watches from the new list's version.
            assert len(audited(cp, COLLECTOR_USER, "pods", "list")) == lists + 1

            def watched_from() -> list[str]:
                return [
                    w["query"]["resourceVersion"]
                    for w in audited(cp, COLLECTOR_USER, "pods", "watch")
                ]

            assert resume_from in watched_from(), "it tried to resume first"
            await until(lambda: watched_from()[-1] != resume_from, 5)
        finally:
            await _stopped(source, task)


async def test_an_api_server_restart_drops_every_watch_and_the_source_catches_up(
    compactable: tuple[ControlPlane, str], caplog: pytest.LogCaptureFixture
) -> None:
    cp, kubeconfig = compactable
    world = World(cp).seed()
    caplog.set_level(logging.INFO, logger="collector.kube")
    async with running(kubeconfig) as (source, updates):
        mark = updates.mark
        await asyncio.to_thread(cp.restart_apiserver)
        await asyncio.to_thread(delete, cp, "Pod", "db", world.other)
        await asyncio.to_thread(create_pod, cp, pod_doc("late", world.shop, ip="10.244.1.40"))
        await updates.after(mark, changed("Pod", f"{world.shop}/late", "added"), within=15)
        await until(lambda: held(source, world) == world.current(), 10)
        # A delete with grace 0 is two writes (deletionTimestamp, then the delete): the first
        # may come as its own change to Terminating.
        terminating = [
            c
            for c in updates.changes_since(mark)
            if c.key == f"{world.other}/db" and c.action == "modified"
        ]
        assert all(c.fields == {"phase"} for c in terminating)
        assert [c for c in _pod_changes(updates, mark, world) if c[1] != "modified"] == [
            (f"{world.other}/db", "deleted"),
            (f"{world.shop}/late", "added"),
        ]
    assert any("broke" in r.getMessage() or "failed" in r.getMessage() for r in caplog.records)


# --- without the CRD, tokens, in-cluster ----------------------------------------------------------


async def test_without_the_crd_the_source_syncs_and_picks_expectations_up_later(
    controlplane_bin: Path, tmp_path: Path
) -> None:
    with ControlPlane(controlplane_bin) as cp:
        world = World(cp).seed(expectations=False)
        path = str(cp.kubeconfig_path)
        async with running(path) as (source, updates):
            assert source.snapshot.expectations == ()
            assert world.mine(source.snapshot)["pods"]
            mark = updates.mark
            await asyncio.to_thread(install_crd, cp)
            await asyncio.to_thread(apply, cp, make_expectations("shop-flows", world.shop))
            await updates.after(
                mark, changed("FlowExpectations", f"{world.shop}/shop-flows", "added"), within=5
            )


async def test_in_cluster_config_uses_the_service_account_token_and_ca(
    controlplane: ControlPlane, collector_kubeconfig: str, world: World, tmp_path: Path
) -> None:
    world.seed()
    token_path = tmp_path / "token"
    token_path.write_text(
        controlplane.service_account_token("flowproof", "flowproof-collector", create=False)
    )
    environ = {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(controlplane.apiserver_port),
    }
    configuration = load_kube_config(
        environ=environ, token_path=str(token_path), ca_path=str(controlplane.ca_path)
    )
    assert configuration.host == controlplane.url
    async with running(configuration) as (source, _):
        assert world.mine(source.snapshot)["pods"] == sorted(
            [f"{world.other}/db", f"{world.shop}/api", f"{world.shop}/web"]
        )


async def test_a_wrong_token_is_refused_and_retried_not_fatal(
    controlplane: ControlPlane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = controlplane.write_kubeconfig(tmp_path / "kubeconfig", "not-a-token", "nobody")
    source = KubernetesSource(load_kube_config(str(path)), settings=FAST)
    async with source:
        task = asyncio.create_task(source.run())
        await until(lambda: sum("HTTP 401" in r.getMessage() for r in caplog.records) >= 3, 10)
        assert not task.done()
        await _stopped(source, task)


async def test_a_consistent_view_after_many_changes_in_a_row(
    collector_kubeconfig: str, world: World
) -> None:
    """Fifty label changes in a burst: the source ends at the API's state, whatever it merged."""
    world.seed()
    async with running(collector_kubeconfig) as (source, _):

        def burst() -> None:
            for i in range(50):
                ok(
                    world.cp.request(
                        "PATCH",
                        path_of("Pod", "web", world.shop),
                        {"metadata": {"labels": {"app": "web", "n": str(i)}}},
                        content_type="application/merge-patch+json",
                    )
                )

        await asyncio.to_thread(burst)
        await until(lambda: held(source, world) == world.current(), 5)
        web = source.snapshot.pod(f"{world.shop}/web")
        assert web is not None and web.labels["n"] == "49"


def test_the_audit_log_sees_the_collector(controlplane: ControlPlane) -> None:
    """The tests above read requests from the audit log: it records them (a guard)."""
    ok(controlplane.request("GET", f"{FE_API}/flowexpectations"))
    assert controlplane.audit_events("flowproof-admin")
