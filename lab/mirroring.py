"""The lab mirrored into an API server of its own (`lab up --apiserver`): the API is the truth.

Owns the lab's control plane (etcd and kube-apiserver from lab/controlplane.py, run by the lab's
supervisor and recorded like every lab process), what it is given at start (the FlowExpectations
CRD, the collector's ServiceAccount bound to exactly the RBAC in deploy/, the probe-pod admission
policy, one Node per lab node), and the two directions between the lab and the API:

- `push`: a lab command (`apply`, `delete`, `label`) writes what it asks for into the API, as
  kubectl would;
- `sync`: the lab follows the API, as a kubelet, a scheduler and the few controllers the lab's
  pods need would: every Pod is run (a pod without a node is bound to one) and its `status`
  (phase, podIP, hostIP, readiness) is written through the status subresource; a pod being
  deleted is stopped, then removed (grace 0, as a kubelet confirms); a namespace being deleted is
  emptied and finalized; every namespace gets its `default` ServiceAccount; the policies are
  enforced by lab/enforcing.py.

A command pushes and syncs under the lab's lock before it returns; the mirror process (`python -m
lab.mirroring`, started by the supervisor) syncs on every change its watches see, so a `kubectl`
change (label a pod, delete a policy) reaches the lab's enforcement, as the same change reaches the
collector through its own watch. The API is reached only through collector.kube.ApiObjects.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import yaml

from collector.core.probepods import PROBE_POD_LABEL
from collector.kube import ApiObjects, KubeApiError, load_kube_config
from collector.reading.fields import Where
from collector.reading.objects import pod_from_dict, policy_from_dict
from flowproof.errors import FlowproofError, InputError
from lab import changing, system, teardown
from lab import loop as looping
from lab.cluster import (
    Manifests,
    PodSpec,
    expectations_key,
    namespace_labels,
    parse_node_name,
    policy_manifest,
)
from lab.config import AddressPlan, LabSettings, Names
from lab.controlplane import ControlPlane, ControlPlaneError, binaries
from lab.errors import LabError, NoSuchLabError
from lab.loop import LoopSettings
from lab.merging import Desired, merged
from lab.processes import exec_process, start_loop, supervisor_socket
from lab.report import ChangeReport
from lab.state import (
    APISERVER_ROLES,
    ApiServerRecord,
    LabPaths,
    LabState,
    PodRecord,
    ProcessRecord,
)

log = logging.getLogger(__name__)

REPO: Final = Path(__file__).resolve().parents[1]
DEPLOY: Final = REPO / "deploy"
FIELD_MANAGER: Final = "flowproof-lab"
MIRROR_ROLE: Final = APISERVER_ROLES[2]
WORKLOAD_ANNOTATION: Final = "flowproof.dev/workload"
PROTECTED_NAMESPACES: Final = frozenset(
    {"default", "kube-system", "kube-public", "kube-node-lease", "flowproof"}
)
"""Namespaces a lab command never deletes (the API server's own, and flowproof's)."""
COLLECTOR_TOKEN_SECONDS: Final = 365 * 24 * 3600
RESYNC_SECONDS: Final = 30.0
DEBOUNCE_SECONDS: Final = 0.02
WATCH_SECONDS: Final = 300

# kind -> (API prefix, plural, namespaced): the kinds the lab writes.
API_PATHS: Final[Mapping[str, tuple[str, str, bool]]] = {
    "Namespace": ("/api/v1", "namespaces", False),
    "Pod": ("/api/v1", "pods", True),
    "Node": ("/api/v1", "nodes", False),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "Secret": ("/api/v1", "secrets", True),
    "Service": ("/api/v1", "services", True),
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies", True),
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "DaemonSet": ("/apis/apps/v1", "daemonsets", True),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets", True),
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
    "FlowExpectations": ("/apis/flowproof.dev/v1alpha1", "flowexpectations", True),
}
# What an emptied namespace is emptied of (the namespace controller's job; no controller runs).
NAMESPACED_CONTENT: Final = (
    "Pod",
    "NetworkPolicy",
    "FlowExpectations",
    "ConfigMap",
    "Secret",
    "Service",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "Deployment",
    "DaemonSet",
)


def api_path(kind: str, name: str = "", namespace: str = "") -> str:
    """The API path of an object (without a name: of its collection, in `namespace` if given)."""
    prefix, plural, namespaced = API_PATHS[kind]
    base = f"{prefix}/namespaces/{namespace}/{plural}" if namespaced and namespace else ""
    base = base or f"{prefix}/{plural}"
    return f"{base}/{name}" if name else base


def path_for(doc: Mapping[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    return api_path(str(doc["kind"]), str(meta["name"]), str(meta.get("namespace") or ""))


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _key(obj: Mapping[str, Any]) -> str:
    meta = _meta(obj)
    return f"{meta.get('namespace') or ''}/{meta.get('name') or ''}".lstrip("/")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ApiServerOptions:
    """How `lab up --apiserver` runs the lab's API server and the collector against it."""

    bin_dir: str = ""
    """kube-apiserver and etcd; empty: $FLOWPROOF_CONTROLPLANE_BIN, else the build script's."""
    probe_pod_namespaces: tuple[str, ...] | None = None
    """Where the collector may create probe pods; None: every namespace the manifests name but
    kube-system."""
    expectations_configmaps: bool = False
    """Also bind the ConfigMap-expectations ClusterRole and have the collector read them."""


