"""The Network Policy API's ClusterNetworkPolicy conformance cases replayed in the lab with real packets.

One lab (2 nodes, the houses of tests/conformance/npapi/base.yaml at their fixed addresses) serves
the whole module. Each step's manifests (the houses with the step's labels, the step's cluster
policies and NetworkPolicies) are applied with `--prune` semantics, then every upstream probe of
the step is sent from inside the source pod. Observed must equal upstream's expectation: the lab
enforces the tiers in nftables with its own reading (lab/enforcement.py), never the engine's.
SCTP probes are skipped where the kernel has no SCTP module.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from labtools import lab_unavailable, leftovers, run, unique_name

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "conformance"))
from loader import ApiCase, ApiStep, load_npapi_cases, write_npapi_step_manifests

from lab.config import LabSettings
from lab.lifecycle import Lab, read_manifests
from lab.probing import probe_matrix, sctp_supported

pytestmark = [pytest.mark.lab, pytest.mark.slow]

DENY_TIMEOUT_SECONDS = 0.4
CASES = load_npapi_cases()


@pytest.fixture(scope="module")
def npapi_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Path]]:
    reason = lab_unavailable()
    if reason is not None:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("lab-npapi")
    first = CASES[0].steps[0]
    base = workdir / "base"
    write_npapi_step_manifests(first, base, "the base cluster")
    (base / "02-policies.yaml").unlink()  # the houses only
    lab = Lab(unique_name(), workdir / "state")
    try:
        lab.up(read_manifests([base]), LabSettings(nodes=2, owner_pid=os.getpid()))
        yield lab, workdir
    finally:
        state = lab.paths.load() if lab.exists() else None
        if lab.exists():
            lab.down()
        left = leftovers(lab.name, state)
        assert not left, f"the npapi lab left behind: {left}"


def _params() -> list[Any]:
    params = []
    for case in CASES:
        for step in case.steps:
            marks = []
            if all(p.protocol == "SCTP" for p in step.probes) and not sctp_supported():
                marks.append(pytest.mark.skip(reason="kernel has no SCTP module"))
            params.append(pytest.param(case, step, id=f"{case.stem}-step{step.index}", marks=marks))
    return params


@pytest.mark.parametrize(("case", "step"), _params())
def test_lab_traffic_matches_upstream_cluster_network_policy_probes(
    npapi_lab: tuple[Lab, Path], case: ApiCase, step: ApiStep
) -> None:
    lab, workdir = npapi_lab
    directory = workdir / f"{case.stem}-step{step.index}"
    write_npapi_step_manifests(step, directory, f"{case.stem} step {step.index}")
    lab.apply(read_manifests([directory]), prune=True)
    probes = [p for p in step.probes if p.protocol != "SCTP" or sctp_supported()]
    wrong = []
    for port, protocol in sorted({(p.port, p.protocol) for p in probes}):
        these = [p for p in probes if (p.port, p.protocol) == (port, protocol)]
        pairs = [(p.source, p.destination) for p in these]
        observed = run(probe_matrix(lab, pairs, port, protocol, DENY_TIMEOUT_SECONDS))
        wrong += [
            f"{p.text}: the lab says {'allow' if observed[(p.source, p.destination)] else 'deny'}"
            for p in these
            if observed[(p.source, p.destination)] is not p.allowed
        ]
    if wrong:
        pytest.fail(
            f"{case.name} ({case.upstream}), step {step.index} ({step.run!r}): "
            f"{len(wrong)} of {len(probes)} probes differ\n" + "\n".join(wrong)
        )
