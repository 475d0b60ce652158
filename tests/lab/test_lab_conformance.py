"""The upstream e2e NetworkPolicy cases replayed through the lab with real packets.

One lab (3 nodes, the base pods x/a … z/c at their fixed addresses) serves the whole module: each
step's manifests are applied with `--prune` semantics (the step's policies and labels, nothing
else), then every ordered pair of distinct pods is probed on the step's port and protocol from
inside the source pod. Observed must equal upstream's truth table, the diagonal ignored as
upstream ignores loopback. SCTP probes are skipped where the kernel has no SCTP module.
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
from loader import POD_ORDER, Case, Probe, Step, load_cases, render_table, write_step_manifests

from lab.config import LabSettings
from lab.lifecycle import Lab, read_manifests
from lab.probing import probe_matrix, sctp_supported

pytestmark = [pytest.mark.lab, pytest.mark.slow]

DENY_TIMEOUT_SECONDS = 0.4
CASES = load_cases()
PAIRS = [(src, dst) for src in POD_ORDER for dst in POD_ORDER if src != dst]


class ConformanceLab:
    """The module's lab and which case step it currently holds."""

    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        self.current: tuple[str, int] | None = None

    def show(self, case: Case, step: Step) -> None:
        if self.current == (case.stem, step.index):
            return
        directory = self.workdir / f"{case.stem}-step{step.index}"
        write_step_manifests(case, step, directory)
        self.current = None
        self.lab.apply(read_manifests([directory]), prune=True)
        self.current = (case.stem, step.index)


@pytest.fixture(scope="module")
def conformance_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConformanceLab]:
    reason = lab_unavailable()
    if reason is not None:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("lab-conformance")
    first = CASES[0]
    base = workdir / "base"
    write_step_manifests(first, first.steps[0], base)
    for policy_file in base.glob("02-*.yaml"):
        policy_file.unlink()  # the base cluster only: pods and namespaces
    lab = Lab(unique_name(), workdir / "state")
    try:
        lab.up(read_manifests([base]), LabSettings(nodes=3, owner_pid=os.getpid()))
        yield ConformanceLab(lab, workdir)
    finally:
        state = lab.paths.load() if lab.exists() else None
        if lab.exists():
            lab.down()
        left = leftovers(lab.name, state)
        assert not left, f"the conformance lab left behind: {left}"


def _params() -> list[Any]:
    params = []
    for case in CASES:
        for step in case.steps:
            for probe in step.probes:
                marks = []
                if probe.protocol == "SCTP" and not sctp_supported():
                    marks.append(pytest.mark.skip(reason="kernel has no SCTP module"))
                params.append(
                    pytest.param(
                        case,
                        step,
                        probe,
                        id=f"{case.stem}-step{step.index}-{probe.port}/{probe.protocol}",
                        marks=marks,
                    )
                )
    return params


@pytest.mark.parametrize(("case", "step", "probe"), _params())
def test_lab_traffic_matches_upstream_truth_table(
    conformance_lab: ConformanceLab, case: Case, step: Step, probe: Probe
) -> None:
    conformance_lab.show(case, step)
    observed = run(
        probe_matrix(conformance_lab.lab, PAIRS, probe.port, probe.protocol, DENY_TIMEOUT_SECONDS)
    )
    expected = probe.expected()
    wrong = [pair for pair in PAIRS if observed[pair] is not expected[pair]]
    if wrong:
        table: dict[tuple[str, str], bool | None] = dict(observed)
        details = [
            f"{src} -> {dst}: want {'allowed' if expected[(src, dst)] else 'denied'}"
            for src, dst in wrong
        ]
        pytest.fail(
            f"{case.name} ({case.upstream}), step {step.index}, {probe.port_spec}: "
            f"{len(wrong)} of {len(PAIRS)} pairs differ (diagonal ignored)\n"
            f"expected:\n{render_table(expected)}\n\nobserved:\n{render_table(table)}\n\n"
            + "\n".join(details)
        )
