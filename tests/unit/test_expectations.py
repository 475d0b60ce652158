"""The FlowExpectations format: what each field means, and every way a document is rejected."""

from __future__ import annotations

import ipaddress
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from collector.core.model import (
    Expectations,
    ExternalTarget,
    FlowExpectation,
    HttpCheck,
    LabelSelector,
    PodTarget,
    PortSpec,
    Requirement,
)
from collector.reading.expectations import expectations_from_dict, schema
from collector.reading.fields import Where
from collector.reading.manifests import load_documents, load_snapshot
from flowproof.errors import InputError

MARK = "# <-"  # marks the line a problem must be reported at
HEADER = (
    "apiVersion: flowproof.dev/v1alpha1\nkind: FlowExpectations\n"
    "metadata: {name: intents, namespace: shop}\nspec:\n  flows:\n"
)
APP = {"app": "api"}


def document(flows: str, header: str = HEADER) -> str:
    return header + textwrap.indent(textwrap.dedent(flows).strip("\n"), "    ") + "\n"


def read(tmp_path: Path, text: str) -> Expectations:
    path = tmp_path / "e.yaml"
    path.write_text(text)
    (expectations,) = load_snapshot([path]).expectations
    return expectations


def problems_of(tmp_path: Path, text: str) -> tuple[Path, tuple[InputError, ...]]:
    path = tmp_path / "e.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        load_snapshot([path])
    return path, info.value.problems


def marked_line(path: Path) -> int:
    lines = [i for i, line in enumerate(path.read_text().splitlines(), 1) if MARK in line]
    assert len(lines) == 1, f"the test text must mark exactly one line with {MARK!r}"
    return lines[0]


def pods(namespace: str | None = "shop", **labels: str) -> PodTarget:
    return PodTarget(namespace=namespace, pod_selector=LabelSelector(tuple(sorted(labels.items()))))


# --- what a flow means --------------------------------------------------------------------------


def test_a_whole_document(tmp_path: Path) -> None:
    text = document(
        """
        - name: frontend-to-api
          from: {namespace: shop, podSelector: {matchLabels: {app: frontend}}}
          to: {podSelector: {matchLabels: {app: api}}}
          ports: ["8080/TCP"]
          http: {path: /healthz, expectStatus: [200, 204]}
          expect: allow
        - name: no-db
          from: {}
          to: {podSelector: {matchLabels: {app: db}}}
          ports: [5432]
          expect: deny
          allowEmpty: true
        """
    )
    expectations = read(tmp_path, "# intents\n" + text)
    assert (expectations.namespace, expectations.name, expectations.key) == (
        "shop",
        "intents",
        "shop/intents",
    )
    assert expectations.source == f"{tmp_path / 'e.yaml'}:2"
    assert expectations.flows == (
        FlowExpectation(
            name="frontend-to-api",
            source=pods(app="frontend"),
            destination=pods(app="api"),
            ports=(PortSpec("TCP", 8080),),
            expect="allow",
            http=HttpCheck("/healthz", (200, 204)),
        ),
        FlowExpectation(
            name="no-db",
            source=pods(),
            destination=pods(app="db"),
            ports=(PortSpec("TCP", 5432),),
            expect="deny",
            allow_empty=True,
        ),
    )


@pytest.mark.parametrize(
    ("ports", "expected"),
    [
        pytest.param("[8080]", (PortSpec("TCP", 8080),), id="a number is a TCP port"),
        pytest.param('["8080"]', (PortSpec("TCP", 8080),), id="a string number is a TCP port"),
        pytest.param('["53/UDP"]', (PortSpec("UDP", 53),), id="a port with a protocol"),
        pytest.param('["9/SCTP"]', (PortSpec("SCTP", 9),), id="SCTP"),
        pytest.param('["8000-8080/TCP"]', (PortSpec("TCP", 8000, 8080),), id="a range of ports"),
        pytest.param('["80-80"]', (PortSpec("TCP", 80),), id="a range of one port is that port"),
        pytest.param(
            '["http/TCP", "dns"]',
            (PortSpec("TCP", name="http"), PortSpec("TCP", name="dns")),
            id="named ports, resolved later on the destination pods",
        ),
        pytest.param(
            '[80, "80/TCP", "80"]', (PortSpec("TCP", 80),), id="the same port given twice is one"
        ),
    ],
)
def test_ports(tmp_path: Path, ports: str, expected: tuple[PortSpec, ...]) -> None:
    text = document(f"- {{name: f, from: {{}}, to: {{}}, ports: {ports}, expect: allow}}")
    assert read(tmp_path, text).flows[0].ports == expected


