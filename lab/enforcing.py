"""Enforcement at a change: compile the policies, then apply what changed now or queue it.

Owns the enforcement input (the state's pods, namespaces, policies and faults, the policies read
back by the collector's own reader), the generations (`generation` counts compiled changes,
`enforced_generation` what the kernel has) and the queue of lagged changes the supervisor
applies when they fall due. It never writes nft text itself (lab/enforcement.py compiles,
lab/applying.py applies).
"""

from __future__ import annotations

import time

from collector.core.model import ClusterNetworkPolicy, NetworkPolicy
from collector.reading.clusterpolicies import cluster_policy_from_dict
from collector.reading.fields import Where
from collector.reading.objects import policy_from_dict
from lab.applying import apply_rulesets
from lab.cluster import is_dns_pod
from lab.enforcement import EnforcementInput, compile_rulesets, digest
from lab.merging import policy_key
from lab.processes import wake_supervisor
from lab.report import ChangeReport
from lab.state import LabPaths, LabState, PendingApply


def load_policies(state: LabState) -> list[NetworkPolicy]:
    """The stored NetworkPolicy manifests as model policies (the collector's own reader)."""
    return [
        policy_from_dict(doc, Where(file=f"lab:networkpolicies/{policy_key(doc)}"))
        for doc in state.policies
        if doc.get("kind", "NetworkPolicy") == "NetworkPolicy"
    ]


def load_cluster_policies(state: LabState) -> list[ClusterNetworkPolicy]:
    """The stored cluster policy manifests (ClusterNetworkPolicy and the v1alpha1 kinds)."""
    return [
        cluster_policy_from_dict(doc, Where(file=f"lab:{policy_key(doc)}"))
        for doc in state.policies
        if doc.get("kind", "NetworkPolicy") != "NetworkPolicy"
    ]


def enforcement_input(state: LabState) -> EnforcementInput:
    pods = [r.to_pod() for r in state.pods]
    return EnforcementInput(
        pods=pods,
        namespaces=state.namespaces,
        policies=load_policies(state),
        cluster_policies=load_cluster_policies(state),
        faults=state.faults,
        dns_service_ip=state.settings.dns_service_ip,
        dns_backends=[
            r.ip for r in state.pods if is_dns_pod(r.namespace, r.labels, r.host_network)
        ],
    )


def enforce(paths: LabPaths, state: LabState, report: ChangeReport, *, flush: bool = False) -> None:
    """Compile the policies; apply what changed now, or queue it when the lag fault is on."""
    started = time.monotonic()
    rulesets = compile_rulesets(enforcement_input(state))
    delta = {k: t for k, t in rulesets.items() if state.desired.get(k) != digest(t)}
    if delta:
        state.generation += 1
    state.desired = {k: digest(t) for k, t in rulesets.items()}
    lag = state.faults.lag_seconds
    if delta and lag > 0 and not flush:
        state.pending.append(
            PendingApply(due=time.time() + lag, generation=state.generation, rulesets=delta)
        )
        wake_supervisor(paths, state)
        report.due_in_seconds = lag
    elif delta or flush or state.pending:
        todo = {k: t for k, t in rulesets.items() if state.applied.get(k) != digest(t)}
        state.pending.clear()
        report.enforced_pods = apply_rulesets(paths, state, todo)
        state.enforced_generation = state.generation
    report.generation = state.generation
    report.enforced_generation = state.enforced_generation
    report.seconds = time.monotonic() - started