def client(record: ApiServerRecord) -> ApiObjects:
    """The lab's admin client of its API server."""
    return ApiObjects(load_kube_config(record.admin_kubeconfig))


def require(state: LabState) -> ApiServerRecord:
    if state.apiserver is None:
        raise LabError(f"lab {state.settings.name} has no API server (started without --apiserver)")
    return state.apiserver


# --- the control plane, run by the lab's supervisor -----------------------------------------------


@dataclass
class _Supervised:
    """A control-plane process the lab's supervisor runs (lab/controlplane.py's RunningProcess)."""

    name: str
    record: ProcessRecord
    log_path: Path
    forget: Callable[[ProcessRecord], None]

    @property
    def pid(self) -> int:
        return self.record.pid

    def alive(self) -> bool:
        return system.is_running(self.record)

    def stop(self, timeout: float) -> None:
        left = system.stop_processes([self.record], timeout)
        if not left:
            self.forget(self.record)

    def failure(self, what: str) -> ControlPlaneError:
        state = "still running" if self.alive() else "exited"
        tail = looping.log_tail(self.log_path, 40)
        return ControlPlaneError(f"{self.name} {what} ({state}); end of {self.log_path}:\n{tail}")


def start_control_plane(
    paths: LabPaths, state: LabState, bin_dir: Path, options: ApiServerOptions
) -> ControlPlane:
    """etcd and kube-apiserver in `<lab>/apiserver`, run by the supervisor; ready when returned."""
    socket = supervisor_socket(paths, state)
    cgroup = state.settings.names.infra_cgroup(state.settings.cgroup_driver)

    def forget(record: ProcessRecord) -> None:
        state.processes = [p for p in state.processes if p.pid != record.pid]
        paths.save(state)

    def launch(name: str, argv: Sequence[str], log_path: Path, cwd: Path) -> _Supervised:
        record = exec_process(socket, name, argv, cgroup, str(log_path))
        state.processes.append(record)
        paths.save(state)
        return _Supervised(name, record, log_path, forget)

    plane = ControlPlane(
        bin_dir,
        workdir=paths.root / "apiserver",
        launcher=launch,
        pick_ports=looping.free_ports,
        die_with_parent=False,
    )
    plane.start()
    state.apiserver = ApiServerRecord(
        directory=str(plane.workdir),
        url=plane.url,
        apiserver_port=plane.apiserver_port,
        etcd_client_port=plane.etcd_client_port,
        etcd_peer_port=plane.etcd_peer_port,
        probe_pod_namespaces=list(options.probe_pod_namespaces or ()),
        expectations_configmaps=options.expectations_configmaps,
    )
    paths.save(state)
    return plane


