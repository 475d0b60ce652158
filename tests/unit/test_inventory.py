"""ManifestSource: manifests -> Snapshot, and every way a manifest is rejected (file, line, field)."""

from __future__ import annotations

import ipaddress
import json
import textwrap
from pathlib import Path

import pytest

from collector.core.model import (
    NAMESPACE_NAME_LABEL,
    ContainerPort,
    IPBlock,
    LabelSelector,
    Peer,
    PolicyPort,
    Requirement,
    Rule,
    Snapshot,
)
from collector.reading.fields import Where, render_field
from collector.reading.manifests import load_documents, load_snapshot
from collector.reading.objects import (
    namespace_from_dict,
    pod_from_dict,
    pods_from_workload,
    policy_from_dict,
    selector_from_dict,
    snapshot_from_documents,
    synthetic_uid,
)
from flowproof.errors import InputError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "shop"
MARK = "# <-"  # marks the line a problem must be reported at


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def marked_line(path: Path) -> int:
    lines = [i for i, line in enumerate(path.read_text().splitlines(), 1) if MARK in line]
    assert len(lines) == 1, f"the test text must mark exactly one line with {MARK!r}"
    return lines[0]


def problems_of(*paths: Path) -> tuple[InputError, ...]:
    with pytest.raises(InputError) as info:
        load_snapshot(list(paths))
    assert info.value.problems, "an InputError from a read always lists its problems"
    return info.value.problems


def policy(spec: str, *, name: str = "p", namespace: str = "shop") -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
        f"metadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{body}\n"
    )


def pod(spec: str = "", *, name: str = "web", labels: str = "{app: web}", extra: str = "") -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ") if spec else "  {}"
    return (
        f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n"
        f"  labels: {labels}\n{extra}spec:\n{body}\n"
    )


def load_policy(tmp_path: Path, spec: str) -> Snapshot:
    return load_snapshot([write(tmp_path, policy(spec))])


# --- NetworkPolicy: what it means ------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param("podSelector: {}", ("ingress",), id="no egress rules: Ingress only"),
        pytest.param(
            "podSelector: {}\negress: []",
            ("ingress",),
            id="an empty egress list does not make an egress policy (API server default)",
        ),
        pytest.param(
            "podSelector: {}\negress: [{}]",
            ("ingress", "egress"),
            id="a non-empty egress list adds Egress to the inferred types",
        ),
        pytest.param(
            "podSelector: {}\npolicyTypes: [Egress]",
            ("egress",),
            id="given policyTypes are taken as given",
        ),
        pytest.param(
            "podSelector: {}\npolicyTypes: [Egress, Ingress]",
            ("ingress", "egress"),
            id="given policyTypes are kept in a canonical order",
        ),
        pytest.param(
            "podSelector: {}\npolicyTypes: []\negress: [{}]",
            ("ingress", "egress"),
            id="an empty policyTypes list is inferred like an absent one",
        ),
        pytest.param(
            "podSelector: {}\npolicyTypes: [Ingress]\negress: [{}]",
            ("ingress",),
            id="egress rules do not add Egress when policyTypes are given",
        ),
    ],
)
def test_policy_types(tmp_path: Path, spec: str, expected: tuple[str, ...]) -> None:
    (read,) = load_policy(tmp_path, spec).policies
    assert read.policy_types == expected


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param("ingress: [{}]", Rule(), id="a rule with no from and no ports matches all"),
        pytest.param(
            "ingress: [{from: [], ports: []}]", Rule(), id="empty from and ports lists match all"
        ),
        pytest.param(
            "ingress: [{from: [{podSelector: {}}]}]",
            Rule(peers=(Peer(pod_selector=LabelSelector()),)),
            id="an empty podSelector peer selects every pod of the policy's namespace",
        ),
        pytest.param(
            "ingress: [{from: [{namespaceSelector: {matchLabels: {team: a}}}]}]",
            Rule(peers=(Peer(namespace_selector=LabelSelector((("team", "a"),))),)),
            id="a namespaceSelector peer",
        ),
        pytest.param(
            "ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: x}}}]}]",
            Rule(
                peers=(
                    Peer(
                        pod_selector=LabelSelector((("app", "x"),)),
                        namespace_selector=LabelSelector(),
                    ),
                )
            ),
            id="a peer with both selectors keeps both",
        ),
        pytest.param(
            "egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]}]",
            Rule(
                peers=(
                    Peer(
                        ip_block=IPBlock(
                            ipaddress.ip_network("10.0.0.0/8"),
                            (ipaddress.ip_network("10.1.0.0/16"),),
                        )
                    ),
                )
            ),
            id="an ipBlock peer with except",
        ),
        pytest.param(
            "ingress: [{ports: [{port: 80}, {port: http, protocol: UDP},"
            " {port: 9000, endPort: 9100}, {protocol: SCTP}]}]",
            Rule(
                ports=(
                    PolicyPort("TCP", 80),
                    PolicyPort("UDP", "http"),
                    PolicyPort("TCP", 9000, 9100),
                    PolicyPort("SCTP"),
                )
            ),
            id="ports: TCP by default, numbers, names, ranges, all ports",
        ),
        pytest.param(
            "ingress: [{from: [{podSelector: {matchLabels: {b: '2', a: '1'}, matchExpressions:"
            " [{key: t, operator: In, values: [x, y]}, {key: u, operator: DoesNotExist}]}}]}]",
            Rule(
                peers=(
                    Peer(
                        pod_selector=LabelSelector(
                            (("a", "1"), ("b", "2")),
                            (Requirement("t", "In", ("x", "y")), Requirement("u", "DoesNotExist")),
                        )
                    ),
                )
            ),
            id="matchLabels and matchExpressions",
        ),
    ],
)
def test_rules(tmp_path: Path, spec: str, expected: Rule) -> None:
    (read,) = load_policy(tmp_path, "podSelector: {}\n" + spec).policies
    assert (read.ingress + read.egress) == (expected,)


def test_policy_identity_selector_and_source(tmp_path: Path) -> None:
    path = write(tmp_path, "# a comment first\n" + policy("podSelector: {matchLabels: {app: a}}"))
    (read,) = load_snapshot([path]).policies
    assert (read.namespace, read.name, read.key) == ("shop", "p", "shop/p")
    assert read.pod_selector == LabelSelector((("app", "a"),))
    assert read.source == f"{path}:2"


def test_absent_pod_selector_selects_all(tmp_path: Path) -> None:
    (read,) = load_policy(tmp_path, "policyTypes: [Ingress]").policies
    assert read.pod_selector.is_empty


