"""Expectations from ConfigMaps: KubernetesSource with `expectations_configmaps`, real client, fake API.

ConfigMaps labelled `flowproof.dev/expectations=true` are listed and watched with a label
selector (the fake filters lists and watches as the API server does, turning a label change into
ADDED or DELETED); their data values join the snapshot's expectations like custom resources.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from collector.core.model import Snapshot
from collector.kube import InventoryUpdate, KubernetesSource, KubeSourceSettings, load_kube_config
from tests.fakeapi import FakeApiServer
from tests.support.apiobjects import (
    TOKEN,
    kubeconfig_for,
    make_configmap,
    make_expectations,
    make_flow,
    make_namespace,
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


async def eventually(condition: Callable[[], object], within: float = 2.0) -> None:
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


class Updates:
    def __init__(self) -> None:
        self.items: list[InventoryUpdate] = []
        self.arrived = asyncio.Event()

    async def __call__(self, update: InventoryUpdate) -> None:
        self.items.append(update)
        self.arrived.set()

    async def until(self, predicate: Callable[[Snapshot], bool], within: float = 2.0) -> Snapshot:
        """The first snapshot from now on (the current one included) that satisfies `predicate`."""
        async with asyncio.timeout(within):
            while True:
                if self.items and predicate(self.items[-1].snapshot):
                    return self.items[-1].snapshot
                self.arrived.clear()
                await self.arrived.wait()


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer(token=TOKEN) as fake:
        fake.create(make_namespace("shop"))
        fake.create(make_namespace("other"))
        yield fake


@pytest.fixture
def kubeconfig(tmp_path: Path, server: FakeApiServer) -> str:
    return kubeconfig_for(tmp_path / "kubeconfig", server.url)


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
            await asyncio.wait_for(source.wait_synced(), 5)
            yield source, updates
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def documents(snapshot: Snapshot) -> dict[str, Any]:
    """Expectations key -> (flow name, expect) of each flow, and where the document was read."""
    return {e.key: ([(f.name, f.expect) for f in e.flows], e.source) for e in snapshot.expectations}


def shop_flows(*, expect: str = "allow", namespace: str | None = None) -> dict[str, Any]:
    return make_expectations("shop-flows", namespace, flows=[make_flow(expect=expect)])


SOURCE = "api:namespaces/shop/configmaps/team-flows/data/flows.yaml:1"
MORE = "api:namespaces/shop/configmaps/team-flows/data/more.yaml"
TWO_DOCUMENTS = """\
apiVersion: flowproof.dev/v1alpha1
kind: FlowExpectations
metadata: {name: first}
spec:
  flows: [{name: a, from: {podSelector: {}}, to: {podSelector: {}}, ports: [80], expect: allow}]
---
apiVersion: flowproof.dev/v1alpha1
kind: FlowExpectations
metadata: {name: second, namespace: shop}
spec:
  flows: [{name: b, from: {podSelector: {}}, to: {podSelector: {}}, ports: [80], expect: deny}]
