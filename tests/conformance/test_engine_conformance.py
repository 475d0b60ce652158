"""Upstream conformance cases against the model: `flowproof matrix` must say what upstream expects.

The Kubernetes e2e NetworkPolicy cases: one test per (case, step, probe). Each writes the step's
manifests, runs the CLI in-process with `-o json` and compares every off-diagonal cell with the
case's expected table. Like upstream (network_policy.go: ignoreLoopback), a pod to itself is never
compared. The Network Policy API's ClusterNetworkPolicy cases: one test per (case, step), every
upstream probe of the step compared with the cell's model (allow, deny; unknown is a failure).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from loader import (
    NAMESPACE_NAME_LABEL,
    POD_ORDER,
    ApiCase,
    ApiStep,
    Case,
    Probe,
    Step,
    load_base,
    load_cases,
    load_npapi_cases,
    render_table,
    write_npapi_step_manifests,
    write_step_manifests,
)

CASES = load_cases()


def _params() -> list[Any]:
    params = []
    for case in CASES:
        for step in case.steps:
            for probe in step.probes:
                test_id = f"{case.stem}-step{step.index}-{probe.port}/{probe.protocol}"
                params.append(pytest.param(case, step, probe, id=test_id))
    return params


@pytest.mark.parametrize(("case", "step", "probe"), _params())
def test_matrix_matches_upstream_truth_table(
    case: Case, step: Step, probe: Probe, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flowproof.cli import main

    write_step_manifests(case, step, tmp_path)
    capsys.readouterr()
    rc = main(["matrix", "-f", str(tmp_path), "--port", probe.port_spec, "-o", "json"])
    out = capsys.readouterr().out
    assert rc == 0, f"flowproof matrix exited {rc}"

    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for cell in json.loads(out):
        if cell["port"] == probe.port and cell["protocol"] == probe.protocol:
            cells[(cell["from"], cell["to"])] = cell
    expected = probe.expected()
    observed: dict[tuple[str, str], bool | None] = {
        pair: (cells[pair]["allowed"] if pair in cells else None) for pair in expected
    }
    wrong = [
        pair for pair in expected if pair[0] != pair[1] and observed[pair] is not expected[pair]
    ]
    if wrong:
        details = []
        for src, dst in wrong:
            cell = cells.get((src, dst))
            want = "allowed" if expected[(src, dst)] else "denied"
            if cell is None:
                details.append(f"{src} -> {dst}: want {want}, the matrix has no such cell")
                continue
            details.append(
                f"{src} -> {dst}: want {want}, got {'allowed' if cell['allowed'] else 'denied'}\n"
                f"    egress:  {json.dumps(cell.get('egress'), sort_keys=True)}\n"
                f"    ingress: {json.dumps(cell.get('ingress'), sort_keys=True)}"
            )
        pytest.fail(
            f"{case.name} ({case.upstream}), step {step.index}, {probe.port_spec}: "
            f"{len(wrong)} of {len(POD_ORDER) * (len(POD_ORDER) - 1)} cells differ "
            "(diagonal ignored)\n"
            f"expected:\n{render_table(expected)}\n\nobserved:\n{render_table(observed)}\n\n"
            + "\n".join(details),
            pytrace=False,
        )


# --- the data itself ------------------------------------------------------------------------------


def test_every_case_file_loads_with_unique_names_and_steps() -> None:
    stems = [case.stem for case in CASES]
    assert len(stems) == len(set(stems))
    assert len(CASES) >= 60
    keys = {(case.upstream, case.context, case.name) for case in CASES}
    # Legacy translations may share an It() text with a 3x3 case, never within one file and context.
    assert len(keys) == len(CASES)


def test_the_base_cluster_is_the_upstream_model() -> None:
    docs = load_base()
    namespaces = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Namespace"}
    pods = {
        f"{d['metadata']['namespace']}/{d['metadata']['name']}": d
        for d in docs
        if d["kind"] == "Pod"
    }
    assert sorted(namespaces) == ["x", "y", "z"]
    assert sorted(pods) == sorted(POD_ORDER)
    for name, ns in namespaces.items():
        assert ns["metadata"]["labels"] == {"ns": name}
    subnet = {"x": 1, "y": 2, "z": 3}
    for key, pod in pods.items():
        ns, name = key.split("/")
        assert pod["metadata"]["labels"] == {"pod": name}
        ip = f"10.244.{subnet[ns]}.{11 + 'abc'.index(name)}"
        assert pod["status"]["podIP"] == ip
        assert pod["status"]["podIPs"] == [{"ip": ip}]
        ports = {
            (p["name"], p["containerPort"], p["protocol"])
            for c in pod["spec"]["containers"]
            for p in c["ports"]
        }
        assert ports == {
            (f"serve-{n}-{proto.lower()}", n, proto)
            for n in (80, 81)
            for proto in ("TCP", "UDP", "SCTP")
        }


def test_written_manifests_carry_the_step_labels_and_the_automatic_namespace_label(
    tmp_path: Path,
) -> None:
    case = next(c for c in CASES if c.stem.startswith("021-"))  # from updated namespace
    step = case.steps[1]
    write_step_manifests(case, step, tmp_path)
    import yaml

    namespaces = list(yaml.safe_load_all((tmp_path / "00-namespaces.yaml").read_text()))
    labels = {d["metadata"]["name"]: d["metadata"]["labels"] for d in namespaces}
    assert labels["y"] == {"ns": "y", "ns2": "updated", NAMESPACE_NAME_LABEL: "y"}
    assert labels["x"] == {"ns": "x", NAMESPACE_NAME_LABEL: "x"}
    policies = list(yaml.safe_load_all((tmp_path / "02-policies.yaml").read_text()))
    assert [p["metadata"]["name"] for p in policies] == ["allow-client-a-via-ns-selector"]


def test_a_step_without_policies_writes_no_policy_file(tmp_path: Path) -> None:
    case = next(c for c in CASES if c.stem.startswith("033-"))  # stop enforcing after delete
    write_step_manifests(case, case.steps[1], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-namespaces.yaml", "01-pods.yaml"]


# --- the Network Policy API's ClusterNetworkPolicy cases ----------------------------------------

API_CASES = load_npapi_cases()


def _api_params() -> list[Any]:
    return [
        pytest.param(case, step, id=f"{case.stem}-step{step.index}")
        for case in API_CASES
        for step in case.steps
    ]


@pytest.mark.parametrize(("case", "step"), _api_params())
def test_matrix_matches_upstream_cluster_network_policy_probes(
    case: ApiCase, step: ApiStep, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flowproof.cli import main

    write_npapi_step_manifests(step, tmp_path, f"{case.stem} step {step.index}")
    cells: dict[tuple[str, str, int, str], dict[str, Any]] = {}
    for port, protocol in sorted({(p.port, p.protocol) for p in step.probes}):
        capsys.readouterr()
        rc = main(["matrix", "-f", str(tmp_path), "--port", f"{port}/{protocol}", "-o", "json"])
        out = capsys.readouterr()
        assert rc == 0, f"flowproof matrix exited {rc}: {out.err}"
        assert out.err == "", f"the case's manifests gave warnings: {out.err}"
        for cell in json.loads(out.out):
            cells[(cell["from"], cell["to"], cell["port"], cell["protocol"])] = cell
    wrong = []
    for probe in step.probes:
        cell = cells[(probe.source, probe.destination, probe.port, probe.protocol)]
        if cell["model"] != ("allow" if probe.allowed else "deny"):
            wrong.append(
                f"{probe.text}: the model says {cell['model']}\n"
                f"    egress:  {cell['egress']['reason']}\n"
                f"    ingress: {cell['ingress']['reason']}"
                + (f"\n    incomplete: {cell['incomplete']}" if cell.get("incomplete") else "")
            )
    if wrong:
        pytest.fail(
            f"{case.name} ({case.upstream}), step {step.index} ({step.run!r}): "
            f"{len(wrong)} of {len(step.probes)} probes differ\n" + "\n".join(wrong),
            pytrace=False,
        )


def test_every_network_policy_api_case_loads_with_unique_names() -> None:
    names = [case.name for case in API_CASES]
    assert len(names) == len(set(names))
    assert len(API_CASES) >= 26
    assert sum(len(step.probes) for case in API_CASES for step in case.steps) >= 350