# --- NetworkPolicy: every rejection ------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field", "reason"),
    [
        pytest.param(
            "podselector: {}  # <-",
            "spec.podselector",
            "unknown field 'podselector' (did you mean 'podSelector'?)",
            id="a misspelt podSelector is rejected with the spelling it meant",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - port: [{port: 80}]  # <-",
            "spec.ingress[0].port",
            "unknown field 'port' (did you mean 'ports'?)",
            id="an unknown field in a rule",
        ),
        pytest.param(
            "podSelector: {}\negress:\n  - from: []  # <-",
            "spec.egress[0].from",
            "unknown field 'from' (egress rules name their destinations in 'to')",
            id="from in an egress rule",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - to: []  # <-",
            "spec.ingress[0].to",
            "unknown field 'to' (ingress rules name their sources in 'from')",
            id="to in an ingress rule",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - from:\n      - ipblock: {cidr: 10.0.0.0/8}  # <-",
            "spec.ingress[0].from[0].ipblock",
            "unknown field 'ipblock' (did you mean 'ipBlock'?)",
            id="an unknown field in a peer",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - from:\n      - ipBlock:\n          cidr: 10.0.0.0/8\n"
            "          excepts: []  # <-",
            "spec.ingress[0].from[0].ipBlock.excepts",
            "unknown field 'excepts' (did you mean 'except'?)",
            id="an unknown field in an ipBlock",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - ports:\n      - {port: 80, endport: 90}  # <-",
            "spec.ingress[0].ports[0].endport",
            "unknown field 'endport' (did you mean 'endPort'?)",
            id="an unknown field in a port",
        ),
        pytest.param(
            "podSelector:\n  matchlabel: {app: a}  # <-",
            "spec.podSelector.matchlabel",
            "unknown field 'matchlabel' (did you mean 'matchLabels'?)",
            id="an unknown field in a selector",
        ),
        pytest.param(
            "podSelector:\n  matchExpressions:\n    - {key: a, operator: In, value: [x]}  # <-",
            "spec.podSelector.matchExpressions[0].value",
            "unknown field 'value' (did you mean 'values'?)",
            id="an unknown field in a requirement",
        ),
        pytest.param(
            "podSelector: {}\nfoo: 1  # <-",
            "spec.foo",
            "unknown field 'foo'; known fields: egress, ingress, podSelector, policyTypes",
            id="an unknown field with no close spelling lists the known ones",
        ),
        pytest.param(
            "podSelector: {}\npolicyTypes:\n  - ingress  # <-",
            "spec.policyTypes[0]",
            "unsupported value 'ingress': supported values: 'Ingress', 'Egress'",
            id="policyTypes values are case-sensitive",
        ),
        pytest.param(
            "podSelector: {}\npolicyTypes: [Ingress, Egress, Ingress]  # <-",
            "spec.policyTypes",
            "may not specify more than two policyTypes",
            id="more than two policyTypes",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - ports:\n      - {port: 80, protocol: tcp}  # <-",
            "spec.ingress[0].ports[0].protocol",
            "unsupported value 'tcp': supported values: 'TCP', 'UDP', 'SCTP'",
            id="an unknown protocol",
        ),
        pytest.param(
            "podSelector:\n  matchExpressions:\n    - {key: a, operator: Has}  # <-",
            "spec.podSelector.matchExpressions[0].operator",
            "unsupported value 'Has': supported values: 'In', 'NotIn', 'Exists', 'DoesNotExist'",
            id="an unknown operator",
        ),
        pytest.param(
            "podSelector:\n  matchExpressions:\n    - {key: a}  # <-",
            "spec.podSelector.matchExpressions[0].operator",
            "required field is missing",
            id="a requirement without an operator",
        ),
        pytest.param(
            "podSelector:\n  matchExpressions:\n    - {key: a, operator: In}  # <-",
            "spec.podSelector.matchExpressions[0].values",
            "must be non-empty when operator is 'In'",
            id="In without values",
        ),
        pytest.param(
            "podSelector:\n  matchExpressions:\n    - {key: a, operator: NotIn, values: []}  # <-",
            "spec.podSelector.matchExpressions[0].values",
            "must be non-empty when operator is 'NotIn'",
            id="NotIn with an empty values list",
        ),
        pytest.param(
            "podSelector:\n  matchExpressions:\n    - key: a\n      operator: Exists\n"
            "      values: [x]  # <-",
            "spec.podSelector.matchExpressions[0].values",
            "must be empty when operator is 'Exists'",
            id="Exists with values",
        ),
        pytest.param(
            "podSelector:\n  matchExpressions:\n    - {key: a, operator: DoesNotExist, values: [x]}"
            "  # <-",
            "spec.podSelector.matchExpressions[0].values",
            "must be empty when operator is 'DoesNotExist'",
            id="DoesNotExist with values",
        ),
        pytest.param(
            "podSelector:\n  matchLabels:\n    -app: x  # <-",
            'spec.podSelector.matchLabels["-app"]',
            "invalid label key '-app': the name part must consist of alphanumeric characters",
            id="a label key must start with an alphanumeric character",
        ),
        pytest.param(
            "podSelector:\n  matchLabels:\n    a/b/c: x  # <-",
            'spec.podSelector.matchLabels["a/b/c"]',
            "invalid label key 'a/b/c': at most one '/' (prefix/name)",
            id="a label key has at most one slash",
        ),
        pytest.param(
            "podSelector:\n  matchLabels:\n    Example.com/app: x  # <-",
            'spec.podSelector.matchLabels["Example.com/app"]',
            "invalid label key 'Example.com/app': prefix a lowercase RFC 1123 subdomain",
            id="a label key prefix is a lowercase DNS subdomain",
        ),
        pytest.param(
            "podSelector:\n  matchLabels:\n    /app: x  # <-",
            'spec.podSelector.matchLabels["/app"]',
            "invalid label key '/app': the prefix before '/' must be non-empty",
            id="a label key prefix is not empty",
        ),
        pytest.param(
            f"podSelector:\n  matchLabels:\n    {'k' * 64}: x  # <-",
            f"spec.podSelector.matchLabels.{'k' * 64}",
            "the name part must be no more than 63 characters",
            id="a label key name has at most 63 characters",
        ),
        pytest.param(
            "podSelector:\n  matchLabels:\n    app: -x  # <-",
            "spec.podSelector.matchLabels.app",
            "invalid label value '-x': must be empty or consist of alphanumeric characters",
            id="a label value must start with an alphanumeric character",
        ),
        pytest.param(
            f"podSelector:\n  matchLabels:\n    app: {'v' * 64}  # <-",
            "spec.podSelector.matchLabels.app",
            "must be no more than 63 characters",
            id="a label value has at most 63 characters",
        ),
        pytest.param(
            "podSelector:\n  matchLabels:\n    version: 2  # <-",
            "spec.podSelector.matchLabels.version",
            "label values must be strings, not a number (quote it: '2')",
            id="an unquoted number as a label value",
        ),
        pytest.param(
            "podSelector:\n  matchExpressions:\n    - {key: a, operator: In, values: [1]}  # <-",
            "spec.podSelector.matchExpressions[0].values[0]",
            "values must be strings, not a number (quote it: '1')",
            id="an unquoted number in values",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - ports:\n      - port: http_  # <-",
            "spec.ingress[0].ports[0].port",
            "'http_' is not a valid IANA service name: must contain only lowercase letters",
            id="a port name with an underscore",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - ports:\n      - port: HTTP  # <-",
            "spec.ingress[0].ports[0].port",
            "'HTTP' is not a valid IANA service name: must contain only lowercase letters",
            id="a port name in upper case",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - ports:\n      - port: a-very-long-name-x  # <-",
            "spec.ingress[0].ports[0].port",
            "'a-very-long-name-x' is not a valid IANA service name: must be no more than 15",
            id="a port name longer than 15 characters",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - ports:\n      - port: 80-90  # <-",
            "spec.ingress[0].ports[0].port",
            "'80-90' is not a valid IANA service name: must contain at least one letter (a-z)",
            id="a port name without a letter",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - ports:\n      - port: -http  # <-",
            "spec.ingress[0].ports[0].port",
            "'-http' is not a valid IANA service name: must not begin or end with a hyphen",
            id="a port name with a leading hyphen",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - ports:\n      - port: ht--tp  # <-",
            "spec.ingress[0].ports[0].port",
            "'ht--tp' is not a valid IANA service name: must not contain consecutive hyphens",
            id="a port name with consecutive hyphens",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - ports:\n      - port: 0  # <-",
            "spec.ingress[0].ports[0].port",
            "0 is not a valid port number: must be between 1 and 65535, inclusive",
            id="port 0",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - ports:\n      - port: '8080'  # <-",
            "spec.ingress[0].ports[0].port",
            "'8080' is not a valid IANA service name: must contain at least one letter (a-z) "
            "(a quoted number is a name; write the number unquoted: 8080)",
            id="a quoted number is a port name, and not a valid one (IsValidPortName)",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - ports:\n      - port: 80\n        endPort: 70000  # <-",
            "spec.ingress[0].ports[0].endPort",
            "70000 is not a valid port number",
            id="an endPort above 65535",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - ports:\n      - port: 80\n        endPort: 79  # <-",
            "spec.ingress[0].ports[0].endPort",
            "must be greater than or equal to port (80)",
            id="an endPort below its port",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - ports:\n      - port: http\n        endPort: 90  # <-",
            "spec.ingress[0].ports[0].endPort",
            "may not be specified when port is non-numeric",
            id="an endPort with a named port",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - ports:\n      - endPort: 90  # <-",
            "spec.ingress[0].ports[0].endPort",
            "may not be specified when port is not specified",
            id="an endPort without a port",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - ports:\n      - port: 1.5  # <-",
            "spec.ingress[0].ports[0].port",
            "must be a port number (an integer) or a port name, not a number (1.5)",
            id="a fractional port",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - from:\n      - ipBlock: {cidr: 10.0.0.0}  # <-",
            "spec.ingress[0].from[0].ipBlock.cidr",
            "'10.0.0.0' is not a valid CIDR",
            id="an address without a prefix length is not a CIDR",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - from:\n      - ipBlock: {cidr: 10.0.0.0/33}  # <-",
            "spec.ingress[0].from[0].ipBlock.cidr",
            "'10.0.0.0/33' is not a valid CIDR",
            id="a prefix length beyond the address",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - from:\n      - ipBlock: {except: [10.0.0.0/8]}  # <-",
            "spec.ingress[0].from[0].ipBlock.cidr",
            "required field is missing",
            id="an ipBlock without a cidr",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - from:\n      - ipBlock:\n          cidr: 10.0.0.0/16\n"
            "          except: [10.1.0.0/24]  # <-",
            "spec.ingress[0].from[0].ipBlock.except[0]",
            "'10.1.0.0/24' must be a strict subset of cidr 10.0.0.0/16",
            id="an except outside its cidr",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - from:\n      - ipBlock:\n          cidr: 10.0.0.0/16\n"
            "          except: [10.0.0.0/16]  # <-",
            "spec.ingress[0].from[0].ipBlock.except[0]",
            "'10.0.0.0/16' must be a strict subset of cidr 10.0.0.0/16",
            id="an except equal to its cidr",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - from:\n      - ipBlock:\n          cidr: 10.0.0.0/16\n"
            "          except: ['fd00::/64']  # <-",
            "spec.ingress[0].from[0].ipBlock.except[0]",
            "'fd00::/64' must be a strict subset of cidr 10.0.0.0/16 (another IP family)",
            id="an except of another IP family",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - from:\n      - ipBlock: {cidr: 10.0.0.0/8}  # <-\n"
            "        podSelector: {}",
            "spec.ingress[0].from[0]",
            "may not specify both ipBlock and another peer",
            id="a peer with an ipBlock and a selector",
        ),
        pytest.param(
            "podSelector: {}\ningress:\n  - from:\n      - {}  # <-",
            "spec.ingress[0].from[0]",
            "must specify a peer: podSelector, namespaceSelector or ipBlock",
            id="a peer with nothing set",
        ),
        pytest.param(
            "podSelector: {}\ningress: {}  # <-",
            "spec.ingress",
            "must be a list, not a mapping",
            id="rules that are not a list",
        ),
        pytest.param(
            "podSelector: []  # <-",
            "spec.podSelector",
            "must be a mapping, not a list",
            id="a selector that is not a mapping",
        ),
    ],
)
def test_policy_problems(tmp_path: Path, spec: str, field: str, reason: str) -> None:
    path = write(tmp_path, policy(spec))
    (problem,) = problems_of(path)
    assert (problem.file, problem.line, problem.document) == (str(path), marked_line(path), 1)
    assert problem.field == field
    assert reason in problem.reason
    assert f"{path}:{marked_line(path)}: {field}: " in str(problem)


