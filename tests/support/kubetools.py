"""Helpers of the tests that run against the real API server (lab/controlplane.py).

Objects are written with server-side apply as the admin (`apply`), the shipped manifests are
rendered with `kubectl kustomize` (`render`), `kubectl` runs against a control plane with a
kubeconfig of one's choosing (`kubectl`), and `service_account` makes an identity bound to exactly
the rules a test gives it. Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import functools
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lab.controlplane import ApiResponse, ControlPlane

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CRD_FILE = DEPLOY / "crds" / "flowexpectations.yaml"
KUBECTL = REPO / ".venv" / "bin" / "kubectl"
FE_API = "/apis/flowproof.dev/v1alpha1"
FIELD_MANAGER = "flowproof-tests"

# kind -> (API prefix, plural, namespaced)
KINDS: dict[str, tuple[str, str, bool]] = {
    "Namespace": ("/api/v1", "namespaces", False),
    "Pod": ("/api/v1", "pods", True),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "Secret": ("/api/v1", "secrets", True),
    "Service": ("/api/v1", "services", True),
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "Node": ("/api/v1", "nodes", False),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies", True),
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "DaemonSet": ("/apis/apps/v1", "daemonsets", True),
    "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    "CustomResourceDefinition": (
        "/apis/apiextensions.k8s.io/v1",
        "customresourcedefinitions",
        False,
    ),
    "ValidatingAdmissionPolicy": (
        "/apis/admissionregistration.k8s.io/v1",
        "validatingadmissionpolicies",
        False,
    ),
    "ValidatingAdmissionPolicyBinding": (
        "/apis/admissionregistration.k8s.io/v1",
        "validatingadmissionpolicybindings",
        False,
    ),
    "FlowExpectations": (FE_API, "flowexpectations", True),
}


def unique(prefix: str) -> str:
    """A fresh name (a DNS label) for an object of one test."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def path_of(kind: str, name: str = "", namespace: str = "") -> str:
    """The API path of an object (or, without a name, of its collection)."""
    prefix, plural, namespaced = KINDS[kind]
    base = f"{prefix}/namespaces/{namespace}/{plural}" if namespaced and namespace else ""
    base = base or f"{prefix}/{plural}"
    return f"{base}/{name}" if name else base


