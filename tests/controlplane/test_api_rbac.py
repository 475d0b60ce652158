"""RBAC: every permission deploy/ grants the collector is needed, and they are enough.

The grants come from the shipped manifests, rendered with `kubectl kustomize`: the ClusterRoles of
deploy/overlays/plain and deploy/overlays/configmap-expectations, and the probe-pods Role of
deploy/overlays/probe-pods (bound in a namespace of the test's own, as that overlay binds it in
`shop`). A ServiceAccount named `flowproof-collector` (so the shipped admission policy applies to
it) gets exactly those grants, and the collector's own parts run as it against the real API server:
the Kubernetes source (list, watch, ConfigMap expectations; the policy kinds in
test_api_rbac_policy_kinds.py), the status publisher's patch and Events, and the
probe-pod manager (create, delete, the owners it names). With all grants everything works; with any
one taken away, the part that needs it stops working, in the way the table says. Then the
collector's identity is shown not to be able to write anything else. The lease Role (leader
election) the same way: the elector leads and renews with it, and with any verb taken away it
cannot; no other Lease can be read or written.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from collector.cluster import KubernetesProbePods
from collector.core.probepods import ProbePodRequest
from collector.kube import KubeClient, KubernetesSource, load_kube_config
from collector.leading import LeadershipLost, LeaseElector, LeaseTiming
from collector.reading.objects import WATCHED_POLICY_RESOURCES
from lab.controlplane import ControlPlane
from tests.support.apiobjects import make_configmap, make_expectations, make_policy
from tests.support.kubetools import (
    FE_API,
    apply,
    apply_all,
    create_pod,
    grants,
    namespace,
    ok,
    path_of,
    render,
    service_account,
    unique,
    until,
)
from tests.support.sourcetools import FAST

pytestmark = pytest.mark.timeout(600)

SYNC_SECONDS = 6.0
CHANGE_SECONDS = 4.0  # a change that reaches a source with its watch allowed takes milliseconds


def shipped() -> tuple[set[tuple[str, str, str]], set[tuple[str, str, str]]]:
    """(the cluster-wide grants, the grants of the probe-pods Role) deploy/ ships."""
    cluster: set[tuple[str, str, str]] = set()
    for overlay in ("overlays/plain", "overlays/configmap-expectations"):
        docs = render(overlay)
        bound = {  # the ClusterRoles bound to the collector (not the users' aggregated roles)
            d["roleRef"]["name"]
            for d in docs
            if d["kind"] == "ClusterRoleBinding"
            and any(x.get("name") == "flowproof-collector" for x in d["subjects"])
        }
        for doc in docs:
            if doc["kind"] == "ClusterRole" and doc["metadata"]["name"] in bound:
                cluster |= grants(doc["rules"])
    [role] = [
        d
        for d in render("overlays/probe-pods")
        if d["kind"] == "Role" and d["metadata"]["name"] == "flowproof-probe-pods"
    ]
    return cluster, grants(role["rules"])


CLUSTER, PROBE_POD_ROLE = shipped()

# What stops working without each grant: (scope, grant) -> the part that fails.
NEEDED_FOR: dict[tuple[str, tuple[str, str, str]], str] = {
    ("cluster", ("", "pods", "list")): "sync",
    ("cluster", ("", "pods", "watch")): "pod changes",
    ("cluster", ("", "namespaces", "list")): "sync",
    ("cluster", ("", "namespaces", "watch")): "namespace changes",
    ("cluster", ("networking.k8s.io", "networkpolicies", "list")): "sync",
    ("cluster", ("networking.k8s.io", "networkpolicies", "watch")): "policy changes",
    ("cluster", ("flowproof.dev", "flowexpectations", "list")): "expectations",
    ("cluster", ("flowproof.dev", "flowexpectations", "watch")): "expectations changes",
    ("cluster", ("flowproof.dev", "flowexpectations/status", "patch")): "status",
    ("cluster", ("events.k8s.io", "events", "create")): "events",
    ("cluster", ("", "configmaps", "list")): "configmap expectations",
    ("cluster", ("", "configmaps", "watch")): "configmap changes",
    ("role", ("", "pods", "create")): "probe pod created",
    ("role", ("", "pods", "delete")): "probe pod deleted",
    ("role", ("flowproof.dev", "flowexpectations", "get")): "probe pod owned by its expectations",
    ("role", ("", "namespaces", "get")): "probe pod owned by its namespace",
}
PARTS = sorted(set(NEEDED_FOR.values()))


def test_the_table_names_every_shipped_grant_and_nothing_else() -> None:
    # The policy kinds' list and watch: tests/controlplane/test_api_rbac_policy_kinds.py.
    policy_kinds = {
        (group, resource, verb)
        for group, resources in WATCHED_POLICY_RESOURCES.items()
        for resource in resources
        for verb in ("list", "watch")
    }
    shipped_grants = {("cluster", g) for g in CLUSTER - policy_kinds} | {
        ("role", g) for g in PROBE_POD_ROLE
    }
    assert shipped_grants == set(NEEDED_FOR)


@dataclass
class Scenario:
    """One identity with some of the shipped grants, and its own objects."""

    cp: ControlPlane
    without: tuple[str, tuple[str, str, str]] | None
    tmp: Path
    home: str = field(default_factory=lambda: unique("fp"))  # where its ServiceAccount lives
    shop: str = field(default_factory=lambda: unique("shop"))  # its objects and probe pods
    team: str = field(default_factory=lambda: unique("team"))  # expectations about shop's pods
    works: dict[str, bool] = field(default_factory=dict)

    def setup(self) -> str:
        cluster = {g for g in CLUSTER if self.without != ("cluster", g)}
        role = {g for g in PROBE_POD_ROLE if self.without != ("role", g)}
        token = service_account(
            self.cp,
            self.home,
            "flowproof-collector",
            cluster=cluster,
            namespaced={self.shop: role},
        )
        namespace(self.cp, self.shop)
        namespace(self.cp, self.team)
        create_pod(self.cp, _pod("web", self.shop))
        ok(apply(self.cp, make_policy("api-ingress", self.shop)))
        ok(apply(self.cp, make_expectations("shop-flows", self.shop)))
        ok(
            apply(
                self.cp,
                make_configmap("cm-flows", self.shop, data={"a": make_expectations("cm", None)}),
            )
        )
        path = self.tmp / f"{self.home}.kubeconfig"
        return str(self.cp.write_kubeconfig(path, token, "flowproof-collector"))


def _pod(name: str, ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "app"}]},
        "status": {"phase": "Running", "podIP": "10.244.1.10", "podIPs": [{"ip": "10.244.1.10"}]},
    }


async def _seen(check: Callable[[], bool], within: float) -> bool:
    with contextlib.suppress(AssertionError):
        await until(check, within)
        return True
    return False


async def exercise(s: Scenario) -> dict[str, bool]:
    """Run the collector's parts as the scenario's identity; what worked, part by part."""
    kubeconfig = await asyncio.to_thread(s.setup)
    works = s.works
    settings = replace(FAST, expectations_configmaps=True, backoff_max_seconds=0.3)
    async with KubernetesSource(load_kube_config(kubeconfig), settings=settings) as source:
        task = asyncio.create_task(source.run())
        try:
            try:
                await asyncio.wait_for(source.wait_synced(), SYNC_SECONDS)
                works["sync"] = True
            except TimeoutError:
                works["sync"] = False
            snapshot = source.snapshot
            keys = {e.key for e in snapshot.expectations}
            works["expectations"] = f"{s.shop}/shop-flows" in keys
            works["configmap expectations"] = f"{s.shop}/cm" in keys

            # A change of every kind, made after the first snapshot.
            new_ns = unique("new")
            await asyncio.to_thread(namespace, s.cp, new_ns)
            await asyncio.to_thread(create_pod, s.cp, _pod("late", s.shop))
            await asyncio.to_thread(apply, s.cp, make_policy("late", s.shop))
            await asyncio.to_thread(apply, s.cp, make_expectations("late", s.shop))
            await asyncio.to_thread(
                apply,
                s.cp,
                make_configmap("cm-late", s.shop, data={"a": make_expectations("cm-late", None)}),
            )
            checks: dict[str, Callable[[], bool]] = {
                "namespace changes": lambda: new_ns in source.snapshot.namespaces,
                "pod changes": lambda: source.snapshot.pod(f"{s.shop}/late") is not None,
                "policy changes": lambda: any(
                    p.key == f"{s.shop}/late" for p in source.snapshot.policies
                ),
                "expectations changes": lambda: any(
                    e.key == f"{s.shop}/late" for e in source.snapshot.expectations
                ),
                "configmap changes": lambda: any(
                    e.key == f"{s.shop}/cm-late" for e in source.snapshot.expectations
                ),
            }
            results = await asyncio.gather(*(_seen(c, CHANGE_SECONDS) for c in checks.values()))
            works |= dict(zip(checks, results, strict=True))

            # The status publisher's write (against the version the API has now).
            stored = await asyncio.to_thread(
                s.cp.request, "GET", f"{FE_API}/namespaces/{s.shop}/flowexpectations/shop-flows"
            )
            written = await source.update_expectations_status(
                s.shop,
                "shop-flows",
                {"flows": 1},
                resource_version=stored.body["metadata"]["resourceVersion"],
            )
            works["status"] = written == "written"
            # The status publisher's Event on a condition's transition.
            regarding = source.expectation_objects().get(f"{s.shop}/shop-flows")
            works["events"] = regarding is not None and await source.record_event(
                regarding, "Normal", "AllFlowsPass", "every flow passes"
            )
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # Probe pods: one owned by the FlowExpectations that needs it, one by its namespace (its
    # expectations live in another namespace), then none.
    by_fe = ProbePodRequest(s.shop, (("app", "from-fe"), ("flowproof.dev/probe-pod", "true")))
    by_ns = ProbePodRequest(s.shop, (("app", "from-ns"), ("flowproof.dev/probe-pod", "true")))
    needing = {by_fe.key: [f"{s.shop}/shop-flows"], by_ns.key: [f"{s.team}/elsewhere"]}
    manager = KubernetesProbePods(
        KubeClient(load_kube_config(kubeconfig)),
        namespaces=[s.shop],
        image="registry.k8s.io/pause:3.10",
        needed_by=lambda request: needing[request.key],
    )
    try:
        await manager([by_fe, by_ns])
        await manager.reconcile()
        pods = {
            name: await asyncio.to_thread(s.cp.request, "GET", path_of("Pod", name, s.shop))
            for name in (by_fe.name, by_ns.name)
        }
        owner = {
            name: (p.body["metadata"]["ownerReferences"][0]["kind"] if p.ok else None)
            for name, p in pods.items()
        }
        works["probe pod created"] = any(p.ok for p in pods.values())
        works["probe pod owned by its expectations"] = owner[by_fe.name] == "FlowExpectations"
        works["probe pod owned by its namespace"] = owner[by_ns.name] == "Namespace"
        await manager([])
        await manager.reconcile()
        after = [
            await asyncio.to_thread(s.cp.request, "GET", path_of("Pod", name, s.shop))
            for name, p in pods.items()
            if p.ok
        ]
        works["probe pod deleted"] = bool(after) and all(
            a.status == 404 or a.body["metadata"].get("deletionTimestamp") for a in after
        )
    finally:
        await manager.client.aclose()
    return works


async def test_each_grant_is_needed_and_all_of_them_are_enough(
    controlplane: ControlPlane, tmp_path: Path
) -> None:
    removals: list[tuple[str, tuple[str, str, str]] | None] = [None, *sorted(NEEDED_FOR)]
    scenarios = [Scenario(controlplane, removal, tmp_path) for removal in removals]
    await asyncio.gather(*(exercise(s) for s in scenarios))
    everything = scenarios[0].works
    assert everything == dict.fromkeys(PARTS, True), f"with every grant: {everything}"
    for s in scenarios[1:]:
        assert s.without is not None
        broken = sorted(part for part, ok_ in s.works.items() if not ok_)
        expected = NEEDED_FOR[s.without]
        assert expected in broken, f"without {s.without}: {expected} still works ({s.works})"
        # A missing list stops the first snapshot, and with it everything the source feeds.
        if expected != "sync":
            assert s.works["sync"], f"without {s.without} the source still syncs"


# --- what the collector's identity cannot do --------------------------------------------------


@pytest.fixture(scope="module")
def shipped_identity(
    controlplane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, str]:
    """The collector's ServiceAccount bound as deploy/overlays/probe-pods binds it, with the
    probe-pods Role in a namespace of this module (its token, that namespace)."""
    kinds = ("Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding")
    apply_all(controlplane, [d for d in render("overlays/probe-pods") if d["kind"] in kinds])
    allowed = unique("probe")
    namespace(controlplane, allowed)
    for doc in render("overlays/probe-pods"):
        if doc["kind"] in ("Role", "RoleBinding"):
            doc["metadata"]["namespace"] = allowed
            ok(apply(controlplane, doc))
    token = controlplane.service_account_token("flowproof", "flowproof-collector", create=False)
    return token, allowed


FORBIDDEN: list[Any] = [
    pytest.param(
        "POST", "pods", "elsewhere", None, id="create a pod outside the probe-pod namespaces"
    ),
    pytest.param("DELETE", "pods", "elsewhere", "web", id="delete a pod outside them"),
    pytest.param(
        "PATCH", "pods", "allowed", "web", id="change a pod, even where it may create one"
    ),
    pytest.param("POST", "networkpolicies", "elsewhere", None, id="create a NetworkPolicy"),
    pytest.param(
        "DELETE", "networkpolicies", "elsewhere", "api-ingress", id="delete a NetworkPolicy"
    ),
    pytest.param(
        "PATCH", "flowexpectations", "elsewhere", "shop-flows", id="change a FlowExpectations spec"
    ),
    pytest.param(
        "DELETE", "flowexpectations", "elsewhere", "shop-flows", id="delete a FlowExpectations"
    ),
    pytest.param("POST", "configmaps", "elsewhere", None, id="create a ConfigMap"),
    pytest.param("GET", "secrets", "elsewhere", None, id="read Secrets"),
    pytest.param("DELETE", "namespaces", "", "elsewhere", id="delete a namespace"),
    pytest.param("PATCH", "namespaces", "", "elsewhere", id="relabel a namespace"),
    pytest.param("GET", "pods", "elsewhere", "web", id="read one pod by name (it lists instead)"),
]
PREFIX = {
    "pods": "/api/v1",
    "configmaps": "/api/v1",
    "secrets": "/api/v1",
    "namespaces": "/api/v1",
    "networkpolicies": "/apis/networking.k8s.io/v1",
    "flowexpectations": FE_API,
}


@pytest.mark.parametrize(("method", "resource", "where", "name"), FORBIDDEN)
def test_a_write_the_collector_has_no_grant_for_is_forbidden(
    controlplane: ControlPlane,
    shipped_identity: tuple[str, str],
    method: str,
    resource: str,
    where: str,
    name: str | None,
) -> None:
    token, allowed = shipped_identity
    elsewhere = unique("elsewhere")
    namespace(controlplane, elsewhere)
    create_pod(controlplane, _pod("web", elsewhere))
    if controlplane.request("GET", path_of("Pod", "web", allowed)).status == 404:
        create_pod(controlplane, _pod("web", allowed))
    ok(apply(controlplane, make_policy("api-ingress", elsewhere)))
    ok(apply(controlplane, make_expectations("shop-flows", elsewhere)))
    ns = {"elsewhere": elsewhere, "allowed": allowed, "": ""}[where]
    if resource == "namespaces":
        path = f"/api/v1/namespaces/{elsewhere}"
    else:
        path = f"{PREFIX[resource]}/namespaces/{ns}/{resource}" + (f"/{name}" if name else "")
    bodies = {
        "POST": {"metadata": {"name": "x"}},
        "PATCH": {"metadata": {"labels": {"changed": "yes"}}},
        "DELETE": None,
        "GET": None,
    }
    answer = controlplane.request(
        method,
        path,
        bodies[method],
        token=token,
        content_type="application/merge-patch+json" if method == "PATCH" else "application/json",
    )
    assert answer.status == 403, f"{method} {path}: {answer.status} {answer.body}"
    assert "flowproof:flowproof-collector" in answer.body["message"]


# --- the Lease (leader election) ---------------------------------------------------------------

LEASES = "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"


def _lease_identity(cp: ControlPlane, tmp: Path, without: str | None) -> tuple[str, str, str]:
    """A namespace of its own with the collector's ServiceAccount bound to the shipped lease Role
    (minus one verb): (namespace, token, kubeconfig)."""
    home = unique("lease")
    namespace(cp, home)
    cp.create_service_account(home, "flowproof-collector")
    for doc in render("overlays/plain"):
        if doc["kind"] == "Role" and doc["metadata"]["name"] == "flowproof-collector-leader":
            doc["metadata"]["namespace"] = home
            doc["rules"] = [
                {**rule, "verbs": [v for v in rule["verbs"] if v != without]}
                for rule in doc["rules"]
                if [v for v in rule["verbs"] if v != without]
            ]
            ok(apply(cp, doc), "lease role")
        elif (
            doc["kind"] == "RoleBinding" and doc["metadata"]["name"] == "flowproof-collector-leader"
        ):
            doc["metadata"]["namespace"] = home
            doc["subjects"] = [{**s, "namespace": home} for s in doc["subjects"]]
            ok(apply(cp, doc), "lease role binding")
    token = cp.service_account_token(home, "flowproof-collector", create=False)
    kubeconfig = cp.write_kubeconfig(tmp / f"{home}.kubeconfig", token, "flowproof-collector")
    return home, token, str(kubeconfig)


async def _leads_and_renews(home: str, kubeconfig: str) -> tuple[bool, bool]:
    """(took the Lease, still held it after several renewals), as the collector's elector."""
    async with KubeClient(load_kube_config(kubeconfig)) as client:
        elector = LeaseElector(
            client,
            namespace=home,
            name="flowproof-collector",
            identity="collector-0",
            timing=LeaseTiming(
                duration_seconds=3, renew_deadline_seconds=1, retry_period_seconds=0.2
            ),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(elector.run(stop))
        took = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3):
                await elector.leading.wait()
                took = True
        held = False
        if took:
            await asyncio.sleep(2.0)  # ten renewals, past the renew deadline
            held = elector.leading.is_set() and not task.done()
        stop.set()
        with contextlib.suppress(LeadershipLost):
            await asyncio.wait_for(task, 10)
        return took, held