def test_unknown_top_level_field_of_a_policy(tmp_path: Path) -> None:
    text = policy("podSelector: {}").replace("spec:", "specs:  # <-")
    path = write(tmp_path, text)
    (problem,) = problems_of(path)
    assert (problem.line, problem.field) == (marked_line(path), "specs")
    assert problem.reason.startswith("unknown field 'specs' (did you mean 'spec'?)")


def test_every_problem_of_a_policy_is_reported_at_once(tmp_path: Path) -> None:
    spec = """
    podselector: {}
    policyTypes: [Sideways]
    ingress:
      - from: [{}]
        ports: [{port: 0}, {port: x_y}]
    """
    found = problems_of(write(tmp_path, policy(spec)))
    assert [p.field for p in found] == [
        "spec.podselector",
        "spec.policyTypes[0]",
        "spec.ingress[0].from[0]",
        "spec.ingress[0].ports[0].port",
        "spec.ingress[0].ports[1].port",
    ]
    assert [p.line for p in found] == [7, 8, 10, 11, 11]


# --- Pods ---------------------------------------------------------------------------------------


def test_pod_fields(tmp_path: Path) -> None:
    text = """
    apiVersion: v1
    kind: Pod
    metadata:
      name: web-1
      namespace: shop
      uid: 0b4e5f4c-0000-4000-8000-000000000001
      labels: {app: web, empty: ""}
    spec:
      nodeName: node-a
      hostNetwork: true
      initContainers:
        - name: init
          ports: [{containerPort: 1, name: init}]
      containers:
        - name: a
          ports:
            - {containerPort: 8080, name: http}
            - {containerPort: 53, protocol: UDP}
        - name: b
          ports: [{containerPort: 9090, name: metrics, protocol: SCTP}]
    status:
      phase: Pending
      podIP: 10.244.0.5
      podIPs: [{ip: 10.244.0.5}, {ip: "fd00::5"}]
    """
    (read,) = load_snapshot([write(tmp_path, text)]).pods
    assert (read.namespace, read.name, read.node, read.phase) == (
        "shop",
        "web-1",
        "node-a",
        "Pending",
    )
    assert read.labels == {"app": "web", "empty": ""}
    assert read.uid == "0b4e5f4c-0000-4000-8000-000000000001"
    assert read.host_network is True
    assert read.ips == ("10.244.0.5", "fd00::5")
    assert read.ports == (
        ContainerPort(8080, "TCP", "http"),
        ContainerPort(53, "UDP", None),
        ContainerPort(9090, "SCTP", "metrics"),
    )
    assert read.workload is None