@pytest.mark.parametrize(
    ("flow", "source", "destination", "ports"),
    [
        pytest.param(
            "from: {}\nto: {}\nports: [80]",
            pods(),
            pods(),
            (PortSpec("TCP", 80),),
            id="no namespace means the document's; no podSelector means every pod",
        ),
        pytest.param(
            "from: {namespace: other}\nto: {namespace: shop, podSelector: {matchLabels: {app: api}}}"
            "\nports: [80]",
            pods("other"),
            pods(app="api"),
            (PortSpec("TCP", 80),),
            id="a namespace by name",
        ),
        pytest.param(
            "from: {namespaceSelector: {matchLabels: {team: a}}}\nto: {}\nports: [80]",
            PodTarget(namespace_selector=LabelSelector((("team", "a"),))),
            pods(),
            (PortSpec("TCP", 80),),
            id="namespaces by selector",
        ),
        pytest.param(
            "from: {podSelector: {matchExpressions: [{key: tier, operator: NotIn, values: [db]}]}}"
            "\nto: {}\nports: [80]",
            PodTarget(
                namespace="shop",
                pod_selector=LabelSelector((), (Requirement("tier", "NotIn", ("db",)),)),
            ),
            pods(),
            (PortSpec("TCP", 80),),
            id="matchExpressions as in NetworkPolicy",
        ),
        pytest.param(
            "from: {}\nto: {dns: cluster}",
            pods(),
            ExternalTarget(dns="cluster"),
            (PortSpec("UDP", 53),),
            id="the cluster DNS defaults to 53/UDP",
        ),
        pytest.param(
            'from: {}\nto: {dns: cluster}\nports: ["53/TCP"]',
            pods(),
            ExternalTarget(dns="cluster"),
            (PortSpec("TCP", 53),),
            id="the cluster DNS with given ports",
        ),
        pytest.param(
            "from: {}\nto: {cidr: 203.0.113.0/24}\nports: [443]",
            pods(),
            ExternalTarget(cidr=ipaddress.ip_network("203.0.113.0/24")),
            (PortSpec("TCP", 443),),
            id="a CIDR",
        ),
        pytest.param(
            "from: {}\nto: {host: api.example.com.}\nports: [443]",
            pods(),
            ExternalTarget(host="api.example.com"),
            (PortSpec("TCP", 443),),
            id="a host name, without its final dot",
        ),
    ],
)
def test_targets(
    tmp_path: Path,
    flow: str,
    source: PodTarget,
    destination: PodTarget | ExternalTarget,
    ports: tuple[PortSpec, ...],
) -> None:
    body = "- name: f\n" + textwrap.indent(flow + "\nexpect: allow", "  ")
    (read_flow,) = read(tmp_path, document(body)).flows
    assert (read_flow.source, read_flow.destination, read_flow.ports) == (
        source,
        destination,
        ports,
    )


def test_defaults_of_a_document(tmp_path: Path) -> None:
    header = HEADER.replace("metadata: {name: intents, namespace: shop}", "metadata: {name: x}")
    text = document("- {name: f, from: {}, to: {}, ports: [1], expect: deny}", header)
    expectations = read(tmp_path, text)
    assert expectations.key == "default/x"
    (flow,) = expectations.flows
    assert (flow.source, flow.http, flow.allow_empty) == (pods("default"), None, False)


def test_http_path_defaults_to_root(tmp_path: Path) -> None:
    text = document("- {name: f, from: {}, to: {}, ports: [80], http: {}, expect: allow}")
    assert read(tmp_path, text).flows[0].http == HttpCheck("/", ())