def _deploy_docs(relative: str, namespace: str | None = None) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / relative).read_text()) if d]
    if namespace is not None:
        for doc in docs:
            if API_PATHS[doc["kind"]][2]:
                doc["metadata"]["namespace"] = namespace
    return docs


def bootstrap(plane: ControlPlane, state: LabState, api: ApiObjects) -> None:
    """What the lab's API server is given before any pod: the CRD, the collector's identity and
    RBAC exactly as deploy/ ships them, the probe-pod admission policy, the lab's Nodes."""
    record = require(state)
    docs = _deploy_docs("crds/flowexpectations.yaml")
    docs += _deploy_docs("base/namespace.yaml")
    docs += [
        d
        for d in _deploy_docs("base/collector.yaml", "flowproof")
        if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding")
    ]
    docs += _deploy_docs("overlays/probe-pods/admission-policy.yaml")
    for where in record.probe_pod_namespaces:
        docs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": where}})
        docs += _deploy_docs("overlays/probe-pods/role/role.yaml", where)
    if record.expectations_configmaps:
        docs += _deploy_docs("overlays/configmap-expectations/rbac.yaml")
    for doc in docs:
        api.apply(path_for(doc), doc, field_manager=FIELD_MANAGER)
    _wait_established(api, "flowexpectations.flowproof.dev")
    _nodes(state, api)
    for doc in docs:
        if doc["kind"] == "Namespace":
            _default_service_account(api, doc["metadata"]["name"])
    token = plane.service_account_token(
        "flowproof", "flowproof-collector", create=False, expiration_seconds=COLLECTOR_TOKEN_SECONDS
    )
    plane.write_kubeconfig(Path(record.collector_kubeconfig), token, "flowproof-collector")


def _wait_established(api: ApiObjects, name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        crd = api.get(api_path("CustomResourceDefinition", name)) or {}
        conditions = (crd.get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions):
            return
        if time.monotonic() > deadline:
            raise LabError(f"the CRD {name} is not served after {timeout:g} s")
        time.sleep(0.05)


def _nodes(state: LabState, api: ApiObjects) -> None:
    """One Node per lab node, Ready, its address the node's bridge address."""
    plan = AddressPlan(state.settings)
    for n in range(1, state.settings.nodes + 1):
        name = Names.node_name(n)
        subnet = str(plan.node_subnet(n))
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
            },
            "spec": {"podCIDR": subnet, "podCIDRs": [subnet]},
        }
        api.apply(path_for(node), node, field_manager=FIELD_MANAGER)
        now = _now()
        status = {
            "addresses": [
                {"type": "InternalIP", "address": plan.gateway(n)},
                {"type": "Hostname", "address": name},
            ],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "a flowproof lab node (a network namespace)",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
            "capacity": {"pods": "110", "cpu": "2", "memory": "4Gi"},
            "allocatable": {"pods": "110", "cpu": "2", "memory": "4Gi"},
        }
        api.request(
            "PATCH",
            api_path("Node", name) + "/status",
            {"status": status},
            content_type="application/merge-patch+json",
        )


def _default_service_account(api: ApiObjects, namespace: str) -> None:
    """The namespace's `default` ServiceAccount (the ServiceAccount admission plugin wants it
    before a pod is made there; no controller makes it here)."""
    body = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}
    try:
        api.request("POST", api_path("ServiceAccount", "", namespace), body)
    except KubeApiError as exc:
        if exc.status not in (409, 404, 403):  # exists; namespace gone or being deleted
            raise


# --- the API as the lab sees it -------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterView:
    """One fresh read of everything the lab mirrors."""

    namespaces: list[dict[str, Any]]
    pods: list[dict[str, Any]]
    policies: list[dict[str, Any]]
    expectations: list[dict[str, Any]]


