"""The upstream e2e NetworkPolicy cases as data: load them, and write one step as Kubernetes manifests.

Owns the reading and checking of tests/conformance/base.yaml and cases/*.yaml (format in README.md)
and the one way every consumer (the engine through `flowproof matrix`, the lab with real packets)
turns a case step into manifest files. It must never evaluate a policy: the expected tables are data.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
BASE_FILE = HERE / "base.yaml"
CASES_DIR = HERE / "cases"

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
NAMESPACES = ("x", "y", "z")
POD_NAMES = ("a", "b", "c")
# Row and column order of every expected table: source rows, destination columns.
POD_ORDER: tuple[str, ...] = tuple(f"{ns}/{pod}" for ns in NAMESPACES for pod in POD_NAMES)
PROTOCOLS = ("TCP", "UDP", "SCTP")

Labels = Mapping[str, str]


class CaseError(ValueError):
    """A case file that does not follow the format in README.md."""


@dataclass(frozen=True)
class Probe:
    """One truth table: every ordered pod pair for one destination port and protocol."""

    port: int
    protocol: str
    expected_rows: tuple[str, ...]
    note: str = ""

    def allowed(self, source: str, destination: str) -> bool:
        """What the table says for `source` -> `destination` (pod keys such as "x/a")."""
        return self.expected_rows[POD_ORDER.index(source)][POD_ORDER.index(destination)] == "1"

    def expected(self) -> dict[tuple[str, str], bool]:
        """The table as {(source, destination): allowed}, diagonal included."""
        return {(src, dst): self.allowed(src, dst) for src in POD_ORDER for dst in POD_ORDER}

    @property
    def port_spec(self) -> str:
        """The probe as the command line writes it: `80/TCP`."""
        return f"{self.port}/{self.protocol}"


@dataclass(frozen=True)
class Step:
    """The complete desired state at one point of a case, and the probes that check it."""

    index: int  # 1-based, as in the test ids
    policies: tuple[Mapping[str, Any], ...]
    probes: tuple[Probe, ...]
    namespace_labels: Mapping[str, Labels] = field(default_factory=dict)
    pod_labels: Mapping[str, Labels] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Case:
    stem: str  # the file name without .yaml: "001-default-deny-ingress"
    name: str  # the upstream It() text
    upstream: str  # the upstream file: network_policy.go or network_legacy.go
    context: str
    steps: tuple[Step, ...]
    path: Path


def load_base(path: Path = BASE_FILE) -> list[dict[str, Any]]:
    """The base cluster's documents (Namespaces, then Pods), as written in base.yaml."""
    with path.open() as handle:
        docs = [doc for doc in yaml.safe_load_all(handle) if doc is not None]
    if not all(isinstance(doc, dict) for doc in docs):
        raise CaseError(f"{path}: every document must be a mapping")
    return docs


def load_cases(directory: Path = CASES_DIR) -> list[Case]:
    """Every case in `directory`, sorted by file name, checked against the format."""
    paths = sorted(directory.glob("*.yaml"))
    if not paths:
        raise CaseError(f"{directory}: no case files")
    return [load_case(path) for path in paths]


def load_case(path: Path) -> Case:
    with path.open() as handle:
        raw = yaml.safe_load(handle)
    where = str(path)
    data = _mapping(raw, where)
    _only_keys(data, {"name", "upstream", "context", "steps"}, where)
    steps_raw = data.get("steps")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise CaseError(f"{where}: steps must be a non-empty list")
    steps = tuple(
        _load_step(raw_step, index, f"{where}: steps[{index - 1}]")
        for index, raw_step in enumerate(steps_raw, start=1)
    )
    return Case(
        stem=path.stem,
        name=_text(data.get("name"), f"{where}: name"),
        upstream=_text(data.get("upstream"), f"{where}: upstream"),
        context=str(data.get("context", "")),
        steps=steps,
        path=path,
    )