def test_pod_defaults(tmp_path: Path) -> None:
    text = "apiVersion: v1\nkind: Pod\nmetadata: {name: lone}\nspec: {containers: [{name: c}]}\n"
    snapshot = load_snapshot([write(tmp_path, text)])
    (read,) = snapshot.pods
    assert (read.namespace, read.phase, read.node, read.ips, read.ports) == (
        "default",
        "Running",
        "",
        (),
        (),
    )
    assert read.uid == synthetic_uid("default", "lone")
    again = load_snapshot([write(tmp_path, text, "again.yaml")]).pods[0]
    assert again.uid == read.uid, "a pod without a uid gets the same uid on every read"
    assert synthetic_uid("default", "other") != read.uid


@pytest.mark.parametrize(
    ("spec", "field", "reason"),
    [
        pytest.param(
            "containers:\n  - ports: [{containerPort: 0}]  # <-",
            "spec.containers[0].ports[0].containerPort",
            "0 is not a valid port number",
            id="container port 0",
        ),
        pytest.param(
            "containers:\n  - ports: [{name: http}]  # <-",
            "spec.containers[0].ports[0].containerPort",
            "required field is missing",
            id="a container port without a number",
        ),
        pytest.param(
            "containers:\n  - ports: [{containerPort: 80, protocol: udp}]  # <-",
            "spec.containers[0].ports[0].protocol",
            "unsupported value 'udp'",
            id="a container port with an unknown protocol",
        ),
        pytest.param(
            "containers:\n  - ports: [{containerPort: 80, name: Web_1}]  # <-",
            "spec.containers[0].ports[0].name",
            "'Web_1' is not a valid IANA service name",
            id="a container port name that is not an IANA service name",
        ),
        pytest.param(
            "containers:\n  - ports: [{containerPort: 80, name: http}]\n"
            "  - ports: [{containerPort: 81, name: http}]  # <-",
            "spec.containers[1].ports[0].name",
            "duplicate port name 'http' in the pod (also spec.containers[0].ports[0].name)",
            id="a container port name used twice in a pod",
        ),
        pytest.param(
            "containers: {}  # <-",
            "spec.containers",
            "must be a list, not a mapping",
            id="containers that are not a list",
        ),
    ],
)
def test_pod_problems(tmp_path: Path, spec: str, field: str, reason: str) -> None:
    path = write(tmp_path, pod(spec))
    (problem,) = problems_of(path)
    assert (problem.file, problem.line, problem.field) == (str(path), marked_line(path), field)
    assert reason in problem.reason


@pytest.mark.parametrize(
    ("labels", "extra", "field", "reason"),
    [
        pytest.param(
            "{app: web, 'a b': x}  # <-",
            "",
            'metadata.labels["a b"]',
            "invalid label key 'a b'",
            id="a pod label key with a space",
        ),
        pytest.param(
            "{enabled: true}  # <-",
            "",
            "metadata.labels.enabled",
            "label values must be strings, not true/false (quote it: 'True')",
            id="a YAML boolean as a label value",
        ),
        pytest.param(
            "{}",
            "status: {podIP: 10.244.0.300}  # <-\n",
            "status.podIP",
            "'10.244.0.300' is not a valid IP address",
            id="a pod IP that is no address",
        ),
    ],
)
def test_pod_metadata_problems(
    tmp_path: Path, labels: str, extra: str, field: str, reason: str
) -> None:
    path = write(tmp_path, pod(labels=labels, extra=extra))
    (problem,) = problems_of(path)
    assert (problem.file, problem.line, problem.field) == (str(path), marked_line(path), field)
    assert reason in problem.reason


# --- workloads ----------------------------------------------------------------------------------


def workload(kind: str, api: str, spec: str, *, name: str = "api", owner: str = "") -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return (
        f"apiVersion: {api}\nkind: {kind}\nmetadata:\n  name: {name}\n  namespace: shop\n"
        f"{owner}spec:\n{body}\n"
    )


TEMPLATE = """
template:
  metadata: {labels: {app: api}}
  spec:
    containers: [{name: c, ports: [{containerPort: 8080, name: http}]}]
"""