def read_cluster(api: ApiObjects) -> ClusterView:
    """Consistent lists (from etcd or a watch cache that has caught up), never a watch's view."""
    namespaces, _ = api.list(api_path("Namespace"))
    pods, _ = api.list(api_path("Pod"))
    policies, _ = api.list(api_path("NetworkPolicy"))
    try:
        expectations, _ = api.list(api_path("FlowExpectations"))
    except KubeApiError as exc:
        if exc.status != 404:
            raise
        expectations = []
    return ClusterView(namespaces, pods, policies, expectations)


def _terminating(obj: Mapping[str, Any]) -> bool:
    return bool(_meta(obj).get("deletionTimestamp"))


@dataclass
class Reading:
    """What the API asks of the lab, and what in it the lab cannot run (with why)."""

    desired: Desired
    problems: dict[str, str] = field(default_factory=dict)


def desired_from(state: LabState, view: ClusterView) -> Reading:
    """The lab the API describes: its live namespaces, pods, policies and expectations."""
    live = {
        str(_meta(ns).get("name")): {
            str(k): str(v) for k, v in (_meta(ns).get("labels") or {}).items()
        }
        for ns in view.namespaces
        if not _terminating(ns)
    }
    reading = Reading(
        Desired(
            namespaces={name: namespace_labels(name, labels) for name, labels in live.items()},
            pods={},
            policies={},
            expectations={},
        )
    )
    plan = AddressPlan(state.settings)
    taken: dict[str, str] = {}
    for obj in view.pods:
        key = _key(obj)
        meta = _meta(obj)
        if meta.get("namespace") not in live or _terminating(obj):
            continue
        if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        try:
            spec = _pod_spec(state.settings, plan, obj)
        except InputError as exc:
            reading.problems[f"pod {key}"] = str(exc)
            continue
        if spec.ip is not None and not spec.host_network:
            if spec.ip in taken:
                reading.problems[f"pod {key}"] = (
                    f"{spec.ip} is already the address of {taken[spec.ip]}"
                )
                continue
            taken[spec.ip] = key
        reading.desired.pods[key] = spec
    for obj in view.policies:
        key = _key(obj)
        if _meta(obj).get("namespace") not in live:
            continue
        try:
            policy = policy_from_dict(obj, Where(file=f"api:networkpolicies/{key}"))
        except InputError as exc:
            reading.problems[f"networkpolicy {key}"] = str(exc)
            continue
        reading.desired.policies[policy.key] = policy_manifest(policy)
    for obj in view.expectations:
        if _meta(obj).get("namespace") not in live:
            continue
        doc = _expectations_doc(obj)
        reading.desired.expectations[expectations_key(doc)] = doc
    return reading


def _pod_spec(settings: LabSettings, plan: AddressPlan, obj: Mapping[str, Any]) -> PodSpec:
    """One API pod as the lab runs it: its uid, node and address are the API's."""
    meta = _meta(obj)
    key = _key(obj)
    where = Where(file=f"api:pods/{key}")
    pod = pod_from_dict(obj, where)
    node_name = (obj.get("spec") or {}).get("nodeName") or ""
    node = parse_node_name(node_name, settings, where, key) if node_name else None
    ip = pod.ips[0] if pod.ips else None
    if ip is not None and not pod.host_network:
        on = plan.node_of(ip)
        if on is None or ip not in plan.pod_addresses(on) or (node and node != on):
            raise InputError(f"status.podIP {ip} is not an address the lab gives this pod")
    annotations = meta.get("annotations") or {}
    return PodSpec(
        namespace=pod.namespace,
        name=pod.name,
        labels=dict(pod.labels),
        ports=pod.ports,
        workload=annotations.get(WORKLOAD_ANNOTATION),
        host_network=pod.host_network,
        ip=None if pod.host_network else ip,
        uid=str(meta.get("uid") or "") or None,
        node=node,
    )