# --- every rejection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flows", "field", "reason"),
    [
        pytest.param(
            "- from: {}  # <-\n  to: {}\n  ports: [80]\n  expect: allow",
            "spec.flows[0].name",
            "required field is missing",
            id="a flow without a name",
        ),
        pytest.param(
            "- name: f  # <-\n  to: {}\n  ports: [80]\n  expect: allow",
            "spec.flows[0].from",
            "required field is missing",
            id="a flow without from",
        ),
        pytest.param(
            "- name: f  # <-\n  from: {}\n  ports: [80]\n  expect: allow",
            "spec.flows[0].to",
            "required field is missing",
            id="a flow without to",
        ),
        pytest.param(
            "- name: f  # <-\n  from: {}\n  to: {}\n  ports: [80]",
            "spec.flows[0].expect",
            "required field is missing",
            id="a flow without expect: intent is never implicit",
        ),
        pytest.param(
            "- name: f\n  from: {}\n  to: {}\n  port: [80]  # <-\n  expect: allow",
            "spec.flows[0].port",
            "unknown field 'port' (did you mean 'ports'?)",
            id="a misspelt field of a flow",
        ),
        pytest.param(
            "- name: f\n  from: {}\n  to: {podselector: {}}  # <-\n  ports: [80]\n  expect: allow",
            "spec.flows[0].to.podselector",
            "unknown field 'podselector' (did you mean 'podSelector'?)",
            id="a misspelt podSelector",
        ),
        pytest.param(
            "- name: f\n  from: {cidr: 10.0.0.0/8}  # <-\n  to: {}\n  ports: [80]\n  expect: allow",
            "spec.flows[0].from.cidr",
            "unknown field 'cidr' (a flow starts from pods; dns, cidr and host are destinations",
            id="an external source",
        ),
        pytest.param(
            "- name: f\n  from: {}\n  to:\n    podSelector:\n      matchlabels: {a: b}  # <-\n"
            "  ports: [80]\n  expect: allow",
            "spec.flows[0].to.podSelector.matchlabels",
            "unknown field 'matchlabels' (did you mean 'matchLabels'?)",
            id="a misspelt field of a selector",
        ),
        pytest.param(
            "- name: Frontend  # <-\n  from: {}\n  to: {}\n  ports: [80]\n  expect: allow",
            "spec.flows[0].name",
            "'Frontend' is not valid: expected a DNS label unique in the document",
            id="a name that is not a DNS label",
        ),
        pytest.param(
            "- {name: f, from: {}, to: {}, ports: [80], expect: allow}\n"
            "- {name: f, from: {}, to: {}, ports: [81], expect: deny}  # <-",
            "spec.flows[1].name",
            "duplicate flow name 'f' (also spec.flows[0])",
            id="a flow name used twice",
        ),
        pytest.param(
            "- name: f\n  from: {}\n  to: {}\n  ports: [80]\n  expect: allowed  # <-",
            "spec.flows[0].expect",
            "unsupported value 'allowed': supported values: 'allow', 'deny' (did you mean 'allow'?)",
            id="an unknown intent with a close spelling",
        ),
        pytest.param(
            "- name: f\n  from: {}\n  to: {}\n  ports: [80]\n  expect: yes  # <-",
            "spec.flows[0].expect",
            "must be a string, not true/false",
            id="a YAML boolean as the intent is reported once, as a type",
        ),
        pytest.param(
            "- name: f\n  from: {}\n  to: {}\n  ports: []  # <-\n  expect: allow",
            "spec.flows[0].ports",
            "must not be empty",
            id="an empty port list",
        ),
        pytest.param(
            "- name: f  # <-\n  from: {}\n  to: {}\n  expect: allow",
            "spec.flows[0].ports",
            "required field is missing: list the ports of the flow",
            id="a pod destination needs ports: there is no implicit all-ports",
        ),
        pytest.param(
            "- name: f  # <-\n  from: {}\n  to: {cidr: 192.0.2.0/24}\n  expect: allow",
            "spec.flows[0].ports",
            "required field is missing: list the ports of the flow",
            id="a CIDR destination needs ports",
        ),
        pytest.param(
            "- name: f  # <-\n  from: {}\n  to: {host: example.com}\n  expect: allow",
            "spec.flows[0].ports",
            "required field is missing: list the ports of the flow",
            id="a host destination needs ports",
        ),
        pytest.param(
            "- name: f\n  from: {}\n  to: {}\n  ports: [0]  # <-\n  expect: allow",
            "spec.flows[0].ports[0]",
            "0 is out of range: must be between 1 and 65535",
            id="port 0",
        ),
        pytest.param(
            "- name: f\n  from: {}\n  to: {}\n  ports: [70000]  # <-\n  expect: allow",
            "spec.flows[0].ports[0]",
            "70000 is out of range: must be between 1 and 65535",
            id="a port number above 65535",
        ),
        pytest.param(
            '- name: f\n  from: {}\n  to: {}\n  ports: ["70000/TCP"]  # <-\n  expect: allow',
            "spec.flows[0].ports[0]",
            "70000 is not a valid port number: must be between 1 and 65535, inclusive",
            id="a port string above 65535",
        ),
        pytest.param(
            '- name: f\n  from: {}\n  to: {}\n  ports: ["90-80"]  # <-\n  expect: allow',
            "spec.flows[0].ports[0]",
            "'90-80': the range must not end (80) below its start (90)",
            id="a reversed range",
        ),
        pytest.param(
            '- name: f\n  from: {}\n  to: {}\n  ports: ["8080/tcp"]  # <-\n  expect: allow',
            "spec.flows[0].ports[0]",
            "'8080/tcp' is not valid: expected a port: 8080, \"8080/TCP\"",
            id="a protocol in lower case",
        ),
        pytest.param(
            "- name: f\n  from: {}\n  to: {}\n  ports: [true]  # <-\n  expect: allow",
            "spec.flows[0].ports[0]",
            'must be a port: 8080, "8080/TCP", a range',
            id="a port that is neither a number nor a string",
        ),
        pytest.param(
            '- name: f\n  from: {}\n  to: {}\n  ports: ["metrics-port-long"]  # <-\n  expect: allow',
            "spec.flows[0].ports[0]",
            "'metrics-port-long' is not a valid IANA service name: must be no more than 15",
            id="a port name longer than 15 characters",
        ),
        pytest.param(
            '- name: f\n  from: {}\n  to: {cidr: 192.0.2.0/24}\n  ports: ["https"]  # <-\n'
            "  expect: allow",
            "spec.flows[0].ports[0]",
            "named port 'https' is resolved on destination pods",
            id="a named port for an external destination",
        ),
        pytest.param(
            "- name: f\n  from: {}\n  to: {dns: external}  # <-\n  expect: allow",
            "spec.flows[0].to.dns",
            "unsupported value 'external': supported values: 'cluster'",
            id="dns other than cluster",
        ),
        pytest.param(
            "- name: f\n  from: {}\n  to: {cidr: 192.0.2.1/24}  # <-\n  ports: [1]\n  expect: allow",
            "spec.flows[0].to.cidr",
            "'192.0.2.1/24' has host bits set: did you mean 192.0.2.0/24?",
            id="a CIDR with host bits set",
        ),
        pytest.param(
            "- name: f\n  from: {}\n  to: {cidr: nowhere}  # <-\n  ports: [1]\n  expect: allow",
            "spec.flows[0].to.cidr",
            "'nowhere' is not a valid CIDR",
            id="a CIDR that is not one",
        ),
        pytest.param(
            "- name: f\n  from: {}\n  to: {host: Example_Host}  # <-\n  ports: [1]\n"
            "  expect: allow",
            "spec.flows[0].to.host",
            "'Example_Host' is not valid: expected a host name beyond the pods",
            id="a host that is not a DNS name",
        ),
        pytest.param(
            "- name: f\n  from: {}\n  to: {cidr: 192.0.2.0/24, host: a.example}  # <-\n"
            "  ports: [1]\n  expect: allow",
            "spec.flows[0].to",
            "cidr and host are exclusive: give one destination per flow",
            id="two external destinations",
        ),
        pytest.param(
            "- name: f\n  from: {}\n  to: {dns: cluster, podSelector: {}}  # <-\n  expect: allow",
            "spec.flows[0].to",
            "dns may not be combined with podSelector",
            id="an external destination with a pod selector",
        ),
        pytest.param(
            "- name: f\n  from: {namespace: a, namespaceSelector: {}}  # <-\n  to: {}\n"
            "  ports: [1]\n  expect: allow",
            "spec.flows[0].from",
            "namespace and namespaceSelector are exclusive: give one",
            id="a namespace by name and by selector",
        ),
        pytest.param(
            "- name: f\n  from: {namespace: Shop}  # <-\n  to: {}\n  ports: [1]\n  expect: allow",
            "spec.flows[0].from.namespace",
            "'Shop' is not valid: expected a namespace name (a DNS label)",
            id="a namespace name that is not a DNS label",
        ),
        pytest.param(
            "- name: f\n  from: {podSelector: {matchLabels: {app: -x}}}  # <-\n  to: {}\n"
            "  ports: [1]\n  expect: allow",
            "spec.flows[0].from.podSelector.matchLabels.app",
            "invalid label value '-x'",
            id="a selector with an invalid label value",
        ),
        pytest.param(
            "- name: f\n  from: {}\n  to:\n    podSelector:\n      matchExpressions:\n"
            "        - {key: a, operator: In}  # <-\n  ports: [1]\n  expect: allow",
            "spec.flows[0].to.podSelector.matchExpressions[0].values",
            "must be non-empty when operator is 'In'",
            id="In without values",
        ),
        pytest.param(
            "- name: f\n  from: {}\n  to:\n    podSelector:\n      matchExpressions:\n"
            "        - {key: a, operator: Has}  # <-\n  ports: [1]\n  expect: allow",
            "spec.flows[0].to.podSelector.matchExpressions[0].operator",
            "unsupported value 'Has': supported values: 'In', 'NotIn', 'Exists', 'DoesNotExist'",
            id="an unknown operator",
        ),
        pytest.param(
            "- name: f\n  from: {}\n  to: {dns: cluster}\n  http: {path: /}  # <-\n  expect: allow",
            "spec.flows[0].http",
            "an HTTP check needs TCP ports, not 53/UDP",
            id="an HTTP check on UDP",
        ),
        pytest.param(
            "- name: f\n  from: {}\n  to: {}\n  ports: [80]\n  http: {path: healthz}  # <-\n"
            "  expect: allow",
            "spec.flows[0].http.path",
            "'healthz' is not valid: expected an absolute path such as /healthz",
            id="a relative HTTP path",
        ),
        pytest.param(
            "- name: f\n  from: {}\n  to: {}\n  ports: [80]\n  http: {expectStatus: [99]}  # <-\n"
            "  expect: allow",
            "spec.flows[0].http.expectStatus[0]",
            "99 is out of range: must be between 100 and 599",
            id="an HTTP status that is no status",
        ),
        pytest.param(
            "- name: f\n  from: {}\n  to: {}\n  ports: [80]\n  expect: allow\n"
            "  allowEmpty: 'yes'  # <-",
            "spec.flows[0].allowEmpty",
            "must be true or false, not a string",
            id="allowEmpty as a string",
        ),
        pytest.param(
            "- name: f\n  from: []  # <-\n  to: {}\n  ports: [80]\n  expect: allow",
            "spec.flows[0].from",
            "must be a mapping, not a list",
            id="from as a list",
        ),
    ],
)
def test_flow_problems(tmp_path: Path, flows: str, field: str, reason: str) -> None:
    path, found = problems_of(tmp_path, document(flows))
    (problem,) = found
    assert (problem.file, problem.line, problem.document) == (str(path), marked_line(path), 1)
    assert problem.field == field
    assert reason in problem.reason


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        pytest.param(
            HEADER.replace("  flows:\n", "  flows: []  # <-\n"),
            "spec.flows",
            "must not be empty",
            id="a document without flows",
        ),
        pytest.param(
            HEADER.replace("spec:\n  flows:\n", "spec: {}  # <-\n"),
            "spec.flows",
            "required field is missing",
            id="a spec without flows",
        ),
        pytest.param(
            HEADER.replace("spec:\n  flows:\n", "spek: {flows: []}  # <-\n"),
            "spek",
            "unknown field 'spek' (did you mean 'spec'?)",
            id="a misspelt spec",
        ),
        pytest.param(
            HEADER.replace("{name: intents, namespace: shop}", "{namespace: shop}  # <-")
            + "    - {name: f, from: {}, to: {}, ports: [1], expect: deny}\n",
            "metadata.name",
            "required field is missing",
            id="a document without a name",
        ),
    ],
)
def test_document_problems(tmp_path: Path, text: str, field: str, reason: str) -> None:
    path, found = problems_of(tmp_path, text)
    assert [(p.line, p.field) for p in found] == [(marked_line(path), field)]
    assert reason in found[0].reason


