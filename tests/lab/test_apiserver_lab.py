"""The shop lab with an API server of its own (`lab up --apiserver`), its collector as in a cluster.

One lab for the module: the shop example, kube-apiserver and etcd (built from their Go modules)
holding its cluster, the lab following the API as a kubelet would (lab/mirroring.py), and the loop
with the collector on the Kubernetes source, authenticated as its ServiceAccount bound to exactly
the RBAC in deploy/, making probe pods through the API under the shipped admission policy, writing
FlowExpectations status, reading ConfigMap expectations. Changes are made with `kubectl` against
that API server (relabel, delete, create a pod; delete and restore a policy): each must reach both
the lab's kernel (enforcement) and the collector (through its watch), and show in the verdicts.
The `restored` fixture puts the shop back after each test; the lab is taken down at the end and
nothing carrying its name may be left.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from labtools import assert_nothing_left, lab_unavailable, unique_name
from test_loop import DECLARED, LOOP, POLICIES, SHOP, post_verify, statuses, table, wait_for

from lab.config import LabSettings
from lab.lifecycle import Lab, read_manifests
from lab.mirroring import ApiServerOptions
from tests.support.kubetools import KUBECTL, grants, render

pytestmark = pytest.mark.lab

COLLECTOR = "system:serviceaccount:flowproof:flowproof-collector"


@pytest.fixture(scope="module")
def shop(controlplane_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = lab_unavailable()
    if reason is not None:
        pytest.skip(reason)
    lab = Lab(unique_name(), tmp_path_factory.mktemp("apilab") / "state")
    options = ApiServerOptions(bin_dir=str(controlplane_bin), expectations_configmaps=True)
    try:
        lab.up(read_manifests([SHOP]), LabSettings(owner_pid=os.getpid()), LOOP, options)
        yield lab
    finally:
        state = lab.paths.load() if lab.exists() else None
        if lab.exists():
            lab.down()
        assert_nothing_left(lab.name, state)


def kubectl(lab: Lab, *args: str, input: str | None = None) -> str:
    record = lab.state().apiserver
    assert record is not None
    done = subprocess.run(
        [str(KUBECTL), f"--kubeconfig={record.admin_kubeconfig}", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kubectl {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done.stdout


def api_get(lab: Lab, *args: str) -> Any:
    return json.loads(kubectl(lab, "get", *args, "-o", "json"))


def proven(lab: Lab) -> dict[str, Any]:
    answer = post_verify(lab)
    assert answer["decided"], answer["reasons"]
    return answer


@pytest.fixture
def lab(shop: Lab) -> Iterator[Lab]:
    """The shop lab, put back as it was after the test (through its API server)."""
    yield shop
    shop.apply(read_manifests([SHOP]), prune=True)
    last: list[dict[str, Any]] = [{}]

    def passes() -> bool:
        last[0] = post_verify(shop)
        return bool(last[0]["decided"]) and statuses(last[0]) == {f: {"PASS"} for f in DECLARED}

    wait_for(
        passes,
        30,
        lambda: (
            "the shop to pass again:\n"
            + table(last[0])
            + "\n"
            + kubectl(shop, "get", "pods", "-A", "-o", "wide")
            + json.dumps(shop.status()["pods"], indent=1)
        ),
    )


def rows_from(answer: dict[str, Any], source: str) -> list[dict[str, Any]]:
    return [r for r in answer["rows"] if r["source"] == source]


# --- the lab as the API holds it ------------------------------------------------------------------


def test_the_api_server_holds_the_lab_as_a_kubelet_reports_it(lab: Lab) -> None:
    state = lab.state()
    nodes = {n["metadata"]["name"]: n for n in api_get(lab, "nodes")["items"]}
    assert sorted(nodes) == ["node-1", "node-2", "node-3"]
    for name, node in nodes.items():
        [ready] = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready["status"] == "True"
        address = {a["type"]: a["address"] for a in node["status"]["addresses"]}["InternalIP"]
        assert address == lab.status()["nodes"][int(name[-1]) - 1]["address"]
    pods = {
        f"{p['metadata']['namespace']}/{p['metadata']['name']}": p
        for p in api_get(lab, "pods", "-A")["items"]
    }
    assert sorted(pods) == sorted(r.key for r in state.pods)
    for record in state.pods:
        pod = pods[record.key]
        assert pod["metadata"]["uid"] == record.uid, "the lab runs the API's pod (its uid)"
        assert pod["spec"]["nodeName"] == f"node-{record.node}"
        assert pod["status"]["phase"] == "Running"
        assert pod["status"]["podIP"] == record.ip
        conditions = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
        assert conditions["Ready"] == "True"
    policies = api_get(lab, "networkpolicies", "-n", "shop")["items"]
    assert sorted(p["metadata"]["name"] for p in policies) == sorted(
        p["metadata"]["name"] for p in state.policies
    )
    [fe] = api_get(lab, "flowexpectations", "-n", "shop")["items"]
    assert len(fe["spec"]["flows"]) == len(DECLARED)


def test_the_collector_runs_as_its_service_account_with_the_rbac_of_deploy(lab: Lab) -> None:
    argv = Path(f"/proc/{lab.loop_processes()['collector'].pid}/cmdline").read_bytes().split(b"\0")
    assert b"--source" in argv and argv[argv.index(b"--source") + 1] == b"kubernetes"
    record = lab.state().apiserver
    assert record is not None
    whoami = subprocess.run(
        [
            str(KUBECTL),
            f"--kubeconfig={record.collector_kubeconfig}",
            "auth",
            "whoami",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    review = json.loads(whoami.stdout)
    assert review["status"]["userInfo"]["username"] == COLLECTOR
    docs = render("overlays/probe-pods") + render("overlays/configmap-expectations")
    bound = {  # the collector's ClusterRoles (not the users' aggregated flowproof-edit/view)
        d["roleRef"]["name"]
        for d in docs
        if d["kind"] == "ClusterRoleBinding"
        and any(x.get("name") == "flowproof-collector" for x in d["subjects"])
    }
    shipped = {
        d["metadata"]["name"]: grants(d["rules"])
        for d in docs
        if d["kind"] == "ClusterRole" and d["metadata"]["name"] in bound
    }
    held = {
        d["metadata"]["name"]: grants(d["rules"])
        for d in api_get(lab, "clusterroles")["items"]
        if d["metadata"]["name"] in shipped
    }
    assert held == shipped
    roles = api_get(lab, "roles", "-n", "shop")["items"]
    assert [
        grants(r["rules"]) for r in roles if r["metadata"]["name"] == "flowproof-probe-pods"
    ] == [
        grants(
            next(
                d
                for d in render("overlays/probe-pods")
                if d["kind"] == "Role" and d["metadata"]["name"] == "flowproof-probe-pods"
            )["rules"]
        )
    ]


def test_the_shop_passes_and_the_collector_writes_its_status(lab: Lab) -> None:
    answer = proven(lab)
    assert statuses(answer) == {f: {"PASS"} for f in DECLARED}, table(answer)

    def written() -> dict[str, Any] | None:
        status = api_get(lab, "flowexpectations", "shop", "-n", "shop").get("status") or {}
        return status if status.get("counts", {}).get("PASS") == len(DECLARED) else None

    status = wait_for(written, 20, "the collector to write the shop's status")
    assert (status["flows"], status["failing"], status["observedGeneration"]) == (
        len(DECLARED),
        0,
        1,
    )
    assert "lastVerified" in status
    columns = kubectl(lab, "get", "fe", "-n", "shop").splitlines()
    # NAME VERIFIED REASON READY FLOWS FAILING ...: the printer columns of deploy/crds.
    assert columns[1].split()[:6] == [
        "shop",
        "True",
        "AllFlowsPass",
        "True",
        str(len(DECLARED)),
        "0",
    ]


# --- kubectl changes reach the kernel and the collector -------------------------------------------


def test_a_pod_relabelled_with_kubectl_changes_its_enforcement_and_its_flows(lab: Lab) -> None:
    generation = lab.state().generation
    kubectl(lab, "-n", "shop", "label", "pod", "batch-0", "app=frontend", "--overwrite")
    wait_for(
        lambda: lab.state().pod("shop/batch-0").labels.get("app") == "frontend",  # type: ignore[union-attr]
        10,
        "the lab to relabel batch-0",
    )
    wait_for(lambda: lab.state().generation > generation, 10, "the kernel's rules to change")

    def relabelled() -> dict[str, Any] | None:
        answer = post_verify(lab)
        sources = {r["source"] for r in answer["rows"] if r["flow"] == "frontend-to-api"}
        return answer if answer["decided"] and "shop/batch-0" in sources else None

    answer = wait_for(relabelled, 20, "batch-0 to be probed as a frontend")
    assert {r["status"] for r in rows_from(answer, "shop/batch-0")} == {"PASS"}, table(answer)
    # No pod is app=batch now: batch-to-db is probed from a probe pod the collector made
    # through the API, which the lab runs.
    batch = [r for r in answer["rows"] if r["flow"] == "batch-to-db"]
    assert batch and {r["status"] for r in batch} == {"PASS"}, table(answer)
    probe = next(
        p
        for p in api_get(lab, "pods", "-n", "shop")["items"]
        if p["metadata"]["name"].startswith("flowproof-probe-")
    )
    assert probe["metadata"]["labels"]["app"] == "batch"
    assert probe["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "flowproof"
    assert probe["status"]["phase"] == "Running" and probe["spec"]["nodeName"]
    assert {c["type"]: c["status"] for c in probe["status"]["conditions"]}["Ready"] == "False"
    assert lab.state().pod(f"shop/{probe['metadata']['name']}") is not None, "the lab runs it"
    [owner] = probe["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"]) == ("FlowExpectations", "shop")


def test_a_policy_deleted_with_kubectl_closes_the_kernel_and_the_verdict_follows(lab: Lab) -> None:
    """db-ingress is what lets api and batch reach db past the default deny: without it the
    kernel drops them (reality) and the collector's model says so too (intent disagrees)."""
    kubectl(lab, "-n", "shop", "delete", "networkpolicy", "db-ingress")
    wait_for(
        lambda: not any(p["metadata"]["name"] == "db-ingress" for p in lab.state().policies),
        10,
        "the lab to drop db-ingress",
    )

    def closed() -> dict[str, Any] | None:
        answer = post_verify(lab)
        found = statuses(answer)
        blocked = found.get("api-to-db") == found.get("batch-to-db") == {"REQUIRED_BLOCKED"}
        return answer if blocked else None

    answer = wait_for(closed, 20, "api-to-db and batch-to-db to be closed by model and kernel")
    rows = [r for r in answer["rows"] if r["flow"] in ("api-to-db", "batch-to-db")]
    assert {(r["model"], r["reality"]) for r in rows} == {("deny", "deny")}, table(answer)
    kubectl(lab, "apply", "-f", str(POLICIES / "api-to-db.yaml"))

    def reopened() -> bool:
        found = statuses(post_verify(lab))
        return found.get("api-to-db") == found.get("batch-to-db") == {"PASS"}

    wait_for(reopened, 20, "db-ingress to be back in the kernel and the verdict")