def _expectations_doc(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = _meta(obj)
    return {
        "apiVersion": obj.get("apiVersion", "flowproof.dev/v1alpha1"),
        "kind": "FlowExpectations",
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
        "spec": obj.get("spec"),
    }


# --- the lab follows the API ----------------------------------------------------------------------


def sync(paths: LabPaths, state: LabState, api: ApiObjects) -> ChangeReport:
    """Make the lab what the API says, then write back what a kubelet would (under the lock)."""
    view = read_cluster(api)
    known = set(state.namespaces)
    reading = desired_from(state, view)
    for what, why in sorted(reading.problems.items()):
        log.warning("%s is not run by the lab: %s", what, why)
    report = changing.reconcile(paths, state, reading.desired)
    for name in sorted(set(reading.desired.namespaces) - known):
        _default_service_account(api, name)
    _write_back(state, api, view)
    _finish_namespaces(api, view)
    report.notes += [f"not run: {what}: {why}" for what, why in sorted(reading.problems.items())]
    return report


def _write_back(state: LabState, api: ApiObjects, view: ClusterView) -> None:
    """Bind the pods the lab placed, write their status, confirm the deletions the lab did."""
    by_key = {_key(p): p for p in view.pods}
    plan = AddressPlan(state.settings)
    running = {r.key: r for r in state.pods}
    for key, record in running.items():
        obj = by_key.get(key)
        if obj is None or str(_meta(obj).get("uid")) != record.uid:
            continue  # not the API's pod (yet): it comes with the next sync
        namespace, name = record.namespace, record.name
        if not (obj.get("spec") or {}).get("nodeName"):
            binding = {
                "apiVersion": "v1",
                "kind": "Binding",
                "metadata": {"name": name},
                "target": {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "name": Names.node_name(record.node),
                },
            }
            _quietly(api.request, "POST", api_path("Pod", name, namespace) + "/binding", binding)
        wanted = pod_status(record, obj, plan.gateway(record.node))
        if _status_digest(obj.get("status") or {}) != _status_digest(wanted):
            _quietly(
                api.request,
                "PATCH",
                api_path("Pod", name, namespace) + "/status",
                {"status": wanted},
                content_type="application/merge-patch+json",
            )
    for key, obj in by_key.items():
        if _terminating(obj) and key not in running:
            meta = _meta(obj)
            path = api_path("Pod", str(meta["name"]), str(meta["namespace"]))
            _quietly(api.delete, path, uid=str(meta.get("uid")), grace_period_seconds=0)


def _quietly(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """A write-back the next sync repeats if it fails now (the pod changed or went meanwhile)."""
    try:
        call(*args, **kwargs)
    except KubeApiError as exc:
        if exc.status not in (404, 409, 422):
            raise
        log.debug("write-back %s: %s", args[:2], exc)


def pod_status(record: PodRecord, obj: Mapping[str, Any], host_ip: str) -> dict[str, Any]:
    """The status a kubelet reports for a lab pod that runs: its address, its node's, Ready
    (never for a probe pod: nobody sets its readiness gate)."""
    now = _now()
    ready = "False" if record.labels.get(PROBE_POD_LABEL) == "true" else "True"
    containers = (obj.get("spec") or {}).get("containers") or [{"name": "app", "image": ""}]
    started = str((obj.get("status") or {}).get("startTime") or now)
    return {
        "phase": "Running",
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "podIP": record.ip,
        "podIPs": [{"ip": record.ip}],
        "startTime": started,
        "conditions": [
            {"type": kind, "status": status, "lastTransitionTime": started}
            for kind, status in (
                ("PodReadyToStartContainers", "True"),
                ("Initialized", "True"),
                ("Ready", ready),
                ("ContainersReady", ready),
                ("PodScheduled", "True"),
            )
        ],
        "containerStatuses": [
            {
                "name": c.get("name", "app"),
                "image": c.get("image", ""),
                "imageID": "",
                "containerID": f"containerd://{record.container_id}",
                "ready": ready == "True",
                "started": True,
                "restartCount": 0,
                "state": {"running": {"startedAt": started}},
            }
            for c in containers
        ],
    }


def _status_digest(status: Mapping[str, Any]) -> tuple[Any, ...]:
    """The parts of a pod's status the lab writes and others read (times left out)."""
    conditions = {str(c.get("type")): str(c.get("status")) for c in status.get("conditions") or []}
    return (
        status.get("phase"),
        status.get("podIP"),
        status.get("hostIP"),
        conditions.get("Ready"),
        tuple(
            sorted(
                (str(s.get("name")), s.get("containerID"))
                for s in status.get("containerStatuses") or []
            )
        ),
    )


def _finish_namespaces(api: ApiObjects, view: ClusterView) -> None:
    """Empty every namespace being deleted, then finalize it (the namespace controller's job)."""
    for ns in view.namespaces:
        if not _terminating(ns):
            continue
        name = str(_meta(ns).get("name"))
        left = 0
        for kind in NAMESPACED_CONTENT:
            try:
                items, _ = api.list(api_path(kind, "", name))
            except KubeApiError as exc:
                if exc.status in (403, 404):
                    continue
                raise
            for item in items:
                meta = _meta(item)
                if kind == "Pod" and not _terminating(item):
                    # Stopped by the lab at the next sync, then deleted for good.
                    _quietly(api.delete, api_path(kind, str(meta["name"]), name))
                    left += 1
                elif kind != "Pod":
                    _quietly(api.delete, api_path(kind, str(meta["name"]), name))
                else:
                    left += 1
        if left:
            continue
        body = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name},
            "spec": {"finalizers": []},
        }
        _quietly(api.request, "PUT", api_path("Namespace", name) + "/finalize", body)