@pytest.mark.parametrize(
    ("kind", "api", "spec", "replicas"),
    [
        pytest.param(
            "Deployment",
            "apps/v1",
            "replicas: 3\nselector: {matchLabels: {app: api}}" + TEMPLATE,
            3,
            id="a Deployment stands for spec.replicas pods",
        ),
        pytest.param(
            "Deployment",
            "apps/v1",
            "selector: {matchLabels: {app: api}}" + TEMPLATE,
            1,
            id="a Deployment without replicas stands for one pod",
        ),
        pytest.param(
            "StatefulSet",
            "apps/v1",
            "replicas: 2\nserviceName: api\nselector: {matchLabels: {app: api}}" + TEMPLATE,
            2,
            id="a StatefulSet",
        ),
        pytest.param(
            "DaemonSet",
            "apps/v1",
            "selector: {matchLabels: {app: api}}" + TEMPLATE,
            1,
            id="a DaemonSet stands for one pod",
        ),
        pytest.param(
            "ReplicaSet",
            "apps/v1",
            "replicas: 4\nselector: {matchLabels: {app: api}}" + TEMPLATE,
            4,
            id="a ReplicaSet",
        ),
        pytest.param(
            "ReplicationController",
            "v1",
            "replicas: 2\nselector: {app: api}" + TEMPLATE,
            2,
            id="a ReplicationController with its plain selector map",
        ),
        pytest.param(
            "Job",
            "batch/v1",
            "parallelism: 5" + TEMPLATE,
            5,
            id="a Job stands for parallelism pods",
        ),
        pytest.param("Job", "batch/v1", TEMPLATE, 1, id="a Job without parallelism"),
        pytest.param(
            "CronJob",
            "batch/v1",
            "schedule: '* * * * *'\njobTemplate:\n  spec:\n"
            + textwrap.indent(TEMPLATE.strip("\n"), "    "),
            1,
            id="a CronJob through spec.jobTemplate.spec.template",
        ),
    ],
)
def test_workload_stands_for_its_pods(
    tmp_path: Path, kind: str, api: str, spec: str, replicas: int
) -> None:
    snapshot = load_snapshot([write(tmp_path, workload(kind, api, spec))])
    (read,) = snapshot.pods
    assert (read.namespace, read.name, read.workload, read.replicas) == (
        "shop",
        "api",
        f"{kind}/api",
        replicas,
    )
    assert read.labels == {"app": "api"}
    assert read.ports == (ContainerPort(8080, "TCP", "http"),)
    assert read.uid == synthetic_uid("shop", "api")


DEPLOYMENT = workload(
    "Deployment", "apps/v1", "replicas: 3\nselector: {matchLabels: {app: api}}" + TEMPLATE
)


@pytest.mark.parametrize(
    ("pod_text", "expected"),
    [
        pytest.param(
            pod(name="api-1", labels="{app: api, pod-template-hash: abc}"),
            ["api-1"],
            id="a Pod the workload's selector matches is given: the template is not added",
        ),
        pytest.param(
            pod(name="api-1", labels="{app: other}"),
            ["api-1", "api"],
            id="a Pod the selector does not match leaves the template in",
        ),
        pytest.param(
            pod(name="api-1", labels="{app: api}").replace("namespace: shop", "namespace: x"),
            ["api-1", "api"],
            id="a matching Pod in another namespace is not the workload's",
        ),
    ],
)
def test_given_pods_replace_the_template(
    tmp_path: Path, pod_text: str, expected: list[str]
) -> None:
    snapshot = load_snapshot([write(tmp_path, DEPLOYMENT + "---\n" + pod_text)])
    assert [p.name for p in snapshot.pods] == expected


def test_a_workload_without_labels_is_never_taken_as_given(tmp_path: Path) -> None:
    controller = workload(
        "ReplicationController", "v1", "template:\n  spec: {containers: [{name: c}]}", name="rc"
    )
    snapshot = load_snapshot([write(tmp_path, controller + "---\n" + pod(name="other"))])
    assert [p.name for p in snapshot.pods] == ["other", "rc"]


def test_a_workload_owned_by_a_listed_workload_is_not_counted_twice(tmp_path: Path) -> None:
    owner = (
        "  ownerReferences:\n    - {apiVersion: apps/v1, kind: Deployment, name: api,"
        " controller: true, uid: x}\n"
    )
    replica_set = workload(
        "ReplicaSet",
        "apps/v1",
        "replicas: 3\nselector: {matchLabels: {app: api}}" + TEMPLATE,
        name="api-5d8f",
        owner=owner,
    )
    snapshot = load_snapshot([write(tmp_path, DEPLOYMENT + "---\n" + replica_set)])
    assert [p.workload for p in snapshot.pods] == ["Deployment/api"]


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        pytest.param(
            workload(
                "Deployment",
                "apps/v1",
                "selector: {matchLabels: {app: other}}\ntemplate:\n"
                "  metadata: {labels: {app: api}}  # <-",
            ),
            "spec.template.metadata.labels",
            "selector app=other does not match the template labels",
            id="a selector that does not match the template labels",
        ),
        pytest.param(
            workload("Deployment", "apps/v1", "replicas: 1" + TEMPLATE).replace(
                "spec:", "spec:  # <-", 1
            ),
            "spec.selector",
            "required field is missing",
            id="an apps/v1 workload without a selector",
        ),
        pytest.param(
            workload("Deployment", "apps/v1", "selector: {matchLabels: {app: api}}").replace(
                "spec:", "spec:  # <-", 1
            ),
            "spec.template",
            "required field is missing",
            id="a workload without a pod template",
        ),
        pytest.param(
            workload("Deployment", "apps/v1", "selector: {}  # <-" + TEMPLATE),
            "spec.selector",
            "empty selector is invalid for a Deployment",
            id="an empty Deployment selector",
        ),
        pytest.param(
            workload(
                "Deployment",
                "apps/v1",
                "replicas: -1  # <-\nselector: {matchLabels: {app: api}}" + TEMPLATE,
            ),
            "spec.replicas",
            "must be greater than or equal to 0, not -1",
            id="negative replicas",
        ),
        pytest.param(
            workload(
                "Deployment",
                "apps/v1",
                "selector: {matchLabels: {app: api}}\ntemplate:\n  metadata: {labels: {app: api}}\n"
                "  spec:\n    containers: [{ports: [{containerPort: 99999}]}]  # <-",
            ),
            "spec.template.spec.containers[0].ports[0].containerPort",
            "99999 is not a valid port number",
            id="a bad container port in a template",
        ),
        pytest.param(
            workload("Deployment", "apps/v1", "selector: {matchLabels: {app: api}}" + TEMPLATE)
            + "---\n"
            + workload(
                "StatefulSet", "apps/v1", "selector: {matchLabels: {app: api}}" + TEMPLATE
            ).replace("name: api", "name: api  # <-"),
            "metadata.name",
            "StatefulSet shop/api would stand for a pod named shop/api, but Deployment shop/api"
            " already does",
            id="two workloads that would stand for pods of the same name",
        ),
    ],
)
def test_workload_problems(tmp_path: Path, text: str, field: str, reason: str) -> None:
    path = write(tmp_path, text)
    (problem,) = problems_of(path)
    assert (problem.file, problem.line, problem.field) == (str(path), marked_line(path), field)
    assert reason in problem.reason


# --- namespaces ---------------------------------------------------------------------------------


