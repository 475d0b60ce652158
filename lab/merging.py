"""What a change asks for: manifests, label changes and probe-pod requests merged into `Desired`.

Owns turning the lab's state and a request into the whole cluster the request asks for, and
checking the request on the way (InputError names what is wrong; nothing has changed yet). Pure:
it reads the state it is given and never saves it, nor touches the system.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from collector.core.model import NAMESPACE_NAME_LABEL
from collector.core.probepods import PROBE_POD_LABEL, PROBE_POD_PREFIX
from collector.reading.clusterpolicies import CLUSTER_POLICY_KINDS
from collector.reading.fields import (
    dns_label_problem,
    dns_subdomain_problem,
    label_key_problem,
    label_value_problem,
)
from flowproof.errors import InputError
from lab.cluster import (
    Manifests,
    PodSpec,
    cluster_policy_manifest,
    concrete_pods,
    expectations_key,
    is_dns_pod,
    json_ready,
    managed_dns_spec,
    namespace_labels,
    policy_manifest,
)
from lab.state import LabState


def is_lab_probe_pod(name: str, labels: Mapping[str, str]) -> bool:
    """A probe pod the lab made on the collector's request (by its name and label)."""
    return name.startswith(PROBE_POD_PREFIX) and labels.get(PROBE_POD_LABEL) == "true"


@dataclass
class Desired:
    """The whole cluster a change asks for."""

    namespaces: dict[str, dict[str, str]]
    pods: dict[str, PodSpec]
    policies: dict[str, dict[str, Any]]
    expectations: dict[str, dict[str, Any]]


def policy_key(doc: Mapping[str, Any]) -> str:
    """`namespace/name` of a stored NetworkPolicy manifest, `Kind/name` of a cluster policy's."""
    meta = doc.get("metadata") or {}
    if doc.get("kind", "NetworkPolicy") != "NetworkPolicy":
        return f"{doc.get('kind')}/{meta.get('name')}"
    return f"{meta.get('namespace') or 'default'}/{meta.get('name')}"


def is_cluster_policy_key(key: str) -> bool:
    """A cluster policy's key (`ClusterNetworkPolicy/name`): its first part is no namespace."""
    return key.split("/", 1)[0] in CLUSTER_POLICY_KINDS


def current(state: LabState) -> Desired:
    """The cluster the lab runs now, as a `Desired` to change."""
    pods = {
        r.key: PodSpec(
            namespace=r.namespace,
            name=r.name,
            labels=dict(r.labels),
            ports=r.container_ports,
            workload=r.workload,
            host_network=r.host_network,
            ip=r.ip,
            uid=r.uid,
            node=r.node,
            managed=r.managed,
        )
        for r in state.pods
    }
    return Desired(
        namespaces={k: dict(v) for k, v in state.namespaces.items()},
        pods=pods,
        policies={policy_key(p): p for p in state.policies},
        expectations={expectations_key(e): dict(e) for e in state.expectations},
    )


def _ensure_dns(pods: dict[str, PodSpec], previous: Mapping[str, PodSpec]) -> None:
    """Keep one cluster DNS: the manifests' kube-dns pods, else the lab's own coredns pod."""
    user = [
        s
        for s in pods.values()
        if not s.managed and is_dns_pod(s.namespace, s.labels, s.host_network)
    ]
    managed = [k for k, s in pods.items() if s.managed]
    if user:
        for key in managed:
            del pods[key]
        return
    if not managed:
        spec = next((s for s in previous.values() if s.managed), None) or managed_dns_spec()
        if spec.key in pods:
            raise InputError(f"{spec.key} is taken; the lab needs that name for its cluster DNS")
        pods[spec.key] = spec


def ensure_namespaces(desired: Desired) -> None:
    """Add every namespace a pod, policy or expectation lives in (with its default labels)."""
    wanted = {s.namespace for s in desired.pods.values()}
    wanted |= {k.split("/", 1)[0] for k in desired.policies if not is_cluster_policy_key(k)}
    wanted |= {k.split("/", 1)[0] for k in desired.expectations}
    for name in wanted:
        desired.namespaces.setdefault(name, namespace_labels(name))