def test_sound_parts_of_a_flow_are_still_checked(tmp_path: Path) -> None:
    text = document(
        """
        - name: f
          from: {podSelector: {matchLabels: {app: -x}}}
          to: {}
          ports: ["90-80", "http-/UDP", "99999"]
          expect: maybe
        """
    )
    _, found = problems_of(tmp_path, text)
    assert [(p.line, p.field) for p in found] == [
        (7, "spec.flows[0].from.podSelector.matchLabels.app"),
        (9, "spec.flows[0].ports[0]"),
        (9, "spec.flows[0].ports[1]"),
        (9, "spec.flows[0].ports[2]"),
        (10, "spec.flows[0].expect"),
    ]


def test_from_an_api_object() -> None:
    where = Where(file="api:namespaces/shop/flowexpectations/e")
    obj: dict[str, Any] = {
        "apiVersion": "flowproof.dev/v1alpha1",
        "kind": "FlowExpectations",
        "metadata": {"name": "e", "namespace": "shop", "uid": "x", "generation": 3},
        "spec": {"flows": [{"name": "f", "from": {}, "to": {"dns": "cluster"}, "expect": "allow"}]},
        "status": {"observedGeneration": 3},
    }
    expectations = expectations_from_dict(obj, where)
    assert (expectations.key, expectations.source) == (
        "shop/e",
        "api:namespaces/shop/flowexpectations/e",
    )
    obj["apiVersion"] = "flowproof.dev/v2"
    with pytest.raises(InputError) as info:
        expectations_from_dict(obj, where)
    (problem,) = info.value.problems
    assert (problem.file, problem.line, problem.field) == (where.file, None, "apiVersion")
    assert "unsupported value 'flowproof.dev/v2'" in problem.reason


