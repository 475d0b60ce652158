"""Probe pods: the words for them, and which labels one needs to stand for a flow's `from`.

Owns the probe-pod label and name prefix, the managed-by label a cluster probe pod carries,
`ProbePodRequest` (a probe pod to create: namespace and labels, its name derived from them) and the
rule that derives its labels from a selector. Pure: creating a pod is the lab's or
`collector.cluster`'s job (DESIGN.md: owned by flowproof, never Ready, deleted afterwards).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from collector.core.model import LabelSelector, Pod, PodTarget, Snapshot

PROBE_POD_LABEL = "flowproof.dev/probe-pod"
"""Carried by every probe pod (value "true"): the planner uses such pods only as sources."""


PROBE_POD_PREFIX = "flowproof-probe-"


MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
"""Set on the probe pods a collector creates in a cluster (value "flowproof"); no request asks for it."""


@dataclass(frozen=True)
class ProbePodRequest:
    """A sidecar-free probe pod to create: it carries `labels` in `namespace` (see DESIGN.md).

    The lab creates it on request; in a cluster the collector does when allowed. Its name is
    derived from namespace and labels, so the flows planned from it keep their keys once it runs.
    """

    namespace: str
    labels: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        digest = hashlib.sha256(
            json.dumps([self.namespace, list(self.labels)]).encode()
        ).hexdigest()
        return PROBE_POD_PREFIX + digest[:10]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    def as_pod(self) -> Pod:
        """The pod as planned: no IP or node yet, so its flows cannot be probed."""
        return Pod(
            namespace=self.namespace,
            name=self.name,
            labels=self.label_map(),
            phase="Pending",
        )


def is_probe_pod(pod: Pod) -> bool:
    return pod.labels.get(PROBE_POD_LABEL) == "true"


def probe_pod_labels(selector: LabelSelector) -> dict[str, str] | None:
    """Labels a pod needs to be selected by `selector`, or None when no labels can be."""
    labels = dict(selector.match_labels)
    for req in selector.match_expressions:
        if req.key in labels:
            continue
        if req.operator == "In" and req.values:
            labels[req.key] = sorted(req.values)[0]
        elif req.operator == "Exists":
            labels[req.key] = "flowproof-probe"
    labels[PROBE_POD_LABEL] = "true"
    return labels if selector.matches(labels) else None


def probe_pod_request(
    snapshot: Snapshot, target: PodTarget, default_namespace: str
) -> ProbePodRequest | str:
    """The probe pod that stands for `target`'s pods, or why none can."""
    labels = probe_pod_labels(target.pod_selector)
    if labels is None:
        return f"no labels satisfy podSelector {target.pod_selector.describe()}"
    if target.namespace_selector is not None:
        names = sorted(
            name
            for name in snapshot.namespaces
            if target.namespace_selector.matches(snapshot.namespace_labels(name))
        )
        if not names:
            return f"no namespace matches {target.namespace_selector.describe()}"
        namespace = names[0]
    else:
        namespace = target.namespace or default_namespace
    return ProbePodRequest(namespace, tuple(sorted(labels.items())))
