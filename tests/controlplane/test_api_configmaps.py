"""Expectations from ConfigMaps: KubernetesSource with `expectations_configmaps` on a real API server.

The source runs as the collector's ServiceAccount with the ClusterRoles of
deploy/overlays/configmap-expectations. ConfigMaps labelled `flowproof.dev/expectations=true` are
listed and watched with a label selector (the API server turns a label change into ADDED or
DELETED); their data values join the snapshot's expectations like custom resources. Each test
works in a namespace of its own and looks only at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from collector.core.model import Snapshot
from collector.kube import InventoryUpdate, KubernetesSource, KubeSourceSettings, load_kube_config
from lab.controlplane import ControlPlane
from tests.support.apiobjects import make_configmap, make_expectations, make_flow
from tests.support.kubetools import (
    COLLECTOR_USER,
    apply,
    apply_all,
    audited,
    delete,
    namespace,
    ok,
    render,
    service_account,
    unique,
    until,
)

SETTINGS = KubeSourceSettings(
    backoff_initial_seconds=0.05,
    backoff_max_seconds=0.2,
    request_timeout_seconds=5,
    missing_crd_retry_seconds=0.2,
    stop_timeout_seconds=3,
    expectations_configmaps=True,
)
SELECTOR = "flowproof.dev/expectations=true"
TWO_DOCUMENTS = """\
apiVersion: flowproof.dev/v1alpha1
kind: FlowExpectations
metadata: {{name: first}}
spec:
  flows: [{{name: a, from: {{podSelector: {{}}}}, to: {{podSelector: {{}}}}, ports: [80], expect: allow}}]
---
apiVersion: flowproof.dev/v1alpha1
kind: FlowExpectations
metadata: {{name: second, namespace: {ns}}}
spec:
  flows: [{{name: b, from: {{podSelector: {{}}}}, to: {{podSelector: {{}}}}, ports: [80], expect: deny}}]
"""


class Updates:
    def __init__(self) -> None:
        self.items: list[InventoryUpdate] = []
        self.arrived = asyncio.Event()

    async def __call__(self, update: InventoryUpdate) -> None:
        self.items.append(update)
        self.arrived.set()

    async def until(self, predicate: Callable[[Snapshot], bool], within: float = 3.0) -> Snapshot:
        """The first snapshot from now on (the current one included) that satisfies `predicate`."""
        async with asyncio.timeout(within):
            while True:
                if self.items and predicate(self.items[-1].snapshot):
                    return self.items[-1].snapshot
                self.arrived.clear()
                await self.arrived.wait()


@pytest.fixture(scope="module")
def kubeconfig(controlplane: ControlPlane, collector_kubeconfig: str) -> str:
    """The collector's kubeconfig, its ServiceAccount also bound as the overlay binds it."""
    rbac = ("ClusterRole", "ClusterRoleBinding")
    apply_all(
        controlplane,
        [
            d
            for d in render("overlays/configmap-expectations")
            if d["kind"] in rbac and d["metadata"]["name"].endswith("-configmaps")
        ],
    )
    return collector_kubeconfig


@pytest.fixture
def ns(controlplane: ControlPlane) -> str:
    name = unique("cm")
    namespace(controlplane, name)
    return name


@contextlib.asynccontextmanager
async def watching(
    kubeconfig: str, settings: KubeSourceSettings = SETTINGS
) -> AsyncIterator[tuple[KubernetesSource, Updates]]:
    updates = Updates()
    async with KubernetesSource(
        load_kube_config(kubeconfig), settings=settings, on_update=updates
    ) as source:
        task = asyncio.create_task(source.run())
        try:
            await asyncio.wait_for(source.wait_synced(), 10)
            yield source, updates
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def documents(snapshot: Snapshot, ns: str) -> dict[str, Any]:
    """Expectations key -> (flow name, expect) of each flow, and where it was read (one namespace)."""
    return {
        e.key: ([(f.name, f.expect) for f in e.flows], e.source)
        for e in snapshot.expectations
        if e.namespace == ns
    }


def shop_flows(*, expect: str = "allow", namespace_: str | None = None) -> dict[str, Any]:
    return make_expectations("shop-flows", namespace_, flows=[make_flow(expect=expect)])


def problems(source: KubernetesSource, ns: str) -> dict[str, str]:
    return {k: v for k, v in source.problems.items() if f" {ns}/" in k}