def test_pods_deleted_and_created_with_kubectl_come_and_go_in_lab_and_verdict(lab: Lab) -> None:
    kubectl(lab, "-n", "shop", "delete", "pod", "frontend-1", "--wait=true", "--timeout=30s")
    assert lab.state().pod("shop/frontend-1") is None
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "frontend-extra",
            "namespace": "shop",
            "labels": {"app": "frontend", "tier": "web"},
        },
        "spec": {
            "containers": [{"name": "web", "image": "registry.example.com/shop/frontend:1.0"}]
        },
    }
    kubectl(lab, "apply", "-f", "-", input=json.dumps(manifest))
    created = wait_for(lambda: lab.state().pod("shop/frontend-extra"), 10, "the lab to run it")

    def reported() -> dict[str, Any] | None:
        found: dict[str, Any] = api_get(lab, "pod", "frontend-extra", "-n", "shop")
        return found if found.get("status", {}).get("podIP") else None

    # The lab runs the pod first, then reports its status to the API as a kubelet does.
    pod = wait_for(reported, 10, "its status in the API")
    assert pod["spec"]["nodeName"] == f"node-{created.node}", "bound to the node the lab chose"
    assert pod["status"]["podIP"] == created.ip

    def followed() -> dict[str, Any] | None:
        answer = post_verify(lab)
        sources = {r["source"] for r in answer["rows"]}
        ok = "shop/frontend-extra" in sources and "shop/frontend-1" not in sources
        return answer if answer["decided"] and ok else None

    answer = wait_for(followed, 20, "the collector to probe from frontend-extra, not frontend-1")
    assert {r["status"] for r in rows_from(answer, "shop/frontend-extra")} == {"PASS"}, table(
        answer
    )