def write_step_manifests(case: Case, step: Step, directory: Path) -> None:
    """Write the base cluster with the step's labels, and the step's policies, as YAML files.

    Files: `00-namespaces.yaml`, `01-pods.yaml` and, when the step has policies, `02-policies.yaml`.
    Label overrides replace the whole label set; every namespace also gets
    `kubernetes.io/metadata.name`, as the API server adds it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    namespaces: list[dict[str, Any]] = []
    pods: list[dict[str, Any]] = []
    for doc in load_base():
        doc = copy.deepcopy(doc)
        meta = doc.setdefault("metadata", {})
        if doc.get("kind") == "Namespace":
            name = meta["name"]
            labels = dict(step.namespace_labels.get(name, meta.get("labels") or {}))
            labels[NAMESPACE_NAME_LABEL] = name
            meta["labels"] = labels
            namespaces.append(doc)
        elif doc.get("kind") == "Pod":
            key = f"{meta['namespace']}/{meta['name']}"
            if key in step.pod_labels:
                meta["labels"] = dict(step.pod_labels[key])
            pods.append(doc)
        else:
            raise CaseError(f"{BASE_FILE}: unexpected kind {doc.get('kind')!r}")
    _dump(directory / "00-namespaces.yaml", namespaces, f"{case.stem} step {step.index}")
    _dump(directory / "01-pods.yaml", pods, f"{case.stem} step {step.index}")
    if step.policies:
        policies = [copy.deepcopy(dict(policy)) for policy in step.policies]
        _dump(directory / "02-policies.yaml", policies, f"{case.stem} step {step.index}")


def render_table(rows: Mapping[tuple[str, str], bool | None]) -> str:
    """A truth table the way upstream prints it: `.` allowed, `X` denied, `?` missing."""
    lines = ["-\t" + "\t".join(POD_ORDER)]
    for src in POD_ORDER:
        marks = []
        for dst in POD_ORDER:
            value = rows.get((src, dst))
            marks.append("?" if value is None else ("." if value else "X"))
        lines.append(src + "\t" + "\t".join(marks))
    return "\n".join(lines)


# --- parsing helpers ------------------------------------------------------------------------------


def _load_step(raw: Any, index: int, where: str) -> Step:
    data = _mapping(raw, where)
    _only_keys(data, {"note", "namespaceLabels", "podLabels", "policies", "probes"}, where)
    policies_raw = data.get("policies", [])
    if not isinstance(policies_raw, list):
        raise CaseError(f"{where}: policies must be a list")
    policies = tuple(_policy(p, f"{where}: policies[{i}]") for i, p in enumerate(policies_raw))
    names = [(p["metadata"]["namespace"], p["metadata"]["name"]) for p in policies]
    if len(names) != len(set(names)):
        raise CaseError(f"{where}: two policies share a namespace and name")
    probes_raw = data.get("probes")
    if not isinstance(probes_raw, list) or not probes_raw:
        raise CaseError(f"{where}: probes must be a non-empty list")
    probes = tuple(_probe(p, f"{where}: probes[{i}]") for i, p in enumerate(probes_raw))
    ns_labels = _label_sets(
        data.get("namespaceLabels"), set(NAMESPACES), f"{where}: namespaceLabels"
    )
    pod_labels = _label_sets(data.get("podLabels"), set(POD_ORDER), f"{where}: podLabels")
    return Step(
        index=index,
        policies=policies,
        probes=probes,
        namespace_labels=ns_labels,
        pod_labels=pod_labels,
        note=str(data.get("note", "")),
    )


def _policy(raw: Any, where: str) -> dict[str, Any]:
    data = _mapping(raw, where)
    if data.get("apiVersion") != "networking.k8s.io/v1" or data.get("kind") != "NetworkPolicy":
        raise CaseError(f"{where}: must be a networking.k8s.io/v1 NetworkPolicy")
    meta = _mapping(data.get("metadata"), f"{where}: metadata")
    if meta.get("namespace") not in NAMESPACES or not meta.get("name"):
        raise CaseError(f"{where}: metadata needs a name and a namespace among {NAMESPACES}")
    _mapping(data.get("spec"), f"{where}: spec")
    return data


def _probe(raw: Any, where: str) -> Probe:
    data = _mapping(raw, where)
    _only_keys(data, {"port", "protocol", "expected", "note"}, where)
    port = data.get("port")
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise CaseError(f"{where}: port must be a number from 1 to 65535")
    protocol = data.get("protocol")
    if protocol not in PROTOCOLS:
        raise CaseError(f"{where}: protocol must be one of {PROTOCOLS}")
    rows = data.get("expected")
    size = len(POD_ORDER)
    if (
        not isinstance(rows, list)
        or len(rows) != size
        or not all(isinstance(r, str) and len(r) == size and set(r) <= {"0", "1"} for r in rows)
    ):
        raise CaseError(f"{where}: expected must be {size} strings of {size} characters 0 or 1")
    return Probe(
        port=port, protocol=protocol, expected_rows=tuple(rows), note=str(data.get("note", ""))
    )


def _label_sets(raw: Any, allowed: set[str], where: str) -> dict[str, dict[str, str]]:
    if raw is None:
        return {}
    data = _mapping(raw, where)
    result: dict[str, dict[str, str]] = {}
    for key, labels in data.items():
        if key not in allowed:
            raise CaseError(f"{where}: unknown {key!r}; expected one of {sorted(allowed)}")
        label_map = _mapping(labels if labels is not None else {}, f"{where}: {key}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in label_map.items()):
            raise CaseError(f"{where}: {key}: label keys and values must be strings")
        result[key] = dict(label_map)
    return result


def _mapping(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise CaseError(f"{where}: must be a mapping")
    return raw


def _text(raw: Any, where: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise CaseError(f"{where}: must be a non-empty string")
    return raw


def _only_keys(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(data) - allowed
    if unknown:
        raise CaseError(f"{where}: unknown keys {sorted(unknown)}")


def _dump(path: Path, docs: list[dict[str, Any]], origin: str) -> None:
    header = f"# Written by tests/conformance/loader.py for {origin}.\n"
    path.write_text(header + yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True))