def test_namespaces_declared_and_referenced(tmp_path: Path) -> None:
    text = """
    apiVersion: v1
    kind: Namespace
    metadata:
      name: shop
      labels: {team: shop, kubernetes.io/metadata.name: wrong}
    ---
    apiVersion: v1
    kind: Pod
    metadata: {name: a, namespace: pods-only}
    ---
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: p, namespace: policies-only}
    spec: {podSelector: {}}
    ---
    apiVersion: flowproof.dev/v1alpha1
    kind: FlowExpectations
    metadata: {name: e, namespace: intents}
    spec:
      flows:
        - name: f
          from: {namespace: from-only}
          to: {namespace: to-only}
          ports: [80]
          expect: deny
    """
    snapshot = load_snapshot([write(tmp_path, text)])
    assert snapshot.namespaces["shop"].labels == {"team": "shop", NAMESPACE_NAME_LABEL: "shop"}
    referenced = ["from-only", "intents", "pods-only", "policies-only", "to-only"]
    for name in referenced:
        assert snapshot.namespaces[name].labels == {NAMESPACE_NAME_LABEL: name}
    assert list(snapshot.namespaces) == sorted([*referenced, "shop"])


def test_namespace_name_must_be_a_dns_label(tmp_path: Path) -> None:
    path = write(tmp_path, "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: Shop.1  # <-\n")
    (problem,) = problems_of(path)
    assert (problem.line, problem.field) == (marked_line(path), "metadata.name")
    assert "'Shop.1' is not a valid name: a lowercase RFC 1123 label" in problem.reason


# --- documents and files ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        pytest.param(
            "apiVersion: v1\nkind: Pod\nmetadata:  # <-\n  labels: {a: b}\n",
            "metadata.name",
            "required field is missing",
            id="an object without metadata.name",
        ),
        pytest.param(
            "apiVersion: v1  # <-\nmetadata: {name: a}\n",
            "kind",
            "required field is missing",
            id="an object without kind",
        ),
        pytest.param(
            "kind: Pod  # <-\nmetadata: {name: a}\n",
            "apiVersion",
            "required field is missing",
            id="an object without apiVersion",
        ),
        pytest.param(
            "apiVersion: networking.k8s.io/v1beta1  # <-\nkind: NetworkPolicy\nmetadata: {name: a}\n",
            "apiVersion",
            "'networking.k8s.io/v1beta1' is not supported for NetworkPolicy: use"
            " networking.k8s.io/v1",
            id="a version the kind is not served in",
        ),
        pytest.param(
            "apiVersion: extensions/v1beta1  # <-\nkind: NetworkPolicy\nmetadata: {name: a}\n",
            "apiVersion",
            "'extensions/v1beta1' no longer serves NetworkPolicy: use networking.k8s.io/v1",
            id="a retired API group is an error, not another kind",
        ),
        pytest.param(
            "apiVersion: flowproof.dev/v1  # <-\nkind: FlowExpectations\nmetadata: {name: a}\n",
            "apiVersion",
            "'flowproof.dev/v1' is not supported for FlowExpectations: use flowproof.dev/v1alpha1",
            id="an unknown FlowExpectations version",
        ),
    ],
)
def test_header_problems(tmp_path: Path, text: str, field: str, reason: str) -> None:
    path = write(tmp_path, text)
    (problem,) = problems_of(path)
    assert (problem.file, problem.line, problem.document) == (str(path), marked_line(path), 1)
    assert problem.field == field
    assert reason in problem.reason


@pytest.mark.parametrize(
    ("text", "reason", "document"),
    [
        pytest.param(
            "apiVersion: v1\nkind: Pod\nmetadata: name: a  # <-\n",
            "invalid YAML: mapping values are not allowed in this context",
            1,
            id="broken YAML names the line the parser stopped at",
        ),
        pytest.param(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: Pod\n"
            "metadata: {name: [a,\n  b}  # <-\n",
            "invalid YAML: while parsing a flow sequence (line 6) did not find expected ',' or ']'",
            2,
            id="broken YAML also names the line of what was left open",
        ),
        pytest.param(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n- a  # <-\n- b\n",
            "a manifest must be a mapping (a Kubernetes object), not a list",
            2,
            id="a document that is a list",
        ),
        pytest.param(
            "just text  # <-\n",
            "a manifest must be a mapping (a Kubernetes object), not a string",
            1,
            id="a document that is a scalar",
        ),
        pytest.param(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  name: b  # <-\n",
            "duplicate key 'name' (first at line 4)",
            1,
            id="a duplicate mapping key, which YAML parsers silently resolve",
        ),
        pytest.param(
            "kind: List\napiVersion: v1\nitems: {}  # <-\n",
            "must be a list, not a mapping",
            1,
            id="a List whose items are not a list",
        ),
    ],
)
def test_document_problems(tmp_path: Path, text: str, reason: str, document: int) -> None:
    path = write(tmp_path, text)
    (problem,) = problems_of(path)
    assert (problem.file, problem.line, problem.document) == (
        str(path),
        marked_line(path),
        document,
    )
    assert reason in problem.reason


def test_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    same_document = (
        "apiVersion: v1\nkind: List\nitems:\n"
        "  - {apiVersion: v1, kind: Namespace, metadata: {name: a, labels: &c {team: a, tier: x}}}\n"
        "  - apiVersion: v1\n    kind: Namespace\n    metadata:\n      name: b\n"
        "      labels: {<<: *c, tier: y}\n"
    )
    snapshot = load_snapshot([write(tmp_path, same_document, "merge.yaml")])
    assert snapshot.namespaces["b"].labels == {"team": "a", "tier": "y", NAMESPACE_NAME_LABEL: "b"}


def test_duplicate_objects_across_files(tmp_path: Path) -> None:
    first = write(tmp_path, policy("podSelector: {}"), "a.yaml")
    second = write(tmp_path, "# again\n" + policy("podSelector: {}"), "b.yaml")
    other_namespace = write(tmp_path, policy("podSelector: {}", namespace="x"), "c.yaml")
    other_kind = write(tmp_path, pod(name="p"), "d.yaml")
    (problem,) = problems_of(first, second, other_namespace, other_kind)
    assert (problem.file, problem.line, problem.field) == (str(second), 5, "metadata.name")
    assert problem.reason == f"duplicate NetworkPolicy shop/p (first at {first}:1)"


def test_a_bad_document_anywhere_leaves_no_snapshot(tmp_path: Path) -> None:
    write(tmp_path, policy("podSelector: {}"), "dir/a-good.yaml")
    write(tmp_path, pod(name="ok"), "dir/nested/b-good.yaml")
    bad = write(
        tmp_path, pod(name="ok2") + "---\n" + pod("containers: 3", name="bad"), "dir/z.yaml"
    )
    broken = write(tmp_path, "a: [\n", "other.yaml")
    with pytest.raises(InputError) as info:
        load_snapshot([tmp_path / "dir", broken])
    found = info.value.problems
    assert [(p.file, p.document, p.field) for p in found] == [
        (str(bad), 2, "spec.containers"),
        (str(broken), 1, None),
    ]
    assert str(info.value) == "\n".join(p.render() for p in found)
    assert info.value.reason == "2 problems in the input; nothing was evaluated"


