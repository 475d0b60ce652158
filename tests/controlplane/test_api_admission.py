"""The probe-pod admission policy (deploy/overlays/probe-pods) against the real API server.

A control plane of its own runs the shipped ValidatingAdmissionPolicy and its binding, and the
collector's ServiceAccount bound as the overlay binds it, in a namespace enforcing Pod Security
"restricted". The probe pod the collector makes (collector.cluster.probe_pod_manifest) is let in;
every shape the policy exists to refuse is refused with the policy's message, when the collector
asks; the same shapes from anyone else are none of the policy's business. The collector's
probe-pod manager then creates and deletes its pods through this API, the policy active.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from collector.cluster import (
    KubernetesProbePods,
    OwnerReference,
    probe_pod_manifest,
)
from collector.core.probepods import ProbePodRequest
from collector.kube import KubeClient, load_kube_config
from lab.controlplane import ControlPlane
from tests.support.apiobjects import make_expectations
from tests.support.kubetools import (
    apply,
    apply_all,
    eventually,
    namespace,
    ok,
    path_of,
    render,
    unique,
)

IMAGE = "registry.k8s.io/pause:3.10"
REQUEST_LABELS = (("app", "web"), ("flowproof.dev/probe-pod", "true"))
RESTRICTED = unique("restricted")


@pytest.fixture(scope="module")
def plane(
    controlplane_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ControlPlane, str, str]]:
    """(the control plane, the collector's token, the namespace it may make probe pods in)."""
    with ControlPlane(controlplane_bin) as cp:
        docs = render("overlays/probe-pods")
        kinds = (
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
            "CustomResourceDefinition",
        )
        apply_all(cp, [d for d in docs if d["kind"] in kinds])
        allowed = unique("probes")
        namespace(cp, allowed)
        namespace(cp, RESTRICTED, {"pod-security.kubernetes.io/enforce": "restricted"})
        for where in (allowed, RESTRICTED):
            for doc in docs:
                if doc["kind"] in ("Role", "RoleBinding"):
                    doc["metadata"]["namespace"] = where
                    ok(apply(cp, doc))
        token = cp.service_account_token("flowproof", "flowproof-collector", create=False)
        # The policy is in force once a pod it refuses is refused (it is compiled in the back).
        eventually(lambda: create(cp, token, allowed, without_label()).status in (403, 422), 30)
        yield cp, token, allowed


def probe_pod(namespace_: str) -> dict[str, Any]:
    request = ProbePodRequest(namespace_, REQUEST_LABELS)
    owner = OwnerReference("v1", "Namespace", namespace_, "00000000-0000-0000-0000-000000000001")
    return probe_pod_manifest(request, image=IMAGE, owners=[owner])


def create(cp: ControlPlane, token: str | None, ns: str, pod: dict[str, Any]) -> Any:
    body = copy.deepcopy(pod)
    body["metadata"]["namespace"] = ns
    body["metadata"]["name"] = unique("pod")
    body["metadata"].pop("ownerReferences", None)  # no such owner here; not the policy's concern
    return cp.request("POST", path_of("Pod", "", ns), body, token=token, query={"dryRun": "All"})


def without_label() -> dict[str, Any]:
    pod = probe_pod("x")
    del pod["metadata"]["labels"]["app.kubernetes.io/managed-by"]
    return pod


def _changed(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    pod = probe_pod("x")
    change(pod)
    return pod


def _spec(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda pod: pod["spec"].update(fields)


def _container(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda pod: pod["spec"]["containers"][0]["securityContext"].update(fields)


REFUSED: list[Any] = [
    pytest.param(
        without_label(), "app.kubernetes.io/managed-by=flowproof", id="not labelled as flowproof's"
    ),
    pytest.param(
        _changed(lambda p: p["metadata"]["labels"].update({"app.kubernetes.io/managed-by": "me"})),
        "app.kubernetes.io/managed-by=flowproof",
        id="labelled as someone else's",
    ),
    pytest.param(
        _changed(_spec(automountServiceAccountToken=True)),
        "no ServiceAccount token",
        id="mounts a token",
    ),
    pytest.param(
        _changed(lambda p: p["spec"].pop("automountServiceAccountToken")),
        "no ServiceAccount token",
        id="does not say it mounts no token",
    ),
    pytest.param(
        _changed(_spec(volumes=[{"name": "v", "emptyDir": {}}])), "no volumes", id="has a volume"
    ),
    pytest.param(_changed(_spec(hostNetwork=True)), "shares no host namespace", id="host network"),
    pytest.param(_changed(_spec(hostPID=True)), "shares no host namespace", id="host PIDs"),
    pytest.param(_changed(_spec(hostIPC=True)), "shares no host namespace", id="host IPC"),
    pytest.param(
        _changed(_spec(initContainers=[{"name": "i", "image": IMAGE}])),
        "only plain containers",
        id="an init container",
    ),
    pytest.param(
        _changed(_container(privileged=True, allowPrivilegeEscalation=True)),
        "not privileged",
        id="privileged",
    ),
    pytest.param(
        _changed(_container(capabilities={"drop": ["ALL"], "add": ["NET_RAW"]})),
        "adds no capabilities",
        id="adds a capability",
    ),
]


def test_the_collectors_probe_pod_is_let_in_under_pod_security_restricted(
    plane: tuple[ControlPlane, str, str],
) -> None:
    cp, token, allowed = plane
    for where in (allowed, RESTRICTED):
        answer = create(cp, token, where, probe_pod(where))
        assert answer.status == 201, answer.body
    # Pod Security is really enforced there: a pod that is not restricted is refused to anyone.
    loose = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "loose"},
        "spec": {"containers": [{"name": "c", "image": IMAGE}]},
    }
    refused = create(cp, None, RESTRICTED, loose)
    assert refused.status == 403 and "violates PodSecurity" in refused.body["message"]


@pytest.mark.parametrize(("pod", "message"), REFUSED)
def test_the_policy_refuses_what_a_probe_pod_must_not_be(
    plane: tuple[ControlPlane, str, str], pod: dict[str, Any], message: str
) -> None:
    cp, token, allowed = plane
    answer = create(cp, token, allowed, pod)
    assert answer.status in (403, 422), answer.body
    assert "ValidatingAdmissionPolicy 'flowproof-probe-pods'" in answer.body["message"]
    assert message in answer.body["message"]


@pytest.mark.parametrize(("pod", "message"), REFUSED[:3])
def test_the_policy_binds_only_the_collector(
    plane: tuple[ControlPlane, str, str], pod: dict[str, Any], message: str
) -> None:
    cp, _, _ = plane
    elsewhere = unique("other")
    namespace(cp, elsewhere)
    answer = create(cp, None, elsewhere, pod)  # the admin, in a namespace without Pod Security
    assert answer.status == 201, answer.body


def test_an_update_that_would_unmake_a_probe_pod_is_refused(
    plane: tuple[ControlPlane, str, str],
) -> None:
    """The policy also guards UPDATE (RBAC grants the collector no update today; this grant is
    the test's, so that the request reaches admission)."""
    cp, token, allowed = plane
    pod = probe_pod(allowed)
    pod["metadata"]["name"] = "kept"
    pod["metadata"].pop("ownerReferences")
    ok(cp.request("POST", path_of("Pod", "", allowed), pod, token=token))
    grant = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "test-patch", "namespace": allowed},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "test-patch", "namespace": allowed},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "test-patch"},
        "subjects": [
            {"kind": "ServiceAccount", "name": "flowproof-collector", "namespace": "flowproof"}
        ],
    }
    apply_all(cp, [grant, binding])

    def patched() -> Any:
        answer = cp.request(
            "PATCH",
            path_of("Pod", "kept", allowed),
            {"metadata": {"labels": {"app.kubernetes.io/managed-by": None}}},
            token=token,
            content_type="application/merge-patch+json",
        )
        return (
            answer
            if answer.status != 403 or "ValidatingAdmissionPolicy" in str(answer.body)
            else None
        )

    answer = eventually(patched, 15)
    assert answer.status in (403, 422), answer.body
    assert "app.kubernetes.io/managed-by=flowproof" in answer.body["message"]
    # The ephemeral-containers subresource is not the policy's: RBAC keeps the collector out.
    sub = cp.request(
        "PATCH",
        path_of("Pod", "kept", allowed) + "/ephemeralcontainers",
        {"spec": {"ephemeralContainers": [{"name": "e", "image": IMAGE}]}},
        token=token,
        content_type="application/strategic-merge-patch+json",
    )
    assert sub.status == 403 and "ephemeralcontainers" in sub.body["message"]