@pytest.mark.parametrize(
    ("without", "took", "held"),
    [
        pytest.param(None, True, True, id="the shipped grants lead and renew"),
        pytest.param("create", False, False, id="without create no Lease is made"),
        pytest.param("get", False, False, id="without get none is read"),
        pytest.param("update", True, False, id="without update it is made but never renewed"),
    ],
)
async def test_each_lease_grant_is_needed_and_they_are_enough(
    controlplane: ControlPlane, tmp_path: Path, without: str | None, took: bool, held: bool
) -> None:
    home, _, kubeconfig = _lease_identity(controlplane, tmp_path, without)
    assert await _leads_and_renews(home, kubeconfig) == (took, held)


def test_the_collector_may_touch_no_other_lease(controlplane: ControlPlane, tmp_path: Path) -> None:
    home, token, _ = _lease_identity(controlplane, tmp_path, None)
    other = unique("other")
    namespace(controlplane, other)
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "kube-controller-manager"},
        "spec": {"holderIdentity": "someone", "leaseDurationSeconds": 15},
    }
    for ns in (home, other):
        ok(controlplane.request("POST", LEASES.format(ns=ns), lease), "someone's lease")
    forbidden = [
        ("GET", f"{LEASES.format(ns=home)}/kube-controller-manager", None),
        ("PUT", f"{LEASES.format(ns=home)}/kube-controller-manager", lease),
        ("DELETE", f"{LEASES.format(ns=home)}/kube-controller-manager", None),
        ("GET", LEASES.format(ns=home), None),  # no list either
        ("GET", f"{LEASES.format(ns=other)}/kube-controller-manager", None),
        ("POST", LEASES.format(ns=other), {**lease, "metadata": {"name": "flowproof-collector"}}),
    ]
    for method, path, body in forbidden:
        answer = controlplane.request(method, path, body, token=token)
        assert answer.status == 403, (method, path, answer.status)