def path_for(doc: Mapping[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    return path_of(str(doc["kind"]), str(meta["name"]), str(meta.get("namespace") or ""))


def ok(response: ApiResponse, what: str = "") -> Any:
    assert response.ok, f"{what or 'request'}: HTTP {response.status}: {response.body}"
    return response.body


def apply(cp: ControlPlane, doc: Mapping[str, Any], *, token: str | None = None) -> ApiResponse:
    """Server-side apply one object (the field manager takes over conflicts)."""
    return cp.request(
        "PATCH",
        path_for(doc),
        doc,
        token=token,
        query={"fieldManager": FIELD_MANAGER, "force": "true"},
        content_type="application/apply-patch+yaml",
    )


def apply_all(cp: ControlPlane, docs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Apply every object (namespaces and CRDs first); their stored forms."""
    first = ("Namespace", "CustomResourceDefinition")
    ordered = sorted(
        docs,
        key=lambda d: (d["kind"] not in first, first.index(d["kind"]) if d["kind"] in first else 0),
    )
    return [ok(apply(cp, d), f"apply {d['kind']} {d['metadata']['name']}") for d in ordered]


def install_crd(cp: ControlPlane) -> dict[str, Any]:
    """Apply deploy/crds/flowexpectations.yaml and wait until the API serves it."""
    crd = yaml.safe_load(CRD_FILE.read_text())
    ok(apply(cp, crd), "apply the FlowExpectations CRD")
    return wait_established(cp, crd["metadata"]["name"])


def wait_established(cp: ControlPlane, name: str, timeout: float = 30.0) -> dict[str, Any]:
    def established() -> dict[str, Any] | None:
        body = ok(cp.request("GET", path_of("CustomResourceDefinition", name)))
        conditions = {
            c["type"]: c["status"] for c in (body.get("status") or {}).get("conditions") or []
        }
        return body if conditions.get("Established") == "True" else None

    found: dict[str, Any] = eventually(established, timeout)
    return found


def eventually(check: Callable[[], T | None], timeout: float = 15.0, interval: float = 0.05) -> T:
    """The first truthy result of `check` within `timeout` seconds (AssertionError after)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except AssertionError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true within {timeout} s: {check}; last: {last}")
        time.sleep(interval)


async def until(
    check: Callable[[], T | None] | Callable[[], Awaitable[T | None]],
    within: float = 15.0,
    interval: float = 0.02,
) -> T:
    """As `eventually`, for async tests (`check` may be a coroutine function)."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true within {within} s: {check}")
        await asyncio.sleep(interval)


def kubectl(
    cp: ControlPlane,
    *args: str,
    kubeconfig: Path | None = None,
    input: str | None = None,
    check: bool = True,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run kubectl against the control plane (the admin's kubeconfig unless told another)."""
    proc = subprocess.run(
        [str(KUBECTL), f"--kubeconfig={kubeconfig or cp.kubeconfig_path}", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check:
        assert proc.returncode == 0, f"kubectl {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@functools.cache
def _rendered(target: str) -> str:
    proc = subprocess.run(
        [str(KUBECTL), "kustomize", str(DEPLOY / target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"kubectl kustomize deploy/{target}:\n{proc.stderr}"
    return proc.stdout


def render(target: str) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize deploy/<target>` renders (a fresh copy each call)."""
    return [d for d in yaml.safe_load_all(_rendered(target)) if d]


def rbac_rules(
    docs: Sequence[Mapping[str, Any]],
) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """The rules of every Role and ClusterRole in `docs`: (kind, namespace, name) -> rules."""
    return {
        (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): list(d["rules"])
        for d in docs
        if d["kind"] in ("Role", "ClusterRole")
    }


def grants(rules: Iterable[Mapping[str, Any]]) -> set[tuple[str, str, str]]:
    """Every (apiGroup, resource, verb) the rules grant."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


def rules_of(granted: Iterable[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """One rule per (apiGroup, resource, verb), sorted."""
    return [{"apiGroups": [g], "resources": [r], "verbs": [v]} for g, r, v in sorted(set(granted))]


def service_account(
    cp: ControlPlane,
    namespace: str,
    name: str,
    *,
    cluster: Iterable[tuple[str, str, str]] = (),
    namespaced: Mapping[str, Iterable[tuple[str, str, str]]] | None = None,
) -> str:
    """A ServiceAccount bound to exactly `cluster` (a ClusterRole) and, per namespace, the
    grants of `namespaced` (a Role there); its token."""
    token = cp.service_account_token(namespace, name)
    role = f"{namespace}-{name}"
    subject = [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]
    ref = {"apiGroup": "rbac.authorization.k8s.io"}
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": role},
            "rules": rules_of(cluster),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": role},
            "roleRef": {**ref, "kind": "ClusterRole", "name": role},
            "subjects": subject,
        },
    ]
    for where, granted in (namespaced or {}).items():
        cp.create_namespace(where)
        docs += [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": role, "namespace": where},
                "rules": rules_of(granted),
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": role, "namespace": where},
                "roleRef": {**ref, "kind": "Role", "name": role},
                "subjects": subject,
            },
        ]
    apply_all(cp, docs)
    return token


def namespace(cp: ControlPlane, name: str, labels: Mapping[str, str] | None = None) -> None:
    """A namespace with its `default` ServiceAccount (no controller makes one here)."""
    doc = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    if labels:
        doc["metadata"]["labels"] = dict(labels)
    ok(apply(cp, doc), f"namespace {name}")
    cp.create_service_account(name, "default")


def create_pod(cp: ControlPlane, doc: Mapping[str, Any]) -> dict[str, Any]:
    """Create a pod as a kubelet would report it: the object, then its `status` through the
    status subresource (the API ignores a status given at create). Its stored form."""
    meta = doc["metadata"]
    body = {k: v for k, v in doc.items() if k != "status"}
    created = ok(cp.request("POST", path_of("Pod", "", meta["namespace"]), body), "create pod")
    if "status" not in doc:
        return dict(created)
    return set_pod_status(cp, meta["namespace"], meta["name"], doc["status"])


def set_pod_status(
    cp: ControlPlane, namespace: str, name: str, status: Mapping[str, Any]
) -> dict[str, Any]:
    found: dict[str, Any] = ok(
        cp.request(
            "PATCH",
            path_of("Pod", name, namespace) + "/status",
            {"status": dict(status)},
            content_type="application/merge-patch+json",
        ),
        f"status of pod {namespace}/{name}",
    )
    return found


def delete(
    cp: ControlPlane, kind: str, name: str, namespace: str = "", grace: int | None = 0
) -> None:
    """Delete an object now (a pod with grace 0: no kubelet would finish a graceful delete)."""
    body = None if grace is None else {"gracePeriodSeconds": grace}
    ok(cp.request("DELETE", path_of(kind, name, namespace), body), f"delete {kind} {name}")


COLLECTOR_USER = "system:serviceaccount:flowproof:flowproof-collector"


def audited(
    cp: ControlPlane, user: str, resource: str, verb: str, *, namespace: str | None = None
) -> list[dict[str, Any]]:
    """The requests `user` made for `resource` with `verb`, as the audit log has them, oldest
    first: one entry per request (watches when they started), with its query parsed."""
    found = []
    stage = "ResponseStarted" if verb == "watch" else "ResponseComplete"
    for event in cp.audit_events(user):
        ref = event.get("objectRef") or {}
        if event.get("verb") != verb or ref.get("resource") != resource or event["stage"] != stage:
            continue
        if namespace is not None and ref.get("namespace") != namespace:
            continue
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(event["requestURI"]).query)
        found.append(
            {
                "query": {k: v[-1] for k, v in query.items()},
                "code": (event.get("responseStatus") or {}).get("code"),
                "uri": event["requestURI"],
            }
        )
    return found
