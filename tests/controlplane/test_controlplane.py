"""The test control plane is a real one: authentication, RBAC, admission, watches, compaction."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from lab.controlplane import ControlPlane, ControlPlaneError

# The first test's setup may build kube-apiserver and etcd from an empty cache (minutes);
# every call below has its own bound.
pytestmark = pytest.mark.timeout(3600)

KUBECTL = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "kubectl"
ClientFactory = Callable[..., client.ApiClient]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def eventually(check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.2) -> Any:
    """The first truthy result of `check` within `timeout` seconds, or its last failure."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except (AssertionError, ApiException):
            if time.monotonic() >= deadline:
                raise
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true within {timeout} s: {check}")
        time.sleep(interval)


def test_readyz_and_version(controlplane: ControlPlane) -> None:
    resp = controlplane.request("GET", "/readyz", query={"verbose": "1"})
    assert resp.status == 200, resp.body
    assert "[+]etcd ok" in resp.body
    assert "readyz check passed" in resp.body
    version = controlplane.request("GET", "/version")
    assert version.body["gitVersion"].startswith("v1.37."), version.body
    assert controlplane.time_to_ready is not None
    assert controlplane.url.startswith("https://127.0.0.1:")
    assert set(controlplane.pids) == {"etcd", "kube-apiserver"}


def test_namespace_with_official_client(core: client.CoreV1Api) -> None:
    name = unique("created")
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    names = {ns.metadata.name for ns in core.list_namespace().items}
    assert name in names
    assert {"default", "kube-system"} <= names


def test_unknown_token_and_anonymous_are_401(
    controlplane: ControlPlane, make_client: ClientFactory
) -> None:
    assert controlplane.request("GET", "/api/v1/namespaces", token="not-a-token").status == 401
    assert controlplane.request("GET", "/api/v1/namespaces", anonymous=True).status == 401
    with pytest.raises(ApiException) as e:
        client.CoreV1Api(make_client("not-a-token")).list_namespace()
    assert e.value.status == 401


def test_rbac_service_account_without_bindings_is_forbidden(
    controlplane: ControlPlane, make_client: ClientFactory
) -> None:
    ns, sa = unique("rbac"), "nobody"
    token = controlplane.service_account_token(ns, sa)

    review = controlplane.request(
        "POST",
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
        token=token,
    )
    assert review.status == 201, review.body
    user = review.body["status"]["userInfo"]
    assert user["username"] == f"system:serviceaccount:{ns}:{sa}"
    assert "system:serviceaccounts" in user["groups"]

    as_sa = client.CoreV1Api(make_client(token))
    with pytest.raises(ApiException) as e:
        as_sa.list_namespaced_pod(ns)
    assert e.value.status == 403
    assert f"system:serviceaccount:{ns}:{sa}" in str(e.value.body)

    # and a binding lets it in: the authorizer is RBAC, not a wall
    role = controlplane.request(
        "POST",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
        },
    )
    assert role.status == 201, role.body
    binding = controlplane.request(
        "POST",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "pod-reader"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "pod-reader",
            },
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}],
        },
    )
    assert binding.status == 201, binding.body
    pods = eventually(lambda: as_sa.list_namespaced_pod(ns))
    assert pods.items == []
    with pytest.raises(ApiException) as e:
        as_sa.list_namespaced_pod("default")  # bound in its own namespace only
    assert e.value.status == 403


def test_watch_with_bookmarks_gets_events(core: client.CoreV1Api) -> None:
    start_rv = core.list_namespace().metadata.resource_version
    name = unique("watched")
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))

    w = watch.Watch()
    seen: list[tuple[str, str]] = []
    for event in w.stream(
        core.list_namespace,
        resource_version=start_rv,
        allow_watch_bookmarks=True,
        timeout_seconds=15,
    ):
        seen.append((event["type"], event["object"].metadata.name))
        if event["object"].metadata.name == name:
            w.stop()
    assert ("ADDED", name) in seen

    # A watch-list stream: the current state, then a bookmark marking its end.
    w = watch.Watch()
    initial: set[str] = set()
    bookmark: dict[str, Any] | None = None
    for event in w.stream(
        core.list_namespace,
        send_initial_events=True,
        resource_version_match="NotOlderThan",
        allow_watch_bookmarks=True,
        timeout_seconds=15,
    ):
        if event["type"] == "BOOKMARK":
            bookmark = event["raw_object"]
            w.stop()
        else:
            initial.add(event["object"].metadata.name)
    assert bookmark is not None, "no bookmark within 15 s"
    assert bookmark["metadata"]["annotations"]["k8s.io/initial-events-end"] == "true"
    assert int(bookmark["metadata"]["resourceVersion"]) >= int(start_rv)
    assert {name, "default"} <= initial