"""


# --- joining the snapshot -------------------------------------------------------------------------


async def test_configmap_expectations_are_added_modified_and_deleted(
    server: FakeApiServer, kubeconfig: str
) -> None:
    server.create(make_configmap("team-flows", data={"flows.yaml": shop_flows()}))
    server.create(make_configmap("unrelated", data={"x": "not expectations"}, labelled=False))
    async with watching(kubeconfig) as (source, updates):
        assert documents(source.snapshot) == {
            "shop/shop-flows": ([("web-to-api", "allow")], SOURCE)
        }
        assert source.problems == {}, "an unlabelled ConfigMap is never read"
        await eventually(lambda: server.open_watches("ConfigMap") == 1)
        lists = server.requests_for("ConfigMap", watch=False)
        watches = server.requests_for("ConfigMap", watch=True)
        assert [r.query["labelSelector"] for r in lists + watches] == [SELECTOR, SELECTOR]
        assert lists[0].path == watches[0].path == "/api/v1/configmaps"

        mark = len(updates.items)
        server.update(make_configmap("team-flows", data={"flows.yaml": shop_flows(expect="deny")}))
        snapshot = await updates.until(
            lambda s: documents(s).get("shop/shop-flows", ([],))[0] == [("web-to-api", "deny")]
        )
        [change] = [c for u in updates.items[mark:] for c in u.changes]
        assert (change.kind, change.key, change.action) == (
            "ConfigMap",
            "shop/team-flows",
            "modified",
        )
        assert change.fields == frozenset({"expectations"})

        server.update(
            make_configmap(
                "team-flows",
                data={"flows.yaml": shop_flows(expect="deny"), "more.yaml": TWO_DOCUMENTS},
            )
        )
        snapshot = await updates.until(lambda s: len(s.expectations) == 3)
        assert documents(snapshot) == {
            "shop/shop-flows": ([("web-to-api", "deny")], SOURCE),
            "shop/first": ([("a", "allow")], f"{MORE}:1"),
            "shop/second": ([("b", "deny")], f"{MORE}:7"),
        }, "each document of a multi-document value is named by its first line"

        server.delete("ConfigMap", "shop", "team-flows")
        await updates.until(lambda s: s.expectations == ())


async def test_a_label_added_or_removed_adds_or_removes_the_expectations(
    server: FakeApiServer, kubeconfig: str
) -> None:
    unlabelled = make_configmap("team-flows", data={"flows.yaml": shop_flows()}, labelled=False)
    server.create(unlabelled)
    async with watching(kubeconfig) as (source, updates):
        assert source.snapshot.expectations == ()
        server.update(make_configmap("team-flows", data={"flows.yaml": shop_flows()}))
        await updates.until(lambda s: "shop/shop-flows" in documents(s))
        server.update(unlabelled)
        await updates.until(lambda s: s.expectations == ())


async def test_configmaps_are_off_unless_asked_for(server: FakeApiServer, kubeconfig: str) -> None:
    server.create(make_configmap("team-flows", data={"flows.yaml": shop_flows()}))
    settings = KubeSourceSettings(backoff_initial_seconds=0.05)
    async with watching(kubeconfig, settings) as (source, _):
        assert source.snapshot.expectations == ()
    assert server.requests_for("ConfigMap") == []


async def test_without_rights_on_configmaps_the_source_syncs_without_them(
    server: FakeApiServer, kubeconfig: str, caplog: pytest.LogCaptureFixture
) -> None:
    server.create(make_configmap("team-flows", data={"flows.yaml": shop_flows()}))
    server.create(make_expectations("crd-flows"))
    server.forbid("/api/v1/configmaps")
    async with watching(kubeconfig) as (source, _):
        assert sorted(documents(source.snapshot)) == ["shop/crd-flows"]
        await asyncio.sleep(0.5)  # it looks again, and says so once
    warnings = [r.getMessage() for r in caplog.records if "configmaps" in r.getMessage()]
    assert len(warnings) == 1 and "403" in warnings[0], warnings
    assert len(server.requests_for("ConfigMap", watch=False)) >= 2


# --- what cannot be read --------------------------------------------------------------------------

BAD_DOCUMENTS = [
    pytest.param(
        shop_flows(expect="maybe"),
        "api:namespaces/shop/configmaps/team-flows/data/bad.yaml:",
        "expect",
        id="an invalid document is named by ConfigMap, key, line and field",
    ),
    pytest.param(
        "flows: [unclosed\n",
        "api:namespaces/shop/configmaps/team-flows/data/bad.yaml:2: invalid YAML",
        "",
        id="broken YAML is named by ConfigMap, key and line",
    ),
    pytest.param(
        shop_flows(namespace="other"),
        "api:namespaces/shop/configmaps/team-flows/data/bad.yaml:",
        "is not the ConfigMap's namespace 'shop'",
        id="a document for another namespace is refused",
    ),
    pytest.param(
        "- just\n- a list\n",
        "api:namespaces/shop/configmaps/team-flows/data/bad.yaml:1",
        "must be a mapping",
        id="a value that is no document is refused",
    ),
]


@pytest.mark.parametrize(("bad", "where", "why"), BAD_DOCUMENTS)
async def test_a_bad_document_is_named_once_and_skipped(
    server: FakeApiServer,
    kubeconfig: str,
    caplog: pytest.LogCaptureFixture,
    bad: object,
    where: str,
    why: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="collector.kube")
    good = {"good.yaml": make_expectations("good-flows")}
    server.create(make_configmap("team-flows", data={**good, "bad.yaml": bad}))
    async with watching(kubeconfig) as (source, updates):
        assert sorted(documents(source.snapshot)) == ["shop/good-flows"], "the rest is read"
        problem = source.problems["ConfigMap shop/team-flows"]
        assert where in problem and why in problem
        # An unrelated change of the ConfigMap reads it again: the same problem is not logged again.
        changed = make_configmap("team-flows", data={**good, "bad.yaml": bad})
        changed["metadata"]["annotations"] = {"touched": "yes"}
        server.update(changed)
        server.create(make_namespace("marker"))
        await updates.until(lambda s: "marker" in s.namespaces)
        server.update(make_configmap("team-flows", data=good))
        await eventually(lambda: "ConfigMap shop/team-flows" not in source.problems)
    logged = [r.getMessage() for r in caplog.records if where in r.getMessage()]
    assert len(logged) == 1, logged
    assert "ConfigMap shop/team-flows" in logged[0]


async def test_a_document_already_declared_elsewhere_is_skipped_and_named(
    server: FakeApiServer, kubeconfig: str
) -> None:
    server.create(make_expectations("shop-flows"))  # the custom resource wins
    server.create(make_configmap("team-flows", data={"flows.yaml": shop_flows(expect="deny")}))
    server.create(
        make_configmap(
            "twice",
            data={
                "a.yaml": make_expectations("twice-flows"),
                "b.yaml": make_expectations("twice-flows"),
            },
        )
    )
    async with watching(kubeconfig) as (source, _):
        found = documents(source.snapshot)
        assert sorted(found) == ["shop/shop-flows", "shop/twice-flows"]
        assert found["shop/shop-flows"][1] == "api:namespaces/shop/flowexpectations/shop-flows"
        assert (
            "already declared by api:namespaces/shop/flowexpectations/shop-flows"
            in (source.problems["ConfigMap shop/team-flows"])
        )
        assert (
            "already declared at api:namespaces/shop/configmaps/twice/data/a.yaml:1"
            in (source.problems["ConfigMap shop/twice"])
        )