def merged(state: LabState, manifests: Manifests, *, prune: bool) -> Desired:
    """The lab with the manifests applied (`prune`: and nothing else but the probe pods)."""
    previous = current(state)
    specs = concrete_pods(manifests.pods, state.settings, manifests.sources)
    if prune:
        desired = Desired(namespaces={}, pods={}, policies={}, expectations={})
        # Probe pods belong to the collector's requests, not to the manifests.
        desired.pods = {
            k: s for k, s in previous.pods.items() if is_lab_probe_pod(s.name, s.labels)
        }
    else:
        desired = current(state)
        workloads = {(p.namespace, p.workload) for p in manifests.pods if p.workload}
        desired.pods = {
            k: s for k, s in desired.pods.items() if (s.namespace, s.workload) not in workloads
        }
    for spec in specs:
        desired.pods[spec.key] = spec
    _ensure_dns(desired.pods, previous.pods)
    for name, ns in manifests.namespaces.items():
        if name in manifests.declared_namespaces or name not in desired.namespaces:
            desired.namespaces[name] = namespace_labels(name, ns.labels)
    for policy in manifests.policies:
        desired.policies[policy.key] = policy_manifest(policy)
    for cluster_policy in manifests.cluster_policies:
        desired.policies[cluster_policy.key] = cluster_policy_manifest(cluster_policy)
    for doc in manifests.expectations:
        key = expectations_key(doc)
        desired.expectations[key] = json_ready(doc, f"flowexpectations {key}")
    ensure_namespaces(desired)
    return desired


def _without_pods(desired: Desired, manifests: Manifests) -> list[str]:
    """Drop the manifests' pods and workloads from `desired`; those it did not hold."""
    missing: list[str] = []
    for pod in manifests.pods:
        if pod.workload:
            keys = [
                k
                for k, s in desired.pods.items()
                if s.namespace == pod.namespace and s.workload == pod.workload
            ]
            if not keys:
                missing.append(f"{pod.workload} in {pod.namespace}")
        else:
            keys = [pod.key] if pod.key in desired.pods else []
            if not keys:
                missing.append(f"pod {pod.key}")
        for key in keys:
            del desired.pods[key]
    return missing


def without(state: LabState, manifests: Manifests) -> tuple[Desired, list[str]]:
    """The lab without what the manifests name (a Namespace takes everything in it along), and
    what they name that the lab does not have."""
    desired = current(state)
    missing = _without_pods(desired, manifests)
    for policy in manifests.policies:
        if desired.policies.pop(policy.key, None) is None:
            missing.append(f"networkpolicy {policy.key}")
    for cluster_policy in manifests.cluster_policies:
        if desired.policies.pop(cluster_policy.key, None) is None:
            missing.append(f"{cluster_policy.kind.lower()} {cluster_policy.name}")
    for doc in manifests.expectations:
        if desired.expectations.pop(expectations_key(doc), None) is None:
            missing.append(f"flowexpectations {expectations_key(doc)}")
    for name in manifests.declared_namespaces:
        if desired.namespaces.pop(name, None) is None:
            missing.append(f"namespace {name}")
            continue
        desired.pods = {k: s for k, s in desired.pods.items() if s.namespace != name}
        desired.policies = {
            k: p for k, p in desired.policies.items() if not k.startswith(name + "/")
        }
        desired.expectations = {
            k: e for k, e in desired.expectations.items() if not k.startswith(name + "/")
        }
    ensure_namespaces(desired)
    return desired, missing


# --- label changes -------------------------------------------------------------------------------

LabelChanges = tuple[dict[str, str], list[str]]  # (labels to set, label keys to remove)