async def test_the_probe_pod_manager_creates_and_deletes_through_the_api(
    plane: tuple[ControlPlane, str, str], tmp_path: Path
) -> None:
    cp, token, allowed = plane
    ok(apply(cp, make_expectations("needs-it", allowed)))
    kubeconfig = str(cp.write_kubeconfig(tmp_path / "kubeconfig", token, "collector"))
    request = ProbePodRequest(allowed, REQUEST_LABELS)
    refused = ProbePodRequest(unique("nope"), REQUEST_LABELS)
    manager = KubernetesProbePods(
        KubeClient(load_kube_config(kubeconfig)),
        namespaces=[allowed],
        image=IMAGE,
        needed_by=lambda r: [f"{allowed}/needs-it"],
    )
    try:
        await manager([request, refused])
        assert await manager.reconcile() is True
        stored = ok(cp.request("GET", path_of("Pod", request.name, allowed)))
        [owner] = stored["metadata"]["ownerReferences"]
        fe = ok(
            cp.request(
                "GET",
                f"/apis/flowproof.dev/v1alpha1/namespaces/{allowed}/flowexpectations/needs-it",
            )
        )
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
            "FlowExpectations",
            "needs-it",
            fe["metadata"]["uid"],
            True,
        )
        assert stored["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "flowproof"
        assert stored["spec"]["automountServiceAccountToken"] is False
        assert "not in probe_pod_namespaces" in manager.problems[refused.key]
        await manager([])
        assert await manager.reconcile() is True
        gone = cp.request("GET", path_of("Pod", request.name, allowed))
        assert gone.status == 404 or gone.body["metadata"].get("deletionTimestamp")
    finally:
        await manager.client.aclose()