def test_problems_are_sorted_by_file_then_line(tmp_path: Path) -> None:
    spec = "podSelector: {}\npolicyTypes: [Sideways]\ningress:\n  - from: [{}]\n"
    path = write(tmp_path, policy(spec.replace("podSelector: {}", "podselector: {}")))
    assert [p.line for p in problems_of(path)] == [7, 8, 10]


def test_directory_walk(tmp_path: Path) -> None:
    write(tmp_path, pod(name="b"), "m/b.yml")
    write(tmp_path, pod(name="a"), "m/sub/a.yaml")
    write(tmp_path, "not: [a manifest", "m/.hidden/x.yaml")
    write(tmp_path, "ignored", "m/notes.txt")
    write(tmp_path, json.dumps(json.loads(json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "c", "namespace": "shop"},
    })), indent="\t"), "m/c.json")  # fmt: skip
    documents = load_documents([tmp_path / "m"])
    assert [(d.file, d.obj["metadata"]["name"]) for d in documents] == [
        (str(tmp_path / "m" / "b.yml"), "b"),
        (str(tmp_path / "m" / "c.json"), "c"),
        (str(tmp_path / "m" / "sub" / "a.yaml"), "a"),
    ]


def test_a_file_given_twice_is_read_once(tmp_path: Path) -> None:
    path = write(tmp_path, pod(), "m/a.yaml")
    assert len(load_snapshot([tmp_path / "m", path]).pods) == 1


def test_a_missing_path(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path / "missing.yaml")
    assert (problem.file, problem.reason) == (
        str(tmp_path / "missing.yaml"),
        "no such file or directory",
    )


def test_a_directory_without_manifests(tmp_path: Path) -> None:
    write(tmp_path, "text", "empty/notes.txt")
    (problem,) = problems_of(tmp_path / "empty")
    assert (problem.file, problem.reason) == (
        str(tmp_path / "empty"),
        "no *.yaml, *.yml or *.json manifest in this directory",
    )


def test_multi_document_yaml(tmp_path: Path) -> None:
    text = "---\n# leading separator and comment\n" + pod(name="a") + "---\n---\n" + pod(name="b")
    documents = load_documents([write(tmp_path, text)])
    assert [(d.index, d.line, d.obj["metadata"]["name"]) for d in documents] == [
        (1, 3, "a"),
        (3, 13, "b"),
    ]


def test_list_and_typed_list(tmp_path: Path) -> None:
    text = """
    apiVersion: v1
    kind: List
    items:
      - apiVersion: v1
        kind: Namespace
        metadata: {name: shop}
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: p, namespace: shop}
        spec: {podSelector: {}}
    ---
    apiVersion: v1
    kind: PodList
    metadata: {resourceVersion: "1"}
    items:
      - metadata: {name: a, namespace: shop}
      - metadata: {name: b, namespace: shop}
        spec:
          containers: [{ports: [{containerPort: 0}]}]
    """
    path = write(tmp_path, text)
    with pytest.raises(InputError) as info:
        load_snapshot([path])
    (problem,) = info.value.problems
    assert (problem.line, problem.document) == (19, 2)
    assert problem.field == "items[1].spec.containers[0].ports[0].containerPort"

    documents = load_documents([path])
    assert [(d.key, d.line, d.prefix) for d in documents] == [
        (("Namespace", "", "shop"), 4, ("items", 0)),
        (("NetworkPolicy", "shop", "p"), 7, ("items", 1)),
        (("Pod", "shop", "a"), 16, ("items", 0)),
        (("Pod", "shop", "b"), 17, ("items", 1)),
    ]
    assert documents[2].obj["apiVersion"] == "v1", "typed list items take the list's apiVersion"
    assert documents[3].line_of(("spec", "containers", 0)) == 19
    good = snapshot_from_documents(documents[:3])
    assert [p.name for p in good.pods] == ["a"]
    assert [p.key for p in good.policies] == ["shop/p"]


def test_kustomize_build_output(tmp_path: Path) -> None:
    # What `kustomize build` prints: sorted keys, `---` between objects, kinds interleaved.
    text = """
    apiVersion: v1
    kind: Namespace
    metadata:
      labels:
        team: shop
      name: shop
    ---
    apiVersion: v1
    kind: Service
    metadata:
      name: api
      namespace: shop
    spec:
      ports:
      - port: 80
      selector:
        app: api
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata:
      labels:
        app.kubernetes.io/part-of: shop
      name: api
      namespace: shop
    spec:
      selector:
        matchLabels:
          app: api
      template:
        metadata:
          labels:
            app: api
        spec:
          containers:
          - image: api:1
            name: api
            ports:
            - containerPort: 8080
              name: http
    ---
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata:
      name: api
      namespace: shop
    spec:
      ingress:
      - from:
        - podSelector: {}
      podSelector:
        matchLabels:
          app: api
    ---
    apiVersion: crd.projectcalico.org/v1
    kind: NetworkPolicy
    metadata:
      name: calico
      namespace: shop
    spec:
      selector: all()
    """
    path = write(tmp_path, text)
    snapshot = load_snapshot([path])
    assert snapshot.namespaces["shop"].labels["team"] == "shop"
    assert [p.workload for p in snapshot.pods] == ["Deployment/api"]
    assert [p.key for p in snapshot.policies] == ["shop/api"], "Calico's NetworkPolicy is not ours"
    assert [u.key for u in snapshot.unmodelled] == [
        "NetworkPolicy.crd.projectcalico.org shop/calico"
    ]
    lines = path.read_text().splitlines()
    service = lines.index("kind: Service") + 1
    calico = lines.index("apiVersion: crd.projectcalico.org/v1") + 2
    assert snapshot.warnings == (
        f"{path}:{service}: kind: 'Service' is ignored: flowproof does not read this kind",
        f"{path}:{calico}: kind: NetworkPolicy shop/calico (crd.projectcalico.org/v1) is a policy "
        "of Calico that flowproof does not model: flows of pods of namespace shop get an unknown "
        "model (MODEL_INCOMPLETE), never drift",
    )


# --- converters from API dicts ------------------------------------------------------------------


