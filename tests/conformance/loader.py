"""Upstream conformance cases as data: load them, and write one step as Kubernetes manifests.

Owns the reading and checking of the Kubernetes e2e NetworkPolicy cases (base.yaml, cases/*.yaml)
and of the Network Policy API's ClusterNetworkPolicy cases (npapi/base.yaml, npapi/cases/*.yaml),
formats in README.md, and the one way every consumer (the engine through `flowproof`, the lab with
real packets) turns a case step into manifest files. It must never evaluate a policy: the expected
verdicts are data.
"""

from __future__ import annotations

import copy
import re
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


# --- the Network Policy API's cases (npapi/) ------------------------------------------------------

NPAPI_DIR = HERE / "npapi"
NPAPI_BASE_FILE = NPAPI_DIR / "base.yaml"
NPAPI_CASES_DIR = NPAPI_DIR / "cases"
NPAPI_NAMESPACE_PREFIX = "network-policy-conformance-"
HOUSES = ("gryffindor", "slytherin", "hufflepuff", "ravenclaw")
CLUSTER_POLICY_API = "policy.networking.k8s.io/v1beta1"
_PROBE_TEXT = re.compile(
    r"(?P<src>[a-z]+/[a-z0-9-]+) -> (?P<dst>[a-z]+/[a-z0-9-]+) (?P<port>\d+)/(?P<proto>TCP|UDP|SCTP) "
    r"(?P<verdict>allow|deny)"
)
_CHANGES = (
    "swapRules",
    "setRuleAction",
    "setRuleProtocols",
    "insertRule",
    "setPriority",
    "deletePolicy",
    "namespaceLabels",
    "setPodLabels",
    "removePodLabels",
)


def house_namespace(house: str) -> str:
    return NPAPI_NAMESPACE_PREFIX + house


@dataclass(frozen=True)
class PodProbe:
    """One upstream PokeServer: from a pod to a pod on a port and protocol, allowed or not.

    Pods are `namespace/name` with the full namespace name (`network-policy-conformance-x/name`).
    """

    source: str
    destination: str
    port: int
    protocol: str
    allowed: bool

    @property
    def text(self) -> str:
        src = self.source.removeprefix(NPAPI_NAMESPACE_PREFIX)
        dst = self.destination.removeprefix(NPAPI_NAMESPACE_PREFIX)
        verdict = "allow" if self.allowed else "deny"
        return f"{src} -> {dst} {self.port}/{self.protocol} {verdict}"


@dataclass(frozen=True)
class ApiStep:
    """The complete state after one upstream t.Run's changes (applied on the previous step's)."""

    index: int  # 1-based
    run: str  # the upstream t.Run text
    policies: tuple[Mapping[str, Any], ...]
    namespace_labels: Mapping[str, Labels]
    pod_labels: Mapping[str, Labels]
    probes: tuple[PodProbe, ...]
    note: str = ""


@dataclass(frozen=True)
class ApiCase:
    stem: str
    name: str  # the upstream ShortName
    description: str
    upstream: str
    manifests: str
    steps: tuple[ApiStep, ...]
    path: Path


def load_npapi_base(path: Path = NPAPI_BASE_FILE) -> list[dict[str, Any]]:
    return load_base(path)


def load_npapi_cases(directory: Path = NPAPI_CASES_DIR) -> list[ApiCase]:
    paths = sorted(directory.glob("*.yaml"))
    if not paths:
        raise CaseError(f"{directory}: no case files")
    return [load_npapi_case(path) for path in paths]