async def test_configmap_expectations_are_added_modified_and_deleted(
    controlplane: ControlPlane, kubeconfig: str, ns: str
) -> None:
    cp = controlplane
    ok(apply(cp, make_configmap("team-flows", ns, data={"flows.yaml": shop_flows()})))
    ok(apply(cp, make_configmap("unrelated", ns, data={"x": "not expectations"}, labelled=False)))
    source_text = f"api:namespaces/{ns}/configmaps/team-flows/data/flows.yaml:1"
    more = f"api:namespaces/{ns}/configmaps/team-flows/data/more.yaml"
    async with watching(kubeconfig) as (source, updates):
        assert documents(source.snapshot, ns) == {
            f"{ns}/shop-flows": ([("web-to-api", "allow")], source_text)
        }
        assert problems(source, ns) == {}, "an unlabelled ConfigMap is never read"
        await until(lambda: audited(cp, COLLECTOR_USER, "configmaps", "watch"))
        lists = audited(cp, COLLECTOR_USER, "configmaps", "list")
        watches = audited(cp, COLLECTOR_USER, "configmaps", "watch")
        assert {r["query"]["labelSelector"] for r in lists + watches} == {SELECTOR}
        assert {r["uri"].split("?")[0] for r in lists + watches} == {"/api/v1/configmaps"}

        mark = len(updates.items)
        ok(
            apply(
                cp, make_configmap("team-flows", ns, data={"flows.yaml": shop_flows(expect="deny")})
            )
        )
        await updates.until(
            lambda s: documents(s, ns).get(f"{ns}/shop-flows", ([],))[0] == [("web-to-api", "deny")]
        )
        [change] = [c for u in updates.items[mark:] for c in u.changes if c.namespace == ns]
        assert (change.kind, change.key, change.action) == (
            "ConfigMap",
            f"{ns}/team-flows",
            "modified",
        )
        assert change.fields == frozenset({"expectations"})

        data = {"flows.yaml": shop_flows(expect="deny"), "more.yaml": TWO_DOCUMENTS.format(ns=ns)}
        ok(apply(cp, make_configmap("team-flows", ns, data=data)))
        snapshot = await updates.until(lambda s: len(documents(s, ns)) == 3)
        assert documents(snapshot, ns) == {
            f"{ns}/shop-flows": ([("web-to-api", "deny")], source_text),
            f"{ns}/first": ([("a", "allow")], f"{more}:1"),
            f"{ns}/second": ([("b", "deny")], f"{more}:7"),
        }, "each document of a multi-document value is named by its first line"

        delete(cp, "ConfigMap", "team-flows", ns)
        await updates.until(lambda s: documents(s, ns) == {})


async def test_a_label_added_or_removed_adds_or_removes_the_expectations(
    controlplane: ControlPlane, kubeconfig: str, ns: str
) -> None:
    unlabelled = make_configmap("team-flows", ns, data={"flows.yaml": shop_flows()}, labelled=False)
    ok(apply(controlplane, unlabelled))
    async with watching(kubeconfig) as (source, updates):
        assert documents(source.snapshot, ns) == {}
        labelled = make_configmap("team-flows", ns, data={"flows.yaml": shop_flows()})
        labelled["metadata"]["labels"] = {
            **unlabelled["metadata"]["labels"],
            **labelled["metadata"]["labels"],
        }
        ok(apply(controlplane, labelled))
        await updates.until(lambda s: f"{ns}/shop-flows" in documents(s, ns))
        ok(
            controlplane.request(
                "PATCH",
                f"/api/v1/namespaces/{ns}/configmaps/team-flows",
                {"metadata": {"labels": {"flowproof.dev/expectations": None}}},
                content_type="application/merge-patch+json",
            )
        )
        await updates.until(lambda s: documents(s, ns) == {})


async def test_configmaps_are_off_unless_asked_for(
    controlplane: ControlPlane, kubeconfig: str, ns: str, tmp_path: Path
) -> None:
    ok(apply(controlplane, make_configmap("team-flows", ns, data={"flows.yaml": shop_flows()})))
    grants = [("", r, v) for r in ("pods", "namespaces") for v in ("list", "watch")] + [
        ("networking.k8s.io", "networkpolicies", v) for v in ("list", "watch")
    ]
    home = unique("off")
    token = service_account(controlplane, home, "flowproof-collector", cluster=grants)
    path = str(controlplane.write_kubeconfig(tmp_path / "k", token, "c"))
    async with watching(path, KubeSourceSettings(backoff_initial_seconds=0.05)) as (source, _):
        assert documents(source.snapshot, ns) == {}
    user = f"system:serviceaccount:{home}:flowproof-collector"
    assert audited(controlplane, user, "configmaps", "list") == []