def parse_label_changes(changes: Sequence[str]) -> LabelChanges:
    """kubectl-style `k=v` (set) and `k-` (remove); InputError naming the bad one."""
    if not changes:
        raise InputError("give at least one label change: key=value or key-")
    sets: dict[str, str] = {}
    removes: list[str] = []
    for change in changes:
        if change.endswith("-") and "=" not in change:
            key = change[:-1]
            target: str | None = None
        elif "=" in change:
            key, target = change.split("=", 1)
        else:
            raise InputError(f"{change!r} is neither key=value nor key-", field="labels")
        problem = label_key_problem(key)
        if problem is not None:
            raise InputError(problem, field=f"label {key!r}")
        if target is None:
            removes.append(key)
            continue
        problem = label_value_problem(target)
        if problem is not None:
            raise InputError(problem, field=f"label {key}={target!r}")
        sets[key] = target
    return sets, removes


def parse_namespace_label_changes(name: str, changes: Sequence[str]) -> LabelChanges:
    """As `parse_label_changes`, refusing to change the namespace's own name label."""
    sets, removes = parse_label_changes(changes)
    renamed = NAMESPACE_NAME_LABEL in sets and sets[NAMESPACE_NAME_LABEL] != name
    if renamed or NAMESPACE_NAME_LABEL in removes:
        raise InputError(
            f"{NAMESPACE_NAME_LABEL} is set by the API server and cannot change", field="labels"
        )
    return sets, removes


def _relabelled(labels: Mapping[str, str], changes: LabelChanges) -> dict[str, str]:
    sets, removes = changes
    return {**{k: v for k, v in labels.items() if k not in removes}, **sets}


def render_labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "(none)"


def with_pod_labels(state: LabState, key: str, changes: LabelChanges) -> Desired:
    """The lab with the labels of pod `key` changed; InputError when there is no such pod."""
    desired = current(state)
    spec = desired.pods.get(key)
    if spec is None:
        raise InputError(f"no pod {key} in lab {state.settings.name}", field="pod")
    desired.pods[key] = dataclasses.replace(spec, labels=_relabelled(spec.labels, changes))
    return desired


def with_namespace_labels(state: LabState, name: str, changes: LabelChanges) -> Desired:
    """The lab with the labels of namespace `name` changed; InputError when it has none such."""
    desired = current(state)
    if name not in desired.namespaces:
        raise InputError(f"no namespace {name} in lab {state.settings.name}", field="namespace")
    labels = _relabelled(desired.namespaces[name], changes)
    desired.namespaces[name] = namespace_labels(name, labels)
    return desired


# --- probe pods (on the collector's request) -----------------------------------------------------


def probe_pod_requests(requests: Sequence[Any]) -> dict[str, Any]:
    """The requests (objects with `namespace`, `name`, `labels`) by pod key; InputError for one
    that is not a probe pod."""
    wanted = {f"{r.namespace}/{r.name}": r for r in requests}
    for key, request in wanted.items():
        if not is_lab_probe_pod(request.name, dict(request.labels)):
            raise InputError(f"{key} is not a probe pod request", field="probe pods")
        problems = [dns_label_problem(request.namespace), dns_subdomain_problem(request.name)]
        for label, value in dict(request.labels).items():
            problems += [label_key_problem(label), label_value_problem(value)]
        problem = next((p for p in problems if p is not None), None)
        if problem is not None:
            raise InputError(problem, field=f"probe pod {key[:120]}")
    return wanted


def with_probe_pods(state: LabState, wanted: Mapping[str, Any]) -> Desired:
    """The lab running exactly the `wanted` probe pods (others deleted, kept ones unchanged)."""
    desired = current(state)
    for key, spec in list(desired.pods.items()):
        if is_lab_probe_pod(spec.name, spec.labels) and key not in wanted:
            del desired.pods[key]
    for key, request in wanted.items():
        desired.pods.setdefault(
            key,
            PodSpec(
                namespace=request.namespace,
                name=request.name,
                labels=dict(request.labels),
                ports=(),
            ),
        )
    ensure_namespaces(desired)
    return desired