def test_watch_from_compacted_revision_is_410_gone(
    controlplane: ControlPlane, core: client.CoreV1Api
) -> None:
    ns = unique("compact")
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    cm = core.create_namespaced_config_map(
        ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="c"), data={"v": "1"})
    )
    old_rv = cm.metadata.resource_version
    core.patch_namespaced_config_map("c", ns, {"data": {"v": "2"}})
    core.patch_namespaced_config_map("c", ns, {"data": {"v": "3"}})

    # Before compaction the old revision is still watchable.
    w = watch.Watch()
    values = []
    for event in w.stream(
        core.list_namespaced_config_map, ns, resource_version=old_rv, timeout_seconds=10
    ):
        values.append(event["object"].data["v"])
        if values[-1] == "3":
            w.stop()
    assert values == ["2", "3"]

    compacted = controlplane.compact_etcd()
    assert compacted > int(old_rv)

    with pytest.raises(ApiException) as e:  # not one event: the stream ends in 410 Gone
        list(
            watch.Watch().stream(
                core.list_namespaced_config_map, ns, resource_version=old_rv, timeout_seconds=10
            )
        )
    assert e.value.status == 410

    listed = controlplane.request(
        "GET",
        f"/api/v1/namespaces/{ns}/configmaps",
        query={"resourceVersion": old_rv, "resourceVersionMatch": "Exact"},
    )
    assert listed.status == 410, listed.body
    assert listed.body["reason"] == "Expired"

    # A watch from now on works as before.
    rv = core.list_namespaced_config_map(ns).metadata.resource_version
    core.patch_namespaced_config_map("c", ns, {"data": {"v": "4"}})
    w = watch.Watch()
    for event in w.stream(
        core.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=10
    ):
        assert event["object"].data["v"] == "4"
        w.stop()


def test_cached_watch_is_served_from_the_watch_cache_after_compaction(
    controlplane: ControlPlane, core: client.CoreV1Api
) -> None:
    """A resource in the watch cache (here namespaces) does not see an outside compaction.

    This pins down the behaviour the `uncached_resources` option exists for.
    """
    old_rv = core.list_namespace().metadata.resource_version
    name = unique("cached")
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    controlplane.compact_etcd()
    w = watch.Watch()
    seen = []
    for event in w.stream(core.list_namespace, resource_version=old_rv, timeout_seconds=10):
        seen.append(event["object"].metadata.name)
        if seen[-1] == name:
            w.stop()
    assert name in seen


def test_validating_admission_policy_is_enforced(controlplane: ControlPlane) -> None:
    policy = unique("no-forbidden-key")
    resp = controlplane.request(
        "POST",
        "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies",
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": policy},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE", "UPDATE"],
                            "resources": ["configmaps"],
                        }
                    ]
                },
                "validations": [
                    {
                        "expression": "!has(object.data) || !('forbidden' in object.data)",
                        "message": "the key 'forbidden' is not allowed",
                    }
                ],
            },
        },
    )
    assert resp.status == 201, resp.body
    resp = controlplane.request(
        "POST",
        "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings",
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": policy},
            "spec": {"policyName": policy, "validationActions": ["Deny"]},
        },
    )
    assert resp.status == 201, resp.body

    def create(data: dict[str, str]) -> Any:
        return controlplane.request(
            "POST",
            "/api/v1/namespaces/default/configmaps",
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "vap"}, "data": data},
            query={"dryRun": "All"},
        )

    denied = eventually(lambda: (r := create({"forbidden": "x"})).status == 422 and r)
    assert "the key 'forbidden' is not allowed" in denied.body["message"]
    assert create({"allowed": "x"}).status == 201
    for kind in ("validatingadmissionpolicybindings", "validatingadmissionpolicies"):
        controlplane.request("DELETE", f"/apis/admissionregistration.k8s.io/v1/{kind}/{policy}")


def test_kubectl_with_the_admin_kubeconfig(controlplane: ControlPlane) -> None:
    out = subprocess.run(
        [
            str(KUBECTL),
            f"--kubeconfig={controlplane.kubeconfig_path}",
            "get",
            "namespaces",
            "-o",
            "name",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "namespace/kube-system" in out.stdout.split()
    token = subprocess.run(
        [
            str(KUBECTL),
            f"--kubeconfig={controlplane.kubeconfig_path}",
            "create",
            "token",
            "default",
            "-n",
            "default",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # no controller manager: the "default" ServiceAccount exists only once someone creates it
    assert token.returncode != 0
    controlplane.create_service_account("default", "default")
    review = controlplane.request(
        "POST",
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
        token=controlplane.service_account_token("default", "default"),
    )
    assert review.body["status"]["userInfo"]["username"] == "system:serviceaccount:default:default"


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def test_stop_ends_both_processes_and_removes_the_workdir(
    controlplane_bin: Path, tmp_path: Path
) -> None:
    cp = ControlPlane(controlplane_bin, workdir_parent=tmp_path)
    with cp:
        pids = cp.pids
        workdir = cp.workdir
        assert cp.running
        assert _processes_mentioning(str(workdir))
    assert not workdir.exists()
    assert cp.pids == {}
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert _processes_mentioning(str(tmp_path)) == []


def test_failed_start_reports_the_log_and_cleans_up(controlplane_bin: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "etcd").symlink_to(controlplane_bin / "etcd")
    fake = bin_dir / "kube-apiserver"
    fake.write_text("#!/bin/sh\necho 'E1206 something is badly wrong' >&2\nexit 3\n")
    fake.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    cp = ControlPlane(bin_dir, workdir_parent=work, ready_timeout=30)
    with pytest.raises(ControlPlaneError) as e:
        cp.start()
    assert "something is badly wrong" in str(e.value)
    assert "exited with code 3" in str(e.value)
    assert cp.pids == {}
    assert list(work.iterdir()) == []
    assert _processes_mentioning(str(work)) == []