def test_documents_give_lines_to_the_converter(tmp_path: Path) -> None:
    path = tmp_path / "e.yaml"
    path.write_text(document("- {name: f, from: {}, to: {}, ports: [0], expect: allow}"))
    (doc,) = load_documents([path])
    with pytest.raises(InputError) as info:
        expectations_from_dict(doc.obj, doc.where)
    assert [(p.line, p.field) for p in info.value.problems] == [(6, "spec.flows[0].ports[0]")]


# --- the schema ---------------------------------------------------------------------------------

# What a CRD's openAPIV3Schema accepts of JSON Schema (and what this schema needs of it).
CRD_KEYWORDS = {
    "type",
    "properties",
    "required",
    "enum",
    "pattern",
    "items",
    "oneOf",
    "anyOf",
    "minItems",
    "maxItems",
    "maxLength",
    "maxProperties",
    "minimum",
    "maximum",
    "additionalProperties",
    "description",
    "x-kubernetes-int-or-string",
}


def keywords(node: Mapping[str, Any]) -> Iterator[str]:
    for key, value in node.items():
        yield key
        if key == "properties":
            for sub in value.values():
                yield from keywords(sub)
        elif key in ("items", "additionalProperties") and isinstance(value, Mapping):
            yield from keywords(value)
        elif key in ("oneOf", "anyOf"):
            for sub in value:
                yield from keywords(sub)