def load_npapi_case(path: Path) -> ApiCase:
    with path.open() as handle:
        raw = yaml.safe_load(handle)
    where = str(path)
    data = _mapping(raw, where)
    _only_keys(data, {"name", "description", "upstream", "manifests", "policies", "steps"}, where)
    base = load_npapi_base()
    namespace_labels = {
        d["metadata"]["name"]: dict(d["metadata"].get("labels") or {})
        for d in base
        if d["kind"] == "Namespace"
    }
    pod_labels = {
        f"{d['metadata']['namespace']}/{d['metadata']['name']}": dict(d["metadata"]["labels"])
        for d in base
        if d["kind"] == "Pod"
    }
    raw_policies = data.get("policies")
    if not isinstance(raw_policies, list) or not raw_policies:
        raise CaseError(f"{where}: policies must be a non-empty list")
    policies: list[dict[str, Any]] = [
        _api_policy(p, f"{where}: policies[{i}]") for i, p in enumerate(raw_policies)
    ]
    steps_raw = data.get("steps")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise CaseError(f"{where}: steps must be a non-empty list")
    steps: list[ApiStep] = []
    for index, raw_step in enumerate(steps_raw, start=1):
        here = f"{where}: steps[{index - 1}]"
        step = _mapping(raw_step, here)
        _only_keys(step, {"run", "note", "changes", "probes"}, here)
        changes = step.get("changes", [])
        if not isinstance(changes, list):
            raise CaseError(f"{here}: changes must be a list")
        for j, change in enumerate(changes):
            _apply_change(change, policies, namespace_labels, pod_labels, f"{here}: changes[{j}]")
        probes_raw = step.get("probes")
        if not isinstance(probes_raw, list) or not probes_raw:
            raise CaseError(f"{here}: probes must be a non-empty list")
        steps.append(
            ApiStep(
                index=index,
                run=_text(step.get("run"), f"{here}: run"),
                policies=tuple(copy.deepcopy(policies)),
                namespace_labels=copy.deepcopy(namespace_labels),
                pod_labels=copy.deepcopy(pod_labels),
                probes=tuple(
                    _pod_probe(p, pod_labels, f"{here}: probes[{k}]")
                    for k, p in enumerate(probes_raw)
                ),
                note=str(step.get("note", "")),
            )
        )
    return ApiCase(
        stem=path.stem,
        name=_text(data.get("name"), f"{where}: name"),
        description=str(data.get("description", "")),
        upstream=_text(data.get("upstream"), f"{where}: upstream"),
        manifests=_text(data.get("manifests"), f"{where}: manifests"),
        steps=tuple(steps),
        path=path,
    )


def write_npapi_step_manifests(step: ApiStep, directory: Path, origin: str) -> None:
    """The houses with the step's labels (`00-namespaces.yaml`, `01-pods.yaml`) and the step's
    policies (`02-policies.yaml`), as for the e2e cases."""
    directory.mkdir(parents=True, exist_ok=True)
    namespaces: list[dict[str, Any]] = []
    pods: list[dict[str, Any]] = []
    for doc in load_npapi_base():
        doc = copy.deepcopy(doc)
        meta = doc["metadata"]
        if doc["kind"] == "Namespace":
            labels = dict(step.namespace_labels[meta["name"]])
            labels[NAMESPACE_NAME_LABEL] = meta["name"]
            meta["labels"] = labels
            namespaces.append(doc)
        else:
            meta["labels"] = dict(step.pod_labels[f"{meta['namespace']}/{meta['name']}"])
            pods.append(doc)
    _dump(directory / "00-namespaces.yaml", namespaces, origin)
    _dump(directory / "01-pods.yaml", pods, origin)
    _dump(directory / "02-policies.yaml", [dict(p) for p in step.policies], origin)


def _api_policy(raw: Any, where: str) -> dict[str, Any]:
    data = _mapping(raw, where)
    kind = data.get("kind")
    if (data.get("apiVersion"), kind) not in (
        (CLUSTER_POLICY_API, "ClusterNetworkPolicy"),
        ("networking.k8s.io/v1", "NetworkPolicy"),
    ):
        raise CaseError(
            f"{where}: must be a {CLUSTER_POLICY_API} ClusterNetworkPolicy or a NetworkPolicy"
        )
    _mapping(data.get("metadata"), f"{where}: metadata")
    _mapping(data.get("spec"), f"{where}: spec")
    return copy.deepcopy(data)