# --- lab commands write into the API ----------------------------------------------------------------


def push(api: ApiObjects, state: LabState, desired: Desired) -> None:
    """Make the API hold what a lab command asks for (`desired`), as kubectl would write it."""
    view = read_cluster(api)
    have_ns = {str(_meta(n)["name"]): n for n in view.namespaces if not _terminating(n)}
    for name, labels in sorted(desired.namespaces.items()):
        current = have_ns.get(name)
        if current is None:
            body = {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "labels": labels},
            }
            api.apply(path_for(body), body, field_manager=FIELD_MANAGER)
            _default_service_account(api, name)
        else:
            _patch_labels(
                api, api_path("Namespace", name), _meta(current).get("labels") or {}, labels
            )
    pods = {_key(p): p for p in view.pods if not _terminating(p)}
    for key, obj in sorted(pods.items()):
        spec = desired.pods.get(key)
        if spec is None or _replaced(obj, spec):
            meta = _meta(obj)
            _quietly(api.delete, api_path("Pod", str(meta["name"]), str(meta["namespace"])))
    accounts: set[str] = set()
    for key, spec in sorted(desired.pods.items()):
        found = pods.get(key)
        if found is None or _replaced(found, spec):
            if spec.namespace not in accounts:
                _default_service_account(api, spec.namespace)
                accounts.add(spec.namespace)
            _create_pod(api, state, spec)
        else:
            _patch_labels(
                api,
                api_path("Pod", spec.name, spec.namespace),
                _meta(found).get("labels") or {},
                spec.labels,
            )
    _follow(api, "NetworkPolicy", view.policies, desired.policies, _policy_form)
    expectations = {}
    for key, doc in desired.expectations.items():
        normal = _expectations_doc(doc)
        normal["metadata"]["namespace"] = key.partition("/")[0]
        expectations[key] = normal
    _follow(api, "FlowExpectations", view.expectations, expectations, _expectations_doc)
    for name in sorted(set(have_ns) - set(desired.namespaces) - PROTECTED_NAMESPACES):
        _quietly(api.delete, api_path("Namespace", name))


def _patch_labels(
    api: ApiObjects, path: str, current: Mapping[str, Any], wanted: Mapping[str, str]
) -> None:
    change: dict[str, str | None] = {k: v for k, v in wanted.items() if current.get(k) != v}
    change |= {str(k): None for k in current if k not in wanted}
    if change:
        api.request(
            "PATCH",
            path,
            {"metadata": {"labels": change}},
            content_type="application/merge-patch+json",
        )