def test_converters_from_api_dicts() -> None:
    where = Where(file="api:namespaces/shop/networkpolicies/p")
    obj = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "shop"},
        "spec": {"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]},
    }
    read = policy_from_dict(obj, where)
    assert (read.key, read.policy_types, read.source) == (
        "shop/p",
        ("ingress", "egress"),
        "api:namespaces/shop/networkpolicies/p",
    )
    namespace = namespace_from_dict(
        {"metadata": {"name": "shop"}}, Where(file="api:namespaces/shop")
    )
    assert namespace.labels == {NAMESPACE_NAME_LABEL: "shop"}
    read_pod = pod_from_dict(
        {"metadata": {"name": "a", "namespace": "shop", "uid": "u-1"}, "status": {"podIP": "::1"}},
        Where(file="api:namespaces/shop/pods/a"),
    )
    assert (read_pod.uid, read_pod.ips) == ("u-1", ("::1",))
    (template,) = pods_from_workload(
        {
            "kind": "DaemonSet",
            "metadata": {"name": "agent", "namespace": "kube-system"},
            "spec": {
                "selector": {"matchLabels": {"app": "agent"}},
                "template": {"metadata": {"labels": {"app": "agent"}}},
            },
        },
        Where(file="api:namespaces/kube-system/daemonsets/agent"),
    )
    assert (template.workload, template.replicas) == ("DaemonSet/agent", 1)
    selector = selector_from_dict({"matchLabels": {"a": "b"}}, where, ("spec", "podSelector"))
    assert selector == LabelSelector((("a", "b"),))


def test_converter_problems_name_the_api_object() -> None:
    where = Where(file="api:namespaces/shop/networkpolicies/p")
    obj = {"metadata": {"name": "p", "namespace": "shop"}, "spec": {"podSelector": {"x": 1}}}
    with pytest.raises(InputError) as info:
        policy_from_dict(obj, where)
    (problem,) = info.value.problems
    assert (problem.file, problem.line, problem.field) == (
        "api:namespaces/shop/networkpolicies/p",
        None,
        "spec.podSelector.x",
    )
    assert str(problem).startswith("api:namespaces/shop/networkpolicies/p: spec.podSelector.x: ")
    with pytest.raises(InputError) as info:
        selector_from_dict({"matchLabels": {"a": "-"}}, where, ("spec", "podSelector"))
    assert info.value.problems[0].field == "spec.podSelector.matchLabels.a"
    with pytest.raises(InputError) as info:
        pods_from_workload({"kind": "Service", "metadata": {"name": "x"}}, where)
    assert "unsupported value 'Service'" in info.value.problems[0].reason


@pytest.mark.parametrize(
    ("path", "text"),
    [
        pytest.param((), "", id="the empty path"),
        pytest.param(("spec", "ingress", 0, "from"), "spec.ingress[0].from", id="keys and indexes"),
        pytest.param(
            ("matchLabels", "app.kubernetes.io/name"),
            'matchLabels["app.kubernetes.io/name"]',
            id="label keys with dots and slashes are quoted",
        ),
    ],
)
def test_render_field(path: tuple[str | int, ...], text: str) -> None:
    assert render_field(path) == text


# --- the shipped example and scale -------------------------------------------------------------


def test_example_shop_loads_cleanly() -> None:
    snapshot = load_snapshot([EXAMPLE])
    assert sorted(snapshot.namespaces) == ["kube-system", "monitoring", "shop"]
    assert snapshot.namespaces["shop"].labels == {"team": "shop", NAMESPACE_NAME_LABEL: "shop"}
    assert {p.key: p.workload for p in snapshot.pods} == {
        "shop/frontend": "Deployment/frontend",
        "shop/api": "Deployment/api",
        "shop/db": "StatefulSet/db",
        "shop/batch": "CronJob/batch",
        "monitoring/prometheus": "Deployment/prometheus",
        "kube-system/coredns": "Deployment/coredns",
    }
    coredns = snapshot.pod("kube-system/coredns")
    assert coredns is not None
    assert coredns.named_port("dns", "UDP") == 53
    assert coredns.named_port("dns-tcp", "TCP") == 53
    assert len(snapshot.policies) == 9
    (expectations,) = snapshot.expectations
    assert expectations.key == "shop/shop"
    assert len(expectations.flows) == 10


def test_example_shop_expectations_all_hold() -> None:
    from collector.core.checking import check

    snapshot = load_snapshot(
        [EXAMPLE / "manifests", EXAMPLE / "policies", EXAMPLE / "expectations.yaml"]
    )
    report = check(snapshot)
    assert report.problems == ()
    assert {c.flow.flow for c in report.checks} == {f.name for f in snapshot.expectations[0].flows}
    assert [c.flow.key for c in report.checks if c.status != "PASS"] == []


@pytest.mark.slow
def test_ten_thousand_pods_and_five_hundred_policies_are_all_read(tmp_path: Path) -> None:
    # How fast: bench/engine_bench.py (docs/benchmarks.md), never a timed test.
    pod_text = (
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: app{a}-{i}\n  namespace: ns{n}\n"
        "  uid: uid-{i}\n  labels: {{app: app{a}, pod-template-hash: h{a}}}\nspec:\n"
        "  nodeName: node{node}\n  containers:\n  - name: c\n    image: x:1\n    ports:\n"
        "    - {{name: http, containerPort: 8080}}\n    - {{name: metrics, containerPort: 9090}}\n"
        "status:\n  phase: Running\n  podIP: 10.244.{hi}.{lo}\n"
    )
    policy_text = (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p{i}\n"
        "  namespace: ns{n}\nspec:\n  podSelector: {{matchLabels: {{app: app{i}}}}}\n"
        "  policyTypes: [Ingress, Egress]\n  ingress:\n  - from:\n"
        "    - podSelector: {{matchLabels: {{app: app{j}}}}}\n"
        "    - namespaceSelector: {{matchExpressions: [{{key: team, operator: In, values: [a]}}]}}\n"
        "    ports: [{{port: http}}, {{port: 9000, endPort: 9100}}]\n"
        "  egress:\n  - to: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}}}]\n"
        "    ports: [{{port: 53, protocol: UDP}}]\n"
    )
    pods = "---\n".join(
        pod_text.format(a=i % 500, i=i, n=i % 50, node=i % 20, hi=i // 250, lo=i % 250 + 1)
        for i in range(10_000)
    )
    policies = "---\n".join(policy_text.format(i=i, n=i % 50, j=(i + 1) % 500) for i in range(500))
    (tmp_path / "pods.yaml").write_text(pods)
    (tmp_path / "policies.yaml").write_text(policies)
    snapshot = load_snapshot([tmp_path])
    assert (len(snapshot.pods), len(snapshot.policies)) == (10_000, 500)
    assert snapshot.pod("ns7/app457-9957") is not None
    assert {p.namespace for p in snapshot.policies} == {f"ns{n}" for n in range(50)}