def test_the_schema_is_valid_and_crd_compatible() -> None:
    jsonschema.Draft202012Validator.check_schema(schema())
    top = {"$schema", "$id", "title"}
    used = set(keywords({k: v for k, v in schema().items() if k not in top}))
    assert used <= CRD_KEYWORDS, f"not usable in a CRD: {sorted(used - CRD_KEYWORDS)}"
    assert "x-kubernetes-int-or-string" in used, "ports must read as int-or-string in a CRD"


def test_the_example_validates_against_the_schema() -> None:
    (doc,) = load_documents(
        [Path(__file__).resolve().parents[2] / "examples/shop/expectations.yaml"]
    )
    assert list(jsonschema.Draft202012Validator(schema()).iter_errors(doc.obj)) == []


def test_a_configmap_is_read_by_the_file_reader_so_a_duplicate_key_is_refused_with_its_line() -> (
    None
):
    from collector.reading.expectations import expectations_from_configmap

    text = """apiVersion: flowproof.dev/v1alpha1
kind: FlowExpectations
metadata: {name: shop}
spec:
  flows:
    - name: a
      from: {podSelector: {}}
      to: {podSelector: {}}
      ports: ["80"]
      expect: allow
      expect: deny
"""
    documents, problems = expectations_from_configmap("shop", "flows", {"flows.yaml": text})
    assert documents == ()
    assert len(problems) == 1
    assert problems[0].startswith("api:namespaces/shop/configmaps/flows/data/flows.yaml:11")
    assert "duplicate key 'expect' (first at line 10)" in problems[0]