def _replaced(obj: Mapping[str, Any], spec: PodSpec) -> bool:
    """Must the API's pod be made anew for `spec` (what a pod spec cannot change)?"""
    pod = pod_from_dict(obj, Where(file=f"api:pods/{_key(obj)}"))
    node = (obj.get("spec") or {}).get("nodeName") or ""
    if pod.ports != spec.ports or pod.host_network != spec.host_network:
        return True
    if spec.node is not None and node and node != Names.node_name(spec.node):
        return True
    return spec.ip is not None and bool(pod.ips) and pod.ips[0] != spec.ip


def _create_pod(api: ApiObjects, state: LabState, spec: PodSpec) -> None:
    ports = [
        {"containerPort": p.port, "protocol": p.protocol, **({"name": p.name} if p.name else {})}
        for p in spec.ports
    ]
    container: dict[str, Any] = {"name": "app", "image": "flowproof/podserver"}
    if ports:
        container["ports"] = ports
    node = spec.node
    if node is None and spec.ip is not None:
        node = AddressPlan(state.settings).node_of(spec.ip)
    pod_spec: dict[str, Any] = {"containers": [container], "automountServiceAccountToken": False}
    if node is not None:
        pod_spec["nodeName"] = Names.node_name(node)
    if spec.host_network:
        pod_spec["hostNetwork"] = True
    metadata: dict[str, Any] = {
        "name": spec.name,
        "namespace": spec.namespace,
        "labels": dict(spec.labels),
    }
    if spec.workload:
        metadata["annotations"] = {WORKLOAD_ANNOTATION: spec.workload}
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}
    api.request("POST", api_path("Pod", "", spec.namespace), body)
    if spec.ip is not None and not spec.host_network:
        # The manifest gave its address: the lab keeps it (as it does without an API server).
        status = {"podIP": spec.ip, "podIPs": [{"ip": spec.ip}]}
        api.request(
            "PATCH",
            api_path("Pod", spec.name, spec.namespace) + "/status",
            {"status": status},
            content_type="application/merge-patch+json",
        )


def _policy_form(obj: Mapping[str, Any]) -> dict[str, Any]:
    return policy_manifest(policy_from_dict(obj, Where(file=f"api:networkpolicies/{_key(obj)}")))


def _follow(
    api: ApiObjects,
    kind: str,
    current: Sequence[Mapping[str, Any]],
    wanted: Mapping[str, Mapping[str, Any]],
    form: Callable[[Mapping[str, Any]], dict[str, Any]],
) -> None:
    """Apply each wanted object that the API lacks or holds otherwise; delete the others."""
    have: dict[str, dict[str, Any]] = {}
    for obj in current:
        if _terminating(obj):
            continue
        try:
            have[_key(obj)] = form(obj)
        except InputError:
            have[_key(obj)] = {}
    for key, doc in sorted(wanted.items()):
        if have.get(key) != doc:
            api.apply(path_for(doc), doc, field_manager=FIELD_MANAGER)
    for key in sorted(set(have) - set(wanted)):
        namespace, _, name = key.partition("/")
        _quietly(api.delete, api_path(kind, name, namespace))


def change(paths: LabPaths, state: LabState, desired: Desired) -> ChangeReport:
    """A lab command on a lab with an API server: write it into the API, then follow the API."""
    with client(require(state)) as api:
        push(api, state, desired)
        return sync(paths, state, api)


# --- up --------------------------------------------------------------------------------------------


