"""Change tracking: what differs between two snapshots, as a dated ChangeEvent, and what it touches.

Owns `diff_snapshots` (pods, namespaces, policies of every tier, other plugins' policy objects
and expectations added, removed or changed)
and `touched_flows`, the rule for which flows a change re-verifies first: new flows, flows whose
intent, model verdict, explanation or probe parameters changed, and every flow of a pod that
was added or whose labels, IPs, node, ports or phase changed. Pure: no I/O and no clock; the caller
dates the event (`at`: when the change happened, `observed_at`: when it was seen; wall clock).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from collector.core.model import (
    ClusterNetworkPolicy,
    Expectations,
    NetworkPolicy,
    Snapshot,
    UnmodelledPolicy,
)

T = TypeVar("T")


@dataclass(frozen=True)
class ChangeEvent:
    """One new version of the snapshot and what changed since the previous one.

    `generation` counts snapshot versions from 1 (the first snapshot, `initial`). `at` dates the
    change (for manifests the newest modification time of the files that changed, never later than
    `observed_at`); the feedback latency is measured from it.
    """

    generation: int
    at: float
    observed_at: float
    initial: bool = False
    pods_added: frozenset[str] = frozenset()
    pods_removed: frozenset[str] = frozenset()
    pods_changed: frozenset[str] = frozenset()
    namespaces_added: frozenset[str] = frozenset()
    namespaces_removed: frozenset[str] = frozenset()
    namespaces_changed: frozenset[str] = frozenset()
    policies_added: frozenset[str] = frozenset()
    policies_removed: frozenset[str] = frozenset()
    policies_changed: frozenset[str] = frozenset()
    expectations_added: frozenset[str] = frozenset()
    expectations_removed: frozenset[str] = frozenset()
    expectations_changed: frozenset[str] = frozenset()

    @property
    def empty(self) -> bool:
        """Nothing changed (a file was touched or rewritten with the same meaning)."""
        return not any(
            getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("generation", "at", "observed_at", "initial")
        )

    @property
    def pods_moved(self) -> frozenset[str]:
        """Pods whose flows a change touches whatever the model says: new or changed pods."""
        return self.pods_added | self.pods_changed

    def describe(self) -> str:
        """One line for logs: `policy shop/deny-all added; pod shop/api-1 changed`."""
        if self.initial:
            return (
                f"initial snapshot: {len(self.pods_added)} pods, "
                f"{len(self.policies_added)} policies, "
                f"{len(self.expectations_added)} expectation documents"
            )
        parts: list[str] = []
        for kind in ("pod", "namespace", "policy", "expectations"):
            plural = {"pod": "pods", "namespace": "namespaces", "policy": "policies"}.get(
                kind, kind
            )
            for verb in ("added", "removed", "changed"):
                keys: frozenset[str] = getattr(self, f"{plural}_{verb}")
                if not keys:
                    continue
                shown = ", ".join(sorted(keys)[:3])
                more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
                parts.append(f"{kind} {shown}{more} {verb}")
        return "; ".join(parts) if parts else "no change"


def _diff(
    old: Mapping[str, T], new: Mapping[str, T]
) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    added = frozenset(new.keys() - old.keys())
    removed = frozenset(old.keys() - new.keys())
    changed = frozenset(k for k in new.keys() & old.keys() if new[k] != old[k])
    return added, removed, changed


Policy = NetworkPolicy | ClusterNetworkPolicy | UnmodelledPolicy


def _policies(snapshot: Snapshot) -> dict[str, Policy]:
    """NetworkPolicies (`ns/name`), cluster policies (`Kind/name`) and other plugins' policy
    objects (`Kind.group ns/name`): three key forms that never collide."""
    # `source` is where the policy was read ("file.yaml:12"): moving it in a file changes nothing.
    found: list[Policy] = [*snapshot.policies, *snapshot.cluster_policies, *snapshot.unmodelled]
    return {p.key: dataclasses.replace(p, source="") for p in found}


def _expectations(documents: Iterable[Expectations]) -> dict[str, Expectations]:
    return {d.key: dataclasses.replace(d, source="") for d in documents}


def diff_snapshots(
    old: Snapshot | None,
    new: Snapshot,
    *,
    generation: int,
    at: float,
    observed_at: float | None = None,
) -> ChangeEvent:
    """What changed from `old` to `new`; with `old` None, everything is added (`initial`)."""
    before = old if old is not None else Snapshot()
    pods = _diff({p.key: p for p in before.pods}, {p.key: p for p in new.pods})
    namespaces = _diff(
        {n: dict(ns.labels) for n, ns in before.namespaces.items()},
        {n: dict(ns.labels) for n, ns in new.namespaces.items()},
    )
    policies = _diff(_policies(before), _policies(new))
    expectations = _diff(_expectations(before.expectations), _expectations(new.expectations))
    return ChangeEvent(
        generation=generation,
        at=at,
        observed_at=at if observed_at is None else observed_at,
        initial=old is None,
        pods_added=pods[0],
        pods_removed=pods[1],
        pods_changed=pods[2],
        namespaces_added=namespaces[0],
        namespaces_removed=namespaces[1],
        namespaces_changed=namespaces[2],
        policies_added=policies[0],
        policies_removed=policies[1],
        policies_changed=policies[2],
        expectations_added=expectations[0],
        expectations_removed=expectations[1],
        expectations_changed=expectations[2],
    )


def merge_changes(first: ChangeEvent, then: ChangeEvent) -> ChangeEvent:
    """One event for two consecutive changes planned as one (the newer snapshot replaced the older
    before it was planned): every key either names, the newer generation, and the older dates, so
    the feedback latency is still measured from the first change."""
    keys = {
        f.name: getattr(first, f.name) | getattr(then, f.name)
        for f in dataclasses.fields(ChangeEvent)
        if f.name not in ("generation", "at", "observed_at", "initial")
    }
    return ChangeEvent(
        generation=then.generation,
        at=min(first.at, then.at),
        observed_at=min(first.observed_at, then.observed_at),
        initial=first.initial or then.initial,
        **keys,
    )


@dataclass(frozen=True)
class FlowFacts:
    """What the planner knows about a flow that a change can alter.

    `fingerprint` covers intent, the model's verdict with its full explanation, and the probe's
    parameters (addresses, node, kind): any difference means the flow must be verified again.
    """

    source: str  # source pod key
    destination: str  # destination pod key or address
    fingerprint: str


def touched_flows(
    change: ChangeEvent | None,
    before: Mapping[str, FlowFacts],
    after: Mapping[str, FlowFacts],
) -> frozenset[str]:
    """Keys of `after` that a change touches (flows in `before` only have disappeared).

    A policy or namespace change is followed through the model: a flow whose verdict or explanation
    did not change cannot be affected by it in the model, so it keeps its place in the cadence.
    """
    moved = change.pods_moved if change is not None else frozenset()
    touched = set()
    for key, facts in after.items():
        old = before.get(key)
        if (
            old is None
            or old.fingerprint != facts.fingerprint
            or facts.source in moved
            or facts.destination in moved
        ):
            touched.add(key)
    return frozenset(touched)


__all__ = ["ChangeEvent", "FlowFacts", "diff_snapshots", "merge_changes", "touched_flows"]
