"""Probe pods in the lab, on the collector's request (`flowproof collector --probe-pods lab`).

Owns the one entry point the collector's runtime calls: run exactly the requested sidecar-free
probe pods (a network namespace, a kubelet-style cgroup and a process with no listener, carrying
the requested namespace and labels, on some node, written to the cluster file like any pod but
never Ready) and delete the ones no longer requested. The work is `Lab.reconcile_probe_pods`; this
module must never touch a pod that is not a lab probe pod.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from lab.lifecycle import Lab


def reconcile_probe_pods(
    lab_name: str, state_dir: str | os.PathLike[str], requests: Sequence[Any]
) -> None:
    """Make the lab run exactly `requests` (collector.planning.ProbePodRequest) as probe pods."""
    Lab(lab_name, state_dir).reconcile_probe_pods(list(requests))