def test_a_namespace_deleted_with_kubectl_is_emptied_and_goes(lab: Lab) -> None:
    kubectl(lab, "create", "namespace", "scratch")
    kubectl(lab, "-n", "scratch", "run", "visitor", "--image=x", "--labels=app=visitor")
    wait_for(lambda: lab.state().pod("scratch/visitor"), 10, "the lab to run the visitor")
    kubectl(lab, "delete", "namespace", "scratch", "--timeout=30s")
    assert "scratch" not in lab.state().namespaces
    assert lab.state().pod("scratch/visitor") is None


def test_configmap_expectations_are_verified_when_turned_on(lab: Lab) -> None:
    document = {
        "apiVersion": "flowproof.dev/v1alpha1",
        "kind": "FlowExpectations",
        "metadata": {"name": "from-configmap"},
        "spec": {
            "flows": [
                {
                    "name": "api-to-db-again",
                    "from": {"podSelector": {"matchLabels": {"app": "api"}}},
                    "to": {"podSelector": {"matchLabels": {"app": "db"}}},
                    "ports": ["5432/TCP"],
                    "expect": "allow",
                }
            ]
        },
    }
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "team-flows",
            "namespace": "shop",
            "labels": {"flowproof.dev/expectations": "true"},
        },
        "data": {"flows.yaml": yaml.safe_dump(document)},
    }
    kubectl(lab, "apply", "-f", "-", input=json.dumps(configmap))

    def verified() -> dict[str, Any] | None:
        answer = post_verify(lab)
        return answer if statuses(answer).get("api-to-db-again") == {"PASS"} else None

    wait_for(verified, 20, "the ConfigMap's flow to be verified")
    kubectl(lab, "-n", "shop", "delete", "configmap", "team-flows")
    wait_for(lambda: "api-to-db-again" not in statuses(post_verify(lab)), 20, "it to go")


def test_lab_commands_write_into_the_api(lab: Lab) -> None:
    lab.label_pod("shop/api-0", ["tier=changed"])
    assert api_get(lab, "pod", "api-0", "-n", "shop")["metadata"]["labels"]["tier"] == "changed"
    lab.delete(read_manifests([POLICIES / "dns-egress.yaml"]))
    assert "dns-egress" not in kubectl(lab, "get", "networkpolicies", "-n", "shop", "-o", "name")
    started = time.monotonic()
    lab.apply(read_manifests([POLICIES / "dns-egress.yaml"]))
    assert time.monotonic() - started < 10
    assert "dns-egress" in kubectl(lab, "get", "networkpolicies", "-n", "shop", "-o", "name")