async def test_without_rights_on_configmaps_the_source_syncs_without_them(
    controlplane: ControlPlane, ns: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ok(apply(controlplane, make_configmap("team-flows", ns, data={"flows.yaml": shop_flows()})))
    ok(apply(controlplane, make_expectations("crd-flows", ns)))
    grants = (
        [("", r, v) for r in ("pods", "namespaces") for v in ("list", "watch")]
        + [("networking.k8s.io", "networkpolicies", v) for v in ("list", "watch")]
        + [("flowproof.dev", "flowexpectations", v) for v in ("list", "watch")]
    )
    home = unique("nocm")
    token = service_account(controlplane, home, "flowproof-collector", cluster=grants)
    path = str(controlplane.write_kubeconfig(tmp_path / "k", token, "c"))
    async with watching(path) as (source, _):
        assert sorted(documents(source.snapshot, ns)) == [f"{ns}/crd-flows"]
        await asyncio.sleep(0.5)  # it looks again, and says so once
    warnings = [r.getMessage() for r in caplog.records if "configmaps" in r.getMessage()]
    assert len(warnings) == 1 and "403" in warnings[0], warnings
    user = f"system:serviceaccount:{home}:flowproof-collector"
    assert len(audited(controlplane, user, "configmaps", "list")) >= 2


BAD_DOCUMENTS = [
    pytest.param(
        lambda ns: shop_flows(expect="maybe"),
        ":",
        "expect",
        id="an invalid document is named by ConfigMap, key, line and field",
    ),
    pytest.param(
        lambda ns: "flows: [unclosed\n",
        ":2: invalid YAML",
        "",
        id="broken YAML is named by ConfigMap, key and line",
    ),
    pytest.param(
        lambda ns: shop_flows(namespace_="other"),
        ":",
        "is not the ConfigMap's namespace '{ns}'",
        id="a document for another namespace is refused",
    ),
    pytest.param(
        lambda ns: "- just\n- a list\n",
        ":1",
        "must be a mapping",
        id="a value that is no document is refused",
    ),
]


@pytest.mark.parametrize(("bad", "where", "why"), BAD_DOCUMENTS)
async def test_a_bad_document_is_named_once_and_skipped(
    controlplane: ControlPlane,
    kubeconfig: str,
    ns: str,
    caplog: pytest.LogCaptureFixture,
    bad: Callable[[str], object],
    where: str,
    why: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="collector.kube")
    where = f"api:namespaces/{ns}/configmaps/team-flows/data/bad.yaml{where}"
    why = why.format(ns=ns)
    good = {"good.yaml": make_expectations("good-flows", None)}
    ok(apply(controlplane, make_configmap("team-flows", ns, data={**good, "bad.yaml": bad(ns)})))
    async with watching(kubeconfig) as (source, updates):
        assert sorted(documents(source.snapshot, ns)) == [f"{ns}/good-flows"], "the rest is read"
        problem = source.problems[f"ConfigMap {ns}/team-flows"]
        assert where in problem and why in problem
        # An unrelated change of the ConfigMap reads it again: the same problem is not logged again.
        changed = make_configmap("team-flows", ns, data={**good, "bad.yaml": bad(ns)})
        changed["metadata"]["annotations"] = {"touched": "yes"}
        ok(apply(controlplane, changed))
        marker = unique("marker")
        namespace(controlplane, marker)
        await updates.until(lambda s: marker in s.namespaces)
        ok(apply(controlplane, make_configmap("team-flows", ns, data=good)))  # repaired
        await until(lambda: f"ConfigMap {ns}/team-flows" not in source.problems)
    logged = [r.getMessage() for r in caplog.records if where in r.getMessage()]
    assert len(logged) == 1, logged
    assert f"ConfigMap {ns}/team-flows" in logged[0]


async def test_a_document_already_declared_elsewhere_is_skipped_and_named(
    controlplane: ControlPlane, kubeconfig: str, ns: str
) -> None:
    cp = controlplane
    ok(apply(cp, make_expectations("shop-flows", ns)))  # the custom resource wins
    ok(apply(cp, make_configmap("team-flows", ns, data={"flows.yaml": shop_flows(expect="deny")})))
    ok(
        apply(
            cp,
            make_configmap(
                "twice",
                ns,
                data={
                    "a.yaml": make_expectations("twice-flows", None),
                    "b.yaml": make_expectations("twice-flows", None),
                },
            ),
        )
    )
    async with watching(kubeconfig) as (source, _):
        found = documents(source.snapshot, ns)
        assert sorted(found) == [f"{ns}/shop-flows", f"{ns}/twice-flows"]
        assert found[f"{ns}/shop-flows"][1] == f"api:namespaces/{ns}/flowexpectations/shop-flows"
        assert (
            f"already declared by api:namespaces/{ns}/flowexpectations/shop-flows"
            in (source.problems[f"ConfigMap {ns}/team-flows"])
        )
        assert (
            f"already declared at api:namespaces/{ns}/configmaps/twice/data/a.yaml:1"
            in (source.problems[f"ConfigMap {ns}/twice"])
        )
