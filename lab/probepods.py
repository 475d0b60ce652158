"""Probe pods in the lab, on the collector's request (`flowproof collector --probe-pods lab`).

Owns the one entry point the collector's runtime calls: run exactly the requested sidecar-free
probe pods (a network namespace, a kubelet-style cgroup and a process with no listener, carrying
the requested namespace and labels, on some node, written to the cluster file like any pod but
never Ready) and delete the ones no longer requested. The work is `Lab.reconcile_probe_pods`; this
module must never touch a pod that is not a lab probe pod.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

from collector.core.probepods import ProbePodRequest
from collector.loop import ProbePodManager
from collector.settings import CollectorSettings
from lab.lifecycle import Lab


def reconcile_probe_pods(
    lab_name: str, state_dir: str | os.PathLike[str], requests: Sequence[ProbePodRequest]
) -> None:
    """Make the lab run exactly `requests` as probe pods (blocking: file locks, netns, cgroups)."""
    Lab(lab_name, state_dir).reconcile_probe_pods(list(requests))


def lab_probe_pods(settings: CollectorSettings) -> ProbePodManager:
    """The collector's probe-pod manager for `--probe-pods lab` (handed in by the front door)."""

    async def reconcile(requests: Sequence[ProbePodRequest]) -> None:
        await asyncio.to_thread(
            reconcile_probe_pods, settings.lab_name, settings.lab_state_dir, list(requests)
        )

    return reconcile