def up(
    paths: LabPaths,
    manifests: Manifests,
    settings: LabSettings,
    loop: LoopSettings | None,
    options: ApiServerOptions,
) -> ChangeReport:
    """Build the lab with an API server of its own holding its cluster; with `loop`, the
    collector runs against that API server as in a cluster."""
    started = time.monotonic()
    bin_dir = binaries(options.bin_dir or None)  # first: a first build takes minutes
    if options.probe_pod_namespaces is None:
        named = {p.namespace for p in manifests.pods} | set(manifests.namespaces)
        named |= {p.namespace for p in manifests.policies}
        options = dataclasses.replace(
            options, probe_pod_namespaces=tuple(sorted(named - {"kube-system", "flowproof"}))
        )
    changing.up(paths, Manifests(), settings, None)  # the network, the supervisor, nothing else
    try:
        with changing.changing(paths) as state:
            plane = start_control_plane(paths, state, bin_dir, options)
            with client(require(state)) as api:
                bootstrap(plane, state, api)
                push(api, state, merged(state, manifests, prune=False))
                report = sync(paths, state, api)
            _start_mirror(paths, state)
            if loop is not None:
                start_loop(paths, state, loop)
                report.notes.append(
                    f"loop: collector {state.loop.url if state.loop else '?'} on the lab's API "
                    f"server, {settings.nodes} agents connected"
                )
    except BaseException:
        if paths.exists():
            teardown.down(paths)
        raise
    report.notes.append(
        f"API server {require(state).url}; kubectl --kubeconfig {require(state).admin_kubeconfig}"
    )
    report.seconds = time.monotonic() - started
    return report


def _start_mirror(paths: LabPaths, state: LabState) -> None:
    argv = [
        sys.executable,
        "-m",
        "lab.mirroring",
        "--state-dir",
        str(paths.state_dir),
        "--name",
        paths.name,
    ]
    cgroup = state.settings.names.infra_cgroup(state.settings.cgroup_driver)
    record = exec_process(
        supervisor_socket(paths, state),
        MIRROR_ROLE,
        argv,
        cgroup,
        str(paths.log_dir / "mirror.log"),
        looping.child_environment(),
    )
    state.processes.append(record)
    paths.save(state)


# --- the mirror process ---------------------------------------------------------------------------


class _Watches:
    """One thread per mirrored resource: list, then watch; any change sets `changed`."""

    def __init__(self, api: ApiObjects, changed: threading.Event) -> None:
        self.api = api
        self.changed = changed

    def start(self) -> None:
        for kind in ("Namespace", "Pod", "NetworkPolicy", "FlowExpectations"):
            threading.Thread(
                target=self._watch, args=(kind,), name=f"watch-{kind}", daemon=True
            ).start()

    def _watch(self, kind: str) -> None:
        path = api_path(kind)
        while True:
            try:
                _, version = self.api.list(path)
                self.changed.set()
                while True:  # watch again from the newest version after each timeout
                    for event, obj in self.api.watch(path, version, timeout_seconds=WATCH_SECONDS):
                        if event != "BOOKMARK":
                            self.changed.set()
                        version = str(_meta(obj).get("resourceVersion") or version)
            except KubeApiError as exc:
                if exc.status != 410:  # 410: the version is gone; list again at once
                    log.warning("watching %s: %s (again in 1 s)", path, exc)
                    time.sleep(1.0)


def run_mirror(paths: LabPaths) -> int:
    """Follow the API until the lab is gone (the supervisor runs this as the `mirror` role)."""
    state = paths.load()
    changed = threading.Event()
    with client(require(state)) as api:
        _Watches(api, changed).start()
        failures = 0
        while True:
            changed.wait(RESYNC_SECONDS)
            if not paths.exists():
                log.info("the lab's state is gone: the mirror stops")
                return 0
            time.sleep(DEBOUNCE_SECONDS)  # a burst of events: one sync
            changed.clear()
            try:
                with changing.changing(paths) as state:
                    report = sync(paths, state, api)
                failures = 0
                if report.created or report.deleted or report.updated or report.policies:
                    log.info("synced: %s", "; ".join(report.lines()))
            except NoSuchLabError:
                return 0
            except (FlowproofError, KubeApiError, OSError) as exc:
                failures += 1
                log.warning("sync failed (%d in a row; again soon): %s", failures, exc)
                time.sleep(min(5.0, 0.2 * 2**failures))
                changed.set()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.mirroring")
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run_mirror(LabPaths(args.state_dir, args.name))


if __name__ == "__main__":
    sys.exit(main())