def _pod_probe(raw: Any, pod_labels: Mapping[str, Labels], where: str) -> PodProbe:
    match = _PROBE_TEXT.fullmatch(raw) if isinstance(raw, str) else None
    if match is None:
        raise CaseError(f"{where}: must read 'house/pod -> house/pod PORT/PROTO allow|deny'")
    source = house_namespace(match["src"].split("/")[0]) + "/" + match["src"].split("/")[1]
    destination = house_namespace(match["dst"].split("/")[0]) + "/" + match["dst"].split("/")[1]
    for pod in (source, destination):
        if pod not in pod_labels:
            raise CaseError(f"{where}: no pod {pod} in npapi/base.yaml")
    return PodProbe(
        source, destination, int(match["port"]), match["proto"], match["verdict"] == "allow"
    )


def _find_policy(
    policies: list[dict[str, Any]], name: str, where: str, namespace: str | None = None
) -> dict[str, Any]:
    for policy in policies:
        meta = policy["metadata"]
        if meta["name"] == name and meta.get("namespace") == namespace:
            return policy
    raise CaseError(f"{where}: no policy {name!r} in this step")


def _rules(policy: dict[str, Any], direction: Any, where: str) -> list[Any]:
    if direction not in ("ingress", "egress"):
        raise CaseError(f"{where}: direction must be ingress or egress")
    rules = policy["spec"].get(direction)
    if not isinstance(rules, list):
        raise CaseError(f"{where}: the policy has no {direction} rules")
    return rules


def _apply_change(
    raw: Any,
    policies: list[dict[str, Any]],
    namespace_labels: dict[str, dict[str, str]],
    pod_labels: dict[str, dict[str, str]],
    where: str,
) -> None:
    """Apply one upstream mutation (README.md lists them) to the state, in place."""
    change = _mapping(raw, where)
    if len(change) != 1 or next(iter(change)) not in _CHANGES:
        raise CaseError(f"{where}: a change is one of {', '.join(_CHANGES)}")
    op, args = next(iter(change.items()))
    args = _mapping(args, f"{where}: {op}")
    if op == "namespaceLabels":
        for house, labels in args.items():
            if house not in HOUSES:
                raise CaseError(f"{where}: unknown house {house!r}")
            namespace_labels[house_namespace(house)] = dict(labels or {})
        return
    if op in ("setPodLabels", "removePodLabels"):
        house, _, name = str(args.get("pod", "")).partition("/")
        key = f"{house_namespace(house)}/{name}"
        if key not in pod_labels:
            raise CaseError(f"{where}: no pod {args.get('pod')!r}")
        if op == "setPodLabels":
            pod_labels[key].update(_mapping(args.get("labels"), f"{where}: labels"))
        else:
            for label in args.get("keys") or ():
                pod_labels[key].pop(label, None)
        return
    if op == "deletePolicy":
        policy = _find_policy(policies, str(args.get("name")), where, args.get("namespace"))
        policies.remove(policy)
        return
    policy = _find_policy(policies, str(args.get("policy")), where)
    if op == "setPriority":
        policy["spec"]["priority"] = int(args["priority"])
        return
    rules = _rules(policy, args.get("direction"), where)
    if op == "swapRules":
        i, j = args["rules"]
        rules[i], rules[j] = rules[j], rules[i]
    elif op == "setRuleAction":
        rules[int(args["rule"])]["action"] = args["action"]
    elif op == "setRuleProtocols":
        rules[int(args["rule"])]["protocols"] = copy.deepcopy(args["protocols"])
    elif op == "insertRule":
        rules.insert(int(args["index"]), copy.deepcopy(_mapping(args["rule"], f"{where}: rule")))
